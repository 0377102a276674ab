"""Where a 2D prior's Jacobian norm is large: on stage-0 patches or on whole images.

Stage 0 of ``molrecon train`` penalises a local Lipschitz estimate of H at training
patches, but the bound that MOL's guarantees need is the norm at the whole images
the reconstruction passes through (nearly clean: its fixed points). This script reads
the largest singular value of H's Jacobian (Lanczos, ``--steps``) at, for a few
scans of each folder:

* ``noisy``: a stage-0 patch (64², white noise σ ∈ [0.01, 0.12]) as the network sees it,
* ``clean``: the same patch without the noise,
* ``output``: H of the noisy patch (a denoised patch),
* ``image``: the whole clean image at reconstruction's intensity,
* ``sense``: the whole regularised-SENSE image of an undersampled problem (the MOL start),
* ``H(sense)``: H of that image (one prior step past the start).

    python benchmarks/bench_where_lipschitz.py MODEL.pt --folders runs/data2d runs/data2d_val

The campaign's figures (BENCHMARKS.md, "The 2D MOL-LR training campaign") came from this.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--folders", nargs="+", type=Path, required=True)
    ap.add_argument("--scans", type=int, default=4, help="scans per folder (spread over it)")
    ap.add_argument("--steps", type=int, default=30, help="Lanczos steps")
    ap.add_argument("--lam", type=float, default=60.0, help="λ of the regularised SENSE start")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from molrecon.deq.mol import regularised_sense
    from molrecon.models.checkpoint import load_checkpoint
    from molrecon.models.lipschitz import lanczos_jacobian_norm
    from molrecon.train.data import MaskSpec, list_raw_files, load_folder, make_problem
    from molrecon.train.patches import PatchSpec, draw_patch, sample_scales

    torch.set_num_threads(args.threads)
    net = load_checkpoint(args.checkpoint).model
    mask = MaskSpec(family="equispaced,random", acceleration=4.0, acs=16, accelerations=(4.0, 6.0))

    def norm(x: torch.Tensor) -> float:
        gen = torch.Generator().manual_seed(0)
        values, _ = lanczos_jacobian_norm(net, x, iters=args.steps, top=1, generator=gen)
        return float(values[0].detach())

    rows = []
    for folder in args.folders:
        files = list_raw_files(folder)
        pick = np.linspace(0, len(files) - 1, min(args.scans, len(files))).round().astype(int)
        data = load_folder([files[i] for i in sorted(set(pick))], "2d")
        scales = sample_scales(data.samples, "2d", mask, 11)
        for i, sample in enumerate(data.samples):
            noisy, clean = draw_patch(sample, scales[i], PatchSpec(size=64),
                                      np.random.default_rng([1, i]))
            prob = make_problem(sample, "2d", mask, np.random.default_rng([2, i]), 0.0, "cpu")
            with torch.no_grad():
                out = net(noisy[None])
                x0 = regularised_sense(prob.op.normal, prob.aty, lam=args.lam, iters=10)
                hx0 = net(x0)
            row = {"folder": str(folder), "scan": Path(sample.source).name,
                   "noisy": norm(noisy[None]), "clean": norm(clean[None]), "output": norm(out),
                   "image": norm(prob.target), "sense": norm(x0), "H(sense)": norm(hx0)}
            rows.append(row)
            print(" ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()), flush=True)
    keys = ("noisy", "clean", "output", "image", "sense", "H(sense)")
    print("\n| where | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    groups = [(f"{f.name}", [r for r in rows if r["folder"] == str(f)]) for f in args.folders]
    for label, sel in groups + ([("all", rows)] if len(args.folders) > 1 else []):
        if sel:
            print(f"| {label} (max of {len(sel)}) | "
                  + " | ".join(f"{max(r[k] for r in sel):.3f}" for k in keys) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
