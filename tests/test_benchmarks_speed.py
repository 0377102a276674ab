"""The speed benchmarks at small size: ``benchmarks/gpu.py --small`` runs on the CPU and reports
every section it promises; ``benchmarks/bench_recon.py --small`` times molrecon and BART."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import have

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_small_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--device", "cpu",
                           "--small", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for heading in ("## 2D throughput", "## Breakdown", "## bf16 gate", "## Baseline",
                    "## 3D volume", "## Training memory"):
        assert heading in proc.stdout
    res = json.loads((tmp_path / "gpu.json").read_text())
    rows = {(r["variant"], r["batch"]) for r in res["2d"]["throughput"]}
    planned = res["2d"]["planned_batch"]
    assert {("eager", 1), ("bf16", 1), ("eager", planned), ("compiled", planned),
            ("bf16", planned)} <= rows
    assert all(r["slices_per_s"] > 0 for r in res["2d"]["throughput"])
    assert set(res["2d"]["breakdown"]) >= {"maps_s", "cnn_s", "cg_s", "solver_overhead_s"}
    assert set(res["2d"]["gate"]) >= {"passed", "psnr_change_db", "distance"}
    assert res["2d"]["baseline"]["baseline_ms_per_iteration"] > 0
    assert res["3d"]["wall_s"] > 0 and res["3d"]["peak_memory_mib"] > 0
    assert res["training_memory"]["returncode"] == 0
    assert [r.split("|")[1].strip() for r in res["training_memory"]["table"]] == \
        ["deq", "unrolled-1"]
    assert (tmp_path / "gpu.md").read_text().startswith("# MOL on cpu")


@pytest.mark.slow
@pytest.mark.external
@pytest.mark.skipif(not have("bart"), reason="needs BART (bart)")
def test_recon_benchmark_small_against_bart(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "recon.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_recon.py"), "--small",
                           "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["tool"].split()[0:2] for r in rows] == [["molrecon", "mol"], ["molrecon", "sense"],
                                                      ["BART", "ecalib"]]
    assert all(r["seconds"] > 0 and r["psnr"] > 15 for r in rows)
    assert "| molrecon mol |" in proc.stdout
