"""`molrecon check-lipschitz` and `molrecon robustness` through typer's CliRunner: verdicts,
exit codes, JSON, option errors. Tiny data (32×32, 4 coils) and 1×1-kernel models whose
Lipschitz constants are known exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from molrecon.cli import app
from molrecon.deq import MolConfig
from molrecon.models import CNNConfig, MolCNN, save_checkpoint

runner = CliRunner()


def _designed(weights: list[torch.Tensor]) -> MolCNN:
    channels = weights[0].shape[0] if len(weights) > 1 else 2
    model = MolCNN(CNNConfig(layers=len(weights), channels=channels, kernel=1, bias=False), "lr")
    with torch.no_grad():
        for conv, w in zip(model.convs, weights):
            conv.weight.copy_(w.reshape(*w.shape, 1, 1))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from molrecon.sim import SimulationConfig, simulate_to_file

    d = tmp_path_factory.mktemp("lip")
    data = d / "scan.h5"
    simulate_to_file(SimulationConfig(matrix=(32, 32), coils=4, acceleration=2.0, acs=8), data)
    eye = torch.eye(2)
    cfg = MolConfig(alpha=1.0, lam=4.0)
    out = {"data": data}
    # H = x/2 (certified), H = relu(x)/2 via [I, −I/2]·relu([I; I]x) (Lip ½, bound ≈ 1.58),
    # H = 1.5x (violated).
    for name, model in (("certified", _designed([0.5 * eye])),
                        ("empirical", _designed([torch.cat([eye, eye], 0),
                                                 torch.cat([eye, -0.5 * eye], 1)])),
                        ("violated", _designed([1.5 * eye])),
                        # 1.2 × a rotation by 60° of the (re, im) pair: ‖J‖ 1.2, μ 0.6
                        ("monotone", _designed([1.2 * torch.tensor([[0.5, -0.75 ** 0.5],
                                                                    [0.75 ** 0.5, 0.5]])]))):
        out[name] = save_checkpoint(d / f"{name}.pt", model, cfg)
    torch.manual_seed(0)
    out["sn"] = save_checkpoint(d / "sn.pt", MolCNN(CNNConfig(layers=3, channels=8), "sn", 0.9),
                                cfg)
    out["3d"] = save_checkpoint(d / "m3d.pt", MolCNN(CNNConfig(dims=3, layers=2, channels=2),
                                                     "sn", 0.9), cfg)
    junk = d / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    out["junk"] = junk
    return out


def check(files: dict[str, Path], model: str, *extra: str) -> Result:
    return runner.invoke(app, ["check-lipschitz", str(files[model]), "--data",
                               str(files["data"]), "--power-iters", "5", "--ratio-steps", "3",
                               "--device", "cpu", *extra])


def test_certified_exit_0_with_table(files: dict[str, Path]) -> None:
    r = check(files, "certified", "--size", "16x16")
    assert r.exit_code == 0, r.output
    for text in ("certified bound", "0.5", "holds for every image size", "layer norms at 16x16",
                 "‖Δx‖/‖Δb‖ ≤ ½√(λ/m)", "1.414", "verdict", "certified"):   # ½√(4/0.5)
        assert text in r.stdout, text
    assert "certified:" in r.stderr
    # without a terminal (as here) every stage is a plain line on stderr as it starts
    stages = [ln.split("] ", 1)[1] for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert stages == ["check: certified bound", "check: MOL fixed points 1/1",
                      "check: local estimates"], r.stderr


def test_certified_json(files: dict[str, Path]) -> None:
    r = check(files, "certified", "--json", "--uniqueness")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "certified"
    assert d["certified"]["bound"] == pytest.approx(0.5, rel=1e-9)
    assert d["certified"]["holds_for_all_image_sizes"] is True
    assert d["local"]["power"]["max"] == pytest.approx(0.5, rel=1e-4)
    assert d["margin_certified"] == pytest.approx(0.5, rel=1e-9)
    assert d["contraction_certified"]["alpha_range"][1] == pytest.approx(4 / 3, rel=1e-9)
    assert d["robustness_bounds"]["tight"] == pytest.approx(0.5 * (4.0 / 0.5) ** 0.5, rel=1e-6)
    assert d["data"] == ["scan.h5"]
    u = d["uniqueness"]
    assert u["consistent"] is True and u["max_relative_distance"] <= u["bound"]


def test_empirical_warns_and_strict_fails(files: dict[str, Path]) -> None:
    r = check(files, "empirical")
    assert r.exit_code == 0, r.output
    assert "warning" in r.stderr and "empirical" in r.stderr
    r = check(files, "empirical", "--strict", "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["verdict"] == "empirical"
    assert d["certified"]["bound"] > 1.5 and d["local"]["max"] < 0.51


def test_monotone_warns_and_strict_fails(files: dict[str, Path]) -> None:
    """Expansive (‖J‖ = 1.2) but monotone (μ = 0.6): exit 0 with a warning, 1 with --strict;
    the table shows μ and the robustness bounds use m = 1 − μ."""
    r = check(files, "monotone")
    assert r.exit_code == 0, r.output
    assert "monotone, not contractive" in r.stderr
    assert "local μ, top of ½(J+Jᵀ)" in r.stdout and "0.6000" in r.stdout
    assert "margin m = 1 − μ" in r.stdout
    r = check(files, "monotone", "--strict", "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["verdict"] == "monotone"
    assert d["local"]["max"] == pytest.approx(1.2, rel=1e-3)
    assert d["local"]["monotone_max"] == pytest.approx(0.6, rel=1e-3)
    assert d["robustness_bounds"]["basis"] == "monotone"
    assert d["robustness_bounds"]["tight"] == pytest.approx(0.5 * (4.0 / 0.4) ** 0.5, rel=1e-3)


def test_violated_exit_1(files: dict[str, Path]) -> None:
    r = check(files, "violated", "--json")
    assert r.exit_code == 1
    d = json.loads(r.stdout)
    assert d["verdict"] == "violated" and d["local"]["max"] == pytest.approx(1.5, rel=1e-3)
    assert d["robustness_bounds"]["tight"] is None
    assert "violated:" in r.stderr


def test_sn_model_certified(files: dict[str, Path]) -> None:
    r = check(files, "sn", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verdict"] == "certified" and d["certified"]["bound"] <= 0.9
    assert d["local"]["max"] <= d["certified"]["bound"]


def test_malformed_checkpoint_one_line(files: dict[str, Path]) -> None:
    r = check(files, "junk")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "junk.pt" in lines[0] and "error" in lines[0]
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["check-lipschitz", str(files["data"].parent / "missing.pt")])
    assert r.exit_code == 1 and "does not exist" in r.stderr


def test_usage_errors_exit_2(files: dict[str, Path]) -> None:
    assert check(files, "certified", "--size", "abc").exit_code == 2
    assert check(files, "certified", "--points", "0").exit_code == 2
    r = runner.invoke(app, ["robustness", str(files["certified"]), str(files["data"]),
                            "--eps", "0.01,x"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["robustness", str(files["certified"]), str(files["data"]),
                            "--eps", "-0.1"])
    assert r.exit_code == 2


def test_3d_model_without_data_runs_on_a_simulated_scan_of_its_kind(
        files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from molrecon import sim
    from molrecon.errors import ConfigError
    from molrecon.sim import SimulationConfig, simulate_to_file

    with pytest.raises(ConfigError):                  # 2D models use the bundled example
        sim.simulated_example("2d", Path("."))
    asked: list[str] = []

    def small(kind: str, folder: Path, quick: bool = False) -> Path:   # fast stand-in
        asked.append(kind)
        assert quick                                  # without --full, the quick scan
        path = Path(folder) / "small.h5"
        simulate_to_file(SimulationConfig(kind="3d", matrix=(24, 24, 8), fov_mm=(240.0, 240.0, 40.0),
                                          coils=4, acceleration=2.0, acs=6, seed=1), path)
        return path

    monkeypatch.setattr(sim, "simulated_example", small)
    r = runner.invoke(app, ["check-lipschitz", str(files["3d"]), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert asked == ["3d"] and json.loads(r.stdout)["data"] == ["small.h5"]
    assert "64×64×12 (quick; --full for 128×128×16)" in r.stderr


def test_kind_measures_a_prior_on_a_kind_its_checkpoint_does_not_declare(
        files: dict[str, Path], tmp_path: Path) -> None:
    """--kind: a 3×3×3 prior trained on 2D+time series (kinds ["2dt"]) is refused a 3D
    volume by default and measured on it with --kind 3d (exit 0, the file in the report);
    a kind its network cannot serve is one line, exit 1; an unknown kind is a usage error."""
    from molrecon.sim import SimulationConfig, simulate_to_file

    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "m2dt.pt", MolCNN(CNNConfig(dims=3, layers=2, channels=2),
                                                         "sn", 0.9),
                            MolConfig(alpha=1.0, lam=4.0), kinds=["2dt"])
    volume = tmp_path / "vol.h5"
    simulate_to_file(SimulationConfig(kind="3d", matrix=(24, 24, 8), fov_mm=(240.0, 240.0, 40.0),
                                      coils=4, acceleration=2.0, acs=6, seed=1), volume)
    args = ["check-lipschitz", str(model), "--data", str(volume), "--power-iters", "5",
            "--ratio-steps", "2", "--lanczos-steps", "5", "--device", "cpu", "--json"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 1 and "2dt" in refused.stderr
    r = runner.invoke(app, [*args, "--kind", "3d"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["data"] == ["vol.h5"]
    r = runner.invoke(app, ["check-lipschitz", str(model), "--data", str(files["data"]),
                            "--kind", "2d", "--device", "cpu"])
    assert r.exit_code == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "3D prior" in lines[0] and "--kind 2d" in lines[0]
    assert check(files, "certified", "--kind", "4d").exit_code == 2


def test_default_data_is_the_example(files: dict[str, Path],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --data the bundled example is used; the options reach the library as given."""
    import molrecon.guarantees as g

    seen: dict[str, object] = {}
    real_load, real_check = g.load_problems, g.check_lipschitz

    def load(paths, **kw):  # type: ignore[no-untyped-def]
        seen["paths"] = [Path(p) for p in paths]
        seen.update(kw)
        return real_load([files["data"]], **kw)

    def run(loaded, problems, config, progress=None):  # type: ignore[no-untyped-def]
        seen["config"] = config
        return real_check(loaded, problems, config, progress=progress)

    monkeypatch.setattr(g, "load_problems", load)
    monkeypatch.setattr(g, "check_lipschitz", run)
    r = runner.invoke(app, ["check-lipschitz", str(files["certified"]), "--points", "2",
                            "--tol", "1e-6", "--power-iters", "4", "--seed", "7",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert seen["paths"] == [g.example_scan()] and g.example_scan().is_file()
    assert seen["points"] == 2 and seen["double"] is False
    cfg = seen["config"]
    assert isinstance(cfg, g.CheckConfig)
    assert (cfg.tol, cfg.power_iters, cfg.seed, cfg.uniqueness, cfg.size) == (1e-6, 4, 7,
                                                                              False, None)
    assert cfg.power_tol == 1e-4                       # the default: run to convergence


def test_power_iteration_runs_to_its_tolerance_and_says_so(files: dict[str, Path]) -> None:
    r = check(files, "empirical", "--power-iters", "300", "--json")
    points = json.loads(r.stdout)["local"]["points"]
    assert all(p["power_converged"] is True and 10 < p["power_iterations"] < 300 for p in points)
    # A cap it cannot meet is reported (table and reasons), and 0 runs a fixed count.
    r = check(files, "empirical", "--power-iters", "3")
    assert "NOT converged" in r.stdout and "stopped at its cap" in r.stderr
    r = check(files, "empirical", "--power-tol", "0", "--json")
    assert all(p["power_converged"] is None and p["power_iterations"] == 5
               for p in json.loads(r.stdout)["local"]["points"])
    r = check(files, "empirical", "--power-tol", "1.5")
    assert r.exit_code == 2 and "--power-tol" in r.stderr


def test_robustness_json_and_table(files: dict[str, Path]) -> None:
    args = ["robustness", str(files["certified"]), str(files["data"]), "--eps", "0.01,0.05",
            "--steps", "2", "--unrolled-k", "3", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["eps"] == [0.01, 0.05] and d["unrolled_k"] == 3
    assert [a["network"] for a in d["unrolled"]] == ["unrolled-3", "unrolled-3"]
    tight = d["bounds"]["tight"]
    assert d["bounds"]["basis"] == "certified" and tight == pytest.approx(0.5 * 8 ** 0.5, rel=1e-6)
    for a in d["mol"]:
        assert 0 < a["amplification"] <= tight
        assert a["relative_change"] > 0 and len(a["history"]) == 3
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "MOL amp" in r.stdout and "K=3 amp" in r.stdout and "bounds are guarantees" in r.stdout


def test_entry_point_help() -> None:
    r = subprocess.run([sys.executable, "-m", "molrecon", "check-lipschitz", "--help"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0 and "--uniqueness" in r.stdout and "--strict" in r.stdout
