"""The image from anatomy: where the scan sits, and the object ``m(r)`` it sees.

The anatomy is placed in the patient frame (LPS, mm) with the centre of the
head's bounding box at the isocentre, rotated or flipped by the config's
:class:`~molrecon.sim.config.AnatomyTransform`, and sampled trilinearly on the
*fine grid* around each slice, slab or frame; a 2D slice averages several planes
across its thickness (boxcar slice profile). The magnitude is multiplied by a
smooth random phase, and a 2D+time scan is deformed frame by frame by a
breathing-like translation along the phase direction and a smooth radial
contraction of a region (for the procedural torso, of its left ventricle). Also here: the directions of each orientation, the
reconstruction :class:`~molrecon.io.types.Geometry` and the fine and
reconstruction grids that the coils and the encoding (:mod:`molrecon.sim.kspace`)
are computed on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..io.types import Geometry
from .anatomy import anatomy_extent, anatomy_landmarks, load_anatomy
from .config import AnatomyTransform, SimulationConfig

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]   # LPS x, y, z (mm) of a set of points

#: (read_dir, phase_dir) in LPS for each orientation; slice_dir = read x phase.
_DIRECTIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),      # slice towards S
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),    # slice towards A
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),   # slice towards L
}


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
        self.landmarks = anatomy_landmarks(name)

    def lps_of_index(self, idx: np.ndarray) -> np.ndarray:
        """LPS position (mm) of the fractional voxel index ``idx`` (3,): :meth:`sample`'s inverse."""
        sx = 1.0 if self.transform.flip_lr else -1.0
        q = (np.asarray(idx, dtype=np.float64) - self.centre) * self.voxel * np.array([sx, -1.0, 1.0])
        return self._rot.T @ q

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
class _Motion:
    """Backward deformation of frame t: the content shown at r comes from q(r)."""

    translation_mm: float
    contraction: float
    centre: np.ndarray        # (3,) LPS, in the slice plane
    radius_mm: float
    phase_dir: np.ndarray
    normal: np.ndarray
    period: float

    @staticmethod
    def random(cfg: SimulationConfig, centre: np.ndarray, read: np.ndarray,
               phase_dir: np.ndarray, normal: np.ndarray, rng: np.random.Generator,
               heart: np.ndarray | None = None) -> _Motion:
        """The motion of a 2dt scan of ``cfg`` through the slice centred at ``centre``: the
        contracting region sits within 25 mm of it (along read and phase); with ``heart``
        (an LPS point on the left ventricle's long axis) it is the ventricle, 35 mm in
        radius, centred within 3 mm of where the axis crosses the slice."""
        period = float(cfg.motion_period if cfg.motion_period is not None else cfg.n_frames)
        if heart is not None:
            offset = rng.uniform(-3.0, 3.0, size=2)
            on_plane = heart - float((heart - centre) @ normal) * normal
            return _Motion(translation_mm=float(cfg.motion_mm), contraction=float(cfg.contraction),
                           centre=on_plane + offset[0] * read + offset[1] * phase_dir,
                           radius_mm=35.0, phase_dir=phase_dir, normal=normal, period=period)
        offset = rng.uniform(-25.0, 25.0, size=2)
        return _Motion(
            translation_mm=float(cfg.motion_mm), contraction=float(cfg.contraction),
            centre=centre + offset[0] * read + offset[1] * phase_dir, radius_mm=45.0,
            phase_dir=phase_dir, normal=normal, period=period)

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
