"""The checkpoint format: round trip, and refusal of everything that is not a valid checkpoint."""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from molrecon.deq import MolConfig, MolStep
from molrecon.errors import CheckpointError, ConfigError, OutputError
from molrecon.models import (
    CNNConfig,
    MolCNN,
    certified_bound,
    load_checkpoint,
    save_checkpoint,
    sha256,
)
from molrecon.models.checkpoint import FORMAT_VERSION


def small_model(constraint: str = "sn", dims: int = 2) -> MolCNN:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=dims, layers=3, channels=4), constraint, 0.95)  # type: ignore[arg-type]
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.mul_(10.0)
    return model


META = {"data": "simulated colin27", "acceleration": 4, "steps": 12, "metrics": {"psnr": 31.5},
        "masks": ["equispaced", "acs24"], "note": None}


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, MolCNN, MolConfig]:
    model = small_model()
    cfg = MolConfig(alpha=1.0, lam=1271.5, cg_iters=7)
    path = save_checkpoint(tmp_path / "model.pt", model, cfg, metadata=META,
                           certificate={"local_power": [0.41, 0.39], "data": "val slices 0-3"})
    return path, model, cfg


def test_round_trip_of_a_skip_model(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = MolCNN(CNNConfig(layers=3, channels=4, skip=1.0), "lr")
    model.scale_output(0.8)                             # the gain travels with the checkpoint
    path = save_checkpoint(tmp_path / "skip.pt", model, MolConfig())
    loaded = load_checkpoint(path)
    assert loaded.model.config.skip and loaded.model.config == model.config
    x = torch.randn(1, 1, 8, 8, dtype=torch.complex64)
    torch.testing.assert_close(loaded.model(x), model(x))
    prod = math.prod(loaded.certificate["layer_bounds"])
    assert loaded.certificate["certified_bound"] == pytest.approx(0.8 + prod, rel=1e-12)


def test_round_trip(saved: tuple[Path, MolCNN, MolConfig]) -> None:
    path, model, cfg = saved
    loaded = load_checkpoint(path)
    assert loaded.mol_config == cfg == MolConfig(alpha=1.0, lam=1271.5, cg_iters=7)
    assert loaded.constraint == "sn" and loaded.lipschitz_target == 0.95
    assert loaded.kinds == ("2d",) and loaded.format_version == FORMAT_VERSION
    assert loaded.metadata == META
    assert loaded.certificate["local_power"] == [0.41, 0.39]
    bound = loaded.certificate["certified_bound"]
    assert bound == pytest.approx(certified_bound(model), rel=1e-12) and bound <= 0.95
    assert len(loaded.certificate["layer_bounds"]) == 3
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() == sha256(path)
    assert not loaded.model.training
    x = torch.randn(2, 1, 9, 8, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    # The format contract: plain torch can read it without unpickling objects.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "molrecon-checkpoint" and raw["architecture"]["channels"] == 4


def test_trained_lambda_and_3d_kinds(tmp_path: Path) -> None:
    model = small_model("lr", dims=3)
    step = MolStep(model, MolConfig(lam=100.0))
    with torch.no_grad():
        step.log_lam.add_(1.0)
    path = save_checkpoint(tmp_path / "m3.pt", model, step.to_config(), kinds=["3d", "2dt"])
    loaded = load_checkpoint(path)
    assert loaded.mol_config.lam == pytest.approx(100.0 * math.e, rel=1e-6)
    assert loaded.kinds == ("3d", "2dt") and loaded.constraint == "lr"
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "bad.pt", model, step.to_config(), kinds=["2d"])


def test_save_refuses_overwrite_and_non_plain_metadata(saved: tuple[Path, MolCNN, MolConfig],
                                                       tmp_path: Path) -> None:
    path, model, cfg = saved
    before = path.read_bytes()
    with pytest.raises(OutputError):
        save_checkpoint(path, model, cfg)
    assert path.read_bytes() == before
    save_checkpoint(path, model, cfg, metadata={"steps": 13}, force=True)
    assert load_checkpoint(path).metadata == {"steps": 13}
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "x.pt", model, cfg, metadata={"w": torch.zeros(2)})
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "y.pt", model, cfg, certificate={1: "int key"})  # type: ignore[dict-item]
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OutputError, match="m.pt: cannot be written: disk full"):
        save_checkpoint(tmp_path / "m.pt", small_model(), MolConfig())
    assert list(tmp_path.iterdir()) == []


class _Payload:
    """Unpickling this object would create ``marker`` (code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_refuses_a_pickle_that_runs_code(saved: tuple[Path, MolCNN, MolConfig],
                                         tmp_path: Path) -> None:
    path, _, _ = saved
    obj = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    obj["metadata"] = {"x": _Payload(marker)}
    evil_torch = tmp_path / "evil_torch.pt"
    torch.save(obj, evil_torch)
    evil_pickle = tmp_path / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps(_Payload(marker)))
    for evil in (evil_torch, evil_pickle):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(evil)
        assert err.value.path == str(evil)
        assert "weights_only" not in err.value.message     # never suggest unsafe loading
        assert not marker.exists()
    assert "could run code" in str(
        pytest.raises(CheckpointError, load_checkpoint, evil_torch).value)
    # The payload is live: a plain unpickler does run it.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 100, b"PK\x03\x04broken zip",
                                     bytes(range(256)) * 4, b"hello world\n"])
def test_refuses_random_bytes(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert err.value.path == str(path)
    assert err.value.message.startswith("not a molrecon checkpoint")
    assert "weights_only" not in err.value.message


def test_refuses_missing_file_directory_and_truncation(saved: tuple[Path, MolCNN, MolConfig],
                                                       tmp_path: Path) -> None:
    path, _, _ = saved
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(cut)


def _edit(obj: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = dict(obj)
    if value is _DELETE:
        del out[key]
    else:
        out[key] = value
    return out


_DELETE = object()


def _state(obj: dict[str, Any],
           change: Callable[[dict[str, torch.Tensor]], Any]) -> dict[str, Any]:
    state = {k: v.clone() for k, v in obj["state_dict"].items()}
    change(state)
    return _edit(obj, "state_dict", state)


BAD_EDITS: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("not a dict", lambda o: [1, 2, 3], "top level"),
    ("format", lambda o: _edit(o, "format", "other"), "format"),
    ("newer", lambda o: _edit(o, "format_version", FORMAT_VERSION + 1), "newer"),
    ("version type", lambda o: _edit(o, "format_version", "1"), "format_version"),
    ("missing lam", lambda o: _edit(o, "lam", _DELETE), "missing"),
    ("unknown key", lambda o: _edit(o, "optimizer", {}), "unknown"),
    ("lam type", lambda o: _edit(o, "lam", "1271"), "lam"),
    ("lam value", lambda o: _edit(o, "lam", -1.0), "lam"),
    ("alpha nan", lambda o: _edit(o, "alpha", float("nan")), "alpha"),
    ("cg type", lambda o: _edit(o, "cg_iters", 5.0), "cg_iters"),
    ("constraint", lambda o: _edit(o, "constraint", "spectral"), "constraint"),
    ("target", lambda o: _edit(o, "lipschitz_target", 0), "lipschitz_target"),
    ("grid", lambda o: _edit(o, "spectral_grid", 2), "settings"),
    ("kinds", lambda o: _edit(o, "kinds", ["4d"]), "kinds"),
    ("kinds empty", lambda o: _edit(o, "kinds", []), "kinds"),
    ("architecture keys", lambda o: _edit(o, "architecture", {"dims": 2}), "architecture"),
    ("architecture value", lambda o: _edit(o, "architecture", {**o["architecture"], "kernel": 4}),
     "architecture"),
    ("architecture mismatch",
     lambda o: _edit(o, "architecture", {**o["architecture"], "channels": 8}), "shape"),
    ("metadata tensor", lambda o: _edit(o, "metadata", {"t": torch.zeros(1)}), "metadata"),
    ("certificate type", lambda o: _edit(o, "certificate", [1.0]), "certificate"),
    ("state missing", lambda o: _state(o, lambda s: s.pop("convs.0.bias")), "missing"),
    ("state extra", lambda o: _state(o, lambda s: s.update(extra=torch.zeros(1))), "unexpected"),
    ("state shape",
     lambda o: _state(o, lambda s: s.update({"convs.1.weight": torch.zeros(4, 4, 5, 5)})),
     "shape"),
    ("state dtype",
     lambda o: _state(o, lambda s: s.update({"convs.0.bias": torch.zeros(4, dtype=torch.long)})),
     "floating"),
    ("state nan", lambda o: _state(o, lambda s: s["convs.2.weight"].fill_(float("nan"))),
     "non-finite"),
    ("state type", lambda o: _edit(o, "state_dict", [1]), "state_dict"),
    ("lam_noise type", lambda o: _edit(o, "lam_noise", [0.005, 0.6]), "lam_noise"),
    ("lam_noise value", lambda o: _edit(o, "lam_noise", {"sigma_ref": -1.0, "exponent": 0.6,
                                                         "min_factor": 0.1, "max_factor": 4.0}),
     "lam_noise"),
    ("lam_noise tensor", lambda o: _edit(o, "lam_noise", {"sigma_ref": torch.ones(1)}),
     "lam_noise"),
]


@pytest.mark.parametrize("name,edit,message", BAD_EDITS, ids=[b[0] for b in BAD_EDITS])
def test_refuses_invalid_content(saved: tuple[Path, MolCNN, MolConfig], tmp_path: Path, name: str,
                                 edit: Callable[[dict[str, Any]], Any], message: str) -> None:
    path, _, _ = saved
    obj = torch.load(path, weights_only=True)
    bad = tmp_path / "bad.pt"
    torch.save(edit(obj), bad)
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(bad)
    assert err.value.path == str(bad)


def test_with_kinds_redeclares_a_prior_only_for_kinds_its_network_serves(tmp_path: Path) -> None:
    """A 3×3×3 prior declared for 2D+time may be declared for volumes (same weights, the
    file untouched); a 2D kind is refused for it, naming what it serves."""
    from molrecon.models.checkpoint import with_kinds

    path = save_checkpoint(tmp_path / "m.pt", MolCNN(CNNConfig(dims=3, layers=2, channels=2), "sn"),
                           MolConfig(), kinds=["2dt"])
    loaded = load_checkpoint(path)
    as_3d = with_kinds(loaded, ["3d"])
    assert as_3d.kinds == ("3d",) and loaded.kinds == ("2dt",)
    assert as_3d.model is loaded.model and load_checkpoint(path).kinds == ("2dt",)
    with pytest.raises(ConfigError, match="a 3D prior serves only 3d, 2dt data, not 2d"):
        with_kinds(loaded, ["3d", "2d"])
    with pytest.raises(ConfigError, match="no kind"):
        with_kinds(loaded, [])


def test_a_lambda_noise_rule_round_trips_and_old_files_have_none(
        saved: tuple[Path, MolCNN, MolConfig], tmp_path: Path) -> None:
    from molrecon.physics.noise import NoiseLambdaRule

    path, model, cfg = saved
    assert load_checkpoint(path).lam_noise is None            # written without a rule
    rule = NoiseLambdaRule(sigma_ref=0.005, exponent=0.6, min_factor=0.125, max_factor=8.0,
                           measured={"val_data": "data2d_val", "problems": 16})
    ruled = save_checkpoint(tmp_path / "ruled.pt", model, cfg, lam_noise=rule)
    loaded = load_checkpoint(ruled)
    assert loaded.lam_noise == rule
    assert torch.load(ruled, weights_only=True)["lam_noise"]["exponent"] == 0.6
