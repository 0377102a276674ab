"""Encoding of the simulated object into raw k-space: the :func:`simulate` pipeline.

For each coil, ``k_c = crop(F(S_c m)) * sqrt(N_crop / N_fine)``: the centred
orthonormal FFT on the fine grid, cropped to the central (encoded) matrix
``Xenc x Y [x Z]`` with the readout oversampled ``oversampling`` times; the
factor keeps image intensities the same on both grids. Because the products
``S_c m`` are formed on the fine grid and only then truncated in k-space, a
reconstruction with the reconstruction-grid maps meets a small model mismatch,
as with a real object, never the exact operator that made the data.

Correlated complex Gaussian noise ``n = sigma L z`` with ``Psi = L L^H`` (see
:mod:`molrecon.sim.coils`) is added to every sample, ``sigma = noise *
p99(|truth|)``, and a noise scan of the same noise is drawn; the sampling mask
(:func:`molrecon.physics.masks.make_mask`) then zeroes the unsampled entries and
flags the ACS region as calibration data. The truth is the object low-passed by
the same k-space window, with the readout oversampling removed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from ..errors import ConfigError
from ..io.types import Geometry, ImageVolume, Kind, RawScan, ScanInfo
from ..physics.masks import calibration_region, make_mask
from .anatomy import anatomy_body
from .coils import _CoilArray, _normalised_maps
from .config import SimulationConfig
from .image import (
    _directions,
    _geometry,
    _Grid,
    _Item,
    _Motion,
    _object,
    _PhaseField,
    _PlacedAnatomy,
)

_CACHE_MAPS_POINTS = 2**24        # keep normalised fine-grid coil maps when C x N is below this
_NOISE_SCAN_SAMPLES = 4096


@dataclass(frozen=True)
class SimulatedScan:
    """A simulated acquisition, before it is written.

    ``kspace``: complex64 ``(B, C, D, Y, Xenc)`` on the encoded grid (readout
    oversampled, ``Xenc = X * oversampling``), zero where ``mask`` is False.
    ``mask``/``calib``: ``(B, 1, D, Y, 1)``. ``noise``: complex64 ``(C, N)`` noise-scan
    samples. ``noise_cov``: the true ``(C, C)`` covariance of the k-space noise
    (``sigma^2 Psi``). ``truth``: see :mod:`molrecon.sim`. ``maps``: complex64
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
        from ..io.ismrmrd import remove_readout_oversampling

        x = self.geometry.matrix[0]
        k = remove_readout_oversampling(self.kspace, x) * self.mask    # (B, C, D, Y, X)
        return RawScan(kspace=k.astype(np.complex64), mask=self.mask.copy(),
                       calib=self.calib.copy(), kind=self.kind, geometry=self.geometry,
                       info=replace(self.info, readout_oversampling=float(self.oversampling)),
                       source="simulation", noise_cov=self.noise_cov.copy(), whitened=False,
                       ground_truth=self.truth.data.copy())


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


def _encode(cfg: SimulationConfig, anat: _PlacedAnatomy, grid: _Grid, coils: _CoilArray,
            phase_field: _PhaseField, positions: np.ndarray, motion: _Motion | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise-free k-space ``(B, C, D, Y, Xenc)``, truth ``(B, D, Y, X)`` and coil maps
    ``(B, C, D, Y, X)``, complex64, of every slice, frame or slab."""
    n_b = positions.shape[0]
    n_d = cfg.grid[2] if cfg.kind == "3d" else cfg.n_frames
    x, y, _ = cfg.grid
    x_enc = x * grid.os
    kspace = np.empty((n_b, cfg.coils, n_d, y, x_enc), dtype=np.complex64)   # (B, C, D, Y, Xenc)
    truth = np.empty((n_b, n_d, y, x), dtype=np.complex64)                   # (B, D, Y, X)
    maps = np.empty((n_b, cfg.coils, n_d, y, x), dtype=np.complex64)        # (B, C, D, Y, X)

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
    return kspace, truth, maps


def _add_noise(kspace: np.ndarray, truth: np.ndarray, noise: float, n_noise_lines: int,
               psi: np.ndarray, gen: np.random.Generator) -> tuple[np.ndarray, float]:
    """Add correlated coil noise with covariance ``sigma^2 psi`` to every sample of ``kspace``
    (in place, independent of the mask); return the noise scan ``(C, N)`` and ``sigma``."""
    n_b, n_c, n_d, y, x_enc = kspace.shape
    ref = float(np.percentile(np.abs(truth), 99.0))
    sigma = float(noise) * (ref if ref > 0 else 1.0)
    chol = np.linalg.cholesky(psi)

    def draw(shape: tuple[int, ...]) -> np.ndarray:
        z = np.empty(shape, dtype=np.complex64)
        z.real = gen.standard_normal(shape, dtype=np.float32)
        z.imag = gen.standard_normal(shape, dtype=np.float32)
        lower = (chol * (sigma / math.sqrt(2.0))).astype(np.complex64)
        return np.tensordot(lower, z, axes=([1], [0]))                       # coil axis first

    noise_scan = draw((n_c, n_noise_lines * x_enc)).astype(np.complex64)   # (C, N)
    if sigma > 0:
        for b in range(n_b):
            kspace[b] += draw((n_c, n_d, y, x_enc)).astype(np.complex64)
    return noise_scan, sigma


def simulate(config: SimulationConfig) -> SimulatedScan:
    """Simulate one acquisition (see :mod:`molrecon.sim` for the model).

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
    coils = _CoilArray.random(cfg.coils, rngs["coils"], body=anatomy_body(cfg.anatomy))
    phase_field = _PhaseField.random(rngs["phase"])
    motion = None
    if cfg.kind == "2dt":
        axis = anat.landmarks.get("heart_axis")
        heart = None if axis is None else anat.lps_of_index(np.array([axis[0], axis[1], anat.centre[2]]))
        motion = _Motion.random(cfg, positions[0], read, phase_dir, slc, rngs["motion"], heart)
    kspace, truth, maps = _encode(cfg, anat, grid, coils, phase_field, positions, motion)

    # Correlated coil noise, drawn for every sample (independent of the mask).
    psi = coils.noise_covariance(rngs["cov"])
    x_enc = kspace.shape[-1]
    n_noise_lines = math.ceil(_NOISE_SCAN_SAMPLES / x_enc)
    noise_scan, sigma = _add_noise(kspace, truth, cfg.noise, n_noise_lines, psi, rngs["noise"])

    n_b, n_d, y = kspace.shape[0], kspace.shape[2], kspace.shape[3]
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


__all__ = ["SimulatedScan", "simulate"]
