"""One MOL problem, built one way: scan → scaled k-space → coil maps → operator → start.

Reconstruction (``recon``), training (``train``) and the guarantees commands
(``guarantees``) all solve

    x − H(x) + λ Aᴴ(A x − b) = 0

on *normalised* data: the k-space of each batch item divided by its intensity
scale (:mod:`molrecon.physics.scaling`), A = M F S with ESPIRiT maps (or the
user's), and CG-SENSE as the start. This module is the only place that turns
acquired k-space into that problem, so the three always agree:

* :func:`prepare` — tensors in (k-space, mask, calibration region): scale,
  maps, operator;
* :func:`from_scan` — the same for a chunk of slices of a :class:`RawScan`;
* :func:`with_sense_start` — adds the CG-SENSE start of ``molrecon reconstruct``;
* :func:`undersampled` — a training problem: fully sampled reference data,
  a fresh mask, optional extra noise and an optional block of readout positions.

The CG-SENSE defaults (``SENSE_LAMBDA``, ``SENSE_ITERS``) are those of
:mod:`molrecon.config`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from .config import MAPS_FROM, SENSE_ITERS, SENSE_LAMBDA
from .io.kspace import find_calibration_region
from .io.types import Kind, RawScan
from .physics.espirit import EspiritConfig, estimate_maps
from .physics.fft import ifftc
from .physics.noise import NoiseLambdaRule, effective_acceleration, periphery_sigma
from .physics.scaling import scale_factor
from .physics.sense import SenseOperator, cg_sense

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["SENSE_ITERS", "SENSE_LAMBDA", "Problem", "from_scan", "prepare", "sense_start",
           "undersampled", "with_sense_start"]


@dataclass(frozen=True)
class Problem:
    """One normalised MOL problem (a batch of slices, frames or volumes of one scan).

    op      SENSE operator A of the normalised data (maps from ESPIRiT or the user)
    kspace  (B, C, D, Y, X) normalised measurements b, zero off the sampling mask
    kind    data kind (:mod:`molrecon.kinds`)
    scale   (B,) the intensity scale each item was divided by (None when not known)
    start   (B, D, Y, X) the MOL start (CG-SENSE), when built
    target  (B, D, Y, X) the normalised reference image, for training and validation
    source  file name (for reports); items: slice indices in that file
    lam_scale  (B,) λ factor per item from a noise rule (training problems built with
            one, :func:`undersampled`), or None: the model's λ as it is
    """

    op: SenseOperator
    kspace: torch.Tensor
    kind: str
    scale: torch.Tensor | None = None
    start: torch.Tensor | None = None
    target: torch.Tensor | None = None
    source: str = ""
    items: tuple[int, ...] = ()
    lam_scale: torch.Tensor | None = None

    @cached_property
    def aty(self) -> torch.Tensor:
        """Aᴴb, (B, D, Y, X) (computed once)."""
        return self.op.adjoint(self.kspace)

    @property
    def dtype(self) -> torch.dtype:
        return self.kspace.dtype

    def support(self) -> torch.Tensor:
        """1 at sampled k-space locations, broadcastable to ``kspace``."""
        m = self.op.mask                                                   # (B|1, 1, D|1, Y|1, X|1)
        return (m != 0).to(self.kspace.real.dtype)

    def to(self, *, dtype: torch.dtype | None = None) -> Problem:
        """The same problem in another complex dtype (complex128 for double precision)."""
        if dtype is None or dtype == self.kspace.dtype:
            return self
        start = None if self.start is None else self.start.to(dtype)
        return replace(self, op=self.op.to(dtype=dtype), kspace=self.kspace.to(dtype),
                       start=start)


def prepare(kspace: torch.Tensor, mask: torch.Tensor, calib: torch.Tensor | None, kind: str,
            *, maps: torch.Tensor | None = None, espirit: EspiritConfig | None = None) -> Problem:
    """Normalise the intensity, estimate ESPIRiT maps, build A = M F S (no start yet).

    Tensors in, on any device: ``kspace`` (b, C, D, Y, X), ``mask`` and ``calib``
    (b, 1, D, Y, 1); ``calib`` None calibrates on the whole acquired centre (fully
    sampled reference data). ``maps`` (b, C, D|1, Y, X), when given, are used instead
    of the ESPIRiT estimate; ``espirit`` sets its options (default: BART ``ecalib -m1``'s).
    """
    scale = torch.as_tensor(scale_factor(kspace, mask, kind), device=kspace.device,
                            dtype=kspace.real.dtype).reshape(-1)            # (b,)
    kn = kspace / scale.reshape(-1, 1, 1, 1, 1).to(kspace.dtype)
    if maps is None:
        maps = estimate_maps(kn, calib, kind, config=espirit or EspiritConfig())
    return Problem(op=SenseOperator(maps, mask, kind), kspace=kn, kind=kind, scale=scale)


def from_scan(scan: RawScan, items: slice | Sequence[int], device: torch.device | str, *,
              maps: NDArray[np.complexfloating] | None = None, source: str = "",
              espirit: EspiritConfig | None = None) -> Problem:
    """:func:`prepare` for the batch items ``items`` of ``scan`` (a slice or indices).

    ``maps``: the user's coil maps for the whole scan (B, C, D|1, Y, X), or None.
    """
    k = torch.from_numpy(np.ascontiguousarray(scan.kspace[items])).to(device)  # (b, C, D, Y, X)
    mask = torch.from_numpy(np.array(scan.mask[items], dtype=bool)).to(device)  # (b, 1, D, Y, 1)
    calib = torch.from_numpy(np.array(scan.calib[items], dtype=bool)).to(device)
    user = None if maps is None else torch.from_numpy(
        np.ascontiguousarray(maps[items])).to(device)
    idx = range(scan.shape[0])[items] if isinstance(items, slice) else items
    problem = prepare(k, mask, calib, scan.kind, maps=user, espirit=espirit)
    return replace(problem, source=source, items=tuple(int(i) for i in idx))


def sense_start(problem: Problem, *, lam: float = SENSE_LAMBDA,
                iters: int = SENSE_ITERS) -> torch.Tensor:
    """The CG-SENSE image (AᴴA + λI)x = Aᴴb of ``problem``, (B, D, Y, X)."""
    return cg_sense(problem.op, problem.kspace, lam=lam, max_iter=iters).x


def with_sense_start(op: SenseOperator, kspace: torch.Tensor, *, kind: str | None = None,
                     source: str = "", items: Sequence[int] | None = None,
                     sense_lambda: float = SENSE_LAMBDA,
                     sense_iters: int = SENSE_ITERS) -> Problem:
    """A :class:`Problem` from an operator and (already normalised) k-space ``(B, C, D, Y, X)``,
    with the CG-SENSE start of ``molrecon reconstruct`` (λ relative, see
    :func:`molrecon.physics.sense.cg_sense`)."""
    k = kspace.to(op.dtype) * (op.mask != 0).to(op.dtype)                 # (B, C, D, Y, X)
    start = cg_sense(op, k, lam=sense_lambda, max_iter=sense_iters).x     # (B, D, Y, X)
    n = int(k.shape[0])
    return Problem(op=op, kspace=k, kind=op.kind if kind is None else kind, start=start,
                   source=source, items=tuple(range(n)) if items is None else tuple(items))


def undersampled(kspace: torch.Tensor, maps: torch.Tensor, target: torch.Tensor,
                 mask: NDArray[np.bool_], kind: str, rng: np.random.Generator,
                 extra_noise: float, device: torch.device | str,
                 readout_block: int | None = None, *, maps_from: str = "reference",
                 lam_rule: NoiseLambdaRule | None = None) -> Problem:
    """A training problem from fully sampled reference data, normalised as reconstruction is.

    ``kspace`` (1, C, D, Y, X), ``maps`` (1, C, D|1, Y, X) and ``target`` (1, D, Y, X) are
    the reference (already normalised once, see :mod:`molrecon.train.data`); ``mask`` (1, 1, D, Y, 1)
    the retrospective sampling. ``extra_noise``: std of complex white noise added before
    undersampling (its seed drawn from ``rng``). ``readout_block``: keep only a block of
    that many readout positions. The readout is fully sampled, so after an inverse
    transform along it every readout position is a problem of its own and the block is
    exact (hybrid-space operator); the block is drawn from ``rng`` with probability
    proportional to the target's energy in it.

    ``maps_from``: "reference" uses ``maps`` (the fully sampled scan's: the data term is
    exact); "calibration" estimates ESPIRiT maps from the problem's own calibration lines,
    noise included, as reconstruction does, so that the training sees the map errors a
    reconstruction has; the target keeps the reference's magnitude and takes the phase of
    the fully sampled reference data (without the added noise) combined with those maps (a
    map set fixes the image's phase).
    ``lam_rule``: λ per item from the undersampled data's noise level and acceleration
    (:class:`~molrecon.physics.noise.NoiseLambdaRule`, as ``reconstruct --lam auto``),
    measured before the readout block is cut (``Problem.lam_scale``).
    """
    if maps_from not in MAPS_FROM:
        raise ValueError(f"maps_from must be one of {MAPS_FROM}, got {maps_from!r}")
    m = torch.from_numpy(np.array(mask, dtype=bool)).to(device)           # (1, 1, D, Y, 1)
    clean = kspace.to(device)                                              # (1, C, D, Y, X)
    k = clean
    if extra_noise > 0:
        seed = int(rng.integers(2**31 - 1))
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.complex(torch.randn(k.shape, generator=g), torch.randn(k.shape, generator=g))
        k = k + (extra_noise / math.sqrt(2.0)) * noise.to(device=device, dtype=k.dtype)
    y = k * m                                                              # (1, C, D, Y, X)
    s = float(scale_factor(y, m, kind).reshape(-1)[0])
    y = y / s
    scale = torch.tensor([s])
    maps = maps.to(device)
    ref = target.to(device) / s                                            # (1, D, Y, X)
    if maps_from == "calibration":
        calib = torch.from_numpy(find_calibration_region(np.array(mask, dtype=bool),
                                                         cast("Kind", kind)))
        maps = estimate_maps(y, calib.to(device), kind)                    # (1, C, D|1, Y, X)
        # the phase of the reference data without the added noise: a target holds none of it
        full = SenseOperator(maps, torch.ones_like(m), kind).adjoint(clean / s)  # (1, D, Y, X)
        phase = torch.where(full.abs() > 0, torch.sgn(full), torch.ones_like(full))
        ref = ref.abs().to(full.dtype) * phase
    lam_scale = None
    if lam_rule is not None:
        sigma = periphery_sigma(y, m, kind)[0]
        accel = effective_acceleration(m, 1)[0]
        lam_scale = torch.tensor([lam_rule.factor(sigma, accel)], dtype=y.real.dtype,
                                 device=y.device)
    n_x = y.shape[-1]
    if readout_block is None or readout_block >= n_x:
        op = SenseOperator(maps, m, kind)
        return Problem(op=op, kspace=y, kind=kind, scale=scale, target=ref, lam_scale=lam_scale)
    energy = ref.abs().square().sum(dim=(0, 1, 2)).cpu().numpy()          # (X,)
    windows = np.convolve(energy, np.ones(readout_block), mode="valid")    # (X − w + 1,)
    x0 = int(rng.choice(windows.size, p=windows / windows.sum()))
    cut = slice(x0, x0 + readout_block)
    y = ifftc(y, dims=(-1,))[..., cut].contiguous()
    op = SenseOperator(maps[..., cut].contiguous(), m, kind, hybrid_readout=True)
    return Problem(op=op, kspace=y, kind=kind, scale=scale, target=ref[..., cut],
                   lam_scale=lam_scale)
