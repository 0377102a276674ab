"""Deep-equilibrium differentiation of x* = T(x*; θ): implicit backward and unrolled baseline.

Forward: :func:`~molrecon.deq.fixed_point.solve_fixed_point` without a graph.
Then ONE step is re-evaluated with a graph, y = T(z; θ) at z = x* (a detached
leaf), and y is returned (y = x* up to the forward residual).

Backward: differentiating x* = T(x*; θ) gives dx* = J dx* + ∂T/∂θ dθ with
J = ∂T/∂x at x*, so for a loss ℓ

    dℓ/dθ = gᵀ ∂T/∂θ,    g = Jᵀ g + ∂ℓ/∂x*       (g = (I − Jᵀ)⁻¹ ∂ℓ/∂x*).

A gradient hook on y replaces the incoming ∂ℓ/∂x* by g, solved as a fixed
point of g ↦ Jᵀg + ∂ℓ/∂x* (Anderson or plain iteration; Jᵀg is one
vector–Jacobian product through the recorded step), and autograd then carries
g through the recorded step to θ: to H's weights, to λ, and to Aᴴb when it
requires a gradient (adversarial perturbations of the data). Jᵀ has the norm
of J, so the backward iteration contracts exactly like the forward one. The
memory is that of one step with its graph, whatever the number of forward or
backward iterations.

Complex tensors follow PyTorch's convention (the gradient of a real loss is
the real-view gradient packed as a complex tensor), so J and Jᵀ are the
real-linear Jacobian of the real view and its transpose.

``gradient="jfb"`` (Jacobian-free backpropagation, Fung et al., AAAI 2022)
keeps the recorded step but skips the backward solve: it takes g = ∂ℓ/∂x*,
i.e. replaces (I − Jᵀ)⁻¹ by I. It is a descent direction for contractive T and
costs one vector–Jacobian product instead of one per backward iteration.

:func:`unrolled` differentiates through K recorded steps instead (memory
grows with K): the baseline of the memory benchmark and of robustness
comparisons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .fixed_point import FixedPointConfig, FixedPointResult, solve_fixed_point

StepFn = Callable[[torch.Tensor], torch.Tensor]
#: Ways to differentiate the equilibrium (see the module docstring).
GRADIENTS: tuple[str, ...] = ("implicit", "jfb")


@dataclass
class BackwardStats:
    """Filled in by the backward pass (one entry per backward call through the output)."""

    iterations: list[int] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    converged: list[bool] = field(default_factory=list)


@dataclass(frozen=True)
class DEQOutput:
    """x: the equilibrium (with the implicit-gradient graph when grad mode is on);
    forward: the forward solve's result; backward: statistics of backward solves."""

    x: torch.Tensor
    forward: FixedPointResult
    backward: BackwardStats


def deq_solve(
    step: StepFn,
    x0: torch.Tensor,
    *,
    forward: FixedPointConfig | None = None,
    backward: FixedPointConfig | None = None,
    contraction: float | None = None,
    gradient: str = "implicit",
) -> DEQOutput:
    """Solve x* = step(x*) from ``x0`` and make x* differentiable by implicit differentiation.

    ``step`` is a function of x alone that closes over everything else (prior,
    λ, normal operator, Aᴴb); whatever it uses that requires a gradient gets
    one. ``contraction``: certified ρ for the forward distance bound.
    ``gradient``: "implicit" (exact) or "jfb" (Jacobian-free, see the module docstring).
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    fwd_cfg = FixedPointConfig() if forward is None else forward
    bwd_cfg = FixedPointConfig() if backward is None else backward
    fwd = solve_fixed_point(step, x0, config=fwd_cfg, contraction=contraction,
                            label="forward fixed-point iteration")
    stats = BackwardStats()
    if not torch.is_grad_enabled():
        return DEQOutput(x=fwd.x, forward=fwd, backward=stats)
    z = fwd.x.detach().requires_grad_(True)
    # z is only a handle for vector-Jacobian products: drop what autograd accumulates in it.
    z.register_post_accumulate_grad_hook(_drop_grad)
    y = step(z)
    if not y.requires_grad:
        return DEQOutput(x=y.detach(), forward=fwd, backward=stats)
    if gradient == "jfb":
        return DEQOutput(x=y, forward=fwd, backward=stats)

    # The vector-Jacobian products below start their own backward passes at y, and those
    # run y's hooks too: while the solve is running, the hook lets gradients through as they are.
    solving = [False]

    def implicit_grad(grad: torch.Tensor | None) -> torch.Tensor | None:
        if grad is None or solving[0]:
            return grad

        def adjoint_map(g: torch.Tensor) -> torch.Tensor:
            (jtg,) = torch.autograd.grad(y, z, g, retain_graph=True)
            return jtg + grad

        solving[0] = True
        try:
            res = solve_fixed_point(adjoint_map, grad, config=bwd_cfg,
                                    label="backward (implicit gradient) iteration")
        finally:
            solving[0] = False
        stats.iterations.append(res.iterations)
        stats.residuals.append(float(res.final_residual.max()))
        stats.converged.append(res.converged)
        return res.x

    y.register_hook(implicit_grad)
    return DEQOutput(x=y, forward=fwd, backward=stats)


def _drop_grad(t: torch.Tensor) -> None:
    t.grad = None


def unrolled(step: StepFn, x0: torch.Tensor, steps: int) -> torch.Tensor:
    """x_K = T(…T(x0)) with K = ``steps`` recorded steps (differentiable through all of them)."""
    if steps < 0:
        raise ValueError("steps must be >= 0")
    x = x0
    for _ in range(steps):
        x = step(x)
    return x


class DEQFixedPoint(nn.Module):
    """A MOL step module run to its equilibrium with implicit differentiation.

    ``forward(x0, normal=..., aty=...)`` returns :class:`DEQOutput`. The wrapped
    ``step`` must accept ``(x, *, normal, aty)`` (e.g. :class:`~molrecon.deq.mol.MolStep`).
    """

    def __init__(self, step: nn.Module, *, forward_config: FixedPointConfig | None = None,
                 backward_config: FixedPointConfig | None = None) -> None:
        super().__init__()
        self.step = step
        self.forward_config = FixedPointConfig() if forward_config is None else forward_config
        self.backward_config = FixedPointConfig() if backward_config is None else backward_config

    def forward(self, x0: torch.Tensor, *, normal: Callable[[torch.Tensor], torch.Tensor],
                aty: torch.Tensor, contraction: float | None = None) -> DEQOutput:
        def fn(x: torch.Tensor) -> torch.Tensor:
            return self.step(x, normal=normal, aty=aty)
        return deq_solve(fn, x0, forward=self.forward_config, backward=self.backward_config,
                         contraction=contraction)
