"""`molrecon train` under faults: SIGKILL at random moments, full disks and unwritable
folders at checkpoint time, NaN losses, diverging fixed points, and bad files in the data.

Everything runs on one CPU thread with 48×48 4-coil slices and a 3 × 8 network.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import molrecon.train.step as train_module
from _builders import records, tiny_config
from molrecon.cli import app
from molrecon.errors import InputDataError, MolreconError, OutputError
from molrecon.models.checkpoint import load_checkpoint
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import TrainConfig, output_paths, train
from molrecon.train.data import MaskSpec

runner = CliRunner()
# --cg-iters 5: TrainConfig's default, which the API runs compared with use (the CLI's is 10).
TINY = ["--layers", "3", "--channels", "8", "--acs", "8", "-R", "3", "--device", "cpu",
        "--cg-iters", "5"]



def simulate(path: Path, *, kind: str = "2d", seed: int = 0, acceleration: float = 1.0) -> Path:
    matrix = {"2d": (48, 48), "3d": (32, 32, 8)}[kind]
    simulate_to_file(SimulationConfig(kind=kind, matrix=matrix, coils=4, acceleration=acceleration,
                                      acs=8 if acceleration > 1 else None, seed=seed,
                                      slice_position=0.4 + 0.08 * seed), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "d2"
    folder.mkdir()
    for i in range(3):
        simulate(folder / f"s{i}.h5", seed=i)
    return folder


def tiny(data: Path, out: Path, **changes: Any) -> TrainConfig:
    return tiny_config(data, out, **{"val_samples": 1, **changes})


def weights(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_checkpoint(path)
    out = dict(loaded.model.state_dict())
    out["lam"] = torch.tensor(loaded.mol_config.lam)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------- SIGKILL
def _wait_for_steps(log: Path, launch: int, steps: int, proc: subprocess.Popen[bytes],
                    timeout: float = 240.0) -> None:
    """Until the ``launch``-th start record (0-based) is followed by ``steps`` step records."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before it was killed")
        if log.is_file():
            recs = []
            for line in log.read_text().splitlines():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    pass                                      # a line being written
            starts = [i for i, r in enumerate(recs) if r.get("event") == "start"]
            if len(starts) > launch:
                after = [r for r in recs[starts[launch]:] if "loss" in r]
                if len(after) >= steps:
                    return
        time.sleep(0.02)
    raise AssertionError("timed out waiting for training steps")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(
        data: Path, tmp_path: Path) -> None:
    """Three SIGKILLs and one SIGTERM, each 1–3 steps into a (resumed) run plus a random
    delay of up to 0.25 s (a kill may land inside a checkpoint write); the run then
    finishes with weights bitwise equal (torch.equal) to an uninterrupted in-process run."""
    max_steps, seed = 24, 5
    out = tmp_path / "killed" / "m.pt"
    out.parent.mkdir()
    args = [sys.executable, "-m", "molrecon", "train", "--data", str(data), "--out", str(out),
            *TINY, "--max-steps", str(max_steps), "--checkpoint-every", "1", "--val-every", "4",
            "--val-samples", "1", "--seed", str(seed), "--constraint", "lr", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = output_paths(out)
    pick = random.Random(20261126)
    stderr_path = tmp_path / "stderr.txt"
    # SIGTERM with a sparse checkpoint cadence: the CLI must save the state on its way out.
    plan = [(signal.SIGKILL, []), (signal.SIGTERM, ["--checkpoint-every", "100"]),
            (signal.SIGKILL, []), (signal.SIGKILL, [])]
    for launch, (sig, extra) in enumerate(plan):
        with open(stderr_path, "wb") as err:
            proc = subprocess.Popen(args + extra + (["--resume"] if launch else []), env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                _wait_for_steps(paths["log"], launch, pick.randint(1, 3), proc)
                time.sleep(pick.uniform(0.0, 0.25))
                proc.send_signal(sig)
                rc = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        said = stderr_path.read_text()
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL, said
        else:
            assert rc == 130, said           # the conventional status of an interrupt
            logged = max(r["step"] for r in records(paths["log"]) if "loss" in r)
            assert f"interrupted: state saved after step {logged}" in said, said
            assert torch.load(paths["state"], weights_only=True)["steps"] == logged
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert f"after {max_steps} steps" in done.stderr
    log = paths["log"]

    ref = tmp_path / "reference" / "m.pt"
    ref.parent.mkdir()
    train(TrainConfig(data=str(data), out=str(ref), layers=3, channels=8, constraint="lr",
                      mask=MaskSpec(acceleration=3.0, acs=8), max_steps=max_steps,
                      checkpoint_every=1, val_every=4, val_samples=1, seed=seed, device="cpu",
                      cg_iters=5))
    assert same(weights(output_paths(out)["last"]), weights(output_paths(ref)["last"]))
    steps = [r for r in records(log) if "loss" in r]
    ref_steps = [r for r in records(output_paths(ref)["log"]) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, max_steps + 1))
    assert [r["loss"] for r in steps] == [r["loss"] for r in ref_steps]
    assert len([r for r in records(log) if r.get("event") == "start"]) == len(plan) + 1
    assert temporaries(out.parent) == []         # a kill's temporary files were removed


# ----------------------------------------------------------------------------- writes
def test_full_disk_at_checkpoint_keeps_the_last_good_files(data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.pt"
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 3:                 # the step-2 checkpoint (3 files) goes through
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OutputError, match="No space left on device") as info:
        train(tiny(data, out, max_steps=4, val_fraction=0.0))
    monkeypatch.undo()
    assert "after step 4" in str(info.value) and "previous file is kept" in str(info.value)
    paths = output_paths(out)
    assert load_checkpoint(paths["last"]).metadata["steps"] == 2
    assert load_checkpoint(paths["best"]).metadata["steps"] == 2
    assert torch.load(paths["state"], weights_only=True)["steps"] == 2
    assert temporaries(tmp_path) == []


def test_failed_rename_of_the_state_keeps_a_consistent_resume(data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """The disk fills when the step-4 state is renamed into place: the step-2 state stays,
    and resuming from it reproduces the uninterrupted run exactly."""
    out = tmp_path / "m.pt"
    real_replace = os.replace
    state_writes = {"n": 0}

    def replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".state.pt"):
            state_writes["n"] += 1
            if state_writes["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    cfg = {"max_steps": 6, "val_fraction": 0.0}
    with pytest.raises(OutputError, match="resume state after step 4"):
        train(tiny(data, out, **cfg))
    monkeypatch.undo()
    assert torch.load(output_paths(out)["state"], weights_only=True)["steps"] == 2
    train(tiny(data, out, **cfg, resume=True))
    ref = tmp_path / "ref" / "m.pt"
    ref.parent.mkdir()
    train(tiny(data, ref, **cfg))
    assert same(weights(output_paths(out)["last"]), weights(output_paths(ref)["last"]))
    assert temporaries(tmp_path) == []


def test_unwritable_output_at_checkpoint_time(data: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.pt"
    real_mkstemp = tempfile.mkstemp
    calls = {"n": 0}

    def mkstemp(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError, match="Permission denied"):
        train(tiny(data, out, max_steps=4, val_fraction=0.0))
    monkeypatch.undo()
    assert load_checkpoint(output_paths(out)["last"]).metadata["steps"] == 2


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="needs POSIX permissions that apply (not root)")
def test_unwritable_output_folder_fails_before_training(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            train(tiny(data, folder / "m.pt"))
    finally:
        folder.chmod(0o755)
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- bad steps
def test_nan_loss_skips_the_step_and_halves_the_learning_rate(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean = tmp_path / "clean" / "m.pt"
    clean.parent.mkdir()
    train(tiny(data, clean, max_steps=1, val_fraction=0.0))

    real_loss = train_module._loss
    calls = {"n": 0}

    def nan_at_step_2(x: Any, target: Any, kind: Any) -> Any:
        calls["n"] += 1
        value = real_loss(x, target, kind)
        return value * float("nan") if calls["n"] == 2 else value

    monkeypatch.setattr(train_module, "_loss", nan_at_step_2)
    out = tmp_path / "nan" / "m.pt"
    out.parent.mkdir()
    said: list[str] = []
    cfg = tiny(data, out, max_steps=2, val_fraction=0.0)
    result = train(cfg, warn=said.append)
    assert result.steps == 2 and result.skipped_steps == 1
    recs = records(output_paths(out)["log"])
    skip = [r for r in recs if "skipped" in r]
    assert skip == [{"step": 2, "skipped": "non-finite loss", "lr": cfg.lr / 2,
                     "consecutive_skips": 1}]
    halved = f"(H: {cfg.lr / 2:.3g})"
    assert said == [f"step 2: skipped: non-finite loss; learning rates halved {halved}"]
    # The skipped step never reached the weights: they are those after step 1.
    assert same(weights(output_paths(out)["last"]), weights(output_paths(clean)["last"]))
    groups = torch.load(output_paths(out)["state"], weights_only=True)["optim"]["param_groups"]
    assert [g["lr"] for g in groups] == [cfg.lr / 2, cfg.lam_lr / 2]


def test_diverging_fixed_points_stop_after_max_skips(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    cfg = tiny(data, out, max_steps=10, fwd_max_iter=1, diverge_tol=1e-9, max_skips=3,
               val_fraction=0.0)
    with pytest.raises(MolreconError, match="3 consecutive steps failed") as info:
        train(cfg)
    assert "forward fixed point diverged" in str(info.value)
    recs = records(output_paths(out)["log"])
    assert [r["lr"] for r in recs if "skipped" in r] == [cfg.lr / 2, cfg.lr / 4, cfg.lr / 8]
    assert not [r for r in recs if "loss" in r]
    # The saved state holds the untouched initial weights.
    state = torch.load(output_paths(out)["state"], weights_only=True)
    assert state["steps"] == 3 and state["skips"] == 3
    torch.manual_seed(cfg.seed)
    initial, _ = train_module._build(cfg, "2d", torch.device("cpu"))
    assert same(dict(initial.state_dict()), state["step"])


# ----------------------------------------------------------------------------- bad data
def test_bad_files_are_skipped_with_one_line_each(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("s0.h5", "s1.h5"):
        shutil.copy(data / name, folder / name)
    (folder / "notes.h5").write_text("not an HDF5 file\n")
    simulate(folder / "under.h5", seed=4, acceleration=3.0)
    simulate(folder / "volume.h5", kind="3d", seed=5)
    said: list[str] = []
    out = tmp_path / "m.pt"
    result = train(tiny(folder, out, max_steps=1, val_fraction=0.0), warn=said.append)
    assert result.steps == 1
    assert sorted(Path(f).name for f, _ in result.skipped_files) == [
        "notes.h5", "under.h5", "volume.h5"]
    assert len(said) == 4, said
    for name, why in (("notes.h5", "skipped"), ("under.h5", "undersampled"),
                      ("volume.h5", "is 3d data, the training set is 2d")):
        lines = [s for s in said if name in s]
        assert len(lines) == 1 and why in lines[0], said
    assert said[-1] == "using 2 of 5 raw files (3 skipped)"
    assert load_checkpoint(out).metadata["train_files"] == ["s0.h5", "s1.h5"]

    res = runner.invoke(app, ["train", "--data", str(folder), "--out", str(tmp_path / "c.pt"),
                              *TINY, "--max-steps", "1", "--val-fraction", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("warning:") == 4
    assert "3 file(s) skipped" in res.stderr


def test_nothing_usable_is_a_clear_error(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.h5").write_bytes(b"\x89HDF junk")
    simulate(folder / "b.h5", seed=3, acceleration=3.0)
    with pytest.raises(InputDataError, match="no usable fully sampled scans: all 2 raw file"):
        train(tiny(folder, tmp_path / "m.pt"))
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "m.log.jsonl").exists()
    res = runner.invoke(app, ["train", "--data", str(folder), "--out", str(tmp_path / "m.pt"),
                              *TINY])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["warning", "warning", "error"], lines
    # A kind that the folder does not hold: every file is skipped for its kind.
    with pytest.raises(InputDataError, match="no usable fully sampled 3d scans"):
        train(tiny(data, tmp_path / "k.pt", kind="3d"))
