"""NIfTI-1 output of reconstructed images, with the scanner geometry in the affine.

Array layout (NIfTI index ``(i, j, k[, t])``):

* ``i`` = readout (X), ``j`` = phase encoding (Y);
* ``k`` = slice: the B slices of a multi-slice 2D scan, the D partitions of a 3D
  scan, a single plane for single-slice 2D;
* ``t`` = frame, for ``"2dt"`` (the D frames), with the frame time in ``pixdim[4]``
  (milliseconds, ``xyzt_units`` = mm + ms).

The affine maps voxel indices to RAS+ millimetres (NIfTI's world frame). The
scanner frame is LPS, so ``RAS = diag(-1, -1, 1) · LPS``. Voxel ``(i, j)`` lies at
``position + (i − X//2)·Δx·read_dir + (j − Y//2)·Δy·phase_dir``: with the k-space
centre at index ``n // 2``, the centred inverse FFT puts the image centre (the
slice position of the ISMRMRD header) on pixel ``n // 2``, for odd and even n.
For 3D, ``k`` adds ``(k − D//2)·Δz·slice_dir`` about the slab centre. For
multi-slice 2D the step along ``k`` is ``(position[B−1] − position[0]) / (B − 1)``
(so it follows the slices whatever their order), or ``slice_spacing·slice_dir``
when the positions coincide. Voxel sizes are FOV / matrix. Both qform and sform
are set (code 1, scanner).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import atomic_path
from ..errors import ConfigError, GeometryWarning, InputDataError, OutputError
from .types import Geometry, ImageVolume, Kind

__all__ = ["LPS_TO_RAS", "nifti_affine", "nifti_array", "read_nifti", "write_nifti"]

#: Sign flip from the scanner's LPS frame to NIfTI's RAS frame (homogeneous 4×4).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_affine(geometry: Geometry, kind: Kind, shape: tuple[int, ...]) -> np.ndarray:
    """4×4 affine from NIfTI voxel indices ``(i, j, k)`` to RAS mm (see module docstring).

    ``shape`` is the image shape ``(B, D, Y, X)``; voxel sizes are taken as the
    geometry's FOV divided by these matrix sizes.
    """
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, D, Y, X), got {shape}")
    b_n, d_n, y_n, x_n = (int(s) for s in shape)
    read = np.asarray(geometry.read_dir, dtype=np.float64)
    phase = np.asarray(geometry.phase_dir, dtype=np.float64)
    normal = np.asarray(geometry.slice_dir, dtype=np.float64)
    positions = np.asarray(geometry.position, dtype=np.float64).reshape(-1, 3)  # (B, 3)
    dx = geometry.fov_mm[0] / x_n
    dy = geometry.fov_mm[1] / y_n
    origin = positions[0] - (x_n // 2) * dx * read - (y_n // 2) * dy * phase
    if kind == "3d":
        if b_n != 1:
            raise ConfigError(f"a 3D image with {b_n} slabs cannot be written as one NIfTI "
                              "volume; write each slab separately")
        k_step = normal * (geometry.fov_mm[2] / d_n)
        origin = origin - (d_n // 2) * k_step
    elif b_n > 1:
        if positions.shape[0] != b_n:
            raise ValueError(f"geometry has {positions.shape[0]} slice positions for {b_n} slices")
        k_step = (positions[-1] - positions[0]) / (b_n - 1)
        step_len = float(np.linalg.norm(k_step))
        if step_len < 1e-6:
            k_step = normal * geometry.slice_spacing_mm
        else:
            expected = positions[0] + np.arange(b_n)[:, None] * k_step
            deviation = float(np.linalg.norm(positions - expected, axis=1).max())
            if deviation > 0.01 * step_len + 1e-3:
                warnings.warn(f"slice positions are not evenly spaced (off by up to "
                              f"{deviation:.2f} mm); the NIfTI affine assumes even spacing",
                              GeometryWarning, stacklevel=2)
    else:
        k_step = normal * geometry.slice_spacing_mm
    lps = np.eye(4)
    lps[:3, 0] = read * dx
    lps[:3, 1] = phase * dy
    lps[:3, 2] = k_step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def nifti_array(data: np.ndarray, kind: Kind) -> np.ndarray:
    """Reorder an image ``(B, D, Y, X)`` into NIfTI order ``(X, Y, K[, T])``."""
    if data.ndim != 4:
        raise ValueError(f"image must be (B, D, Y, X), got {data.shape}")
    if kind == "3d":
        return np.transpose(data[0], (2, 1, 0))  # (X, Y, D)
    if kind == "2dt":
        return np.transpose(data, (3, 2, 0, 1))  # (X, Y, B, T)
    if data.shape[1] != 1:
        raise ValueError(f"a 2d image has D = 1, got {data.shape}")
    return np.transpose(data[:, 0], (2, 1, 0))  # (X, Y, B)


def write_nifti(image: ImageVolume, path: str | os.PathLike[str], *,
                complex_output: bool = False, force: bool = False) -> Path:
    """Write ``image`` as NIfTI-1 (``.nii`` or ``.nii.gz``), atomically.

    float32 magnitude by default, complex64 with ``complex_output``. An existing
    file is only replaced with ``force``.
    """
    import nibabel as nib

    target = Path(path)
    if not (target.name.endswith(".nii") or target.name.endswith(".nii.gz")):
        raise OutputError("a NIfTI output must end in .nii or .nii.gz", path=target)
    if image.kind == "3d" and image.data.shape[0] != 1:
        raise ConfigError(f"a 3D image with {image.data.shape[0]} slabs cannot be written as one "
                          "NIfTI volume; write each slab separately", path=target)
    if complex_output:
        values = np.asarray(image.data).astype(np.complex64)
    else:
        values = image.magnitude()
    arr = np.ascontiguousarray(nifti_array(values, image.kind))
    affine = nifti_affine(image.geometry, image.kind, image.data.shape)
    img = nib.Nifti1Image(arr, affine)
    img.set_sform(affine, code="scanner")
    img.set_qform(affine, code="scanner")
    hdr = img.header
    if image.kind == "2dt":
        frame_ms = image.geometry.frame_time_ms
        zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
        hdr.set_zooms(zooms + (float(frame_ms) if frame_ms else 1.0,))
        hdr.set_xyzt_units("mm", "msec" if frame_ms else "unknown")
    else:
        hdr.set_xyzt_units("mm")
    method = f" {image.method}" if image.method else ""
    hdr["descrip"] = f"molrecon {__version__}{method}".encode("ascii", "replace")[:79]
    with atomic_path(target, force=force) as tmp:
        nib.save(img, str(tmp))
    return target


def read_nifti(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` of a NIfTI file; data as stored (scaled if the header says so)."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise InputDataError("no such file" if not p.exists() else "is not a file", path=p)
    try:
        img = nib.load(str(p))
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise TypeError("not an image with a voxel-to-world affine")
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
        raise InputDataError(f"cannot read as NIfTI ({type(exc).__name__}: {exc})",
                             path=p) from None
    return data, affine
