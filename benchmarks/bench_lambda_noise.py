"""The best MOL data weight λ as a function of the data's noise level.

Usage::

    python benchmarks/bench_lambda_noise.py CHECKPOINT --val-data DIR \
        [--noise 0,0.015,0.04,0.1] [--octaves=-5,3] [-R 6] [--mask equispaced] \
        [--samples 4] [--threads 1] [--json F]

For every extra noise level (complex white noise of that standard deviation added to
the fully sampled validation k-space before undersampling, in the units of the
normalised data) and every validation problem (the same masks at every level), this
finds the λ of the best PSNR of the full MOL reconstruction against the noise-free
reference: it solves at the checkpoint's λ₀ and at λ₀·2^±1, walks by octaves towards
the better side while the PSNR rises, and refines with a parabola in log λ. It records
the problem's noise level σ and effective acceleration R as reconstruction estimates
them (:func:`molrecon.physics.noise.periphery_sigma` on the normalised, undersampled
k-space; :func:`~molrecon.physics.noise.effective_acceleration`), prints per level the
mean PSNR at λ₀ and at the best λ beside CG-SENSE, and fits log λ* = a + b·log σ over
all problems by least squares (``scripts/set_lambda_rule.py`` fits R's exponent too and
writes the rule λ(σ, R) = λ₀(σ₀/σ)^p(R/R₀)^q that ``molrecon`` applies,
:class:`molrecon.physics.noise.NoiseLambdaRule`). The reference is the validation file's
fully sampled image, noise included: make the files nearly noise-free
(``scripts/make_training_data.py --noise-scale 0.05``) so that a λ which lets the noise
through is not rewarded for matching the reference's own noise. The coil maps are
estimated from each problem's calibration lines, as in reconstruction (``--maps
espirit``): with the fully sampled file's maps the data term is exact, and a large λ
is not charged for the map errors it passes on to the image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np


def best_lambda(lams: list[float], psnrs: list[float]) -> float:
    """The λ of the best PSNR, refined by a parabola in log λ through it and its neighbours
    (kept inside the grid)."""
    order = np.argsort(lams)
    x = np.log(np.asarray(lams, dtype=float)[order])
    y = np.asarray(psnrs, dtype=float)[order]
    i = int(np.argmax(y))
    if i == 0 or i == len(x) - 1:
        return float(math.exp(x[i]))
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    if a >= 0:
        return float(math.exp(x[i]))
    return float(math.exp(min(max(-b / (2 * a), x[i - 1]), x[i + 1])))


def with_acs_maps(p):  # type: ignore[no-untyped-def]
    """The problem ``p`` with ESPIRiT maps from its own calibration region, normalised again as
    reconstruction does (:func:`molrecon.problem.prepare`), its reference scaled alike."""
    import torch

    from molrecon.io.kspace import find_calibration_region
    from molrecon.problem import prepare

    mask = p.op.mask != 0                                               # (1, 1, D, Y, 1)
    calib = torch.from_numpy(find_calibration_region(mask.cpu().numpy(), p.kind))
    q = prepare(p.kspace, mask, calib.to(mask.device), p.kind)
    s = q.scale.reshape(-1, 1, 1, 1).to(p.target.dtype)
    return replace(q, target=p.target / s)


def search(solve, lam0: float, lo: int, hi: int) -> dict[float, float]:
    """PSNR at λ0·2^k for the integers k from 0 towards the better neighbour, until the PSNR
    falls or k leaves [lo, hi]; returns {λ: PSNR} of every λ solved."""
    seen: dict[float, float] = {}

    def at(k: int) -> float:
        lam = lam0 * 2.0 ** k
        if lam not in seen:
            seen[lam] = solve(lam)
        return seen[lam]

    k = 0
    up, down = at(1), at(-1)
    step = 1 if up > down else -1
    if at(0) >= max(up, down):
        return seen
    k = step
    while lo <= k + step <= hi and at(k + step) > at(k):
        k += step
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--val-data", type=Path, required=True)
    ap.add_argument("--noise", default="0,0.015,0.04,0.1",
                    help="extra noise standard deviations (normalised units)")
    ap.add_argument("--octaves", default="-5,3",
                    help="λ searched over the checkpoint's λ times 2^k, k in this range "
                         "(write --octaves=-6,3)")
    ap.add_argument("-R", "--accelerations", default="6")
    ap.add_argument("--mask", default="equispaced")
    ap.add_argument("--acs", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4, help="validation scans per mask")
    ap.add_argument("--maps", choices=("espirit", "reference"), default="espirit",
                    help="espirit: coil maps estimated from each problem's own calibration "
                         "lines, as reconstruction does (default); reference: the maps of the "
                         "fully sampled file (exact, which favours a large λ)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from molrecon.errors import MolreconError

    try:
        return run(args)
    except MolreconError as exc:                    # molrecon's errors name their file
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """The study of ``main``'s arguments; prints the table, writes ``--json``."""
    import torch

    from molrecon.deq.mol import MolStep
    from molrecon.models.checkpoint import load_checkpoint
    from molrecon.physics.noise import effective_acceleration, periphery_sigma
    from molrecon.train import TrainConfig, evaluate, make_problem
    from molrecon.train.data import MaskSpec
    from molrecon.train.validate import spread_samples

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.checkpoint)
    val, idx = spread_samples(args.val_data, args.samples,
                              warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    cfg = TrainConfig(data=str(args.val_data), out="unused.pt", fwd_max_iter=100)
    lam0 = float(loaded.mol_config.lam)
    lo, hi = (int(v) for v in args.octaves.split(","))
    levels = [float(v) for v in args.noise.split(",")]
    records = []
    for level in levels:
        for r in [float(v) for v in args.accelerations.split(",")]:
            for fam in [f for f in args.mask.split(",") if f]:
                spec = MaskSpec(family=fam, acceleration=r, acs=args.acs)
                for j, i in enumerate(idx):
                    rng = np.random.default_rng([args.seed, 5_151_515, int(r * 10), j])
                    p = make_problem(val.samples[int(i)], val.kind, spec, rng, level, "cpu")
                    if args.maps == "espirit":
                        p = with_acs_maps(p)
                    sigma = periphery_sigma(p.kspace, p.op.mask, val.kind)[0]
                    accel = effective_acceleration(p.op.mask, 1)[0]
                    out: dict[str, float] = {}
                    its: dict[str, float] = {}

                    def solve(lam: float) -> float:
                        step = MolStep(loaded.model, replace(loaded.mol_config, lam=lam,
                                                             learn_lam=False))
                        m = evaluate(step, [p], cfg)
                        out["sense"] = float(m["val_sense_psnr"])
                        its[str(lam)] = float(m["val_iterations"])
                        return float(m["val_psnr"]) if m["val_psnr"] is not None else -1e9

                    seen = search(solve, lam0, lo, hi)
                    lams = sorted(seen)
                    best = best_lambda(lams, [seen[v] for v in lams])
                    rec = {"noise": level, "R": r, "mask": fam, "sample": int(i), "sigma": sigma,
                           "accel": accel, "psnr": {str(v): seen[v] for v in lams},
                           "iterations": {str(v): its[str(v)] for v in lams},
                           "best_lambda": best,
                           "best_psnr": max(seen.values()), "psnr_at_lam0": seen[lam0],
                           "sense_psnr": out["sense"]}
                    records.append(rec)
                    print(f"noise {level:g} R {r:g} {fam} #{i}: σ {sigma:.4f}, best λ {best:.3g} "
                          f"({rec['best_psnr']:.2f} dB; λ {lam0:g}: {rec['psnr_at_lam0']:.2f}; "
                          f"CG-SENSE {rec['sense_psnr']:.2f})", flush=True)
    print()
    print(f"| extra noise | σ (estimated) | CG-SENSE | MOL at λ {lam0:g} | MOL at its best λ | "
          "best λ (geometric mean) |")
    print("|---:|---:|---:|---:|---:|---:|")
    summary = []
    usable = [rec for rec in records if rec["sigma"] is not None]   # σ estimated
    for level in levels:
        rs = [rec for rec in usable if rec["noise"] == level]
        if not rs:
            continue
        row = {"noise": level,
               "sigma": float(np.exp(np.mean([math.log(x["sigma"]) for x in rs]))),
               "sense_psnr": float(np.mean([x["sense_psnr"] for x in rs])),
               "psnr_at_lam0": float(np.mean([x["psnr_at_lam0"] for x in rs])),
               "best_psnr": float(np.mean([x["best_psnr"] for x in rs])),
               "best_lambda": float(np.exp(np.mean([math.log(x["best_lambda"]) for x in rs])))}
        summary.append(row)
        print(f"| {level:g} | {row['sigma']:.4f} | {row['sense_psnr']:.2f} | "
              f"{row['psnr_at_lam0']:.2f} | {row['best_psnr']:.2f} | {row['best_lambda']:.3g} |")
    xs = [math.log(x["sigma"]) for x in usable]
    ys = [math.log(x["best_lambda"]) for x in usable]
    fit = None
    if len(set(xs)) >= 2:
        slope, icpt = np.polyfit(xs, ys, 1)
        resid = np.asarray(ys) - (icpt + slope * np.asarray(xs))
        fit = {"exponent": float(-slope), "log_intercept": float(icpt),
               "rms_log_residual": float(np.sqrt(np.mean(resid ** 2)))}
        print(f"\nfit over {len(usable)} problems: λ* = {math.exp(icpt):.4g}·σ^{slope:.3f} "
              f"(rms residual ×{math.exp(fit['rms_log_residual']):.2f}); "
              f"λ*(σ = 0.005) = {math.exp(icpt + slope * math.log(0.005)):.3g}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": str(args.checkpoint),
                                         "val_data": str(args.val_data), "lam0": lam0,
                                         "records": records, "summary": summary, "fit": fit},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
