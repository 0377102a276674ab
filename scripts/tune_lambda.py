"""Re-tune a MOL checkpoint's data-consistency weight λ on held-out validation scans.

λ is learned in deep-equilibrium training, but a prior pretrained as a denoiser
(``molrecon train --stage denoise``) never sees the data term, and a λ learned on
one mix of accelerations need not be the best for another. This script solves
the full MOL reconstruction of fixed validation problems (every acceleration and
mask family asked for, masks seeded per problem) for each λ of a grid, prints
mean PSNR/SSIM and iterations per λ beside CG-SENSE, and with ``--out`` writes
the checkpoint again with the λ of the best mean PSNR (weights, certificate and
kinds unchanged; the table is kept in the metadata under ``lambda_tuning``).
``--output-scale c`` first multiplies the prior's output by c (its last layer, and
the gain of an identity path: :meth:`MolCNN.scale_output`), i.e. H → cH,
which multiplies every Lipschitz constant of H by c: below 1 for a prior whose local
estimate at the data (``molrecon check-lipschitz``) is not below 1, above 1 to compare
a prior held well below the bound with others at the same bound. ``--ensemble G`` makes the
prior the average of its network over G image flips (``CNNConfig.ensemble``: 2 or 4; 1 off),
and the written checkpoint keeps it.

    python scripts/tune_lambda.py runs/s0lr/s0lr.pt --val-data runs/data2d_val \
        --lams 30,60,90,150,250 -R 4,6 --out runs/s0lr/tuned.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from molrecon.config import ENSEMBLE_SIZES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--val-data", type=Path, required=True)
    ap.add_argument("--lams", default="30,60,90,150,250")
    ap.add_argument("-R", "--accelerations", default="4,6")
    ap.add_argument("--mask", default="equispaced,random")
    ap.add_argument("--acs", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8, help="validation scans used per mask")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--output-scale", type=float, default=1.0,
                    help="multiply the prior's output by this factor first (its last layer, "
                         "and the gain of an identity path): H → cH multiplies every "
                         "Lipschitz constant by c (c < 1 for a prior whose local estimate at the data is not below 1; c > 1 to compare a "
                         "prior held well below it at the same bound)")
    ap.add_argument("--ensemble", type=int, choices=ENSEMBLE_SIZES,
                    help="average the prior over this many image flips (default: the "
                         "checkpoint's)")
    ap.add_argument("--out", type=Path, help="write the checkpoint with the best λ here")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from molrecon.deq.mol import MolStep
    from molrecon.models.checkpoint import load_checkpoint, save_checkpoint
    from molrecon.train import TrainConfig, evaluate, make_problem
    from molrecon.errors import MolreconError
    from molrecon.train.data import MaskSpec
    from molrecon.train.validate import spread_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    if not (0.0 < args.output_scale < float("inf")):
        print("error: --output-scale must be positive and finite", file=sys.stderr)
        return 2
    if args.output_scale != 1.0:
        loaded.model.scale_output(args.output_scale)
    if args.ensemble is not None:
        loaded.model.config = replace(loaded.model.config, ensemble=args.ensemble)
    try:
        val, idx = spread_samples(args.val_data, args.samples,
                                  warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    except MolreconError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cfg = TrainConfig(data=str(args.val_data), out="unused.pt", fwd_max_iter=100)
    problems = []
    for r in [float(v) for v in args.accelerations.split(",")]:
        for fam in [f for f in args.mask.split(",") if f]:
            spec = MaskSpec(family=fam, acceleration=r, acs=args.acs)
            for j, i in enumerate(idx):
                rng = np.random.default_rng([args.seed, 4_444_444, int(r * 10), j])
                problems.append(make_problem(val.samples[int(i)], val.kind, spec, rng, 0.0, "cpu"))
    rows = []
    for lam in [float(v) for v in args.lams.split(",")]:
        step = MolStep(loaded.model, replace(loaded.mol_config, lam=lam, learn_lam=False))
        m = evaluate(step, problems, cfg)
        rows.append({"lambda": lam, **m})
        print(f"λ {lam:8.3g}: MOL {m['val_psnr']:.2f} dB / SSIM {m['val_ssim']:.4f}, "
              f"{m['val_iterations']:.1f} iterations; CG-SENSE {m['val_sense_psnr']:.2f} dB "
              f"({len(problems)} problems)", flush=True)
    ok = [r for r in rows if r["val_psnr"] is not None]
    if not ok:
        print("error: every λ failed to give a finite reconstruction", file=sys.stderr)
        return 1
    best = max(ok, key=lambda r: r["val_psnr"])
    print(f"best λ = {best['lambda']:g} ({best['val_psnr']:.2f} dB; stored λ "
          f"{loaded.mol_config.lam:.4g})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.out:
        meta = dict(loaded.metadata)
        meta["lambda_tuning"] = {"val_data": args.val_data.name, "accelerations": args.accelerations,
                                 "mask": args.mask, "problems": len(problems), "rows": rows,
                                 "chosen": best["lambda"], "output_scale": args.output_scale,
                                 "ensemble": loaded.model.config.ensemble}
        if loaded.lam_noise is not None:
            print("warning: the checkpoint's λ noise rule is not written (its σ₀ was fitted to "
                  "the old λ); run scripts/set_lambda_rule.py on the new file", file=sys.stderr)
        save_checkpoint(args.out, loaded.model, replace(loaded.mol_config, lam=best["lambda"]),
                        metadata=meta, certificate=loaded.certificate, kinds=loaded.kinds,
                        force=True)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
