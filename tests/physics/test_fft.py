"""Centred orthonormal FFTs against numpy, on odd and even sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molrecon.physics.fft import fftc, ifftc, spatial_dims

SHAPES = [(37, 31), (32, 32), (1, 16), (5, 7, 9), (8, 6, 4)]


def _np_fftc(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(a, axes=axes), axes=axes, norm="ortho"),
                           axes=axes)


def _random(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_fftc_matches_numpy(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    a = _random((2,) + shape, rng)
    dims = tuple(range(-len(shape), 0))
    got = fftc(torch.from_numpy(a), dims).numpy()
    want = _np_fftc(a, dims)
    assert np.max(np.abs(got - want)) < 1e-12 * np.max(np.abs(want))


@pytest.mark.parametrize("shape", SHAPES)
def test_ifftc_inverts_and_preserves_norm(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    a = torch.from_numpy(_random(shape, rng))
    dims = tuple(range(-len(shape), 0))
    k = fftc(a, dims)
    assert torch.allclose(ifftc(k, dims), a, rtol=0, atol=1e-12)
    # Orthonormal: Parseval holds exactly (to rounding).
    assert abs(torch.linalg.vector_norm(k) / torch.linalg.vector_norm(a) - 1) < 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_ifftc_is_the_adjoint(shape: tuple[int, ...], rng: np.random.Generator) -> None:
    dims = tuple(range(-len(shape), 0))
    x = torch.from_numpy(_random(shape, rng))
    y = torch.from_numpy(_random(shape, rng))
    lhs = torch.sum(fftc(x, dims).conj() * y)
    rhs = torch.sum(x.conj() * ifftc(y, dims))
    assert abs(lhs - rhs) < 1e-12 * float(torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))


@pytest.mark.parametrize("n", [7, 8, 31, 32])
def test_dc_lands_at_the_centre_index(n: int) -> None:
    """A constant image has all its energy at index n // 2 on every axis."""
    img = torch.ones((n, n + 1), dtype=torch.complex128)
    k = fftc(img).abs()
    centre = (n // 2, (n + 1) // 2)
    assert torch.argmax(k).item() == centre[0] * (n + 1) + centre[1]
    assert float(k[centre]) == pytest.approx(np.sqrt(n * (n + 1)), rel=1e-12)
    k[centre] = 0
    assert float(k.max()) < 1e-10


def test_centred_point_maps_to_flat_phase() -> None:
    """A delta at the image centre n // 2 has a constant, real k-space (zero phase)."""
    img = torch.zeros((9, 10), dtype=torch.complex128)
    img[4, 5] = 1
    k = fftc(img)
    assert torch.allclose(k, torch.full_like(k, 1 / np.sqrt(90)), atol=1e-14)


@settings(max_examples=25, deadline=None)
@given(ny=st.integers(1, 17), nx=st.integers(1, 17), seed=st.integers(0, 2**16))
def test_fftc_matches_numpy_any_size(ny: int, nx: int, seed: int) -> None:
    a = _random((ny, nx), np.random.default_rng(seed))
    got = fftc(torch.from_numpy(a)).numpy()
    assert np.allclose(got, _np_fftc(a, (-2, -1)), rtol=0, atol=1e-12 * max(1.0, np.abs(a).max()))


def test_fftc_is_separable_along_the_readout(rng: np.random.Generator) -> None:
    """fftc over (D, Y, X) equals fftc over X after fftc over (D, Y) (the 3D decoupling)."""
    a = torch.from_numpy(_random((2, 5, 6, 7), rng))
    full = fftc(a, (-3, -2, -1))
    split = fftc(fftc(a, (-3, -2)), (-1,))
    assert torch.allclose(full, split, atol=1e-12)


def test_spatial_dims() -> None:
    assert spatial_dims("2d") == (-2, -1)
    assert spatial_dims("2dt") == (-2, -1)
    assert spatial_dims("3d") == (-3, -2, -1)
