"""Stage-0 training data: noisy image patches for pretraining the prior as a denoiser.

Deep-equilibrium steps are expensive on a CPU (a forward solve of several MOL
steps, each with CG, then a backward solve). Pretraining the prior H without
the data term costs one network pass per patch, so a CPU-hour buys thousands of
steps. The patches are drawn from the fully sampled training scans' targets,
at the intensity the network meets in reconstruction:

* every scan's target is divided by the scale ``s`` that reconstruction
  computes (:func:`molrecon.physics.scaling.scale_factor`) from the scan's own
  k-space under a retrospective mask of the run's mask family, so bright
  tissue sits near 1; ``s`` is computed once per scan (one FFT) and jittered
  per patch by a log-uniform factor in [1/``jitter``, ``jitter``], since the
  mask and the noise move the percentile a little from one problem to the next;
* augmentation: one of the 8 flips/transpositions of the square patch, a
  random global phase (the network must not depend on the scanner's phase
  reference), and a power curve ``|x|^γ`` on the magnitude with γ log-uniform
  in [1/``gamma``, ``gamma``] (other contrasts and receive profiles);
* patches are drawn at random, but a patch whose mean magnitude is below
  ``background`` × the scan's mean magnitude is redrawn (up to 8 times), so
  that most of them show anatomy;
* the noise is complex white Gaussian with E|n|² = σ², σ log-uniform in
  [``sigma_min``, ``sigma_max``] per patch (σ relative to the normalised
  intensity, i.e. to bright tissue).

A fraction ``sense_fraction`` of the patches shows, instead of added white
noise, the degradation the prior meets first in reconstruction: the
regularised SENSE image (the MOL start, (AᴴA + I/λ)x = Aᴴb) of the scan under a
retrospective mask of the run's mask family and accelerations, with its
g-factor-shaped noise and residual aliasing, against the same window of the
target. These images are computed once per run (:func:`degraded_bank`,
``sense_masks`` masks per scan) and cropped and flipped like the others (no
power curve: it would change the noise, not only the contrast).

For a network with 3D convolutions (2D+time data, time as the third axis, or 3D
volumes) a patch is a block of ``depth`` consecutive frames or partitions (all of
them where the scan has fewer) by ``size``² pixels, the same window in every plane,
with a reversal of that axis as a ninth augmentation (a movie played backwards is
still a movie; a volume seen from the other side still a head). The degraded bank
then holds whole regularised SENSE series or volumes, whose aliasing is spread over
time or partitions as the reconstruction meets it.

Everything is drawn from the caller's ``numpy`` generator, so a step's patches
depend only on (seed, step, position in the batch), as in deep-equilibrium
training, and a resumed run draws the same patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .data import MaskSpec, Sample, draw_mask, make_problem

# torch is imported where it is used: TrainConfig takes PatchSpec from here, and the command
# line checks its options without importing torch.


@dataclass(frozen=True)
class PatchSpec:
    """How stage-0 patches are drawn (see the module docstring)."""

    size: int = 64
    sigma_min: float = 0.01
    sigma_max: float = 0.12
    jitter: float = 1.25
    gamma: float = 1.25
    background: float = 0.25
    sense_fraction: float = 0.0
    sense_masks: int = 3
    depth: int = 8

    def __post_init__(self) -> None:
        if not 0.0 <= self.sense_fraction <= 1.0:
            raise ConfigError(f"sense_fraction must lie in [0, 1], got {self.sense_fraction!r}")
        if (isinstance(self.sense_masks, bool) or not isinstance(self.sense_masks, int)
                or self.sense_masks < 1):
            raise ConfigError(f"sense_masks must be an integer >= 1, got {self.sense_masks!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 8:
            raise ConfigError(f"patch size must be an integer >= 8, got {self.size!r}")
        if isinstance(self.depth, bool) or not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError("depth must be an integer >= 1 (planes per patch), got "
                              f"{self.depth!r}")
        if not 0 < self.sigma_min <= self.sigma_max < math.inf:
            raise ConfigError("noise levels must satisfy 0 < sigma_min <= sigma_max, got "
                              f"{self.sigma_min!r}, {self.sigma_max!r}")
        for name in ("jitter", "gamma"):
            value = getattr(self, name)
            if not 1.0 <= value < math.inf:
                raise ConfigError(f"{name} must be >= 1, got {value!r}")
        if not 0.0 <= self.background < math.inf:
            raise ConfigError(f"background must be >= 0, got {self.background!r}")


def sample_scales(samples: list[Sample], kind: str, mask: MaskSpec, seed: int) -> list[float]:
    """Reconstruction's intensity scale of every sample under one seeded retrospective mask."""
    import torch

    from ..physics.scaling import scale_factor

    scales = []
    for i, sample in enumerate(samples):
        rng = np.random.default_rng([seed, 5_555_555, i])
        m = torch.from_numpy(np.array(draw_mask(sample, kind, mask, rng), dtype=bool))
        scales.append(float(scale_factor(sample.kspace * m, m, kind).reshape(-1)[0]))
    return scales


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def degraded_bank(samples: list[Sample], kind: str, mask: MaskSpec, lam: float, iters: int,
                  count: int, seed: int) -> list[list[tuple[Any, Any]]]:
    """Per sample, ``count`` (regularised SENSE image, target) pairs, normalised as
    reconstruction does, under seeded masks of ``mask``: ``(Y, X)`` complex for 2d data,
    the whole ``(D, Y, X)`` series or volume for 2dt and 3d data."""
    import torch

    from ..deq.mol import regularised_sense

    bank = []
    with torch.no_grad():
        for i, sample in enumerate(samples):
            pairs = []
            for k in range(count):
                rng = np.random.default_rng([seed, 6_666_666, i, k])
                prob = make_problem(sample, kind, mask, rng, 0.0, "cpu")
                x0 = regularised_sense(prob.op.normal, prob.aty, lam=lam, iters=iters)
                if kind == "2d":
                    pairs.append((x0[0, 0].clone(), prob.target[0, 0].clone()))
                else:
                    pairs.append((x0[0].clone(), prob.target[0].clone()))
            bank.append(pairs)
    return bank


def _window(ny: int, nx: int, size: int, image: Any, spec: PatchSpec, rng: np.random.Generator
            ) -> tuple[slice, slice]:
    """A random ``size``² window, redrawn (up to 8 times) while it shows mostly background."""
    level = float(image.abs().mean()) * spec.background
    for _ in range(8):
        y0 = int(rng.integers(ny - size + 1))
        x0 = int(rng.integers(nx - size + 1))
        win = (slice(y0, y0 + size), slice(x0, x0 + size))
        if float(image[win].abs().mean()) >= level:
            break
    return win


def _flip(x: Any, flips: tuple[int, int, int]) -> Any:
    """One of the 8 flips/transpositions of the last two axes."""
    if flips[0]:
        x = x.flip(-2)
    if flips[1]:
        x = x.flip(-1)
    if flips[2]:
        x = x.transpose(-2, -1)
    return x


def _reverse(x: Any, reverse: bool) -> Any:
    """``x`` (d, P, P), its first axis reversed if ``reverse``, contiguous."""
    return (x.flip(0) if reverse else x).contiguous()


def _unit_phase(rng: np.random.Generator, dtype: Any) -> Any:
    import torch

    phase = float(rng.uniform(0.0, 2.0 * math.pi))
    return torch.polar(torch.ones((), dtype=dtype), torch.tensor(phase, dtype=dtype))


def draw_patch(sample: Sample, scale: float, spec: PatchSpec, rng: np.random.Generator,
               degraded: list[tuple[Any, Any]] | None = None, *, volume: bool = False
               ) -> tuple[Any, Any]:
    """One (degraded, clean) pair of complex patches of a sample's target: ``(1, P, P)``,
    or with ``volume`` (a network with 3D convolutions) ``(d, P, P)``, d = min(``spec.depth``,
    D) consecutive frames or partitions.

    With probability ``spec.sense_fraction`` (and ``degraded`` given: the sample's pairs
    from :func:`degraded_bank`) the degraded patch is a window of a regularised SENSE
    image; otherwise the scaled target plus white noise. Patches larger than the image
    are cut to the image (both axes to the smaller one).
    """
    import torch

    use_sense = bool(degraded) and float(rng.uniform()) < spec.sense_fraction
    x0 = None
    if use_sense and degraded:
        x0, target = degraded[int(rng.integers(len(degraded)))]
        s = _log_uniform(rng, 1.0 / spec.jitter, spec.jitter)
    else:
        full = sample.target[0]                                  # (D, Y, X) complex
        target = full if volume else full[int(rng.integers(full.shape[0]))]
        s = scale * _log_uniform(rng, 1.0 / spec.jitter, spec.jitter)
    if volume:
        d = min(spec.depth, target.shape[0])
        d0 = int(rng.integers(target.shape[0] - d + 1))
        planes = slice(d0, d0 + d)
        target = target[planes]                                  # (d, Y, X)
        x0 = None if x0 is None else x0[planes]
    ny, nx = target.shape[-2:]
    p = min(spec.size, ny, nx)
    win = _window(ny, nx, p, target.abs().mean(0) if volume else target, spec, rng)
    flips = (int(rng.integers(2)), int(rng.integers(2)), int(rng.integers(2)))
    if volume:
        win = (slice(None), *win)
        reverse = bool(rng.integers(2))
    rot = _unit_phase(rng, target.real.dtype)
    clean = _flip(target[win] / s, flips) * rot                  # (P, P) or (d, P, P)
    if x0 is not None:
        noisy = _flip(x0[win] / s, flips) * rot
        if volume:
            return _reverse(noisy, reverse), _reverse(clean, reverse)
        return noisy.unsqueeze(0).contiguous(), clean.unsqueeze(0).contiguous()
    if volume:
        clean = _reverse(clean, reverse)
    gamma = _log_uniform(rng, 1.0 / spec.gamma, spec.gamma)
    mag = clean.abs()
    unit = torch.where(mag > 0, clean / mag.clamp_min(1e-30), torch.zeros_like(clean))
    clean = (mag ** gamma) * unit
    sigma = _log_uniform(rng, spec.sigma_min, spec.sigma_max)
    g = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31 - 1)))
    noise = torch.complex(torch.randn(clean.shape, generator=g),
                          torch.randn(clean.shape, generator=g))
    noisy = clean + (sigma / math.sqrt(2.0)) * noise.to(clean.dtype)
    if volume:
        return noisy.contiguous(), clean.contiguous()
    return noisy.unsqueeze(0).contiguous(), clean.unsqueeze(0).contiguous()


def whole_image(sample: Sample, scale: float, rng: np.random.Generator, volume: bool,
                depth: int) -> Any:
    """A whole clean image of ``sample`` at reconstruction's intensity (``/ scale``) with a
    random global phase: one slice ``(1, 1, Y, X)``, or for a 3D network a block of
    ``depth`` consecutive planes ``(1, d, Y, X)`` (where stage 0's penalty may measure H
    over a whole image, :class:`~molrecon.train.TrainConfig` ``penalty_at``)."""
    full = sample.target[0]                                      # (D, Y, X)
    if volume:
        d = min(depth, full.shape[0])
        d0 = int(rng.integers(full.shape[0] - d + 1))
        image = full[d0:d0 + d]
    else:
        image = full[int(rng.integers(full.shape[0]))][None]
    return (image / scale * _unit_phase(rng, image.real.dtype))[None].contiguous()


__all__ = ["PatchSpec", "degraded_bank", "draw_patch", "sample_scales", "whole_image"]
