"""Coil compression (physics.compression): algebra, exactness, what it keeps, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from molrecon.errors import ConfigError
from molrecon.io.detect import read_raw
from molrecon.metrics import compare
from molrecon.physics.compression import (
    AUTO_MIN_COILS,
    compress_maps,
    compress_scan,
    plan_compression,
)
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file


def _scan(tmp_path: Path, kind: str = "2d", coils: int = 16, **kw: object):
    matrix = {"2d": (96, 96), "3d": (48, 48, 16), "2dt": (64, 64)}[kind]
    cfg = SimulationConfig(kind=kind, matrix=matrix, coils=coils, acceleration=3.0, seed=3,
                           **({"frames": 4} if kind == "2dt" else {}), **kw)  # type: ignore[arg-type]
    path = tmp_path / f"{kind}_{coils}.h5"
    sim = simulate_to_file(cfg, path)
    return read_raw(path), sim


def _orthonormal(mats: np.ndarray) -> None:
    n = mats.shape[-1]
    gram = np.einsum("...cn,...cm->...nm", mats.conj(), mats)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(n), gram.shape), atol=1e-5)


@pytest.mark.parametrize("method", ["scc", "gcc"])
def test_compressed_data_are_the_forward_model_of_compressed_maps(method: str, rng) -> None:
    # k = F(S x) on C coils  ⇒  compress(k) = F(compress_maps(S) x): the virtual coils are an
    # exact linear recombination, in k-space and in image space alike.
    from molrecon.io.types import Geometry, RawScan, ScanInfo

    b, c, y, x = 2, 6, 24, 20
    img = rng.standard_normal((b, 1, 1, y, x)) + 1j * rng.standard_normal((b, 1, 1, y, x))
    maps = rng.standard_normal((b, c, 1, y, x)) + 1j * rng.standard_normal((b, c, 1, y, x))

    def fwd(s: np.ndarray) -> np.ndarray:
        coil = s * img
        return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil, axes=(-2, -1)), norm="ortho"),
                               axes=(-2, -1))

    mask = np.zeros((b, 1, 1, y, 1), dtype=bool)
    mask[:, :, :, ::2] = True
    mask[:, :, :, 8:16] = True
    k = (fwd(maps) * mask).astype(np.complex64)
    calib = np.zeros_like(mask)
    calib[:, :, :, 8:16] = True
    scan = RawScan(kspace=k, mask=mask, calib=calib, kind="2d",
                   geometry=Geometry.default((x, y, 1), n_batch=b), info=ScanInfo(format="test"))
    small, comp = compress_scan(scan, 3, method=method)  # type: ignore[arg-type]
    assert small.kspace.shape == (b, 3, 1, y, x) and comp.n_out == 3
    _orthonormal(comp.matrices)
    expected = fwd(compress_maps(comp, maps.astype(np.complex64))) * mask
    np.testing.assert_allclose(small.kspace, expected, atol=2e-4 * np.abs(expected).max())
    assert not small.kspace[~np.broadcast_to(mask, small.kspace.shape)].any()


def test_all_coils_kept_changes_nothing_but_the_basis(tmp_path: Path) -> None:
    scan, _ = _scan(tmp_path, coils=8)
    full = reconstruct(scan, ReconConfig(method="sense")).image.magnitude()
    same, comp = compress_scan(scan, 8)
    assert comp.retained == pytest.approx(1.0)
    rotated = reconstruct(same, ReconConfig(method="sense")).image.magnitude()
    # same data in another coil basis: ESPIRiT and CG-SENSE give the same image
    assert compare(rotated, full, fit=False).psnr > 55


def test_sixteen_coils_to_eight_keeps_the_image(tmp_path: Path) -> None:
    scan, sim = _scan(tmp_path, coils=16)
    truth = np.abs(sim.truth.data)
    full = reconstruct(scan, ReconConfig(method="sense")).image.magnitude()
    small, comp = compress_scan(scan, 8, method="scc")
    assert small.n_coils == 8 and comp.method == "scc"
    assert float(comp.retained.min()) > 0.98
    half = reconstruct(small, ReconConfig(method="sense")).image.magnitude()
    p_full = compare(full, truth).psnr
    p_half = compare(half, truth).psnr
    assert p_half > p_full - 0.5, (p_full, p_half)
    # ... while a single virtual coil cannot unfold R = 3
    one, _ = compress_scan(scan, 1)
    p_one = compare(reconstruct(one, ReconConfig(method="sense")).image.magnitude(), truth).psnr
    assert p_one < p_half - 3


def test_auto_keeps_enough_coils(tmp_path: Path) -> None:
    scan, _ = _scan(tmp_path, coils=16)
    comp = plan_compression(scan, "auto")
    assert AUTO_MIN_COILS <= comp.n_out <= 16
    assert float(comp.retained.min()) >= 0.995 or comp.n_out == AUTO_MIN_COILS


def test_gcc_on_3d_is_smooth_and_keeps_more_than_scc(tmp_path: Path) -> None:
    scan, sim = _scan(tmp_path, kind="3d", coils=12)
    gcc = plan_compression(scan, 4, method="gcc")
    scc = plan_compression(scan, 4, method="scc")
    assert gcc.matrices.shape == (1, scan.shape[-1], 12, 4)
    _orthonormal(gcc.matrices)
    assert float(gcc.retained[0]) >= float(scc.retained[0]) - 1e-6
    # aligned: neighbouring readout positions' bases are close (no random rotations)
    step = np.linalg.norm(np.diff(gcc.matrices[0], axis=0), axis=(1, 2))
    assert float(np.median(step)) < 0.5
    small, comp = compress_scan(scan, 6)
    assert comp.method == "gcc"                   # the auto method
    truth = np.abs(sim.truth.data)
    p_full = compare(reconstruct(scan, ReconConfig(method="sense")).image.magnitude(), truth).psnr
    p_small = compare(reconstruct(small, ReconConfig(method="sense")).image.magnitude(),
                      truth).psnr
    assert p_small > p_full - 0.5, (p_full, p_small)


def test_refusals(tmp_path: Path) -> None:
    scan, _ = _scan(tmp_path, coils=4)
    for bad in (0, 5, -1, 2.5, True, "many"):
        with pytest.raises(ConfigError):
            plan_compression(scan, bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        plan_compression(scan, 2, method="pca")  # type: ignore[arg-type]
    comp = plan_compression(scan, 2)
    with pytest.raises(ConfigError):
        compress_maps(comp, np.zeros((1, 3, 1, 8, 8), np.complex64))
