"""Certified spectral bounds of zero-padded convolutions and the MOL-SN constraint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as nnf

from molrecon.models import CNNConfig, MolCNN, certified_bound, local_lipschitz_power
from molrecon.models.lipschitz import local_lipschitz_ratio
from molrecon.models.spectral import (
    conv_norm_bound,
    grid_correction,
    grid_maximum,
    layer_bounds,
    reshaped_kernel_norm,
)

CONV = {1: nnf.conv1d, 2: nnf.conv2d, 3: nnf.conv3d}
CONV_T = {1: nnf.conv_transpose1d, 2: nnf.conv_transpose2d, 3: nnf.conv_transpose3d}



def dense_norm(w: torch.Tensor, shape: tuple[int, ...]) -> float:
    """Exact operator norm of the zero-padded ("same") convolution on ``shape``, by SVD."""
    d = w.ndim - 2
    c_in = w.shape[1]
    n = c_in * math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, c_in, *shape)
    mat = CONV[d](basis, w, padding=w.shape[-1] // 2).reshape(n, -1)
    return float(torch.linalg.matrix_norm(mat, ord=2))


def power_norm(w: torch.Tensor, shape: tuple[int, ...], iters: int = 300) -> float:
    """Operator norm of the zero-padded convolution by power iteration (a lower estimate)."""
    d = w.ndim - 2
    pad = w.shape[-1] // 2
    g = torch.Generator().manual_seed(5)
    v = torch.randn(1, w.shape[1], *shape, dtype=w.dtype, generator=g)
    for _ in range(iters):
        v = CONV_T[d](CONV[d](v, w, padding=pad), w, padding=pad)
        v = v / v.norm()
    return float(CONV[d](v, w, padding=pad).norm())


def rand_kernel(c_out: int, c_in: int, dims: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c_out, c_in, *(k,) * dims, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("shape,c_in,c_out,seed,max_ratio", [
    ((9, 7), 2, 5, 0, 1.10),
    ((16, 15), 3, 4, 1, 1.05),
    ((24, 23), 2, 3, 2, 1.03),
    ((8, 8), 4, 4, 3, 1.10),
    ((11, 5), 1, 1, 4, None),
])
def test_bound_is_above_dense_norm_2d(shape: tuple[int, int], c_in: int, c_out: int, seed: int,
                                      max_ratio: float | None) -> None:
    w = rand_kernel(c_out, c_in, 2, seed=seed)
    bound = float(conv_norm_bound(w))
    exact = dense_norm(w, shape)
    assert bound >= exact
    # Boundary effects make small images' norms smaller than the ℓ²(ℤ²) norm, never larger;
    # the gap shrinks as the image grows.
    if max_ratio is not None:
        assert bound <= max_ratio * exact


@pytest.mark.parametrize("shape,c_in,c_out,seed", [
    ((5, 5, 5), 2, 3, 0),
    ((7, 6, 5), 2, 2, 1),
    ((4, 7, 6), 3, 1, 2),
])
def test_bound_is_above_dense_norm_3d(shape: tuple[int, int, int], c_in: int, c_out: int,
                                      seed: int) -> None:
    w = rand_kernel(c_out, c_in, 3, seed=seed)
    assert float(conv_norm_bound(w)) >= dense_norm(w, shape)


def test_bound_is_within_a_few_percent_on_larger_images() -> None:
    w2 = rand_kernel(4, 4, 2, seed=7)
    ratio2 = float(conv_norm_bound(w2)) / power_norm(w2, (40, 39))
    assert 1.0 <= ratio2 <= 1.015
    w3 = rand_kernel(2, 3, 3, seed=8)
    ratio3 = float(conv_norm_bound(w3)) / power_norm(w3, (20, 19, 18))
    assert 1.0 <= ratio3 <= 1.05


@pytest.mark.parametrize("dims,grid", [(1, 3), (1, 4), (2, 3), (2, 4), (2, 5), (3, 4), (3, 5)])
def test_correction_certifies_even_coarse_grids(dims: int, grid: int) -> None:
    """On coarse grids the sampled maximum misses the supremum; the corrected bound never does."""
    fine = {1: 2048, 2: 128, 3: 32}[dims]
    missed = 0
    for seed in range(12 if dims < 3 else 6):
        w = rand_kernel(1 + seed % 3, 1 + seed % 2, dims, seed=100 + seed)
        coarse = grid_maximum(w, grid=grid)
        sup_estimate = grid_maximum(w, grid=fine).value
        assert coarse.bound >= sup_estimate
        missed += coarse.value < sup_estimate * (1 - 1e-9)
    assert missed > 0   # the correction is doing real work in this test


def test_default_grid_is_tight_against_a_fine_grid() -> None:
    for dims, fine in ((2, 256), (3, 48)):
        w = rand_kernel(3, 2, dims, seed=11)
        gm = grid_maximum(w)
        sup_estimate = grid_maximum(w, grid=fine).value
        assert sup_estimate <= gm.bound <= sup_estimate * gm.correction * (1 + 1e-9)
        assert gm.correction <= {2: 1.005, 3: 1.02}[dims]


def test_grid_correction_values_and_limits() -> None:
    assert grid_correction(2, 3, 32) == pytest.approx(1 / math.cos(math.pi / 32))
    assert grid_correction(3, 3, 24) == pytest.approx(1 / math.cos(3 * math.pi / 48))
    assert grid_correction(2, 1, 2) == 1.0
    with pytest.raises(ValueError):
        grid_correction(2, 3, 2)
    with pytest.raises(ValueError):
        grid_correction(3, 5, 6)


def test_reshaped_kernel_norm_is_a_lower_bound_within_k_to_the_d_half() -> None:
    for dims in (2, 3):
        w = rand_kernel(8, 6, dims, seed=dims)
        gm = grid_maximum(w, grid=64 if dims == 2 else 24)
        reshaped = reshaped_kernel_norm(w)
        assert reshaped <= gm.bound
        assert gm.value <= 3 ** (dims / 2) * reshaped


def test_bound_gradient_matches_finite_differences() -> None:
    w = rand_kernel(3, 2, 2, seed=21).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: conv_norm_bound(t, grid=16), (w,),
                                    eps=1e-6, atol=1e-6, rtol=1e-4)


def _sn_model(dims: int = 2, target: float = 0.9, seed: int = 0, channels: int = 8) -> MolCNN:
    torch.manual_seed(seed)
    model = MolCNN(CNNConfig(dims=dims, layers=4, channels=channels), "sn", target).double()
    with torch.no_grad():
        for conv in model.convs:         # push every raw layer far above its budget
            conv.weight.mul_(20.0)
    return model


def test_sn_model_certificate_is_below_target_and_above_measurements() -> None:
    model = _sn_model()
    bounds = layer_bounds(model)
    assert all(b <= model.layer_budget * (1 + 1e-9) for b in bounds)
    assert all(b >= 0.999 * model.layer_budget for b in bounds)   # every layer is active
    cert = certified_bound(model)
    assert cert <= 0.9
    assert cert >= 0.9 * (1 - 1e-4)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 20, 19, dtype=torch.complex128, generator=g)
    measured = local_lipschitz_power(model, x, iters=30, generator=g)
    assert 0.0 < measured <= cert
    ratio, _ = local_lipschitz_ratio(model, x, generator=g)
    assert float(ratio.detach()) <= cert
    # Pairs far apart too (the certificate is global).
    y = torch.randn(2, 1, 20, 19, dtype=torch.complex128, generator=g)
    with torch.no_grad():
        far = float((model(x) - model(y)).norm() / (x - y).norm())
    assert far <= cert


def test_sn_model_3d_certificate() -> None:
    model = _sn_model(dims=3, target=0.5, channels=4)
    cert = certified_bound(model)
    assert 0.5 * (1 - 1e-4) <= cert <= 0.5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 9, 8, dtype=torch.complex128, generator=g)
    assert local_lipschitz_power(model, x, iters=20, generator=g) <= cert


def test_sn_follows_weight_updates() -> None:
    """The cached bound must not survive an optimiser step or an in-place edit."""
    model = _sn_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x = torch.randn(1, 1, 10, 9, dtype=torch.complex128)
    for _ in range(2):
        opt.zero_grad()
        loss = model(x).abs().square().sum() - 50 * model(x).real.sum()
        loss.backward()
        for conv in model.convs:
            assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
        opt.step()
        assert certified_bound(model) <= 0.9
    with torch.no_grad():
        model.convs[1].weight.mul_(100.0)
    assert certified_bound(model) <= 0.9


def test_sn_does_not_scale_small_layers_up() -> None:
    model = MolCNN(CNNConfig(layers=3, channels=4), "sn", 0.99).double()
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.mul_(1e-3)
    for raw, eff in zip((c.weight for c in model.convs), model.effective_weights()):
        assert torch.equal(raw, eff)
