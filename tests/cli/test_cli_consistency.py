"""Day-one consistency of the command line: the same option spelled the same way in every
command, option-value errors as usage errors (exit 2) that name the option, help text
without typer's `{arg}` / `<bool>` artefacts, `train --resume` refusing changed options,
the time budget's look-ahead, and one-line errors for a full disk and an existing output."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner, Result

import molrecon.train as train_mod
import molrecon.train.loop as train_loop
from molrecon.atomic import check_output
from molrecon.cli import app
from molrecon.cli._common import ACCEL_HELP, os_error_line
from molrecon.errors import OutputError
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import OPTION_NAMES, TrainConfig, next_step_fits, output_paths, resume_changes
from molrecon.train.config import _plain

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("reconstruct", "demo", "info", "simulate", "metrics", "train", "check-lipschitz",
            "robustness", "models")


def flat(result: Result) -> str:
    """The output with the error panel's frame removed and whitespace collapsed."""
    return " ".join(result.output.replace("│", " ").split())


def usage_error(result: Result, option: str) -> str:
    assert result.exit_code == 2, result.output
    text = flat(result)
    assert f"Invalid value for {option}:" in text, text
    return text


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three fully sampled 48×48 4-coil scans."""
    d = tmp_path_factory.mktemp("consistency") / "data"
    d.mkdir()
    for i in range(3):
        simulate_to_file(SimulationConfig(matrix=(48, 48), coils=4, acceleration=1.0, seed=i,
                                          slice_position=0.35 + 0.08 * i), d / f"s{i}.h5")
    return d


class Captured(Exception):
    """Raised by a stand-in for the real work once the command has built its arguments."""


def capture_train(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    seen: list[TrainConfig] = []

    def fake(config: TrainConfig, **_: Any) -> Any:
        seen.append(config)
        raise typer.Exit(0)

    monkeypatch.setattr(train_mod, "train", fake)
    return seen


# ----------------------------------------------------------------------------- 1. --data
def test_robustness_takes_data_like_check_lipschitz(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    import molrecon.cli.guarantees as lip

    seen: list[Any] = []

    def fake(model: Path, data: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(data)
        raise typer.Exit(0)

    monkeypatch.setattr(lip, "_model_and_problems", fake)
    scan = tmp_path / "scan.h5"
    for args in (["--data", str(scan)], ["-d", str(scan)], [str(scan)]):   # the positional stays
        r = runner.invoke(app, ["robustness", "mol_2d_lr", *args])
        assert r.exit_code == 0, r.output
    assert seen == [[scan]] * 3
    r = runner.invoke(app, ["robustness", "mol_2d_lr", "--data", str(scan), "-d", str(scan)])
    assert r.exit_code == 0 and seen[-1] == [scan, scan]            # repeatable, as there
    r = runner.invoke(app, ["check-lipschitz", "mol_2d_lr", "--data", str(scan)])
    assert r.exit_code == 0 and seen[-1] == [scan]
    usage_error(runner.invoke(app, ["robustness", "mol_2d_lr", str(scan), "--data", str(scan)]),
                "--data")
    for command in ("robustness", "check-lipschitz"):
        text = flat(runner.invoke(app, [command, "--help"]))
        assert f"Usage: molrecon {command} [OPTIONS] MODEL " in text + " "
        assert "--data -d FILE" in text


# ----------------------------------------------------------------------------- 2. -R, --mask
def test_acceleration_and_mask_read_alike_in_simulate_and_train(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for command in ("simulate", "train"):
        text = flat(runner.invoke(app, [command, "--help"], terminal_width=200))
        assert "--acceleration -R R " in text and ACCEL_HELP in text, text
        assert "comma list like 4,6" in text and "comma list like equispaced,random" in text
    seen = capture_train(monkeypatch)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"),
                            "-R", "4,6", "--mask", "equispaced, random"])
    assert r.exit_code == 0, r.output
    assert seen[0].mask.all_accelerations() == (4.0, 6.0)
    assert seen[0].mask.family == "equispaced,random"
    usage_error(runner.invoke(app, ["train", "--data", str(tmp_path), "--out",
                                    str(tmp_path / "m.pt"), "-R", "4,0.5"]), "-R")
    usage_error(runner.invoke(app, ["train", "--data", str(tmp_path), "--out",
                                    str(tmp_path / "m.pt"), "--mask", "equispaced,spiral"]),
                "--mask")
    # simulate writes one mask: one value, the same syntax and message otherwise.
    text = usage_error(runner.invoke(app, ["simulate", str(tmp_path / "s.h5"), "-R", "4,6"]),
                       "-R")
    assert "one R" in text
    usage_error(runner.invoke(app, ["simulate", str(tmp_path / "s.h5"), "-R", "4,0.5"]), "-R")
    assert not (tmp_path / "s.h5").exists()


# ----------------------------------------------------------------------------- 3. exit 2
@pytest.mark.parametrize(("args", "option"), [
    (["simulate", "OUT", "--coils", "0"], "--coils"),
    (["simulate", "OUT", "--noise", "-1"], "--noise"),
    (["simulate", "OUT", "--position", "2"], "--position"),
    (["simulate", "OUT", "--kind", "3d", "--mask", "interleaved"], "--mask"),
    (["simulate", "--dataset", "DIR", "--count", "0"], "--count"),
    (["simulate", "--dataset", "DIR", "--count", "2", "--orientation", "coronal"],
     "--orientation / --tilt"),
    (["reconstruct", "IN", "OUT", "--ensemble", "3"], "--ensemble"),
    (["reconstruct", "IN", "OUT", "-m", "sense", "--ensemble", "2"], "--ensemble"),
    (["train", "--cg-iters", "0"], "--cg-iters"),
    (["train", "--alpha", "2.5"], "--alpha"),
    (["train", "--val-fraction", "1"], "--val-fraction"),
    (["train", "--constraint", "xy"], "--constraint"),
    (["train", "--out", "OUT"], "--out"),
    (["train", "--override"], "--override"),
    (["check-lipschitz", "mol_2d_lr", "--points", "0"], "--points"),
    (["check-lipschitz", "mol_2d_lr", "--tol", "2"], "--tol"),
    (["check-lipschitz", "mol_2d_lr", "--device", "tpu"], "--device"),
    (["robustness", "mol_2d_lr", "--steps", "-1"], "--steps"),
    (["robustness", "mol_2d_lr", "--eps", "0"], "--eps"),
    (["robustness", "mol_2d_lr", "--eps", "0.01,0.01"], "--eps"),
])
def test_option_value_errors_are_usage_errors_naming_the_option(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], option: str) -> None:
    capture_train(monkeypatch)                 # a train command that got this far would exit 0
    args = [str(tmp_path / "x.h5") if a == "OUT" else str(tmp_path / "d") if a == "DIR" else a
            for a in args]
    if args[0] == "train":
        args = ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt"), *args[1:]]
    usage_error(runner.invoke(app, args), option)
    assert list(tmp_path.iterdir()) == []      # checked before any work


# ----------------------------------------------------------------------------- 4. defaults
def test_train_defaults_to_the_bundled_models_cg_iterations(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    seen = capture_train(monkeypatch)
    r = runner.invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 0, r.output
    assert seen[0].cg_iters == 10 and seen[0].mask.acs == 16
    text = flat(runner.invoke(app, ["train", "--help"], terminal_width=200))
    assert "fixed count" in text and "8 % of the phase lines" in text          # --acs, both
    text = flat(runner.invoke(app, ["simulate", "--help"], terminal_width=200))
    assert "8 % of the phase lines" in text and "`train` uses a fixed 16" in text


# ----------------------------------------------------------------------------- 5. help text
@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_no_typer_artefacts(command: str) -> None:
    r = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    usage = next(line for line in r.output.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage
    assert "<bool>" not in r.output


def test_root_help_has_no_bool_metavar() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "<bool>" not in r.output


def test_every_train_option_has_help_and_the_log_is_explained() -> None:
    command = typer.main.get_command(app).commands["train"]    # type: ignore[attr-defined]
    undocumented = [p.name for p in command.params if not (getattr(p, "help", "") or "").strip()]
    assert undocumented == []
    text = flat(runner.invoke(app, ["train", "--help"], terminal_width=200))
    for needle in ("DEQ it F/B", "forward / backward fixed-point iterations", "L̂",
                   "local Lipschitz"):
        assert needle in text, needle


def test_argument_metavars() -> None:
    for command, usage in (("metrics", "RECON REF"), ("simulate", "[OUT.h5]"),
                           ("check-lipschitz", "MODEL")):
        r = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert f"Usage: molrecon {command} [OPTIONS] {usage}" in r.output, r.output


# ----------------------------------------------------------------------------- 6. resume
def test_resume_refuses_changed_options_unless_overridden(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    base = ["train", "--data", str(folder), "--out", str(out), "--layers", "3", "--channels",
            "8", "--acs", "8", "--mask", "equispaced,random", "-R", "3,4", "--device", "cpu",
            "--val-fraction", "0", "--checkpoint-every", "1", "--cg-iters", "3", "-q"]
    r = runner.invoke(app, [*base, "--max-steps", "1", "--time-budget", "600"])
    assert r.exit_code == 0, r.output
    # Identical options (the campaign's case): resumes, saying from where.
    r = runner.invoke(app, [*base, "--max-steps", "2", "--time-budget", "300", "--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming at step 1 of 2 (" in r.stderr and "trained so far" in r.stderr, r.stderr
    assert "after 2 steps" in r.stderr
    # A changed --mask: refused in one line naming it with both values; nothing written.
    state = output_paths(out)["state"]
    before = state.read_bytes()
    r = runner.invoke(app, [*base[:11], "--mask", "random", *base[13:], "--max-steps", "3",
                            "--resume", "--lr", "2e-4"])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert "--mask equispaced,random → random" in lines[0] and "--lr 0.0001 → 0.0002" in lines[0]
    assert "--override" in lines[0] and "-R" not in lines[0].split("(")[0]
    assert state.read_bytes() == before
    # The network's shape never changes on resume, --override or not.
    r = runner.invoke(app, [*base, "--channels", "4", "--max-steps", "3", "--resume",
                            "--override"])
    assert r.exit_code == 1 and "--channels 8 → 4" in r.stderr, r.stderr
    # --override: continues with the new values, warning about them; the new lr applies.
    r = runner.invoke(app, [*base[:11], "--mask", "random", *base[13:], "--max-steps", "3",
                            "--resume", "--lr", "2e-4", "--override"])
    assert r.exit_code == 0, r.output
    assert ("warning: resuming with changed options (--override): --lr 0.0001 → 0.0002; "
            "--mask equispaced,random → random") in r.stderr, r.stderr
    saved = torch.load(state, weights_only=True)
    assert saved["config"]["mask"]["family"] == "random" and saved["steps"] == 3
    assert saved["optim"]["param_groups"][0]["lr"] == pytest.approx(2e-4)


def test_resume_changes_names_options_and_ignores_free_ones(folder: Path, tmp_path: Path
                                                            ) -> None:
    config = TrainConfig(data=str(folder), out=str(tmp_path / "m.pt"), time_budget_s=10.0)
    saved = _plain(asdict(config))
    same = TrainConfig(data=str(folder) + "/", out=str(tmp_path / "m.pt"), time_budget_s=99.0,
                       max_steps=5, val_every=3, checkpoint_every=7, device="cpu",
                       resume=True, init_weights="mol_2d_lr", lam_init=5.0)
    assert resume_changes(saved, same) == []
    other = TrainConfig(data=str(folder), out=str(tmp_path / "m.pt"), cg_iters=5,
                        mask=train_mod.MaskSpec(acceleration=4.0, accelerations=(4.0, 6.0)))
    assert [str(c) for c in resume_changes(saved, other)] == ["--cg-iters 10 → 5", "-R 4 → 4,6"]
    assert all(option.startswith("-") for option in OPTION_NAMES.values())


def _campaign_copy(tmp_path: Path, script: str) -> tuple[Path, Callable[[str, str], list[str]]]:
    """A copy of a campaign script (and what it sources) in a bare repository, and a runner
    of its stages through a stand-in for `molrecon` that returns the arguments it got."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in (script, "campaign_common.sh"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts")
    fake = tmp_path / "molrecon"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done > "$ARGS_FILE"\n')
    fake.chmod(0o755)

    def run(stage: str, secs: str) -> list[str]:
        env = {**os.environ, "MOL": str(fake), "ARGS_FILE": str(tmp_path / "args")}
        subprocess.run(["bash", str(root / "scripts" / script), stage, secs],
                       env=env, check=True, timeout=60)
        return (tmp_path / "args").read_text().splitlines()

    return root, run


def test_the_campaign_script_resumes_its_committed_state(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    """scripts/campaign_2d.sh passes the same options on every resume: run it with a stand-in
    for `molrecon` that records its arguments, parse them as `train` does, and compare them
    with the committed stage-0 state (and stage 1's first run with its resume)."""
    root, args = _campaign_copy(tmp_path, "campaign_2d.sh")

    seen = capture_train(monkeypatch)

    def config(argv: list[str]) -> TrainConfig:
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, r.output
        return seen[-1]

    committed = ROOT / "campaign" / "2d_lr" / "s0b.state.pt"
    if committed.is_file():
        (root / "runs" / "s0b").mkdir(parents=True)
        shutil.copy(committed, root / "runs" / "s0b" / "s0b.state.pt")
        argv = args("stage0", "540")
        assert "--resume" in argv
        saved = torch.load(committed, weights_only=True)["config"]
        assert resume_changes(saved, config(argv)) == []
    # the stages resumed last (0y, 0z on a deeper network, and 1r at the bound by projection)
    # resume their committed state
    for stage, name in (("stage0y", "s0y"), ("stage0z", "s0z"), ("stage1r", "s1r")):
        committed = ROOT / "campaign" / "2d_lr" / f"{name}.state.pt"
        if committed.is_file():
            (root / "runs" / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(committed, root / "runs" / name / f"{name}.state.pt")
            argv = args(stage, "600")
            assert "--resume" in argv
            saved = torch.load(committed, weights_only=True)["config"]
            assert resume_changes(saved, config(argv)) == []
    first = config(args("stage1", "300"))
    (root / "runs" / "s1lr" / "s1lr.state.pt").write_bytes(b"")
    again = args("stage1", "900")
    assert "--resume" in again
    assert resume_changes(_plain(asdict(first)), config(again)) == []


@pytest.mark.parametrize("script, stage, keep", [("campaign_2dt.sh", "t0a", "2dt_lr"),
                                                  ("campaign_3d.sh", "v0a", "3d_lr")])
def test_the_3d_prior_campaign_scripts_resume_with_the_options_they_started_with(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, script: str, stage: str,
        keep: str) -> None:
    """scripts/campaign_2dt.sh and campaign_3d.sh, as the 2D campaign's test: the stage
    parses as `train` (denoising blocks of 8 frames or partitions), a resume passes the
    same options, and so does a resume of the committed state."""
    root, run = _campaign_copy(tmp_path, script)

    seen = capture_train(monkeypatch)

    def config(argv: list[str]) -> TrainConfig:
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, r.output
        return seen[-1]

    first = config(run("stage0a", "600"))
    assert first.stage == "denoise" and first.patch.depth == 8 and first.skip
    state = root / "runs" / stage / f"{stage}.state.pt"
    state.write_bytes(b"")
    again = run("stage0a", "900")
    assert "--resume" in again
    assert resume_changes(_plain(asdict(first)), config(again)) == []
    committed = ROOT / "campaign" / keep / f"{stage}.state.pt"
    if committed.is_file():
        saved = torch.load(committed, weights_only=True)["config"]
        assert resume_changes(saved, config(again)) == []


# ----------------------------------------------------------------------------- 7. time budget
def test_next_step_fits_counts_the_slowest_recent_step_validation_and_save() -> None:
    assert next_step_fits(0.0, 10.0, [])
    assert not next_step_fits(10.5, 10.0, [])
    assert next_step_fits(5.0, 10.0, [1.0, 3.0, 2.0], 2.0)          # 5 + 3 + 2 = 10
    assert not next_step_fits(5.0, 10.0, [1.0, 3.5, 2.0], 2.0)
    assert not next_step_fits(7.0, 10.0, [1.0], 2.5)                # a validation step


def test_time_budget_stops_before_a_step_that_cannot_finish(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, float]] = []

    def fits(used: float, budget: float, recent: list[float], extra: float = 0.0) -> bool:
        calls.append((len(recent), extra))
        return len(recent) < 2                  # the third step "cannot finish"

    monkeypatch.setattr(train_loop, "next_step_fits", fits)
    cfg = TrainConfig(data=str(folder), out=str(tmp_path / "m.pt"), layers=3, channels=8,
                      mask=train_mod.MaskSpec(acceleration=3.0, acs=8), max_steps=10,
                      val_every=2, val_samples=1, val_fraction=0.34, checkpoint_every=10,
                      device="cpu", time_budget_s=1e6, cg_iters=3)
    result = train_mod.train(cfg)
    assert result.steps == 2 and result.stopped == "time_budget"
    assert [n for n, _ in calls] == [0, 1, 2]
    # Before step 2 (a validation step) the look-ahead includes the validation's time.
    assert calls[0][1] == 0.0 < calls[1][1]


# ----------------------------------------------------------------------------- 8, 9. errors
def test_output_error_speaks_python_in_the_api_and_cli_on_the_command_line(
        tmp_path: Path) -> None:
    existing = tmp_path / "o.h5"
    existing.write_bytes(b"old")
    with pytest.raises(OutputError) as err:
        check_output(existing)
    assert "force=True" in str(err.value)
    assert err.value.cli_text().endswith("already exists (use --force to overwrite)")
    r = runner.invoke(app, ["simulate", str(existing), "--matrix", "32", "--coils", "2"])
    assert r.exit_code == 1
    assert r.stderr.strip() == f"error: {existing}: already exists (use --force to overwrite)"


def test_a_full_disk_is_one_line_naming_the_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError a user can act on that reaches the command line (no writer turned it into
    an OutputError) is one line naming the file — the target, not its temporary — and the
    cause, exit 1; other OSErrors stay internal errors."""
    from molrecon import sim

    out = tmp_path / "out.h5"
    raised: list[OSError] = []

    def writer(config: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        raise raised[-1]

    monkeypatch.setattr(sim, "simulate_to_file", writer)
    cases = [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".out.h5.k2j_9x7q.h5")),
         f"error: {out}: no space left on the device (free some space, or write elsewhere)"),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), str(out)),
         f"error: {out}: read-only file system (write elsewhere)"),
        (OSError(errno.ENOENT, os.strerror(errno.ENOENT), str(out)),
         "error: internal error: FileNotFoundError"),
    ]
    for exc, line in cases:
        raised.append(exc)
        r = runner.invoke(app, ["simulate", str(out), "--matrix", "32", "--coils", "2"])
        assert r.exit_code == 1, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), lines


def test_os_error_lines() -> None:
    assert os_error_line(OSError(errno.EROFS, "x", "/mnt/a.nii")) == \
        "/mnt/a.nii: read-only file system (write elsewhere)"
    assert os_error_line(OSError(errno.EACCES, "x", b"/a/.b.pt.abcd_123.pt")).startswith(
        "/a/b.pt: permission denied")
    assert os_error_line(OSError(errno.EDQUOT, "x")) == \
        "disk quota exceeded (free some space, or write elsewhere)"
    assert os_error_line(OSError(errno.ENOENT, "x", "a")) is None      # a bug: internal error


# ----------------------------------------------------------------------------- 10. units
def test_metrics_no_fit_warns_about_different_units(tmp_path: Path) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    image = rng.random((16, 16, 1)).astype(np.float32) + 0.5
    for name, scale in (("ref", 1.0), ("recon", 170.0)):
        nib.save(nib.Nifti1Image(image * scale, np.eye(4)), tmp_path / f"{name}.nii")
    r = runner.invoke(app, ["metrics", str(tmp_path / "recon.nii"), str(tmp_path / "ref.nii"),
                            "--no-fit", "--json"])
    assert r.exit_code == 0, r.output
    assert "different units" in r.stderr and "0.00588" in r.stderr
    r = runner.invoke(app, ["metrics", str(tmp_path / "recon.nii"), str(tmp_path / "ref.nii")])
    assert r.exit_code == 0 and "different units" not in r.stderr
    for command in ("metrics", "simulate"):
        text = flat(runner.invoke(app, [command, "--help"], terminal_width=200))
        assert "object's units" in text and "1/--noise" in text, command
