"""Training set-ups that match reconstruction: noise added per problem over a range
(``--noise LOW,HIGH``), validation noise (``--val-noise``), coil maps from each problem's own
calibration lines (``--maps calibration``) and λ set by the ``--init`` model's noise rule
(``--lam-from-noise``).

Data: three simulated 48×48 4-coil slices; the network is tiny (3 layers × 8 channels).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _builders import records, tiny_config
from molrecon.cli import app
from molrecon.errors import ConfigError
from molrecon.models.checkpoint import load_checkpoint, save_checkpoint
from molrecon.physics.noise import NoiseLambdaRule, effective_acceleration, periphery_sigma
from molrecon.problem import undersampled
from molrecon.sim import SimulationConfig, simulate_to_file
from molrecon.train import train
from molrecon.train.data import MaskSpec, draw_mask, list_raw_files, load_folder, make_problem

runner = CliRunner()
RULE = NoiseLambdaRule(sigma_ref=0.002, exponent=1.5, min_factor=0.05, max_factor=1.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("noise_data") / "2d"
    root.mkdir()
    for i in range(3):
        cfg = SimulationConfig(kind="2d", matrix=(48, 48), coils=4, seed=i, acceleration=1.0,
                               slice_position=0.35 + 0.08 * i)
        simulate_to_file(cfg, root / f"s{i}.h5")
    return root


@pytest.fixture(scope="module")
def sample(folder: Path) -> Any:
    return load_folder(list_raw_files(folder), "2d").samples[0]


@pytest.fixture(scope="module")
def ruled(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny trained model, saved once as it is and once with :data:`RULE`."""
    tmp = tmp_path_factory.mktemp("ruled")
    train(tiny_config(folder, tmp / "plain.pt", constraint="lr"))
    loaded = load_checkpoint(tmp / "plain.pt")
    path = save_checkpoint(tmp / "ruled.pt", loaded.model, loaded.mol_config,
                           kinds=loaded.kinds, lam_noise=RULE)
    return {"plain": tmp / "plain.pt", "ruled": path}


SPEC = MaskSpec(acceleration=3.0, acs=12)


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_calibration_maps_are_estimated_and_the_target_keeps_its_magnitude(
        sample: Any, noise: float) -> None:
    ref = make_problem(sample, "2d", SPEC, np.random.default_rng(3), noise, "cpu")
    cal = make_problem(sample, "2d", SPEC, np.random.default_rng(3), noise, "cpu",
                       maps_from="calibration")
    assert torch.equal(ref.op.mask, cal.op.mask) and torch.equal(ref.kspace, cal.kspace)
    assert torch.equal(ref.op.maps, sample.maps)        # the reference problem: the file's maps
    assert not torch.allclose(cal.op.maps, ref.op.maps, atol=1e-3)
    torch.testing.assert_close(cal.target.abs(), ref.target.abs())
    # its phase is that of the fully sampled reference, without the added noise, combined
    # with the estimated maps: the target holds no noise, in magnitude or in phase
    full = cal.op.__class__(cal.op.maps, torch.ones_like(cal.op.mask), "2d").adjoint(
        sample.kspace / cal.scale.reshape(-1)[0])
    inside = cal.target.abs() > 0.02 * float(cal.target.abs().max())
    assert float((cal.target * full.conj())[inside].angle().abs().max()) < 1e-3


def test_a_noise_rule_sets_the_lambda_factor_from_the_whole_problem(sample: Any) -> None:
    rng = np.random.default_rng(5)
    mask = draw_mask(sample, "2d", SPEC, rng)
    whole = undersampled(sample.kspace, sample.maps, sample.target, mask, "2d",
                         np.random.default_rng(1), 0.05, "cpu", lam_rule=RULE)
    block = undersampled(sample.kspace, sample.maps, sample.target, mask, "2d",
                         np.random.default_rng(1), 0.05, "cpu", readout_block=16, lam_rule=RULE)
    sigma = periphery_sigma(whole.kspace, whole.op.mask, "2d")[0]
    assert sigma is not None
    want = RULE.factor(sigma, effective_acceleration(whole.op.mask, 1)[0])
    assert want < 1.0                     # 0.05 of added noise lies far above sigma_ref
    assert float(whole.lam_scale[0]) == pytest.approx(want, rel=1e-6)
    # the readout block is cut after σ is read: the same factor as the whole slice
    assert float(block.lam_scale[0]) == pytest.approx(want, rel=1e-6)
    assert undersampled(sample.kspace, sample.maps, sample.target, mask, "2d",
                        np.random.default_rng(1), 0.05, "cpu").lam_scale is None


def test_a_noise_range_is_drawn_log_uniformly_and_checked(folder: Path, tmp_path: Path) -> None:
    config = tiny_config(folder, tmp_path / "m.pt", extra_noise=0.01, extra_noise_max=0.1)
    rng = np.random.default_rng(0)
    draws = np.array([config.draw_noise(rng) for _ in range(4000)])
    assert draws.min() >= 0.01 and draws.max() <= 0.1
    # log-uniform: the geometric middle splits the draws in half
    assert abs(np.mean(draws < math.sqrt(0.01 * 0.1)) - 0.5) < 0.03
    fixed = tiny_config(folder, tmp_path / "m.pt", extra_noise=0.02)
    assert fixed.draw_noise(rng) == 0.02
    for bad in ({"extra_noise": 0.0, "extra_noise_max": 0.1},
                {"extra_noise": 0.2, "extra_noise_max": 0.1},
                {"val_noise": (0.01, -1.0)}, {"maps": "exact"}, {"val_maps": "espirit"},
                {"lam_from_noise": True}):
        with pytest.raises(ConfigError):
            tiny_config(folder, tmp_path / "m.pt", **bad)


def test_lam_from_noise_trains_with_the_rule_and_keeps_it(folder: Path, ruled: dict[str, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "m.pt"
    result = train(tiny_config(folder, out, constraint="lr", init_weights=str(ruled["ruled"]),
                               lam_from_noise=True, extra_noise=0.02, extra_noise_max=0.08,
                               maps="calibration", val_maps="calibration",
                               val_noise=(0.02, 0.06), lam_lr=0.0))
    assert result.steps == 2
    for path in (out, out.with_name("m.last.pt")):
        assert load_checkpoint(path).lam_noise == RULE
    vals = [r for r in records(out.with_name("m.log.jsonl")) if "val_psnr" in r]
    assert vals and all(math.isfinite(r["val_psnr"]) for r in vals)
    # without the option the rule is not carried (the run's λ is fixed)
    plain = train(tiny_config(folder, tmp_path / "p.pt", constraint="lr",
                              init_weights=str(ruled["ruled"])))
    assert plain.steps == 2 and load_checkpoint(tmp_path / "p.pt").lam_noise is None
    with pytest.raises(ConfigError, match="noise rule"):
        train(tiny_config(folder, tmp_path / "q.pt", constraint="lr",
                          init_weights=str(ruled["plain"]), lam_from_noise=True))


def test_validation_with_the_rule_is_validation_at_the_scaled_lambda(
        folder: Path, ruled: dict[str, Path], tmp_path: Path) -> None:
    """Each validation problem is solved at λ₀ × its rule factor: the same as a model whose
    λ is that product, without the rule."""
    from molrecon.deq.mol import MolStep
    from molrecon.train.validate import _val_problems, evaluate

    loaded = load_checkpoint(ruled["ruled"])
    config = tiny_config(folder, tmp_path / "m.pt", constraint="lr", val_noise=(0.05,),
                         val_samples=1, init_weights=str(ruled["ruled"]), lam_from_noise=True)
    val = load_folder(list_raw_files(folder), "2d")
    with_rule = _val_problems(val, config, "cpu", RULE)
    without = _val_problems(val, config, "cpu")
    factor = float(with_rule[0].lam_scale[0])
    assert factor < 1.0 and without[0].lam_scale is None
    step = MolStep(loaded.model, loaded.mol_config)
    scaled = MolStep(loaded.model, type(loaded.mol_config)(
        alpha=loaded.mol_config.alpha, lam=loaded.mol_config.lam * factor,
        cg_iters=loaded.mol_config.cg_iters))
    a = evaluate(step, with_rule, config)
    b = evaluate(scaled, without, config)
    c = evaluate(step, without, config)
    assert a["val_psnr"] == pytest.approx(b["val_psnr"], abs=1e-3)
    assert abs(a["val_psnr"] - c["val_psnr"]) > 0.01


def test_cli_noise_options(folder: Path, ruled: dict[str, Path], tmp_path: Path) -> None:
    base = ["train", "--data", str(folder), "--layers", "3", "--channels", "8", "--acs", "8",
            "-R", "3", "--device", "cpu", "--max-steps", "1", "--val-every", "1",
            "--val-samples", "1", "--cg-iters", "5", "--quiet"]
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "m.pt"), "--init",
                             str(ruled["ruled"]), "--lam-from-noise", "--noise", "0.01,0.05",
                             "--val-noise", "0.02", "--maps", "calibration", "--val-maps",
                             "calibration", "--lam-lr", "0"])
    assert ok.exit_code == 0, ok.output
    cfg = load_checkpoint(tmp_path / "m.pt").metadata["config"]
    assert (cfg["extra_noise"], cfg["extra_noise_max"], cfg["val_noise"]) == (0.01, 0.05, [0.02])
    assert (cfg["maps"], cfg["val_maps"], cfg["lam_from_noise"]) == ("calibration",
                                                                     "calibration", True)
    # a checkpoint without a rule: one line naming it, exit 1, nothing written
    plain = runner.invoke(app, [*base, "--out", str(tmp_path / "p.pt"), "--init",
                                str(ruled["plain"]), "--lam-from-noise"])
    assert plain.exit_code == 1, plain.output
    lines = [ln for ln in plain.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "noise rule" in lines[0] and "plain.pt" in lines[0], plain.output
    assert not list(tmp_path.glob("p.*"))
    for bad, word in ((["--noise", "0.05,0.01"], "--noise"), (["--noise", "0.01,0.02,0.03"],
                                                               "--noise"),
                      (["--noise", "a"], "--noise"), (["--val-noise", "-1"], "--val-noise"),
                      (["--maps", "exact"], "--maps"), (["--lam-from-noise"], "--lam-from-noise")):
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "x.pt"), *bad])
        assert res.exit_code == 2, (bad, res.output)
        assert word in res.output, (bad, res.output)     # typer's usage box names the option
        assert not (tmp_path / "x.pt").exists()
