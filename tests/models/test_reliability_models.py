"""Hostile and broken model files: refused by ``load_checkpoint`` and by ``reconstruct --weights``.

Nothing in a model file may run code (``torch.load(weights_only=True)`` only),
and every file that is not a valid molrecon checkpoint for the data at hand is
refused with a :class:`~molrecon.errors.CheckpointError` naming it: one line on
stderr and exit 1 through the command line, with nothing written.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import message_lines
from molrecon.cli import app
from molrecon.deq import MolConfig
from molrecon.errors import CheckpointError
from molrecon.models import CNNConfig, MolCNN, load_checkpoint, save_checkpoint
from molrecon.models.checkpoint import FORMAT_VERSION
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()



@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(32, 32), coils=4, acceleration=2.0,
                                      acs=12, seed=5), path)
    return path


def tiny_model(dims: int = 2) -> MolCNN:
    torch.manual_seed(0)
    return MolCNN(CNNConfig(dims=dims, layers=3, channels=8), "sn", 0.95)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained) 2D checkpoint: 3 layers × 8 channels, SN-constrained."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return save_checkpoint(path, tiny_model(), MolConfig(alpha=1.0, lam=50.0, cg_iters=3),
                           metadata={"data": "untrained"})


@pytest.fixture(scope="module")
def contents(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint, weights_only=True)


class Payload:
    """Unpickling this creates ``marker``: the shape of a real attack (arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return (exec, (f"with open({str(self.marker)!r}, 'w') as f: f.write('code ran')",))


# --------------------------------------------------------------------------- hostile files
def _code_in_torch_file(tmp: Path, contents: dict[str, Any], marker: Path) -> Path:
    obj = dict(contents)
    obj["metadata"] = {"data": Payload(marker)}
    path = tmp / "evil.pt"
    torch.save(obj, path)
    return path


def _code_in_plain_pickle(tmp: Path, contents: dict[str, Any], marker: Path) -> Path:
    path = tmp / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    return path


def _code_in_state_dict(tmp: Path, contents: dict[str, Any], marker: Path) -> Path:
    obj = dict(contents)
    obj["state_dict"] = dict(contents["state_dict"], **{"convs.0.weight": Payload(marker)})
    path = tmp / "evil_state.pt"
    torch.save(obj, path)
    return path


def _code_in_zip_member(tmp: Path, contents: dict[str, Any], marker: Path) -> Path:
    """A genuine torch archive whose data.pkl was swapped for a payload pickle."""
    good = tmp / "good.pt"
    torch.save(contents, good)
    path = tmp / "swapped.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(Payload(marker), protocol=2)
            dst.writestr(item, data)
    return path


HOSTILE = [
    ("code in a torch file", _code_in_torch_file),
    ("code in a plain pickle", _code_in_plain_pickle),
    ("code in the state dict", _code_in_state_dict),
    ("code in a swapped zip member", _code_in_zip_member),
]


@pytest.mark.parametrize(("name", "make"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_code_in_a_model_file_never_runs(name: str, make: Callable[..., Path],
                                         contents: dict[str, Any], tmp_path: Path,
                                         scan_file: Path) -> None:
    marker = tmp_path / "pwned"
    evil = make(tmp_path, contents, marker)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(evil)
    assert err.value.path == str(evil)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = runner.invoke(app, ["reconstruct", str(scan_file), str(out_dir / "x.nii"),
                                 "--method", "mol", "--weights", str(evil)])
    assert_refused(result, evil)
    assert not marker.exists()
    assert list(out_dir.iterdir()) == []
    # Control: the payload is live, a plain unpickler does run it.
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.read_text() == "code ran"


def assert_refused(result: Any, path: Path, needle: str = "") -> str:
    assert result.exit_code == 1, result.output
    lines = message_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0] and needle in lines[0], lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    return lines[0]


# --------------------------------------------------------------------------- broken files
def _bytes(content: bytes) -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, contents: dict[str, Any]) -> Path:
        path = tmp / "model.pt"
        path.write_bytes(content)
        return path
    return make


def _foreign_zip(tmp: Path, contents: dict[str, Any]) -> Path:
    path = tmp / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("README.txt", "not a model")
        z.writestr("weights.npy", b"\x93NUMPY" + bytes(64))
    return path


def _truncated(tmp: Path, contents: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    torch.save(contents, buf)
    path = tmp / "model.pt"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


def _edited(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path, dict[str, Any]], Path]:
    def make(tmp: Path, contents: dict[str, Any]) -> Path:
        obj = {k: (dict(v) if isinstance(v, dict) else v) for k, v in contents.items()}
        replaced = edit(obj)
        if replaced is not None:
            obj = replaced
        path = tmp / "model.pt"
        torch.save(obj, path)
        return path
    return make


def _drop(key: str) -> Callable[[Path, dict[str, Any]], Path]:
    return _edited(lambda obj: obj.__delitem__(key))


def _set(key: str, value: Any) -> Callable[[Path, dict[str, Any]], Path]:
    return _edited(lambda obj: obj.__setitem__(key, value))


def _tensor(name: str, value: torch.Tensor | None) -> Callable[[Path, dict[str, Any]], Path]:
    def edit(obj: dict[str, Any]) -> None:
        if value is None:
            del obj["state_dict"][name]
        else:
            obj["state_dict"][name] = value
    return _edited(edit)


def _nan_weight(obj: dict[str, Any]) -> None:
    w = obj["state_dict"]["convs.1.weight"].clone()
    w[0, 0, 1, 1] = float("nan")
    obj["state_dict"]["convs.1.weight"] = w


BROKEN: list[tuple[str, Callable[[Path, dict[str, Any]], Path], str]] = [
    ("empty file", _bytes(b""), "not a molrecon checkpoint"),
    ("random bytes", _bytes(os.urandom(4096)), "not a molrecon checkpoint"),
    ("text", _bytes(b"hello, I am a model\n"), "not a molrecon checkpoint"),
    ("zip of something else", _foreign_zip, "not a molrecon checkpoint"),
    ("truncated checkpoint", _truncated, "not a molrecon checkpoint"),
    ("bare tensor", _edited(lambda obj: torch.zeros(3)), "top level is Tensor"),
    ("bare state dict", _edited(lambda obj: obj["state_dict"]), "not a molrecon checkpoint"),
    ("other format tag", _set("format", "lightning"), "not a molrecon checkpoint"),
    ("newer format version", _set("format_version", FORMAT_VERSION + 1),
     "written by a newer molrecon"),
    ("missing state dict", _drop("state_dict"), "missing key(s) ['state_dict']"),
    ("missing architecture", _drop("architecture"), "missing key(s) ['architecture']"),
    ("unknown key", _set("optimizer", {"lr": 1.0}), "unknown key(s) ['optimizer']"),
    ("wrong constraint", _set("constraint", "none"), "'constraint' must be one of"),
    ("negative lambda", _set("lam", -1.0), "invalid settings"),
    ("NaN alpha", _set("alpha", float("nan")), "'alpha' must be a finite number"),
    ("wrong tensor shape", _tensor("convs.0.weight", torch.zeros(8, 2, 5, 5)),
     "has shape (8, 2, 5, 5)"),
    ("integer tensor", _tensor("convs.0.weight", torch.zeros(8, 2, 3, 3, dtype=torch.int64)),
     "not a floating-point tensor"),
    ("missing tensor", _tensor("convs.2.weight", None), "missing ['convs.2.weight']"),
    ("extra tensor", _tensor("convs.3.weight", torch.zeros(2, 8, 3, 3)),
     "unexpected ['convs.3.weight']"),
    ("NaN weight", _edited(_nan_weight), "contains non-finite values"),
    ("architecture of another size", _set("architecture", {
        "dims": 2, "layers": 4, "channels": 8, "kernel": 3, "bias": True}),
     "state_dict does not match the architecture"),
]


@pytest.mark.parametrize(("name", "make", "needle"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_checkpoint_is_refused(name: str, make: Callable[[Path, dict[str, Any]], Path],
                                      needle: str, contents: dict[str, Any], tmp_path: Path,
                                      scan_file: Path) -> None:
    bad = make(tmp_path, contents)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert err.value.path == str(bad)
    assert needle in err.value.message, err.value.message
    assert "\n" not in err.value.message
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = runner.invoke(app, ["reconstruct", str(scan_file), str(out_dir / "x.nii"),
                                 "--method", "mol", "--weights", str(bad),
                                 "--report", str(out_dir / "r.json")])
    assert_refused(result, bad, needle)
    assert list(out_dir.iterdir()) == []


def test_missing_directory_and_device_files_are_refused(tmp_path: Path) -> None:
    """A path that is not a regular file is never opened (no hang on /dev/zero or a FIFO)."""
    zero = tmp_path / "zero.pt"
    zero.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.pt"
    folder.mkdir()
    for bad, needle in ((tmp_path / "absent.pt", "does not exist"), (folder, "is not a file"),
                        (zero, "is not a file"), (fifo, "is not a file")):
        with pytest.raises(CheckpointError, match=needle) as err:
            load_checkpoint(bad)
        assert err.value.path == str(bad)


def test_3d_checkpoint_on_2d_data_is_refused(scan_file: Path, tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "model3d.pt", tiny_model(dims=3),
                           MolConfig(alpha=1.0, lam=50.0, cg_iters=3))
    assert load_checkpoint(path).kinds == ("3d",)
    out = tmp_path / "x.nii"
    result = runner.invoke(app, ["reconstruct", str(scan_file), str(out), "--method", "mol",
                                 "--weights", str(path)])
    line = assert_refused(result, path, "model is for 3d data, the scan is 2d")
    assert "--weights" in line
    assert not out.exists()


def test_valid_tiny_checkpoint_reconstructs(scan_file: Path, checkpoint: Path,
                                            tmp_path: Path) -> None:
    """Control: the file every broken variant above came from is accepted."""
    out = tmp_path / "x.nii"
    result = runner.invoke(app, ["reconstruct", str(scan_file), str(out), "--method", "mol",
                                 "--weights", str(checkpoint), "--max-iter", "3"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 352


def test_refusal_is_exactly_one_physical_line(scan_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"junk")
    result = runner.invoke(app, ["reconstruct", str(scan_file), str(tmp_path / "x.nii"),
                                 "--method", "mol", "--weights", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:")


def test_refusal_message_never_suggests_unsafe_loading(tmp_path: Path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "weights_only" not in err.value.message
