"""Reconstruction at scale on this CPU: a long 2D+time series and a large 3D volume, end to
end in a fresh process, with its peak memory, time and convergence.

Usage::

    python benchmarks/bench_scale.py [--cases 2dt,3d] [--methods mol,sense] [--threads N]
        [--work DIR] [--json FILE]

Cases (``molrecon simulate``, seed 1, with the noise-free truth):

* ``2dt``: 30 frames of 192² (16 coils, time-interleaved R = 8, the default 2D+time mask);
* ``3d``: a 256 × 256 × 128 volume (readout × phase × partition), 12 coils, Poisson-disc
  R = 4 over (phase, partition).

Each method is one ``molrecon reconstruct --device cpu`` process (start-up, reading, coil
maps, reconstruction and the NIfTI output included). Its wall time is measured around the
process and its peak resident memory is the child's ``ru_maxrss`` from ``os.wait4`` (the
kernel's own high-water mark of the process, every allocator included). PSNR and SSIM
are against the simulated truth (:func:`molrecon.metrics.compare`, magnitudes, fitted
scale, over the whole series or volume); the MOL iterations and convergence come from the
reconstruction's ``--report``. Simulated files are kept in ``--work`` (default
``runs/scale``) and reused when present.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from molrecon.metrics import compare

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024.0 ** 3

CASES: dict[str, dict[str, Any]] = {
    "2dt": {"title": "2D+time, 30 frames of 192², 16 coils, interleaved R = 8",
            "simulate": ["--kind", "2dt", "--matrix", "192", "--frames", "30",
                         "--coils", "16", "-R", "8"]},
    "3d": {"title": "3D, 256 × 256 × 128, 12 coils, Poisson R = 4",
           "simulate": ["--kind", "3d", "--matrix", "256x256x128", "--fov", "240x240x160",
                        "--coils", "12", "-R", "4"]},
}


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak resident GiB) or exit with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read() if proc.stderr is not None else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({proc.returncode}):\n{err[-3000:]}")
    return dt, usage.ru_maxrss * 1024 / GIB          # ru_maxrss is in KiB on Linux


def load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2dt,3d")
    ap.add_argument("--methods", default="mol,sense")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "scale")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = [sys.executable, "-m", "molrecon"]
    args.work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"threads": args.threads, "date": time.strftime("%Y-%m-%d"),
                           "rows": []}
    for case in cases:
        spec = CASES[case]
        raw, truth_path = args.work / f"{case}.h5", args.work / f"{case}_truth.nii.gz"
        if not (raw.exists() and truth_path.exists()):
            t_sim, _ = run_measured([*py, "simulate", str(raw), *spec["simulate"],
                                     "--truth", str(truth_path), "--seed", "1"], env)
            print(f"{case}: simulated in {t_sim:.0f} s", file=sys.stderr)
        truth = np.squeeze(load_nifti(truth_path))
        for method in [m for m in args.methods.split(",") if m]:
            out, report = args.work / f"{case}_{method}.nii.gz", args.work / f"{case}_{method}.json"
            dt, peak = run_measured([*py, "reconstruct", str(raw), str(out), "--method", method,
                                     "--device", "cpu", "--force", "--quiet",
                                     "--report", str(report)], env)
            m = compare(np.squeeze(load_nifti(out)), truth)
            rep = json.loads(report.read_text())
            row = {"case": case, "title": spec["title"], "method": method, "seconds": dt,
                   "peak_gib": peak, "psnr": m.psnr, "ssim": m.ssim,
                   "shape": list(truth.shape), "report": _summary(rep)}
            res["rows"].append(row)
            print(f"{case} {method}: {dt:.0f} s, peak {peak:.2f} GiB, PSNR {m.psnr:.2f} dB",
                  file=sys.stderr)
    print(f"# Reconstruction at scale, {args.threads} thread(s), {res['date']}\n")
    print("| case | method | seconds | peak memory (GiB) | PSNR (dB) | SSIM | MOL iterations "
          "(max) | converged |\n|---|---|---:|---:|---:|---:|---:|---|")
    for r in res["rows"]:
        s = r["report"]
        its = "" if s.get("iterations") is None else f"{s['iterations']}"
        conv = "" if s.get("converged") is None else ("yes" if s["converged"] else "**no**")
        label = r["method"] + (f" ({Path(s['weights']).stem})" if s.get("weights") else "")
        print(f"| {r['title']} | {label} | {r['seconds']:.0f} | {r['peak_gib']:.2f} | "
              f"{r['psnr']:.2f} | {r['ssim']:.4f} | {its} | {conv} |")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return res


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The report's iteration count, convergence, batch size and model, where it has them."""
    keep = ("iterations", "converged", "final_residual", "batch_size", "wall_time_s",
            "timings_s", "peak_memory_bytes", "shape_bcdyx", "model", "weights")
    return {k: report[k] for k in keep if k in report}


if __name__ == "__main__":
    main()
