"""MOL step size α and Anderson memory against iterations and accuracy on a case of the quality benchmark.

Usage::

    python benchmarks/bench_alpha.py MODEL.pt [--case cine|brain2dt|3d|2d] [--index I]
        [--acceleration R (2d)] [--alphas 1,0.5,0.35]
        [--memories 5,10] [--cg-iters 10,20] [--tol 1e-4] [--ref-tol 1e-5] [--threads 1]

The fixed point of MOL does not depend on α; the number of Anderson iterations
does, and for a prior whose Jacobian norm at the data is well above 1 (a prior
trained through the deep equilibrium under a penalty on μ, the top of the
numerical range, rather than on the norm) α = 1 can be slow. The case is one of
its group in ``benchmarks/quality.py`` (same simulation, seed and
slice position); every solve is ``molrecon.recon.reconstruct`` with the model
at one α, so the tolerance is on the α = 1 residual (``molrecon.deq.mol``:
the solver stops at min(α, 1)·tol of its own residual). ``--memories`` repeats
every α with each number of past iterates the Anderson solver mixes
(``reconstruct --anderson-memory``), which changes the speed, not the fixed
point; ``--cg-iters`` likewise repeats them with each count of CG iterations in the
data-consistency step (``reconstruct --cg-iters``; the fixed points of the computed step
are exactly those of MOL's equation whatever the count, ``molrecon.deq.mol``).
Reported per α, memory and CG count:
iterations, wall time, PSNR against the simulation's truth and the relative
distance ‖x − x_ref‖/‖x_ref‖ to a reference solved at α = 1 to ``--ref-tol``.
``--raw-tol`` adds, for every α < 1, the solve that stops at tol of its own
residual (the rule before the scaling) for comparison.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality

from molrecon.memory import ANDERSON_MEMORY
from molrecon.io.detect import read_raw
from molrecon.metrics import compare
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

def case_config(case: str, index: int, accel: float = 4.0) -> tuple[SimulationConfig, str]:
    """Case ``index`` of a quality-benchmark group, and its label there: 0 or 1, and for
    ``2d`` (at acceleration ``accel``) 0–2, the slices of a ``--slices 3`` run."""
    if case == "2d":
        if index not in (0, 1, 2):
            raise SystemExit(f"error: the 2d group has cases 0-2, got {index}")
        pos = float(np.linspace(0.72, 0.82, 3)[index])
        return (quality.sim("2d", accel, 500 + index, pos),
                f"held-out brain 2D, R={accel:g} #{index}")
    if index not in (0, 1):
        raise SystemExit(f"error: the {case} group has cases 0 and 1, got {index}")
    pos = (0.74, 0.80)[index]
    if case == "cine":
        return (quality.sim("2dt", 6.0, 720 + index, pos, **quality.CINE),
                f"held-out cardiac-like cine (160×128, 12 frames, interleaved R=6) #{index}")
    if case == "brain2dt":
        return (quality.sim("2dt", 4.0, 700 + index, pos),
                f"held-out brain 2D+time (128², 12 frames, interleaved R=4) #{index}")
    if case == "3d":
        return (quality.sim("3d", 4.0, 310 + index, pos),
                f"held-out brain 3D (128²×16, Poisson R=4) #{index}")
    raise SystemExit(f"error: unknown case {case!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--case", choices=("cine", "brain2dt", "3d", "2d"), default="cine")
    ap.add_argument("--index", type=int, choices=(0, 1, 2), default=0,
                    help="which case of the group (the quality benchmark runs #0 and #1; "
                         "2d: #0-#2 of a --slices 3 run)")
    ap.add_argument("--acceleration", type=float, default=4.0,
                    help="2d only: the acceleration of the case (the quality benchmark's 4, 6, 8)")
    ap.add_argument("--alphas", default="1,0.5,0.35")
    ap.add_argument("--memories", default=str(ANDERSON_MEMORY),
                    help="Anderson memories to run every α with (comma-separated)")
    ap.add_argument("--cg-iters", default="",
                    help="CG counts of the data-consistency step to run every α with "
                         "(comma-separated; default: the model's own)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--ref-tol", type=float, default=1e-5)
    ap.add_argument("--raw-tol", action="store_true",
                    help="also solve every α < 1 to tol of its own residual")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    alphas = [float(a) for a in args.alphas.split(",")]
    memories = [int(m) for m in args.memories.split(",")]
    cgs: list[int | None] = ([int(c) for c in args.cg_iters.split(",")] if args.cg_iters
                             else [None])
    cfg, label = case_config(args.case, args.index, args.acceleration)

    def solve(scan: object, alpha: float, tol: float, memory: int = ANDERSON_MEMORY,
              max_iter: int = 100, cg: int | None = None):
        t0 = time.perf_counter()
        res = reconstruct(scan, ReconConfig(method="mol", weights=args.checkpoint, device="cpu",
                                            alpha=alpha, tol=tol, max_iter=max_iter,
                                            anderson_memory=memory, cg_iters=cg))
        return res, time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        sim = simulate_to_file(cfg, t / "case.h5", t / "case_truth.nii.gz", force=True)
        truth = np.abs(sim.truth.data)
        scan = read_raw(t / "case.h5")
        ref, ref_s = solve(scan, 1.0, args.ref_tol, max_iter=400)
        x_ref = ref.image.data
        rows = [("1 (reference)", ANDERSON_MEMORY, None, args.ref_tol, ref, ref_s, 0.0)]
        # (α, memory, CG count, the tol given to reconstruct, row name); --raw-tol: tol / α,
        # undoing the engine's scale, so that the solver stops at tol of the α-step's own
        # residual.
        runs = [(a, m, c, args.tol, f"{a:g}") for a in alphas for m in memories for c in cgs]
        if args.raw_tol:
            runs += [(a, m, c, args.tol / a, f"{a:g}, stopped at tol of its own residual")
                     for a in alphas if a < 1.0 for m in memories for c in cgs]
        for alpha, memory, cg, tol, name in runs:
            res, secs = solve(scan, alpha, tol, memory, cg=cg)
            dist = float(np.linalg.norm(res.image.data - x_ref) / np.linalg.norm(x_ref))
            rows.append((name, memory, cg, args.tol, res, secs, dist))

    print(f"{args.checkpoint}, case: {label}; machine: {platform.machine()}, torch "
          f"{torch.__version__}, {args.threads} thread(s), {date.today().isoformat()}\n")
    print("| α | Anderson memory | CG iterations | tol (α = 1 residual) | iterations | "
          "converged | PSNR (dB) | distance to the reference | time (s) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for name, memory, cg, tol, res, secs, dist in rows:
        m = compare(res.image.data, truth)
        print(f"| {name} | {memory} | {'model' if cg is None else cg} | {tol:g} | "
              f"{res.report.get('iterations')} | {res.report.get('converged')} | "
              f"{m.psnr:.3f} | {dist:.2e} | {secs:.0f} |")


if __name__ == "__main__":
    main()
