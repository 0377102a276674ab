"""What a simulation depends on: :class:`SimulationConfig` and the anatomy augmentation.

A config names the scan (kind, matrix, field of view, orientation and tilt,
slices or frames, coils, acceleration, ACS and mask family, noise, readout
oversampling, fine-grid factor, seed) and the anatomy it is simulated from
(source, slice position, :class:`AnatomyTransform`). Every value is checked when
the config is made (:class:`~molrecon.errors.ConfigError`); the same config,
seed included, gives the same data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..errors import ConfigError
from ..io.types import KINDS, Kind
from ..physics.masks import FAMILIES_FOR_KIND, MASK_FAMILIES
from .anatomy import anatomy_source

Orientation = Literal["axial", "coronal", "sagittal"]
ORIENTATIONS: tuple[str, ...] = ("axial", "coronal", "sagittal")

_DEFAULT_MATRIX: dict[str, tuple[int, ...]] = {"2d": (256, 256), "3d": (128, 128, 32),
                                               "2dt": (128, 128)}
_DEFAULT_FOV: dict[str, tuple[float, ...]] = {"2d": (240.0, 240.0), "3d": (240.0, 240.0, 64.0),
                                              "2dt": (240.0, 240.0)}
_MAX_FINE_POINTS = 2**27          # refuse fine grids above ~134 M points (memory)


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
    ``noise`` is relative (see :mod:`molrecon.sim`); ``oversampling`` is the
    readout oversampling written to the file; ``grid_factor`` the fine-grid
    refinement (1 would commit the inverse crime; allowed for experiments).
    ``slice_position`` in [0, 1] places the slice (stack, slab) along the slice
    direction across the head's extent (0 = its first voxel, 1 = its last).
    ``slices`` only for 2d (``None`` = 1), ``frames`` only for 2dt (``None`` = 16).
    Motion (2dt): peak translation ``motion_mm`` along the phase direction, peak
    fractional ``contraction`` of a region 45 mm across (of the left ventricle for
    the ``torso`` anatomy), one cycle per ``motion_period`` frames (``None`` = all
    frames).
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


__all__ = ["ORIENTATIONS", "AnatomyTransform", "Orientation", "SimulationConfig"]
