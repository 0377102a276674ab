"""Numerical faults, memory planning and determinism of the reconstruction.

Behaviours pinned here (each one is stated in docs/GUARANTEES.md):

* MOL stopped by ``--max-iter`` before ``--tol``: one warning line, the image is
  still written, and the report says ``converged: false`` with the residual.
* A dead coil (no signal, no noise) changes nothing: the image equals the one
  made without that coil; prewhitening is skipped with a warning (recorded in
  the report).
* Too little calibration data for ESPIRiT: refused with a one-line error (no
  silent fallback).
* Intensity scale: data ×1e−12 or ×1e12 give the same image times the factor,
  finite; scaling data and noise together leaves the (noise-whitened) image
  unchanged.
* The same input, weights and device give bit-identical NIfTI data on the CPU.
* :mod:`molrecon.memory`: the memory model and the batch planner.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner, Result

from _builders import write_raw_table
from conftest import message_lines
from molrecon.cli import app
from molrecon.deq import MolConfig
from molrecon.errors import ConfigError, ResourceError
from molrecon.memory import (
    ANDERSON_MEMORY,
    COMPLEX_BYTES,
    available_memory_bytes,
    estimate_recon_memory,
    plan_batches,
)
from molrecon.models import CNNConfig, MolCNN, save_checkpoint
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()
NOISE_BIT = np.uint64(1 << 18)
CAL_BITS = np.uint64((1 << 19) | (1 << 20))
COILS = 4



# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(32, 32), coils=COILS, acceleration=2.0,
                                      acs=12, seed=11), path)
    return path


@pytest.fixture(scope="module")
def parts(scan_file: Path) -> tuple[str, np.ndarray]:
    with h5py.File(scan_file, "r") as f:
        return bytes(f["dataset/xml"][0]).decode(), f["dataset/data"][...]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.95)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model,
                           MolConfig(alpha=1.0, lam=50.0, cg_iters=3))


def is_noise(table: np.ndarray) -> np.ndarray:
    return (table["head"]["flags"] & NOISE_BIT) != 0


def map_samples(table: np.ndarray, rows: np.ndarray,
                fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A copy of ``table`` with ``fn`` applied to the complex (C, Ns) samples of ``rows``."""
    out = table.copy()
    for i in rows:
        s = np.array(out["data"][i], dtype=np.float32).view(np.complex64).reshape(COILS, -1)
        new = np.ascontiguousarray(fn(s), dtype=np.complex64)
        out["data"][i] = new.reshape(-1).view(np.float32)
    return out


def drop_coil(table: np.ndarray, coil: int) -> np.ndarray:
    """The same acquisitions without one receive channel."""
    out = table.copy()
    keep = [c for c in range(COILS) if c != coil]
    for i in range(out.size):
        s = np.array(out["data"][i], dtype=np.float32).view(np.complex64).reshape(COILS, -1)
        out["data"][i] = np.ascontiguousarray(s[keep]).reshape(-1).view(np.float32)
    out["head"]["active_channels"] = COILS - 1
    out["head"]["available_channels"] = COILS - 1
    return out


def recon(path: Path, out: Path, *extra: object) -> tuple[Result, np.ndarray, dict[str, Any]]:
    """Run ``molrecon reconstruct`` with a report; return (result, image, report)."""
    import nibabel as nib

    report = out.with_suffix(".json")
    result = runner.invoke(app, ["reconstruct", str(path), str(out), "--report", str(report),
                                 *[str(e) for e in extra]])
    assert result.exit_code == 0, result.output
    image = np.asarray(nib.load(str(out)).dataobj)
    return result, image, json.loads(report.read_text())


def warning_lines(result: Result) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------- non-convergence
def test_iteration_cap_warns_reports_and_still_writes(scan_file: Path, weights: Path,
                                                      tmp_path: Path) -> None:
    capped, image, rep = recon(scan_file, tmp_path / "capped.nii", "--method", "mol",
                               "--weights", weights, "--max-iter", "1")
    lines = warning_lines(capped)
    assert len(lines) == 1 and "did not reach --tol 0.0001 within --max-iter 1" in lines[0]
    assert rep["converged"] is False and rep["iterations"] == 1
    assert rep["final_residual"] > 1e-4
    assert rep["warnings"] == [lines[0].split(": ", 2)[2]]
    assert np.isfinite(image).all() and image.max() > 0
    # Without the cap the same data converge, with no warning.
    done, full, rep2 = recon(scan_file, tmp_path / "full.nii", "--method", "mol", "--weights",
                             weights)
    assert warning_lines(done) == []
    assert rep2["converged"] is True and 1 < rep2["iterations"] <= 100
    assert rep2["final_residual"] <= 1e-4 and "warnings" not in rep2
    # One step from the SENSE start is already close to the fixed point.
    assert rel_diff(image, full) < 0.5


# --------------------------------------------------------------------------- dead coil
def test_dead_coil_equals_the_scan_without_it(parts: tuple[str, np.ndarray],
                                              tmp_path: Path) -> None:
    """No signal and no noise in coil 2: same image as without coil 2; no prewhitening."""
    xml, table = parts
    silent = map_samples(table, np.arange(table.size),
                         lambda s: np.where(np.arange(COILS)[:, None] == 2, 0, s))
    dead, img_dead, rep_dead = recon(write_raw_table(tmp_path / "dead.h5", xml, silent),
                                     tmp_path / "dead.nii", "--method", "sense")
    lines = warning_lines(dead)
    assert len(lines) == 1 and "not positive definite" in lines[0]
    assert rep_dead["prewhitened"] is False
    assert any("not prewhitened" in w for w in rep_dead["warnings"])
    assert np.isfinite(img_dead).all()
    # Reference: the scan without that coil, and (to compare like with like) without noise
    # acquisitions, since the dead-coil scan could not be prewhitened either.
    signal = table[~is_noise(table)]
    _, img_ref, rep_ref = recon(write_raw_table(tmp_path / "three.h5", xml, drop_coil(signal, 2)),
                                tmp_path / "three.nii", "--method", "sense")
    assert rep_ref["shape_bcdyx"][1] == COILS - 1 and rep_dead["shape_bcdyx"][1] == COILS
    assert rel_diff(img_dead, img_ref) < 1e-3


# --------------------------------------------------------------------------- calibration
def _thin(table: np.ndarray) -> np.ndarray:
    """Every other line only, no calibration flags: the ACS block is 1 line wide."""
    ky = table["head"]["idx"]["kspace_encode_step_1"]
    thin = table[is_noise(table) | (ky % 2 == 0)].copy()
    thin["head"]["flags"] &= ~CAL_BITS
    return thin


def test_too_little_calibration_is_refused(parts: tuple[str, np.ndarray], tmp_path: Path) -> None:
    xml, table = parts
    path = write_raw_table(tmp_path / "thin.h5", xml, _thin(table))
    out = tmp_path / "thin.nii"
    result = runner.invoke(app, ["reconstruct", str(path), str(out), "--method", "sense"])
    assert result.exit_code == 1
    lines = message_lines(result.stderr)
    assert len(lines) == 1
    assert re.search(r"calibration region \(1×\d+\) is smaller than the 6×6 ESPIRiT kernel",
                     lines[0]), lines[0]
    assert not out.exists()
    # zf needs no coil maps: the same file reconstructs.
    _, image, _ = recon(path, tmp_path / "zf.nii", "--method", "zf")
    assert np.isfinite(image).all() and image.max() > 0


def test_too_little_calibration_error_names_the_file(parts: tuple[str, np.ndarray],
                                                     tmp_path: Path) -> None:
    xml, table = parts
    path = write_raw_table(tmp_path / "thin.h5", xml, _thin(table))
    result = runner.invoke(app, ["reconstruct", str(path), str(tmp_path / "x.nii"),
                                 "--method", "sense"])
    assert result.exit_code == 1 and str(path) in result.stderr


# --------------------------------------------------------------------------- intensity scale
@pytest.mark.parametrize("factor", [1e-12, 1e12])
def test_extreme_intensity_scales_with_the_data(parts: tuple[str, np.ndarray], tmp_path: Path,
                                                factor: float, weights: Path) -> None:
    xml, table = parts
    _, base, _ = recon(write_raw_table(tmp_path / "base.h5", xml, table), tmp_path / "base.nii",
                       "--method", "sense")
    signal = np.flatnonzero(~is_noise(table))
    scaled = write_raw_table(tmp_path / "scaled.h5", xml,
                       map_samples(table, signal, lambda s: s * np.float32(factor)))
    _, image, _ = recon(scaled, tmp_path / "scaled.nii", "--method", "sense")
    assert np.isfinite(image).all()
    assert rel_diff(image / factor, base) < 1e-4
    # Noise scaled too: prewhitened data (noise σ units) do not change at all.
    both = write_raw_table(tmp_path / "both.h5", xml,
                     map_samples(table, np.arange(table.size), lambda s: s * np.float32(factor)))
    _, same, _ = recon(both, tmp_path / "both.nii", "--method", "sense")
    assert rel_diff(same, base) < 1e-4
    # MOL normalises before the network: the learned prior sees the same input.
    _, mol_base, _ = recon(tmp_path / "base.h5", tmp_path / "mol_base.nii", "--method", "mol",
                           "--weights", weights)
    _, mol_scaled, _ = recon(scaled, tmp_path / "mol_scaled.nii", "--method", "mol",
                             "--weights", weights)
    assert np.isfinite(mol_scaled).all()
    assert rel_diff(mol_scaled / factor, mol_base) < 1e-3


# --------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("method", ["sense", "mol"])
def test_same_input_same_output_bit_for_bit(scan_file: Path, weights: Path, tmp_path: Path,
                                            method: str) -> None:
    extra: list[object] = ["--method", method, "--device", "cpu"]
    if method == "mol":
        extra += ["--weights", weights]
    _, first, rep1 = recon(scan_file, tmp_path / "a.nii", *extra)
    _, second, rep2 = recon(scan_file, tmp_path / "b.nii", *extra)
    assert first.dtype == np.float32 and first.tobytes() == second.tobytes()
    assert (tmp_path / "a.nii").read_bytes() == (tmp_path / "b.nii").read_bytes()
    if method == "mol":
        assert rep1["iterations_per_item"] == rep2["iterations_per_item"]
        assert rep1["weights_sha256"] == rep2["weights_sha256"]


# --------------------------------------------------------------------------- memory model
SHAPE = (12, 8, 1, 256, 256)  # 12 slices, 8 coils, 256²


def test_memory_model_terms_by_hand() -> None:
    b, c, d, y, x = SHAPE
    n = d * y * x
    e, i = 3 * c * n, 3 * n  # batch of 3
    cb = COMPLEX_BYTES
    zf = estimate_recon_memory(SHAPE, "2d", "zf", "cuda", batch_size=3)
    assert zf == 2 * e * cb + i * cb
    sense = estimate_recon_memory(SHAPE, "2d", "sense", "cuda", batch_size=3)
    espirit = 3 * cb * min(1 << 24, 3 * y * x * c * c)
    solve = 3 * e * cb + 5 * i * cb + 2 * e * cb
    assert sense == 2 * e * cb + max(espirit, solve)
    # On the CPU the scan and the output are resident, the batch is a view of the scan.
    cpu = estimate_recon_memory(SHAPE, "2d", "sense", "cpu", batch_size=3)
    assert cpu == sense - e * cb + (b * c * n + b * n) * cb
    cnn = 3 * 2 * 64 * n * 4
    for m in (ANDERSON_MEMORY, 1, 12):  # Anderson keeps m iterates and m residuals
        mol = estimate_recon_memory(SHAPE, "2d", "mol", "cuda", batch_size=3, cnn_channels=64,
                                    anderson_memory=m)
        solve_mol = 3 * e * cb + 5 * i * cb + (2 * m + 4) * i * cb + max(2 * e * cb, cnn)
        assert mol == 2 * e * cb + max(espirit, solve_mol)
    # A wide prior makes the solve phase the peak.
    wide = estimate_recon_memory(SHAPE, "2d", "mol", "cuda", batch_size=3, cnn_channels=512)
    assert wide == (2 * e * cb + 3 * e * cb + (2 * ANDERSON_MEMORY + 9) * i * cb
                    + 3 * 2 * 512 * n * 4)
    with pytest.raises(ConfigError, match="anderson_memory"):
        estimate_recon_memory(SHAPE, "2d", "mol", "cuda", anderson_memory=0)


def test_memory_model_grows_with_batch_coils_and_method() -> None:
    by_batch = [estimate_recon_memory(SHAPE, "2d", "mol", "cuda", batch_size=k)
                for k in range(1, 13)]
    assert all(a < b for a, b in itertools.pairwise(by_batch))
    assert estimate_recon_memory(SHAPE, "2d", "mol", "cuda") == by_batch[-1]
    more_coils = estimate_recon_memory((12, 32, 1, 256, 256), "2d", "mol", "cuda", batch_size=4)
    assert more_coils > by_batch[3]
    zf, sense, mol = (estimate_recon_memory(SHAPE, "2d", m, "cuda", batch_size=4)
                      for m in ("zf", "sense", "mol"))
    assert zf < sense <= mol  # equal while ESPIRiT's workspace is the peak of both
    zf, sense, mol = (estimate_recon_memory(SHAPE, "2d", m, "cuda", batch_size=12)
                      for m in ("zf", "sense", "mol"))
    assert zf < sense < mol
    # 2D+time maps are shared by the frames: less than a 3D volume of the same size.
    assert (estimate_recon_memory((1, 8, 16, 128, 128), "2dt", "sense", "cuda")
            < estimate_recon_memory((1, 8, 16, 128, 128), "3d", "sense", "cuda"))
    # A 256² 8-coil MOL slice with a 64-channel prior: between 50 MiB and 1 GiB.
    assert 50 * 2**20 < by_batch[0] < 2**30


@pytest.mark.parametrize("bad", [
    {"shape_bcdyx": (1, 8, 256, 256)}, {"shape_bcdyx": (1, 0, 1, 8, 8)}, {"kind": "4d"},
    {"method": "admm"}, {"device_type": "tpu"}, {"cnn_channels": 0}])
def test_memory_model_rejects_nonsense(bad: dict[str, Any]) -> None:
    args: dict[str, Any] = {"shape_bcdyx": SHAPE, "kind": "2d", "method": "sense",
                            "device_type": "cpu"}
    args.update(bad)
    with pytest.raises(ConfigError):
        estimate_recon_memory(**args)


def test_plan_batches_picks_the_largest_batch_that_fits() -> None:
    def need(k: int) -> int:
        return estimate_recon_memory(SHAPE, "2d", "mol", "cuda", batch_size=k)

    assert plan_batches(SHAPE, "2d", "mol", "cuda", available=10 * need(12)) == 12
    for k in (1, 4, 7, 11):
        # Exactly need(k) plannable after the 20 % reserve.
        available = int(need(k) / 0.8) + 1
        assert plan_batches(SHAPE, "2d", "mol", "cuda", available=available) == k
        assert plan_batches(SHAPE, "2d", "mol", "cuda", available=available, reserve=0.0) >= k


def test_plan_batches_refuses_and_names_what_would_fit() -> None:
    one = estimate_recon_memory(SHAPE, "2d", "sense", "cuda", batch_size=1)
    available = int(one * 0.5)
    with pytest.raises(ResourceError) as err:
        plan_batches(SHAPE, "2d", "sense", "cuda", available=available)
    message = err.value.message
    assert "needs about" in message and "GiB on the GPU" in message
    assert "coils would fit" in message and "--device cpu" in message
    fitting = int(message.split("at most ")[1].split(" coils")[0])
    assert 1 <= fitting < SHAPE[1]
    budget = int(available * 0.8)
    assert estimate_recon_memory((12, fitting, 1, 256, 256), "2d", "sense", "cuda",
                                 batch_size=1) <= budget
    assert estimate_recon_memory((12, fitting + 1, 1, 256, 256), "2d", "sense", "cuda",
                                 batch_size=1) > budget
    with pytest.raises(ResourceError, match="not even one coil"):
        plan_batches(SHAPE, "2d", "sense", "cpu", available=1 << 20)


def test_available_memory_reads_meminfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from molrecon import memory

    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\n"
                    "MemAvailable:    2097152 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", fake)
    assert available_memory_bytes("cpu") == 2097152 * 1024
    # plan_batches measures when not told: 2 GiB plans only part of a large CPU job.
    big = (48, 8, 1, 256, 256)
    planned = plan_batches(big, "2d", "mol", "cpu")
    assert 1 <= planned < 48
    assert (estimate_recon_memory(big, "2d", "mol", "cpu", batch_size=planned)
            <= 0.8 * 2097152 * 1024)
    fake.write_text("MemTotal: 1 kB\n")  # no MemAvailable line: fall back to sysconf
    value = available_memory_bytes("cpu")
    assert value is None or value > 0


def test_available_memory_on_cuda_counts_the_allocator_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 << 30, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 << 30)
    assert available_memory_bytes("cuda") == 4 << 30
    assert available_memory_bytes(torch.device("cuda", 0)) == 4 << 30
    with pytest.raises(ConfigError):
        available_memory_bytes("tpu")
