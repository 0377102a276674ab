"""Image quality metrics: PSNR, SSIM and NRMSE of a reconstruction against a reference.

Conventions (stated because every tool differs):

* Both images are compared as magnitudes (``|x|``), float64.
* Before comparison the reconstruction is fitted to the reference by least
  squares, ``a = <rec, ref> / <rec, rec>``, ``rec ← a·rec`` (``fit=True``, the
  default), so a global intensity scale — which differs between scanners,
  coil combinations and normalisations — does not count as error. The fitted
  ``a`` is reported.
* ``data_range`` is the maximum of the reference magnitude.
* PSNR = 10·log10(data_range² / MSE). NRMSE = ‖rec − ref‖ / ‖ref‖.
* SSIM follows Wang et al. (2004): Gaussian window σ = 1.5 (truncated at 3.5σ,
  11 taps), K1 = 0.01, K2 = 0.03, computed on every 2D (Y, X) plane of the
  volume and averaged over the planes and the valid (non-border) pixels.
* An optional boolean ``mask`` restricts PSNR/NRMSE (and the fit) to a region.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputDataError


@dataclass(frozen=True)
class Metrics:
    psnr: float
    ssim: float
    nrmse: float
    scale: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of the last two axes with the 1D window ``w``."""
    n = w.size
    ny, nx = img.shape[-2:]
    out_y = np.zeros(img.shape[:-2] + (ny - n + 1, nx), dtype=np.float64)
    for i in range(n):
        out_y += w[i] * img[..., i:i + ny - n + 1, :]
    out = np.zeros(img.shape[:-2] + (ny - n + 1, nx - n + 1), dtype=np.float64)
    for i in range(n):
        out += w[i] * out_y[..., :, i:i + nx - n + 1]
    return out


def ssim(rec: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM over the (Y, X) planes of two real arrays of equal shape."""
    rec = np.asarray(rec, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if data_range is None:
        data_range = float(ref.max() - min(ref.min(), 0.0))
    if data_range <= 0:
        raise InputDataError("reference image is all zero: SSIM is undefined")
    w = _gaussian_window()
    if min(rec.shape[-2:]) < w.size:
        raise InputDataError(f"images of {rec.shape[-2:]} pixels are too small for an "
                             f"{w.size}×{w.size} SSIM window")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x = _filter_valid(rec, w)
    mu_y = _filter_valid(ref, w)
    sxx = _filter_valid(rec * rec, w) - mu_x ** 2
    syy = _filter_valid(ref * ref, w) - mu_y ** 2
    sxy = _filter_valid(rec * ref, w) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def compare(rec: np.ndarray, ref: np.ndarray, *, fit: bool = True,
            mask: np.ndarray | None = None) -> Metrics:
    """PSNR / SSIM / NRMSE of ``rec`` against ``ref`` (magnitudes; see module docstring)."""
    rec_m = np.abs(np.asarray(rec)).astype(np.float64)
    ref_m = np.abs(np.asarray(ref)).astype(np.float64)
    if rec_m.shape != ref_m.shape:
        raise InputDataError(f"shapes differ: reconstruction {rec_m.shape} vs reference {ref_m.shape}")
    if not (np.isfinite(rec_m).all() and np.isfinite(ref_m).all()):
        raise InputDataError("images contain NaN or Inf values")
    sel = np.ones(ref_m.shape, dtype=bool) if mask is None else np.broadcast_to(mask, ref_m.shape)
    ref_energy = float(np.sum(ref_m[sel] ** 2))
    if ref_energy == 0.0:
        raise InputDataError("reference image is all zero")
    scale = 1.0
    if fit:
        rec_energy = float(np.sum(rec_m[sel] ** 2))
        scale = float(np.sum(rec_m[sel] * ref_m[sel]) / rec_energy) if rec_energy > 0 else 1.0
    rec_m = rec_m * scale
    err = rec_m[sel] - ref_m[sel]
    mse = float(np.mean(err ** 2))
    data_range = float(ref_m.max())
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)
    nrmse = float(np.sqrt(np.sum(err ** 2) / ref_energy))
    if rec_m.ndim >= 3 and rec_m.shape[-1] == 1 and rec_m.shape[-3] > 1:
        # one readout position (a 3D scan transformed along it): SSIM on the (D, Y) planes
        rec_m, ref_m = rec_m[..., 0], ref_m[..., 0]
    planes_rec = rec_m.reshape((-1,) + rec_m.shape[-2:]) if rec_m.ndim >= 2 else rec_m
    planes_ref = ref_m.reshape((-1,) + ref_m.shape[-2:]) if ref_m.ndim >= 2 else ref_m
    s = ssim(planes_rec, planes_ref, data_range=data_range)
    return Metrics(psnr=psnr, ssim=s, nrmse=nrmse, scale=scale)


def metrics(rec_path: str, ref_path: str, *, fit: bool = True) -> Metrics:
    """Compare two NIfTI files voxel by voxel (same grid required)."""
    from .io.nifti import read_nifti

    rec, rec_affine = read_nifti(rec_path)
    ref, ref_affine = read_nifti(ref_path)
    if rec.shape != ref.shape:
        raise InputDataError(f"image shape {rec.shape} does not match the reference's {ref.shape}",
                             path=rec_path)
    if not np.allclose(rec_affine, ref_affine, atol=1e-3):
        raise InputDataError("voxel grid (affine) differs from the reference's", path=rec_path)
    # NIfTI (i, j, k[, t]) → planes over (i, j): move the first two axes last.
    rec_p = np.moveaxis(np.asarray(rec), (0, 1), (-1, -2))
    ref_p = np.moveaxis(np.asarray(ref), (0, 1), (-1, -2))
    return compare(rec_p, ref_p, fit=fit)
