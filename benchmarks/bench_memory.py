"""Peak memory of one training step: DEQ (implicit backward) vs unrolled differentiation.

Usage::

    python benchmarks/bench_memory.py [--size 256] [--coils 8] [--steps 1,2,5,10]
        [--cg-iters 10] [--device cpu|cuda] [--threads N]

One training step is: the MOL forward solve, a loss (squared error to the
simulated truth), and the gradient with respect to all parameters (the 5×64
MOL-SN prior and λ).

* DEQ: forward fixed-point iteration without a graph (Anderson, α = 1), one
  step re-evaluated with a graph, implicit backward (Anderson on vector–
  Jacobian products of that step).
* unrolled K: K MOL steps recorded by autograd from the same start, then
  backpropagation through all of them.

Each configuration runs in a fresh subprocess so that its peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; the table
also gives the peak after set-up (data, model, start image) and the
difference, and ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_deq_iterations import fresh_sn_prior, simulated_slice  # noqa: E402

from molrecon.deq import (  # noqa: E402
    FixedPointConfig,
    MolConfig,
    MolStep,
    deq_solve,
    regularised_sense,
    unrolled,
)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def child(config: str, args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sl = simulated_slice(args.size, args.coils, 4, 24, device=args.device)
    prior = fresh_sn_prior().to(dev).train()
    step = MolStep(prior, MolConfig(alpha=1.0, lam=100.0, cg_iters=args.cg_iters)).to(dev)
    with torch.no_grad():
        x0 = regularised_sense(sl.normal, sl.aty, lam=100.0, iters=50)
        prior(x0)                        # spectral bounds computed once (cached) before measuring
    fn = step.bind(normal=sl.normal, aty=sl.aty)
    setup_rss = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        setup_cuda = torch.cuda.memory_allocated() / 2**20
    t0 = time.perf_counter()
    info: dict[str, object] = {}
    if config == "deq":
        fp = FixedPointConfig(tol=args.tol, max_iter=args.max_iter, warn=False)
        out = deq_solve(fn, x0, forward=fp, backward=fp)
        loss = (out.x - sl.truth).abs().square().sum()
        loss.backward()
        info["forward_iterations"] = out.forward.iterations
        info["backward_iterations"] = out.backward.iterations[0] if out.backward.iterations else 0
    else:
        k = int(config.split("-")[1])
        x = unrolled(fn, x0, k)
        loss = (x - sl.truth).abs().square().sum()
        loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        info["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        info["cuda_setup_mib"] = setup_cuda
    info["seconds"] = time.perf_counter() - t0
    info["setup_rss_mib"] = setup_rss
    info["peak_rss_mib"] = _rss_mib()
    grads = [p.grad for p in step.parameters() if p.requires_grad]
    info["grads_finite"] = all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--steps", default="1,2,5,10", help="unrolled depths K")
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=50)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    configs = ["deq"] + [f"unrolled-{int(k)}" for k in args.steps.split(",") if k.strip()]
    passthrough = ["--size", str(args.size), "--coils", str(args.coils), "--cg-iters",
                   str(args.cg_iters), "--tol", str(args.tol), "--max-iter", str(args.max_iter),
                   "--device", args.device]
    if args.threads:
        passthrough += ["--threads", str(args.threads)]
    print(f"# Training-step peak memory: DEQ vs unrolled ({args.size}×{args.size}, {args.coils} "
          f"coils, 5×64 MOL-SN prior, {args.cg_iters} CG/step, device {args.device})\n")
    cuda = args.device.startswith("cuda")
    head = "| configuration | peak RSS (MiB) | after set-up (MiB) | step (MiB) |"
    line = "|---|---|---|---|"
    if cuda:
        head += " CUDA peak allocated (MiB) |"
        line += "---|"
    print(head + " time (s) | iterations fwd/bwd |")
    print(line + "---|---|")
    env = dict(os.environ)
    for cfg in configs:
        proc = subprocess.run([sys.executable, __file__, "--child", cfg, *passthrough],
                              capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            print(f"| {cfg} | failed: {proc.stderr.strip().splitlines()[-1][:80]} |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peak, setup = float(r["peak_rss_mib"]), float(r["setup_rss_mib"])
        row = f"| {cfg} | {peak:.0f} | {setup:.0f} | {peak - setup:.0f} |"
        if cuda:
            row += f" {float(r['cuda_peak_mib']):.0f} |"
        its = (f"{r['forward_iterations']}/{r['backward_iterations']}" if cfg == "deq"
               else cfg.split("-")[1] + "/–")
        print(row + f" {float(r['seconds']):.1f} | {its} |")


if __name__ == "__main__":
    main()
