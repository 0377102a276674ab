"""Coil compression: many receive channels → a few virtual coils, before maps and reconstruction.

A 32- or 64-channel head coil makes every SENSE and MOL operation proportionally
slower, while the signal lives in far fewer dimensions: the channels see
overlapping, smooth sensitivities. Compression replaces the C channels by N < C
orthonormal combinations of them (virtual coils), chosen from the calibration
data so that they keep as much of its energy as possible.

Two flavours, both linear in the coil axis and unitary on the kept subspace:

* ``scc`` (single coil compression): one C×N matrix U per slice, the N leading
  eigenvectors of the calibration data's coil covariance Σ = Kᴴ K (K: samples ×
  coils). Every sample is replaced by ``Uᴴ k``.
* ``gcc`` (geometric coil compression, after Zhang et al., MRM 2013): the readout
  is fully sampled, so after an inverse FFT along it every readout position x is
  a separate problem with its own coil covariance and its own matrix U(x); the
  matrices are then rotated, position by position from the centre outwards, to
  agree with their neighbour (the orthogonal Procrustes rotation of the kept
  subspace), so that virtual coil n stays smooth along x as ESPIRiT needs. It
  keeps more of each position's energy for the same N (where a 2D scan's
  calibration lines give a position too few samples, neighbouring positions pool
  their covariance). Measured on 16- and 32-coil brain scans
  (``benchmarks/bench_compression.py``, BENCHMARKS.md) it loses less PSNR than
  ``scc`` at the same N for a few tenths of a second more, so ``auto`` uses it.

Why it is safe for molrecon's pipeline: the data were prewhitened by the reader
(white coil noise of unit variance), and a matrix with orthonormal columns keeps
white noise white, so the CG-SENSE and MOL problems on the virtual coils are the
same problems with the discarded (mostly noise) directions left out. Coil maps,
estimated afterwards by ESPIRiT from the compressed data, describe the virtual
coils; maps supplied by the user are compressed with the same matrices
(:func:`compress_maps`). The learned prior acts on the coil-combined image, so a
MOL model trained on fewer coils applies unchanged.

``retained`` reports, per slice, the fraction of the calibration energy the
kept directions hold (for ``gcc``, the mean over readout positions); ``auto``
keeps the fewest virtual coils whose retained energy reaches
:data:`AUTO_ENERGY` in every slice, never fewer than :data:`AUTO_MIN_COILS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, InputDataError
from ..io.types import RawScan

__all__ = ["AUTO_ENERGY", "AUTO_MIN_COILS", "Compression", "compress_maps", "compress_scan",
           "plan_compression"]

CompressionMethod = Literal["scc", "gcc"]

#: ``auto`` keeps the fewest virtual coils holding this fraction of the calibration energy.
AUTO_ENERGY = 0.995
#: ... and never fewer than this many (or all coils, if the scan has fewer).
AUTO_MIN_COILS = 8
#: gcc pools the covariance of neighbouring readout positions until a window holds at
#: least this many samples per coil (a 2D scan has only its calibration lines per position).
_GCC_SAMPLES_PER_COIL = 4


@dataclass(frozen=True)
class Compression:
    """Compression matrices of one scan.

    ``matrices``: ``scc`` → ``(B, C, N)``; ``gcc`` → ``(B, X, C, N)``; orthonormal
    columns. ``retained``: per slice, the calibration energy fraction kept.
    """

    method: CompressionMethod
    n_in: int
    n_out: int
    matrices: np.ndarray
    retained: np.ndarray

    def report(self) -> dict[str, Any]:
        return {"method": self.method, "coils_in": self.n_in, "coils_out": self.n_out,
                "retained_energy": [round(float(r), 6) for r in self.retained]}


# ------------------------------------------------------------------------ helpers
def _ifft_readout(k: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse FFT along the last axis (readout)."""
    return np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), axis=-1, norm="ortho"),
                           axes=-1)


def _fft_readout(h: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.fft(np.fft.ifftshift(h, axes=-1), axis=-1, norm="ortho"),
                           axes=-1)


def _leading(cov: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` leading eigenvectors (C, n) of a Hermitian matrix and all eigenvalues, descending."""
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1]
    vals = np.clip(vals[order], 0.0, None)
    return vecs[:, order[:n]], vals


def _calibration_lines(scan: RawScan, b: int) -> np.ndarray:
    """Boolean (D, Y) of the lines that calibrate slice ``b``: flagged calibration lines
    that were acquired, or every acquired line when none is flagged."""
    acquired = scan.mask[b, 0, :, :, 0]
    flagged = scan.calib[b, 0, :, :, 0] & acquired
    return flagged if flagged.any() else acquired


def _choose_n(energies: list[np.ndarray], coils: int | str, n_in: int) -> int:
    """Number of virtual coils: an explicit count, or ``auto`` from the eigenvalue spectra."""
    if coils != "auto":
        return int(coils)
    need = 1
    for vals in energies:
        total = float(vals.sum())
        if total <= 0:
            continue
        frac = np.cumsum(vals) / total
        need = max(need, int(np.searchsorted(frac, AUTO_ENERGY) + 1))
    return min(n_in, max(need, AUTO_MIN_COILS))


def _align(mats: np.ndarray) -> np.ndarray:
    """Rotate each (C, N) basis of a (X, C, N) stack to agree with its neighbour towards
    the centre (orthogonal Procrustes), so that virtual coils vary smoothly along x."""
    x_n = mats.shape[0]
    out = mats.copy()
    centre = x_n // 2
    for order in (range(centre + 1, x_n), range(centre - 1, -1, -1)):
        for x in order:
            ref = out[x - 1] if x > centre else out[x + 1]
            u, _, vh = np.linalg.svd(out[x].conj().T @ ref)
            out[x] = out[x] @ (u @ vh)
    return out


# ------------------------------------------------------------------------ public
def plan_compression(scan: RawScan, coils: int | str, *,
                     method: CompressionMethod | Literal["auto"] = "auto") -> Compression:
    """Compression matrices for ``scan`` (see the module docstring).

    ``coils`` is the number of virtual coils (1 ≤ N ≤ C) or ``"auto"``; ``method``
    ``auto`` is ``gcc``.
    """
    b_n, c_n, _, _, x_n = scan.shape
    if coils != "auto":
        if isinstance(coils, bool) or not isinstance(coils, (int, np.integer)) or coils < 1:
            raise ConfigError(f"the number of virtual coils must be a positive integer or "
                              f"'auto', got {coils!r}")
        if coils > c_n:
            raise ConfigError(f"cannot compress {c_n} coils into {coils}")
    chosen: CompressionMethod = "gcc" if method == "auto" else method  # type: ignore[assignment]
    if chosen not in ("scc", "gcc"):
        raise ConfigError(f"coil compression method must be scc, gcc or auto, got {method!r}")

    covs: list[np.ndarray] = []        # scc: (C, C) per slice; gcc: (X, C, C) per slice
    for b in range(b_n):
        lines = _calibration_lines(scan, b)                           # (D, Y)
        if not lines.any():
            raise InputDataError("no acquired k-space line to compress the coils from")
        samples = scan.kspace[b][:, lines, :]                         # (C, L, X)
        if chosen == "scc":
            flat = samples.reshape(c_n, -1)
            covs.append(flat @ flat.conj().T)
        else:
            hyb = _ifft_readout(samples)                              # (C, L, X)
            covs.append(np.einsum("clx,dlx->xcd", hyb, hyb.conj()))
    if chosen == "gcc":
        covs = [_pool_readout(c, _window(int(_calibration_lines(scan, b).sum()), c_n))
                for b, c in enumerate(covs)]

    spectra: list[np.ndarray] = []
    for cov in covs:
        if chosen == "scc":
            spectra.append(np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None))
        else:
            vals = np.clip(np.linalg.eigvalsh(cov)[:, ::-1], 0.0, None)   # (X, C)
            spectra.append(vals.sum(axis=0))
    n = _choose_n(spectra, coils, c_n)

    mats, retained = [], []
    for cov, spec in zip(covs, spectra):
        total = float(spec.sum())
        if chosen == "scc":
            u, _ = _leading(cov, n)
            mats.append(u)
            retained.append(float(spec[:n].sum()) / total if total > 0 else 1.0)
        else:
            us, kept = np.empty((x_n, c_n, n), dtype=np.complex128), 0.0
            for x in range(x_n):
                u, vals = _leading(cov[x], n)
                us[x] = u
                kept += float(vals[:n].sum())
            mats.append(_align(us))
            retained.append(kept / total if total > 0 else 1.0)
    return Compression(method=chosen, n_in=c_n, n_out=n,
                       matrices=np.stack(mats).astype(np.complex64),
                       retained=np.asarray(retained))


def _window(lines: int, c_n: int) -> int:
    """Half-width of the readout window that gives every position enough samples."""
    need = _GCC_SAMPLES_PER_COIL * c_n
    return max(0, int(np.ceil(need / max(lines, 1))) // 2)


def _pool_readout(cov: np.ndarray, half: int) -> np.ndarray:
    """Sum each position's covariance with its ``half`` neighbours on either side."""
    if half == 0:
        return cov
    x_n = cov.shape[0]
    csum = np.concatenate([np.zeros_like(cov[:1]), np.cumsum(cov, axis=0)])
    lo = np.clip(np.arange(x_n) - half, 0, x_n)
    hi = np.clip(np.arange(x_n) + half + 1, 0, x_n)
    return csum[hi] - csum[lo]


def _apply(comp: Compression, data: np.ndarray, *, image_domain: bool) -> np.ndarray:
    """Apply the compression to (B, C, D, Y, X) data: k-space, or maps in image space."""
    if data.ndim != 5 or data.shape[1] != comp.n_in or data.shape[0] != comp.matrices.shape[0]:
        raise ConfigError(f"expected ({comp.matrices.shape[0]}, {comp.n_in}, D, Y, X) data "
                          f"for this compression, got {data.shape}")
    m = comp.matrices.conj()
    if comp.method == "scc":
        return np.einsum("bcdyx,bcn->bndyx", data, m).astype(np.complex64)
    hyb = data if image_domain else _ifft_readout(data)
    out = np.einsum("bcdyx,bxcn->bndyx", hyb, m)
    return (out if image_domain else _fft_readout(out)).astype(np.complex64)


def compress_maps(comp: Compression, maps: np.ndarray) -> np.ndarray:
    """Coil maps (B, C, D|1, Y, X) of the original channels → maps of the virtual coils."""
    return _apply(comp, maps, image_domain=True)


def compress_scan(scan: RawScan, coils: int | str, *,
                  method: CompressionMethod | Literal["auto"] = "auto"
                  ) -> tuple[RawScan, Compression]:
    """The scan on ``coils`` virtual coils (see :func:`plan_compression`) and the matrices.

    Unacquired samples stay exactly zero (the transform is per sample for ``scc``;
    ``gcc`` acts along the fully sampled readout only). The noise covariance of
    a prewhitened scan stays the identity; an unwhitened scan's ``noise_cov`` is
    transformed with the matrices only for ``scc`` (``gcc`` drops it).
    """
    comp = plan_compression(scan, coils, method=method)
    k = _apply(comp, scan.kspace, image_domain=False)
    k *= scan.mask                                  # exact zeros where nothing was acquired
    noise_cov = None
    if scan.noise_cov is not None:
        if scan.whitened:
            noise_cov = np.eye(comp.n_out, dtype=scan.noise_cov.dtype)
        elif comp.method == "scc" and comp.matrices.shape[0] == 1:
            u = comp.matrices[0]
            noise_cov = u.conj().T @ scan.noise_cov @ u
    return scan.replace(kspace=k, noise_cov=noise_cov), comp
