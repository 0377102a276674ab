"""A procedural chest: the anatomy that cine-like 2D+time scans are simulated from.

No real chest volume can ship with molrecon, and the brain series of the other
sources move only by a gentle deformation. This volume gives the dynamic
simulator what cardiac cine shows: a bright blood pool inside a darker
myocardium, the right ventricle beside it, lungs, fat, muscle, spine, aorta,
atria and great vessels towards the base, liver and stomach below the heart.
The left ventricle's long axis runs along the volume's superior axis, so an
axial slice is a short-axis view: base to apex from top to bottom, the slabs of
the train / val / test split (:mod:`molrecon.sim.anatomy`) cutting it at
different levels. :data:`HEART_AXIS_MM` tells the motion model
(:mod:`molrecon.sim.image`) where the ventricle contracts.

Intensities follow a balanced-SSFP cine contrast (blood and fat bright,
myocardium, muscle and liver dark, lungs near zero). Edges are smooth over about
a voxel (no staircase), every tissue carries a smooth texture of a few per cent,
and the lungs hold a tree of thin vessels. The volume is the same on every
machine: it depends on nothing but fixed numbers and a fixed seed.
"""

from __future__ import annotations

import functools

import numpy as np

#: Voxel size of the generated volume (isotropic, mm).
VOXEL_MM = 1.25
#: Half extents of the volume along RAS x, y, z (mm): a box around the torso.
HALF_EXTENT_MM = (170.0, 120.0, 60.0)
#: RAS (x, y) in mm from the volume's centre of the left ventricle's long axis.
HEART_AXIS_MM = (-35.0, 10.0)
#: Semi-axes (x, y) of the body's outline in mm (the surface the receive coils sit on).
BODY_SEMI_AXES_MM = (155.0, 105.0)

# bSSFP-like tissue values before the volume's normalisation to [0, 1]
_BLOOD, _FAT, _MYO, _MUSCLE, _LIVER, _LUNG = 1.0, 0.8, 0.27, 0.24, 0.33, 0.04
_MARROW, _CSF, _CORD, _STOMACH, _VESSEL = 0.45, 0.9, 0.35, 0.55, 0.5


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS coordinates (mm) of the voxel centres, broadcastable (X,1,1), (1,Y,1), (1,1,Z)."""
    axes = [((np.arange(round(2 * h / VOXEL_MM)) + 0.5) * VOXEL_MM - h).astype(np.float32)
            for h in HALF_EXTENT_MM]
    return axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]


def _soft(distance: np.ndarray) -> np.ndarray:
    """Occupancy from a signed distance (mm, > 0 inside): a ramp one voxel wide."""
    return np.clip(0.5 + distance / VOXEL_MM, 0.0, 1.0).astype(np.float32)


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Soft occupancy of an ellipsoid (a radius of ``inf`` makes it a cylinder along z)."""
    r2 = sum(((c - c0) / r) ** 2 for c, c0, r in zip((x, y, z), centre, radii) if np.isfinite(r))
    return _soft((1.0 - np.sqrt(r2)) * min(r for r in radii if np.isfinite(r)))


def _paint(volume: np.ndarray, occupancy: np.ndarray, value: float) -> None:
    """Lay a tissue over what is there: ``volume ← (1 − occ) volume + occ value``."""
    volume += occupancy * (np.float32(value) - volume)


def _texture(shape: tuple[int, ...], rng: np.random.Generator, cells: int) -> np.ndarray:
    """A smooth random field of unit standard deviation (band-limited to ``cells`` periods)."""
    spectrum = np.zeros(shape, dtype=np.complex64)
    k = [np.fft.fftfreq(n) * n for n in shape]
    kk = np.sqrt(k[0][:, None, None] ** 2 + k[1][None, :, None] ** 2 + k[2][None, None, :] ** 2)
    low = kk <= cells
    spectrum[low] = (rng.standard_normal(int(low.sum())) + 1j * rng.standard_normal(int(low.sum())))
    field = np.fft.ifftn(spectrum).real
    return (field / max(float(field.std()), 1e-12)).astype(np.float32)


def _lung_vessels(volume: np.ndarray, lungs: np.ndarray, rng: np.random.Generator,
                  coords: tuple[np.ndarray, np.ndarray, np.ndarray], count: int = 70) -> None:
    """Thin bright tubes (1-3 mm across) through the lungs, each drawn in its bounding box."""
    x, y, z = (c.reshape(-1) for c in coords)
    for _ in range(count):
        a = np.array([rng.uniform(-120, 120), rng.uniform(-60, 70), rng.uniform(-60, 60)])
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        b = a + direction * rng.uniform(30, 90)
        radius = rng.uniform(0.8, 1.6)
        lo = np.minimum(a, b) - radius - 2 * VOXEL_MM
        hi = np.maximum(a, b) + radius + 2 * VOXEL_MM
        ix = np.flatnonzero((x >= lo[0]) & (x <= hi[0]))
        iy = np.flatnonzero((y >= lo[1]) & (y <= hi[1]))
        iz = np.flatnonzero((z >= lo[2]) & (z <= hi[2]))
        if not (ix.size and iy.size and iz.size):
            continue
        p = np.stack(np.meshgrid(x[ix], y[iy], z[iz], indexing="ij"), axis=-1)
        t = np.clip(((p - a) @ (b - a)) / float((b - a) @ (b - a)), 0.0, 1.0)
        dist = np.linalg.norm(p - (a + t[..., None] * (b - a)), axis=-1)
        box = np.ix_(ix, iy, iz)
        occ = _soft(radius - dist) * lungs[box]
        sub = volume[box]
        _paint(sub, occ, _VESSEL)
        volume[box] = sub


@functools.lru_cache(maxsize=1)
def torso_volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The chest volume ``(X, Y, Z)`` along RAS+ (float32, ≥ 0, blood ≈ 1) and its voxel (mm).

    Deterministic and cached; read-only.
    """
    x, y, z = _grid()
    shape = (x.shape[0], y.shape[1], z.shape[2])
    rng = np.random.default_rng(20261206)
    vol = np.zeros(shape, dtype=np.float32)
    ax, ay = BODY_SEMI_AXES_MM
    widen = 1.0 + 0.03 * z / HALF_EXTENT_MM[2]                 # the chest widens upwards a little
    inf = float("inf")

    def body_layer(inset: float) -> np.ndarray:
        """The body outline shrunk by ``inset`` mm: a rounded rectangle (superellipse)."""
        u = np.abs(x) / (ax * widen - inset)
        v = np.abs(y) / (ay - inset)
        rho = (u ** 2.6 + v ** 2.6) ** (1 / 2.6)
        return _soft((1.0 - rho) * (ay - inset))

    _paint(vol, body_layer(0.0), _FAT)                              # skin and subcutaneous fat
    _paint(vol, body_layer(13.0), _MUSCLE)                          # chest wall muscle
    cavity = body_layer(28.0)
    lungs = cavity.copy()
    _paint(vol, cavity, _LUNG)
    # The mediastinum and the back between the lungs: soft tissue around the spine.
    _paint(vol, _ellipsoid(x, y, z, (0.0, -50.0, 0.0), (34.0, 60.0, inf)) * cavity, _MUSCLE)
    _paint(vol, _ellipsoid(x, y, z, (0.0, -78.0, 0.0), (18.0, 16.0, inf)), _MARROW)   # vertebra
    _paint(vol, _ellipsoid(x, y, z, (0.0, -101.0, 0.0), (8.0, 8.0, inf)), _CSF)       # canal
    _paint(vol, _ellipsoid(x, y, z, (0.0, -101.0, 0.0), (4.5, 4.5, inf)), _CORD)
    for side in (-1.0, 1.0):                                        # back muscles
        _paint(vol, _ellipsoid(x, y, z, (side * 32.0, -88.0, 0.0), (24.0, 16.0, inf)), _MUSCLE)
    _paint(vol, _ellipsoid(x, y, z, (-22.0, -55.0, 0.0), (11.0, 11.0, inf)), _BLOOD)  # aorta

    hx, hy = HEART_AXIS_MM
    # Pericardial fat around the heart, then the right ventricle, then the left.
    _paint(vol, _ellipsoid(x, y, z, (hx + 20.0, hy + 8.0, -5.0), (58.0, 44.0, 62.0)), _FAT)
    _paint(vol, _ellipsoid(x, y, z, (hx + 20.0, hy + 8.0, -5.0), (55.0, 41.0, 59.0)), _MYO)
    _paint(vol, _ellipsoid(x, y, z, (hx + 38.0, hy + 16.0, -3.0), (38.0, 21.0, 50.0)), _BLOOD)
    _paint(vol, _ellipsoid(x, y, z, (hx, hy, -5.0), (33.0, 33.0, 58.0)), _MYO)
    _paint(vol, _ellipsoid(x, y, z, (hx, hy, -5.0), (23.0, 23.0, 50.0)), _BLOOD)
    for angle in (-2.2, -0.9):                                      # papillary muscles
        px, py = hx + 14.0 * np.cos(angle), hy + 14.0 * np.sin(angle)
        _paint(vol, _ellipsoid(x, y, z, (px, py, -18.0), (4.5, 4.5, 24.0)), _MYO)
    # Towards the base: the atria and the great vessels.
    _paint(vol, _ellipsoid(x, y, z, (hx + 10.0, hy - 32.0, 48.0), (27.0, 17.0, 22.0)), _BLOOD)
    _paint(vol, _ellipsoid(x, y, z, (hx + 62.0, hy - 8.0, 44.0), (22.0, 22.0, 20.0)), _BLOOD)
    aorta_root = _ellipsoid(x, y, z, (hx + 38.0, hy - 2.0, 0.0), (14.0, 14.0, inf))
    _paint(vol, aorta_root * _soft(z - 42.0), _BLOOD)
    trunk = _ellipsoid(x, y, z, (hx + 18.0, hy + 28.0, 0.0), (13.0, 13.0, inf))
    _paint(vol, trunk * _soft(z - 47.0), _BLOOD)
    # Below the heart: the liver dome on the right, the stomach on the left.
    _paint(vol, _ellipsoid(x, y, z, (55.0, 0.0, -78.0), (95.0, 80.0, 52.0)) * cavity, _LIVER)
    _paint(vol, _ellipsoid(x, y, z, (-75.0, 20.0, -75.0), (40.0, 35.0, 30.0)) * cavity, _STOMACH)

    lungs *= (vol < 0.1).astype(np.float32)                          # what is still lung
    _lung_vessels(vol, lungs, rng, (x, y, z))
    vol *= 1.0 + 0.04 * _texture(shape, rng, cells=12)
    vol = np.clip(vol, 0.0, None)
    vol.flags.writeable = False
    return vol, (VOXEL_MM, VOXEL_MM, VOXEL_MM)


def heart_axis_index() -> tuple[float, float]:
    """Voxel index (along RAS x, y) of the left ventricle's long axis in :func:`torso_volume`."""
    return tuple(float((c + h) / VOXEL_MM - 0.5)  # type: ignore[return-value]
                 for c, h in zip(HEART_AXIS_MM, HALF_EXTENT_MM[:2]))


# What molrecon.sim.anatomy asks of a generated source (its ``generator`` module).
def volume() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The source's volume and voxel: :func:`torso_volume`."""
    return torso_volume()


def landmarks() -> dict[str, tuple[float, ...]]:
    """Named voxel indices of the volume: ``heart_axis``, where the left ventricle contracts."""
    return {"heart_axis": heart_axis_index()}


__all__ = ["BODY_SEMI_AXES_MM", "HEART_AXIS_MM", "VOXEL_MM", "heart_axis_index", "landmarks",
           "torso_volume", "volume"]
