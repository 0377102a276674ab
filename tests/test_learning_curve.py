"""scripts/learning_curve.py: the campaign clock in core-hours, per invocation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lc():
    spec = importlib.util.spec_from_file_location("learning_curve", ROOT / "scripts" / "learning_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val(step: int, elapsed: float, psnr: float) -> dict:
    return {"step": step, "loss": 0.1, "step_s": 1.0, "elapsed_s": elapsed, "val_psnr": psnr,
            "val_ssim": 0.9, "val_sense_psnr": 25.0, "val_iterations": 10.0}


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_each_invocation_counts_at_its_own_thread_count(lc, tmp_path: Path) -> None:
    """A stage run for 1 h on 2 threads, then resumed for 1 h on 1 thread, cost 3 core-hours
    (counting both at the last invocation's thread count would say 2)."""
    log = _write(tmp_path / "a.log.jsonl", [
        {"event": "start", "step": 0, "threads": 2, "elapsed_s": 10.0},
        _val(1, 11.0, 30.0), _val(100, 3611.0, 31.0),
        {"event": "start", "step": 100, "threads": 1, "elapsed_s": 3700.0},
        _val(101, 3701.0, 31.5), _val(200, 7301.0, 32.0)])
    stages = [lc.parse_stage(f"a={log}")]
    rows = lc.campaign(stages)
    assert [r["step"] for r in rows] == [1, 100, 101, 200]
    assert [round(r["core_hours"], 3) for r in rows] == [0.001, 2.001, 2.001, 3.001]
    assert lc.spent_core_hours(stages) == pytest.approx(3.001, abs=1e-3)


def test_a_branch_starts_from_its_step_on_the_main_line(lc, tmp_path: Path) -> None:
    main = _write(tmp_path / "m.log.jsonl", [
        {"event": "start", "step": 0, "threads": 1, "elapsed_s": 0.0},
        _val(1, 1.0, 30.0), _val(50, 1801.0, 31.0), _val(100, 3601.0, 31.2)])
    branch = _write(tmp_path / "b.log.jsonl", [
        {"event": "start", "step": 0, "threads": 2, "elapsed_s": 0.0},
        _val(1, 1.0, 31.0), _val(10, 1801.0, 32.0)])
    rows = lc.campaign([lc.parse_stage(f"m={main}"), lc.parse_stage(f"b={branch}@50")])
    b = [r for r in rows if r["stage"] == "b"]
    assert b[0]["core_hours"] == pytest.approx(0.5 + 1 / 3600, abs=1e-3)
    assert b[-1]["core_hours"] == pytest.approx(0.5 + 1.0 + 1 / 3600, abs=1e-3)
