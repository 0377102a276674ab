"""Copy a trained checkpoint into the package as a bundled model, with its model card.

    python scripts/bundle_weights.py runs/w2d_lr/mol_2d_lr.pt --name mol_2d_lr \
        --kinds 2d,2dt --default-for 2d,2dt --command "molrecon train ..."

The checkpoint is re-saved (same weights, λ, α, metadata) with the data kinds it
serves and a certificate measured at the fixed points of the bundled example
scan and of held-out validation files; the model card (``NAME.md``) records
training data, masks, steps, validation metrics, the certificate and sha256;
``manifest.json`` maps data kinds to their default model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import learning_curve

from molrecon.errors import ConfigError
from molrecon.guarantees import (
    CheckConfig,
    check_lipschitz,
    example_scan,
    load_problems,
)
from molrecon.models.bundled import weights_dir
from molrecon.models.checkpoint import load_checkpoint, save_checkpoint, sha256, with_kinds
from molrecon.sim import simulated_example

DATA_TEXT = {
    "2d": "fully sampled 2D slices, 4–16 coils, noise 0.005–0.02, 192² and 256² matrices",
    "3d": ("fully sampled 3D slabs of 128 × 128 × 16 voxels (1.875 × 1.875 × 1.25 mm), 6–12 "
           "coils, noise 0.005–0.01"),
    "2dt": ("fully sampled 2D+time series, 128², 12 frames with smooth periodic motion, 6–12 "
            "coils, noise 0.005–0.02"),
}

#: What a verdict means, after its name on the card.
VERDICT_TEXT = {
    "empirical": " (no global certificate; every local Lipschitz estimate at the data is below 1)",
    "monotone": (" (a local Lipschitz estimate at the data is at least 1, so the plain α = 1 step "
                 "is not a contraction there, but the top of H's numerical range, μ, is below 1 "
                 "at every point: F = I − H is monotone there, which is what the fixed point's "
                 "uniqueness and the robustness bounds rest on; the solver converges by Anderson "
                 "acceleration, its residual measured)"),
}

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--kinds", default="2d")
    ap.add_argument("--default-for", default="")
    ap.add_argument("--command", default="", help="the training command, for the model card")
    ap.add_argument("--log", action="append", default=[],
                    help="training log (.log.jsonl) of a stage, as LABEL=PATH[@STEP], in training "
                         "order (repeat for a staged campaign; see learning_curve.py): the card's "
                         "learning curve and its PNG")
    ap.add_argument("--out-dir", type=Path, help="where to write (default: the package's weights folder)")
    ap.add_argument("--val-data", type=Path,
                    help="folder of validation scans: the certificate's local estimates are "
                         "measured again at the MOL fixed points of its first --val-files files "
                         "with these very weights (the training run's were measured on the "
                         "weights as they were then, e.g. before an output scaling)")
    ap.add_argument("--val-files", type=int, default=4)
    ap.add_argument("--power-iters", type=int, default=300,
                    help="power iterations per point (below the default: exactly this many, "
                         "no tolerance; a 2D+time series costs seconds per iteration)")
    ap.add_argument("--lanczos-steps", type=int, default=30)
    ap.add_argument("--alpha", type=float,
                    help="the MOL step size α to bundle with the model, in (0, 1] (default: "
                         "the checkpoint's): the fixed point does not depend on it, the "
                         "iteration count does; a prior whose Jacobian norm at the data is "
                         "well above 1 converges in fewer Anderson iterations at α < 1")
    ap.add_argument("--data-note", default="",
                    help="a sentence added to the card's training-data paragraph")
    args = ap.parse_args()
    check = CheckConfig(power_iters=args.power_iters, lanczos_steps=args.lanczos_steps,
                        power_tol=1e-4 if args.power_iters >= 300 else None)

    kinds = [k for k in args.kinds.split(",") if k]
    # Measured on the data the model is bundled for (--kinds), which may differ from the
    # kinds its training declared (a 3×3×3 network trained on 2D+time series serving volumes);
    # kinds its network cannot serve are refused before any measurement.
    try:
        loaded = with_kinds(load_checkpoint(args.checkpoint), kinds)
    except ConfigError as exc:
        sys.exit(f"error: {args.checkpoint}: {exc}")
    if args.alpha is not None:
        if not 0.0 < args.alpha <= 1.0:
            sys.exit(f"error: --alpha must lie in (0, 1], got {args.alpha}")
        loaded = replace(loaded, mol_config=replace(loaded.mol_config, alpha=args.alpha))
    with tempfile.TemporaryDirectory() as tmp:
        if "2d" in kinds:
            scan, where = example_scan(), f"the bundled example ({example_scan().name})"
        else:
            scan = simulated_example(kinds[0], tmp)
            where = f"a {kinds[0]} scan simulated from the validation slab (R = 4, 8 coils)"
        problems = load_problems([scan], kinds=kinds, points=1)
        report = check_lipschitz(loaded, problems, check)
    rep = report.as_dict()
    cert = dict(loaded.certificate)
    if args.val_data is not None:
        files = sorted(args.val_data.glob("*.h5"))[: args.val_files]
        val_problems = load_problems(files, kinds=kinds, points=1)
        val = check_lipschitz(loaded, val_problems, check).as_dict()
        cert.update({"data": [f.name for f in files],
                     "local_power": val["local"]["power"]["values"],
                     "local_ratio": val["local"]["ratio"]["values"],
                     "local_power_iterations": [p["power_iterations"]
                                                for p in val["local"]["points"]],
                     "local_lanczos": [p.get("lanczos") for p in val["local"]["points"]],
                     "local_monotone": [p.get("monotone") for p in val["local"]["points"]],
                     "local_monotone_max": val["local"].get("monotone_max"),
                     "local_max": val["local"]["max"], "points": len(files),
                     "verdict": val["verdict"], "measured_by": "scripts/bundle_weights.py"})
    cert["at_bundled_example"] = {"data": where, "verdict": rep["verdict"],
                                  "local": rep["local"], "margin_local": rep["margin_local"]}
    out_dir = args.out_dir or weights_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{args.name}.pt"
    save_checkpoint(target, loaded.model, loaded.mol_config, metadata=loaded.metadata,
                    certificate=cert, kinds=kinds, lam_noise=loaded.lam_noise, force=True)
    digest = sha256(target)

    man_path = out_dir / "manifest.json"
    man = json.loads(man_path.read_text()) if man_path.exists() else {"defaults": {}, "models": {}}
    meta = loaded.metadata
    man["models"][args.name] = {"file": target.name, "kind": kinds[0], "kinds": kinds,
                                "constraint": loaded.constraint, "sha256": digest}
    for kind in [k for k in args.default_for.split(",") if k]:
        man["defaults"][kind] = args.name
    man_path.write_text(json.dumps(man, indent=2) + "\n")

    curve = ""
    stages = [st for st in map(learning_curve.parse_stage, args.log) if st[1].exists()]
    if stages:
        rows = learning_curve.campaign(stages)
        if rows:
            png = out_dir / f"{args.name}_curve.png"
            learning_curve.draw(rows, png, f"{args.name}: validation during training")
            curve = (f"![learning curve]({png.name})\n\n"
                     f"Core-hours (wall-clock × torch threads) on the path to this model's last "
                     f"stage: {rows[-1]['core_hours']:.2f}; spent by the {len(stages)} stage(s) in "
                     f"all, branches included: {learning_curve.spent_core_hours(stages):.2f}."
                     "\n\n" + learning_curve.markdown(rows))
    cfg = meta.get("config", {})
    kind = str(meta.get("kind", "2d"))
    served_note = (" (2D+time frame by frame, 3D partition by partition, with a 2D model)"
                   if loaded.model.config.dims == 2 and set(kinds) - {"2d"} else "")
    init_note = ""
    if cfg.get("init_weights"):
        init = Path(cfg["init_weights"])
        inflated = (loaded.model.config.dims == 3 and init.is_file()
                    and load_checkpoint(init).model.config.dims == 2)
        init_note = (f"\nStarted from the weights of `{init.name}`"
                     + (" (2D kernels placed on the centre plane of 3D kernels, so training began "
                        "from exactly the 2D prior applied plane by plane)" if inflated else "")
                     + ".\n")
    cb, loc = rep["certified"], rep["local"]
    val_line = ""
    if cert.get("local_max") is not None:
        val_line = (f"* local estimates at the fixed points of {cert.get('points')} validation "
                    f"files ({', '.join(cert.get('data', []))}): max {cert['local_max']:.4f} "
                    f"(the largest of the converged power iteration, Lanczos and the ratio "
                    f"search)" + (f"; μ, the top of ½(J + Jᵀ), max {cert['local_monotone_max']:.4f}"
                                  if cert.get("local_monotone_max") is not None else "")
                    + f"; verdict there: **{cert.get('verdict')}**\n")
    tuning = meta.get("lambda_tuning")
    lam_text = (f"λ = {loaded.mol_config.lam:.4g} (chosen on validation problems by "
                f"`scripts/tune_lambda.py`"
                + (f", prior's output × {tuning['output_scale']:g}"
                   if tuning.get("output_scale", 1.0) != 1.0 else "") + ")"
                if isinstance(tuning, dict) else f"trained λ = {loaded.mol_config.lam:.4g}")
    skip = loaded.model.config.skip
    lanczos_text = (f", Lanczos {loc['lanczos']['max']:.4f}" if loc.get("lanczos") else "")
    if loc.get("monotone_max") is not None:
        lanczos_text += (f"; μ, the top of ½(J + Jᵀ) (F = I − H is monotone where it is below 1): "
                         f"{loc['monotone_max']:.4f}")
    skip_text = (f" around an identity path of gain {skip:.4g} (H(x) = {skip:.4g}·x + N(x): the "
                 "network learns the correction)" if skip else "")
    bound_text = (f"the identity path's gain {skip:.4g} + the product of the per-layer spectral "
                  "bounds" if skip else "product of the per-layer spectral bounds")
    ens = loaded.model.config.ensemble
    ens_text = ("" if ens == 1 else
                f"\nAveraged over {ens} flips of the image ("
                + ("left-right" if ens == 2 else "left-right, up-down and both")
                + f": {ens} network passes per step; `reconstruct --ensemble 1` for one).")
    card = f"""# {args.name}

MOL prior ({'MOL-SN, certified' if loaded.constraint == 'sn' else 'MOL-LR, Lipschitz penalty'}),
{loaded.model.config.layers} conv layers × {loaded.model.config.channels} channels{skip_text},
{'×'.join([str(loaded.model.config.kernel)] * loaded.model.config.dims)} kernels, {loaded.model.config.dims}D.{ens_text}
Serves data kinds: {', '.join(kinds)}{served_note}.

* sha256: `{digest}`
* α = {loaded.mol_config.alpha:g}, {lam_text}, CG iterations per step = {loaded.mol_config.cg_iters}
* trained: {meta.get('steps')} steps (of its last stage; see Command) on {meta.get('train_samples')} {'slices' if kind == '2d' else 'volumes' if kind == '3d' else 'series'} ({len(meta.get('train_files', []))} files), {meta.get('date')}
* validation: {meta.get('val_samples')} {'slices' if kind == '2d' else 'volumes' if kind == '3d' else 'series'} from {len(meta.get('val_files', []))} held-out files
* masks: {meta.get('mask')}
* loss: {cfg.get('loss')}, Adam lr {cfg.get('lr')}, λ init {cfg.get('lam_init')}, seed {cfg.get('seed')}

## Training data

Simulated raw data (`scripts/make_training_data.py --kind {kind}`): {DATA_TEXT.get(kind, kind)},
from the *train* split of `molrecon.sim.anatomy` (Colin 27 axial slabs 0–0.50 and
0.88–1.00 of the head, and the MNI152 2009a template); birdcage-like coils,
correlated coil noise with noise scans, readout oversampling, simulated on a 2×
finer grid.
Validation: files of the *val* split (slab 0.54–0.66), kept in their own folder
(`--val-data`). The test slab (0.70–0.84) and the bundled example scan were never used.
{args.data_note}
{init_note}
Command:

```
{args.command}
```

## Lipschitz certificate (`molrecon check-lipschitz`)

* verdict: **{rep.get('verdict')}**{VERDICT_TEXT.get(str(rep.get('verdict')), '')}
* certified global bound ({bound_text}; holds for every image size): {cb['bound']:.4g} — {'below 1: certified contraction' if cb.get('certified') else 'not below 1: no certificate (the LR penalty acts at training points only)'}
* per-layer bounds: {', '.join(f'{v:.4g}' for v in cb['layer_bounds'])}
* local estimates: {check.power_iters} power iterations{' (or to a 1e-4 rise over 10)' if check.power_tol else ''}, {check.lanczos_steps} Lanczos steps and {check.ratio_steps} steps of the ratio search per point
* local Lipschitz estimates at the fixed point of {where}: power iteration {loc['power']['max']:.4f}, secant ratio {loc['ratio']['max']:.4f}{lanczos_text}
{val_line}
```json
{json.dumps(rep, indent=1, default=str)[:3000]}
```

## Validation during training

{curve}
"""
    (out_dir / f"{args.name}.md").write_text(card)
    print(f"bundled {target} ({digest[:12]}), verdict {rep.get('verdict')}")


if __name__ == "__main__":
    main()
