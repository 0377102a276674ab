"""The command line as a new user meets it: help, version, demo, reconstruct, bad paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from molrecon.cli import app
from molrecon.cli.demo import example_paths

runner = CliRunner()


def test_help_does_not_import_torch() -> None:
    code = "import sys, molrecon.cli; assert 'torch' not in sys.modules, 'torch imported by --help'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_has_help() -> None:
    for cmd in ("reconstruct", "demo", "info", "simulate", "metrics", "train"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0, (cmd, res.output)
        assert "Usage" in res.output


def test_entry_point_subprocess_version() -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, "-m", "molrecon", "--version"], capture_output=True,
                         text=True, env=env, check=True)
    assert out.stdout.strip().startswith("molrecon ")


def test_reconstruct_zf_and_sense_on_bundled_example(tmp_path: Path) -> None:
    raw, truth = example_paths()
    out_zf = tmp_path / "zf.nii.gz"
    out_sense = tmp_path / "sense.nii.gz"
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["reconstruct", str(raw), str(out_zf), "-m", "zf"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["reconstruct", str(raw), str(out_sense), "-m", "sense",
                              "--report", str(report), "--preview", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    img = nib.load(out_sense)
    assert img.shape[:2] == (256, 256)
    assert np.allclose(img.affine, nib.load(truth).affine, atol=1e-4)
    rep = json.loads(report.read_text())
    assert rep["method"] == "sense" and rep["kind"] == "2d"
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CG-SENSE must beat zero filling on this R = 4 scan.
    from molrecon.metrics import metrics
    assert metrics(str(out_sense), str(truth)).psnr > metrics(str(out_zf), str(truth)).psnr + 1.0


def test_existing_output_needs_force(tmp_path: Path) -> None:
    raw, _ = example_paths()
    out = tmp_path / "o.nii.gz"
    out.write_bytes(b"keep me")
    res = runner.invoke(app, ["reconstruct", str(raw), str(out), "-m", "zf"])
    assert res.exit_code == 1
    assert "already exists" in res.output
    assert out.read_bytes() == b"keep me"
    res = runner.invoke(app, ["reconstruct", str(raw), str(out), "-m", "zf", "--force"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() != b"keep me"


@pytest.mark.parametrize("args, message", [
    (["reconstruct", "{tmp}/missing.h5", "{tmp}/o.nii"], "no such file"),
    (["reconstruct", "{raw}", "{tmp}/nofolder/o.nii"], "does not exist"),
    (["reconstruct", "{raw}", "{tmp}/o.png"], "must end in .nii"),
])
def test_bad_invocations_give_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    raw, _ = example_paths()
    argv = [a.format(tmp=tmp_path, raw=raw) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code == 1, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not list(tmp_path.glob("o.*"))


def test_demo_writes_outputs_and_scores(tmp_path: Path) -> None:
    res = runner.invoke(app, ["demo", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "demo" / "report.json").read_text())
    rows = rep["metrics_vs_truth"]
    best = rep["method"]
    assert rows[best]["psnr"] > rows["zf"]["psnr"]
    assert (tmp_path / "demo" / "preview.png").exists()


def test_impossible_option_values_are_usage_errors(tmp_path: Path) -> None:
    raw, _ = example_paths()
    for extra in (["--device", "tpu"], ["--method", "magic"], ["--max-iter", "0"], ["--tol", "2"],
                  ["--anderson-memory", "0"], ["--method", "sense", "--weights", "mol_2d_lr"]):
        res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "o.nii"), *extra])
        assert res.exit_code == 2, (extra, res.output)
    assert not list(tmp_path.iterdir())


def test_a_bad_model_is_refused_before_the_scan_is_read(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A model file that cannot be used ends the command before the raw file is read."""
    from molrecon.io import detect

    def no_read(*_a: object, **_k: object) -> None:
        raise AssertionError("the scan was read before the model was checked")

    monkeypatch.setattr(detect, "read_raw", no_read)
    raw, _ = example_paths()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "o.nii"), "--weights",
                              str(bad)])
    assert res.exit_code == 1 and "bad.pt" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o.nii").exists()


def test_reconstruct_passes_its_options_to_the_job_exactly(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The command is a thin layer: every option lands in the job's arguments unchanged."""
    from types import SimpleNamespace

    from molrecon import jobs
    from molrecon.recon import ReconConfig

    raw, _ = example_paths()
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []

    def fake_job(*args: object, **kwargs: object) -> tuple[object, list[str]]:
        calls.append((args, kwargs))
        report = {"kind": "2d", "wall_time_s": 0.0, "device": "cpu", "method": "sense"}
        return SimpleNamespace(report=report), []

    monkeypatch.setattr(jobs, "reconstruct_file", fake_job)
    out, rep, png = tmp_path / "o.nii.gz", tmp_path / "r.json", tmp_path / "p.png"
    res = runner.invoke(app, [
        "reconstruct", str(raw), str(out), "-m", "sense", "--device", "cpu", "--max-iter", "7",
        "--tol", "0.001", "--alpha", "0.5", "--cg-iters", "4", "--solver", "plain",
        "--anderson-memory", "9", "--sense-lambda", "0.01", "--sense-iters", "12", "--espirit-crop", "0.5",
        "--batch-size", "2", "--coils", "4",
        "--coil-compression", "scc", "--complex", "--report", str(rep), "--preview", str(png),
        "--compare", "--force", "-q"])
    assert res.exit_code == 0, res.output
    ((args, kwargs),) = calls
    assert args == (raw, out, ReconConfig(
        method="sense", weights=None, device="cpu", max_iter=7, tol=0.001, alpha=0.5,
        solver="plain", anderson_memory=9, cg_iters=4, sense_lambda=0.01, sense_iters=12, espirit_crop=0.5,
        batch_size=2,
        keep_baselines=True, coils=4, coil_compression="scc", maps=None))
    assert kwargs == {"fmt": "nifti", "complex_out": True, "force": True, "preview": png,
                      "report": rep, "dataset": None, "progress": kwargs["progress"]}
    assert callable(kwargs["progress"])
    # --ensemble (MOL only, like --compile and --precision)
    res = runner.invoke(app, ["reconstruct", str(raw), str(out), "--ensemble", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert calls[-1][0][2].ensemble == 2 and calls[-1][0][2].method == "mol"
    # --lam: auto (the default), fixed or a number (MOL only)
    assert calls[-1][0][2].lam == "auto"
    for value, want in (("fixed", "fixed"), ("12.5", 12.5)):
        res = runner.invoke(app, ["reconstruct", str(raw), str(out), "--lam", value, "-q"])
        assert res.exit_code == 0, res.output
        assert calls[-1][0][2].lam == want
    n = len(calls)
    for bad in (["--lam", "big"], ["--lam", "0"], ["--lam", "inf"], ["--lam", "1e-50"],
                ["-m", "sense", "--lam", "5"]):
        res = runner.invoke(app, ["reconstruct", str(raw), str(out), *bad, "-q"])
        assert res.exit_code == 2 and "--lam" in res.output + (res.stderr or "")
    assert len(calls) == n                        # nothing ran
