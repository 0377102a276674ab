"""The guarantees of MOL, measured: Lipschitz certificate, uniqueness, robustness.

``molrecon check-lipschitz`` and ``molrecon robustness`` are thin layers over
this module. Everything here is a measurement of a trained checkpoint, on
data, with the numbers the theory promises printed beside it.

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

Verdict
-------
* ``violated``: some local estimate is ≥ 1 (H is provably not a contraction),
  or fixed points reached from different starts differ by more than the
  margin allows (``uniqueness``);
* ``certified``: the certified global bound is < 1;
* ``empirical``: no global certificate, but every local estimate is < 1.

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

import copy
import datetime as _dt
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ConfigError, InputDataError

if TYPE_CHECKING:
    import torch

    from ..deq.mol import MolConfig, MolStep
    from ..models.checkpoint import LoadedModel
    from ..models.cnn import MolCNN
    from ..physics.sense import SenseOperator
    from ..problem import Problem

Verdict = Literal["certified", "empirical", "violated"]
VERDICTS: tuple[str, ...] = ("certified", "empirical", "violated")
START_NAMES: tuple[str, ...] = ("zero", "zero-filled", "cg-sense", "random")


def example_scan() -> Path:
    """The raw example scan shipped with molrecon (2D brain, 8 coils, R = 4)."""
    return Path(str(resources.files("molrecon") / "data" / "examples" / "brain_2d_r4.h5"))


def _finite(v: float | None) -> float | None:
    """JSON-safe float: None for missing or non-finite values."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _json_safe(value: Any) -> Any:
    """A copy of plain data with non-finite floats replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return _finite(value)
    return value


# ===================================================================================== results
@dataclass(frozen=True)
class Summary:
    """Distribution of an estimate over data points."""

    values: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def max(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {"min": _finite(self.min), "median": _finite(self.median),
                "max": _finite(self.max), "values": [_finite(v) for v in self.values]}


@dataclass(frozen=True)
class GlobalBound:
    """Certified global Lipschitz bound of H: the product of certified layer bounds.

    ``all_sizes`` is True: each layer bound is a supremum over continuous
    frequencies (see the module docstring). ``size`` and ``measured_layer_norms``
    are the power-iteration norms of the zero-padded layers on one image size
    (lower estimates; only when a size was asked for).
    """

    bound: float
    layer_bounds: tuple[float, ...]
    spectral_grid: int
    constraint: str
    lipschitz_target: float
    all_sizes: bool = True
    size: tuple[int, ...] | None = None
    measured_layer_norms: tuple[float, ...] | None = None

    @property
    def certified(self) -> bool:
        return self.bound < 1.0

    @property
    def measured_product(self) -> float | None:
        return None if self.measured_layer_norms is None else math.prod(self.measured_layer_norms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bound": _finite(self.bound),
            "layer_bounds": [_finite(v) for v in self.layer_bounds],
            "spectral_grid": self.spectral_grid,
            "constraint": self.constraint,
            "lipschitz_target": self.lipschitz_target,
            "holds_for_all_image_sizes": self.all_sizes,
            "certified": self.certified,
            "size": None if self.size is None else list(self.size),
            "measured_layer_norms": (None if self.measured_layer_norms is None
                                     else [_finite(v) for v in self.measured_layer_norms]),
            "measured_product": _finite(self.measured_product),
        }


@dataclass(frozen=True)
class PointEstimate:
    """Local Lipschitz estimates at one data point (one slice of one file).

    ``point`` says what the point is: ``"fixed point"`` (the MOL solution),
    or ``"cg-sense"`` when the MOL iteration produced non-finite values and the
    CG-SENSE start was used instead.
    """

    source: str
    item: int
    point: str
    power: float
    ratio: float
    residual: float | None = None
    iterations: int | None = None
    converged: bool | None = None

    @property
    def max(self) -> float:
        """The larger estimate; a non-finite one (overflow) counts as infinite."""
        vals = [v if math.isfinite(v) else math.inf for v in (self.power, self.ratio)]
        return max(vals)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "item": self.item, "point": self.point,
                "power": _finite(self.power), "ratio": _finite(self.ratio),
                "fixed_point_residual": _finite(self.residual), "iterations": self.iterations,
                "converged": self.converged}


@dataclass(frozen=True)
class LocalEstimates:
    """Local estimates at every point, and their distributions."""

    points: tuple[PointEstimate, ...]

    @property
    def power(self) -> Summary:
        return Summary(tuple(p.power for p in self.points))

    @property
    def ratio(self) -> Summary:
        return Summary(tuple(p.ratio for p in self.points))

    @property
    def max(self) -> float:
        return max(p.max for p in self.points)

    def as_dict(self) -> dict[str, Any]:
        return {"max": _finite(self.max), "power": self.power.as_dict(),
                "ratio": self.ratio.as_dict(), "points": [p.as_dict() for p in self.points]}


@dataclass(frozen=True)
class StepContraction:
    """Contraction facts of the MOL step for a Lipschitz constant L of H.

    factor ρ = |1 − α| + αL (exact resolvent); admissible α ∈ (0, 2/(1 + L)).
    """

    alpha: float
    lipschitz: float

    @property
    def margin(self) -> float:
        """Monotonicity margin m = 1 − L."""
        return 1.0 - self.lipschitz

    @property
    def factor(self) -> float:
        from ..deq.mol import contraction_factor

        return contraction_factor(self.alpha, self.lipschitz)

    @property
    def alpha_max(self) -> float | None:
        """Upper end of the admissible α range (0, 2/(1 + L)); None when L ≥ 1."""
        return 2.0 / (1.0 + self.lipschitz) if self.lipschitz < 1.0 else None

    @property
    def contracts(self) -> bool:
        return self.lipschitz < 1.0 and self.factor < 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lipschitz": _finite(self.lipschitz),
                "margin": _finite(self.margin), "factor": _finite(self.factor),
                "alpha_range": [0.0, _finite(self.alpha_max)], "contracts": self.contracts,
                "best_alpha": 1.0, "best_factor": _finite(self.lipschitz)}


@dataclass(frozen=True)
class RobustnessBounds:
    """Amplification bounds ‖Δx‖/‖Δb‖ of the normalised problem (see the module docstring).

    ``basis`` is "certified" (m from the global certificate: guarantees) or
    "local" (m from the local estimates: estimates). ``op_norm`` is ‖A‖.
    """

    lam: float
    lipschitz: float
    op_norm: float
    basis: str

    @property
    def margin(self) -> float:
        return 1.0 - self.lipschitz

    @property
    def paper(self) -> float | None:
        """(λ/m)·‖A‖, or None when m ≤ 0."""
        m = self.margin
        return self.lam / m * self.op_norm if m > 0 else None

    @property
    def tight(self) -> float | None:
        """½·√(λ/m), or None when m ≤ 0."""
        m = self.margin
        return 0.5 * math.sqrt(self.lam / m) if m > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "lipschitz": _finite(self.lipschitz),
                "margin": _finite(self.margin), "op_norm": _finite(self.op_norm),
                "basis": self.basis, "paper": _finite(self.paper), "tight": _finite(self.tight)}


@dataclass(frozen=True)
class UniquenessResult:
    """Fixed points reached from several starts (per slice, worst over slices).

    ``max_distance``: largest pairwise ‖x_i − x_j‖/‖x_cg-sense‖; ``bound``: the
    tolerance-implied (‖r_i‖ + ‖r_j‖)/(m·‖x_cg-sense‖) of the same pair, r the
    equation residual (None when m ≤ 0); ``consistent``: every pair within its
    bound (None without a bound).
    """

    starts: tuple[str, ...]
    max_distance: float
    bound: float | None
    basis: str
    consistent: bool | None
    worst_pair: tuple[str, str]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    iterations: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "max_relative_distance": _finite(self.max_distance),
                "bound": _finite(self.bound), "basis": self.basis,
                "consistent": self.consistent, "worst_pair": list(self.worst_pair),
                "relative_residuals": [_finite(r) for r in self.residuals],
                "converged": list(self.converged), "iterations": list(self.iterations)}


@dataclass(frozen=True)
class LipschitzReport:
    """Everything ``molrecon check-lipschitz`` reports."""

    model: str
    sha256: str
    constraint: str
    alpha: float
    lam: float
    cg_iters: int
    data: tuple[str, ...]
    global_bound: GlobalBound
    local: LocalEstimates
    op_norm: float
    contraction_certified: StepContraction
    contraction_local: StepContraction
    robustness: RobustnessBounds
    uniqueness: UniquenessResult | None
    verdict: Verdict
    reasons: tuple[str, ...]
    stored_certificate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sha256": self.sha256,
            "constraint": self.constraint,
            "alpha": self.alpha,
            "lambda": self.lam,
            "cg_iters": self.cg_iters,
            "data": list(self.data),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "certified": self.global_bound.as_dict(),
            "local": self.local.as_dict(),
            "margin_certified": _finite(self.contraction_certified.margin),
            "margin_local": _finite(self.contraction_local.margin),
            "contraction_certified": self.contraction_certified.as_dict(),
            "contraction_local": self.contraction_local.as_dict(),
            "op_norm": _finite(self.op_norm),
            "robustness_bounds": self.robustness.as_dict(),
            "uniqueness": None if self.uniqueness is None else self.uniqueness.as_dict(),
            "stored_certificate": _json_safe(self.stored_certificate),
        }


@dataclass(frozen=True)
class AttackResult:
    """Worst perturbation found for one network at one ε (worst over slices).

    ``amplification``: ‖Δx‖/‖Δb‖; ``relative_change``: ‖Δx‖/‖x‖ of the same
    slice; ``paper_at_found``: (λ/m)‖AᴴΔb‖/‖Δb‖ at the Δb found (MOL only,
    None without a positive margin); ``history``: best amplification after
    each ascent step; ``converged``: every forward solve reached its tolerance
    (always True for the unrolled network).
    """

    network: str
    eps: float
    amplification: float
    per_item: tuple[float, ...]
    relative_change: float
    paper_at_found: float | None
    history: tuple[float, ...]
    converged: bool

    def as_dict(self) -> dict[str, Any]:
        return {"network": self.network, "eps": self.eps,
                "amplification": _finite(self.amplification),
                "per_item": [_finite(v) for v in self.per_item],
                "relative_change": _finite(self.relative_change),
                "paper_bound_at_found": _finite(self.paper_at_found),
                "history": [_finite(v) for v in self.history], "converged": self.converged}


@dataclass(frozen=True)
class RobustnessReport:
    """Everything ``molrecon robustness`` reports."""

    model: str
    data: tuple[str, ...]
    eps: tuple[float, ...]
    steps: int
    unrolled_k: int
    mol: tuple[AttackResult, ...]
    unrolled: tuple[AttackResult, ...]
    bounds: RobustnessBounds
    certified_bound: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": list(self.data), "eps": list(self.eps),
                "steps": self.steps, "unrolled_k": self.unrolled_k,
                "certified_bound": _finite(self.certified_bound),
                "bounds": self.bounds.as_dict(),
                "mol": [a.as_dict() for a in self.mol],
                "unrolled": [a.as_dict() for a in self.unrolled]}


# ===================================================================================== configs
@dataclass(frozen=True)
class CheckConfig:
    """Options of :func:`check_lipschitz`.

    power_iters       power iterations on JᵀJ per point
    ratio_steps       ascent steps of the ratio search per point
    tol, max_iter     MOL fixed-point solve: relative residual ‖T(x) − x‖/‖x‖ ≤ tol
    norm_iters        power iterations on AᴴA for ‖A‖
    uniqueness        also solve from every start in ``START_NAMES`` and compare
    size              image size (Y, X) or (D, Y, X) at which to measure layer norms
    layer_iters       power iterations per layer at ``size``
    seed              seed of every random start / probe
    """

    power_iters: int = 20
    ratio_steps: int = 10
    tol: float = 1e-5
    max_iter: int = 200
    norm_iters: int = 30
    uniqueness: bool = False
    size: tuple[int, ...] | None = None
    layer_iters: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("power_iters", "norm_iters", "max_iter", "layer_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.ratio_steps, bool) or not isinstance(self.ratio_steps, int) \
                or self.ratio_steps < 0:
            raise ConfigError(f"ratio_steps must be an integer >= 0, got {self.ratio_steps!r}")
        if not (isinstance(self.tol, (int, float)) and 0.0 < self.tol < 1.0):
            raise ConfigError(f"tol must lie in (0, 1), got {self.tol!r}")
        if self.size is not None and (len(self.size) not in (2, 3)
                                      or any(int(s) != s or s < 1 for s in self.size)):
            raise ConfigError(f"size must be 2 or 3 positive integers, got {self.size!r}")


@dataclass(frozen=True)
class RobustnessConfig:
    """Options of :func:`robustness`.

    eps          perturbation radii, relative: ‖Δb_i‖ ≤ ε‖b_i‖ per slice
    steps        gradient-ascent steps per ε (each one forward and one backward solve)
    unrolled_k   K of the unrolled comparison network (0: no comparison)
    beta         ascent step on the sphere: Δb ← r·unit((1 − β)Δb/r + β·ĝ), ĝ the unit
                 gradient; β = 1 is the power iteration of the linearised map
    tol          forward fixed-point tolerance (relative residual); None: 1e-5 in
                 single precision, 1e-10 in double
    backward_tol tolerance of the implicit-gradient solve (only the direction matters)
    max_iter     cap of each forward and backward solve
    power_iters  power iterations for the local Lipschitz estimate at the fixed point
    norm_iters   power iterations on AᴴA for ‖A‖
    seed         seed of the initial perturbation
    """

    eps: tuple[float, ...] = (0.01, 0.05)
    steps: int = 5
    unrolled_k: int = 10
    beta: float = 1.0
    tol: float | None = None
    backward_tol: float = 1e-4
    max_iter: int = 200
    power_iters: int = 20
    norm_iters: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps or any(not (isinstance(e, (int, float)) and 0.0 < e < math.inf)
                               for e in self.eps):
            raise ConfigError(f"eps must be positive numbers, got {self.eps!r}")
        for name in ("steps", "unrolled_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("max_iter", "power_iters", "norm_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta <= 1.0):
            raise ConfigError(f"beta must lie in (0, 1], got {self.beta!r}")
        if self.tol is not None and not (0.0 < self.tol < 1.0):
            raise ConfigError(f"tol must lie in (0, 1), got {self.tol!r}")
        if not 0.0 < self.backward_tol < 1.0:
            raise ConfigError(f"backward_tol must lie in (0, 1), got {self.backward_tol!r}")


# ===================================================================================== data
def _pick_items(n: int, points: int | None) -> list[int]:
    """``points`` slice indices spread evenly over ``n`` slices (all when None or ≥ n)."""
    if points is None or points >= n:
        return list(range(n))
    if points == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})


def load_problems(paths: Sequence[str | os.PathLike[str]], *, kinds: Sequence[str] | None = None,
                  points: int | None = 4, device: str | torch.device = "cpu",
                  double: bool = False) -> list[Problem]:
    """Read raw files and build their normalised MOL problems, as ``molrecon reconstruct`` does.

    Per file: up to ``points`` slices spread evenly over the scan (batch items;
    a 3D scan is one item), the intensity scale of
    :mod:`molrecon.physics.scaling`, ESPIRiT maps, the SENSE operator and the
    CG-SENSE start. ``kinds``: the data kinds the model applies to (a file of
    another kind is refused with :class:`~molrecon.errors.ConfigError`).
    ``double`` builds everything in complex128.
    """
    import torch

    from ..io.detect import read_raw
    from ..problem import from_scan, with_sense_start

    if points is not None and points < 1:
        raise ConfigError(f"points must be at least 1, got {points}")
    dev = torch.device(device)
    out: list[Problem] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise InputDataError("no such file", path=p)
        scan = read_raw(p)
        if kinds is not None and scan.kind not in kinds:
            raise ConfigError(f"the scan is {scan.kind} data, the model applies to "
                              f"{'/'.join(kinds)} data", path=p)
        idx = _pick_items(scan.shape[0], points)
        prep = from_scan(scan, idx, dev)
        op, kn = prep.op, prep.kspace
        if double:
            op = op.to(dtype=torch.complex128)
            kn = kn.to(torch.complex128)
        out.append(with_sense_start(op, kn, kind=scan.kind, source=p.name, items=idx))
    return out


# ===================================================================================== helpers
def _item_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every batch item, (B,)."""
    import torch

    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _complex_noise(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                   generator: torch.Generator) -> torch.Tensor:
    """Circular complex white noise, E|n|² = 1, drawn on the CPU generator."""
    import torch

    real = torch.empty((), dtype=dtype).real.dtype
    n = torch.randn((*shape, 2), generator=generator, dtype=real) * (0.5 ** 0.5)
    return torch.view_as_complex(n).to(device)


def _generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(int(seed))


def _prior_for(model: MolCNN, dtype: torch.dtype) -> MolCNN:
    """``model`` itself, or a float64 copy for complex128 problems."""
    import torch

    if dtype == torch.complex128 and model.raw_weights()[0].dtype != torch.float64:
        return copy.deepcopy(model).double()
    return model


def _mol_step(model: MolCNN, mol_config: MolConfig, device: torch.device) -> MolStep:
    from ..deq.mol import MolStep

    return MolStep(model, replace(mol_config, learn_lam=False)).to(device).eval()


def _as_model(subject: LoadedModel | MolCNN) -> MolCNN:
    return subject.model if hasattr(subject, "mol_config") else subject  # type: ignore[union-attr]


# ===================================================================================== pieces
def global_bound(model: MolCNN, *, size: Sequence[int] | None = None, layer_iters: int = 50,
                 seed: int = 0) -> GlobalBound:
    """The certified bound of ``model`` (and its layers' measured norms at ``size``)."""
    from ..models.spectral import layer_bounds

    bounds = tuple(layer_bounds(model))
    measured = None
    if size is not None:
        measured = layer_norms_at_size(model, size, iters=layer_iters, seed=seed)
    return GlobalBound(bound=math.prod(bounds), layer_bounds=bounds,
                       spectral_grid=int(model.spectral_grid), constraint=model.constraint,
                       lipschitz_target=float(model.lipschitz_target),
                       size=None if size is None else tuple(int(s) for s in size),
                       measured_layer_norms=measured)


def layer_norms_at_size(model: MolCNN, size: Sequence[int], *, iters: int = 50,
                        seed: int = 0) -> tuple[float, ...]:
    """Operator norm of every zero-padded layer (effective weights) on one image size.

    ``size`` is (Y, X) for a 2D model, (D, Y, X) for a 3D one (a 2D size gives
    D = 1 for a 3D model). Power iteration on WᵀW in float64 (W the "same"
    convolution, Wᵀ its transposed convolution); each value is a lower
    estimate of the layer's norm on that size, itself ≤ the certified bound.
    """
    import torch
    import torch.nn.functional as nnf

    dims = model.config.dims
    shape = tuple(int(s) for s in size)
    if dims == 2 and len(shape) != 2:
        raise ConfigError(f"a 2D model needs a size YxX, got {'x'.join(map(str, shape))}")
    if dims == 3 and len(shape) == 2:
        shape = (1, *shape)
    if any(s < 1 for s in shape):
        raise ConfigError(f"size must be positive, got {shape}")
    conv, convt = ((nnf.conv2d, nnf.conv_transpose2d) if dims == 2
                   else (nnf.conv3d, nnf.conv_transpose3d))
    pad = model.config.kernel // 2
    gen = _generator(seed)
    out: list[float] = []
    with torch.no_grad():
        for w in model.effective_weights():
            w64 = w.detach().to(device="cpu", dtype=torch.float64)             # (Co, Ci, k, ...)
            v = torch.randn((1, w64.shape[1], *shape), generator=gen, dtype=torch.float64)
            v = v / torch.linalg.vector_norm(v)
            sigma = 0.0
            for _ in range(iters):
                wv = conv(v, w64, padding=pad)                                  # (1, Co, *shape)
                sigma = max(sigma, float(torch.linalg.vector_norm(wv)))
                u = convt(wv, w64, padding=pad)                                 # (1, Ci, *shape)
                nu = torch.linalg.vector_norm(u)
                if float(nu) == 0.0:
                    break
                v = u / nu
            out.append(sigma)
    return tuple(out)


def operator_norm(op: SenseOperator, *, iters: int = 30, seed: int = 0) -> float:
    """‖A‖ = √λ_max(AᴴA) by power iteration (largest over batch items; a lower estimate
    that converges from below)."""
    import torch

    gen = _generator(seed)
    with torch.no_grad():
        v = _complex_noise(op.image_shape, op.dtype, op.device, gen)           # (B, D, Y, X)
        v = v / _bcast(_item_norm(v), v)
        est = torch.zeros(v.shape[0], dtype=v.real.dtype, device=v.device)
        for _ in range(iters):
            w = op.normal(v)                                                    # (B, D, Y, X)
            nw = _item_norm(w)
            est = torch.maximum(est, torch.sqrt(torch.sum((v.conj() * w).real.reshape(
                v.shape[0], -1), dim=1).clamp_min(0)))
            safe = nw > 0
            v = torch.where(_bcast(safe, v), w / _bcast(torch.where(safe, nw, 1.0), w), v)
    return float(est.max())


def robustness_bounds(*, lam: float, lipschitz: float, op_norm: float,
                      basis: str) -> RobustnessBounds:
    """Paper-style (λ/m)‖A‖ and tight ½√(λ/m) amplification bounds, m = 1 − L."""
    return RobustnessBounds(lam=float(lam), lipschitz=float(lipschitz), op_norm=float(op_norm),
                            basis=basis)


def decide(*, certified_bound: float, local_max: float,
           uniqueness_consistent: bool | None = None) -> tuple[Verdict, tuple[str, ...]]:
    """The verdict (see the module docstring) and the reasons for it."""
    reasons: list[str] = []
    if not local_max < 1.0:                     # also NaN: an overflowing estimate refutes
        reasons.append(f"a local Lipschitz estimate is {local_max:.4g} >= 1: H is not a "
                       "contraction near the data")
    if uniqueness_consistent is False:
        reasons.append("fixed points from different starts differ by more than the "
                       "monotonicity margin allows")
    if reasons:
        return "violated", tuple(reasons)
    if certified_bound < 1.0:                  # NaN is not < 1: no certificate
        reason = (f"certified global bound {certified_bound:.4g} < 1 "
                  "(all inputs, all image sizes)")
        return "certified", (reason,)
    reason = (f"no global certificate (bound {certified_bound:.4g} >= 1); local estimates "
              f"at the data are < 1 (max {local_max:.4g})")
    return "empirical", (reason,)


def solve_mol(step: MolStep, problem: Problem, x0: torch.Tensor, *, tol: float,
              max_iter: int) -> Any:
    """The MOL fixed point of ``problem`` from ``x0`` (Anderson, no graph).

    Returns :class:`~molrecon.deq.fixed_point.FixedPointResult`.
    """
    import torch

    from ..deq.fixed_point import FixedPointConfig, solve_fixed_point
    from ..deq.mol import support_of

    cfg = FixedPointConfig(method="anderson", tol=tol, max_iter=max_iter, warn=False)
    with torch.no_grad():
        aty = problem.aty                                                     # (B, D, Y, X)
        fn = step.bind(normal=problem.op.normal, aty=aty, support=support_of(problem.op))
        return solve_fixed_point(fn, x0, config=cfg,
                                 label="MOL fixed-point iteration")


def local_estimates(model: MolCNN, points: Sequence[torch.Tensor], *,
                    labels: Sequence[tuple[str, int, str]] | None = None,
                    power_iters: int = 20, ratio_steps: int = 10,
                    seed: int = 0) -> LocalEstimates:
    """Power-iteration and ratio-search estimates at every item of every tensor in ``points``.

    ``points``: complex ``(B, D, Y, X)`` tensors; ``labels``: (source, item,
    point kind) per item, in order (default: ("", index, "point")).
    """
    import torch

    from ..models.lipschitz import local_lipschitz_power, local_lipschitz_ratio

    items = [p[i:i + 1].detach() for p in points for i in range(p.shape[0])]
    if not items:
        raise ConfigError("local Lipschitz estimates need at least one data point")
    if labels is not None and len(labels) != len(items):
        raise ValueError("one label per point item is needed")
    gen = _generator(seed)
    priors: dict[torch.dtype, MolCNN] = {}
    out: list[PointEstimate] = []
    for n, x in enumerate(items):
        if x.dtype not in priors:
            priors[x.dtype] = _prior_for(model, x.dtype)
        prior = priors[x.dtype]
        power = local_lipschitz_power(prior, x, iters=power_iters, generator=gen)
        with torch.no_grad():
            ratio_t, _ = local_lipschitz_ratio(prior, x, steps=ratio_steps, generator=gen)
        src, item, kind = labels[n] if labels is not None else ("", n, "point")
        out.append(PointEstimate(source=src, item=item, point=kind, power=float(power),
                                 ratio=float(ratio_t)))
    return LocalEstimates(tuple(out))


def check_uniqueness(step: MolStep, problem: Problem, *, lipschitz: float, basis: str,
                     tol: float = 1e-5, max_iter: int = 200, seed: int = 0) -> UniquenessResult:
    """Solve ``problem`` from every start in ``START_NAMES`` and compare the fixed points.

    Distances are relative to the norm of the CG-SENSE-started solution; the
    bound of a pair is (‖r_i‖ + ‖r_j‖)/(m‖x_ref‖) with r the equation residual
    (module docstring), m = 1 − ``lipschitz``.
    """
    import torch

    from ..deq.mol import support_of

    gen = _generator(seed)
    with torch.no_grad():
        aty = problem.aty                                                     # (B, D, Y, X)
        start = problem.start
        rms = _item_norm(start) / math.sqrt(start[0].numel())                  # (B,)
        noise = _complex_noise(start.shape, start.dtype, start.device, gen)
        starts = {
            "zero": torch.zeros_like(start),
            "zero-filled": aty,
            "cg-sense": start,
            "random": noise * _bcast(rms, noise).to(noise.dtype),
        }
        sols: dict[str, torch.Tensor] = {}
        res_norm: dict[str, torch.Tensor] = {}
        residuals, converged, iterations = [], [], []
        for name in START_NAMES:
            fp = solve_mol(step, problem, starts[name], tol=tol, max_iter=max_iter)
            sols[name] = fp.x
            r = step.equation_residual(fp.x, normal=problem.op.normal, aty=aty,
                                       support=support_of(problem.op))
            res_norm[name] = _item_norm(r)                                      # (B,)
            residuals.append(float(fp.final_residual.max()))
            converged.append(bool(fp.converged))
            iterations.append(int(fp.item_iterations.max()))
        ref = _item_norm(sols["cg-sense"]).clamp_min(torch.finfo(start.real.dtype).tiny)
        m = 1.0 - lipschitz
        worst, worst_pair, worst_bound = -1.0, (START_NAMES[0], START_NAMES[1]), None
        consistent: bool | None = True if m > 0 else None
        for i, a in enumerate(START_NAMES):
            for b in START_NAMES[i + 1:]:
                d = _item_norm(sols[a] - sols[b]) / ref                          # (B,)
                bound = (res_norm[a] + res_norm[b]) / (m * ref) if m > 0 else None
                if not bool(torch.isfinite(d).all()):
                    d = torch.full_like(d, math.inf)
                if bound is not None and bool((d > bound).any()):
                    consistent = False
                k = int(torch.argmax(d))
                if float(d[k]) > worst:
                    worst, worst_pair = float(d[k]), (a, b)
                    worst_bound = None if bound is None else float(bound[k])
    return UniquenessResult(starts=START_NAMES, max_distance=worst, bound=worst_bound,
                            basis=basis, consistent=consistent, worst_pair=worst_pair,
                            residuals=tuple(residuals), converged=tuple(converged),
                            iterations=tuple(iterations))


# ===================================================================================== jobs
def check_lipschitz(loaded: LoadedModel, problems: Sequence[Problem],
                    config: CheckConfig | None = None) -> LipschitzReport:
    """Certificate, local estimates at MOL fixed points, margins, bounds and verdict.

    The fixed points are those of real MOL reconstructions of ``problems``
    (Anderson from the CG-SENSE start, the checkpoint's α, λ and CG count).
    Where the iteration produced non-finite values (a non-contractive model),
    the CG-SENSE image of that slice serves as the point instead.
    """
    import torch

    cfg = CheckConfig() if config is None else config
    if not problems:
        raise ConfigError("check-lipschitz needs at least one data file")
    model = loaded.model
    mol_cfg = loaded.mol_config
    gb = global_bound(model, size=cfg.size, layer_iters=cfg.layer_iters, seed=cfg.seed)

    points: list[torch.Tensor] = []
    labels: list[tuple[str, int, str]] = []
    facts: list[tuple[float | None, int, bool]] = []
    op_norm = 0.0
    for prob in problems:
        step = _mol_step(_prior_for(model, prob.dtype), mol_cfg, prob.start.device)
        fp = solve_mol(step, prob, prob.start, tol=cfg.tol, max_iter=cfg.max_iter)
        finite = torch.isfinite(torch.view_as_real(fp.x)).reshape(fp.x.shape[0], -1).all(dim=1)
        x = torch.where(_bcast(finite, fp.x), fp.x, prob.start)                 # (B, D, Y, X)
        points.append(x)
        final = fp.final_residual
        for i in range(x.shape[0]):
            ok = bool(finite[i])
            labels.append((prob.source, prob.items[i] if i < len(prob.items) else i,
                           "fixed point" if ok else "cg-sense"))
            facts.append((float(final[i]) if ok else None, int(fp.item_iterations[i]),
                          bool(fp.converged_items[i]) and ok))
        op_norm = max(op_norm, operator_norm(prob.op, iters=cfg.norm_iters, seed=cfg.seed))
    est = local_estimates(model, points, labels=labels, power_iters=cfg.power_iters,
                          ratio_steps=cfg.ratio_steps, seed=cfg.seed)
    est = LocalEstimates(tuple(replace(p, residual=f[0], iterations=f[1], converged=f[2])
                               for p, f in zip(est.points, facts)))
    local_max = est.max
    if gb.certified:
        lip, basis = gb.bound, "certified"
    else:
        lip, basis = local_max, "local"
    bounds = robustness_bounds(lam=mol_cfg.lam, lipschitz=lip, op_norm=op_norm, basis=basis)

    uniq = None
    if cfg.uniqueness:
        results = []
        for prob in problems:
            step = _mol_step(_prior_for(model, prob.dtype), mol_cfg, prob.start.device)
            results.append(check_uniqueness(step, prob, lipschitz=lip, basis=basis, tol=cfg.tol,
                                            max_iter=cfg.max_iter, seed=cfg.seed))
        uniq = _merge_uniqueness(results)
    verdict, reasons = decide(certified_bound=gb.bound, local_max=local_max,
                              uniqueness_consistent=None if uniq is None else uniq.consistent)
    return LipschitzReport(
        model=str(loaded.path), sha256=loaded.sha256, constraint=loaded.constraint,
        alpha=float(mol_cfg.alpha), lam=float(mol_cfg.lam), cg_iters=int(mol_cfg.cg_iters),
        data=tuple(p.source for p in problems), global_bound=gb, local=est, op_norm=op_norm,
        contraction_certified=StepContraction(float(mol_cfg.alpha), gb.bound),
        contraction_local=StepContraction(float(mol_cfg.alpha), local_max),
        robustness=bounds, uniqueness=uniq, verdict=verdict, reasons=reasons,
        stored_certificate=dict(loaded.certificate))


def _merge_uniqueness(results: Sequence[UniquenessResult]) -> UniquenessResult:
    """Worst case over problems (files)."""
    worst = max(results, key=lambda r: r.max_distance)
    flags = [r.consistent for r in results]
    consistent = False if False in flags else (None if None in flags else True)
    return replace(
        worst, consistent=consistent,
        residuals=tuple(max(r.residuals[i] for r in results) for i in range(len(worst.starts))),
        converged=tuple(all(r.converged[i] for r in results) for i in range(len(worst.starts))),
        iterations=tuple(max(r.iterations[i] for r in results)
                         for i in range(len(worst.starts))))


def certificate_for(subject: LoadedModel | MolCNN, points: Sequence[torch.Tensor], *,
                    data: Sequence[str] = (), power_iters: int = 10, ratio_steps: int = 10,
                    seed: int = 0) -> dict[str, Any]:
    """The plain-dict Lipschitz certificate stored in checkpoints.

    ``points``: fixed points (complex ``(B, D, Y, X)``) the local estimates are
    measured at, e.g. the validation reconstructions of training; ``data``:
    what they came from (file names). Keys: ``certified_bound``,
    ``layer_bounds``, ``spectral_grid``, ``holds_for_all_image_sizes``,
    ``local_power``, ``local_ratio``, ``local_max``, ``points``, ``data``,
    ``verdict``, ``date`` (:func:`~molrecon.models.save_checkpoint` recomputes
    the first three from the weights it writes, so they always agree).
    """
    model = _as_model(subject)
    gb = global_bound(model)
    cert: dict[str, Any] = {
        "certified_bound": gb.bound,
        "layer_bounds": list(gb.layer_bounds),
        "spectral_grid": gb.spectral_grid,
        "holds_for_all_image_sizes": True,
        "data": [str(d) for d in data],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    usable = [p for p in points if p.shape[0] > 0]
    if usable:
        was_training = model.training
        model.eval()
        try:
            est = local_estimates(model, usable, power_iters=power_iters,
                                  ratio_steps=ratio_steps, seed=seed)
        finally:
            model.train(was_training)
        verdict, _ = decide(certified_bound=gb.bound, local_max=est.max)
        cert.update({
            "local_power": [_finite(p.power) for p in est.points],
            "local_ratio": [_finite(p.ratio) for p in est.points],
            "local_max": _finite(est.max),
            "points": len(est.points),
            "verdict": verdict,
        })
    else:
        cert.update({"local_power": [], "local_ratio": [], "local_max": None, "points": 0,
                     "verdict": "certified" if gb.certified else None})
    return cert


# ----------------------------------------------------------------------------------- robustness
def _unit(t: torch.Tensor) -> torch.Tensor:
    import torch

    n = _item_norm(t)
    safe = n > 0
    return t / _bcast(torch.where(safe, n, torch.ones_like(n)), t).to(t.dtype)


def attack(solve: Callable[[torch.Tensor], tuple[torch.Tensor, bool]], problem: Problem, *,
           eps: float, steps: int, beta: float = 1.0, direction: torch.Tensor | None = None,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], bool]:
    """Projected gradient ascent on Σ_i ‖x(b + Δb)_i − x(b)_i‖², ‖Δb_i‖ ≤ ε‖b_i‖.

    ``solve(aty)`` maps Aᴴ(b + Δb) ``(B, D, Y, X)`` to the network's output
    (differentiably) and a flag whether it converged. ``direction``: initial Δb
    (any scale; default masked complex noise). Δb lives on the sampled
    locations; every iterate lies on the sphere ‖Δb_i‖ = ε‖b_i‖.

    Returns ``(best Δb, best ‖Δx‖ per item, ‖x(b)‖ per item, history of the
    largest amplification, all solves converged)``.
    """
    import torch

    op, b = problem.op, problem.kspace
    support = problem.support()                                                # broadcastable
    with torch.no_grad():
        x_ref, ok = solve(problem.aty)
        x_ref = x_ref.detach()                                                 # (B, D, Y, X)
    radius = eps * _item_norm(b)                                               # (B,)
    if direction is None:
        direction = _complex_noise(b.shape, b.dtype, b.device, _generator(seed))
    d = _bcast(radius, b).to(b.dtype) * _unit(direction * support)             # (B, C, D, Y, X)
    best = torch.full_like(radius, -1.0)
    best_d = d.clone()
    history: list[float] = []
    converged = ok
    tiny = torch.finfo(radius.dtype).tiny
    for s in range(steps + 1):
        dv = d.detach().requires_grad_(s < steps)
        with torch.set_grad_enabled(s < steps):
            x, ok = solve(op.adjoint(b + dv * support))                        # (B, D, Y, X)
            converged = converged and ok
            dx = _item_norm(x - x_ref)                                         # (B,)
        dxd = dx.detach()
        better = dxd > best
        best = torch.where(better, dxd, best)
        best_d = torch.where(_bcast(better, d), d.detach(), best_d)
        history.append(float((best / radius.clamp_min(tiny)).max()))
        if s == steps:
            break
        (g,) = torch.autograd.grad((dx ** 2).sum(), dv)
        g = _unit(g * support)
        d = _bcast(radius, b).to(b.dtype) * _unit((1.0 - beta) * d.detach()
                                                   / _bcast(radius.clamp_min(tiny), d).to(d.dtype)
                                                   + beta * g)
    return best_d, best, _item_norm(x_ref), history, converged


def robustness(loaded: LoadedModel, problems: Sequence[Problem],
               config: RobustnessConfig | None = None) -> RobustnessReport:
    """Worst-case measurement perturbations of MOL and of the unrolled network, with the bounds.

    MOL: the equilibrium of (1), differentiated implicitly. Unrolled: K MOL
    steps from the zero-filled image Aᴴb, differentiated through the steps.
    The bounds use m from the certificate when it is < 1, else from the local
    power estimate at the fixed points (then they are estimates).
    """
    import torch

    from ..deq.fixed_point import FixedPointConfig
    from ..deq.implicit import deq_solve, unrolled
    from ..deq.mol import support_of
    from ..models.lipschitz import local_lipschitz_power

    cfg = RobustnessConfig() if config is None else config
    if not problems:
        raise ConfigError("robustness needs at least one data file")
    model = loaded.model
    mol_cfg = loaded.mol_config
    gb = global_bound(model)
    lam = float(mol_cfg.lam)
    gen = _generator(cfg.seed)

    mol_res: dict[float, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float],
                                    bool, torch.Tensor]]] = {e: [] for e in cfg.eps}
    unr_res: dict[float, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float],
                                    bool, torch.Tensor]]] = {e: [] for e in cfg.eps}
    local_max = 0.0
    op_norm = 0.0
    for prob in problems:
        prior = _prior_for(model, prob.dtype)
        step = _mol_step(prior, mol_cfg, prob.start.device)
        single = prob.dtype == torch.complex64
        tol = cfg.tol if cfg.tol is not None else (1e-5 if single else 1e-10)
        fwd = FixedPointConfig(method="anderson", tol=tol, max_iter=cfg.max_iter, warn=False)
        bwd = FixedPointConfig(method="anderson", tol=cfg.backward_tol, max_iter=cfg.max_iter,
                               warn=False)
        warm = [prob.start]

        def solve_mol_diff(aty: torch.Tensor, step: MolStep = step, fwd: FixedPointConfig = fwd,
                           bwd: FixedPointConfig = bwd, warm: list[torch.Tensor] = warm,
                           prob: Problem = prob) -> tuple[torch.Tensor, bool]:
            fn = step.bind(normal=prob.op.normal, aty=aty, support=support_of(prob.op))
            out = deq_solve(fn, warm[0], forward=fwd, backward=bwd)
            if bool(torch.isfinite(torch.view_as_real(out.forward.x)).all()):
                warm[0] = out.forward.x.detach()
            return out.x, bool(out.forward.converged)

        def solve_unrolled(aty: torch.Tensor, step: MolStep = step,
                           prob: Problem = prob) -> tuple[torch.Tensor, bool]:
            fn = step.bind(normal=prob.op.normal, aty=aty, support=support_of(prob.op))
            return unrolled(fn, aty, cfg.unrolled_k), True

        with torch.no_grad():
            x_star = solve_mol(step, prob, prob.start, tol=tol, max_iter=cfg.max_iter).x
            warm[0] = x_star
        for i in range(x_star.shape[0]):
            xi = x_star[i:i + 1]
            if bool(torch.isfinite(torch.view_as_real(xi)).all()):
                local_max = max(local_max, local_lipschitz_power(prior, xi, iters=cfg.power_iters,
                                                                 generator=gen))
        op_norm = max(op_norm, operator_norm(prob.op, iters=cfg.norm_iters, seed=cfg.seed))
        direction = _complex_noise(prob.kspace.shape, prob.dtype, prob.kspace.device, gen)
        d_mol, d_unr = direction, direction
        for e in cfg.eps:
            r = attack(solve_mol_diff, prob, eps=e, steps=cfg.steps, beta=cfg.beta,
                       direction=d_mol)
            mol_res[e].append((*r, prob.op.adjoint(r[0] * prob.support())))
            d_mol = r[0]
            if cfg.unrolled_k > 0:
                r = attack(solve_unrolled, prob, eps=e, steps=cfg.steps, beta=cfg.beta,
                           direction=d_unr)
                unr_res[e].append((*r, prob.op.adjoint(r[0] * prob.support())))
                d_unr = r[0]

    if gb.certified:
        lip, basis = gb.bound, "certified"
    else:
        lip, basis = local_max, "local"
    bounds = robustness_bounds(lam=lam, lipschitz=lip, op_norm=op_norm, basis=basis)
    m = bounds.margin

    def summarise(network: str, e: float, runs: list[Any]) -> AttackResult:
        amps: list[float] = []
        rel: list[float] = []
        paper: list[float] = []
        hist = [0.0] * (cfg.steps + 1)
        conv = True
        for prob, (d, dx, xn, h, ok, atdb) in zip(problems, runs):
            db = _item_norm(d * prob.support())                                # (B,)
            amp = dx / db.clamp_min(torch.finfo(db.dtype).tiny)
            amps.extend(float(v) for v in amp)
            rel.extend(float(v) for v in dx / xn.clamp_min(torch.finfo(xn.dtype).tiny))
            if m > 0 and network == "mol":
                paper.extend(float(v) for v in lam / m * _item_norm(atdb)
                             / db.clamp_min(torch.finfo(db.dtype).tiny))
            hist = [max(a, c) for a, c in zip(hist, h)]
            conv = conv and ok
        k = max(range(len(amps)), key=lambda j: amps[j])
        return AttackResult(network=network, eps=e, amplification=amps[k],
                            per_item=tuple(amps), relative_change=rel[k],
                            paper_at_found=paper[k] if paper else None,
                            history=tuple(hist), converged=conv)

    mol_out = tuple(summarise("mol", e, mol_res[e]) for e in cfg.eps)
    unr_out = tuple(summarise(f"unrolled-{cfg.unrolled_k}", e, unr_res[e]) for e in cfg.eps
                    if unr_res[e])
    return RobustnessReport(model=str(loaded.path), data=tuple(p.source for p in problems),
                            eps=tuple(float(e) for e in cfg.eps), steps=cfg.steps,
                            unrolled_k=cfg.unrolled_k, mol=mol_out, unrolled=unr_out,
                            bounds=bounds, certified_bound=gb.bound)


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
