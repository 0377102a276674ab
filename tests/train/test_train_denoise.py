"""Stage-0 pretraining (`molrecon train --stage denoise`): the patches it draws, the run,
its exact resume, and its refusals.

Data: three fully sampled 48×48 4-coil 2D slices simulated in tmp_path; the
network is tiny (3 layers × 8 channels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _builders import Crash, crash_at, probe_norms, records, tiny_config
from molrecon.cli import app
from molrecon.deq.mol import MolStep
from molrecon.errors import ConfigError
from molrecon.models.checkpoint import load_checkpoint, save_checkpoint
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import output_paths, train
from molrecon.train.data import MaskSpec, list_raw_files, load_folder, split_dataset
from molrecon.train.patches import PatchSpec, degraded_bank, draw_patch, sample_scales
from molrecon.train.validate import _val_problems, evaluate

runner = CliRunner()


def _folder(root: Path, kind: str, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    matrix = {"2d": (48, 48), "3d": (32, 32, 8), "2dt": (32, 32)}[kind]
    for i in range(count):
        frames = {"frames": 6} if kind == "2dt" else {}
        cfg = SimulationConfig(kind=kind, matrix=matrix, coils=4, acceleration=1.0, seed=40 + i,
                               slice_position=0.35 + 0.08 * i, **frames)
        simulate_to_file(cfg, root / f"{kind}_{i}.h5")
    return root


@pytest.fixture(scope="module")
def folder2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("den") / "d2", "2d", 3)


@pytest.fixture(scope="module")
def dataset(folder2d: Path) -> Any:
    return load_folder(list_raw_files(folder2d), "2d")


def denoise(data: Path, out: Path, **changes: Any) -> Any:
    base: dict[str, Any] = {"stage": "denoise", "batch_size": 4, "max_steps": 6,
                            "patch": PatchSpec(size=24), "constraint": "lr",
                            "penalty_weight": 1e-3, "penalty_every": 2}
    base.update(changes)
    return tiny_config(data, out, **base)


# ----------------------------------------------------------------------------- the patches
def test_scales_are_reconstructions_intensity_scale(dataset: Any) -> None:
    """Bright tissue of every normalised target sits near 1 (the scale of reconstruction)."""
    scales = sample_scales(dataset.samples, "2d", MaskSpec(acceleration=4.0, acs=8), seed=0)
    assert len(scales) == len(dataset)
    for sample, s in zip(dataset.samples, scales):
        p99 = float(np.percentile(np.abs(sample.target.numpy()) / s, 99))
        assert 0.5 < p99 < 2.0, p99


def test_patch_shapes_noise_level_and_determinism(dataset: Any) -> None:
    sample = dataset.samples[0]
    spec = PatchSpec(size=24, sigma_min=0.05, sigma_max=0.05, jitter=1.0, gamma=1.0)
    noisy, clean = draw_patch(sample, 1.0, spec, np.random.default_rng(3))
    assert noisy.shape == clean.shape == (1, 24, 24)
    assert noisy.is_complex() and clean.is_complex()
    # E|n|² = σ²: the measured noise power of 576 samples is within 20 % of it.
    power = float((noisy - clean).abs().square().mean())
    assert math.isclose(power, 0.05 ** 2, rel_tol=0.2), power
    again = draw_patch(sample, 1.0, spec, np.random.default_rng(3))
    assert torch.equal(noisy, again[0]) and torch.equal(clean, again[1])
    other = draw_patch(sample, 1.0, spec, np.random.default_rng(4))
    assert not torch.equal(noisy, other[0])


def test_patch_is_the_scaled_target_up_to_flips_and_a_global_phase(dataset: Any) -> None:
    """Without the power curve (γ = 1) a clean patch's magnitudes are a window of |target|/s."""
    sample = dataset.samples[1]
    spec = PatchSpec(size=16, jitter=1.0, gamma=1.0, background=0.0)
    _, clean = draw_patch(sample, 2.0, spec, np.random.default_rng(0))
    mags = np.sort(np.abs(clean.numpy()).ravel())
    full = np.abs(sample.target[0, 0].numpy()) / 2.0
    found = False
    for y in range(full.shape[0] - 15):
        for x in range(full.shape[1] - 15):
            if np.allclose(np.sort(full[y:y + 16, x:x + 16].ravel()), mags, rtol=1e-5, atol=1e-7):
                found = True
                break
        if found:
            break
    assert found


def test_sense_patches_are_windows_of_the_regularised_sense_image(dataset: Any) -> None:
    """The degraded patch is the MOL start image (aliased, noisy) on the same window as the
    clean one: same flips and phase, farther from the clean patch than noise of σ = 1 %."""
    spec = MaskSpec(family="random", acceleration=3.0, acs=8)
    bank = degraded_bank(dataset.samples, "2d", spec, lam=100.0, iters=10, count=2, seed=0)
    assert len(bank) == len(dataset) and all(len(pairs) == 2 for pairs in bank)
    x0, target = bank[0][0]
    assert x0.shape == target.shape == dataset.samples[0].target.shape[-2:]
    assert not torch.equal(bank[0][0][0], bank[0][1][0])          # two different masks
    p = PatchSpec(size=16, sense_fraction=1.0, jitter=1.0, background=0.0)
    noisy, clean = draw_patch(dataset.samples[0], 1.0, p, np.random.default_rng(1), bank[0])
    # Undo the unknown flips/phase by trying all of them against the bank pair's windows.
    found = False
    for a, b in bank[0]:
        for y in range(a.shape[0] - 15):
            for x in range(a.shape[1] - 15):
                wa, wb = a[y:y + 16, x:x + 16], b[y:y + 16, x:x + 16]
                if np.allclose(np.sort(wb.abs().numpy().ravel()),
                               np.sort(clean[0].abs().numpy().ravel()), rtol=1e-5, atol=1e-7):
                    found = np.allclose(np.sort(wa.abs().numpy().ravel()),
                                        np.sort(noisy[0].abs().numpy().ravel()), rtol=1e-5,
                                        atol=1e-7)
                    break
            if found:
                break
    assert found
    err = float((noisy - clean).abs().square().mean() / clean.abs().square().mean())
    assert err > 1e-4


@pytest.fixture(scope="module")
def folder2dt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("den") / "dt", "2dt", 2)


def _windows(volume: np.ndarray, d: int, p: int) -> Any:
    """Every (d, p, p) window of a (D, Y, X) array, with its sorted values per plane."""
    for z in range(volume.shape[0] - d + 1):
        for y in range(volume.shape[1] - p + 1):
            for x in range(volume.shape[2] - p + 1):
                yield (z, y, x), volume[z:z + d, y:y + p, x:x + p]


def _same_planes(block: np.ndarray, window: np.ndarray) -> bool:
    """``block`` equals ``window`` up to one flip/transposition of its planes and a reversal
    of their order: each plane's sorted magnitudes, in one of the two orders."""
    a = [np.sort(plane.ravel()) for plane in block]
    b = [np.sort(plane.ravel()) for plane in window]
    return any(all(np.allclose(u, v, rtol=1e-5, atol=1e-7) for u, v in zip(a, order))
               for order in (b, b[::-1]))


def test_volume_patches_are_blocks_of_consecutive_frames(folder2dt: Path) -> None:
    """For a network with 3D convolutions a 2D+time patch is the same window in d consecutive
    frames (flipped alike, maybe played backwards) of |target|/s; noise of the asked level."""
    data = load_folder(list_raw_files(folder2dt), "2dt")
    sample = data.samples[0]
    frames = sample.target.shape[1]
    spec = PatchSpec(size=12, depth=4, jitter=1.0, gamma=1.0, background=0.0,
                     sigma_min=0.05, sigma_max=0.05)
    full = np.abs(sample.target[0].numpy()) / 2.0                       # (T, Y, X)
    reversed_seen = set()
    for seed in range(4):
        noisy, clean = draw_patch(sample, 2.0, spec, np.random.default_rng(seed), volume=True)
        assert noisy.shape == clean.shape == (4, 12, 12)
        block = np.abs(clean.numpy())
        hits = [w for w, win in _windows(full, 4, 12) if _same_planes(block, win)]
        assert hits, seed
        power = float((noisy - clean).abs().square().mean())
        assert math.isclose(power, 0.05 ** 2, rel_tol=0.2), power
        # which order the frames came in (a moving series tells them apart)
        z, y, x = hits[0]
        fwd = [np.sort(p.ravel()) for p in full[z:z + 4, y:y + 12, x:x + 12]]
        reversed_seen.add(not all(np.allclose(u, np.sort(v.ravel()), rtol=1e-5, atol=1e-7)
                                  for u, v in zip(fwd, block)))
    # more frames asked than the series has: all of them
    deep = PatchSpec(size=12, depth=frames + 5)
    noisy, _ = draw_patch(sample, 2.0, deep, np.random.default_rng(0), volume=True)
    assert noisy.shape == (frames, 12, 12)
    # the 2D draw of the same sample is unchanged by the option: one frame
    flat, _ = draw_patch(sample, 2.0, spec, np.random.default_rng(0))
    assert flat.shape == (1, 12, 12)


def test_volume_sense_bank_holds_whole_series(folder2dt: Path) -> None:
    data = load_folder(list_raw_files(folder2dt), "2dt")
    mask = MaskSpec(family="interleaved", acceleration=3.0, acs=8)
    bank = degraded_bank(data.samples, "2dt", mask, lam=100.0, iters=5, count=1, seed=0)
    x0, target = bank[0][0]
    assert x0.shape == target.shape == data.samples[0].target.shape[1:]
    spec = PatchSpec(size=12, depth=3, sense_fraction=1.0, jitter=1.0, background=0.0)
    noisy, clean = draw_patch(data.samples[0], 1.0, spec, np.random.default_rng(2), bank[0],
                              volume=True)
    assert noisy.shape == clean.shape == (3, 12, 12)
    hits = [w for w, win in _windows(np.abs(target.numpy()), 3, 12)
            if _same_planes(np.abs(clean.numpy()), win)]
    assert hits
    z, y, x = hits[0]
    assert _same_planes(np.abs(noisy.numpy()), np.abs(x0.numpy())[z:z + 3, y:y + 12, x:x + 12])
    assert float((noisy - clean).abs().square().mean()) > 0


def test_patch_spec_is_checked() -> None:
    for bad in ({"size": 4}, {"sigma_min": 0.0}, {"sigma_min": 0.2, "sigma_max": 0.1},
                {"jitter": 0.5}, {"gamma": 0.9}, {"background": -1.0}, {"sense_fraction": 1.5},
                {"sense_masks": 0}, {"depth": 0}):
        with pytest.raises(ConfigError):
            PatchSpec(**bad)


# ----------------------------------------------------------------------------- the run
@pytest.mark.parametrize("skip", [False, True])
def test_denoise_run_learns_and_writes_a_model_that_reconstructs(folder2d: Path,
                                                                  tmp_path: Path,
                                                                  skip: bool) -> None:
    out = tmp_path / "m.pt"
    result = train(denoise(folder2d, out, max_steps=30, val_every=30, checkpoint_every=30,
                           lr=3e-3, val_fraction=0.34, skip=skip))
    assert result.steps == 30
    recs = records(output_paths(out)["log"])
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["fwd_iterations"] is None for r in steps)      # no DEQ solve in stage 0
    assert any("lipschitz_local" in r for r in steps)           # the LR penalty ran
    first, last = np.mean([r["loss"] for r in steps[:5]]), np.mean([r["loss"] for r in steps[-5:]])
    # the skip model starts at H = I, whose loss is already the noise's, not the image's
    assert last < (0.85 if skip else 0.7) * first, (first, last)
    # Validation is the full MOL reconstruction, and the model is a regular checkpoint.
    assert steps[-1]["val_psnr"] is not None and steps[-1]["val_iterations"] >= 1
    loaded = load_checkpoint(out)
    assert loaded.metadata["config"]["stage"] == "denoise"
    assert loaded.kinds == ("2d", "2dt", "3d")
    assert loaded.model.config.skip == (1.0 if skip else 0.0)


def test_skip_gain_comes_from_the_init_and_survives_a_resume(folder2d: Path,
                                                              tmp_path: Path) -> None:
    """A skip network scaled to the bound (gain 0.8) starts a run with its gain; a resume
    without --init keeps it (the gain is not a weight: the state carries it)."""
    first = tmp_path / "a.pt"
    train(denoise(folder2d, first, max_steps=2, val_every=2, checkpoint_every=2, skip=True))
    loaded = load_checkpoint(first)
    loaded.model.scale_output(0.8)
    scaled = save_checkpoint(tmp_path / "scaled.pt", loaded.model, loaded.mol_config)
    out = tmp_path / "b.pt"
    train(denoise(folder2d, out, max_steps=2, val_every=2, checkpoint_every=2, skip=True,
                  init_weights=str(scaled)))
    assert load_checkpoint(out).model.config.skip == pytest.approx(0.8)
    train(denoise(folder2d, out, max_steps=4, val_every=2, checkpoint_every=2, skip=True,
                  resume=True))
    assert load_checkpoint(output_paths(out)["last"]).model.config.skip == pytest.approx(0.8)


def test_ema_saves_and_validates_the_average_and_resumes_exactly(folder2d: Path,
                                                                 tmp_path: Path) -> None:
    """--ema: the saved models are the moving average of the weights (not the raw weights
    the state trains on), the validation record is the average's, and an interrupted run
    resumes to the same average as an uninterrupted one."""
    common = {"max_steps": 6, "val_every": 3, "checkpoint_every": 2, "ema": 0.5,
              "patch": PatchSpec(size=24, sense_fraction=0.0)}
    full = tmp_path / "full" / "m.pt"
    full.parent.mkdir()
    train(denoise(folder2d, full, **common))
    paths = output_paths(full)
    state = torch.load(paths["state"], weights_only=True)
    assert state["ema"]["updates"] == 6
    last = load_checkpoint(paths["last"])
    raw = {k.removeprefix("prior."): v for k, v in state["step"].items()
           if k.startswith("prior.")}
    avg = {k.removeprefix("prior."): v for k, v in state["ema"]["step"].items()
           if k.startswith("prior.")}
    saved = last.model.state_dict()
    assert all(torch.equal(saved[k], avg[k]) for k in saved)
    assert any(not torch.allclose(saved[k], raw[k]) for k in saved)   # not the raw weights
    # the last validation (step 6) is the saved average's: evaluate it again
    config = denoise(folder2d, tmp_path / "x.pt", **common)
    _, val_set = split_dataset(load_folder(list_raw_files(folder2d), "2d"),
                               config.val_fraction, config.seed)
    logged = [r for r in records(paths["log"]) if r.get("step") == 6 and "val_psnr" in r][0]
    again = evaluate(MolStep(last.model, last.mol_config),
                     _val_problems(val_set, config, torch.device("cpu")), config, [])
    assert again["val_psnr"] == pytest.approx(logged["val_psnr"], abs=1e-4)

    part = tmp_path / "part" / "m.pt"
    part.parent.mkdir()
    with pytest.raises(Crash):
        train(denoise(folder2d, part, **common), on_record=crash_at(5))
    train(denoise(folder2d, part, **common, resume=True))
    b = load_checkpoint(output_paths(part)["last"]).model.state_dict()
    for name in saved:
        assert torch.equal(saved[name], b[name]), name
    # a run without --ema resumed with it: the average starts at the resumed weights
    plain = tmp_path / "plain" / "m.pt"
    plain.parent.mkdir()
    train(denoise(folder2d, plain, **{**common, "ema": 0.0, "max_steps": 2}))
    train(denoise(folder2d, plain, **{**common, "max_steps": 3}, resume=True))
    assert torch.load(output_paths(plain)["state"], weights_only=True)["ema"]["updates"] == 1
    for bad in (1.0, -0.1, True):
        with pytest.raises(ConfigError, match="ema must be"):
            denoise(folder2d, tmp_path / "bad.pt", ema=bad)


def test_interrupted_denoise_run_resumes_exactly(folder2d: Path, tmp_path: Path) -> None:
    common = {"max_steps": 6, "val_every": 3, "checkpoint_every": 2,
              "patch": PatchSpec(size=24, sense_fraction=0.5, sense_masks=1)}
    full = tmp_path / "full" / "m.pt"
    full.parent.mkdir()
    train(denoise(folder2d, full, **common))

    part = tmp_path / "part" / "m.pt"
    part.parent.mkdir()

    with pytest.raises(Crash):
        train(denoise(folder2d, part, **common), on_record=crash_at(5))
    saved = torch.load(output_paths(part)["state"], weights_only=True)["elapsed_s"]
    train(denoise(folder2d, part, **common, resume=True))
    # The run's clock continues across the resume: a learning curve against compute time.
    clock = [r["elapsed_s"] for r in records(output_paths(part)["log"]) if "loss" in r]
    assert clock == sorted(clock) and clock[-1] > saved > 0
    a = load_checkpoint(output_paths(full)["last"]).model.state_dict()
    b = load_checkpoint(output_paths(part)["last"]).model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_denoise_trains_a_spatiotemporal_prior_from_a_2d_one(folder2d: Path, folder2dt: Path,
                                                            tmp_path: Path) -> None:
    """Stage 0 on 2D+time data: a 3D-convolution network, started from a 2D skip model
    (inflated: the same network frame by frame), learns on blocks of frames and is a
    2dt checkpoint whose validation is the full MOL reconstruction of the series."""
    first = tmp_path / "2d.pt"
    train(denoise(folder2d, first, max_steps=2, val_every=2, checkpoint_every=2, skip=True))
    out = tmp_path / "dt.pt"
    mask = MaskSpec(family="interleaved", acceleration=3.0, acs=8)
    spec = PatchSpec(size=16, depth=4, sigma_min=0.3, sigma_max=0.3)
    result = train(denoise(folder2dt, out, max_steps=40, val_every=40, checkpoint_every=40,
                           lr=3e-3, skip=True, init_weights=str(first), mask=mask,
                           val_fraction=0.5,
                           penalty_weight=1e-6, patch=spec))
    assert result.steps == 40
    steps = [r for r in records(output_paths(out)["log"]) if "loss" in r]
    first_loss = np.mean([r["loss"] for r in steps[:5]])
    last_loss = np.mean([r["loss"] for r in steps[-5:]])
    assert last_loss < 0.9 * first_loss, (first_loss, last_loss)
    assert any("lipschitz_local" in r for r in steps)
    assert steps[-1]["val_psnr"] is not None and steps[-1]["val_iterations"] >= 1
    loaded = load_checkpoint(out)
    assert loaded.kinds == ("2dt",) and loaded.model.config.dims == 3
    assert loaded.metadata["config"]["patch"]["depth"] == 4
    # It denoises blocks it has not seen (the inflated start is I plus a 2-step 2D model).
    data = load_folder(list_raw_files(folder2dt), "2dt")
    pairs = [draw_patch(data.samples[k % 2], 1.0, spec, np.random.default_rng(100 + k),
                        volume=True) for k in range(8)]
    noisy = torch.stack([a for a, _ in pairs])
    clean = torch.stack([b for _, b in pairs])
    with torch.no_grad():
        err = float((loaded.model(noisy) - clean).abs().square().mean())
    assert err < 0.85 * float((noisy - clean).abs().square().mean())


def test_denoise_refuses_a_changed_stage_and_unrolling(folder2d: Path, tmp_path: Path) -> None:
    vol = _folder(tmp_path / "d3", "3d", 1)
    train(denoise(vol, tmp_path / "v.pt", val_fraction=0.0,          # 3D volumes: blocks too
                  patch=PatchSpec(size=16, depth=4)))
    assert load_checkpoint(tmp_path / "v.pt").model.config.dims == 3
    with pytest.raises(ConfigError, match="unrolled"):
        denoise(folder2d, tmp_path / "u.pt", unroll=2)
    with pytest.raises(ConfigError, match="stage"):
        denoise(folder2d, tmp_path / "u.pt", stage="pretrain")
    out = tmp_path / "s.pt"
    train(denoise(folder2d, out, max_steps=2, val_every=2, checkpoint_every=2))
    from molrecon.errors import CheckpointError

    with pytest.raises(CheckpointError, match="stage"):
        train(tiny_config(folder2d, out, constraint="lr", max_steps=4, resume=True))


def test_cli_denoise_options(folder2d: Path, tmp_path: Path) -> None:
    out = tmp_path / "c.pt"
    res = runner.invoke(app, ["train", "--data", str(folder2d), "--out", str(out), "--stage",
                              "denoise", "--patch", "16", "--sigma", "0.02,0.08", "--batch-size",
                              "2", "--max-steps", "2", "--val-every", "2", "--layers", "3",
                              "--channels", "8", "--acs", "8", "-R", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "step      2/2" in res.output and "DEQ it" not in res.output
    assert "at its fixed points" in res.output          # the norm beside validation PSNR
    cfg = load_checkpoint(out).metadata["config"]
    assert cfg["patch"]["size"] == 16 and cfg["patch"]["sigma_min"] == 0.02
    bad = runner.invoke(app, ["train", "--data", str(folder2d), "--out", str(tmp_path / "e.pt"),
                              "--stage", "denoise", "--patch-depth", "0"])
    assert bad.exit_code == 2 and "--patch-depth" in bad.output
    assert not (tmp_path / "e.pt").exists()
    bad = runner.invoke(app, ["train", "--data", str(folder2d), "--out", str(tmp_path / "d.pt"),
                              "--stage", "denoise", "--sigma", "0.1,0.01"])
    assert bad.exit_code == 2
    assert not (tmp_path / "d.pt").exists()


@pytest.mark.parametrize("where, expected", [("noisy", [2.0]), ("clean", [1.0]),
                                             ("both", [1.0, 2.0]),
                                             ("clean,image", [1.0, "image"])])
def test_penalty_at_chooses_the_patch_the_barrier_measures(folder2d: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            where: str,
                                                            expected: list[float]) -> None:
    """--penalty-at: the Lanczos penalty of stage 0 measures H at the noisy input, the clean
    patch (where MOL's nearly clean fixed points lie), both, or also the whole clean image.
    Marked patches (noisy ≡ 2, clean ≡ 1, 16²) show which points the estimator was given;
    the whole image is the 48² slice."""
    from molrecon.train import step as step_module

    def marked(sample: Any, scale: float, spec: PatchSpec, rng: Any, degraded: Any = None,
               *, volume: bool = False) -> tuple[Any, Any]:
        ones = torch.ones((1, 16, 16), dtype=torch.complex64)
        return 2 * ones, ones

    seen: list[Any] = []
    real = step_module.lanczos_jacobian_norm

    def spy(prior: Any, x: Any, **kw: Any) -> Any:
        if tuple(x.shape) == (1, 1, 48, 48):
            seen.append("image")
        else:
            assert tuple(x.shape) == (1, 1, 16, 16)
            seen.append(pytest.approx(float(x.real.mean())))
        return real(prior, x, **kw)

    monkeypatch.setattr(step_module, "draw_patch", marked)
    monkeypatch.setattr(step_module, "lanczos_jacobian_norm", spy)
    train(denoise(folder2d, tmp_path / "p.pt", max_steps=2, val_every=2, checkpoint_every=2,
                  penalty_estimator="lanczos", penalty_steps=4, penalty_every=1,
                  penalty_at=where, skip=True))
    assert seen == expected * 2                         # two steps, each with its points


def test_penalty_at_is_checked(folder2d: Path, tmp_path: Path) -> None:
    for bad in ("target", "clean,clean", "", "both,image"):
        with pytest.raises(ConfigError, match="penalty_at"):
            denoise(folder2d, tmp_path / "x.pt", penalty_at=bad)
    with pytest.raises(ConfigError, match="fixed points"):
        tiny_config(folder2d, tmp_path / "x.pt", constraint="lr", penalty_at="clean")


def test_validation_logs_the_norm_at_its_fixed_points(folder2d: Path, tmp_path: Path) -> None:
    """Every validation record carries val_lipschitz, the largest local estimate at its own
    fixed points, and the checkpoint saved at that step certifies the same number."""
    out = tmp_path / "v.pt"
    train(denoise(folder2d, out, max_steps=4, val_every=2, checkpoint_every=4, skip=True,
                  val_fraction=0.34))
    vals = [r for r in records(output_paths(out)["log"])
            if r.get("val_psnr") is not None and "loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    assert all(0.3 < r["val_lipschitz"] < 3.0 for r in vals)
    cert = load_checkpoint(output_paths(out)["last"]).certificate
    assert cert["local_max"] == pytest.approx(vals[-1]["val_lipschitz"])
    assert cert["local_lanczos"] and max(cert["local_lanczos"]) <= cert["local_max"]


def test_best_model_only_at_the_bound(folder2d: Path, tmp_path: Path) -> None:
    """--best-max-lipschitz: a validation whose fixed points read above the limit never makes
    the best model; under a limit every model meets, the run chooses as without one."""
    strict = train(denoise(folder2d, tmp_path / "a.pt", max_steps=4, val_every=2,
                           checkpoint_every=2, skip=True, val_fraction=0.34,
                           best_max_lipschitz=0.01))
    assert strict.best_val_psnr is None
    loose = train(denoise(folder2d, tmp_path / "b.pt", max_steps=4, val_every=2,
                          checkpoint_every=2, skip=True, val_fraction=0.34,
                          best_max_lipschitz=10.0))
    vals = [r["val_psnr"] for r in records(output_paths(tmp_path / "b.pt")["log"])
            if r.get("val_psnr") is not None and "loss" in r]
    assert loose.best_val_psnr == pytest.approx(max(vals))
    with pytest.raises(ConfigError, match="best_max_lipschitz"):
        denoise(folder2d, tmp_path / "c.pt", best_max_lipschitz=0.0)


def test_project_bound_holds_a_stage_zero_model_at_the_bound(folder2d: Path,
                                                             tmp_path: Path) -> None:
    """--project-bound in stage 0: the denoising loss grows H, and on every project_every-th
    step the largest Jacobian norm at the MOL fixed points of whole training scans is logged
    and the output scaled to T; re-measured with the saved model there, it reads T."""
    bound = 0.3
    out = tmp_path / "p.pt"
    config = denoise(folder2d, out, max_steps=4, val_every=4, checkpoint_every=4, lr=3e-2,
                     penalty_weight=0.0, project_bound=bound, project_every=2,
                     penalty_probes=2)
    train(config)
    projected = [r for r in records(output_paths(out)["log"]) if "probe_lipschitz" in r]
    assert [r["step"] for r in projected] == [2, 4]
    last = projected[-1]
    assert last["probe_lipschitz"] > bound
    assert last["output_scale"] == pytest.approx(bound / last["probe_lipschitz"])
    assert max(probe_norms(config, output_paths(out)["last"])) == pytest.approx(bound, rel=1e-2)


def test_volume_validation_measures_the_norm_on_whole_series(folder2dt: Path,
                                                             tmp_path: Path) -> None:
    """A 2D+time run's validation reads the Jacobian norm at its whole fixed points, as the
    certificate does (a crop is another operator): val_lipschitz equals the largest Lanczos
    value at the whole series, re-measured from the saved model; a checkpoint saved between
    validations keeps the global bound only."""
    from molrecon.models.certificate import certificate_for
    from molrecon.train.loop import _load_data

    out = tmp_path / "v.pt"
    spec = PatchSpec(size=16, depth=4, sigma_min=0.1, sigma_max=0.1)
    mask = MaskSpec(family="interleaved", acceleration=3.0, acs=8)
    config = denoise(folder2dt, out, max_steps=3, val_every=2, checkpoint_every=1, skip=True,
                     val_fraction=0.5, mask=mask, patch=spec, val_points=1)
    train(config)
    vals = [r for r in records(output_paths(out)["log"])
            if r.get("val_psnr") is not None and "loss" in r]
    assert [r["step"] for r in vals] == [2, 3]        # the cadence and the last step
    cert = load_checkpoint(output_paths(out)["last"]).certificate
    assert cert["local_max"] == pytest.approx(vals[-1]["val_lipschitz"])
    assert cert["lanczos_steps"] == 20
    loaded = load_checkpoint(output_paths(out)["last"])
    _, _, val_set = _load_data(config, lambda _: None)
    problems = _val_problems(val_set, config, torch.device("cpu"))
    fps: list[Any] = []
    evaluate(MolStep(loaded.model, loaded.mol_config), problems, config, fps)
    assert len(fps) >= 1 and cert["points"] == 1       # --val-points 1: the first only
    again = certificate_for(loaded.model, fps[:1], power_iters=10, ratio_steps=0,
                            lanczos_steps=20, seed=config.seed)
    assert max(cert["local_lanczos"]) == pytest.approx(max(again["local_lanczos"]), rel=1e-3)
    # Between validations (step 1's save, since overwritten): no local estimate.
    from molrecon.train.validate import _certificate
    assert _certificate(loaded.model, fps, 0, local=False).get("local_max") is None
    assert _certificate(loaded.model, fps, 0)["local_max"] is not None
    # Whole series larger than the 64² a crop would keep, six of them: four spread over the
    # list (the first, the last and two between), each read whole.
    gen = torch.Generator().manual_seed(5)
    six = [torch.randn(1, 4, 72, 72, dtype=torch.complex64, generator=gen) * (1 + k)
           for k in range(6)]
    got = _certificate(loaded.model, six, 0)
    assert got["points"] == 4
    want = certificate_for(loaded.model, [six[i] for i in (0, 2, 3, 5)], power_iters=10,
                           ratio_steps=0, lanczos_steps=20, seed=0)
    assert got["local_lanczos"] == pytest.approx(want["local_lanczos"], rel=1e-4)
    two = _certificate(loaded.model, six, 0, points=2)            # the first and the last
    assert two["points"] == 2
    assert two["local_lanczos"] == pytest.approx([want["local_lanczos"][i] for i in (0, 3)],
                                                 rel=1e-4)


def test_spread_indices_take_the_ends_and_spread_between() -> None:
    """The validation items and the certificate's points: spread, ends included, never more
    than there are."""
    from molrecon.train.validate import spread_indices

    assert spread_indices(6, 4) == [0, 2, 3, 5]
    assert spread_indices(3, 8) == [0, 1, 2]
    assert spread_indices(5, 1) == [0]
    assert spread_indices(5, 0) == [] and spread_indices(0, 4) == []
