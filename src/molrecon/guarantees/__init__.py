"""The guarantees of MOL, measured: Lipschitz certificate, uniqueness, robustness.

``molrecon check-lipschitz`` and ``molrecon robustness`` are thin layers over
this package. Everything here is a measurement of a trained checkpoint, on
data, with the numbers the theory promises printed beside it.

Modules
-------
* :mod:`.report`: the records the measurements produce, the two reports and
  the options of the two jobs, each with its JSON form;
* :mod:`.problems`: the MOL problems of raw scans (:func:`load_problems`,
  :func:`example_scan`), their fixed points (:func:`solve_mol`) and ‖A‖
  (:func:`operator_norm`);
* :mod:`molrecon.models.certificate`: what belongs to the network alone — the
  certified bound, local estimates at given points, the verdict and the
  checkpoints' :func:`certificate_for` (re-exported here);
* :mod:`.certificate`: those measured at the fixed points of real
  reconstructions, the uniqueness test, and :func:`check_lipschitz`;
* :mod:`.robustness`: the adversarial attack and :func:`robustness`.

Every public name is importable from ``molrecon.guarantees`` itself.

Equation
--------
MOL reconstructs the solution of

    x − H(x) + λ Aᴴ(A x − b) = 0,                                          (1)

with H the CNN prior, A = M F S the SENSE operator of the normalised data
(see :mod:`molrecon.physics.scaling`) and λ the checkpoint's trained weight.
If H is L-Lipschitz with L < 1, F = I − H is m-monotone with margin
m = 1 − L: Re⟨F(u) − F(v), u − v⟩ ≥ ‖u − v‖² − L‖u − v‖² = m‖u − v‖².

Certificate (global)
--------------------
ReLU is 1-Lipschitz and biases do not change Lipschitz constants, so the
product of certified per-layer operator-norm bounds is a global bound of
Lip(H) (:func:`molrecon.models.certified_bound`). Each layer bound is an
upper bound of the frequency-response supremum of the zero-padded
convolution over *continuous* frequencies, which bounds the layer's norm on
an image of every size (zero extension to the infinite grid, convolution,
restriction): the certificate holds for all image sizes. ``--size`` also
measures each layer's norm on one size by power iteration, a lower estimate
that shows how tight the certificate is.

Local estimates
---------------
At the fixed points of real reconstructions (where the network actually
operates): the Jacobian norm ‖J_H(x*)‖ by power iteration on JᵀJ, and the
adversarial ratio search max ‖H(u) − H(v)‖/‖u − v‖ around u = x*. Both are
attained by actual points or directions, so they are *lower* estimates of
Lip(H); they cannot certify anything, only refute (an estimate ≥ 1 proves
that H is not contractive).

Monotone without contraction
----------------------------
Uniqueness and robustness (below) use only that F = I − H is m-monotone, and
Lip(H) ≤ L < 1 is one way to get it (m = 1 − L). Near a point x the sharp
condition is on the symmetric part of H's Jacobian J: ⟨F(u) − F(v), u − v⟩ ≥
m‖u − v‖² for u, v near x iff μ = λ_max(½(J + Jᵀ)) ≤ 1 − m, where μ ≤ ‖J‖
always. A prior may exceed 1 in norm only through negative or rotating
directions (networks with an identity path do: their spectrum of ½(J + Jᵀ)
reaches −0.4 to −1.2 at the data) and still be monotone there. Lanczos on
½(J + Jᵀ) reads μ at every fixed point beside ‖J‖
(:func:`molrecon.models.lipschitz.monotonicity_estimate`); without a
certificate the margin of the uniqueness test and of the robustness bounds
is m = 1 − μ (basis ``monotone``). The step contraction below still needs L.

Verdict
-------
* ``violated``: some local Lipschitz estimate is ≥ 1 and μ is not < 1 at
  every point (or was not measured), or fixed points reached from different
  starts differ by more than the margin allows (``uniqueness``);
* ``certified``: the certified global bound is < 1;
* ``empirical``: no global certificate, but every local estimate is < 1;
* ``monotone``: some local Lipschitz estimate is ≥ 1 (the α = 1 step is not a
  contraction there), but μ < 1 at every point: F = I − H is monotone at the
  data, so the fixed point is unique and the robustness bounds hold locally,
  and the solver's convergence is what the residual reports.

Step contraction
----------------
With the exact data-consistency resolvent, the MOL step contracts with factor
ρ(α) = |1 − α| + αL = max(1 − αm, α(1 + L) − 1) for α ∈ (0, 2/(1 + L))
(:func:`molrecon.deq.contraction_factor`); the computed step uses a fixed
number of warm-started CG iterations, which approximates that resolvent and
has exactly the same fixed points.

Uniqueness
----------
For any x, the equation residual r(x) = x − H(x) + λ(AᴴAx − Aᴴb) bounds the
distance to the unique solution x* of (1): the operator on the left of (1) is
m-strongly monotone, so m‖x − x*‖² ≤ Re⟨r(x) − r(x*), x − x*⟩ ≤ ‖r(x)‖‖x − x*‖
and ‖x − x*‖ ≤ ‖r(x)‖/m. Two solves that stop at x_i and x_j are therefore at
most (‖r(x_i)‖ + ‖r(x_j)‖)/m apart: that is the tolerance-implied bound the
measured pairwise distances are compared with.

Robustness
----------
Let x and x + Δx solve (1) for b and b + Δb. Subtracting the two equations,

    F(x + Δx) − F(x) + λ AᴴA Δx = λ Aᴴ Δb,

and taking the real inner product with Δx (monotonicity on the left):

    m‖Δx‖² + λ‖AΔx‖² ≤ λ Re⟨Aᴴ Δb, Δx⟩ = λ Re⟨Δb, AΔx⟩ ≤ λ‖Δb‖‖AΔx‖.

* Dropping λ‖AΔx‖² ≥ 0 and using the middle form, m‖Δx‖² ≤ λ‖AᴴΔb‖‖Δx‖:

      ‖Δx‖ ≤ (λ/m)‖AᴴΔb‖ ≤ (λ/m)‖A‖‖Δb‖              (the paper-style bound).

* Keeping it, with t = ‖AΔx‖ ≥ 0: m‖Δx‖² ≤ λ(‖Δb‖t − t²). The right side is
  a concave parabola in t, largest at t = ‖Δb‖/2 where it equals λ‖Δb‖²/4, so

      ‖Δx‖ ≤ ½·√(λ/m)·‖Δb‖                               (the tight bound).

  It does not depend on ‖A‖. (It is attained when H is linear, H = (1 − m)I,
  and AᴴA has the eigenvalue m/λ: the amplification of (m + λAᴴA)⁻¹λAᴴ along
  an eigenvector with eigenvalue μ is λ√μ/(m + λμ), largest at μ = m/λ.)

Both bounds are amplifications ‖Δx‖/‖Δb‖ of the normalised problem (the
intensity scale of the data is held fixed). They are guarantees when m comes
from the certificate and estimates when m comes from local estimates.

The measured worst case: projected gradient ascent on ‖Δx‖² over Δb with
‖Δb_i‖ ≤ ε‖b_i‖ per slice and Δb supported on the sampled k-space locations,
differentiating through the equilibrium with the implicit gradient
(:func:`molrecon.deq.deq_solve`, Aᴴ(b + Δb) requiring grad). The same attack on
an *unrolled* network — the same CNN and MOL step run for a fixed K steps from
the zero-filled image Aᴴb, differentiated through the K steps — measures
whether MOL degrades less than an unrolled network without the monotone
guarantee. The ascent step is the normalised gradient on the sphere
‖Δb_i‖ = ε‖b_i‖ (see :class:`RobustnessConfig`): for a linear map K it is the
power iteration on KᴴK, whose fixed points are the maximisers' condition
∇‖KΔb‖² ∥ Δb.
"""

from __future__ import annotations

from ..models.certificate import (
    VERDICTS,
    GlobalBound,
    LocalEstimates,
    PointEstimate,
    Summary,
    Verdict,
    certificate_for,
    decide,
    global_bound,
    layer_norms_at_size,
    local_estimates,
)
from .certificate import check_lipschitz, check_uniqueness
from .problems import example_scan, load_problems, operator_norm, solve_mol
from .report import (
    START_NAMES,
    AttackResult,
    CheckConfig,
    LipschitzReport,
    RobustnessBounds,
    RobustnessConfig,
    RobustnessReport,
    StepContraction,
    UniquenessResult,
    robustness_bounds,
)
from .robustness import attack, robustness

__all__ = [
    "START_NAMES",
    "VERDICTS",
    "AttackResult",
    "CheckConfig",
    "GlobalBound",
    "LipschitzReport",
    "LocalEstimates",
    "PointEstimate",
    "RobustnessBounds",
    "RobustnessConfig",
    "RobustnessReport",
    "StepContraction",
    "Summary",
    "UniquenessResult",
    "Verdict",
    "attack",
    "certificate_for",
    "check_lipschitz",
    "check_uniqueness",
    "decide",
    "example_scan",
    "global_bound",
    "layer_norms_at_size",
    "load_problems",
    "local_estimates",
    "operator_norm",
    "robustness",
    "robustness_bounds",
    "solve_mol",
]
