"""The MOL step: one forward–backward iteration for F(x) + λAᴴ(Ax − b) = 0, F = I − H.

Equation and step
-----------------
The reconstruction x* solves

    x − H(x) + λ (AᴴA x − Aᴴb) = 0.                                   (1)

One MOL step with step size α is

    z      = (1 − α) x + α H(x)
    T(x)   = (I + αλ AᴴA)⁻¹ (z + αλ Aᴴb).

The data-consistency inverse is computed by conjugate gradients on the
equivalent Hermitian positive-definite system (divide by αλ)

    (AᴴA + s I) y = z / (αλ) + Aᴴb,      s = 1 / (αλ),                (2)

with ``cg_iters`` iterations warm-started at y₀ = x (the current iterate).
Nothing else enters the operator: in particular no extra identity term (the
reference implementation's 1.001·I shifts the solution of (1)).

Fixed points are exact for any CG count
---------------------------------------
The initial CG residual of (2) at y₀ = x is r₀ = −(x − H(x) + λ(AᴴAx − Aᴴb))/λ
= −(residual of (1))/λ. If x solves (1), r₀ = 0 and CG returns y = x: x is a
fixed point of the computed step. If x does not solve (1), r₀ ≠ 0 and every
CG iteration strictly decreases the energy norm of the error, so y ≠ x. The
fixed points of the computed step are therefore exactly the solutions of (1),
whatever ``cg_iters`` ≥ 1 is; the CG count only changes how fast the outer
iteration gets there (with few CG iterations the step is an approximation of
the exact resolvent, whose contraction factor is the one bounded below).
For the same reason the step uses a fixed CG count and no CG tolerance: a
relative CG tolerance would stop CG before the first iteration near the
solution and report T(x) = x while (1) still has a residual.

Contraction (exact resolvent)
-----------------------------
If H is L-Lipschitz (L < 1, so F is m-monotone with m = 1 − L), then
‖z(x) − z(y)‖ ≤ (|1 − α| + αL)‖x − y‖, and the resolvent (I + αλAᴴA)⁻¹ has
norm ≤ 1. The step contracts with factor

    ρ(α) = |1 − α| + αL = max(1 − αm, α(1 + L) − 1),   α ∈ (0, 2/(1 + L)),

smallest (ρ = L) at α = 1, the MoDL iteration with a contractive denoiser. The
general monotone-operator argument (F m-monotone and (2 − m)-Lipschitz) only
gives ρ² = 1 − 2αm + α²(2 − m)², i.e. α < 2m/(2 − m)²; it ignores that F is
I − H and is never stronger (for m ≤ 1): at m = 0.02 it needs α < 0.0102 and
then ρ² ≥ 1 − m²/(2 − m)², ρ ≥ 0.99995, while the bound above gives ρ = 0.98
at α = 1. The fixed point
does not depend on α (set x_{n+1} = x_n = x in the step to get (1)).

The stopping rule for α ≠ 1
---------------------------
With G(x) = H(x) − x − λ(AᴴAx − Aᴴb), the residual of (1), the step's change is

    T(x) − x = α (I + αλAᴴA)⁻¹ G(x),

so on an eigenvector of AᴴA with eigenvalue s it is G's component times
α/(1 + αλs), against 1/(1 + λs) at α = 1: a ratio α(1 + λs)/(1 + αλs) between α
and 1 for α ≤ 1 (α where nothing is sampled, s = 0), between 1 and α for α ≥ 1.
Hence ‖T_α(x) − x‖ / min(α, 1) ≥ ‖T_1(x) − x‖ at every x: a solver that stops
when its own residual is below min(α, 1)·tol (:func:`residual_scale`) has reached
the α = 1 residual tol, whatever α it ran at, and the reported residual (its own
divided by min(α, 1)) bounds the α = 1 residual from above. Without the scale a
step with α < 1 stops where the α = 1 residual can be up to 1/α times tol
(``benchmarks/bench_alpha.py --raw-tol`` compares both rules).

A certified distance to the solution of (1) that does not depend on the
solver: F + λAᴴA − λAᴴb is m-strongly monotone, so
‖x − x*‖ ≤ ‖x − H(x) + λ(AᴴAx − Aᴴb)‖ / m (:meth:`MolStep.distance_bound`).

Support of the coil maps
------------------------
Where every coil map is zero (outside ESPIRiT's crop), AᴴA and Aᴴb vanish and
(1) reads x = H(x): the data say nothing and the solution there would be H's
own fixed point, which a contractive H with a small output offset ε puts at
≈ ε/(1 − L) (measured: a 2 % grey background with a denoiser-pretrained
prior). Given the support mask P (``SenseOperator.support``), the step uses
P∘H in place of H: z = P((1 − α)x + αH(x)). P is a projection, so P∘H is
L-Lipschitz whenever H is, and everything above holds for (1) with P∘H; its
solution is zero outside the support (as CG-SENSE's is) and solves the same
equation inside.

λ is learnable and positive through a log parametrisation: λ = exp(log_lam).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import torch
from torch import nn

from ..config import MolConfig
from ..solvers import conjugate_gradient

Normal = Callable[[torch.Tensor], torch.Tensor]


class NormalOperator(Protocol):
    """What the engine needs from a forward model A (e.g. a SENSE operator)."""

    def normal(self, x: torch.Tensor) -> torch.Tensor: ...

    def adjoint(self, k: torch.Tensor) -> torch.Tensor: ...


def contraction_factor(alpha: float, lipschitz: float) -> float:
    """ρ = |1 − α| + αL: contraction factor of the exact-resolvent MOL step."""
    return abs(1.0 - alpha) + alpha * lipschitz


def residual_scale(alpha: float) -> float:
    """min(α, 1): the step's relative residual divided by this bounds the residual of the
    α = 1 step at the same point from above (see "The stopping rule for α ≠ 1" above), so
    a solver stops at tolerance ``residual_scale(α) · tol`` to mean tol at every α."""
    return min(float(alpha), 1.0)


def _item_norm(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


class MolStep(nn.Module):
    """T(x) = (I + αλAᴴA)⁻¹(P((1 − α)x + αH(x)) + αλAᴴb) with a learnable λ = exp(log_lam).

    ``prior`` maps complex (B, D, Y, X) to the same; ``normal`` is x ↦ AᴴAx on
    that shape and ``aty`` = Aᴴb (computed once per measurement).

    ``support`` (optional, real 0/1 broadcastable to x): P multiplies by it, so
    the image is zero where the coil maps are (``SenseOperator.support``). There
    AᴴA and Aᴴb vanish, so without P the fixed point there would be H's own fixed
    point, which nothing in the data controls: a contractive H with a small
    output offset ε fills the cropped background with ≈ ε/(1 − L). P is a
    projection, so P∘H has H's Lipschitz bound and every guarantee carries
    over; the fixed point solves (1) with H replaced by P∘H (zero outside the
    support, the same equation inside).
    """

    def __init__(self, prior: nn.Module, config: MolConfig | None = None) -> None:
        super().__init__()
        self.prior = prior
        cfg = MolConfig() if config is None else config
        self.alpha = float(cfg.alpha)
        self.cg_iters = int(cfg.cg_iters)
        self.log_lam = nn.Parameter(torch.tensor(math.log(cfg.lam)), requires_grad=cfg.learn_lam)
        #: Differentiate the data-consistency solve as the exact inverse (see
        #: :class:`_ExactSolveGrad`); for implicit gradients at a fixed point.
        self.exact_dc_grad = False

    @property
    def lam(self) -> torch.Tensor:
        """λ = exp(log_lam), shape ()."""
        return torch.exp(self.log_lam)

    def to_config(self) -> MolConfig:
        """The configuration with the current (possibly trained) λ."""
        return MolConfig(alpha=self.alpha, lam=float(self.lam.detach()), cg_iters=self.cg_iters,
                         learn_lam=self.log_lam.requires_grad)

    def with_alpha(self, alpha: float) -> MolStep:
        """A step sharing prior and λ with a different α (the fixed point is the same)."""
        other = MolStep(self.prior, replace(self.to_config(), alpha=alpha))
        other.log_lam = self.log_lam
        return other

    def forward(self, x: torch.Tensor, *, normal: Normal, aty: torch.Tensor,
                support: torch.Tensor | None = None,
                lam_scale: torch.Tensor | None = None) -> torch.Tensor:
        """T(x); ``lam_scale`` (B,), when given, multiplies λ per batch item (λ set from
        each item's noise level, :mod:`molrecon.physics.noise`)."""
        alpha = self.alpha
        al = item_weight(alpha * self.lam.to(x.real.dtype), lam_scale, x)  # αλ, () or (B,)
        z = (1.0 - alpha) * x + alpha * self.prior(x)                    # (B, D, Y, X)
        if support is not None:
            z = z * support                                               # (B, D, Y, X)
        rhs = z / per_item(al, x) + aty                                  # (B, D, Y, X)
        if self.exact_dc_grad and torch.is_grad_enabled():
            return _ExactSolveGrad.apply(rhs, 1.0 / al, x, normal, self.cg_iters)
        res = conjugate_gradient(normal, rhs, x0=x, shift=1.0 / al, max_iter=self.cg_iters)
        return res.x

    def bind(self, *, normal: Normal, aty: torch.Tensor, support: torch.Tensor | None = None,
             lam_scale: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The step as a function of x alone, for the fixed-point solvers."""
        def step(x: torch.Tensor) -> torch.Tensor:
            return self(x, normal=normal, aty=aty, support=support, lam_scale=lam_scale)
        return step

    def equation_residual(self, x: torch.Tensor, *, normal: Normal, aty: torch.Tensor,
                          support: torch.Tensor | None = None) -> torch.Tensor:
        """x − P H(x) + λ(AᴴAx − Aᴴb), the left side of (1) (P: the support projection,
        the identity without one); shape of x."""
        lam = self.lam.to(x.real.dtype)
        h = self.prior(x)
        if support is not None:
            h = h * support
        return x - h + lam * (normal(x) - aty)

    def distance_bound(self, x: torch.Tensor, *, normal: Normal, aty: torch.Tensor,
                       lipschitz: float, support: torch.Tensor | None = None) -> torch.Tensor:
        """Certified ‖x − x*‖ ≤ ‖residual of (1)‖ / (1 − L) per item, shape (B,).

        Valid when ``lipschitz`` is a certified global Lipschitz bound L < 1 of H.
        """
        if not lipschitz < 1.0:
            raise ValueError("the distance bound needs a Lipschitz bound L < 1")
        with torch.no_grad():
            r = self.equation_residual(x, normal=normal, aty=aty, support=support)
        return _item_norm(r) / (1.0 - lipschitz)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, cg_iters={self.cg_iters}"


def item_weight(weight: torch.Tensor, scale: torch.Tensor | None, x: torch.Tensor
                ) -> torch.Tensor:
    """``weight`` (shape ()) times the per-item ``scale`` (B,) when given, on x's device
    and real dtype; shape () without a scale, (B,) with one."""
    if scale is None:
        return weight
    s = torch.as_tensor(scale, device=x.device, dtype=x.real.dtype).reshape(-1)
    if s.numel() != x.shape[0]:
        raise ValueError(f"λ scale has {s.numel()} entries for {x.shape[0]} batch items")
    return weight * s


def per_item(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A () or (B,) weight broadcastable against x (B, ...)."""
    return w if w.ndim == 0 else w.reshape((-1,) + (1,) * (x.ndim - 1))


def support_of(op: object) -> torch.Tensor | None:
    """The support projection's mask of an operator that defines one (``SenseOperator.support``);
    None for operators without coil maps (P is then the identity)."""
    fn = getattr(op, "support", None)
    return fn() if callable(fn) else None


class _ExactSolveGrad(torch.autograd.Function):
    """y = CG(rhs, shift, warm start x₀) forward; backward as if y = (AᴴA + s I)⁻¹ rhs exactly.

    The computed step (a fixed number of CG iterations from x₀ = x) and the exact
    resolvent step have the same fixed points for every value of the parameters
    (module docstring), so x*(θ) is the same function and implicit
    differentiation of either gives the same gradient. The exact map's
    Jacobian, M⁻¹((1 − α)I + αJ_H)/(αλ) with M = AᴴA + sI, is a contraction
    whenever H is, so the backward fixed-point solve converges as fast as the
    forward one; differentiating through the CG iterations themselves (their
    step sizes depend on the input) can give a Jacobian with norm near or
    above one when CG is far from converged (large λ), and a backward solve
    that stalls.

    Backward: w = M⁻¹ g by CG to a relative residual of 1e-6 (at most
    ``_GRAD_CG_MAX`` iterations); ∂/∂rhs = w and ∂/∂s = −Re⟨w, y⟩ (dM⁻¹/ds =
    −M⁻²). The warm start gets no gradient. Use it only where the step is
    evaluated at (or solved to) a fixed point: for an unrolled network of
    truncated steps it is not the derivative of what was computed.
    """

    @staticmethod
    def forward(ctx, rhs, shift, x0, normal, cg_iters):  # type: ignore[no-untyped-def]
        y = conjugate_gradient(normal, rhs.detach(), x0=x0.detach(), shift=shift.detach(),
                               max_iter=cg_iters).x
        ctx.normal = normal
        ctx.save_for_backward(y, shift.detach())
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        y, shift = ctx.saved_tensors
        w = conjugate_gradient(ctx.normal, g, shift=shift, max_iter=_GRAD_CG_MAX, tol=1e-6).x
        g_shift = None
        if ctx.needs_input_grad[1]:
            prod = (w.conj() * y).real
            if shift.ndim == 1:                                    # one shift per batch item
                g_shift = -prod.reshape(prod.shape[0], -1).sum(dim=1).to(shift.dtype)
            else:
                g_shift = -torch.sum(prod).to(shift.dtype).reshape(shift.shape)
        return w, g_shift, None, None, None


#: Cap of the CG solve in the backward pass of :class:`_ExactSolveGrad`.
_GRAD_CG_MAX = 200


def regularised_sense(normal: Normal, aty: torch.Tensor, *, lam: float | torch.Tensor,
                      iters: int = 50) -> torch.Tensor:
    """Solution of (1) with H ≡ 0, i.e. (AᴴA + I/λ)x = Aᴴb, by ``iters`` CG iterations.

    A cheap, data-consistent starting point for the fixed-point iteration
    (the reference started from a 50-iteration CG-SENSE image).
    """
    lam_t = torch.as_tensor(lam, dtype=aty.real.dtype, device=aty.device)
    return conjugate_gradient(normal, aty, shift=1.0 / lam_t, max_iter=iters).x


__all__ = [
    "MolConfig",
    "MolStep",
    "item_weight",
    "per_item",
    "Normal",
    "NormalOperator",
    "contraction_factor",
    "regularised_sense",
    "support_of",
]
