"""What ``train --project-bound`` reads at its probes, warm against cold Lanczos.

Usage::

    python benchmarks/bench_projection.py BEFORE.pt AFTER.pt --data DIR [--probes 6]
        [--mask equispaced,random] [-R 4,6] [--acs 16] [--seed 11] [--threads 1]
        [--json OUT.json]

BEFORE and AFTER are two checkpoints of one training run some steps apart (the model at
one projection and at the next). The probes are those ``train --project-bound`` would
choose from the training folder DIR with the same mask options and seed: whole scans, at
their MOL fixed points with the checkpoint's λ. At BEFORE each probe's top singular value
of H's Jacobian is read by 20 Lanczos steps from noise (the projection's first visit); at
AFTER by 10 steps from BEFORE's top Ritz vector (its next visits), against 20 and 40 steps
from noise, with the seconds of each. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from molrecon.deq.fixed_point import FixedPointConfig
from molrecon.models.lipschitz import lanczos_jacobian_norm
from molrecon.train import TrainConfig
from molrecon.train.data import MaskSpec
from molrecon.train.loop import _load_data
from molrecon.train.probes import PenaltyProbes
from molrecon.train.step import _build


def _setup(ckpt: Path, args: argparse.Namespace) -> tuple[TrainConfig, object, object]:
    from molrecon.models.bundled import resolve_weights
    from molrecon.models.checkpoint import load_checkpoint

    skip = load_checkpoint(resolve_weights(str(ckpt))).model.config.skip > 0
    accels = tuple(float(r) for r in args.R.split(","))
    config = TrainConfig(data=str(args.data), out="unused.pt", constraint="lr",
                         init_weights=str(ckpt), cg_iters=args.cg_iters, skip=skip,
                         mask=MaskSpec(family=args.mask, accelerations=accels, acs=args.acs),
                         seed=args.seed, penalty_probes=args.probes, device="cpu")
    step, cnn = _build(config, "2d", torch.device("cpu"))
    return config, step, cnn


def _read(cnn: object, x: torch.Tensor, iters: int, start: torch.Tensor | None,
          seed: int) -> tuple[float, torch.Tensor, float]:
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    top, ritz = lanczos_jacobian_norm(cnn, x, iters=iters, generator=gen, start=start)
    return float(top.detach().max()), ritz[:1], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--probes", type=int, default=6)
    ap.add_argument("--mask", default="equispaced,random")
    ap.add_argument("-R", default="4,6")
    ap.add_argument("--acs", type=int, default=16)
    ap.add_argument("--cg-iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    cfg_a, step_a, cnn_a = _setup(args.before, args)
    cfg_b, step_b, cnn_b = _setup(args.after, args)
    _, train_set, _ = _load_data(cfg_a, lambda _: None)
    probes = PenaltyProbes.build(cfg_a, train_set, torch.device("cpu"), whole=True)
    fwd = FixedPointConfig(tol=cfg_a.fwd_tol, max_iter=cfg_a.fwd_max_iter, warn=False)
    rows = []
    print("| probe | matrix | BEFORE, 20 from noise | AFTER, 10 warm | AFTER, 20 from noise "
          "| AFTER, 40 from noise | seconds (10 warm / 20 / 40) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for k in range(len(probes.problems)):
        xa = probes.fixed_point(step_a, k, init_iters=cfg_a.init_iters, fwd=fwd)
        before, vec, _ = _read(cnn_a, xa, 20, None, 1000 + k)
        xb = probes.fixed_point(step_b, k, init_iters=cfg_b.init_iters, fwd=fwd)
        warm, _, t_warm = _read(cnn_b, xb, 10, vec, 2000 + k)
        cold20, _, t20 = _read(cnn_b, xb, 20, None, 3000 + k)
        cold40, _, t40 = _read(cnn_b, xb, 40, None, 3000 + k)
        shape = "×".join(map(str, xb.shape[-2:]))
        rows.append({"probe": k, "matrix": shape, "before_cold20": before, "after_warm10": warm,
                     "after_cold20": cold20, "after_cold40": cold40,
                     "seconds": [t_warm, t20, t40]})
        print(f"| {k} | {shape} | {before:.5f} | {warm:.5f} | {cold20:.5f} | {cold40:.5f} "
              f"| {t_warm:.1f} / {t20:.1f} / {t40:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"before": str(args.before), "after": str(args.after),
                                         "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
