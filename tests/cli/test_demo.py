"""`molrecon demo`: reruns replace the demo's own outputs, never anything else; a missing GPU
is reported before any folder is made."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from molrecon.cli import app

runner = CliRunner()


def test_foreign_files_are_not_replaced_without_force(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "preview.png").write_bytes(b"someone else's picture")
    res = runner.invoke(app, ["demo", str(out), "--device", "cpu"])
    assert res.exit_code == 1 and "preview.png" in res.output and "--force" in res.output
    assert (out / "preview.png").read_bytes() == b"someone else's picture"
    assert sorted(p.name for p in out.iterdir()) == ["preview.png"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_gpu_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", str(out), "--device", "cuda"])
    assert res.exit_code == 1 and "no CUDA GPU" in res.output
    assert not out.exists()


def test_a_rerun_replaces_the_demos_own_outputs(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".molrecon-demo").write_text("earlier demo\n")
    (out / "report.json").write_text("{}")                 # an earlier demo's output
    res = runner.invoke(app, ["demo", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert (out / "report.json").stat().st_size > 100
    assert {"mol.nii.gz", "preview.png", "report.json", ".molrecon-demo"} <= {
        p.name for p in out.iterdir()}
