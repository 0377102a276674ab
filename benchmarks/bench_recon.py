"""One 2D slice end to end on the CPU: ``molrecon reconstruct`` (a fresh process, start-up
included) against BART ``ecalib`` + ``pics`` l1-wavelet, in the same run.

Usage::

    python benchmarks/bench_recon.py [--size 256] [--coils 8] [--accel 4] [--lam 0.005]
        [--iters 100] [--threads N] [--small] [--json FILE]

The scan is made by ``molrecon simulate`` (``--size``², ``--coils`` coils,
equispaced R = ``--accel``, with its noise-free truth). Timed, each as the
wall time of its processes:

* ``molrecon reconstruct`` with ``--method mol`` (bundled 2D model) and with
  ``--method sense``, writing NIfTI;
* BART: ``bart ecalib -m1 -r ACS`` (the calibration region: the scan's fully sampled
  centre) and ``bart pics -R W:7:0:LAM -i ITERS`` (l1-wavelet)
  on the same k-space, converted to BART's layout with :func:`molrecon.io.maps.write_cfl`
  (the conversion is not timed: it stands for BART's own reader).

PSNR/SSIM against the truth use :func:`molrecon.metrics.compare` (magnitudes,
least-squares fitted scale). ``--small``: 64², 4 coils, 16 ACS lines (ESPIRiT's 6×6
kernel needs more than the simulator's default 8 at this size), 30 BART iterations (a
smoke test). Both tools get the same number of threads (``--threads``, default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from molrecon.io.detect import read_raw
from molrecon.io.maps import read_cfl, write_cfl
from molrecon.metrics import compare

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-2000:]}")
    return dt


def load_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--accel", type=float, default=4.0)
    ap.add_argument("--lam", type=float, default=0.005, help="BART l1-wavelet weight")
    ap.add_argument("--iters", type=int, default=100, help="BART pics iterations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.small:
        args.size, args.coils, args.iters = 64, 4, 30
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    py = [sys.executable, "-m", "molrecon"]
    res: dict[str, Any] = {"size": args.size, "coils": args.coils, "accel": args.accel,
                           "threads": args.threads, "bart_lambda": args.lam,
                           "bart_iters": args.iters, "rows": []}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        raw, truth_path = tmp / "scan.h5", tmp / "truth.nii.gz"
        run([*py, "simulate", str(raw), "--kind", "2d", "--matrix", f"{args.size}x{args.size}",
             "--coils", str(args.coils), "-R", str(args.accel), "--truth", str(truth_path),
             "--seed", "1", *(["--acs", "16"] if args.small else [])], env)
        truth = np.squeeze(load_nifti(truth_path))                           # (X, Y)
        for method in ("mol", "sense"):
            out = tmp / f"{method}.nii.gz"
            dt = run([*py, "reconstruct", str(raw), str(out), "--method", method,
                      "--device", "cpu", "--quiet"], env)
            m = compare(np.squeeze(load_nifti(out)), truth)
            res["rows"].append({"tool": f"molrecon {method}", "seconds": dt, "psnr": m.psnr,
                                "ssim": m.ssim})
        scan = read_raw(raw)
        k = scan.kspace[0, :, 0]                                             # (C, Y, X)
        write_cfl(tmp / "k", np.transpose(k, (2, 1, 0))[:, :, None, :])    # (X, Y, 1, C)
        benv = {**env, "OMP_NUM_THREADS": threads}
        acs = int(scan.calib[0, 0, 0, :, 0].sum())       # the fully sampled centre lines
        t_maps = run(["bart", "ecalib", "-m1", "-r", str(acs), str(tmp / "k"), str(tmp / "s")],
                     benv)
        t_pics = run(["bart", "pics", "-S", "-R", f"W:7:0:{args.lam}", "-i", str(args.iters),
                      str(tmp / "k"), str(tmp / "s"), str(tmp / "x")], benv)
        x = np.squeeze(read_cfl(tmp / "x"))                                  # (X, Y)
        # molrecon's NIfTI is (X, Y) too; compare both against the same truth
        m = compare(x, truth)
        res["rows"].append({"tool": f"BART ecalib + pics l1-wavelet ({args.iters} it)",
                            "seconds": t_maps + t_pics, "psnr": m.psnr, "ssim": m.ssim,
                            "ecalib_s": t_maps, "pics_s": t_pics})
    print(f"# One {args.size}² slice, {args.coils} coils, R = {args.accel:g}, "
          f"{args.threads} thread(s), end to end\n")
    print("| tool | seconds | PSNR (dB) | SSIM |\n|---|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['tool']} | {r['seconds']:.2f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
