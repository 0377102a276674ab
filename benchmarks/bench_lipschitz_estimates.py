"""How far each local Lipschitz estimate of a prior H reads below the converged one.

Usage::

    python benchmarks/bench_lipschitz_estimates.py MODEL.pt [MODEL2.pt ...] --data FILE [FILE ...]
        [--points 1] [--threads 2] [--json OUT.json]

At the MOL fixed point of every test slice (the checkpoint's α, λ and CG count, from the
CG-SENSE start, relative residual 1e-5), measured per model in one run:

* ``ratio crop``: the MOL-LR training penalty's default search (``--penalty-estimator
  ratio``): 10 ascent steps on ‖H(u) − H(v)‖/‖u − v‖ from u + 0.01·noise, on three 96² crops
  of the fixed point (the largest of the three; training draws one crop per sample);
* ``ratio``: the same search on the whole image;
* ``power K``: K power iterations on JᵀJ from white noise (K = 10, 20: 20 was the count
  ``check-lipschitz`` ran until 2026-12-05);
* ``power conv``: the power iteration run until it rises by less than 1e-4 (relative) over
  10 iterations, at most 1000 (``check-lipschitz``'s estimate since then), with the
  iterations it took;
* ``Lanczos K``: ‖J v‖ of the top Ritz vector after K Lanczos steps on JᵀJ (K = 10, 20,
  30: ``check-lipschitz --lanczos-steps`` defaults to 30, ``train --penalty-estimator
  lanczos`` takes its steps from ``--penalty-steps``), with its seconds beside the converged
  power iteration's.

Every number is attained by some direction or pair of points, so each is a lower bound of
H's Lipschitz constant; the tightest is the best. A markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from molrecon.deq.mol import MolStep
from molrecon.guarantees import load_problems
from molrecon.guarantees.problems import solve_mol
from molrecon.models.checkpoint import load_checkpoint
from molrecon.models.lipschitz import jacobian_norm, lanczos_jacobian_norm, local_lipschitz_ratio

CROP = 96


def _crops(x: torch.Tensor) -> list[torch.Tensor]:
    """Three 96² windows: the centre and two off-centre ones (all of it when smaller)."""
    ny, nx = x.shape[-2:]
    cy, cx = min(CROP, ny), min(CROP, nx)
    starts = [((ny - cy) // 2, (nx - cx) // 2), ((ny - cy) // 4, (nx - cx) // 4),
              (3 * (ny - cy) // 4, 3 * (nx - cx) // 4)]
    return [x[..., y:y + cy, z:z + cx].contiguous() for y, z in starts]


def measure(model_path: Path, data: list[Path], points: int) -> list[dict[str, object]]:
    loaded = load_checkpoint(model_path)
    prior = loaded.model
    rows = []
    for prob in load_problems(data, kinds=loaded.kinds, points=points):
        step = MolStep(prior, replace(loaded.mol_config, learn_lam=False)).eval()
        x_all = solve_mol(step, prob, prob.start, tol=1e-5, max_iter=200).x
        for i in range(x_all.shape[0]):
            x = x_all[i:i + 1]

            def gen() -> torch.Generator:
                return torch.Generator().manual_seed(0)

            t0 = time.perf_counter()
            with torch.no_grad():
                crop = max(float(local_lipschitz_ratio(prior, c, steps=10, generator=gen())[0])
                           for c in _crops(x))
                whole = float(local_lipschitz_ratio(prior, x, steps=10, generator=gen())[0])
            p10 = jacobian_norm(prior, x, max_iters=10, rtol=None, generator=gen())
            p20 = jacobian_norm(prior, x, max_iters=20, rtol=None, generator=gen())
            t1 = time.perf_counter()
            conv = jacobian_norm(prior, x, max_iters=1000, rtol=1e-4, generator=gen())
            conv_s = time.perf_counter() - t1
            lanczos = {}
            for k in (10, 20, 30):
                t1 = time.perf_counter()
                values, _ = lanczos_jacobian_norm(prior, x, iters=k, generator=gen())
                lanczos[k] = (float(values.detach()[0]), time.perf_counter() - t1)
            rows.append({"model": model_path.name, "source": prob.source,
                         "item": prob.items[i] if i < len(prob.items) else i,
                         "size": "x".join(str(n) for n in x.shape[-2:]),
                         "ratio_crop": crop, "ratio": whole, "power10": p10.value,
                         "power20": p20.value, "power_conv": conv.value,
                         "power_conv_iterations": conv.iterations,
                         "power_conv_converged": conv.converged,
                         "power_conv_seconds": round(conv_s, 1),
                         **{f"lanczos{k}": v for k, (v, _) in lanczos.items()},
                         "lanczos30_seconds": round(lanczos[30][1], 1),
                         "seconds": round(time.perf_counter() - t0, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--data", nargs="+", type=Path, required=True)
    ap.add_argument("--points", type=int, default=1, help="slices per file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [r for m in args.models for r in measure(m, args.data, args.points)]
    print("| model | file | size | ratio crop | ratio | power 10 | power 20 | power conv "
          "(iterations, s) | Lanczos 10 | Lanczos 20 | Lanczos 30 (s) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        flag = "" if r["power_conv_converged"] else ", cap"
        print(f"| {r['model']} | {r['source']} | {r['size']} | {r['ratio_crop']:.4f} | "
              f"{r['ratio']:.4f} | {r['power10']:.4f} | {r['power20']:.4f} | "
              f"**{r['power_conv']:.4f}** ({r['power_conv_iterations']}{flag}, "
              f"{r['power_conv_seconds']}) | {r['lanczos10']:.4f} | {r['lanczos20']:.4f} | "
              f"**{r['lanczos30']:.4f}** ({r['lanczos30_seconds']}) |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
