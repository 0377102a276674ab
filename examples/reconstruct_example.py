"""Reconstruct a raw scan from Python: the bundled example, three methods, scored against its truth.

Run: python examples/reconstruct_example.py [RAW] [--out FOLDER] [--force]

Writes FOLDER/example_{zf,sense,mol}.nii.gz (FOLDER: ``example-out``); existing files
there are kept unless ``--force``. Warnings (a geometry default, a convergence cap)
are printed as one line each.
"""

from __future__ import annotations

import argparse
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

import molrecon
from molrecon.io.nifti import read_nifti


def main() -> int:
    ap = argparse.ArgumentParser(description="Reconstruct a raw scan with zf, CG-SENSE and MOL.")
    ap.add_argument("raw", nargs="?", type=Path, help="raw file (default: the bundled example)")
    ap.add_argument("--out", type=Path, default=Path("example-out"), help="output folder")
    ap.add_argument("--force", action="store_true", help="replace existing outputs")
    args = ap.parse_args()

    examples = Path(str(resources.files("molrecon") / "data" / "examples"))
    raw = args.raw or examples / "brain_2d_r4.h5"
    args.out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            run(raw, examples if args.raw is None else None, args.out, args.force)
        except molrecon.MolreconError as exc:
            print(f"error: {exc}")
            return 1
    for w in caught:
        print(f"warning: {w.message}")
    return 0


def run(raw: Path, examples: Path | None, out: Path, force: bool) -> None:
    scan = molrecon.read_raw(raw)
    print(f"{raw.name}: {scan.kind}, k-space {scan.shape} (B, C, D, Y, X), R = {scan.acceleration:.2f}")

    truth = None
    if examples is not None:
        t, _ = read_nifti(examples / "brain_2d_r4_truth.nii.gz")
        t = np.asarray(t)
        truth = (t[..., None] if t.ndim == 2 else t).transpose(2, 1, 0)[:, None]   # (B, 1, Y, X)

    methods = ["zf", "sense"]
    try:
        from molrecon.models.bundled import bundled_checkpoint

        bundled_checkpoint(scan.kind)
        methods.append("mol")
    except molrecon.MolreconError as exc:
        print(f"(no MOL: {exc})")
    for method in methods:
        target = out / f"example_{method}.nii.gz"
        if target.exists() and not force:
            print(f"{method:>6}: {target} exists (pass --force to replace it)")
            continue
        result = molrecon.reconstruct(scan, molrecon.ReconConfig(method=method))
        line = f"{method:>6}: {result.report['wall_time_s']:.2f} s"
        if "iterations" in result.report:
            line += f", {result.report['iterations']} iterations, converged {result.report['converged']}"
        if truth is not None:
            m = molrecon.compare(result.image.data, truth)
            line += f", PSNR {m.psnr:.2f} dB, SSIM {m.ssim:.4f}"
        molrecon.write_nifti(result.image, target, force=force)
        print(f"{line} → {target}")


if __name__ == "__main__":
    raise SystemExit(main())
