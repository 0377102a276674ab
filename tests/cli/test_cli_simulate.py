"""`molrecon simulate` through typer's CliRunner (small matrices, 4 coils)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from molrecon.cli import app
from molrecon.io.detect import read_raw

runner = CliRunner()
SMALL = ["--matrix", "64", "--coils", "4"]


def test_single_file_with_truth(tmp_path: Path) -> None:
    out, truth = tmp_path / "s.h5", tmp_path / "t.nii.gz"
    result = runner.invoke(app, ["simulate", str(out), *SMALL, "--truth", str(truth),
                                 "--seed", "5", "--acceleration", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "R=3.05" in result.stderr   # 64 / round(64 / 3)
    scan = read_raw(out)
    assert scan.shape == (1, 4, 1, 64, 64) and scan.kind == "2d"
    assert abs(scan.acceleration - 3.0) < 0.05
    img = nib.load(str(truth))
    assert img.shape == (64, 64, 1)
    data = np.asarray(img.dataobj)
    assert data.dtype == np.float32 and data.max() > 0.3


def test_kinds_and_complex_truth(tmp_path: Path) -> None:
    for kind, extra, shape in [("3d", ["--matrix", "32x32x8"], (1, 4, 8, 32, 32)),
                               ("2dt", ["--matrix", "32", "--frames", "4"], (1, 4, 4, 32, 32))]:
        out = tmp_path / f"{kind}.h5"
        truth = tmp_path / f"{kind}.nii"
        result = runner.invoke(app, ["simulate", str(out), "--kind", kind, "--coils", "4",
                                     *extra, "--truth", str(truth), "--complex-truth"])
        assert result.exit_code == 0, result.output
        assert read_raw(out).shape == shape
        assert np.iscomplexobj(np.asarray(nib.load(str(truth)).dataobj))


def test_options_reach_the_library_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from molrecon import sim

    seen: dict[str, object] = {}

    def fake(config: sim.SimulationConfig, out: Path, truth: Path | None, *, force: bool,
             complex_truth: bool) -> sim.SimulatedScan:
        seen.update(config=config, out=out, truth=truth, force=force)
        return sim.simulate(sim.SimulationConfig(matrix=(32, 32), coils=2))

    monkeypatch.setattr(sim, "simulate_to_file", fake)
    result = runner.invoke(app, [
        "simulate", str(tmp_path / "x.h5"), "--kind", "2dt", "--frames", "5", "--matrix", "96x80",
        "--fov", "220x200", "--acceleration", "3", "--mask", "random", "--seed", "9",
        "--noise", "0.01", "--orientation", "coronal", "--tilt", "10", "--acs", "12",
        "--coils", "6", "--anatomy", "colin27", "--thickness", "5", "--position", "0.4",
        "--oversampling", "1", "--force"])
    assert result.exit_code == 0, result.output
    cfg = seen["config"]
    assert isinstance(cfg, sim.SimulationConfig)
    assert (cfg.kind, cfg.n_frames, cfg.grid, cfg.field_of_view) == (
        "2dt", 5, (96, 80, 1), (220.0, 200.0, 5.0))
    assert (cfg.acceleration, cfg.mask, cfg.seed, cfg.noise, cfg.acs, cfg.coils) == (
        3.0, "random", 9, 0.01, 12, 6)
    assert (cfg.orientation, cfg.tilt_deg, cfg.slice_position, cfg.oversampling) == (
        "coronal", 10.0, 0.4, 1)
    assert seen["force"] is True and seen["truth"] is None


@pytest.mark.parametrize("args,hint", [
    (["--kind", "4d"], "--kind"),
    (["--mask", "spiral"], "--mask"),
    (["--matrix", "64xx"], "--matrix"),
    (["--kind", "3d", "--matrix", "64x64"], "--matrix"),
    (["--truth", "t.png"], "--truth"),
    (["--count", "3"], "--count"),
])
def test_usage_errors_exit_2(tmp_path: Path, args: list[str], hint: str) -> None:
    result = runner.invoke(app, ["simulate", str(tmp_path / "u.h5"), *args])
    assert result.exit_code == 2, result.output
    assert hint in result.output
    assert not (tmp_path / "u.h5").exists()


def test_output_or_dataset_but_not_both(tmp_path: Path) -> None:
    assert runner.invoke(app, ["simulate"]).exit_code == 2
    both = runner.invoke(app, ["simulate", str(tmp_path / "a.h5"), "--dataset", str(tmp_path),
                               "--count", "1"])
    assert both.exit_code == 2
    no_count = runner.invoke(app, ["simulate", "--dataset", str(tmp_path / "d")])
    assert no_count.exit_code == 2 and "--count" in no_count.output


@pytest.mark.parametrize("args,option,message", [
    (["--acceleration", "0.5"], "-R", "acceleration must be a number >= 1"),
    (["--acceleration", "16", "--acs", "16"], "-R / --acs", "ACS"),
    (["--anatomy", "unicorn"], "--anatomy", "not one of"),
    (["--coils", "0"], "--coils", "[1, 64]"),
    (["--slices", "3", "--kind", "3d", "--matrix", "32x32x8"], "--slices", "several slices"),
    (["-R", "4,6"], "-R", "one R"),
])
def test_option_value_errors_are_usage_errors_naming_the_option(
        tmp_path: Path, args: list[str], option: str, message: str) -> None:
    """Exit 2 before any work (nothing written), naming the option, as `reconstruct` does."""
    result = runner.invoke(app, ["simulate", str(tmp_path / "e.h5"), *SMALL, *args])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.replace("│", " ").split())   # the error panel's text
    assert f"Invalid value for {option}:" in text and message in text, text
    assert "Traceback" not in result.output
    assert not (tmp_path / "e.h5").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    out.write_bytes(b"old")
    result = runner.invoke(app, ["simulate", str(out), *SMALL])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert out.read_bytes() == b"old"
    result = runner.invoke(app, ["simulate", str(out), *SMALL, "--force"])
    assert result.exit_code == 0, result.output
    assert read_raw(out).shape == (1, 4, 1, 64, 64)


def test_dataset_mode_writes_fully_sampled_files(tmp_path: Path) -> None:
    folder = tmp_path / "val"
    result = runner.invoke(app, ["simulate", "--dataset", str(folder), "--count", "2",
                                 "--split", "val", *SMALL, "--with-truth", "--seed", "1"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest_val.json", "val_0000.h5", "val_0000_truth.nii.gz",
                     "val_0001.h5", "val_0001_truth.nii.gz"]
    assert read_raw(folder / "val_0001.h5").acceleration == 1.0
    manifest = json.loads((folder / "manifest_val.json").read_text())
    assert {f["split"] for f in manifest["files"]} == {"val"}
    bad = runner.invoke(app, ["simulate", "--dataset", str(folder), "--count", "1",
                              "--split", "holdout"])
    assert bad.exit_code == 2


def test_list_anatomy() -> None:
    result = runner.invoke(app, ["simulate", "--list-anatomy"])
    assert result.exit_code == 0, result.output
    assert "colin27" in result.stdout and "inia19" in result.stdout


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from molrecon.cli import app; "
            "r = CliRunner().invoke(app, ['simulate', '--help']); "
            "assert r.exit_code == 0 and '--acceleration' in r.output, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
