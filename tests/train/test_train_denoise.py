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

from _builders import Crash, crash_at, records, tiny_config
from molrecon.cli import app
from molrecon.errors import ConfigError
from molrecon.models.checkpoint import load_checkpoint, save_checkpoint
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import output_paths, train
from molrecon.train.data import MaskSpec, list_raw_files, load_folder
from molrecon.train.patches import PatchSpec, degraded_bank, draw_patch, sample_scales

runner = CliRunner()


def _folder(root: Path, kind: str, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    matrix = {"2d": (48, 48), "3d": (32, 32, 8)}[kind]
    for i in range(count):
        cfg = SimulationConfig(kind=kind, matrix=matrix, coils=4, acceleration=1.0, seed=40 + i,
                               slice_position=0.35 + 0.08 * i)
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


def test_patch_spec_is_checked() -> None:
    for bad in ({"size": 4}, {"sigma_min": 0.0}, {"sigma_min": 0.2, "sigma_max": 0.1},
                {"jitter": 0.5}, {"gamma": 0.9}, {"background": -1.0}, {"sense_fraction": 1.5},
                {"sense_masks": 0}):
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


def test_denoise_refuses_other_kinds_a_changed_stage_and_unrolling(folder2d: Path,
                                                                   tmp_path: Path) -> None:
    vol = _folder(tmp_path / "d3", "3d", 1)
    with pytest.raises(ConfigError, match="2d data"):
        train(denoise(vol, tmp_path / "v.pt", val_fraction=0.0))
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
    cfg = load_checkpoint(out).metadata["config"]
    assert cfg["patch"]["size"] == 16 and cfg["patch"]["sigma_min"] == 0.02
    bad = runner.invoke(app, ["train", "--data", str(folder2d), "--out", str(tmp_path / "d.pt"),
                              "--stage", "denoise", "--sigma", "0.1,0.01"])
    assert bad.exit_code == 2
    assert not (tmp_path / "d.pt").exists()
