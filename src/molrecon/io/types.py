"""Typed records that flow from the readers to the reconstruction (numpy only).

Arrays follow the axis order of :mod:`molrecon.kinds`: k-space ``(B, C, D, Y, X)``,
images ``(B, D, Y, X)``, masks ``(B, 1, D, Y, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..kinds import KINDS, Kind


@dataclass(frozen=True)
class Geometry:
    """Where the reconstructed voxels lie, in the scanner's patient frame (LPS, mm).

    ``fov_mm`` and ``matrix`` are the *reconstruction* field of view and matrix in
    (x=readout, y=phase, z=slice/partition) order. ``position`` holds the centre of
    each batch item (slice) in LPS mm, shape (B, 3). Direction cosines are unit
    vectors in LPS. ``slice_spacing_mm`` is the centre-to-centre distance of the
    slices of a multi-slice scan (for 3D it equals the partition thickness).
    ``frame_time_ms`` is the time between frames of a 2D+time series.
    """

    fov_mm: tuple[float, float, float]
    matrix: tuple[int, int, int]
    position: np.ndarray
    read_dir: np.ndarray
    phase_dir: np.ndarray
    slice_dir: np.ndarray
    slice_spacing_mm: float
    frame_time_ms: float | None = None
    orientation_known: bool = True

    @property
    def voxel_mm(self) -> tuple[float, float, float]:
        fx, fy, fz = self.fov_mm
        mx, my, mz = self.matrix
        return (fx / mx, fy / my, fz / mz)

    @staticmethod
    def default(matrix: tuple[int, int, int], fov_mm: tuple[float, float, float] | None = None,
                n_batch: int = 1) -> Geometry:
        """Identity orientation, 1 mm voxels unless ``fov_mm`` is given."""
        fov = fov_mm if fov_mm is not None else tuple(float(m) for m in matrix)
        return Geometry(
            fov_mm=(float(fov[0]), float(fov[1]), float(fov[2])),
            matrix=matrix,
            position=np.zeros((n_batch, 3)),
            read_dir=np.array([1.0, 0.0, 0.0]),
            phase_dir=np.array([0.0, 1.0, 0.0]),
            slice_dir=np.array([0.0, 0.0, 1.0]),
            slice_spacing_mm=float(fov[2]) / max(matrix[2], 1),
            orientation_known=False,
        )


@dataclass(frozen=True)
class ScanInfo:
    """Descriptive facts from the header, for `info` and reports."""

    format: str                        # "ismrmrd" | "fastmri" | "twix" | "mrd2"
    vendor: str | None = None
    model: str | None = None
    field_strength_t: float | None = None
    protocol: str | None = None
    tr_ms: float | None = None
    te_ms: float | None = None
    encoded_matrix: tuple[int, int, int] | None = None
    encoded_fov_mm: tuple[float, float, float] | None = None
    readout_oversampling: float = 1.0
    partial_fourier: tuple[float, float] = (1.0, 1.0)   # fraction of (ky, kz) encoded
    averages: int = 1
    n_acquisitions: int = 0
    n_noise_acquisitions: int = 0
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawScan:
    """Sorted Cartesian multicoil k-space of one scan, ready for reconstruction.

    ``kspace`` is complex64 ``(B, C, D, Y, X)`` on the reconstruction grid
    (readout oversampling removed, asymmetric echoes / partial Fourier zero-filled
    into place, averages averaged). Entries that were not acquired are exactly 0
    and ``mask`` is False there. ``calib`` marks the lines flagged as (or found
    to be) the fully sampled calibration region. If ``noise_cov`` is given and
    ``whitened`` is True, the data were multiplied by the inverse Cholesky factor
    of ``noise_cov`` (coil noise becomes white with unit variance).
    """

    kspace: np.ndarray
    mask: np.ndarray
    calib: np.ndarray
    kind: Kind
    geometry: Geometry
    info: ScanInfo
    source: str = ""
    noise_cov: np.ndarray | None = None
    whitened: bool = False
    ground_truth: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kspace.ndim != 5:
            raise ValueError(f"kspace must be (B, C, D, Y, X), got shape {self.kspace.shape}")
        b, _, d, y, _ = self.kspace.shape
        if self.mask.shape != (b, 1, d, y, 1):
            raise ValueError(f"mask must be {(b, 1, d, y, 1)}, got {self.mask.shape}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return tuple(self.kspace.shape)  # type: ignore[return-value]

    @property
    def n_coils(self) -> int:
        return int(self.kspace.shape[1])

    @property
    def acceleration(self) -> float:
        """Nominal acceleration: phase-encoding positions / acquired positions."""
        return float(self.mask.size / max(int(self.mask.sum()), 1))

    def replace(self, **changes: object) -> RawScan:
        return replace(self, **changes)


@dataclass(frozen=True)
class ImageVolume:
    """A reconstructed image in the axis order ``(B, D, Y, X)`` plus its geometry.

    ``data`` is complex64 or float32, in the scanner's intensity units (any
    internal normalisation undone).
    """

    data: np.ndarray
    kind: Kind
    geometry: Geometry
    method: str = ""

    def magnitude(self) -> np.ndarray:
        return np.abs(self.data).astype(np.float32)
