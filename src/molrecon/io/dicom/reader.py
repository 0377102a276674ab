"""Reading a DICOM image series back: :func:`read_dicom_series`.

The series in a folder (single-frame images, any file order, non-DICOM files
skipped) becomes the NIfTI-ordered magnitude volume ``(X, Y, K[, T])`` and its
RAS affine, rebuilt from Image Orientation / Position (Patient) and Pixel
Spacing. For a series written by :func:`~molrecon.io.dicom.write_dicom` the
affine equals :func:`molrecon.io.nifti.nifti_affine` of the image (for a single
plane, whose stacking direction DICOM does not record, when ``slice_dir =
read_dir × phase_dir``, the right-handed case).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import GeometryWarning, InputDataError
from ..nifti import LPS_TO_RAS

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = ["read_dicom_series"]


def _floats(ds: Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise InputDataError(f"missing or malformed {keyword}", path=path)
    return arr


def _number(ds: Dataset, keyword: str, default: float) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def read_dicom_series(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(magnitude, affine)`` of the single-frame image series in ``folder``.

    Files may come in any order (and non-DICOM files are skipped). Planes are
    grouped by their location along the normal ``row_dir × col_dir`` and ordered
    along it so that the plane with the lowest Instance Number comes first; the
    images at one location are ordered by Temporal Position Identifier, Trigger
    Time, then Instance Number. ``magnitude`` is float32 in NIfTI order ``(X, Y, K)``,
    or ``(X, Y, K, T)`` when there are several images per location or the files carry
    temporal positions, with the rescale applied; ``affine`` maps ``(i, j, k)`` to RAS
    mm like :func:`molrecon.io.nifti.nifti_affine`.
    """
    root = Path(folder)
    datasets = _read_datasets(root)
    first_path, first = datasets[0]
    iop = _floats(first, "ImageOrientationPatient", 6, first_path)
    spacing = _floats(first, "PixelSpacing", 2, first_path)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    shape = (int(first.Rows), int(first.Columns))
    entries = [_plane_entry(path, ds, iop, spacing, normal, shape) for path, ds in datasets]
    groups = _group_by_location(entries, root)

    corners = np.stack([g[0][2] for g in groups])          # (K, 3) LPS
    k_step = _stack_step(corners, first, normal, root)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]      # i: the column index, along the row direction
    lps[:3, 1] = col_dir * spacing[0]      # j: the row index, along the column direction
    lps[:3, 2] = k_step
    lps[:3, 3] = corners[0]
    affine = LPS_TO_RAS @ lps

    frames = {len(g) for g in groups}
    stacked = np.stack([np.stack([e[3] for e in g]) for g in groups])   # (K, T, Y, X)
    temporal = frames != {1} or any("TemporalPositionIdentifier" in ds for _, ds in datasets)
    if temporal:
        volume = np.transpose(stacked, (3, 2, 0, 1))                     # (X, Y, K, T)
    else:
        volume = np.transpose(stacked[:, 0], (2, 1, 0))                  # (X, Y, K)
    return np.ascontiguousarray(volume, dtype=np.float32), affine


def _read_datasets(root: Path) -> list[tuple[Path, Any]]:
    """The image datasets of folder ``root`` by file name: at least one, all of one series."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not root.is_dir():
        raise InputDataError("no such folder" if not root.exists() else "is not a folder",
                             path=root)
    datasets: list[tuple[Path, Any]] = []
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, EOFError):
            continue
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
            raise InputDataError(f"cannot read as DICOM ({type(exc).__name__}: {exc})",
                                 path=path) from None
        if "PixelData" in ds:
            datasets.append((path, ds))
    if not datasets:
        raise InputDataError("holds no DICOM images", path=root)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise InputDataError(f"holds {len(series)} series; give a folder with one", path=root)
    return datasets


def _plane_entry(path: Path, ds: Dataset, iop: np.ndarray, spacing: np.ndarray,
                 normal: np.ndarray, shape: tuple[int, int]) -> tuple[Any, ...]:
    """``(location along the normal, time key, IPP, rescaled pixels)`` of one image.

    The image must match the series' size, orientation and pixel spacing.
    """
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InputDataError("multi-frame images are not supported", path=path)
    if (int(ds.Rows), int(ds.Columns)) != shape:
        raise InputDataError(f"image size {ds.Rows}×{ds.Columns} differs from the "
                             f"series' {shape[0]}×{shape[1]}", path=path)
    if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, path), iop, atol=1e-4):
        raise InputDataError("image orientation differs from the rest of the series",
                             path=path)
    if not np.allclose(_floats(ds, "PixelSpacing", 2, path), spacing, rtol=1e-4):
        raise InputDataError("pixel spacing differs from the rest of the series", path=path)
    ipp = _floats(ds, "ImagePositionPatient", 3, path)
    try:
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types
        raise InputDataError(f"cannot decode the pixel data ({type(exc).__name__}: {exc})",
                             path=path) from None
    values = pixels * _number(ds, "RescaleSlope", 1.0) + _number(ds, "RescaleIntercept", 0.0)
    time_key = (_number(ds, "TemporalPositionIdentifier", 0.0),
                _number(ds, "TriggerTime", 0.0), _number(ds, "InstanceNumber", 0.0))
    return (float(ipp @ normal), time_key, ipp, values.astype(np.float32))


def _group_by_location(entries: list[tuple[Any, ...]], root: Path) -> list[list[Any]]:
    """The entries grouped by location along the normal, in stack order, each group in time
    order; every location must hold the same number of images."""
    entries.sort(key=lambda e: e[0])
    groups: list[list[Any]] = [[entries[0]]]
    for entry in entries[1:]:
        if entry[0] - groups[-1][-1][0] > 1e-3:
            groups.append([entry])
        else:
            groups[-1].append(entry)
    frames = {len(g) for g in groups}
    if len(frames) != 1:
        raise InputDataError(f"the locations hold different numbers of images "
                             f"({sorted(frames)})", path=root)
    if len(groups) > 1 and min(e[1][2] for e in groups[0]) > min(e[1][2] for e in groups[-1]):
        groups.reverse()    # follow the order of the instance numbers
    for g in groups:
        g.sort(key=lambda e: e[1])
    return groups


def _stack_step(corners: np.ndarray, first: Dataset, normal: np.ndarray,
                root: Path) -> np.ndarray:
    """The LPS step from plane to plane (evenly spaced; a warning where they are not)."""
    k_n = len(corners)
    if k_n > 1:
        k_step = (corners[-1] - corners[0]) / (k_n - 1)
        expected = corners[0] + np.arange(k_n)[:, None] * k_step
        deviation = float(np.linalg.norm(corners - expected, axis=1).max())
        if deviation > 0.01 * float(np.linalg.norm(k_step)) + 1e-3:
            warnings.warn(f"{root}: slice positions are not evenly spaced (off by up to "
                          f"{deviation:.2f} mm); the affine assumes even spacing",
                          GeometryWarning, stacklevel=3)
    else:
        step = _number(first, "SpacingBetweenSlices", 0.0) or _number(first, "SliceThickness", 1.0)
        k_step = normal * step
    return k_step
