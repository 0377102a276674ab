"""Monotone or only Lipschitz? H's numerical range against its Jacobian norm at MOL fixed points.

Usage::

    python benchmarks/bench_monotone.py NAME=MODEL.pt [NAME=MODEL.pt[@LAM][xSCALE] ...]
        --val-data DIR [--mask equispaced,random] [-R 6] [--acs 16] [--samples 4]
        [--seed 23] [--steps 20] [--points K] [--threads 1] [--json OUT]

MOL's uniqueness and robustness need F = I − H to be m-monotone, which at a point is
μ = λ_max(½(J + Jᵀ)) ≤ 1 − m for H's Jacobian J; the method's sufficient condition, a
Lipschitz constant below 1, bounds the larger ‖J‖. For every model (``@LAM`` overrides its
λ, ``xSCALE`` multiplies H's output first) the validation problems that ``molrecon train``
builds from DIR with these mask options (the highest acceleration, masks seeded per
problem) are solved to their fixed points, and at each fixed point Lanczos reads ‖J‖ (on
JᵀJ) and the top and bottom of the spectrum of ½(J + Jᵀ), with the same number of steps
(``--points K``: at K fixed points spread over the problems, as training validation picks
them, where whole 2D+time series cost minutes each on a CPU).
Also printed: the validation PSNR and the iterations, so that a model's quality and its
margins sit in one row. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import torch


def _spec(text: str) -> tuple[str, str, float | None, float]:
    name, _, rest = text.partition("=")
    m = re.fullmatch(r"(.+?)(?:@([0-9.]+))?(?:x([0-9.]+))?", rest)
    if not name or not rest or m is None:
        raise SystemExit(f"bad model spec {text!r}: NAME=PATH[@LAM][xSCALE]")
    lam = float(m.group(2)) if m.group(2) else None
    scale = float(m.group(3)) if m.group(3) else 1.0
    return name, m.group(1), lam, scale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="NAME=PATH[@LAM][xSCALE]")
    ap.add_argument("--val-data", type=Path, required=True)
    ap.add_argument("--mask", default="equispaced,random")
    ap.add_argument("-R", default="6")
    ap.add_argument("--acs", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--points", type=int, default=0, help="measure at this many fixed points "
                    "spread over the problems (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from molrecon.deq.mol import MolStep
    from molrecon.models.bundled import resolve_weights
    from molrecon.models.certificate import seeded_generator
    from molrecon.models.checkpoint import load_checkpoint
    from molrecon.models.lipschitz import lanczos_jacobian_norm, monotonicity_estimate
    from molrecon.train.validate import evaluate, spread_indices, validation_problems

    problems, _, config = validation_problems(
        args.val_data, mask=args.mask, accelerations=tuple(float(r) for r in args.R.split(",")),
        acs=args.acs, samples=args.samples, seed=args.seed)
    rows = []
    for text in args.models:
        name, path, lam, scale = _spec(text)
        loaded = load_checkpoint(resolve_weights(path))
        if scale != 1.0:
            loaded.model.scale_output(scale)
        mol = loaded.mol_config if lam is None else replace(loaded.mol_config, lam=lam)
        fps: list[torch.Tensor] = []
        t0 = time.perf_counter()
        metrics = evaluate(MolStep(loaded.model, mol), problems, config, fps)
        norms, tops, bottoms = [], [], []
        picks = spread_indices(len(fps), args.points) if args.points else range(len(fps))
        for i in picks:
            x = fps[i]
            values, _ = lanczos_jacobian_norm(loaded.model, x, iters=args.steps,
                                              generator=seeded_generator(args.seed + i))
            found = monotonicity_estimate(loaded.model, x, iters=args.steps,
                                          generator=seeded_generator(args.seed + i))
            norms.append(float(values[0].detach()))
            tops.append(float(found.top[0].detach()))
            bottoms.append(found.smallest)
        row = {"name": name, "path": path, "lam": float(mol.lam), "scale": scale,
               "val_psnr": metrics["val_psnr"], "iters": metrics.get("val_iterations"),
               "points": list(picks),
               "norm": norms, "mu": tops, "sym_min": bottoms,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"# {name}: {row}", flush=True)
    print(f"\n{len(problems)} problems ({args.mask}, R {args.R}), Lanczos {args.steps} steps\n")
    print("| model | λ | scale | validation PSNR (dB) | ‖J‖ max (min) | μ = top of ½(J+Jᵀ), "
          "max (min) | bottom of ½(J+Jᵀ), min | s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['lam']:g} | {r['scale']:g} | {r['val_psnr']:.2f} "
              f"| {max(r['norm']):.4f} ({min(r['norm']):.4f}) "
              f"| {max(r['mu']):.4f} ({min(r['mu']):.4f}) | {min(r['sym_min']):.3f} "
              f"| {r['seconds']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
