"""Noise level of raw files after molrecon's intensity normalisation.

Usage::

    python benchmarks/bench_noise_level.py FILE [FILE ...]

MOL's λ (the weight of the data term) is tuned on simulated data, and a real scan's
signal-to-noise ratio after the normalisation (``molrecon.physics.scaling``: the
99th percentile of the zero-filled image is brought to 1) can lie far outside the
training's range. This prints, per file, the scale and the noise level σ that reconstruction estimates
(:func:`molrecon.physics.noise.periphery_sigma`: the median absolute deviation ÷ 0.6745
of the real and imaginary parts of the normalised k-space over its acquired, non-zero
samples in the outer sixteenth of the two largest spatial axes), the median over the
file's slices (series, volumes).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch

from molrecon.errors import MolreconError
from molrecon.io.detect import read_raw
from molrecon.physics.noise import periphery_sigma
from molrecon.physics.scaling import scale_factor


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    rows = []
    for path in args.files:        # every file first: a bad one leaves no partial table
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scan = read_raw(path)
            k = torch.from_numpy(scan.kspace)
            s = scale_factor(k, torch.from_numpy(scan.mask), scan.kind)
            kn = k / s.reshape(-1, 1, 1, 1, 1)
            sigmas = periphery_sigma(kn, torch.from_numpy(np.asarray(scan.mask)), scan.kind)
            if any(v is None for v in sigmas):
                raise ValueError("too few acquired, non-zero k-space samples in the periphery")
        except (MolreconError, ValueError, OSError) as exc:
            msg = str(exc)            # molrecon's own errors already name the file
            print(f"error: {msg if path in msg else f'{path}: {msg}'}", file=sys.stderr)
            return 1
        rows.append(f"| {path} | {tuple(kn.shape)} | {float(s.median()):.3g} | "
                    f"{float(np.median(sigmas)):.4f} |")
    print("| file | k-space shape (B, C, D, Y, X) | scale (median over items) | "
          "σ after normalisation (median over items) |")
    print("|---|---|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
