"""The noise level of normalised k-space, and MOL's data weight λ set from it.

Why
---
MOL solves x − H(x) + λAᴴ(Ax − b) = 0 on data normalised so that the bright tissue
sits near 1 (:mod:`molrecon.physics.scaling`). λ weighs the data against the prior, and
the right weight depends on how noisy the normalised data are: a λ tuned on simulated
brains (noise σ ≈ 0.004–0.007 after the normalisation) lets the noise of a 2-coil
phantom (σ ≈ 0.05) through, and the prior then shapes it into texture. Compressed
sensing users retune their λ per scan for the same reason. Here the checkpoint carries
a rule, measured on validation data at several noise levels and accelerations
(``benchmarks/bench_lambda_noise.py``)::

    λ(σ, R) = λ₀ · clip((σ₀ / σ)^p · (R / R₀)^q, f_min, f_max)

with λ₀ the checkpoint's λ, σ₀ and R₀ a noise level and acceleration where the fit
gives λ₀, p and q the measured exponents, [f_min, f_max] the range of factors the
measurement covered and R held within the accelerations it covered. The best λ also grows with the acceleration (fewer samples leave
more to the prior, whose bias then outweighs the noise the data term lets through),
so q is fitted too (0: no dependence). σ and R are taken per batch item (slice, series
or volume), so a slice with little signal (a larger σ after its own normalisation) is
regularised more. R is the effective acceleration: the phase-encoding positions
(over all frames of a series) divided by those acquired, calibration lines included
(:func:`effective_acceleration`).

The estimate
------------
σ is the standard deviation of the real (and imaginary) part of one k-space sample
after the normalisation: the median absolute deviation / 0.6745 of the real and
imaginary parts of the *acquired, non-zero* samples in the outer sixteenth of the two
largest spatial axes, where an image's signal has fallen to the noise floor. Exact
zeros are left out (zero-padded matrices, partial Fourier). The periphery still holds
a little signal, so the estimate is an upper bound: on simulated files with a noise
scan it reads 5–12 % above the noise scan's value. It needs no noise scan (most
files have none) and is computed the same way on every file, the validation data the
rule was measured on included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..errors import CheckpointError
from .fft import spatial_dims

#: The fraction of each axis counted as its periphery (each end).
PERIPHERY = 1.0 / 16.0
#: Fewer periphery samples than this give no estimate (None).
MIN_SAMPLES = 64
#: MAD → standard deviation of a Gaussian.
_MAD_TO_STD = 1.0 / 0.6745


def effective_acceleration(mask: torch.Tensor, batch: int) -> list[float]:
    """Phase-encoding positions / acquired positions per batch item of a sampling ``mask``
    (B|1, 1, D, Y, 1 or broadcastable to it; non-zero = acquired), for ``batch`` items."""
    m = (mask != 0)
    if m.ndim != 5:
        raise ValueError(f"mask must be (B, 1, D, Y, 1), got {tuple(mask.shape)}")
    m = m.any(dim=(1, 4))                                                  # (B|1, D, Y)
    m = torch.broadcast_to(m, (batch,) + tuple(m.shape[1:]))
    total = m.shape[1] * m.shape[2]
    return [float(total / max(int(c), 1)) for c in m.reshape(batch, -1).sum(dim=1).tolist()]


def periphery_sigma(kspace: torch.Tensor, mask: torch.Tensor, kind: str) -> list[float | None]:
    """σ per batch item of normalised ``kspace`` (B, C, D, Y, X) acquired on ``mask``
    (B|1, 1, D, Y, 1 or broadcastable); None for an item with fewer than ``MIN_SAMPLES``
    usable periphery samples. See the module docstring."""
    if kspace.ndim != 5:
        raise ValueError(f"k-space must be (B, C, D, Y, X), got {tuple(kspace.shape)}")
    dims = [d % 5 for d in spatial_dims(kind)]
    axes = sorted(sorted(dims, key=lambda d: kspace.shape[d])[-2:])
    shape = kspace.shape
    acquired = torch.broadcast_to(mask != 0, (1,) + tuple(shape[1:])) if mask.shape[0] == 1 \
        else torch.broadcast_to(mask != 0, shape)
    out: list[float | None] = []
    for b in range(shape[0]):
        k_b = kspace[b]                                                  # (C, D, Y, X)
        m_b = acquired[b if acquired.shape[0] > 1 else 0]               # (C, D, Y, X)
        pieces = []
        done: list[tuple[int, int, int]] = []     # (axis, start, stop) already taken whole
        for ax in axes:
            n = shape[ax]
            e = max(1, int(n * PERIPHERY))
            if 2 * e >= n:
                continue                                   # an axis too short to have one
            for start in (0, n - e):
                k_s, m_s = k_b.narrow(ax - 1, start, e), m_b.narrow(ax - 1, start, e)
                for prev_ax, p0, p1 in done:               # no sample counted twice
                    keep = torch.ones(shape[prev_ax], dtype=torch.bool, device=k_b.device)
                    keep[p0:p1] = False
                    view = [1] * 4
                    view[prev_ax - 1] = -1
                    m_s = m_s & keep.reshape(view)
                pieces.append(k_s[m_s])
            done += [(ax, 0, e), (ax, n - e, n)]
        v = torch.cat(pieces) if pieces else k_b.new_zeros(0)
        v = v[v != 0]
        if v.numel() < MIN_SAMPLES:
            out.append(None)
            continue
        parts = torch.cat([v.real, v.imag]).double()
        mad = torch.median(torch.abs(parts - torch.median(parts)))
        sigma = float(mad) * _MAD_TO_STD
        out.append(sigma if sigma > 0 and math.isfinite(sigma) else None)
    return out


@dataclass(frozen=True)
class NoiseLambdaRule:
    """λ(σ, R) = λ₀ · clip((sigma_ref / σ)^exponent · (R / accel_ref)^accel_exponent,
    min_factor, max_factor) (module docstring).

    ``measured`` keeps how the rule was obtained (plain JSON: the data, the noise levels,
    the best λ per level), for the model card.
    """

    sigma_ref: float
    exponent: float
    min_factor: float
    max_factor: float
    measured: dict[str, Any] | None = None
    accel_ref: float = 1.0
    accel_exponent: float = 0.0
    #: R is held in [accel_min, accel_max] (the accelerations the rule was measured at).
    accel_min: float = 1.0
    accel_max: float = math.inf

    def __post_init__(self) -> None:
        ok = (math.isfinite(self.sigma_ref) and self.sigma_ref > 0
              and math.isfinite(self.exponent) and self.exponent >= 0
              and math.isfinite(self.accel_ref) and self.accel_ref > 0
              and math.isfinite(self.accel_exponent)
              and 0 < self.accel_min <= self.accel_max
              and 0 < self.min_factor <= 1.0 <= self.max_factor < math.inf)
        if not ok:
            raise ValueError(f"invalid λ noise rule: σ₀ {self.sigma_ref}, p {self.exponent}, "
                             f"R₀ {self.accel_ref}, q {self.accel_exponent}, "
                             f"factors [{self.min_factor}, {self.max_factor}]")

    def factor(self, sigma: float | None, accel: float | None = None) -> float:
        """The factor λ/λ₀ at noise level ``sigma`` and effective acceleration ``accel``
        (1, the checkpoint's own λ, when there is no noise estimate; no acceleration term
        without ``accel``)."""
        if sigma is None or not sigma > 0:
            return 1.0
        f = (self.sigma_ref / sigma) ** self.exponent
        if accel is not None and accel > 0 and self.accel_exponent:
            r = min(max(accel, self.accel_min), self.accel_max)
            f *= (r / self.accel_ref) ** self.accel_exponent
        return float(min(max(f, self.min_factor), self.max_factor))

    def record(self) -> dict[str, Any]:
        """Plain values, as stored in a checkpoint (``lam_noise``) and in reports (strict
        JSON: an unbounded ``accel_max`` is None)."""
        d = asdict(self)
        if d["measured"] is None:
            del d["measured"]
        if not math.isfinite(d["accel_max"]):
            d["accel_max"] = None
        return d

    @classmethod
    def from_record(cls, obj: Any, path: object = None) -> NoiseLambdaRule:
        """The rule of a checkpoint's ``lam_noise`` entry; :class:`CheckpointError` if malformed."""
        try:
            if not isinstance(obj, dict):
                raise TypeError("not a mapping")
            measured = obj.get("measured")
            if measured is not None and not isinstance(measured, dict):
                raise TypeError("'measured' is not a mapping")
            return cls(sigma_ref=float(obj["sigma_ref"]), exponent=float(obj["exponent"]),
                       min_factor=float(obj["min_factor"]), max_factor=float(obj["max_factor"]),
                       measured=measured, accel_ref=float(obj.get("accel_ref", 1.0)),
                       accel_exponent=float(obj.get("accel_exponent", 0.0)),
                       accel_min=float(obj.get("accel_min", 1.0)),
                       accel_max=(math.inf if obj.get("accel_max") is None
                                  else float(obj["accel_max"])))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"malformed 'lam_noise' entry ({exc})", path=path) from exc


__all__ = ["MIN_SAMPLES", "PERIPHERY", "NoiseLambdaRule", "effective_acceleration",
           "periphery_sigma"]
