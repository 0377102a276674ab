"""The bundled MOL models: manifest, files and model cards agree; every data kind has a
default; bundled names work as --weights; a fresh scan of each kind reconstructs with
the default model and converges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from molrecon.cli import app
from molrecon.errors import ConfigError
from molrecon.models.bundled import (
    bundled_checkpoint,
    bundled_models,
    manifest,
    resolve_weights,
)
from molrecon.models.checkpoint import load_checkpoint, sha256
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()
KINDS = ("2d", "3d", "2dt")


def test_manifest_files_cards_and_checkpoints_agree() -> None:
    models = bundled_models()
    assert models, "no bundled models"
    for m in models:
        path = Path(m["path"])
        assert path.is_file(), m["name"]
        assert sha256(path) == m["sha256"], f"{m['name']}: sha256 differs from the manifest"
        loaded = load_checkpoint(path)
        assert list(loaded.kinds) == m["kinds"] and loaded.constraint == m["constraint"]
        assert m["kind"] == m["kinds"][0]
        card = path.with_suffix(".md").read_text()
        assert m["sha256"] in card and "molrecon train" in card
        assert loaded.metadata["steps"] >= 1
        if m["constraint"] == "sn":
            assert loaded.certificate["certified_bound"] < 1.0
            assert loaded.certificate["at_bundled_example"]["verdict"] == "certified"


def test_every_kind_has_a_default_and_2d_offers_both_constraints() -> None:
    man = manifest()
    for kind in KINDS:
        name = man["defaults"].get(kind)
        assert name in man["models"], f"no default model for {kind}"
        assert kind in man["models"][name]["kinds"]
        assert kind in load_checkpoint(bundled_checkpoint(kind)).kinds
    for constraint in ("sn", "lr"):
        assert load_checkpoint(bundled_checkpoint("2d", constraint)).constraint == constraint


def test_bundled_names_are_accepted_as_weights(tmp_path: Path) -> None:
    some = bundled_models()[0]
    assert resolve_weights(some["name"]) == Path(some["path"])
    assert resolve_weights(tmp_path / "x.pt") == tmp_path / "x.pt"     # paths pass through
    with pytest.raises(ConfigError, match="no bundled model of that name"):
        resolve_weights("mol_no_such_model")
    r = runner.invoke(app, ["models", "--json"])
    assert r.exit_code == 0, r.output
    listed = {m["name"]: m for m in json.loads(r.output)}
    assert set(listed) == {m["name"] for m in bundled_models()}
    # the 2D and 3D defaults set λ from each scan's noise level; the card says how
    assert listed["mol_2d_lr"]["lam_from_noise"] and listed["mol_3d_lr"]["lam_from_noise"]
    assert "## λ from the noise level" in Path(listed["mol_2d_lr"]["card"]).read_text()
    assert not listed["mol_2dt_lr"]["lam_from_noise"]
    from molrecon.cli.demo import example_paths

    out = tmp_path / "o.nii"
    r = runner.invoke(app, ["reconstruct", str(example_paths()[0]), str(out),
                            "--weights", "mol_no_such_model"])
    assert r.exit_code == 1 and "no bundled model of that name" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_every_command_that_takes_a_model_takes_a_bundled_name(tmp_path: Path) -> None:
    """check-lipschitz, robustness and train --init resolve bundled names as reconstruct does."""
    r = runner.invoke(app, ["check-lipschitz", "mol_2d_sn", "--points", "1", "--power-iters", "2",
                            "--ratio-steps", "1", "--tol", "1e-3", "--max-iter", "30", "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["verdict"] == "certified"
    for cmd in (["check-lipschitz", "mol_no_such_model"], ["robustness", "mol_no_such_model"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 1 and "no bundled model of that name" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1
    data = tmp_path / "d"
    data.mkdir()
    simulate_to_file(SimulationConfig(kind="2d", matrix=(48, 48), coils=4, acceleration=1.0,
                                      seed=3), data / "a.h5")
    out = tmp_path / "m.pt"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(out), "--init", "mol_2d_lr",
                            "--max-steps", "1", "--val-fraction", "0", "--acs", "8", "-R", "3",
                            "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert load_checkpoint(out).metadata["config"]["init_weights"] == "mol_2d_lr"
    # The bundled 2D model has an identity path; --init keeps it without --skip.
    bundled = load_checkpoint(resolve_weights("mol_2d_lr")).model.config.skip
    assert bundled > 0 and load_checkpoint(out).model.config.skip == pytest.approx(bundled)


@pytest.mark.parametrize("kind", KINDS)
def test_a_fresh_scan_of_each_kind_reconstructs_with_the_default_model(
        kind: str, tmp_path: Path) -> None:
    extra: dict[str, object] = {
        "2d": {"matrix": (64, 64)},
        "3d": {"matrix": (48, 48, 12), "fov_mm": (240.0, 240.0, 30.0), "acs": 8},
        "2dt": {"matrix": (48, 48), "frames": 6, "acs": 8},
    }[kind]
    cfg = SimulationConfig(kind=kind, coils=6, acceleration=3.0, seed=5, slice_position=0.76,
                           **extra)  # type: ignore[arg-type]
    raw = tmp_path / f"{kind}.h5"
    sim = simulate_to_file(cfg, raw, tmp_path / f"{kind}_truth.nii.gz")
    from molrecon.io.detect import read_raw
    from molrecon.metrics import compare

    scan = read_raw(raw)
    mol = reconstruct(scan, ReconConfig(method="mol", device="cpu"))
    assert mol.report["weights"] == str(bundled_checkpoint(kind))
    assert mol.report["converged"], mol.report
    zf = reconstruct(scan, ReconConfig(method="zf", device="cpu"))
    truth = np.abs(sim.truth.data)
    assert np.isfinite(mol.image.data).all()
    assert compare(mol.image.data, truth).psnr > compare(zf.image.data, truth).psnr
