"""Property checks for linear operators (adjointness, normal operator, linearity).

Every operator in molrecon exposes ``forward``, ``adjoint`` and ``normal`` and
its ``domain_shape``, ``range_shape``, ``dtype`` and ``device``. The functions
here draw seeded random complex inputs, apply the operator and return the
*measured relative error*; the caller decides the threshold (in complex128 the
errors are at the level of a few ulps, ~1e-15; tests require < 1e-10).
"""

from __future__ import annotations

from typing import Protocol

import torch


class LinearOperator(Protocol):
    """What the checks need from an operator."""

    @property
    def domain_shape(self) -> tuple[int, ...]: ...

    @property
    def range_shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    def normal(self, x: torch.Tensor) -> torch.Tensor: ...


def random_complex(shape: tuple[int, ...], *, dtype: torch.dtype = torch.complex128,
                   device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """Standard complex Gaussian samples (reproducible for a given ``seed``, on the CPU RNG)."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.empty((), dtype=dtype).real.dtype
    z = torch.randn(shape, generator=gen, dtype=real) + 1j * torch.randn(shape, generator=gen,
                                                                         dtype=real)
    return z.to(device=device, dtype=dtype)


def _vdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b> = Σ conj(a)·b`` over all entries."""
    return torch.sum(a.conj() * b)


def adjoint_error(op: LinearOperator, *, seed: int = 0) -> float:
    """Relative adjoint mismatch ``|<Ax, y> − <x, Aᴴy>| / (‖Ax‖·‖y‖)``.

    The denominator is the Cauchy–Schwarz bound of ``|<Ax, y>|``, so the measure
    is scale-free and cannot be hidden by a small inner product.
    """
    x = random_complex(tuple(op.domain_shape), dtype=op.dtype, device=op.device, seed=seed)
    y = random_complex(tuple(op.range_shape), dtype=op.dtype, device=op.device, seed=seed + 1)
    ax = op.forward(x)
    lhs = _vdot(ax, y)
    rhs = _vdot(x, op.adjoint(y))
    scale = torch.linalg.vector_norm(ax) * torch.linalg.vector_norm(y)
    return float(torch.abs(lhs - rhs) / scale.clamp_min(torch.finfo(scale.dtype).tiny))


def normal_error(op: LinearOperator, *, seed: int = 0) -> float:
    """Relative mismatch ``‖N x − Aᴴ(A x)‖ / ‖Aᴴ(A x)‖`` of the normal operator."""
    x = random_complex(tuple(op.domain_shape), dtype=op.dtype, device=op.device, seed=seed)
    ref = op.adjoint(op.forward(x))
    err = torch.linalg.vector_norm(op.normal(x) - ref)
    return float(err / torch.linalg.vector_norm(ref).clamp_min(torch.finfo(err.dtype).tiny))


def linearity_error(op: LinearOperator, *, seed: int = 0) -> float:
    """Relative mismatch ``‖A(a x₁ + b x₂) − (a A x₁ + b A x₂)‖ / ‖a A x₁ + b A x₂‖``.

    ``a`` and ``b`` are random complex scalars, so a conjugate-linear or real-only
    operator fails the check.
    """
    x1 = random_complex(tuple(op.domain_shape), dtype=op.dtype, device=op.device, seed=seed)
    x2 = random_complex(tuple(op.domain_shape), dtype=op.dtype, device=op.device, seed=seed + 1)
    ab = random_complex((2,), dtype=op.dtype, device=op.device, seed=seed + 2)
    a, b = ab[0], ab[1]
    ref = a * op.forward(x1) + b * op.forward(x2)
    err = torch.linalg.vector_norm(op.forward(a * x1 + b * x2) - ref)
    return float(err / torch.linalg.vector_norm(ref).clamp_min(torch.finfo(err.dtype).tiny))


def check_operator(op: LinearOperator, *, seed: int = 0) -> dict[str, float]:
    """All three measures at once: ``{"adjoint": …, "normal": …, "linearity": …}``."""
    return {"adjoint": adjoint_error(op, seed=seed), "normal": normal_error(op, seed=seed),
            "linearity": linearity_error(op, seed=seed)}
