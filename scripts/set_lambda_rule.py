"""Give a checkpoint the rule that sets λ from each scan's noise level, as measured.

    python benchmarks/bench_lambda_noise.py CKPT --val-data runs/data2d_val --json study.json
    python scripts/set_lambda_rule.py CKPT --study study.json [--study more.json] --out OUT.pt \
        [--max-factor 1] [--card CARD.md]

The study (``benchmarks/bench_lambda_noise.py``) found the best λ of many validation
problems at several noise levels and accelerations; this fits λ* = e^a·σ^(−p)·R^q over
them (q only when the studies cover two accelerations or more) and writes the checkpoint
again (weights, λ₀, certificate, metadata and kinds unchanged) with the rule
λ(σ, R) = λ₀·clip((σ₀/σ)^p·(R/R₀)^q, f_min, f_max), R held within the accelerations
studied (:class:`molrecon.physics.noise.NoiseLambdaRule`):
p from the fit (redone over the problems of every study given), σ₀ where the fit gives
the checkpoint's own λ₀, and the factors clipped to the range of best λ the studies found
(the rule is not extrapolated) and at most ``--max-factor`` (default 1: the rule only
lowers λ, for scans noisier than the model's tuning data; raising it for cleaner ones
lost up to 1.2 dB at R = 4 on the quality benchmark, see BENCHMARKS.md). ``--card`` appends
(or replaces) the section "λ from the noise level" of a model card with the study's table.
``--check-only`` prints the rule and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

SECTION = "## λ from the noise level"


def pool(studies: list[dict]) -> dict:
    """One study of the records of one or several studies (e.g. one per acceleration): the
    fit log λ* = a + b·log σ redone over all their problems by least squares, and the
    summary per (noise level, acceleration)."""
    import numpy as np

    records = [r for st in studies for r in st["records"] if r.get("sigma") is not None]
    xs = np.log([float(r["sigma"]) for r in records])
    ys = np.log([float(r["best_lambda"]) for r in records])
    with_r = all("accel" in r for r in records)
    rs = np.log([float(r["accel"]) for r in records]) if with_r else np.zeros_like(xs)
    fit = None
    if len(set(xs.tolist())) >= 2:
        use_r = with_r and len(set(np.round(rs, 6).tolist())) >= 2
        cols = [np.ones_like(xs), xs] + ([rs] if use_r else [])
        coef, *_ = np.linalg.lstsq(np.stack(cols, axis=1), ys, rcond=None)
        resid = ys - np.stack(cols, axis=1) @ coef
        fit = {"exponent": float(-coef[1]), "log_intercept": float(coef[0]),
               "accel_exponent": float(coef[2]) if use_r else 0.0,
               "accel_ref": float(np.exp(rs.mean())) if use_r else 1.0,
               "rms_log_residual": float(np.sqrt(np.mean(resid ** 2)))}
    summary = []
    for key in sorted({(float(r["noise"]), float(r["R"])) for r in records}):
        rs = [r for r in records if (float(r["noise"]), float(r["R"])) == key]
        summary.append({
            "noise": key[0], "R": key[1], "problems": len(rs),
            "sigma": float(np.exp(np.mean([math.log(r["sigma"]) for r in rs]))),
            "accel": (float(np.exp(np.mean([math.log(r["accel"]) for r in rs])))
                      if all("accel" in r for r in rs) else None),
            "sense_psnr": float(np.mean([r["sense_psnr"] for r in rs])),
            "psnr_at_lam0": float(np.mean([r["psnr_at_lam0"] for r in rs])),
            "best_psnr": float(np.mean([r["best_psnr"] for r in rs])),
            "best_lambda": float(np.exp(np.mean([math.log(r["best_lambda"]) for r in rs])))})
    return {"val_data": studies[0]["val_data"], "records": records, "summary": summary,
            "fit": fit}


def rule_from_study(study: dict, lam0: float,  # type: ignore[no-untyped-def]
                    max_factor: float = 1.0):
    """The :class:`NoiseLambdaRule` of a ``bench_lambda_noise.py`` study (or :func:`pool` of
    several) for a model whose own λ is ``lam0``; the factor is capped at ``max_factor``
    and at the largest best λ the study found, and held at its smallest."""
    from molrecon.physics.noise import NoiseLambdaRule

    fit = study.get("fit")
    if not fit:
        raise ValueError("the study has no fit (it needs problems at two noise levels or more)")
    p = float(fit["exponent"])
    if not p > 0:
        raise ValueError(f"the fitted exponent is {p:.3g}: the best λ does not fall with σ")
    q = float(fit.get("accel_exponent", 0.0))
    r_ref = float(fit.get("accel_ref", 1.0))
    # λ₀ = e^a·σ₀^(−p)·R₀^q: σ₀ is where the fit gives λ₀ at the studies' typical R₀
    sigma_ref = (math.exp(float(fit["log_intercept"])) * r_ref ** q / lam0) ** (1.0 / p)
    best = [float(r["best_lambda"]) for r in study["records"]]
    lo, hi = min(best) / lam0, min(max(best) / lam0, max_factor)
    keys = ("noise", "R", "problems", "sigma", "accel", "sense_psnr", "psnr_at_lam0",
            "best_psnr", "best_lambda")
    summary = [{k: row[k] for k in keys if k in row} for row in study["summary"]]
    measured = {"by": "benchmarks/bench_lambda_noise.py", "val_data": Path(study["val_data"]).name,
                "problems": len(study["records"]), "lam0": lam0, "fit": fit,
                "summary": summary}
    accels = [float(r["accel"]) for r in study["records"] if "accel" in r]
    span = (min(accels), max(accels)) if q and accels else (1.0, math.inf)
    return NoiseLambdaRule(sigma_ref=sigma_ref, exponent=p, min_factor=min(lo, 1.0),
                           max_factor=max(hi, 1.0), measured=measured, accel_ref=r_ref,
                           accel_exponent=q, accel_min=span[0], accel_max=span[1])


def card_section(rule, lam0: float) -> str:  # type: ignore[no-untyped-def]
    """The model card's section on the rule: what it is, and the study's table."""
    m = rule.measured or {}
    def row(r: dict) -> str:
        accel = f" ({r['accel']:.2f})" if r.get("accel") else ""
        lam = lam0 * rule.factor(r["sigma"], r.get("accel"))
        return (f"| {r['R']:g}{accel} | {r['noise']:g} | {r['sigma']:.4f} | {r['sense_psnr']:.2f} "
                f"| {r['psnr_at_lam0']:.2f} | {r['best_psnr']:.2f} | {r['best_lambda']:.3g} "
                f"| {lam:.3g} |")
    rows = "\n".join(row(r) for r in m.get("summary", []))
    r_range = (f" (R held in [{rule.accel_min:.3g}, {rule.accel_max:.3g}])"
               if rule.accel_exponent else " (no acceleration term)")
    return f"""{SECTION}

`molrecon reconstruct` sets λ per slice (series, volume) from the noise level σ of its
normalised k-space and its effective acceleration R (phase-encoding positions over those
acquired) (`--lam auto`, the default; `--lam fixed` keeps λ = {lam0:.4g}):
λ(σ, R) = {lam0:.4g} · clip((σ₀/σ)^p · (R/R₀)^q, {rule.min_factor:.3g}, {rule.max_factor:.3g})
with σ₀ = {rule.sigma_ref:.4g}, p = {rule.exponent:.3f}, R₀ = {rule.accel_ref:.3g} and
q = {rule.accel_exponent:.3f}{r_range}, fitted by `{m.get('by', '?')}` on
{m.get('problems', '?')} problems from `{m.get('val_data', '?')}` (noise added to the fully
sampled k-space before undersampling; PSNR against the file's fully sampled image; σ
and R as reconstruction estimates them). Mean PSNR (dB) per acceleration and noise level:

| R (effective) | extra noise | σ | CG-SENSE | MOL at λ {lam0:.4g} | MOL at each problem's best λ \
| best λ (geometric mean) | the rule's λ |
|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--study", type=Path, action="append", required=True,
                    help="a bench_lambda_noise.py JSON (repeat to pool several)")
    ap.add_argument("--max-factor", type=float, default=1.0,
                    help="cap of λ/λ₀ (default 1: λ is only lowered, for scans noisier than "
                         "the model's tuning data)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--card", type=Path, help="model card whose λ section to write")
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args(argv)

    from molrecon.errors import MolreconError
    from molrecon.models.checkpoint import load_checkpoint, save_checkpoint

    try:
        loaded = load_checkpoint(args.checkpoint)
    except MolreconError as exc:                       # names the file already
        print(f"error: {exc}", file=sys.stderr)
        return 1
    studies = []
    for path in args.study:
        try:
            studies.append(json.loads(path.read_text()))
            rule_from_study(pool(studies[-1:]), float(loaded.mol_config.lam))  # each is usable
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            return 1
    study = pool(studies)
    if not args.max_factor >= 1.0:
        print("error: --max-factor must be at least 1", file=sys.stderr)
        return 2
    rule = rule_from_study(study, float(loaded.mol_config.lam), args.max_factor)
    lam0 = float(loaded.mol_config.lam)
    print(f"λ(σ, R) = {lam0:.4g}·clip(({rule.sigma_ref:.4g}/σ)^{rule.exponent:.3f}"
          f"·(R/{rule.accel_ref:.3g})^{rule.accel_exponent:.3f}, R in "
          f"[{rule.accel_min:.3g}, {rule.accel_max:.3g}], "
          f"{rule.min_factor:.3g}, {rule.max_factor:.3g})")
    for s in (0.003, 0.005, 0.01, 0.017, 0.03, 0.05, 0.08):
        print(f"  σ {s:<6g} → λ " + ", ".join(
            f"{lam0 * rule.factor(s, r):.3g} (R {r:g})" for r in (2, 4, 6, 8)))
    if args.check_only:
        return 0
    if args.out is None:
        print("error: --out is needed (or --check-only)", file=sys.stderr)
        return 2
    from molrecon.atomic import atomic_path

    card_text = None
    try:
        if args.card is not None:                 # read and edited before anything is written
            text = args.card.read_text() if args.card.exists() else ""
            section = card_section(rule, lam0)
            pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
            text = (pattern.sub(lambda _m: section.rstrip("\n"), text) if pattern.search(text)
                    else text.rstrip("\n") + "\n\n" + section)
            card_text = text.rstrip("\n") + "\n"
        save_checkpoint(args.out, loaded.model, loaded.mol_config, metadata=loaded.metadata,
                        certificate=loaded.certificate, kinds=loaded.kinds, lam_noise=rule,
                        force=True)
        print(f"wrote {args.out}")
        if card_text is not None:
            with atomic_path(args.card, force=True) as tmp:
                Path(tmp).write_text(card_text)
            print(f"wrote the λ section of {args.card}")
    except (MolreconError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
