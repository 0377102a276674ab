"""Write the simulated raw-data folders the bundled MOL weights are trained on.

Every file is fully sampled (R = 1; training undersamples retrospectively) and
drawn from the anatomy of one split only (see ``molrecon.sim.anatomy``): train and
val never share a slab or subject. Within a folder the coil count, noise level
and matrix vary, so the model does not learn one coil array or one SNR.

    python scripts/make_training_data.py --kind 2d --out runs/data2d
    python scripts/make_training_data.py --kind 2dt --out runs/data2dt
    python scripts/make_training_data.py --kind 3d --out runs/data3d
    python scripts/make_training_data.py --kind 2dt --anatomy torso --out runs/data2dt_torso
    python scripts/make_training_data.py --kind 2d --out runs/data2d_clean --train 0 --val 8 \
        --noise-scale 0.05      (nearly noise-free validation references: runs/data2d_clean_val)

``--anatomy torso`` makes cardiac-like cine series instead of brain ones: short-axis
slices of the procedural chest (``molrecon.sim.torso``) over 320 × 256 mm at 2 mm,
the left ventricle contracting by 30-50 % of its radius once over the frames, with a
breathing drift of up to 8 mm.

Validation files go to a folder of their own (default: OUT_val), to be given to
``molrecon train --val-data`` so that no validation slab is ever trained on.
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import replace
from pathlib import Path

from molrecon.sim import SimulationConfig, simulate_dataset

VARIANTS = {
    # (coils, noise, matrix) cycled over the groups of each folder
    "2d": list(itertools.product((4, 8, 12, 16), (0.005, 0.01, 0.02), ((192, 192), (256, 256)))),
    "2dt": list(itertools.product((6, 8, 12), (0.005, 0.01, 0.02), ((128, 128),))),
    # 3D slabs are thin (16 × 1.25 mm) so that the validation slab of Colin 27 can hold one.
    "3d": list(itertools.product((6, 8, 12), (0.005, 0.01), ((128, 128, 16),))),
}
#: Cine series of the torso (2dt): (coils, noise, contraction, breathing drift in mm).
_TORSO_ALL = list(itertools.product((8, 12, 16), (0.005, 0.01, 0.02), (0.3, 0.4, 0.5), (2.0, 8.0)))
#: ... taken with a stride of 7 (coprime to 54), so that a folder of fewer files than
#: variants still spans every coil count, noise level, contraction and drift.
TORSO_VARIANTS = [_TORSO_ALL[7 * j % len(_TORSO_ALL)] for j in range(len(_TORSO_ALL))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=sorted(VARIANTS), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--train", type=int, default=48, help="training files")
    ap.add_argument("--val", type=int, default=8, help="validation files")
    ap.add_argument("--val-out", type=Path, help="folder of the validation files (default: OUT_val)")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--noise-scale", type=float, default=1.0,
                    help="multiply every variant's noise by this (e.g. 0.05: nearly noise-free "
                         "references, to which benchmarks/bench_lambda_noise.py adds known noise)")
    ap.add_argument("--anatomy", choices=("brain", "torso"), default="brain",
                    help="torso: cardiac-like cine series (2dt only)")
    args = ap.parse_args()
    if args.anatomy == "torso" and args.kind != "2dt":
        ap.error("--anatomy torso makes 2dt series only")
    if not args.noise_scale >= 0:
        ap.error("--noise-scale must be >= 0")
    folders = {"train": args.out, "val": args.val_out or args.out.with_name(args.out.name + "_val")}
    variants = VARIANTS[args.kind] if args.anatomy == "brain" else TORSO_VARIANTS
    for split, count in (("train", args.train), ("val", args.val)):
        per_group = max(1, -(-count // len(variants)))
        written = 0
        folder = folders[split]
        if count:
            folder.mkdir(parents=True, exist_ok=True)
        for g, variant in enumerate(variants):
            if written >= count:
                break
            n = min(per_group, count - written)
            if args.anatomy == "torso":
                coils, noise, contraction, drift = variant
                noise *= args.noise_scale
                base = SimulationConfig(kind="2dt", anatomy="torso", coils=coils, noise=noise,
                                        matrix=(160, 128), fov_mm=(320.0, 256.0), frames=12,
                                        contraction=contraction, motion_mm=drift,
                                        acceleration=1.0, seed=args.seed + 1000 * g)
                matrix = base.matrix
            else:
                coils, noise, matrix = variant
                noise *= args.noise_scale
                base = SimulationConfig(kind=args.kind, coils=coils, noise=noise, matrix=matrix,
                                        acceleration=1.0, seed=args.seed + 1000 * g)
            if args.kind == "2dt":
                base = replace(base, frames=12)
            if args.kind == "3d":
                base = replace(base, fov_mm=(240.0, 240.0, 20.0))
            tmp = folder / f".group{g}_{split}"
            result = simulate_dataset(base, tmp, count=n, split=split, force=True)
            for path in sorted(tmp.glob(f"{split}_*.h5")):
                os.replace(path, folder / f"{split}_g{g:02d}_{path.name}")
            for extra in tmp.iterdir():
                extra.unlink()
            tmp.rmdir()
            written += n
            print(f"{split}: group {g} coils={coils} noise={noise} matrix={matrix}: {n} files", flush=True)
            del result


if __name__ == "__main__":
    main()
