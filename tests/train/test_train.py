"""`molrecon train`: every data kind, checkpoints that reconstruction accepts, exact resume,
the validation split by file, learning beyond CG-SENSE, and the command's options.

Data are simulated in tmp_path with the project's simulator (fully sampled, 4 coils,
48×48 2D slices, 32×32×8 3D slabs, 32×32 × 4-frame 2D+time series); the network is
tiny (3 layers × 8 channels) so that a step takes about 0.1 s on one CPU thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _builders import Crash, crash_at, probe_norms, records, tiny_config
from conftest import message_lines
from molrecon.cli import app
from molrecon.errors import CheckpointError, ConfigError, InputDataError, OutputError
from molrecon.models.checkpoint import load_checkpoint
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import TrainConfig, output_paths, train
from molrecon.train.data import MaskSpec, list_raw_files, load_folder, split_dataset

runner = CliRunner()
MATRIX = {"2d": (48, 48), "2dt": (32, 32), "3d": (32, 32, 8)}
# --cg-iters 5: TrainConfig's default, which the API runs compared with use (the CLI's is 10).
TINY = ["--layers", "3", "--channels", "8", "--acs", "8", "-R", "3", "--device", "cpu",
        "--cg-iters", "5"]



def simulate_folder(folder: Path, kind: str, count: int, *, seed0: int = 0, slices: int = 1,
                    acceleration: float = 1.0) -> Path:
    """``count`` raw files of ``kind`` in ``folder`` (fully sampled unless told otherwise)."""
    folder.mkdir(parents=True, exist_ok=True)
    extra: dict[str, Any] = {"frames": 4} if kind == "2dt" else {}
    if slices > 1:
        extra["slices"] = slices
    for i in range(count):
        cfg = SimulationConfig(kind=kind, matrix=MATRIX[kind], coils=4, acceleration=acceleration,
                               seed=seed0 + i, slice_position=0.35 + 0.08 * i, **extra)
        simulate_to_file(cfg, folder / f"{kind}_{seed0 + i}.h5")
    return folder


def tiny(data: Path, out: Path, **changes: Any) -> TrainConfig:
    return tiny_config(data, out, **changes)


def step_records(log: Path) -> list[dict[str, Any]]:
    return [r for r in records(log) if "loss" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train_data")
    return {kind: simulate_folder(root / kind, kind, 3) for kind in ("2d", "3d", "2dt")}


@pytest.fixture(scope="module")
def multislice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 2-slice 48×48 files: 6 training and 2 validation slices at a 0.25 file split."""
    return simulate_folder(tmp_path_factory.mktemp("ms") / "ms", "2d", 4, seed0=10, slices=2)


def weights(path: Path) -> dict[str, torch.Tensor]:
    loaded = load_checkpoint(path)
    out = dict(loaded.model.state_dict())
    out["lam"] = torch.tensor(loaded.mol_config.lam)
    return out


# ----------------------------------------------------------------------------- kinds, files
@pytest.mark.parametrize(("kind", "constraint", "dims"),
                         [("2d", "sn", 2), ("2d", "lr", 2), ("3d", "sn", 3), ("2dt", "lr", 3)])
def test_each_kind_trains_and_writes_a_loadable_checkpoint(
        data: dict[str, Path], tmp_path: Path, kind: str, constraint: str, dims: int) -> None:
    out = tmp_path / "m.pt"
    result = train(tiny(data[kind], out, constraint=constraint, penalty_crop=16))
    paths = output_paths(out)
    for key in ("best", "last", "state", "log"):
        assert paths[key].is_file(), key
    assert result.steps == 2 and result.stopped == "max_steps" and not result.skipped_files
    loaded = load_checkpoint(out)
    assert loaded.model.config.dims == dims
    assert loaded.kinds == (("2d", "2dt", "3d") if kind == "2d" else (kind,))
    assert loaded.constraint == constraint
    assert loaded.metadata["steps"] == 2 and loaded.metadata["kind"] == kind
    assert loaded.mol_config.lam > 0
    if constraint == "sn":
        assert loaded.certificate["certified_bound"] <= 0.99
    recs = records(paths["log"])
    assert recs[0]["event"] == "start" and recs[0]["model_dims"] == dims
    assert [r["step"] for r in recs if "loss" in r] == [1, 2]
    final = recs[-1]
    assert final["val_psnr"] > 10 and final["val_sense_psnr"] > 10 and final["val_failed"] == 0
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)


@pytest.mark.parametrize("kind", ["2d", "2dt"])
def test_reconstruct_accepts_the_trained_weights(data: dict[str, Path], tmp_path: Path,
                                                 kind: str) -> None:
    model = tmp_path / "m.pt"
    train(tiny(data[kind], model, max_steps=1, val_fraction=0.0))
    raw = tmp_path / "under.h5"
    cfg = SimulationConfig(kind=kind, matrix=MATRIX[kind], coils=4, acceleration=3.0, acs=8,
                           seed=42, **({"frames": 4} if kind == "2dt" else {}))
    simulate_to_file(cfg, raw)
    nii, report = tmp_path / "r.nii.gz", tmp_path / "r.json"
    result = runner.invoke(app, ["reconstruct", str(raw), str(nii), "--weights", str(model),
                                 "--device", "cpu", "--report", str(report)])
    assert result.exit_code == 0, result.output
    rep = json.loads(report.read_text())
    assert rep["method"] == "mol" and rep["kind"] == kind and rep["converged"] is True
    if kind == "2d":
        # A 2D prior serves 2D+time frame by frame and 3D plane by plane, like the bundled ones.
        assert load_checkpoint(model).kinds == ("2d", "2dt", "3d")
        return
    # A 3D-convolution model trained on 2D+time refuses 2D data.
    other = simulate_folder(tmp_path / "other", "2d", 1, seed0=7, acceleration=3.0)
    bad = runner.invoke(app, ["reconstruct", str(list_raw_files(other)[0]),
                              str(tmp_path / "x.nii"), "--weights", str(model), "--device", "cpu"])
    assert bad.exit_code == 1
    assert "model is for" in bad.stderr and len(message_lines(bad.stderr)) == 1


# ----------------------------------------------------------------------------- resume
@pytest.mark.parametrize("estimator", ["ratio", "power", "sample", "lanczos", "monotone"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(data: dict[str, Path],
                                                                  tmp_path: Path,
                                                                  estimator: str) -> None:
    """Bitwise equality on the CPU (torch.equal), the LR penalty's randomness included (and,
    for the "power" estimator, the probes' power-iteration vectors carried in the state)."""
    common = {"constraint": "lr", "penalty_crop": 16, "max_steps": 6, "val_every": 2,
              "checkpoint_every": 2, "penalty_estimator": estimator, "penalty_probes": 2,
              "penalty_steps": 3, "penalty_top": 2}
    full = tmp_path / "full" / "m.pt"
    full.parent.mkdir()
    train(tiny(data["2d"], full, **common))

    part = tmp_path / "part" / "m.pt"
    part.parent.mkdir()

    with pytest.raises(Crash):   # dies after step 5: the state on disk is that of step 4
        train(tiny(data["2d"], part, **common), on_record=crash_at(5))
    assert torch.load(output_paths(part)["state"], weights_only=True)["steps"] == 4
    result = train(tiny(data["2d"], part, **common, resume=True))
    assert result.steps == 6
    a, b = weights(output_paths(full)["last"]), weights(output_paths(part)["last"])
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    sa = torch.load(output_paths(full)["state"], weights_only=True)
    sb = torch.load(output_paths(part)["state"], weights_only=True)
    for group_a, group_b in zip(sa["optim"]["param_groups"], sb["optim"]["param_groups"]):
        assert group_a["lr"] == group_b["lr"]
    # The resumed log holds every step once, with the uninterrupted run's losses.
    la, lb = step_records(output_paths(full)["log"]), step_records(output_paths(part)["log"])
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    assert [r["lipschitz_local"] for r in la] == [r["lipschitz_local"] for r in lb]
    if estimator == "power":
        probes = sb["probes"]
        assert len(probes["samples"]) == 2 and all(v is not None for v in probes["vectors"])
        for va, vb in zip(sa["probes"]["vectors"], probes["vectors"]):
            assert torch.equal(va, vb)


def descend(net: torch.nn.Module, loss: torch.Tensor, step: float = 1e-3) -> None:
    """One normalised gradient-descent step of every parameter of ``net`` on ``loss``."""
    net.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in net.parameters():
            if p.grad is not None:
                p -= step * p.grad / (p.grad.norm() + 1e-12)


def test_monotone_penalty_reads_mu_and_presses_it_down() -> None:
    """--penalty-estimator monotone: the penalty reads the top μ of ½(J + Jᵀ) at the point
    (what monotonicity_estimate reads there, at most the Jacobian norm) and a gradient step
    on it lowers μ there."""
    from molrecon.models.cnn import CNNConfig, MolCNN
    from molrecon.models.lipschitz import lanczos_jacobian_norm, monotonicity_estimate
    from molrecon.train.step import _lipschitz_penalty, _StepOutcome

    torch.manual_seed(3)
    cnn = MolCNN(CNNConfig(layers=3, channels=8, skip=1.0), "lr")
    x = torch.randn(1, 1, 24, 24, dtype=torch.complex64)
    config = TrainConfig(data="d", out="m.pt", constraint="lr", penalty_estimator="monotone",
                         penalty_steps=12, penalty_weight=1.0, penalty_threshold=0.5)

    def mu() -> float:
        gen = torch.Generator().manual_seed(0)
        return float(monotonicity_estimate(cnn, x, iters=12, generator=gen).top.detach().max())

    out = _StepOutcome()
    before = mu()
    penalty = _lipschitz_penalty(cnn, config, 0, np.random.default_rng(0), out, lambda: x)
    assert penalty is not None and out.lipschitz[0] == pytest.approx(before, rel=1e-2)
    norm = float(lanczos_jacobian_norm(cnn, x, iters=12,
                                       generator=torch.Generator().manual_seed(0))[0].detach().max())
    assert before <= norm * (1 + 1e-4)
    descend(cnn, penalty)
    assert mu() < before - 1e-5


def test_monotone_penalty_norm_cap_adds_the_norm_and_presses_it_down() -> None:
    """--penalty-norm-cap: beside μ (under a barrier it does not reach), the Jacobian norm at
    the same point is recorded and goes through a barrier at the cap, so that a gradient
    step on the penalty lowers the norm; without the cap the penalty is μ's term alone."""
    from molrecon.models.cnn import CNNConfig, MolCNN
    from molrecon.models.lipschitz import lanczos_jacobian_norm
    from molrecon.train.step import _lipschitz_penalty, _StepOutcome

    torch.manual_seed(5)
    cnn = MolCNN(CNNConfig(layers=3, channels=8, skip=1.0), "lr")
    x = torch.randn(1, 1, 24, 24, dtype=torch.complex64)

    def norm() -> float:
        gen = torch.Generator().manual_seed(0)
        return float(lanczos_jacobian_norm(cnn, x, iters=12, generator=gen)[0].detach().max())

    before = norm()
    common = {"data": "d", "out": "m.pt", "constraint": "lr", "penalty_estimator": "monotone",
              "penalty_steps": 12, "penalty_weight": 1.0, "penalty_threshold": 50.0}
    plain = _StepOutcome()
    alone = _lipschitz_penalty(cnn, TrainConfig(**common), 0, np.random.default_rng(0), plain,
                               lambda: x)
    assert alone is not None and plain.norms == []
    out = _StepOutcome()
    capped = _lipschitz_penalty(cnn, TrainConfig(**common, penalty_norm_cap=0.5), 0,
                                np.random.default_rng(0), out, lambda: x)
    assert capped is not None and out.norms[0] == pytest.approx(before, rel=1e-2)
    assert out.lipschitz[0] <= out.norms[0] * (1 + 1e-4)
    assert float(capped.detach()) > float(alone.detach())    # the norm's barrier is added
    descend(cnn, capped)
    assert norm() < before - 1e-5


def test_penalty_norm_weight_weighs_the_norm_barrier_alone() -> None:
    """--penalty-norm-weight: the penalty is μ's barrier at --penalty-weight plus the norm's
    barrier at its own weight, so that the difference of two weights is exactly the norm
    barrier's term times their difference; left out, the norm takes --penalty-weight."""
    from molrecon.models.cnn import CNNConfig, MolCNN
    from molrecon.train.step import _lipschitz_penalty, _StepOutcome

    torch.manual_seed(6)
    cnn = MolCNN(CNNConfig(layers=3, channels=8, skip=1.0), "lr")
    x = torch.randn(1, 1, 24, 24, dtype=torch.complex64)
    common = {"data": "d", "out": "m.pt", "constraint": "lr", "penalty_estimator": "monotone",
              "penalty_steps": 12, "penalty_weight": 1e-2, "penalty_threshold": 50.0,
              "penalty_norm_cap": 40.0}

    norms: list[float] = []

    def value(**extra: float) -> float:
        out = _StepOutcome()
        got = _lipschitz_penalty(cnn, TrainConfig(**common, **extra), 0,
                                 np.random.default_rng(0), out, lambda: x)
        assert got is not None
        norms.extend(out.norms)
        return float(got.detach())

    mu_only = _lipschitz_penalty(cnn, TrainConfig(**{k: v for k, v in common.items()
                                                     if k != "penalty_norm_cap"}),
                                 0, np.random.default_rng(0), _StepOutcome(), lambda: x)
    assert mu_only is not None
    shared, heavy, off = value(), value(penalty_norm_weight=1.0), value(penalty_norm_weight=0.0)
    assert off == pytest.approx(float(mu_only.detach()), rel=1e-5)   # weight 0: μ's term alone
    norm_term = (shared - off) / 1e-2                     # the norm barrier, unweighted
    assert norm_term == pytest.approx(-math.log(40.0 - norms[0]), rel=1e-3)
    assert heavy == pytest.approx(off + 1.0 * norm_term, rel=1e-4)


def test_norm_cap_is_logged_on_penalty_steps(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cap.pt"
    train(tiny(data["2d"], out, constraint="lr", max_steps=2, val_every=2, checkpoint_every=2,
               penalty_estimator="monotone", penalty_steps=3, penalty_norm_cap=1.2, skip=True))
    log = step_records(output_paths(out)["log"])
    assert [r["step"] for r in log] == [1, 2]
    # A fresh identity-path network is H = I: μ and the norm both read about 1.
    assert all(0.5 < r["lipschitz_local"] < 1.5 and 0.5 < r["norm_local"] < 1.5 for r in log)


def test_project_bound_holds_the_saved_model_at_the_bound(data: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """--project-bound: on every project_every-th step the largest Jacobian norm at the
    whole-scan probes' fixed points is logged, and where it is above T the output is scaled
    by T over it; re-measured with the saved model there, it reads T. A run interrupted
    and resumed equals an uninterrupted one."""
    bound = 0.05
    common = {"constraint": "lr", "max_steps": 4, "val_every": 2, "checkpoint_every": 1,
              "lr": 3e-2, "penalty_weight": 0.0, "project_bound": bound, "project_every": 2,
              "penalty_probes": 2}
    out = tmp_path / "full" / "m.pt"
    out.parent.mkdir()
    config = tiny(data["2d"], out, **common)
    train(config)
    log = step_records(output_paths(out)["log"])
    projected = [r for r in log if "probe_lipschitz" in r]
    assert [r["step"] for r in projected] == [2, 4]
    last = projected[-1]
    assert last["probe_lipschitz"] > bound            # the lr makes it grow past T ...
    assert last["output_scale"] == pytest.approx(bound / last["probe_lipschitz"])
    # ... and the saved model reads T at the probes' fixed points (to 1 %: the fixed points
    # move a little when H is scaled).
    assert max(probe_norms(config, output_paths(out)["last"])) == pytest.approx(bound, rel=1e-2)

    part = tmp_path / "part" / "m.pt"
    part.parent.mkdir()
    with pytest.raises(Crash):
        train(tiny(data["2d"], part, **common), on_record=crash_at(4))
    train(tiny(data["2d"], part, **common, resume=True))
    a, b = weights(output_paths(out)["last"]), weights(output_paths(part)["last"])
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ConfigError, match="project_bound and ema"):
        tiny(data["2d"], out, **common, ema=0.9)
    with pytest.raises(ConfigError, match="project_bound scales"):
        tiny(data["2d"], out, **{**common, "constraint": "sn"})


def test_project_bound_on_the_monotone_measure(data: dict[str, Path], tmp_path: Path) -> None:
    """--bound-measure monotone: the projection holds the top of the spectrum of ½(J + Jᵀ) at
    the probes' fixed points (logged as probe_monotone; the saved model re-measured there
    reads T), validation logs val_monotone, which never exceeds val_lipschitz, and the best
    model is gated on it; an unknown measure is refused."""
    bound = 0.05
    out = tmp_path / "m.pt"
    config = tiny(data["2d"], out, constraint="lr", max_steps=4, val_every=2,
                  checkpoint_every=1, lr=3e-2, penalty_weight=0.0, project_bound=bound,
                  project_every=2, penalty_probes=2, bound_measure="monotone",
                  best_max_lipschitz=10.0)
    train(config)
    log = step_records(output_paths(out)["log"])
    projected = [r for r in log if "probe_monotone" in r]
    assert [r["step"] for r in projected] == [2, 4]
    assert not any("probe_lipschitz" in r for r in log)
    last = projected[-1]
    assert last["probe_monotone"] > bound
    assert last["output_scale"] == pytest.approx(bound / last["probe_monotone"])
    # To 5 %: the fixed points move when H is scaled, and the projection's 10 warm Lanczos
    # steps read the top of an indefinite symmetric spectrum less tightly than JᵀJ's.
    saved = probe_norms(config, output_paths(out)["last"], measure="monotone")
    assert max(saved) == pytest.approx(bound, rel=5e-2)
    vals = [r for r in log if r.get("val_psnr") is not None]
    assert vals and all(r["val_monotone"] <= r["val_lipschitz"] + 1e-6 for r in vals)
    # Gated on val_monotone (here below the limit): the best file is the best validation's
    # model; without the gate's key no validation could be the best.
    best = max(vals, key=lambda r: r["val_psnr"])
    assert load_checkpoint(output_paths(out)["best"]).metadata["steps"] == best["step"]
    with pytest.raises(ConfigError, match="bound_measure"):
        tiny(data["2d"], out, bound_measure="norm")
    with pytest.raises(ConfigError, match="val_points"):
        tiny(data["2d"], out, val_points=0)


def test_interrupt_during_a_best_save_still_writes_the_best_model(
        data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the new best model of step 4 is being saved (step 2's is on disk): the
    interrupt's own save writes step 4's model as the best, so that the best file agrees
    with the best PSNR the state records (a resumed run only saves models that beat it)."""
    import importlib

    loop = importlib.import_module("molrecon.train.loop")
    real_save, real_eval = loop.save_checkpoint, loop.evaluate
    best_saves: list[int] = []
    evals: list[int] = []

    def save(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).name == "m.pt":
            best_saves.append(1)
            if len(best_saves) == 2:             # the save of step 4's best model
                raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    def rising(*args: Any, **kwargs: Any) -> Any:
        evals.append(1)
        return {**real_eval(*args, **kwargs), "val_psnr": 10.0 + len(evals)}   # every one a best

    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop, "evaluate", rising)
    out = tmp_path / "m.pt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny(data["2d"], out, max_steps=6, val_every=2, checkpoint_every=100))
    paths = output_paths(out)
    best = load_checkpoint(paths["best"]).metadata
    state = torch.load(paths["state"], weights_only=True)
    assert best["steps"] == 4 == state["steps"]
    assert state["best"] == best["last_metrics"]["val_psnr"] == 13.0


def test_resume_keeps_the_model_of_the_state(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    train(tiny(data["2d"], out, max_steps=1, spectral_grid=12, val_fraction=0.0))
    with pytest.raises(CheckpointError, match="--channels 8 → 4"):
        train(tiny(data["2d"], out, max_steps=2, channels=4, resume=True))
    with pytest.raises(CheckpointError, match="--spectral-grid 12 → 20"):
        train(tiny(data["2d"], out, max_steps=2, spectral_grid=20, resume=True))
    with pytest.raises(ConfigError, match="--data .*2d → .*3d"):
        train(tiny(data["3d"], out, max_steps=2, val_fraction=0.0, resume=True))
    with pytest.raises(CheckpointError, match="is for 2d data"):
        train(tiny(data["3d"], out, max_steps=2, val_fraction=0.0, resume=True, override=True))
    # Left unset, the SN frequency grid (which sets the effective weights) is the state's.
    train(tiny(data["2d"], out, max_steps=2, val_fraction=0.0, resume=True))
    assert load_checkpoint(out).metadata["config"]["spectral_grid"] == 12


def test_a_resume_with_another_lam_restarts_lambda_there(data: dict[str, Path],
                                                          tmp_path: Path) -> None:
    """--lam may change on resume, and then takes effect (the saved λ would otherwise win)."""
    out = tmp_path / "m.pt"
    train(tiny(data["2d"], out, max_steps=1, val_fraction=0.0, lam_init=5.0, lam_lr=0.0))
    train(tiny(data["2d"], out, max_steps=2, val_fraction=0.0, lam_init=5.0, lam_lr=0.0,
               resume=True))
    train(tiny(data["2d"], out, max_steps=3, val_fraction=0.0, lam_init=40.0, lam_lr=0.0,
               resume=True))
    lams = [r["lambda"] for r in step_records(output_paths(out)["log"])]
    assert lams == pytest.approx([5.0, 5.0, 40.0], rel=1e-5)


# ----------------------------------------------------------------------------- validation
def test_validation_split_is_by_file(multislice: Path, tmp_path: Path) -> None:
    ds = load_folder(list_raw_files(multislice), None)
    assert len(ds) == 8 and len(ds.files) == 4
    for seed in range(5):
        tr, va = split_dataset(ds, 0.25, seed)
        assert len(va.files) == 1 and len(tr.files) == 3
        assert not {s.source for s in tr.samples} & {s.source for s in va.samples}
        assert len(va) == 2 and sorted(s.index for s in va.samples) == [0, 1]
    out = tmp_path / "m.pt"
    result = train(tiny(multislice, out, max_steps=1, val_fraction=0.25, val_samples=8))
    meta = load_checkpoint(out).metadata
    assert len(meta["val_files"]) == 1 and len(meta["train_files"]) == 3
    assert not set(meta["val_files"]) & set(meta["train_files"])
    assert meta["val_samples"] == 2 and meta["train_samples"] == 6
    assert result.val_files and Path(result.val_files[0]).name == meta["val_files"][0]


def test_separate_validation_folder(data: dict[str, Path], tmp_path: Path) -> None:
    val = simulate_folder(tmp_path / "val", "2d", 2, seed0=40)
    out = tmp_path / "m.pt"
    train(tiny(data["2d"], out, max_steps=1, val_data=str(val), val_samples=8))
    meta = load_checkpoint(out).metadata
    assert sorted(meta["val_files"]) == ["2d_40.h5", "2d_41.h5"]
    assert len(meta["train_files"]) == 3            # the whole --data folder trains
    with pytest.raises(ConfigError, match="training folder"):
        train(tiny(data["2d"], tmp_path / "n.pt", val_data=str(data["2d"])))
    with pytest.raises(InputDataError, match="2d scans"):   # kinds must agree
        train(tiny(data["2d"], tmp_path / "o.pt", val_data=str(data["3d"])))
    (tmp_path / "empty").mkdir()
    r = runner.invoke(app, ["train", "--data", str(data["2d"]), "--out", str(tmp_path / "p.pt"),
                            "--val-data", str(tmp_path / "empty"), *TINY])
    assert r.exit_code == 1 and "no raw files" in r.stderr and "empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("p.*"))


@pytest.mark.parametrize("dims", [2, 3])
def test_a_deepened_prior_is_the_same_function_and_the_same_bound(dims: int) -> None:
    from molrecon.models.cnn import CNNConfig, MolCNN
    from molrecon.train.step import deepen_state

    torch.manual_seed(1)
    small = MolCNN(CNNConfig(dims=dims, layers=3, channels=6, skip=1.0), constraint="lr").double()
    with torch.no_grad():                       # biases of both signs: ReLUs that cut
        for conv in small.convs:
            conv.bias.normal_()
    deep = MolCNN(CNNConfig(dims=dims, layers=6, channels=6, skip=1.0), constraint="lr").double()
    deep.load_state_dict(deepen_state(small.state_dict(), 3, 6))
    x = torch.randn(2, 4, 12, 12, dtype=torch.complex128)
    with torch.no_grad():
        assert torch.allclose(deep(x), small(x), atol=1e-12)
        assert torch.equal(deep.convs[-1].weight, small.convs[-1].weight)
        # the inserted layers are identities: their norms multiply the bound by 1
        norms = [float(torch.linalg.matrix_norm(c.weight.flatten(2).sum(-1), 2))
                 for c in deep.convs[2:5]]
    assert norms == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="cannot deepen"):
        deepen_state(small.state_dict(), 3, 2)


def test_init_from_a_shallower_lr_prior_deepens_it_and_sn_refuses(
        data: dict[str, Path], tmp_path: Path) -> None:
    three = tmp_path / "three.pt"
    train(tiny(data["2d"], three, max_steps=1, constraint="lr", penalty_crop=16))
    five = tmp_path / "five.pt"
    train(tiny(data["2d"], five, max_steps=1, constraint="lr", penalty_crop=16,
               layers=5, init_weights=str(three), lr=1e-12))
    source, grown = load_checkpoint(three), load_checkpoint(five)
    assert grown.model.config.layers == 5
    # with a negligible learning rate the grown network is the source's function
    x = torch.randn(1, 1, 24, 24, dtype=torch.complex64)
    with torch.no_grad():
        assert torch.allclose(grown.model(x), source.model(x), atol=1e-5)
    with pytest.raises(CheckpointError, match="differs"):
        train(tiny(data["2d"], tmp_path / "sn.pt", max_steps=1, layers=5,
                   init_weights=str(three)))
    # nor does an SN checkpoint (free weights, rescaled by its own normalisation) start a
    # deeper LR network
    with pytest.raises(CheckpointError, match="differs"):
        train(tiny(data["2d"], tmp_path / "from_sn.pt", max_steps=1, constraint="lr",
                   layers=7, channels=64, init_weights="mol_2d_sn"))


def test_init_from_a_flip_ensemble_trains_its_network_alone(
        data: dict[str, Path], tmp_path: Path) -> None:
    from dataclasses import replace

    from molrecon.models import save_checkpoint

    one = tmp_path / "one.pt"
    train(tiny(data["2d"], one, max_steps=1, constraint="lr", penalty_crop=16))
    source = load_checkpoint(one)
    source.model.config = replace(source.model.config, ensemble=4)
    ens = save_checkpoint(tmp_path / "ens.pt", source.model, source.mol_config,
                          kinds=source.kinds)
    assert load_checkpoint(ens).model.config.ensemble == 4
    out = tmp_path / "from_ens.pt"
    train(tiny(data["2d"], out, max_steps=1, constraint="lr", penalty_crop=16,
               init_weights=str(ens), lr=1e-12))
    got = load_checkpoint(out).model
    assert got.config.ensemble == 1
    source.model.config = replace(source.model.config, ensemble=1)
    x = torch.randn(1, 1, 24, 24, dtype=torch.complex64)
    with torch.no_grad():
        assert torch.allclose(got(x), source.model(x), atol=1e-5)


def test_a_2d_prior_starts_a_3d_one_as_the_same_network_plane_by_plane(
        data: dict[str, Path], tmp_path: Path) -> None:
    from molrecon.models.cnn import CNNConfig, MolCNN
    from molrecon.train import inflate_state_2d_to_3d

    torch.manual_seed(0)
    net2 = MolCNN(CNNConfig(dims=2, layers=3, channels=8), constraint="lr").double()
    net3 = MolCNN(CNNConfig(dims=3, layers=3, channels=8), constraint="lr").double()
    net3.load_state_dict(inflate_state_2d_to_3d(net2.state_dict()))
    x = torch.randn(1, 5, 16, 16, dtype=torch.complex128)
    with torch.no_grad():
        assert torch.allclose(net3(x), net2(x), atol=1e-12)
    # through training: --init with a 2D checkpoint for 2D+time data; λ comes from it
    two = tmp_path / "two.pt"
    train(tiny(data["2d"], two, max_steps=1, constraint="lr", penalty_crop=16))
    lam2 = load_checkpoint(two).mol_config.lam
    three = tmp_path / "three.pt"
    train(tiny(data["2dt"], three, max_steps=1, constraint="lr", penalty_crop=16,
               init_weights=str(two), lr=0.5))
    best = load_checkpoint(three)
    assert best.model.config.dims == 3
    # the starting weights are the model to beat: the best file is never worse than them
    start = next(r for r in records(output_paths(three)["log"]) if r.get("event") == "validation")
    assert best.metadata["last_metrics"]["val_psnr"] >= start["val_psnr"]
    assert best.metadata["steps"] in (0, 1)
    # an explicit --lam overrides the checkpoint's
    four = tmp_path / "four.pt"
    cfg = tiny(data["2d"], four, constraint="lr", init_weights=str(two), lam_init=7.0)
    from molrecon.train.step import _build
    step, _ = _build(cfg, "2d", torch.device("cpu"))
    assert float(step.lam.detach()) == pytest.approx(7.0)
    step, _ = _build(tiny(data["2d"], four, constraint="lr", init_weights=str(two)), "2d",
                     torch.device("cpu"))
    assert float(step.lam.detach()) == pytest.approx(lam2, rel=1e-6)
    with pytest.raises(CheckpointError, match="differs"):     # 3D cannot start 2D
        _build(tiny(data["2d"], four, constraint="lr", init_weights=str(three)), "2d",
               torch.device("cpu"))


@pytest.mark.parametrize("kind", ["2d", "3d", "2dt"])
def test_readout_blocks_train_on_exact_sub_problems(data: dict[str, Path], tmp_path: Path,
                                                    kind: str) -> None:
    from molrecon.train import make_problem

    ds = load_folder(list_raw_files(data[kind]), kind)
    sample = ds.samples[0]
    full = make_problem(sample, kind, MaskSpec(acceleration=3.0, acs=8), np.random.default_rng(1),
                        0.0, torch.device("cpu"))
    part = make_problem(sample, kind, MaskSpec(acceleration=3.0, acs=8), np.random.default_rng(1),
                        0.0, torch.device("cpu"), readout_block=8)
    assert part.target.shape[-1] == 8 and part.scale == full.scale
    # the block is the full problem restricted to 8 readout positions: same Aᴴy there
    nx = full.target.shape[-1]
    offsets = [o for o in range(nx - 7)
               if torch.allclose(full.target[..., o:o + 8], part.target)]
    assert len(offsets) == 1
    o = offsets[0]
    assert torch.allclose(full.aty[..., o:o + 8], part.aty, atol=1e-5 * float(full.aty.abs().max()))
    result = train(tiny(data[kind], tmp_path / "m.pt", readout_block=8, constraint="lr",
                        penalty_crop=16))
    assert result.steps == 2
    meta = load_checkpoint(tmp_path / "m.pt").metadata
    assert meta["config"]["readout_block"] == 8
    with pytest.raises(ConfigError, match="readout_block"):
        tiny(data[kind], tmp_path / "n.pt", readout_block=0)


@pytest.mark.slow
def test_a_short_run_beats_cg_sense_on_its_validation_split(multislice: Path,
                                                            tmp_path: Path) -> None:
    """40 steps at R = 3 (4 × 16 network, lr 3e-3, log-λ lr 0.05, λ from 100): measured
    27.12 dB against CG-SENSE's 26.67 dB and 26.48 dB before training (the untrained model
    is the regularised SENSE image). Much of the gain over CG-SENSE is the learned λ."""
    out = tmp_path / "m.pt"
    train(tiny(multislice, out, layers=4, channels=16, lr=3e-3, lam_lr=0.05, max_steps=40,
               val_every=20, checkpoint_every=40, val_fraction=0.25, val_samples=2))
    recs = records(output_paths(out)["log"])
    before = next(r for r in recs if r.get("event") == "validation")
    final = [r for r in recs if "val_psnr" in r][-1]
    assert final["step"] == 40
    assert final["val_sense_psnr"] == pytest.approx(before["val_sense_psnr"])
    assert final["val_psnr"] > final["val_sense_psnr"] + 0.3
    assert final["val_psnr"] > before["val_psnr"] + 0.4
    assert final["val_ssim"] > final["val_sense_ssim"]


# ----------------------------------------------------------------------------- the command
def test_cli_progress_seed_and_max_steps(data: dict[str, Path], tmp_path: Path) -> None:
    def run(name: str, *extra: str) -> tuple[Any, Path]:
        out = tmp_path / name / "m.pt"
        out.parent.mkdir()
        res = runner.invoke(app, ["train", "--data", str(data["2d"]), "--out", str(out), *TINY,
                                  "--max-steps", "2", "--val-every", "2", "--val-samples", "1",
                                  "--constraint", "sn", *extra])
        assert res.exit_code == 0, res.output
        return res, out

    first, out_a = run("a", "--seed", "3")
    lines = first.stderr.splitlines()
    assert any(line.startswith("training from step 0 of 2: 2d data") for line in lines)
    assert any(line.startswith("before training: [val MOL") for line in lines)
    assert any(line.startswith("step      1/2  loss") for line in lines)
    assert any(line.startswith("step      2/2  loss") and "CG-SENSE" in line for line in lines)
    assert "wrote" in first.stderr and "after 2 steps" in first.stderr
    _, out_b = run("b", "--seed", "3")
    _, out_c = run("c", "--seed", "4")
    a, b, c = (weights(o) for o in (out_a, out_b, out_c))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert load_checkpoint(out_a).metadata["steps"] == 2


def test_cli_time_budget_stops_and_resume_continues(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    base = ["train", "--data", str(data["2d"]), "--out", str(out), *TINY, "--max-steps", "500",
            "--val-fraction", "0", "--checkpoint-every", "500", "-q"]
    res = runner.invoke(app, [*base, "--time-budget", "0.001"])
    assert res.exit_code == 0, res.output
    assert "stopped by --time-budget" in res.stderr
    # The budget ran out while loading: the untrained state is saved at step 0.
    assert torch.load(output_paths(out)["state"], weights_only=True)["steps"] == 0
    res = runner.invoke(app, [*base, "--resume", "--max-steps", "1"])
    assert res.exit_code == 0, res.output
    assert "after 1 steps" in res.stderr
    assert [r["step"] for r in step_records(output_paths(out)["log"])] == [1]


def test_cli_errors_are_one_line(data: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (["--data", str(data["2d"]), "--out", str(tmp_path / "r.pt"), "--resume"],
         "nothing to resume"),
        (["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "m.pt")], "no such folder"),
        (["--data", str(tmp_path), "--out", str(tmp_path / "e.pt")], "no raw files"),
        (["--data", str(data["2d"]), "--out", str(tmp_path / "nofolder" / "m.pt")],
         "does not exist"),
        (["--data", str(data["2d"]), "--out", str(tmp_path / "m.pt"), "--acs", "40"],
         "does not fit the 2d data"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["train", *args, "--device", "cpu", "--layers", "3",
                                  "--channels", "8", "-R", "3"])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.stderr, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "m.pt").exists()
    usage = runner.invoke(app, ["train", "--data", str(data["2d"]), "--out",
                                str(tmp_path / "u.pt"), "-R", "x"])
    assert usage.exit_code == 2


def test_existing_outputs_need_force(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    train(tiny(data["2d"], out, max_steps=1, val_fraction=0.0))
    with pytest.raises(OutputError, match="already exists"):
        train(tiny(data["2d"], out, max_steps=1, val_fraction=0.0))
    train(tiny(data["2d"], out, max_steps=1, val_fraction=0.0, force=True))


def test_config_is_checked() -> None:
    for bad in ({"lr": 0.0}, {"max_steps": 0}, {"alpha": 2.5}, {"val_fraction": 1.0},
                {"kind": "4d"}, {"unroll": -1}, {"time_budget_s": 0.0},
                {"penalty_estimator": "exact"}, {"penalty_probes": 0},
                {"penalty_estimator": "power", "stage": "denoise"}, {"penalty_top": 0},
                {"penalty_estimator": "lanczos", "penalty_steps": 2, "penalty_top": 3},
                {"penalty_estimator": "monotone", "penalty_steps": 2, "penalty_top": 3},
                {"penalty_estimator": "lanczos", "penalty_norm_cap": 1.5},
                {"penalty_estimator": "monotone", "penalty_norm_cap": 0.0},
                {"penalty_estimator": "monotone", "penalty_norm_cap": True},
                {"penalty_estimator": "monotone", "penalty_norm_weight": 1e-3},
                {"penalty_estimator": "monotone", "penalty_norm_cap": 1.5,
                 "penalty_norm_weight": -1.0},
                {"penalty_estimator": "monotone", "penalty_norm_cap": 1.5,
                 "penalty_norm_weight": math.inf},
                {"skip": True, "constraint": "sn"}, {"skip": 1}):
        with pytest.raises(ConfigError):
            TrainConfig(data="d", out="m.pt", **bad)  # type: ignore[arg-type]


def test_jacobian_free_training_runs_without_backward_solves(data: dict[str, Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "jfb.pt"
    train(tiny(data["2d"], out, gradient="jfb", max_steps=3, val_every=3, checkpoint_every=3))
    steps = step_records(output_paths(out)["log"])
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["bwd_iterations"] is None and r["fwd_iterations"] >= 1 for r in steps)
    assert load_checkpoint(out).metadata["config"]["gradient"] == "jfb"
    with pytest.raises(ConfigError, match="gradient"):
        tiny(data["2d"], out, gradient="phantom")
