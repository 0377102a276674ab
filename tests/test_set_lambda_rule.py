"""scripts/set_lambda_rule.py: the λ noise rule from a study, written into a checkpoint."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from molrecon.config import MolConfig
from molrecon.models import CNNConfig, MolCNN, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("set_lambda_rule",
                                                  ROOT / "scripts" / "set_lambda_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(exponent: float = 1.5, scale: float = 0.01, r: float = 6.0) -> dict:
    """Problems whose best λ follows λ* = scale·σ^(−exponent) exactly (two per noise level)."""
    sigmas = [0.004, 0.008, 0.016, 0.032, 0.064]
    records = [{"noise": i * 0.01, "R": r, "sigma": s * f, "best_lambda": scale * (s * f) ** -exponent,
                "best_psnr": 26.0, "psnr_at_lam0": 25.0, "sense_psnr": 20.0}
               for i, s in enumerate(sigmas) for f in (0.9, 1.1)]
    fit = {"exponent": exponent, "log_intercept": math.log(scale), "rms_log_residual": 0.0}
    return {"val_data": "runs/data2d_val", "records": records, "summary": [], "fit": fit}


def test_the_rule_gives_the_fitted_lambda_inside_the_measured_range(script) -> None:
    study = script.pool([_study(r=4.0), _study(r=8.0)])
    assert study["fit"]["exponent"] == pytest.approx(1.5, rel=1e-9)
    assert [(row["noise"], row["R"], row["problems"]) for row in study["summary"][:3]] == [
        (0.0, 4.0, 2), (0.0, 8.0, 2), (0.01, 4.0, 2)]
    rule = script.rule_from_study(study, lam0=30.0, max_factor=100.0)
    for s in (0.005, 0.01, 0.05):
        assert 30.0 * rule.factor(s) == pytest.approx(0.01 * s ** -1.5, rel=1e-9)
    # outside the measured σ it is held at the measured extremes
    assert 30.0 * rule.factor(0.001) == pytest.approx(0.01 * 0.0036 ** -1.5, rel=1e-9)
    assert 30.0 * rule.factor(1.0) == pytest.approx(0.01 * 0.0704 ** -1.5, rel=1e-9)
    assert rule.measured["problems"] == 20 and rule.measured["val_data"] == "data2d_val"
    # by default λ is only ever lowered
    capped = script.rule_from_study(study, lam0=30.0)
    assert capped.max_factor == 1.0 and capped.factor(0.001) == 1.0
    assert capped.factor(0.05) == rule.factor(0.05) < 1.0


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update(fit=None), "no fit"),
    (lambda s: s["fit"].update(exponent=-0.2), "does not fall"),
    (lambda s: s["fit"].pop("log_intercept"), "log_intercept"),
])
def test_a_study_without_a_falling_fit_is_refused(script, change, message: str) -> None:
    study = script.pool([_study()])
    change(study)
    with pytest.raises((ValueError, KeyError), match=message):
        script.rule_from_study(study, lam0=30.0)


def test_main_writes_the_rule_and_the_card_section(script, tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=4), "lr")
    ckpt = save_checkpoint(tmp_path / "m.pt", model, MolConfig(alpha=1.0, lam=30.0, cg_iters=4),
                           metadata={"steps": 3}, certificate={"verdict": "monotone"})
    study = tmp_path / "study.json"
    study.write_text(json.dumps(_study()))
    card = tmp_path / "m.md"
    card.write_text("# m\n\nintro\n\n## Certificate\n\nok\n")
    out = tmp_path / "ruled.pt"
    for _ in range(2):                                  # the second run replaces the section
        assert script.main([str(ckpt), "--study", str(study), "--out", str(out),
                            "--card", str(card)]) == 0
    loaded, before = load_checkpoint(out), load_checkpoint(ckpt)
    assert loaded.lam_noise is not None
    assert loaded.lam_noise.exponent == pytest.approx(1.5, rel=1e-9)
    assert loaded.metadata == before.metadata and loaded.mol_config == before.mol_config
    assert loaded.certificate["verdict"] == "monotone"
    text = card.read_text()
    assert text.count(script.SECTION) == 1 and text.startswith("# m\n\nintro\n\n## Certificate")
    assert "| 6 | 0.01 | 0.0080 |" in text
    bad = tmp_path / "bad.json"
    one_level = _study()
    one_level["records"] = [{**r, "sigma": 0.01} for r in one_level["records"]]
    bad.write_text(json.dumps(one_level))
    capsys.readouterr()
    assert script.main([str(ckpt), "--study", str(bad), "--out", str(tmp_path / "x.pt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no fit" in err[0] and str(bad) in err[0] and not (tmp_path / "x.pt").exists()


def test_an_acceleration_term_is_fitted_when_the_studies_record_it(script) -> None:
    """λ* = 0.01·σ^(−1.5)·R²: the pooled fit finds both exponents and the rule gives λ*."""
    studies = []
    for r in (3.2, 4.3, 5.5):
        st = _study(r=r)
        st["records"] = [{**rec, "accel": r, "best_lambda": rec["best_lambda"] * r ** 2}
                         for rec in st["records"]]
        studies.append(st)
    study = script.pool(studies)
    fit = study["fit"]
    assert fit["exponent"] == pytest.approx(1.5, rel=1e-6)
    assert fit["accel_exponent"] == pytest.approx(2.0, rel=1e-6)
    rule = script.rule_from_study(study, lam0=30.0, max_factor=1e6)
    for s, r in ((0.01, 3.2), (0.03, 5.5), (0.005, 4.3)):
        assert 30.0 * rule.factor(s, r) == pytest.approx(0.01 * s ** -1.5 * r ** 2, rel=1e-6)
    assert study["summary"][0]["accel"] == pytest.approx(3.2)


def test_an_unwritable_output_is_one_line_and_leaves_the_card_alone(script, tmp_path: Path,
                                                                    capsys) -> None:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=4), "lr")
    ckpt = save_checkpoint(tmp_path / "m.pt", model, MolConfig(alpha=1.0, lam=30.0, cg_iters=4))
    study = tmp_path / "study.json"
    study.write_text(json.dumps(_study()))
    card = tmp_path / "m.md"
    card.write_text("# m\n")
    capsys.readouterr()
    assert script.main([str(ckpt), "--study", str(study), "--out",
                        str(tmp_path / "missing" / "x.pt"), "--card", str(card)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]
    assert card.read_text() == "# m\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.md", "m.pt", "study.json"]
