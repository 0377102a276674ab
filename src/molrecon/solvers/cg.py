"""Batched conjugate gradient for Hermitian positive-definite systems.

Solves ``(N + shift·I) x = rhs`` where ``N`` is a callable (e.g. ``AᴴA``) acting on
tensors of shape ``(B, ...)``. Each batch item has its own step sizes and its
own stopping test, so one slice that converges early does not change another.

Stopping rule (relative): item ``b`` stops when ``‖r_b‖ ≤ tol · ‖rhs_b‖``.
Convergence is checked on the device without a host synchronisation per
iteration unless ``tol > 0`` (then one ``.item()`` per iteration decides
whether all items are done).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CGResult:
    x: torch.Tensor
    iterations: int
    residuals: torch.Tensor      # (iterations + 1, B) relative residual norms ‖r‖/‖rhs‖
    converged: bool


def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-batch-item real part of <a, b> = sum(conj(a) * b), shape (B,)."""
    return torch.sum((a.conj() * b).real.reshape(a.shape[0], -1), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def conjugate_gradient(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    shift: float | torch.Tensor = 0.0,
    max_iter: int = 10,
    tol: float = 0.0,
) -> CGResult:
    """Run at most ``max_iter`` CG iterations on ``(normal + shift·I) x = rhs``.

    ``shift`` may be a scalar or a per-item tensor of shape (B,). ``tol`` is
    relative to ``‖rhs‖`` per item; ``tol=0`` runs exactly ``max_iter``
    iterations (the fixed-cost mode used inside MOL steps and training, where a
    fixed number of iterations keeps the map differentiable and deterministic),
    except that an item whose relative residual is below machine precision takes
    no further steps (they would only divide round-off by round-off).
    """
    if max_iter < 0:
        raise ValueError("max_iter must be >= 0")
    shift_t = torch.as_tensor(shift, device=rhs.device, dtype=rhs.real.dtype)
    if shift_t.ndim == 1:
        shift_t = _bcast(shift_t, rhs)

    def apply(v: torch.Tensor) -> torch.Tensor:
        return normal(v) + shift_t * v

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - apply(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = _bdot(r, r)
    rhs_norm = torch.sqrt(_bdot(rhs, rhs)).clamp_min(torch.finfo(rhs.real.dtype).tiny)
    history = [torch.sqrt(rr) / rhs_norm]
    # Items whose residual falls below machine precision stop too (with tol = 0 as well):
    # iterating further makes the recursive residual underflow and CG return NaN.
    floor = max(tol, float(torch.finfo(rhs.real.dtype).eps))
    # (written as "not below" so that NaN/Inf items stay active and their non-finite values
    # propagate to the caller instead of freezing at the start value)
    active = ~(history[0] <= floor)
    iterations = 0
    for _ in range(max_iter):
        if tol > 0 and not bool(active.any()):
            break
        ap = apply(p)
        pap = _bdot(p, ap)
        # Items that stopped (or hit an exact zero residual) take no step.
        safe = active & (pap > 0)
        alpha = torch.where(safe, rr / torch.where(safe, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        x = x + _bcast(alpha, x) * p
        r = r - _bcast(alpha, r) * ap
        rr_new = _bdot(r, r)
        beta = torch.where(safe, rr_new / torch.where(safe, rr, torch.ones_like(rr)),
                           torch.zeros_like(rr))
        p = r + _bcast(beta, p) * p
        rr = torch.where(safe, rr_new, rr)
        iterations += 1
        res = torch.sqrt(rr) / rhs_norm
        history.append(res)
        active = active & ~(res <= floor)
    residuals = torch.stack(history)
    converged = bool((residuals[-1] <= tol).all()) if tol > 0 else True
    return CGResult(x=x, iterations=iterations, residuals=residuals, converged=converged)
