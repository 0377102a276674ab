"""`molrecon info`: table, JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from molrecon.cli import app
from molrecon.io.ismrmrd import write_ismrmrd
from molrecon.io.types import Geometry, ScanInfo

runner = CliRunner()


@pytest.fixture
def scan_file(tmp_path: Path, rng: np.random.Generator) -> Path:
    """2 slices, 4 coils, Y = 16 at R = 2 with 6 calibration lines, noise scan, 2× readout OS."""
    b, c, y, x = 2, 4, 16, 12
    k = (rng.standard_normal((b, c, 1, y, 2 * x)) + 1j * rng.standard_normal((b, c, 1, y, 2 * x)))
    mask = np.zeros((b, 1, 1, y, 1), dtype=bool)
    mask[..., ::2, :] = True
    mask[..., 5:11, :] = True
    calib = np.zeros_like(mask)
    calib[..., 5:11, :] = True
    geo = Geometry(fov_mm=(240.0, 320.0, 4.0), matrix=(x, y, 1),
                   position=np.array([[0.0, 0.0, -3.0], [0.0, 0.0, 3.0]]),
                   read_dir=np.array([1.0, 0, 0]), phase_dir=np.array([0, 1.0, 0]),
                   slice_dir=np.array([0, 0, 1.0]), slice_spacing_mm=6.0)
    info = ScanInfo(format="ismrmrd", vendor="ACME", model="Z9", field_strength_t=3.0,
                    tr_ms=12.0, te_ms=4.5, protocol="gre_test")
    noise = rng.standard_normal((c, 200)) + 1j * rng.standard_normal((c, 200))
    return write_ismrmrd(tmp_path / "scan.h5", k.astype(np.complex64), mask, kind="2d",
                         geometry=geo, calib=calib, noise=noise, oversampling=2, info=info)


def test_table(scan_file: Path) -> None:
    result = runner.invoke(app, ["info", str(scan_file)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("ismrmrd", "2 slice(s)", "24 × 16 × 1", "12 × 16 × 1", "20.00 × 20.00 × 4.00",
                 "1.45", "6 lines", "prewhitened", "2×", "ACME Z9, 3.00 T", "gre_test",
                 "12.00 / 4.50"):
        assert text in out, text


def test_json(scan_file: Path) -> None:
    result = runner.invoke(app, ["info", str(scan_file), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["shape"] == [2, 4, 1, 16, 12]
    assert data["kind"] == "2d" and data["coils"] == 4 and data["slices"] == 2
    assert data["acceleration"] == pytest.approx(16 / 11, abs=1e-3)
    assert data["acs_size"] == [6]
    assert data["noise_scan"] is True and data["whitened"] is True
    assert data["readout_oversampling"] == 2.0
    assert data["voxel_mm"] == pytest.approx([20.0, 20.0, 4.0])
    assert data["slice_spacing_mm"] == pytest.approx(6.0)
    assert data["orientation_known"] is True
    assert (data["vendor"], data["tr_ms"], data["te_ms"]) == ("ACME", 12.0, 4.5)


def test_warnings_go_to_stderr_not_into_json(scan_file: Path) -> None:
    import h5py

    with h5py.File(scan_file, "a") as f:  # erase the orientation
        table = f["dataset/data"][...]
        for name in ("read_dir", "phase_dir", "slice_dir"):
            table["head"][name] = 0
        f["dataset/data"][...] = table
    result = runner.invoke(app, ["info", str(scan_file), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["orientation_known"] is False
    assert any("zero direction vectors" in w for w in data["warnings"])
    assert "warning:" in result.stderr and "zero direction vectors" in result.stderr


def test_bad_file_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    result = runner.invoke(app, ["info", str(bad)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "bad.h5" in lines[0] and "HDF5" in lines[0]
    assert "Traceback" not in result.output


def test_missing_file_exit_1(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", str(tmp_path / "absent.h5"), "--json"])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr and result.stdout == ""


def test_subprocess_entry_point(scan_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "molrecon", "info", str(scan_file), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["coils"] == 4
