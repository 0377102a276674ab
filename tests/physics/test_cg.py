"""Batched conjugate gradient against dense solves."""

from __future__ import annotations

import pytest
import torch

from molrecon.solvers.cg import conjugate_gradient


def _hpd(batch: int, n: int, *, cond: float, seed: int) -> torch.Tensor:
    """Random Hermitian positive-definite matrices (B, n, n) with condition number ``cond``."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, n, n, generator=gen, dtype=torch.complex128)
    q, _ = torch.linalg.qr(z)
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return (q * eig.to(q.dtype)) @ q.mH


def _apply(mats: torch.Tensor):  # type: ignore[no-untyped-def]
    return lambda v: (mats @ v.unsqueeze(-1)).squeeze(-1)


def _rhs(batch: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, generator=gen, dtype=torch.complex128)


def test_cg_matches_dense_solve() -> None:
    a = _hpd(3, 24, cond=50.0, seed=1)
    b = _rhs(3, 24, seed=2)
    res = conjugate_gradient(_apply(a), b, max_iter=60, tol=1e-12)
    want = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    assert res.converged
    assert float(torch.linalg.vector_norm(res.x - want) / torch.linalg.vector_norm(want)) < 1e-9
    assert res.residuals.shape == (res.iterations + 1, 3)
    assert float(res.residuals[-1].max()) <= 1e-12


def test_cg_exact_in_n_steps_for_few_distinct_eigenvalues() -> None:
    """With k distinct eigenvalues CG is exact after k iterations (Krylov property)."""
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(1, 20, 20, generator=gen, dtype=torch.complex128))
    eig = torch.tensor([1.0, 3.0, 7.0] * 6 + [1.0, 3.0], dtype=torch.float64)
    a = (q * eig.to(q.dtype)) @ q.mH
    b = _rhs(1, 20, seed=4)
    res = conjugate_gradient(_apply(a), b, max_iter=3)
    want = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    assert res.iterations == 3
    assert float(torch.linalg.vector_norm(res.x - want) / torch.linalg.vector_norm(want)) < 1e-10


def test_cg_per_item_shift_and_independence() -> None:
    a = _hpd(2, 16, cond=20.0, seed=5)
    b = _rhs(2, 16, seed=6)
    shift = torch.tensor([0.0, 5.0], dtype=torch.float64)
    res = conjugate_gradient(_apply(a), b, shift=shift, max_iter=40, tol=1e-13)
    eye = torch.eye(16, dtype=a.dtype)
    for i in range(2):
        want = torch.linalg.solve(a[i] + shift[i] * eye, b[i])
        assert float(torch.linalg.vector_norm(res.x[i] - want) / torch.linalg.vector_norm(want)) \
            < 1e-10
        # Solving the item alone gives the same answer: items do not share step sizes.
        alone = conjugate_gradient(_apply(a[i:i + 1]), b[i:i + 1], shift=float(shift[i]),
                                   max_iter=40, tol=1e-13)
        assert torch.allclose(alone.x[0], res.x[i], atol=1e-11)


def test_cg_fixed_iterations_when_tol_is_zero() -> None:
    a = _hpd(2, 30, cond=1e3, seed=7)
    b = _rhs(2, 30, seed=8)
    res = conjugate_gradient(_apply(a), b, max_iter=5)
    assert res.iterations == 5
    assert res.residuals.shape == (6, 2)
    assert float(res.residuals[0].min()) == pytest.approx(1.0)
    # Five steps on a badly conditioned system leave a clear residual.
    assert float(res.residuals[-1].min()) > 1e-3


def test_cg_reports_non_convergence() -> None:
    a = _hpd(1, 40, cond=1e4, seed=9)
    b = _rhs(1, 40, seed=10)
    res = conjugate_gradient(_apply(a), b, max_iter=4, tol=1e-10)
    assert not res.converged
    assert res.iterations == 4


def test_cg_warm_start_at_the_solution_stops_at_once() -> None:
    a = _hpd(2, 12, cond=10.0, seed=11)
    b = _rhs(2, 12, seed=12)
    x_star = torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1)
    res = conjugate_gradient(_apply(a), b, x0=x_star, max_iter=10, tol=1e-8)
    assert res.iterations == 0
    assert res.converged
    assert torch.allclose(res.x, x_star)
    # x0 must not be modified in place.
    assert torch.equal(x_star, torch.linalg.solve(a, b.unsqueeze(-1)).squeeze(-1))


def test_cg_zero_rhs_gives_zero_without_nan() -> None:
    a = _hpd(2, 8, cond=10.0, seed=13)
    b = torch.zeros(2, 8, dtype=torch.complex128)
    b[1] = _rhs(1, 8, seed=14)[0]
    res = conjugate_gradient(_apply(a), b, max_iter=20)
    assert torch.isfinite(res.x.abs()).all()
    assert float(res.x[0].abs().max()) == 0.0
    want = torch.linalg.solve(a[1], b[1])
    assert torch.allclose(res.x[1], want, atol=1e-10)


def test_cg_one_item_converging_early_does_not_move_again() -> None:
    a = _hpd(2, 20, cond=1.0 + 1e-9, seed=15)      # item 0: ~identity, one step suffices
    a[1] = _hpd(1, 20, cond=1e3, seed=16)[0]
    b = _rhs(2, 20, seed=17)
    res = conjugate_gradient(_apply(a), b, max_iter=100, tol=1e-10)
    assert res.converged
    assert float(res.residuals[1, 0]) < 1e-8               # item 0 done after one iteration
    assert torch.equal(res.residuals[-1, 0], res.residuals[1, 0])


def test_cg_rejects_negative_max_iter() -> None:
    with pytest.raises(ValueError):
        conjugate_gradient(lambda v: v, torch.ones(1, 3), max_iter=-1)


def test_cg_float32_complex64() -> None:
    a = _hpd(1, 10, cond=10.0, seed=18).to(torch.complex64)
    b = _rhs(1, 10, seed=19).to(torch.complex64)
    res = conjugate_gradient(_apply(a), b, max_iter=30, tol=1e-5)
    assert res.x.dtype == torch.complex64
    want = torch.linalg.solve(a.to(torch.complex128), b.to(torch.complex128).unsqueeze(-1))
    assert float(torch.linalg.vector_norm(res.x.to(torch.complex128) - want.squeeze(-1))
                 / torch.linalg.vector_norm(want)) < 1e-4
