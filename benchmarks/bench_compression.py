"""Coil compression: time and image quality of CG-SENSE and MOL on many-channel scans.

Held-out 2D brain slices (the *test* slab of Colin 27) simulated with 16 and 32
receive coils (256², R = 4 equispaced, 24 calibration lines, noise 0.01,
written as ISMRMRD and read back with prewhitening), and a 3D slab with 32 coils
(128 × 128 × 16, Poisson R = 4): each reconstructed with all channels, and
compressed (``--coils``) to 12, 8 and ``auto`` virtual coils, ``scc`` and
``gcc``. Time is the whole `reconstruct` job after the read (compression, maps,
CG-SENSE, MOL), after one warm-up run per method, on this machine, with the given
torch threads; PSNR/SSIM as
``molrecon.metrics`` against the simulation's truth. Every row of a case comes
from the same file in the same run.

    python benchmarks/bench_compression.py --threads 2 --json compression.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molrecon.io.detect import read_raw
from molrecon.metrics import compare
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

CASES: list[dict[str, Any]] = [
    {"name": "2D, 16 coils", "cfg": dict(kind="2d", coils=16, acceleration=4.0, acs=24)},
    {"name": "2D, 32 coils", "cfg": dict(kind="2d", coils=32, acceleration=4.0, acs=24)},
    {"name": "3D, 32 coils", "cfg": dict(kind="3d", matrix=(128, 128, 16), coils=32,
                                         acceleration=4.0)},
]
SETTINGS: list[tuple[str, Any, str]] = [("all", None, "auto"), ("12 scc", 12, "scc"),
                                        ("8 scc", 8, "scc"), ("8 gcc", 8, "gcc"),
                                        ("auto", "auto", "auto")]


def run_case(case: dict[str, Any], folder: Path, methods: list[str], repeats: int
             ) -> list[dict[str, Any]]:
    path = folder / f"{case['name'].replace(' ', '_').replace(',', '')}.h5"
    cfg = SimulationConfig(anatomy="colin27", seed=101, slice_position=0.5, **case["cfg"])
    sim = simulate_to_file(cfg, path)
    truth = np.abs(sim.truth.data)
    scan = read_raw(path)
    rows = []
    # warm-up (torch start-up, FFT plans, the model load) so the first row is not charged
    for method in methods:
        reconstruct(scan, ReconConfig(method=method, device="cpu", coils=4))  # type: ignore[arg-type]
    for method in methods:
        for label, coils, how in SETTINGS:
            config = ReconConfig(method=method, device="cpu", coils=coils,  # type: ignore[arg-type]
                                 coil_compression=how)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                res = reconstruct(scan, config)
                times.append(time.perf_counter() - t0)
            m = compare(res.image.magnitude(), truth)
            cc = res.report.get("coil_compression", {})
            rows.append({"case": case["name"], "method": method, "setting": label,
                         "coils": cc.get("coils_out", scan.n_coils),
                         "compression": cc.get("method", "none"),
                         "retained": min(cc["retained_energy"]) if cc else 1.0,
                         "seconds": float(np.median(times)), "psnr": m.psnr, "ssim": m.ssim,
                         "iterations": res.report.get("iterations")})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| case | method | virtual coils | retained energy | time (s) | speed-up | PSNR (dB) | "
           "ΔPSNR (dB) | SSIM | MOL iterations |", "|---|---|---|---|---|---|---|---|---|---|"]
    base: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["case"], r["method"])
        if r["setting"] == "all":
            base[key] = r
        b = base[key]
        coils = "all ({})".format(r["coils"]) if r["setting"] == "all" else \
            f"{r['coils']} ({r['compression']}{', auto' if r['setting'] == 'auto' else ''})"
        its = "" if r["iterations"] is None else str(r["iterations"])
        out.append(f"| {r['case']} | {r['method']} | {coils} | {r['retained']:.4f} | "
                   f"{r['seconds']:.2f} | {b['seconds'] / r['seconds']:.2f}× | {r['psnr']:.2f} | "
                   f"{r['psnr'] - b['psnr']:+.2f} | {r['ssim']:.3f} | {its} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--methods", default="sense,mol")
    ap.add_argument("--cases", default="all", help="comma list of case indices, or all")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = CASES if args.cases == "all" else [CASES[int(i)] for i in args.cases.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            rows += run_case(case, Path(tmp), args.methods.split(","), args.repeats)
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} threads, python {sys.version.split()[0]}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
