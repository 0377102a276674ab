"""Cartesian sampling masks (numpy only, seeded).

Conventions
-----------
* The k-space centre (DC) of an axis of length ``n`` is at index ``n // 2`` (as in
  :func:`molrecon.physics.fft.fftc`).
* The calibration (ACS) block of ``acs`` lines occupies the indices
  ``n // 2 - acs // 2 ... n // 2 - acs // 2 + acs - 1``; it is always fully sampled.
* ``acceleration`` is the **net** acceleration R = (positions) / (sampled positions),
  ACS included, the number molrecon reports for every scan
  (:attr:`molrecon.io.types.RawScan.acceleration`). For a GRAPPA-style request
  "every 4th line plus 24 ACS lines" ask for the net value (about 2.9 at 256 lines).
* The single-axis generators return ``(Y,)``; the 2D ones ``(D, Y)`` (kz or time
  first, ky last); :func:`expand_mask` broadcasts either to the ``(B, 1, D, Y, 1)``
  layout of :mod:`molrecon.io.types`, and :func:`make_mask` returns that layout directly.
* Randomness comes from an explicit ``numpy.random.Generator`` or an integer seed;
  the same seed gives the same mask.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from ..errors import ConfigError

MaskFamily = Literal["equispaced", "random", "poisson", "interleaved"]
MASK_FAMILIES: tuple[str, ...] = ("equispaced", "random", "poisson", "interleaved")

#: Families that make sense for each data kind; the first is the default.
FAMILIES_FOR_KIND: dict[str, tuple[str, ...]] = {
    "2d": ("equispaced", "random"),
    "3d": ("poisson", "equispaced", "random"),
    "2dt": ("interleaved", "equispaced", "random"),
}

Seed = np.random.Generator | int


def _generator(rng: Seed) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise ConfigError(f"rng must be a numpy Generator or an integer seed, got {type(rng).__name__}")


def acs_slice(n: int, acs: int) -> slice:
    """Index range of the centred calibration block of ``acs`` lines on an axis of length ``n``."""
    start = n // 2 - acs // 2
    return slice(start, start + acs)


def _check_line_request(ny: int, acceleration: float, acs: int, *, axis: str = "ky") -> int:
    """Validate (ny, R, acs) and return the number of lines to sample in total."""
    if int(ny) != ny or ny < 1:
        raise ConfigError(f"{axis} size must be a positive integer, got {ny}")
    if not math.isfinite(acceleration) or acceleration < 1.0:
        raise ConfigError(f"acceleration must be a number >= 1, got {acceleration}")
    if int(acs) != acs or acs < 0:
        raise ConfigError(f"ACS width must be a non-negative integer, got {acs}")
    if acs > ny:
        raise ConfigError(f"ACS width {acs} exceeds the {ny} {axis} lines")
    n_total = max(1, round(ny / acceleration))
    if acs > n_total:
        raise ConfigError(
            f"the {acs}-line ACS block alone samples more than 1/{acceleration:g} of the {ny} "
            f"{axis} lines (at most {n_total} lines allowed): lower --acs or the acceleration "
            f"(the highest net acceleration with {acs} ACS lines is {ny / max(acs, 1):.2f})")
    return n_total


def _outside(ny: int, acs: int) -> np.ndarray:
    """Indices of the lines outside the ACS block, in order."""
    keep = np.ones(ny, dtype=bool)
    keep[acs_slice(ny, acs)] = False
    return np.flatnonzero(keep)


def _cyclic_lattice(n: int, count: int, offset: float) -> np.ndarray:
    """``count`` distinct positions ``floor(offset + j * n / count) mod n`` on a ring of n."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    # Integer arithmetic, so that shifting the offset by 1 shifts every line by exactly 1:
    # floor(o + f + j n / c) = o + (floor(f c) + j n) // c for integer o and 0 <= f < 1.
    whole = math.floor(offset)
    part = math.floor((offset - whole) * count)
    j = np.arange(count, dtype=np.int64)
    return (whole + (part + j * n) // count) % n


def _lattice_period(n: int, count: int) -> int:
    """Largest cyclic gap of the lattice: the number of offsets whose union covers the ring."""
    if count <= 0:
        return 1
    base = np.sort(_cyclic_lattice(n, count, 0.0))
    gaps = np.diff(np.concatenate([base, [base[0] + n]]))
    return int(gaps.max())


def equispaced(ny: int, acceleration: float, acs: int = 0, *, offset: float = 0.0) -> np.ndarray:
    """Regular (lattice) phase-encoding mask plus a fully sampled centre, shape ``(ny,)``.

    The ACS block is sampled; the ``n = round(ny / R) - acs`` other lines form a
    lattice of spacing ``s = (ny - acs) / n`` over the lines outside the block,
    ``floor(offset + j * s)`` for ``j = 0 .. n-1`` (counted around the block, and
    wrapping around the edge of k-space), so the net acceleration is exactly
    ``ny / round(ny / R)``. ``s`` is an integer, i.e. the lattice is strictly
    regular, whenever the numbers allow it.
    """
    n_total = _check_line_request(ny, acceleration, acs)
    mask = np.zeros(ny, dtype=bool)
    mask[acs_slice(ny, acs)] = True
    if acceleration == 1.0:
        mask[:] = True
        return mask
    outside = _outside(ny, acs)
    mask[outside[_cyclic_lattice(outside.size, n_total - acs, float(offset))]] = True
    return mask


def _vd_weights(n: int, power: float) -> np.ndarray:
    """Variable-density weight (1 - |k| / (n/2 + 1)) ** power over an axis of length n."""
    k = np.abs(np.arange(n) - n // 2) / (n / 2 + 1.0)
    return np.clip(1.0 - k, 1e-6, None) ** power


def random_vd(ny: int, acceleration: float, acs: int, rng: Seed, *,
              power: float = 2.0) -> np.ndarray:
    """Variable-density random phase-encoding mask, shape ``(ny,)``.

    The ACS block is always sampled; the remaining ``round(ny / R) - acs`` lines are
    drawn without replacement from the other lines with weights
    ``(1 - |k| / (ny/2 + 1)) ** power`` (``power = 0`` gives uniform sampling), so the
    net acceleration is exactly ``ny / round(ny / R)``.
    """
    n_total = _check_line_request(ny, acceleration, acs)
    gen = _generator(rng)
    mask = np.zeros(ny, dtype=bool)
    mask[acs_slice(ny, acs)] = True
    need = n_total - int(mask.sum())
    if need > 0:
        free = np.flatnonzero(~mask)
        w = _vd_weights(ny, power)[free]
        pick = gen.choice(free, size=need, replace=False, p=w / w.sum())
        mask[pick] = True
    return mask


def _acs_box(ny: int, nz: int, acs: int) -> np.ndarray:
    box = np.zeros((nz, ny), dtype=bool)
    box[acs_slice(nz, min(acs, nz)), acs_slice(ny, acs)] = True
    return box


def _poisson_pass(order: np.ndarray, radius: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One dart-throwing pass: accept candidates in ``order`` not blocked by earlier ones.

    Each accepted point blocks the disc of its own radius (in index units) around it.
    Returns the flat indices of the accepted points.
    """
    nz, ny = shape
    blocked = np.zeros(shape, dtype=bool)
    flat = blocked.reshape(-1)
    accepted: list[int] = []
    for idx in order.tolist():
        if flat[idx]:
            continue
        accepted.append(idx)
        r = float(radius[idx])
        h = math.ceil(r) - 1
        if h < 1:
            continue
        iz, iy = divmod(idx, ny)
        z0, z1 = max(iz - h, 0), min(iz + h + 1, nz)
        y0, y1 = max(iy - h, 0), min(iy + h + 1, ny)
        dz = np.arange(z0, z1)[:, None] - iz
        dy = np.arange(y0, y1)[None, :] - iy
        blocked[z0:z1, y0:y1] |= dz * dz + dy * dy < r * r
    return np.asarray(accepted, dtype=np.int64)


def poisson_disc_2d(ny: int, nz: int, acceleration: float, acs: int, rng: Seed, *,
                    density: float = 2.0, rel_tol: float = 0.01,
                    max_passes: int = 40) -> np.ndarray:
    """Variable-density Poisson-disc mask over (kz, ky) for 3D Cartesian scans, shape ``(nz, ny)``.

    The ``min(acs, nz) x acs`` centre is fully sampled. Outside it, points are
    thrown in a random order and accepted when no earlier point lies within the
    minimum distance ``r(k) = s * (1 + density * rho)`` (index units), where
    ``rho in [0, 1]`` is the normalised distance to the k-space centre, so
    sampling thins out towards the edges while keeping Poisson-disc spacing (no
    clusters, no large holes). The scale ``s`` is found by bisection until the
    count is within ``rel_tol`` of ``round(ny * nz / R)``; the last few points are
    then added (with density weights) or removed at random so the count is exact.
    """
    n_total = _check_line_request(ny * nz, acceleration, 0, axis="(ky, kz)")
    if int(nz) != nz or nz < 1:
        raise ConfigError(f"kz size must be a positive integer, got {nz}")
    if int(acs) != acs or acs < 0:
        raise ConfigError(f"ACS width must be a non-negative integer, got {acs}")
    if acs > ny:
        raise ConfigError(f"ACS width {acs} exceeds the {ny} ky lines")
    gen = _generator(rng)
    box = _acs_box(ny, nz, acs)
    n_box = int(box.sum())
    if n_box > n_total:
        raise ConfigError(
            f"the {min(acs, nz)}x{acs} ACS block alone samples more than 1/{acceleration:g} "
            f"of the {nz}x{ny} (kz, ky) grid: lower --acs or the acceleration")
    if acceleration == 1.0:
        return np.ones((nz, ny), dtype=bool)

    kz = (np.arange(nz) - nz // 2) / max(nz / 2.0, 1.0)
    ky = (np.arange(ny) - ny // 2) / max(ny / 2.0, 1.0)
    rho = np.sqrt(kz[:, None] ** 2 + ky[None, :] ** 2) / math.sqrt(2.0)   # (nz, ny), in [0, 1]
    profile = (1.0 + density * rho).reshape(-1)
    candidates = np.flatnonzero(~box.reshape(-1))
    order = gen.permutation(candidates)
    target = n_total - n_box

    def throw(scale: float) -> np.ndarray:
        return _poisson_pass(order, scale * profile, (nz, ny)) if target > 0 else order[:0]

    # Every point is accepted while all radii are <= 1 (only the point itself is blocked).
    lo, hi = 1.0 / (1.0 + density), 1.0
    picked = throw(hi)
    while picked.size > target and hi < 4.0 * max(ny, nz):
        lo, hi = hi, 2.0 * hi
        picked = throw(hi)
    best = picked
    for _ in range(max_passes):
        if abs(best.size - target) <= rel_tol * max(target, 1):
            break
        mid = math.sqrt(lo * hi)
        picked = throw(mid)
        if abs(picked.size - target) < abs(best.size - target):
            best = picked
        if picked.size > target:
            lo = mid
        else:
            hi = mid

    flat = box.reshape(-1).copy()
    flat[best] = True
    surplus = best.size - target
    if surplus > 0:
        flat[gen.choice(best, size=surplus, replace=False)] = False
    elif surplus < 0:
        free = np.flatnonzero(~flat)
        w = 1.0 / profile[free] ** 2
        flat[gen.choice(free, size=-surplus, replace=False, p=w / w.sum())] = True
    return flat.reshape(nz, ny)


def time_interleaved(ny: int, nt: int, acceleration: float, acs: int = 0, *,
                     shift: int = 1, rng: Seed | None = None) -> np.ndarray:
    """Per-frame lattice masks whose offset moves from frame to frame, shape ``(nt, ny)``.

    Every frame samples the ACS block and the lattice of :func:`equispaced` (same
    spacing, so every frame has exactly the same net acceleration) with the
    integer offset ``o_t = (o_0 + t * shift) mod P``, where ``P`` is the largest gap
    between lattice lines. Any ``P`` consecutive frames together sample every
    line (the union fills k-space) when ``gcd(shift, P) = 1``. ``o_0`` is 0, or
    random when ``rng`` is given.
    """
    n_total = _check_line_request(ny, acceleration, acs)
    if int(nt) != nt or nt < 1:
        raise ConfigError(f"number of frames must be a positive integer, got {nt}")
    mask = np.zeros((nt, ny), dtype=bool)
    mask[:, acs_slice(ny, acs)] = True
    if acceleration == 1.0:
        mask[:] = True
        return mask
    outside = _outside(ny, acs)
    need = n_total - acs
    if need <= 0:
        return mask
    period = _lattice_period(outside.size, need)
    if int(shift) != shift or math.gcd(int(shift), period) != 1:
        raise ConfigError(f"the frame-to-frame shift {shift} must be an integer coprime with the "
                          f"lattice period {period}, or the frames never fill k-space")
    start = 0 if rng is None else int(_generator(rng).integers(period))
    for t in range(nt):
        o = float((start + t * int(shift)) % period)
        mask[t, outside[_cyclic_lattice(outside.size, need, o)]] = True
    return mask


def expand_mask(mask: np.ndarray, batch: int = 1) -> np.ndarray:
    """Broadcast a ``(Y,)`` or ``(D, Y)`` mask to the ``(B, 1, D, Y, 1)`` layout (a copy)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2:
        raise ConfigError(f"a mask to expand must be (Y,) or (D, Y), got shape {m.shape}")
    if int(batch) != batch or batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch}")
    return np.ascontiguousarray(np.broadcast_to(m[None, None, :, :, None],
                                                (batch, 1, *m.shape, 1)))


def realised_acceleration(mask: np.ndarray) -> float:
    """Net acceleration of a mask: positions / sampled positions."""
    m = np.asarray(mask, dtype=bool)
    return float(m.size / max(int(m.sum()), 1))


def _check_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(B, D, Y) from a ``(B, D, Y)`` shape or a five-axis mask / k-space shape."""
    if kind not in FAMILIES_FOR_KIND:
        raise ConfigError(f"unknown data kind {kind!r} (choose 2d, 3d or 2dt)")
    dims = tuple(shape)
    if len(dims) == 5:
        dims = (dims[0], dims[2], dims[3])
    if len(dims) != 3 or any(int(s) != s or s < 1 for s in dims):
        raise ConfigError("mask shape must be (B, D, Y) or a five-axis (B, 1|C, D, Y, 1|X) "
                          f"shape of positive integers, got {tuple(shape)}")
    b, d, y = (int(s) for s in dims)
    if kind == "2d" and d != 1:
        raise ConfigError(f"a 2d scan has D = 1, got mask shape {shape}")
    return b, d, y


def calibration_region(kind: str, shape: tuple[int, ...], acs: int) -> np.ndarray:
    """The fully sampled calibration region as a ``(B, 1, D, Y, 1)`` boolean array.

    ``shape`` is ``(B, D, Y)`` or a five-axis ``(B, 1|C, D, Y, 1|X)`` shape.

    ``2d``/``2dt``: the central ``acs`` ky lines of every slice and frame.
    ``3d``: the central ``min(acs, D) x acs`` (kz, ky) block.
    """
    b, d, y = _check_shape(kind, shape)
    if int(acs) != acs or not 0 <= acs <= y:
        raise ConfigError(f"ACS width must be an integer in [0, {y}], got {acs}")
    if kind == "3d":
        region = _acs_box(y, d, int(acs))
    else:
        region = np.zeros((d, y), dtype=bool)
        region[:, acs_slice(y, int(acs))] = True
    return expand_mask(region, b)


def make_mask(kind: str, family: str, shape: tuple[int, ...], acceleration: float,
              acs: int, rng: Seed) -> np.ndarray:
    """Sampling mask ``(B, 1, D, Y, 1)`` for a scan of ``kind``.

    ``shape`` is ``(B, D, Y)`` or a five-axis shape whose axes 0, 2, 3 are (B, D, Y)
    (the mask's own ``(B, 1, D, Y, 1)`` or the k-space's ``(B, C, D, Y, X)``).

    ==========  ====================================================================
    kind        families (first = default) and what they do
    ==========  ====================================================================
    2d          equispaced, random: one ky pattern shared by all B slices (as a
                multi-slice scan acquires them)
    3d          poisson: (kz, ky) variable-density Poisson disc; equispaced,
                random: a ky pattern repeated over every kz
    2dt         interleaved: lattice shifted frame by frame; equispaced: the same
                lattice every frame; random: a fresh random pattern per frame
    ==========  ====================================================================

    ``acceleration`` is the net R (ACS included); R = 1 gives a full mask for any family.
    """
    b, d, y = _check_shape(kind, shape)
    if family not in MASK_FAMILIES:
        raise ConfigError(f"unknown mask family {family!r} (choose from {', '.join(MASK_FAMILIES)})")
    allowed = FAMILIES_FOR_KIND[kind]
    if family not in allowed:
        raise ConfigError(f"mask family {family!r} does not apply to {kind} data "
                          f"(use one of {', '.join(allowed)})")
    gen = _generator(rng)
    if kind == "3d" and family == "poisson":
        pattern = poisson_disc_2d(y, d, acceleration, acs, gen)
    elif family == "equispaced":
        pattern = np.broadcast_to(equispaced(y, acceleration, acs), (d, y))
    elif family == "interleaved":
        pattern = time_interleaved(y, d, acceleration, acs, rng=gen)
    elif kind == "2dt":   # random: an independent draw per frame
        pattern = np.stack([random_vd(y, acceleration, acs, gen) for _ in range(d)])
    else:                 # random, shared by every slice (2d) or partition (3d)
        pattern = np.broadcast_to(random_vd(y, acceleration, acs, gen), (d, y))
    return expand_mask(pattern, b)


__all__ = [
    "FAMILIES_FOR_KIND", "MASK_FAMILIES", "MaskFamily", "acs_slice", "calibration_region",
    "equispaced", "expand_mask", "make_mask", "poisson_disc_2d", "random_vd",
    "realised_acceleration", "time_interleaved",
]
