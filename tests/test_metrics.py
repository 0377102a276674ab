"""Metrics against hand-computed values and known properties."""

from __future__ import annotations

import numpy as np
import pytest

from molrecon.errors import InputDataError
from molrecon.metrics import compare, ssim


def test_identical_images_are_perfect(rng: np.random.Generator) -> None:
    ref = rng.random((2, 1, 40, 37))
    m = compare(ref, ref)
    assert m.psnr == float("inf")
    assert m.ssim == pytest.approx(1.0, abs=1e-12)
    assert m.nrmse == 0.0
    assert m.scale == pytest.approx(1.0)


def test_psnr_matches_hand_computation(rng: np.random.Generator) -> None:
    ref = rng.random((1, 1, 32, 32)) + 0.5
    noise = 0.01 * rng.standard_normal(ref.shape)
    m = compare(ref + noise, ref, fit=False)
    mse = np.mean(noise ** 2)
    assert m.psnr == pytest.approx(10 * np.log10(ref.max() ** 2 / mse), rel=1e-12)
    assert m.nrmse == pytest.approx(np.linalg.norm(noise) / np.linalg.norm(ref), rel=1e-12)


def test_least_squares_fit_removes_global_scale(rng: np.random.Generator) -> None:
    ref = rng.random((1, 1, 32, 32))
    m = compare(7.5 * ref, ref)
    assert m.scale == pytest.approx(1 / 7.5)
    assert m.nrmse < 1e-12
    unfitted = compare(7.5 * ref, ref, fit=False)
    assert unfitted.nrmse == pytest.approx(6.5)


def test_complex_inputs_compare_magnitudes(rng: np.random.Generator) -> None:
    ref = rng.random((1, 1, 24, 24))
    phase = np.exp(1j * rng.uniform(-np.pi, np.pi, ref.shape))
    assert compare(ref * phase, ref).nrmse < 1e-12


def test_ssim_decreases_with_noise(rng: np.random.Generator) -> None:
    ref = np.zeros((64, 64))
    ref[16:48, 16:48] = 1.0
    small = ssim(ref + 0.01 * rng.standard_normal(ref.shape), ref)
    large = ssim(ref + 0.2 * rng.standard_normal(ref.shape), ref)
    assert 1.0 > small > large > 0.0


def test_bad_inputs_raise() -> None:
    with pytest.raises(InputDataError, match="shapes differ"):
        compare(np.ones((1, 1, 16, 16)), np.ones((1, 1, 16, 17)))
    with pytest.raises(InputDataError, match="all zero"):
        compare(np.ones((1, 1, 16, 16)), np.zeros((1, 1, 16, 16)))
    with pytest.raises(InputDataError, match="NaN"):
        compare(np.full((1, 1, 16, 16), np.nan), np.ones((1, 1, 16, 16)))
    with pytest.raises(InputDataError, match="too small"):
        compare(np.ones((1, 1, 8, 8)), np.ones((1, 1, 8, 8)))


def test_one_readout_position_is_scored_on_the_partition_phase_plane(
        rng: np.random.Generator) -> None:
    """(B, D, Y, 1) volumes, e.g. a 3D scan stored after the readout transform, are compared
    as (D, Y) images: the same numbers as the plane itself."""
    ref = rng.random((1, 40, 30))
    rec = ref + 0.05 * rng.standard_normal(ref.shape)
    as_volume = compare(rec[..., None], ref[..., None])
    as_plane = compare(rec[:, None], ref[:, None])
    assert as_volume.psnr == pytest.approx(as_plane.psnr)
    assert as_volume.ssim == pytest.approx(as_plane.ssim)


def test_cli_json_of_identical_images_is_valid_json(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Identical images: PSNR is infinite, which JSON cannot hold; the command writes null and
    says "identical" (and the table shows ∞)."""
    import json

    import nibabel as nib
    from typer.testing import CliRunner

    from molrecon.cli import app

    img = np.random.default_rng(0).random((16, 12, 1)).astype(np.float32)
    path = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(path))
    r = CliRunner().invoke(app, ["metrics", str(path), str(path), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["psnr"] is None and out["identical"] is True and out["ssim"] > 0.999
    r = CliRunner().invoke(app, ["metrics", str(path), str(path)])
    assert r.exit_code == 0 and "identical" in r.stdout
