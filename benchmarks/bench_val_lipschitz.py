"""Where training validation reads a 3D or 2D+time prior's Jacobian norm: a crop or the whole.

Usage::

    python benchmarks/bench_val_lipschitz.py MODEL.pt --val-data DIR [--mask interleaved,random]
        [-R 4,8] [--acs 8] [--samples 6] [--seed 23] [--lam L] [--threads 1] [--json OUT]

The validation problems are those ``molrecon train`` builds from DIR with the same mask
options, sample count and seed (the highest acceleration, masks seeded per problem); MOL
solves each to its fixed point with the checkpoint's λ (or ``--lam``). At every fixed point
the largest singular value of H's Jacobian is read twice with the certificate's code:

* on the central 64 × 64 in-plane crop, 6 power iterations and 10 Lanczos steps: what a 3D
  or 2D+time training validation measured at its first two fixed points until 2026-12-06;
* on the whole volume or series, 10 power iterations and 20 Lanczos steps: what it measures
  now (at up to four points spread over the problems), and what ``check-lipschitz`` and the
  bundling script measure.

A markdown table (one row per problem, with the seconds of each reading) goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _crop(x: torch.Tensor, size: int) -> torch.Tensor:
    y0 = max(0, (x.shape[-2] - size) // 2)
    x0 = max(0, (x.shape[-1] - size) // 2)
    return x[..., y0:y0 + size, x0:x0 + size].contiguous()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--val-data", type=Path, required=True)
    ap.add_argument("--mask", default="interleaved,random")
    ap.add_argument("-R", default="4,8")
    ap.add_argument("--acs", type=int, default=8)
    ap.add_argument("--samples", type=int, default=6)
    ap.add_argument("--seed", type=int, default=23)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dataclasses import replace

    from molrecon.deq.mol import MolStep
    from molrecon.models.bundled import resolve_weights
    from molrecon.models.certificate import certificate_for
    from molrecon.models.checkpoint import load_checkpoint
    from molrecon.train.validate import evaluate, validation_problems

    loaded = load_checkpoint(resolve_weights(str(args.model)))
    mol = loaded.mol_config if args.lam is None else replace(loaded.mol_config, lam=args.lam)
    problems, names, config = validation_problems(
        args.val_data, mask=args.mask, accelerations=tuple(float(r) for r in args.R.split(",")),
        acs=args.acs, samples=args.samples, seed=args.seed)
    fps: list[torch.Tensor] = []
    metrics = evaluate(MolStep(loaded.model, mol), problems, config, fps)
    rows = []
    for name, x in zip(names, fps):
        t0 = time.perf_counter()
        crop = certificate_for(loaded.model, [_crop(x, 64)], power_iters=6, ratio_steps=0,
                               lanczos_steps=10, seed=config.seed)
        t1 = time.perf_counter()
        whole = certificate_for(loaded.model, [x], power_iters=10, ratio_steps=0,
                                lanczos_steps=20, seed=config.seed)
        t2 = time.perf_counter()
        rows.append({"problem": name, "shape": list(x.shape[1:]), "crop64": crop["local_max"],
                     "crop_s": round(t1 - t0, 1), "whole": whole["local_max"],
                     "whole_s": round(t2 - t1, 1)})
    print(f"{args.model.name}, λ {float(mol.lam):g}: validation MOL {metrics['val_psnr']:.2f} dB "
          f"on {len(fps)} problems\n")
    print("| validation problem | size (D, Y, X) | crop 64², 6 power + 10 Lanczos | s "
          "| whole, 10 power + 20 Lanczos | s |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['problem']} | {' × '.join(map(str, r['shape']))} | {r['crop64']:.4f} "
              f"| {r['crop_s']} | {r['whole']:.4f} | {r['whole_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "lam": float(mol.lam),
                                         "val_psnr": metrics["val_psnr"], "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
