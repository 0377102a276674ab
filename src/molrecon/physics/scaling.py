"""Invertible intensity normalisation of k-space.

Raw data arrive in arbitrary scanner units (a factor of 10⁶ between vendors,
coils or receiver gains is common), but a learned prior only works in the
intensity range it was trained on. Every reconstruction therefore divides the
k-space of each batch item by a scale ``s`` and multiplies the result by ``s``
again; since SENSE, CG and MOL's data-consistency step are linear in the data
and the network sees only the normalised image, the output is in scanner units.

Choice of ``s``
---------------
``s`` is the 99th percentile (nearest rank) of the magnitude of the
zero-filled root-sum-of-squares image ``sqrt(Σ_c |Fᴴ M y_c|²)`` of the item,
over all its voxels (and frames). After normalisation the bright tissue sits
near 1 whatever the scanner scale:

* it is computed from the data alone (no coil maps needed, so it can be
  applied before ESPIRiT), the same way for training and inference;
* a percentile ignores a few very bright voxels (vessels, fat, spikes) that
  would set a max-based scale, and does not depend on how much background
  the field of view holds, as a mean or ``‖y‖`` would;
* it is homogeneous: ``s(c·y) = c·s(y)`` exactly, so normalised data do not
  depend on ``c``. For extreme scales (``1e-12``, ``1e12`` and beyond) the data
  are first divided by their largest magnitude, so nothing under- or
  overflows in float32.

All-zero (or non-finite) data have no scale and raise
:class:`~molrecon.errors.InputDataError`.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputDataError
from .fft import ifftc, spatial_dims

PERCENTILE = 99.0


def scale_factor(kspace: torch.Tensor, mask: torch.Tensor | None, kind: str, *,
                 percentile: float = PERCENTILE) -> torch.Tensor:
    """Intensity scale ``s`` per batch item, shape ``(B,)`` (real, > 0); see the module docstring.

    ``kspace`` ``(B, C, D, Y, X)``; ``mask`` ``(B|1, 1, D, Y, 1)`` or ``None``
    (then the zeros of ``kspace`` mark unacquired samples).
    """
    if kspace.ndim != 5 or not kspace.is_complex():
        raise InputDataError(f"k-space must be complex (B, C, D, Y, X), got "
                             f"{tuple(kspace.shape)} {kspace.dtype}")
    if not 0.0 < percentile <= 100.0:
        raise InputDataError(f"percentile must be in (0, 100], got {percentile}")
    b = kspace.shape[0]
    k = kspace if mask is None else kspace * mask.to(device=kspace.device,
                                                     dtype=kspace.real.dtype)
    peak = k.abs().reshape(b, -1).amax(dim=1)                              # (B,)
    if not bool(torch.isfinite(peak).all()):
        raise InputDataError("k-space contains NaN or Inf values")
    empty = (peak == 0).nonzero().flatten().tolist()
    if empty:
        raise InputDataError(f"k-space of batch item(s) {empty} is all zero: there is no "
                             "signal to reconstruct")
    unit = k / peak.reshape(b, 1, 1, 1, 1).to(k.dtype)                    # max |·| = 1
    coil_images = ifftc(unit, spatial_dims(kind))                          # (B, C, D, Y, X)
    rss = torch.sqrt(torch.sum(coil_images.real ** 2 + coil_images.imag ** 2, dim=1))
    flat = rss.reshape(b, -1)                                              # (B, D·Y·X)
    rank = min(max(math.ceil(percentile / 100.0 * flat.shape[1]), 1), flat.shape[1])
    level = torch.kthvalue(flat, rank, dim=1).values                      # (B,)
    if bool((level <= 0).any()):
        # Fewer than (100 − percentile) % of the voxels carry signal: use the largest.
        level = torch.where(level > 0, level, flat.amax(dim=1))
    return level * peak


def _check_scale(scale: torch.Tensor, batch: int) -> torch.Tensor:
    scale = torch.as_tensor(scale)
    if scale.ndim > 1 or scale.numel() not in (1, batch):
        raise InputDataError(f"scale must have shape ({batch},), got {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise InputDataError("scale must be finite and > 0")
    return scale.reshape(-1)


def normalise(kspace: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``kspace / s`` per batch item (``scale`` from :func:`scale_factor`)."""
    s = _check_scale(scale, kspace.shape[0]).to(device=kspace.device, dtype=kspace.real.dtype)
    return kspace / s.reshape((-1,) + (1,) * (kspace.ndim - 1))


def denormalise(image: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``image · s`` per batch item: undoes :func:`normalise` on any linear result."""
    s = _check_scale(scale, image.shape[0]).to(device=image.device, dtype=image.real.dtype)
    return image * s.reshape((-1,) + (1,) * (image.ndim - 1))
