"""Reconstruct a raw scan from Python: the bundled example, three methods, scored against its truth.

Run: python examples/reconstruct_example.py [RAW.h5]
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import numpy as np

import molrecon
from molrecon.io.nifti import read_nifti


def main() -> None:
    examples = Path(str(resources.files("molrecon") / "data" / "examples"))
    raw = Path(sys.argv[1]) if len(sys.argv) > 1 else examples / "brain_2d_r4.h5"
    scan = molrecon.read_raw(raw)
    print(f"{raw.name}: {scan.kind}, k-space {scan.shape} (B, C, D, Y, X), R = {scan.acceleration:.2f}")

    truth = None
    if len(sys.argv) == 1:
        t, _ = read_nifti(examples / "brain_2d_r4_truth.nii.gz")
        t = np.asarray(t)
        truth = (t[..., None] if t.ndim == 2 else t).transpose(2, 1, 0)[:, None]   # (B, 1, Y, X)

    methods = ["zf", "sense"]
    try:
        from molrecon.weights import bundled_checkpoint

        bundled_checkpoint(scan.kind)
        methods.append("mol")
    except molrecon.MolreconError as exc:
        print(f"(no MOL: {exc})")
    for method in methods:
        result = molrecon.reconstruct(scan, molrecon.ReconConfig(method=method))
        line = f"{method:>6}: {result.report['wall_time_s']:.2f} s"
        if "iterations" in result.report:
            line += f", {result.report['iterations']} iterations, converged {result.report['converged']}"
        if truth is not None:
            m = molrecon.compare(result.image.data, truth)
            line += f", PSNR {m.psnr:.2f} dB, SSIM {m.ssim:.4f}"
        print(line)
        molrecon.write_nifti(result.image, f"example_{method}.nii.gz", force=True)


if __name__ == "__main__":
    main()
