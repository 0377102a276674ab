"""Shared fixtures. Test data is made in tmp_path by the project's own writers (or by
programs the project did not write); nothing is committed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

# Real scanner files: MOLRECON_REAL_DATA points the tests at another folder (the tests that
# need a file it lacks skip, naming the file); the default is the project's shared/ copy.
REAL_DATA = Path(os.environ.get("MOLRECON_REAL_DATA")
                 or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real scanner data not found at {REAL_DATA} (set MOLRECON_REAL_DATA)")
    return REAL_DATA


def real_file(folder: Path, name: str) -> Path:
    """``folder / name``, or skip the test saying which real scanner file is missing."""
    path = folder / name
    if not path.is_file():
        pytest.skip(f"real scanner file {name} not found in {folder} (set MOLRECON_REAL_DATA)")
    return path


_STAGE_LINE = re.compile(r"^\[\s*\d+\.\d s\] ")


def message_lines(stderr: str) -> list[str]:
    """The non-empty lines of a command's stderr, without its per-stage log lines
    (``[  1.2 s] file: stage``, printed when stderr is not a terminal, as under the
    test runner): what is left are the messages (errors, warnings, results)."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not _STAGE_LINE.match(ln)]


def have(program: str) -> bool:
    return shutil.which(program) is not None


def _cuda() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if not _cuda():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    """Every device a test should pass on: the CPU always, CUDA when the machine has it
    (the ``cuda`` case is marked ``gpu`` and skipped without a CUDA device)."""
    return str(request.param)


@pytest.fixture(autouse=True)
def _torch_threads() -> None:
    """Keep torch to the machine's cores and deterministic."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.manual_seed(0)
    # One thread: tests use tiny tensors, where threading only adds jitter on a busy machine.
    torch.set_num_threads(1)
