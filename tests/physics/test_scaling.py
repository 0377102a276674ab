"""Intensity normalisation: homogeneity, extreme scales, percentile semantics, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from molrecon.errors import InputDataError
from molrecon.physics.fft import fftc, ifftc
from molrecon.physics.scaling import denormalise, normalise, scale_factor


def _kspace(image: np.ndarray, maps: np.ndarray, kind: str) -> torch.Tensor:
    """k-space (B, C, D, Y, X) of ``maps · image``; image (B, D, Y, X), maps (C, D, Y, X)."""
    dims = (-3, -2, -1) if kind == "3d" else (-2, -1)
    coil = torch.from_numpy(maps[None] * image[:, None])
    return fftc(coil, dims).to(torch.complex64)


def _smooth_maps(c: int, shape: tuple[int, int, int]) -> np.ndarray:
    d, y, x = shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, y), np.linspace(-1, 1, x), indexing="ij")
    maps = np.stack([np.exp(1j * (i + xx * (i - c / 2) / c)) * (1.2 + np.cos(yy + i))
                     for i in range(c)])
    return np.repeat(maps[:, None], d, axis=1)


def _zero_filled_rss(k: torch.Tensor, kind: str) -> torch.Tensor:
    dims = (-3, -2, -1) if kind == "3d" else (-2, -1)
    return torch.sqrt((ifftc(k, dims).abs() ** 2).sum(dim=1))


@pytest.fixture
def example(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    img = np.zeros((2, 1, 32, 28))
    img[:, :, 6:26, 5:23] = 1 + 0.5 * rng.random((2, 1, 20, 18))
    k = _kspace(img, _smooth_maps(4, (1, 32, 28)), "2d")
    mask = torch.zeros(2, 1, 1, 32, 1, dtype=torch.bool)
    mask[:, :, :, ::2] = True
    mask[:, :, :, 12:20] = True
    return k * mask, mask


@pytest.mark.parametrize("c", [1e-12, 1e-6, 1e6, 1e12])
def test_scale_is_homogeneous_at_extreme_scales(example: tuple[torch.Tensor, torch.Tensor],
                                                c: float) -> None:
    k, mask = example
    s = scale_factor(k, mask, "2d")
    s_c = scale_factor(k * c, mask, "2d")
    assert torch.isfinite(s_c).all() and (s_c > 0).all()
    assert torch.allclose(s_c / c, s, rtol=1e-5)
    # Normalised data do not depend on the scanner scale.
    a = normalise(k, s)
    b = normalise(k * c, s_c)
    assert float((a - b).abs().max()) < 1e-5 * float(a.abs().max())


def test_normalised_zero_filled_image_has_unit_percentile(
        example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    s = scale_factor(k, mask, "2d")
    rss = _zero_filled_rss(normalise(k, s), "2d").reshape(2, -1)
    p99 = torch.quantile(rss.double(), 0.99, dim=1, interpolation="higher")
    assert torch.allclose(p99, torch.ones(2, dtype=torch.float64), rtol=1e-4)


def test_percentile_matches_the_image_histogram() -> None:
    """One coil with unit map: s equals the nearest-rank 99th percentile of |image|."""
    vals = np.arange(1, 401, dtype=float).reshape(1, 1, 20, 20)     # 400 distinct values
    k = _kspace(vals, np.ones((1, 1, 20, 20)), "2d")
    s = float(scale_factor(k, None, "2d")[0])
    assert s == pytest.approx(396.0, rel=1e-5)                      # rank ceil(0.99·400) = 396
    s50 = float(scale_factor(k, None, "2d", percentile=50.0)[0])
    assert s50 == pytest.approx(200.0, rel=1e-5)


@pytest.mark.parametrize("kind", ["3d", "2dt"])
def test_scale_uses_the_kind_fft_axes(kind: str) -> None:
    rng = np.random.default_rng(3)
    img = 1 + rng.random((1, 6, 10, 8))
    maps = np.ones((1, 6, 10, 8))
    k = _kspace(img, maps, kind)
    want = np.sort(img.ravel())[math.ceil(0.99 * img.size) - 1]
    assert float(scale_factor(k, None, kind)[0]) == pytest.approx(want, rel=1e-5)


def test_a_few_bright_voxels_do_not_set_the_scale(rng: np.random.Generator) -> None:
    img = np.ones((1, 1, 40, 40)) + 0.1 * rng.random((1, 1, 40, 40))
    k = _kspace(img, np.ones((1, 1, 40, 40)), "2d")
    spiky = img.copy()
    spiky[0, 0, rng.integers(0, 40, 8), rng.integers(0, 40, 8)] = 1000.0   # 0.5 % of voxels
    k_spiky = _kspace(spiky, np.ones((1, 1, 40, 40)), "2d")
    s, s_spiky = float(scale_factor(k, None, "2d")[0]), float(scale_factor(k_spiky, None, "2d")[0])
    assert abs(s_spiky / s - 1) < 0.05
    assert float(k_spiky.abs().max()) > 5 * float(k.abs().max())   # a max-based scale would move


def test_each_batch_item_has_its_own_scale(example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    k2 = k.clone()
    k2[1] *= 1e4
    s = scale_factor(k, mask, "2d")
    s2 = scale_factor(k2, mask, "2d")
    assert float(s2[0]) == pytest.approx(float(s[0]), rel=1e-6)
    assert float(s2[1]) == pytest.approx(1e4 * float(s[1]), rel=1e-5)


def test_unsampled_positions_are_ignored(example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    garbage = k + (~mask) * 1e6
    assert torch.allclose(scale_factor(garbage, mask, "2d"), scale_factor(k, mask, "2d"))


def test_denormalise_inverts_normalise_through_a_linear_reconstruction(
        example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    s = scale_factor(k * 3e7, mask, "2d")
    k_n = normalise(k * 3e7, s)
    img = denormalise(ifftc(k_n), s)
    want = ifftc(k * 3e7)
    assert float((img - want).abs().max()) < 1e-5 * float(want.abs().max())
    assert torch.allclose(denormalise(normalise(k, s), s), k, rtol=1e-5,
                          atol=1e-6 * float(k.abs().max()))


def test_all_zero_signal_is_an_input_error(example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    with pytest.raises(InputDataError, match="all zero"):
        scale_factor(torch.zeros_like(k), mask, "2d")
    k1 = k.clone()
    k1[1] = 0
    with pytest.raises(InputDataError, match=r"\[1\]"):
        scale_factor(k1, mask, "2d")


def test_non_finite_and_bad_input_are_input_errors(
        example: tuple[torch.Tensor, torch.Tensor]) -> None:
    k, mask = example
    bad = k.clone()
    bad[0, 0, 0, 16, 3] = float("nan")
    with pytest.raises(InputDataError, match="NaN"):
        scale_factor(bad, mask, "2d")
    with pytest.raises(InputDataError):
        scale_factor(k.abs(), mask, "2d")                      # not complex
    with pytest.raises(InputDataError):
        normalise(k, torch.tensor([1.0, 0.0]))
    with pytest.raises(InputDataError):
        denormalise(k, torch.tensor([1.0, 2.0, 3.0]))
