"""Realistic raw multicoil Cartesian k-space simulated from real anatomy.

The pipeline runs the scanner backwards, and is built so that a reconstruction
cannot succeed merely because the simulation used its own model ("no inverse
crime"):

1. **Object.** The magnitude anatomy (:mod:`molrecon.anatomy`, 1 mm or finer)
   is resampled trilinearly on a *fine grid* ``grid_factor`` (default 2) times
   finer than the reconstruction grid, over the *encoded* field of view: the
   readout covers ``oversampling`` (default 2) times the reconstruction FOV, as
   a scanner's oversampled readout does, so the object sits in the middle of a
   wider readout FOV. A 2D slice averages several planes across the slice
   thickness (partial volume, boxcar slice profile). The magnitude is
   optionally warped (gamma, monotone curve) and multiplied by a smooth random
   phase ``exp(i phi(r))`` (constant + linear + quadratic terms + a few long
   wavelength cosines, evaluated in patient coordinates): ``m(r)``.
2. **Coils.** Receive sensitivities are Biot-Savart fields of straight wire
   segments parallel to the patient's head-foot axis, placed on a cylinder of
   random radius (115-150 mm), rotation and slight off-centring, one ring for
   up to 8 coils and two rings above that. A segment from ``z1`` to ``z2`` at
   transverse distance ``rho`` has field magnitude
   ``[(z2 - z)/sqrt(rho^2 + (z2 - z)^2) - (z1 - z)/sqrt(rho^2 + (z1 - z)^2)] / rho``
   and a transverse phase that turns with the angle around the wire, times a
   random complex gain per coil. The maps are normalised pointwise,
   ``S_c <- S_c / sqrt(sum_c |S_c|^2)``, so ``sum_c |S_c|^2 = 1`` everywhere:
   the receive bias field is left out of the simulation (equivalently, it is
   part of the object), and a SENSE/ESPIRiT reconstruction targets ``m`` itself.
3. **k-space.** For each coil, ``k_c = crop(F(S_c m)) * sqrt(N_crop / N_fine)``:
   the centred orthonormal FFT on the fine grid, cropped to the central
   (encoded) matrix ``Xenc x Y [x Z]``; the factor keeps image intensities the
   same on both grids. The products ``S_c m`` are formed on the fine grid and
   then truncated in k-space, so the data are not "coil maps on the
   reconstruction grid times a discrete image": a reconstruction using the
   reconstruction-grid maps ``maps`` meets a small model mismatch, as with a
   real object, and never the exact operator that made the data.
4. **Noise.** Correlated complex Gaussian noise ``n = sigma L z`` with
   ``Psi = L L^H`` is added to every k-space sample. ``Psi`` has unit mean
   diagonal, random coil gains (0.7-1.3) and off-diagonal correlations that
   fall with the distance between coils (about 0.1-0.25 between neighbours).
   ``sigma = noise * p99(|truth|)``: ``noise`` is the inverse of the SNR of
   bright tissue in the coil-combined image. A noise scan of ``C x N`` samples
   of the same noise is written too. Unsampled entries are then zeroed.
5. **Sampling.** :func:`molrecon.physics.masks.make_mask`; the ACS region is
   flagged as calibration data.

The **truth** is defined as the image of the fully sampled, noise-free,
coil-combined data on the reconstruction grid::

    truth = crop_x( F^-1( crop(F(m)) * sqrt(N_crop / N_fine) ) )

i.e. the fine object low-pass filtered by exactly the k-space window that was
acquired, with the readout oversampling removed: complex, ``(B, D, Y, X)``, the
same kind, shape and :class:`~molrecon.io.types.Geometry` as a reconstruction
of the file, in the units of an orthonormal-FFT reconstruction of the
un-whitened data (``|truth|`` is about 1 in bright tissue). Because
``sum_c |S_c|^2 = 1``, the SENSE combination ``sum_c conj(S_c) k_c`` and the
root-sum-of-squares of the fully sampled coil images equal it up to the
smoothing of the coil maps by the same window (normalised correlation > 0.99).

Kinds: ``2d`` (one slice, or a stack of ``slices`` with a gap), ``3d`` (one slab,
partitions on D, a (ky, kz) Poisson-disc mask by default) and ``2dt`` (one slice
over ``frames`` with periodic motion: a breathing-like translation along the
phase direction plus a smooth radial contraction of a region, and
time-interleaved masks by default).

Geometry is in the patient frame (LPS, mm) with the centre of the head's
bounding box at the isocentre (0, 0, 0); orientations axial (default, read =
L, phase = P, slice = S, as for a head-first supine axial scan), coronal,
sagittal, each optionally tilted about the readout axis. The voxel ``i`` of an
axis of ``n`` voxels lies at ``(i - n // 2) * voxel`` from ``position``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from .anatomy import (
    SPLITS,
    AnatomySubject,
    anatomy_extent,
    anatomy_source,
    anatomy_subjects,
    load_anatomy,
)
from .atomic import atomic_path, check_output, write_text_atomic
from .errors import ConfigError, OutputError
from .io.types import KINDS, Geometry, ImageVolume, Kind, RawScan, ScanInfo
from .physics.masks import FAMILIES_FOR_KIND, MASK_FAMILIES, calibration_region, make_mask

Orientation = Literal["axial", "coronal", "sagittal"]
Coords = tuple[np.ndarray, np.ndarray, np.ndarray]   # LPS x, y, z (mm) of a set of points
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")

#: (read_dir, phase_dir) in LPS for each orientation; slice_dir = read x phase.
_DIRECTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),      # slice towards S
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),    # slice towards A
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),   # slice towards L
}

_DEFAULT_MATRIX: dict[str, tuple[int, ...]] = {"2d": (256, 256), "3d": (128, 128, 32),
                                               "2dt": (128, 128)}
_DEFAULT_FOV: dict[str, tuple[float, ...]] = {"2d": (240.0, 240.0), "3d": (240.0, 240.0, 64.0),
                                              "2dt": (240.0, 240.0)}
_MAX_FINE_POINTS = 2**27          # refuse fine grids above ~134 M points (memory)
_CACHE_MAPS_POINTS = 2**24        # keep normalised fine-grid coil maps when C x N is below this
_NOISE_SCAN_SAMPLES = 4096


# =========================================================================== configuration

@dataclass(frozen=True)
class AnatomyTransform:
    """Augmentation of the anatomy before it is sampled.

    ``rotation_deg`` rotates the anatomy about the slice normal through the
    isocentre (in-plane, so a slice never leaves its slab); ``flip_lr`` mirrors
    left and right; the magnitude ``a in [0, 1]`` becomes
    ``interp(a ** gamma, linspace(0, 1, len(curve)), curve)`` with ``curve`` a
    non-decreasing list of values in [0, 1] (``()`` = identity).
    """

    rotation_deg: float = 0.0
    flip_lr: bool = False
    gamma: float = 1.0
    curve: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(f"gamma must be positive, got {self.gamma}")
        if not math.isfinite(self.rotation_deg):
            raise ConfigError(f"rotation must be finite, got {self.rotation_deg}")
        c = np.asarray(self.curve, dtype=np.float64)
        if c.size and (c.size < 2 or np.any(np.diff(c) < 0) or c.min() < 0 or c.max() > 1):
            raise ConfigError("an intensity curve needs >= 2 non-decreasing values in [0, 1]")

    @staticmethod
    def random(rng: np.random.Generator, *, max_rotation_deg: float = 12.0) -> AnatomyTransform:
        """A random augmentation: flip half the time, rotation, gamma in [0.75, 1.35], curve."""
        steps = rng.uniform(0.5, 1.5, size=5)
        curve = np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])
        return AnatomyTransform(
            rotation_deg=float(rng.uniform(-max_rotation_deg, max_rotation_deg)),
            flip_lr=bool(rng.random() < 0.5),
            gamma=float(np.exp(rng.uniform(np.log(0.75), np.log(1.35)))),
            curve=tuple(float(v) for v in curve),
        )

    def warp(self, magnitude: np.ndarray) -> np.ndarray:
        out = magnitude if self.gamma == 1.0 else np.power(magnitude, self.gamma)
        if self.curve:
            out = np.interp(out, np.linspace(0.0, 1.0, len(self.curve)), self.curve)
        return out


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a simulation depends on; the same config and seed give the same data.

    ``matrix`` and ``fov_mm`` are (x = readout, y = phase[, z = partitions]) of the
    *reconstruction* grid (``None``: 256x256 / 240 mm for 2d, 128x128 for 2dt,
    128x128x32 over 240x240x64 mm for 3d). ``acs=None`` picks about 8 % of the
    phase lines (at least 8; see :attr:`acs_lines`); ``mask=None`` the kind's default family
    (2d equispaced, 3d poisson, 2dt interleaved). ``acceleration`` is the net R.
    ``noise`` is relative (see the module docstring); ``oversampling`` is the
    readout oversampling written to the file; ``grid_factor`` the fine-grid
    refinement (1 would commit the inverse crime; allowed for experiments).
    ``slice_position`` in [0, 1] places the slice (stack, slab) along the slice
    direction across the head's extent (0 = its first voxel, 1 = its last).
    ``slices`` only for 2d (``None`` = 1), ``frames`` only for 2dt (``None`` = 16).
    Motion (2dt): peak translation ``motion_mm`` along the phase direction, peak
    fractional ``contraction`` of a region 45 mm across, one cycle per
    ``motion_period`` frames (``None`` = all frames).
    """

    kind: Kind = "2d"
    matrix: tuple[int, ...] | None = None
    fov_mm: tuple[float, ...] | None = None
    coils: int = 8
    acceleration: float = 4.0
    acs: int | None = None
    mask: str | None = None
    noise: float = 0.01
    oversampling: int = 2
    grid_factor: int = 2
    seed: int = 0
    anatomy: str = "colin27"
    slice_position: float = 0.55
    slices: int | None = None
    slice_thickness_mm: float = 3.0
    slice_gap: float = 0.2
    frames: int | None = None
    frame_time_ms: float = 40.0
    motion_mm: float = 5.0
    contraction: float = 0.15
    motion_period: float | None = None
    orientation: Orientation = "axial"
    tilt_deg: float = 0.0
    transform: AnatomyTransform = field(default_factory=AnatomyTransform)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r} (choose 2d, 3d or 2dt)")
        n_axes = 3 if self.kind == "3d" else 2
        if self.matrix is not None and (
                len(self.matrix) != n_axes
                or any(int(m) != m or not 4 <= m <= 2048 for m in self.matrix)):
            raise ConfigError(f"a {self.kind} matrix needs {n_axes} sizes in [4, 2048], "
                              f"got {self.matrix}")
        if self.fov_mm is not None and (
                len(self.fov_mm) != n_axes
                or any(not (math.isfinite(f) and f > 0) for f in self.fov_mm)):
            raise ConfigError(f"a {self.kind} field of view needs {n_axes} positive sizes "
                              f"in mm, got {self.fov_mm}")
        if int(self.coils) != self.coils or not 1 <= self.coils <= 64:
            raise ConfigError(f"coils must be an integer in [1, 64], got {self.coils}")
        if not (math.isfinite(self.acceleration) and self.acceleration >= 1.0):
            raise ConfigError(f"acceleration must be >= 1, got {self.acceleration}")
        if self.acs is not None and (int(self.acs) != self.acs or self.acs < 0):
            raise ConfigError(f"ACS width must be a non-negative integer, got {self.acs}")
        if self.acs is not None and self.acs > self.grid[1]:
            raise ConfigError(f"ACS width {self.acs} exceeds the {self.grid[1]} phase lines")
        if self.mask is not None:
            if self.mask not in MASK_FAMILIES:
                raise ConfigError(f"unknown mask family {self.mask!r} "
                                  f"(choose from {', '.join(MASK_FAMILIES)})")
            if self.mask not in FAMILIES_FOR_KIND[self.kind]:
                raise ConfigError(f"mask family {self.mask!r} does not apply to {self.kind} data "
                                  f"(use one of {', '.join(FAMILIES_FOR_KIND[self.kind])})")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise ConfigError(f"noise must be >= 0, got {self.noise}")
        if int(self.oversampling) != self.oversampling or not 1 <= self.oversampling <= 4:
            raise ConfigError(f"readout oversampling must be 1, 2, 3 or 4, got {self.oversampling}")
        if int(self.grid_factor) != self.grid_factor or not 1 <= self.grid_factor <= 4:
            raise ConfigError(f"grid factor must be an integer in [1, 4], got {self.grid_factor}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}")
        anatomy_source(self.anatomy)
        if not 0.0 <= self.slice_position <= 1.0:
            raise ConfigError(f"slice position must be in [0, 1], got {self.slice_position}")
        if self.slices is not None:
            if int(self.slices) != self.slices or not 1 <= self.slices <= 256:
                raise ConfigError(f"slices must be an integer in [1, 256], got {self.slices}")
            if self.kind != "2d" and self.slices != 1:
                raise ConfigError(f"several slices are for 2d scans, not {self.kind}")
        if self.frames is not None:
            if int(self.frames) != self.frames or not 1 <= self.frames <= 1024:
                raise ConfigError(f"frames must be an integer in [1, 1024], got {self.frames}")
            if self.kind != "2dt" and self.frames != 1:
                raise ConfigError(f"frames are for 2dt scans, not {self.kind}")
        if not (math.isfinite(self.slice_thickness_mm) and self.slice_thickness_mm > 0):
            raise ConfigError(f"slice thickness must be positive, got {self.slice_thickness_mm}")
        if not (math.isfinite(self.slice_gap) and self.slice_gap >= 0):
            raise ConfigError(f"slice gap must be >= 0, got {self.slice_gap}")
        if not (math.isfinite(self.frame_time_ms) and self.frame_time_ms > 0):
            raise ConfigError(f"frame time must be positive, got {self.frame_time_ms}")
        if not (math.isfinite(self.motion_mm) and abs(self.motion_mm) <= 50):
            raise ConfigError(f"motion must be within 50 mm, got {self.motion_mm}")
        if not (math.isfinite(self.contraction) and 0 <= self.contraction <= 0.5):
            raise ConfigError(f"contraction must be in [0, 0.5], got {self.contraction}")
        if self.motion_period is not None and not (math.isfinite(self.motion_period)
                                                   and self.motion_period > 0):
            raise ConfigError(f"motion period must be positive, got {self.motion_period}")
        if self.orientation not in ORIENTATIONS:
            raise ConfigError(f"unknown orientation {self.orientation!r} "
                              f"(choose {', '.join(ORIENTATIONS)})")
        if not (math.isfinite(self.tilt_deg) and abs(self.tilt_deg) < 90):
            raise ConfigError(f"tilt must be within (-90, 90) degrees, got {self.tilt_deg}")
        if not isinstance(self.transform, AnatomyTransform):
            raise ConfigError("transform must be an AnatomyTransform")
        fine = self.grid_factor ** (3 if self.kind == "3d" else 2) * self.oversampling
        fine *= int(np.prod(self.grid)) * (self.n_frames if self.kind == "2dt" else 1)
        if fine > _MAX_FINE_POINTS:
            raise ConfigError(f"the simulation grid would hold {fine:,} points; reduce the "
                              "matrix, frames, oversampling or grid factor")

    # ---- resolved values -------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int, int]:
        """Reconstruction matrix (X, Y, Z); Z = 1 for 2d and 2dt."""
        m = self.matrix if self.matrix is not None else _DEFAULT_MATRIX[self.kind]
        return (int(m[0]), int(m[1]), int(m[2]) if self.kind == "3d" else 1)

    @property
    def field_of_view(self) -> tuple[float, float, float]:
        """Reconstruction FOV (x, y, z) in mm; z is the slice thickness for 2d and 2dt."""
        f = self.fov_mm if self.fov_mm is not None else _DEFAULT_FOV[self.kind]
        z = float(f[2]) if self.kind == "3d" else float(self.slice_thickness_mm)
        return (float(f[0]), float(f[1]), z)

    @property
    def acs_lines(self) -> int:
        """The ACS width: ``acs``, or about 8 % of the phase lines (at least 8), capped so
        that the calibration region takes at most half of the sampled positions."""
        if self.acs is not None:
            return int(self.acs)
        _, y, z = self.grid
        acs = min(y, max(8, 2 * round(0.04 * y)))
        if self.kind == "3d":
            budget = round(y * z / self.acceleration)
            while acs > 2 and acs * min(acs, z) > budget // 2:
                acs -= 1
        else:
            acs = min(acs, max(2, round(y / self.acceleration) // 2))
        return acs

    @property
    def mask_family(self) -> str:
        return self.mask if self.mask is not None else FAMILIES_FOR_KIND[self.kind][0]

    @property
    def n_slices(self) -> int:
        return int(self.slices) if self.slices is not None else 1

    @property
    def n_frames(self) -> int:
        if self.kind != "2dt":
            return 1
        return int(self.frames) if self.frames is not None else 16

    @property
    def slice_spacing_mm(self) -> float:
        return float(self.slice_thickness_mm * (1.0 + self.slice_gap))


# =========================================================================== results

@dataclass(frozen=True)
class SimulatedScan:
    """A simulated acquisition, before it is written.

    ``kspace``: complex64 ``(B, C, D, Y, Xenc)`` on the encoded grid (readout
    oversampled, ``Xenc = X * oversampling``), zero where ``mask`` is False.
    ``mask``/``calib``: ``(B, 1, D, Y, 1)``. ``noise``: complex64 ``(C, N)`` noise-scan
    samples. ``noise_cov``: the true ``(C, C)`` covariance of the k-space noise
    (``sigma^2 Psi``). ``truth``: see the module docstring. ``maps``: complex64
    ``(B, C, D, Y, X)``, the normalised coil sensitivities at the reconstruction
    voxel centres.
    """

    kspace: np.ndarray
    mask: np.ndarray
    calib: np.ndarray
    noise: np.ndarray
    noise_cov: np.ndarray
    truth: ImageVolume
    maps: np.ndarray
    config: SimulationConfig
    info: ScanInfo
    oversampling: int

    @property
    def kind(self) -> Kind:
        return self.truth.kind

    @property
    def geometry(self) -> Geometry:
        return self.truth.geometry

    @property
    def acceleration(self) -> float:
        return float(self.mask.size / max(int(self.mask.sum()), 1))

    def raw(self) -> RawScan:
        """The scan as :func:`molrecon.io.detect.read_raw` would return it, un-whitened.

        Readout oversampling removed (orthonormal FFTs: image values and noise
        variance unchanged); ``ground_truth`` is the truth image.
        """
        from .io.ismrmrd import remove_readout_oversampling

        x = self.geometry.matrix[0]
        k = remove_readout_oversampling(self.kspace, x) * self.mask    # (B, C, D, Y, X)
        return RawScan(kspace=k.astype(np.complex64), mask=self.mask.copy(),
                       calib=self.calib.copy(), kind=self.kind, geometry=self.geometry,
                       info=replace(self.info, readout_oversampling=float(self.oversampling)),
                       source="simulation", noise_cov=self.noise_cov.copy(), whitened=False,
                       ground_truth=self.truth.data.copy())


# =========================================================================== models

def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix about unit ``axis`` by ``angle_rad`` (right hand)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def _directions(orientation: str, tilt_deg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    read, phase = (np.asarray(v, dtype=np.float64) for v in _DIRECTIONS[orientation])
    slc = np.cross(read, phase)
    t = math.radians(tilt_deg)
    phase, slc = (math.cos(t) * phase + math.sin(t) * slc,
                  -math.sin(t) * phase + math.cos(t) * slc)
    return read, phase, slc


class _PlacedAnatomy:
    """The anatomy placed in the patient frame: head bounding-box centre at LPS (0, 0, 0)."""

    def __init__(self, name: str, transform: AnatomyTransform, normal: np.ndarray) -> None:
        self.volume, voxel = load_anatomy(name)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        lo, hi = (np.asarray(v) for v in anatomy_extent(name))
        self.centre = (lo + hi) / 2.0                                 # voxel index of isocentre
        self.half_ras = (hi - lo) / 2.0 * self.voxel                 # half extent, RAS mm
        self.transform = transform
        # Backward map: the anatomy appears rotated by +angle about the slice normal.
        self._rot = _rotation(normal, -math.radians(transform.rotation_deg))
        self.planar = self.volume.shape[2] == 1

    def extent_along(self, direction: np.ndarray) -> tuple[float, float]:
        """(min, max) of the head's bounding box projected on an LPS ``direction`` (mm)."""
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        corners_ras = signs * self.half_ras                           # (8, 3)
        corners_lps = corners_ras * np.array([-1.0, -1.0, 1.0])
        proj = corners_lps @ direction
        return float(proj.min()), float(proj.max())

    def sample(self, points: Coords) -> np.ndarray:
        """Magnitude (warped) at LPS ``points`` (mm); 0 outside the volume."""
        rot = [[float(v) for v in row] for row in self._rot]
        x, y, z = (rot[i][0] * points[0] + rot[i][1] * points[1] + rot[i][2] * points[2]
                   for i in range(3))
        # LPS -> RAS flips x and y; a left-right flip undoes the x flip.
        sx = 1.0 if self.transform.flip_lr else -1.0
        c, v = [float(u) for u in self.centre], [float(u) for u in self.voxel]
        idx = (c[0] + (sx / v[0]) * x, c[1] - (1.0 / v[1]) * y, c[2] + (1.0 / v[2]) * z)
        return self.transform.warp(_trilinear(self.volume, idx))


def _trilinear(volume: np.ndarray, idx: Coords) -> np.ndarray:
    """Trilinear interpolation of ``volume`` (X, Y, Z) at fractional indices ``idx`` (3 arrays).

    Points more than half a voxel outside the volume are 0. An axis of length 1
    is extended as a constant (planar sources do not vary through the plane).
    """
    shape = volume.shape
    out_shape = np.broadcast_shapes(*(np.shape(u) for u in idx))
    dtype = np.result_type(volume.dtype, *idx)
    strides = (shape[1] * shape[2], shape[2], 1)
    inside = np.ones(out_shape, dtype=bool)
    base = np.zeros(out_shape, dtype=np.int64)
    corners: list[list[tuple[int, np.ndarray | float]]] = []          # per axis: (offset, weight)
    for ax in range(3):
        n = shape[ax]
        if n == 1:
            corners.append([(0, 1.0)])
            continue
        u = idx[ax]
        inside &= (u >= -0.5) & (u <= n - 0.5)
        u = np.clip(u, 0.0, n - 1.0)
        i0 = np.minimum(u.astype(np.int64), n - 2)                  # u >= 0: truncation = floor
        frac = u - i0.astype(u.dtype)
        base += i0 * strides[ax]
        corners.append([(0, 1.0 - frac), (strides[ax], frac)])
    flat = volume.reshape(-1)
    result = np.zeros(out_shape, dtype=dtype)
    for ox, wx in corners[0]:
        for oy, wy in corners[1]:
            wxy = wx * wy
            for oz, wz in corners[2]:
                result += (wxy * wz) * flat[base + (ox + oy + oz)]
    result[~inside] = 0.0
    return result


@dataclass(frozen=True)
class _PhaseField:
    """phi(r) = c + a.r/L + r^T Q r / L^2 + sum_k b_k cos(w_k . r + s_k), L = 100 mm."""

    offset: float
    linear: np.ndarray
    quadratic: np.ndarray
    waves: np.ndarray
    amplitudes: np.ndarray
    shifts: np.ndarray

    @staticmethod
    def random(rng: np.random.Generator) -> _PhaseField:
        q = rng.normal(0.0, 0.4, size=(3, 3))
        directions = rng.normal(size=(3, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(80.0, 250.0, size=3)
        return _PhaseField(
            offset=float(rng.uniform(-math.pi, math.pi)),
            linear=rng.normal(0.0, 1.0, size=3),
            quadratic=(q + q.T) / 2.0,
            waves=directions * (2.0 * math.pi / wavelengths)[:, None],
            amplitudes=rng.normal(0.0, 0.4, size=3),
            shifts=rng.uniform(0.0, 2.0 * math.pi, size=3),
        )

    def __call__(self, points: Coords) -> np.ndarray:
        r = [p * 0.01 for p in points]
        lin = [float(v) for v in self.linear]
        phi = float(self.offset) + lin[0] * r[0] + lin[1] * r[1] + lin[2] * r[2]
        for i in range(3):
            for j in range(i, 3):
                phi = phi + float(self.quadratic[i, j] * (1.0 if i == j else 2.0)) * r[i] * r[j]
        for k in range(self.waves.shape[0]):
            w = [float(v) for v in self.waves[k]]
            arg = w[0] * points[0] + w[1] * points[1] + w[2] * points[2] + float(self.shifts[k])
            phi = phi + float(self.amplitudes[k]) * np.cos(arg)
        return phi


@dataclass(frozen=True)
class _CoilArray:
    """Straight wire segments parallel to the LPS z axis (see the module docstring)."""

    xy: np.ndarray        # (C, 2) transverse positions, mm
    z_ends: np.ndarray    # (C, 2) segment ends along z, mm
    gains: np.ndarray     # (C,) complex
    softening_mm: float = 5.0

    @staticmethod
    def random(n_coils: int, rng: np.random.Generator) -> _CoilArray:
        rings = 1 if n_coils <= 8 else 2
        per_ring = [n_coils // rings + (1 if r < n_coils % rings else 0) for r in range(rings)]
        radius = rng.uniform(115.0, 150.0)
        centre = np.clip(rng.normal(0.0, 5.0, size=2), -12.0, 12.0)
        z_mid = rng.uniform(-15.0, 15.0)
        rotation = rng.uniform(0.0, 2.0 * math.pi)
        length = 140.0 if rings == 1 else 80.0
        xy, z_ends = [], []
        for r, n in enumerate(per_ring):
            zc = z_mid if rings == 1 else z_mid + (r - 0.5) * 70.0
            for j in range(n):
                angle = rotation + 2.0 * math.pi * (j + 0.5 * r) / n + rng.normal(0.0, 0.05)
                xy.append(centre + radius * np.array([math.cos(angle), math.sin(angle)]))
                z_ends.append((zc - length / 2.0, zc + length / 2.0))
        gains = rng.uniform(0.8, 1.25, size=n_coils) * np.exp(
            1j * rng.uniform(-math.pi, math.pi, size=n_coils))
        return _CoilArray(np.asarray(xy), np.asarray(z_ends), gains)

    @property
    def n_coils(self) -> int:
        return int(self.xy.shape[0])

    def raw(self, c: int, points: Coords) -> np.ndarray:
        """Unnormalised complex sensitivity of coil ``c`` at LPS ``points``.

        Complex64 for float32 coordinates, complex128 for float64 ones.
        """
        dx = points[0] - float(self.xy[c, 0])
        dy = points[1] - float(self.xy[c, 1])
        rho2 = dx * dx + dy * dy + self.softening_mm ** 2
        a2 = float(self.z_ends[c, 1]) - points[2]
        a1 = float(self.z_ends[c, 0]) - points[2]
        # |B| of the segment over rho, times 100 mm to keep numbers near 1.
        weight = (a2 / np.sqrt(rho2 + a2 * a2) - a1 / np.sqrt(rho2 + a1 * a1)) * (100.0 / rho2)
        out = np.empty(np.shape(weight), dtype=np.result_type(weight.dtype, np.complex64))
        g = complex(self.gains[c]) * 1j
        out.real = (g.real * dx - g.imag * dy) * weight    # g * (dx + i dy) * weight
        out.imag = (g.real * dy + g.imag * dx) * weight
        return out

    def noise_covariance(self, rng: np.random.Generator) -> np.ndarray:
        """Psi (C, C): Gaussian-kernel correlations of the coil positions, random gains/phases."""
        n = self.n_coils
        pos = np.concatenate([self.xy, self.z_ends.mean(axis=1, keepdims=True)], axis=1)
        if n == 1:
            return np.ones((1, 1), dtype=np.complex128)
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        nearest = np.sort(d, axis=1)[:, 1].mean()
        kernel = np.exp(-(d ** 2) / (2.0 * (0.9 * nearest) ** 2))
        mix = rng.uniform(0.25, 0.4)
        corr = (1.0 - mix) * np.eye(n) + mix * kernel
        u = np.exp(1j * rng.uniform(-math.pi, math.pi, size=n))
        corr = corr * np.outer(u, u.conj())
        g = np.sqrt(rng.uniform(0.7, 1.3, size=n))
        psi = corr * np.outer(g, g)
        return psi / np.real(np.trace(psi)) * n


@dataclass(frozen=True)
class _Motion:
    """Backward deformation of frame t: the content shown at r comes from q(r)."""

    translation_mm: float
    contraction: float
    centre: np.ndarray        # (3,) LPS, in the slice plane
    radius_mm: float
    phase_dir: np.ndarray
    normal: np.ndarray
    period: float

    def state(self, t: int) -> float:
        return 0.5 * (1.0 - math.cos(2.0 * math.pi * t / self.period))

    def source_points(self, points: Coords, t: int) -> Coords:
        s = self.state(t)
        if s == 0.0:
            return points
        n = [float(v) for v in self.normal]
        d = [points[i] - float(self.centre[i]) for i in range(3)]
        along = d[0] * n[0] + d[1] * n[1] + d[2] * n[2]
        d = [d[i] - along * n[i] for i in range(3)]                      # in-plane part
        w = np.exp((d[0] ** 2 + d[1] ** 2 + d[2] ** 2) * (-1.0 / self.radius_mm ** 2))
        pull = (self.contraction * s) * w
        shift = [float(self.translation_mm * s * v) for v in self.phase_dir]
        return tuple(points[i] + pull * d[i] - shift[i]  # type: ignore[return-value]
                     for i in range(3))


# =========================================================================== grids

@dataclass(frozen=True)
class _Item:
    """One transform unit: a 2D slice / frame (Z = 1) or the 3D slab."""

    centre: np.ndarray    # (3,) LPS
    frame: int = 0


class _Grid:
    """Fine and reconstruction grids of one simulation (axes ordered z, y, x)."""

    def __init__(self, cfg: SimulationConfig, read: np.ndarray, phase: np.ndarray,
                 slc: np.ndarray, planar: bool, anat_voxel_mm: float) -> None:
        self.kind = cfg.kind
        self.read, self.phase, self.slc = read, phase, slc
        x, y, z = cfg.grid
        fx, fy, fz = cfg.field_of_view
        self.recon = (z, y, x)
        self.voxel = (fz / z, fy / y, fx / x)                          # (dz, dy, dx)
        self.os = int(cfg.oversampling)
        f = int(cfg.grid_factor)
        self.encoded = (z, y, x * self.os)
        self.fine = ((z * f) if cfg.kind == "3d" else 1, y * f, x * self.os * f)
        self.fine_step = (self.voxel[0] / f, self.voxel[1] / f, self.voxel[2] / f)
        if cfg.kind == "3d" or planar:
            self.profile = np.zeros(1)
        else:  # boxcar slice profile sampled finer than the anatomy's voxels
            n = max(3, math.ceil(2.0 * cfg.slice_thickness_mm / anat_voxel_mm))
            n += 1 - n % 2
            self.profile = ((np.arange(n) + 0.5) / n - 0.5) * cfg.slice_thickness_mm

    @staticmethod
    def _axis(n: int, step: float) -> np.ndarray:
        return ((np.arange(n) - n // 2) * step).astype(np.float32)

    def points(self, centre: np.ndarray, shape: tuple[int, int, int],
               step: tuple[float, float, float], z_rows: slice | None = None) -> Coords:
        """LPS coordinates (x, y, z), each (nz, ny, nx) float32, of a grid centred on ``centre``.

        float32 resolves 0.1 um over a metre, ample for sampling and the
        smooth coil and phase models, at half the memory traffic.
        """
        uz = self._axis(shape[0], step[0])
        if z_rows is not None:
            uz = uz[z_rows]
        uz = uz[:, None, None]
        uy = self._axis(shape[1], step[1])[None, :, None]
        ux = self._axis(shape[2], step[2])[None, None, :]
        c = [float(v) for v in centre]
        sl, ph, rd = ([float(v) for v in d] for d in (self.slc, self.phase, self.read))
        return tuple((c[i] + uz * sl[i]) + (uy * ph[i] + ux * rd[i])
                     for i in range(3))  # type: ignore[return-value]

    def fine_chunks(self, centre: np.ndarray,
                    max_points: int = 2**21) -> Iterator[tuple[slice, Coords]]:
        """Fine-grid points in slabs of z rows (bounded memory)."""
        nz, ny, nx = self.fine
        rows = max(1, max_points // (ny * nx))
        for z0 in range(0, nz, rows):
            sl = slice(z0, min(nz, z0 + rows))
            yield sl, self.points(centre, self.fine, self.fine_step, sl)

    def crop_scale(self) -> float:
        """sqrt(N_crop / N_fine) over the transformed axes (keeps image intensities)."""
        enc = np.prod(self.encoded[1:]) * (self.encoded[0] if self.kind == "3d" else 1)
        fine = np.prod(self.fine[1:]) * (self.fine[0] if self.kind == "3d" else 1)
        return float(math.sqrt(enc / fine))

    @property
    def axes(self) -> tuple[int, ...]:
        return (-3, -2, -1) if self.kind == "3d" else (-2, -1)


def _fftc(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x, axes=axes), axes=axes, norm="ortho"),
                           axes=axes)


def _ifftc(k: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"),
                           axes=axes)


def _centre_crop(x: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """Central crop of ``x`` to ``shape`` (same ndim) along ``axes``; DC at n // 2 stays central."""
    index: list[slice] = [slice(None)] * x.ndim
    for ax in axes:
        n, big = shape[ax], x.shape[ax]
        lo = big // 2 - n // 2
        index[ax] = slice(lo, lo + n)
    return x[tuple(index)]


# =========================================================================== simulation

def _geometry(cfg: SimulationConfig, anat: _PlacedAnatomy, read: np.ndarray, phase: np.ndarray,
              slc: np.ndarray) -> tuple[Geometry, np.ndarray]:
    """Reconstruction geometry and the LPS centres of the B batch items."""
    lo, hi = anat.extent_along(slc)
    centre_s = lo + cfg.slice_position * (hi - lo)
    n_b = cfg.n_slices if cfg.kind == "2d" else 1
    spacing = cfg.slice_spacing_mm if cfg.kind != "3d" else cfg.field_of_view[2] / cfg.grid[2]
    offsets = (np.arange(n_b) - (n_b - 1) / 2.0) * (spacing if cfg.kind != "3d" else 0.0)
    positions = (centre_s + offsets)[:, None] * slc[None, :]       # (B, 3)
    if cfg.kind != "3d" and n_b == 1:
        spacing = cfg.slice_thickness_mm    # what a reader infers for a single slice
    x, y, z = cfg.grid

    def as_stored(v: np.ndarray) -> np.ndarray:
        """ISMRMRD stores positions and directions as float32: use exactly those values."""
        return v.astype(np.float32).astype(np.float64)

    geometry = Geometry(
        fov_mm=cfg.field_of_view,
        matrix=(x, y, z),
        position=as_stored(positions),
        read_dir=as_stored(read),
        phase_dir=as_stored(phase),
        slice_dir=as_stored(slc),
        slice_spacing_mm=float(spacing),
        frame_time_ms=float(cfg.frame_time_ms) if cfg.kind == "2dt" else None,
        orientation_known=True,
    )
    return geometry, positions


def _normalised_maps(coils: _CoilArray, points: Coords) -> np.ndarray:
    """(C, ...) coil maps with sum_c |S_c|^2 = 1 at every point."""
    raw = np.stack([coils.raw(c, points) for c in range(coils.n_coils)])
    return raw / np.sqrt(np.sum(np.abs(raw) ** 2, axis=0))


def _object(anat: _PlacedAnatomy, grid: _Grid, phase: _PhaseField, item: _Item,
            motion: _Motion | None) -> np.ndarray:
    """Complex object m on the fine grid, (nz, ny, nx) complex64."""
    nz, ny, nx = grid.fine
    obj = np.zeros((nz, ny, nx), dtype=np.complex64)
    for rows, pts in grid.fine_chunks(item.centre):
        mag = np.zeros(pts[0].shape, dtype=np.float32)
        for dz in grid.profile:
            shift = [float(dz * v) for v in grid.slc]
            sub: Coords = tuple(pts[i] + shift[i] for i in range(3))  # type: ignore[assignment]
            if motion is not None:
                sub = motion.source_points(sub, item.frame)
            mag += anat.sample(sub)
        mag *= 1.0 / grid.profile.size
        obj[rows] = mag * np.exp(1j * phase(pts))
    return obj


def _coil_kspace(obj: np.ndarray, coils: _CoilArray, grid: _Grid, item: _Item,
                 cached: np.ndarray | None) -> np.ndarray:
    """Encoded k-space of every coil, (C, Z, Y, Xenc) complex64 (no noise)."""
    n_c = coils.n_coils
    enc = grid.encoded if grid.kind == "3d" else (1, *grid.encoded[1:])
    out = np.empty((n_c, *enc), dtype=np.complex64)
    scale = grid.crop_scale()
    if cached is None:   # stream coil by coil: norm first, then each normalised map
        norm2 = np.zeros(obj.shape, dtype=np.float32)
        for c in range(n_c):
            for rows, pts in grid.fine_chunks(item.centre):
                norm2[rows] += np.abs(coils.raw(c, pts)) ** 2
        inv = 1.0 / np.sqrt(norm2)
        del norm2
    for c in range(n_c):
        if cached is not None:
            image = cached[c] * obj
        else:
            image = np.empty_like(obj)
            for rows, pts in grid.fine_chunks(item.centre):
                image[rows] = coils.raw(c, pts) * inv[rows] * obj[rows]
        out[c] = _centre_crop(_fftc(image, grid.axes), enc, grid.axes) * np.float32(scale)
    return out


def _truth_image(obj: np.ndarray, grid: _Grid) -> np.ndarray:
    """The object low-passed by the acquired k-space window, on the recon grid (Z, Y, X)."""
    enc = grid.encoded if grid.kind == "3d" else (1, *grid.encoded[1:])
    k = _centre_crop(_fftc(obj, grid.axes), enc, grid.axes) * np.float32(grid.crop_scale())
    image = _ifftc(k, grid.axes)                                     # (Z, Y, Xenc)
    x = grid.recon[2]
    lo = grid.encoded[2] // 2 - x // 2
    return image[..., lo:lo + x]


def _seeds(seed: int) -> dict[str, np.random.Generator]:
    """Independent streams, so that changing e.g. the mask does not change the noise."""
    names = ("coils", "phase", "noise", "mask", "motion", "cov")
    children = np.random.SeedSequence(int(seed)).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, children)}


def simulate(config: SimulationConfig) -> SimulatedScan:
    """Simulate one acquisition (see the module docstring for the model).

    Deterministic: the same config (seed included) gives bit-identical arrays.
    Coils, phase, noise, mask and motion draw from separate random streams, so
    changing e.g. the acceleration leaves the coils and the noise as they were.
    Raises :class:`ConfigError` for requests the anatomy or mask cannot meet and
    :class:`InputDataError` when the anatomy is not installed.
    """
    cfg = config
    read, phase_dir, slc = _directions(cfg.orientation, cfg.tilt_deg)
    anat = _PlacedAnatomy(cfg.anatomy, cfg.transform, slc)
    if anat.planar:
        if cfg.kind == "3d":
            raise ConfigError(f"anatomy {cfg.anatomy!r} is a single image: it cannot make 3d data")
        if cfg.orientation != "axial" or cfg.tilt_deg != 0:
            raise ConfigError(f"anatomy {cfg.anatomy!r} is a single image: use the axial "
                              "orientation without tilt (the image is the slice plane)")
    rngs = _seeds(cfg.seed)
    geometry, positions = _geometry(cfg, anat, read, phase_dir, slc)
    read, phase_dir, slc = geometry.read_dir, geometry.phase_dir, geometry.slice_dir
    positions = geometry.position
    grid = _Grid(cfg, read, phase_dir, slc, anat.planar, float(anat.voxel.min()))
    coils = _CoilArray.random(cfg.coils, rngs["coils"])
    phase_field = _PhaseField.random(rngs["phase"])

    n_b = positions.shape[0]
    n_d = cfg.grid[2] if cfg.kind == "3d" else cfg.n_frames
    x, y, _ = cfg.grid
    x_enc = x * grid.os
    kspace = np.empty((n_b, cfg.coils, n_d, y, x_enc), dtype=np.complex64)   # (B, C, D, Y, Xenc)
    truth = np.empty((n_b, n_d, y, x), dtype=np.complex64)                   # (B, D, Y, X)
    maps = np.empty((n_b, cfg.coils, n_d, y, x), dtype=np.complex64)        # (B, C, D, Y, X)

    motion = None
    if cfg.kind == "2dt":
        offset = rngs["motion"].uniform(-25.0, 25.0, size=2)
        motion = _Motion(
            translation_mm=float(cfg.motion_mm), contraction=float(cfg.contraction),
            centre=positions[0] + offset[0] * read + offset[1] * phase_dir, radius_mm=45.0,
            phase_dir=phase_dir, normal=slc,
            period=float(cfg.motion_period if cfg.motion_period is not None else cfg.n_frames))

    n_fine = int(np.prod(grid.fine))
    for b in range(n_b):
        cached = None
        if cfg.coils * n_fine <= _CACHE_MAPS_POINTS:
            pts = grid.points(positions[b], grid.fine, grid.fine_step)
            cached = _normalised_maps(coils, pts).astype(np.complex64)      # (C, z, y, x)
            del pts
        recon_pts = grid.points(positions[b], grid.recon, grid.voxel)       # (Z, Y, X, 3)
        recon_maps = _normalised_maps(coils, recon_pts).astype(np.complex64)   # (C, Z, Y, X)
        for t in range(cfg.n_frames if cfg.kind == "2dt" else 1):
            item = _Item(centre=positions[b], frame=t)
            obj = _object(anat, grid, phase_field, item, motion)
            k = _coil_kspace(obj, coils, grid, item, cached)                 # (C, Z, Y, Xenc)
            image = _truth_image(obj, grid)                                  # (Z, Y, X)
            if cfg.kind == "3d":
                kspace[b] = k
                truth[b] = image
                maps[b] = recon_maps
            else:
                kspace[b, :, t] = k[:, 0]
                truth[b, t] = image[0]
                maps[b, :, t] = recon_maps[:, 0]

    # Correlated coil noise, drawn for every sample (independent of the mask).
    psi = coils.noise_covariance(rngs["cov"])
    ref = float(np.percentile(np.abs(truth), 99.0))
    sigma = float(cfg.noise) * (ref if ref > 0 else 1.0)
    chol = np.linalg.cholesky(psi)
    gen = rngs["noise"]

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        z = np.empty(shape, dtype=np.complex64)
        z.real = gen.standard_normal(shape, dtype=np.float32)
        z.imag = gen.standard_normal(shape, dtype=np.float32)
        lower = (chol * (sigma / math.sqrt(2.0))).astype(np.complex64)
        return np.tensordot(lower, z, axes=([1], [0]))                       # coil axis first

    n_noise_lines = math.ceil(_NOISE_SCAN_SAMPLES / x_enc)
    noise_scan = draw((cfg.coils, n_noise_lines * x_enc)).astype(np.complex64)   # (C, N)
    if sigma > 0:
        for b in range(n_b):
            kspace[b] += draw((cfg.coils, n_d, y, x_enc)).astype(np.complex64)

    mask = make_mask(cfg.kind, cfg.mask_family, (n_b, n_d, y), cfg.acceleration,
                     cfg.acs_lines, rngs["mask"])                           # (B, 1, D, Y, 1)
    calib = calibration_region(cfg.kind, (n_b, n_d, y), cfg.acs_lines) & mask
    kspace *= mask

    info = ScanInfo(
        format="ismrmrd", vendor="molrecon", model="simulation", field_strength_t=3.0,
        protocol=f"simulated {cfg.kind} from {cfg.anatomy} (seed {cfg.seed})",
        encoded_matrix=(x_enc, y, cfg.grid[2]),
        encoded_fov_mm=(cfg.field_of_view[0] * grid.os, cfg.field_of_view[1],
                        cfg.field_of_view[2]),
        readout_oversampling=float(grid.os), n_acquisitions=int(mask.sum()),
        n_noise_acquisitions=n_noise_lines)
    volume = ImageVolume(data=truth, kind=cfg.kind, geometry=geometry, method="truth")
    return SimulatedScan(kspace=kspace, mask=mask, calib=calib, noise=noise_scan,
                         noise_cov=(sigma ** 2) * psi, truth=volume, maps=maps, config=cfg,
                         info=info, oversampling=grid.os)


# =========================================================================== files

def simulate_to_file(config: SimulationConfig, out_h5: str | os.PathLike[str],
                     truth_path: str | os.PathLike[str] | None = None, *, force: bool = False,
                     complex_truth: bool = False) -> SimulatedScan:
    """Simulate and write an ISMRMRD file (and the truth as NIfTI), all or nothing.

    Both outputs are checked before any work, written to temporary files beside
    their targets and renamed at the end; an existing output is replaced only
    with ``force``. The truth NIfTI holds ``|truth|`` (or the complex image with
    ``complex_truth``) on the reconstruction grid, with the scan's geometry.
    """
    out = check_output(out_h5, force=force)
    truth_target = None
    if truth_path is not None:
        if not str(truth_path).endswith((".nii", ".nii.gz")):
            raise OutputError("the truth image must end in .nii or .nii.gz", path=truth_path)
        truth_target = check_output(truth_path, force=force)
        if truth_target.resolve() == out.resolve():
            raise OutputError("the truth image and the raw file must be different files",
                              path=truth_target)
    scan = simulate(config)
    _write_scan(scan, out, truth_target, force=force, complex_truth=complex_truth)
    return scan


def _write_scan(scan: SimulatedScan, out: Path, truth_target: Path | None, *, force: bool,
                complex_truth: bool) -> None:
    from .io.ismrmrd import write_ismrmrd

    with atomic_path(out, force=force) as tmp_h5:
        write_ismrmrd(tmp_h5, scan.kspace, scan.mask, kind=scan.kind, geometry=scan.geometry,
                      calib=scan.calib, noise=scan.noise, oversampling=scan.oversampling,
                      info=scan.info, force=True)
        if truth_target is not None:
            from .io.nifti import write_nifti

            with atomic_path(truth_target, force=force) as tmp_nii:
                write_nifti(scan.truth, tmp_nii, complex_output=complex_truth, force=True)


@dataclass(frozen=True)
class DatasetEntry:
    """What one file of a simulated dataset holds (also written to the manifest)."""

    file: str
    truth: str | None
    split: str
    anatomy: str
    slice_position: float
    seed: int
    transform: AnatomyTransform


@dataclass(frozen=True)
class DatasetResult:
    entries: tuple[DatasetEntry, ...]
    manifest: Path


def _stack_extent_mm(cfg: SimulationConfig) -> float:
    """Extent along the slice axis that a file's slices (stack, slab) cover."""
    if cfg.kind == "3d":
        return cfg.field_of_view[2]
    return (cfg.n_slices - 1) * cfg.slice_spacing_mm + cfg.slice_thickness_mm


def _positions_for(subject: AnatomySubject, cfg: SimulationConfig
                   ) -> list[tuple[float, float]]:
    """The ranges of ``slice_position`` that keep the whole stack inside a slab."""
    if anatomy_source(subject.source).planar:
        return [(0.5, 0.5)] if cfg.kind != "3d" else []
    voxel = load_anatomy(subject.source)[1]
    lo, hi = anatomy_extent(subject.source)
    height = float((hi[2] - lo[2]) * voxel[2])
    half = 0.5 * _stack_extent_mm(cfg) / max(height, 1e-6)
    return [(a + half, b - half) for a, b in subject.slabs if b - a >= 2 * half]


def dataset_plan(config: SimulationConfig, count: int, split: str
                 ) -> list[tuple[SimulationConfig, AnatomySubject]]:
    """The per-file configs of a dataset: subject, slice position, augmentation and seed.

    Subjects of ``split`` that are installed here are drawn uniformly, a slab of
    the subject in proportion to its length, a slice position uniformly inside it
    (so that the stack or slab stays inside), and a fresh augmentation and seed.
    Slices stay axial (only in-plane rotations), so splits never overlap.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose train, val or test)")
    if int(count) != count or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count}")
    if config.orientation != "axial" or config.tilt_deg != 0:
        raise ConfigError("dataset mode keeps axial slices without tilt, so that the train, "
                          "val and test slabs stay disjoint")
    options: list[tuple[AnatomySubject, list[tuple[float, float]]]] = []
    for subject in anatomy_subjects(split, available_only=True):
        ranges = _positions_for(subject, config)
        if ranges:
            options.append((subject, ranges))
    if not options:
        raise ConfigError(f"no installed anatomy of the {split!r} split can hold a "
                          f"{_stack_extent_mm(config):.0f} mm {config.kind} stack; use fewer "
                          "or thinner slices (or a thinner 3d slab)")
    root = np.random.SeedSequence([int(config.seed), SPLITS.index(split)])
    plans = []
    for child in root.spawn(int(count)):
        rng = np.random.default_rng(child)
        subject, ranges = options[int(rng.integers(len(options)))]
        lengths = np.array([b - a for a, b in ranges]) + 1e-9
        a, b = ranges[int(rng.choice(len(ranges), p=lengths / lengths.sum()))]
        cfg = replace(config, anatomy=subject.source, slice_position=float(rng.uniform(a, b)),
                      seed=int(rng.integers(2**31 - 1)),
                      transform=AnatomyTransform.random(rng))
        plans.append((cfg, subject))
    return plans


def simulate_dataset(config: SimulationConfig, out_dir: str | os.PathLike[str], *, count: int,
                     split: str = "train", truth: bool = False, force: bool = False,
                     on_file: Callable[[int, Path], None] | None = None) -> DatasetResult:
    """Write ``count`` simulated files of ``split`` into ``out_dir`` plus a manifest.

    Files are ``{split}_{i:04d}.h5`` (and ``{split}_{i:04d}_truth.nii.gz`` with
    ``truth``); ``manifest_{split}.json`` records subject, slice position, seed and
    augmentation of each. The acceleration is the config's (the command line uses
    R = 1 here: training undersamples retrospectively). Every output name is
    checked before the first file is written; ``on_file(i, path)`` is called after
    each file.
    """
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError("exists and is not a folder", path=folder)
    plans = dataset_plan(config, count, split)
    names = [(folder / f"{split}_{i:04d}.h5",
              folder / f"{split}_{i:04d}_truth.nii.gz" if truth else None)
             for i in range(len(plans))]
    manifest = folder / f"manifest_{split}.json"
    if folder.is_dir():
        for h5, nii in names:
            check_output(h5, force=force)
            if nii is not None:
                check_output(nii, force=force)
        check_output(manifest, force=force)
    else:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder: {exc.strerror}", path=folder) from None
    entries = []
    for i, ((cfg, subject), (h5, nii)) in enumerate(zip(plans, names)):
        scan = simulate(cfg)
        _write_scan(scan, h5, nii, force=force, complex_truth=False)
        entries.append(DatasetEntry(file=h5.name, truth=None if nii is None else nii.name,
                                    split=split, anatomy=subject.source,
                                    slice_position=cfg.slice_position, seed=cfg.seed,
                                    transform=cfg.transform))
        if on_file is not None:
            on_file(i, h5)
    record = {
        "split": split,
        "kind": config.kind,
        "matrix": list(config.grid),
        "fov_mm": list(config.field_of_view),
        "coils": config.coils,
        "acceleration": config.acceleration,
        "mask": config.mask_family,
        "noise": config.noise,
        "files": [asdict(e) for e in entries],
    }
    write_text_atomic(manifest, json.dumps(record, indent=2) + "\n", force=force)
    return DatasetResult(entries=tuple(entries), manifest=manifest)


__all__ = [
    "ORIENTATIONS", "AnatomyTransform", "DatasetEntry", "DatasetResult", "SimulatedScan",
    "SimulationConfig", "dataset_plan", "simulate", "simulate_dataset", "simulate_to_file",
]


#: The matrices of :func:`simulated_example` (x, y[, z]; 2D+time: x, y and frames).
EXAMPLE_MATRIX = {("3d", False): (128, 128, 16), ("3d", True): (64, 64, 12),
                  ("2dt", False): (128, 128, 12), ("2dt", True): (64, 64, 8)}


def simulated_example(kind: str, folder: str | os.PathLike[str], *, quick: bool = False) -> Path:
    """A scan of ``kind`` to test a model on when the bundled (2D) example does not fit:
    simulated from the *validation* slab of the bundled anatomy, 8 coils, R = 4 with the
    kind's default mask, written as ISMRMRD into ``folder``. ``quick``: a coarser grid
    over the same field of view (:data:`EXAMPLE_MATRIX`), for checks that must take
    seconds on a CPU rather than minutes."""
    if quick and kind in ("3d", "2dt"):
        x, y, z = EXAMPLE_MATRIX[(kind, True)]
        if kind == "3d":
            cfg = SimulationConfig(kind="3d", matrix=(x, y, z), fov_mm=(240.0, 240.0, 20.0),
                                   coils=8, acceleration=4.0, acs=8, mask="poisson", noise=0.01,
                                   seed=4242, slice_position=0.60)
        else:
            cfg = SimulationConfig(kind="2dt", matrix=(x, y), frames=z, coils=8,
                                   acceleration=4.0, acs=8, mask="interleaved", noise=0.01,
                                   seed=4243, slice_position=0.60)
        path = Path(folder) / f"example_{kind}_quick.h5"
        simulate_to_file(cfg, path, force=True)
        return path
    if kind == "3d":
        cfg = SimulationConfig(kind="3d", matrix=(128, 128, 16), fov_mm=(240.0, 240.0, 20.0),
                               coils=8, acceleration=4.0, acs=12, mask="poisson", noise=0.01,
                               seed=4242, slice_position=0.60)
    elif kind == "2dt":
        cfg = SimulationConfig(kind="2dt", matrix=(128, 128), frames=12, coils=8,
                               acceleration=4.0, acs=8, mask="interleaved", noise=0.01,
                               seed=4243, slice_position=0.60)
    else:
        raise ConfigError(f"no simulated example for {kind!r} data (the bundled example is 2d)")
    path = Path(folder) / f"example_{kind}.h5"
    simulate_to_file(cfg, path, force=True)
    return path
