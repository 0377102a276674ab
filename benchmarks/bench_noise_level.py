"""Noise level of raw files after molrecon's intensity normalisation.

Usage::

    python benchmarks/bench_noise_level.py FILE [FILE ...]

MOL's λ (the weight of the data term) is tuned on simulated data, and a real scan's
signal-to-noise ratio after the normalisation (``molrecon.physics.scaling``: the
99th percentile of the zero-filled image is brought to 1) can lie far outside the
training's range. This prints, per file, the scale and a robust noise estimate: the median
absolute deviation (÷ 0.6745) of the real and imaginary parts of the normalised k-space
over its *sampled* points in the outer sixteenth of the two largest spatial axes (where
the signal of an image has fallen to the noise). The periphery still holds some
signal, so the value is an upper bound of σ, comparable between files of similar matrix.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np
import torch

from molrecon.errors import MolreconError
from molrecon.io.detect import read_raw
from molrecon.physics.scaling import scale_factor


def periphery_sigma(kn: np.ndarray, mask: np.ndarray) -> float:
    """MAD noise estimate of normalised k-space ``kn`` (B, C, D, Y, X) over the sampled
    points of the outer sixteenth of its two largest spatial axes."""
    spatial = (2, 3, 4)
    a, b = sorted(sorted(spatial, key=lambda ax: kn.shape[ax])[-2:])
    sel = np.zeros(kn.shape, dtype=bool)
    for ax in (a, b):
        n = kn.shape[ax]
        e = max(1, n // 16)
        idx = np.r_[0:e, n - e:n]
        view = np.moveaxis(sel, ax, 0)
        view[idx] = True
    sel &= np.broadcast_to(mask, kn.shape)
    v = kn[sel]
    if v.size == 0:
        raise ValueError("no sampled k-space points in the periphery")
    parts = np.concatenate([v.real, v.imag])
    return float(np.median(np.abs(parts - np.median(parts))) / 0.6745)


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
            kn = (k / s.reshape(-1, 1, 1, 1, 1)).numpy()
            sigma = periphery_sigma(kn, np.asarray(scan.mask, dtype=bool))
        except (MolreconError, ValueError, OSError) as exc:
            msg = str(exc)            # molrecon's own errors already name the file
            print(f"error: {msg if path in msg else f'{path}: {msg}'}", file=sys.stderr)
            return 1
        rows.append(f"| {path} | {tuple(kn.shape)} | {float(s[0]):.3g} | {sigma:.4f} |")
    print("| file | k-space shape (B, C, D, Y, X) | scale | σ after normalisation |")
    print("|---|---|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
