"""Fixed-point solvers for x = T(x): plain iteration and Anderson acceleration.

Both run without an autograd graph, act on batches ``(B, ...)`` (real or
complex; complex tensors are treated as real vectors of twice the length),
and decide convergence per batch item with the relative fixed-point residual

    r_n = ‖T(x_n) − x_n‖ / ‖x_n‖            (per item; r = ∞ at x_n = 0 unless T(0) = 0)

Item b stops at the first n with r_n ≤ tol; it is then frozen (its value no
longer changes while other items continue) and its result is T(x_n). This is
the stopping rule MOL needs: a small *change* between iterates says little
when the contraction factor ρ is close to 1, whereas a small residual, with a
certified ρ < 1, bounds the distance to the fixed point:

    ‖T(x_n) − x*‖ ≤ ρ/(1 − ρ) · ‖T(x_n) − x_n‖.

``FixedPointResult.distance_bound`` reports this bound relative to
‖T(x_n)‖ when the caller passes ``contraction=ρ``.

Anderson acceleration (type II, memory m): with the last m iterates X_i and
their residuals G_i = T(X_i) − X_i, solve per item

    min_a ‖Σ aᵢ Gᵢ‖²   subject to   Σ aᵢ = 1

through the normal equations (Gram matrix GGᵀ + δ·max diag(GGᵀ)·I, solved in
float64; δ = ``regularisation``), then x_{n+1} = Σ aᵢ (Xᵢ + β Gᵢ) with mixing
β. If an item's weights are not finite it takes the plain step.

Host synchronisation: convergence flags, frozen items and iteration counts
live on the device; the loop asks the host whether every item has finished
only every ``check_every`` iterations (default 1 on the CPU, where it costs
nothing, and 5 on a GPU). Frozen items do not change, so the result does not
depend on ``check_every``; only up to ``check_every − 1`` surplus step
evaluations are spent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, ConvergenceWarning
from ..memory import ANDERSON_MEMORY

Method = Literal["anderson", "plain"]
METHODS: tuple[str, ...] = ("anderson", "plain")
StepFn = Callable[[torch.Tensor], torch.Tensor]


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class FixedPointConfig:
    """Options of :func:`solve_fixed_point` (tolerances are relative, see module docstring)."""

    method: Method = "anderson"
    tol: float = 1e-4
    max_iter: int = 100
    memory: int = ANDERSON_MEMORY
    regularisation: float = 1e-10
    mixing: float = 1.0
    check_every: int | None = None
    warn: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.tol, (int, float)) and 0.0 <= self.tol < math.inf):
            raise ConfigError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not _positive_int(self.max_iter):
            raise ConfigError(f"max_iter must be an integer >= 1, got {self.max_iter!r}")
        if not _positive_int(self.memory):
            raise ConfigError(f"memory must be an integer >= 1, got {self.memory!r}")
        if not (isinstance(self.regularisation, (int, float)) and self.regularisation >= 0.0):
            raise ConfigError(f"regularisation must be >= 0, got {self.regularisation!r}")
        if not (isinstance(self.mixing, (int, float)) and 0.0 < self.mixing <= 1.0):
            raise ConfigError(f"mixing must lie in (0, 1], got {self.mixing!r}")
        if self.check_every is not None and not _positive_int(self.check_every):
            raise ConfigError(f"check_every must be an integer >= 1, got {self.check_every!r}")


@dataclass(frozen=True)
class FixedPointResult:
    """Outcome of a fixed-point solve.

    x                T(x_n) at each item's last iterate, shape of x0
    iterations       step evaluations of the loop (the slowest item plus surplus, see module doc)
    item_iterations  (B,) step evaluations until each item stopped
    residuals        (iterations, B) relative residual ‖T(x_n) − x_n‖/‖x_n‖ at every evaluation
    converged_items  (B,) bool: residual ≤ tol reached
    converged        all items converged
    distance_bound   (B,) certified ‖x − x*‖/‖x‖ given ``contraction``; None without it
    contraction      the ρ the bound used, or None
    """

    x: torch.Tensor
    iterations: int
    item_iterations: torch.Tensor
    residuals: torch.Tensor
    converged_items: torch.Tensor
    converged: bool
    distance_bound: torch.Tensor | None = None
    contraction: float | None = None

    @property
    def final_residual(self) -> torch.Tensor:
        """(B,) relative residual of every item at the iterate it stopped at."""
        idx = (self.item_iterations - 1).clamp_min(0)
        return self.residuals.gather(0, idx.reshape(1, -1)).reshape(-1)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, ...) real or complex → (B, n) real view (no copy when contiguous)."""
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.reshape(t.shape[0], -1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class _Anderson:
    """Per-item Anderson mixing state on real (B, n) views."""

    def __init__(self, like: torch.Tensor, config: FixedPointConfig) -> None:
        b, n = like.shape
        m = config.memory
        self.m = m
        self.beta = float(config.mixing)
        self.reg = float(config.regularisation)
        self.xs = torch.zeros(b, m, n, dtype=like.dtype, device=like.device)   # (B, m, n)
        self.gs = torch.zeros(b, m, n, dtype=like.dtype, device=like.device)   # (B, m, n)
        self.count = 0

    def next(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Given x_n and g_n = T(x_n) − x_n (both (B, n)), return x_{n+1} (B, n)."""
        slot = self.count % self.m
        self.xs[:, slot] = x
        self.gs[:, slot] = g
        self.count += 1
        k = min(self.count, self.m)
        xs, gs = self.xs[:, :k], self.gs[:, :k]                                  # (B, k, n)
        gram = torch.bmm(gs, gs.transpose(1, 2)).to(torch.float64)              # (B, k, k)
        diag_max = torch.diagonal(gram, dim1=1, dim2=2).amax(dim=1)             # (B,)
        eye = torch.eye(k, dtype=torch.float64, device=gram.device)
        shift = self.reg * diag_max + torch.finfo(torch.float64).tiny
        gram = gram + shift.reshape(-1, 1, 1) * eye
        ones = torch.ones(gram.shape[0], k, 1, dtype=torch.float64, device=gram.device)
        y = torch.linalg.solve(gram, ones)                                       # (B, k, 1)
        a = (y / y.sum(dim=1, keepdim=True)).to(x.dtype)                         # (B, k, 1)
        ok = torch.isfinite(a).all(dim=1).reshape(-1)                            # (B,)
        a = torch.where(ok.reshape(-1, 1, 1), a, torch.zeros_like(a))
        mixed = (a * (xs + self.beta * gs)).sum(dim=1)                           # (B, n)
        return torch.where(ok.reshape(-1, 1), mixed, x + g)


# Over 80 lines: the two solvers share one loop so that their stopping rule is identical.
def solve_fixed_point(
    step: StepFn,
    x0: torch.Tensor,
    *,
    config: FixedPointConfig | None = None,
    contraction: float | None = None,
    label: str = "fixed-point iteration",
    on_iteration: Callable[[int, float], None] | None = None,
) -> FixedPointResult:
    """Iterate x ← T(x) from ``x0`` (B, ...) until every item's relative residual ≤ tol.

    ``on_iteration(n, r)``, if given, is called after the first iteration and after
    every ``check_every``-th with the largest relative residual r of the items still
    iterating (a progress display; each call costs one synchronisation on a GPU, so it
    is made only where the loop synchronises anyway).

    ``contraction``: a certified contraction factor ρ < 1 of ``step`` (enables
    ``distance_bound``). Emits :class:`~molrecon.errors.ConvergenceWarning`
    (unless ``config.warn`` is False) when an item stops at ``max_iter`` or
    produces non-finite values.
    """
    cfg = FixedPointConfig() if config is None else config
    if contraction is not None and not 0.0 <= contraction < 1.0:
        raise ValueError(f"contraction must lie in [0, 1), got {contraction}")
    check_every = cfg.check_every or (1 if x0.device.type == "cpu" else 5)
    batch = x0.shape[0]
    device = x0.device
    tiny = torch.finfo(x0.real.dtype).tiny
    with torch.no_grad():
        x = x0.detach().clone()
        out = x.clone()
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        item_iters = torch.zeros(batch, dtype=torch.long, device=device)
        last_diff = torch.zeros(batch, dtype=x.real.dtype, device=device)
        last_norm = torch.zeros(batch, dtype=x.real.dtype, device=device)
        history: list[torch.Tensor] = []
        accel = _Anderson(_flat(x), cfg) if cfg.method == "anderson" else None
        iterations = 0
        for n in range(cfg.max_iter):
            fx = step(x)
            iterations += 1
            xf, ff = _flat(x), _flat(fx)                                        # (B, n)
            g = ff - xf
            diff = torch.linalg.vector_norm(g, dim=1)                          # (B,)
            xnorm = torch.linalg.vector_norm(xf, dim=1)
            res = diff / xnorm.clamp_min(tiny)                                  # (B,)
            history.append(res)
            active = ~done
            out = torch.where(_bcast(active, out), fx, out)
            item_iters = item_iters + active.long()
            last_diff = torch.where(active, diff, last_diff)
            last_norm = torch.where(active, torch.linalg.vector_norm(ff, dim=1), last_norm)
            # A non-finite step stops its item (flagged below); x = 0 only gives r = inf.
            if on_iteration is not None and ((n + 1) % check_every == 0 or n == 0):
                on_iteration(n + 1, float(res[active].max()) if bool(active.any()) else 0.0)
            done = done | (res <= cfg.tol) | ~torch.isfinite(diff)
            if accel is not None:
                nxt = accel.next(xf, g)
            else:
                nxt = ff
            nxt_t = torch.view_as_complex(nxt.reshape(*x.shape, 2)) if x.is_complex() \
                else nxt.reshape(x.shape)
            x = torch.where(_bcast(done, x), x, nxt_t)
            if (n + 1) % check_every == 0 and bool(done.all()):
                break
        residuals = torch.stack(history)                                        # (iterations, B)
        final = residuals.gather(0, (item_iters - 1).clamp_min(0).reshape(1, -1)).reshape(-1)
        converged_items = final <= cfg.tol
        converged = bool(converged_items.all())
        bound = None
        if contraction is not None:
            bound = contraction / (1.0 - contraction) * last_diff / last_norm.clamp_min(tiny)
    if not converged and cfg.warn:
        bad = int((~converged_items).sum())
        worst = float(final.nan_to_num(nan=math.inf).max())
        warnings.warn(
            f"{label} stopped after {iterations} iterations with relative residual {worst:.3g} "
            f"> tol {cfg.tol:.3g} in {bad} of {batch} item(s)",
            ConvergenceWarning, stacklevel=2)
    return FixedPointResult(x=out, iterations=iterations, item_iterations=item_iters,
                            residuals=residuals, converged_items=converged_items,
                            converged=converged, distance_bound=bound, contraction=contraction)
