"""Writing a reconstructed image as a DICOM series: one MR Image Storage file per 2D plane.

A series is a folder of single-frame MR Image Storage files (``IM_0001.dcm``, …),
Part-10 files with explicit VR little endian. Which planes become files:

* ``"2d"``: each of the B slices (``data[b, 0]``);
* ``"3d"``: each of the D partitions of the single slab (``data[0, d]``);
* ``"2dt"``: each (slice, frame) pair (``data[b, t]``), slice-major, with Temporal
  Position Identifier ``t + 1``, Number of Temporal Positions ``D`` and Trigger Time
  ``t · frame_time_ms``.

Instance Number counts the files from 1 in that order and In-Stack Position Number
is the plane's index ``k + 1`` along the stack (the NIfTI ``k`` of io/nifti.py).

Geometry (the same voxels as :func:`molrecon.io.nifti.nifti_affine`)
-------------------------------------------------------------------
DICOM's patient frame is LPS, molrecon's scanner frame too, so vectors pass
unchanged. The pixel array of a plane is stored with rows = phase encoding (Y)
and columns = readout (X), i.e. exactly the image's ``(Y, X)`` plane: DICOM puts
pixel (row r, column c) at ``IPP + c·Δc·row_dir + r·Δr·col_dir``, so

* Image Orientation (Patient) = ``read_dir`` (along a row, the column index
  grows: X), then ``phase_dir`` (down a column: Y);
* Pixel Spacing = ``[Δy, Δx]`` (the spacing *between rows*, then *between
  columns*), with ``Δx = fov_x / X`` and ``Δy = fov_y / Y``;
* Image Position (Patient) = the centre of pixel (0, 0) of the plane: the plane
  centre (pixel ``(Y//2, X//2)``, as in io/nifti.py) minus ``(X//2)·Δx·read_dir +
  (Y//2)·Δy·phase_dir``. The plane centre is the slice position for a 2D slice
  (or ``position[0] + b · slice_spacing · slice_dir`` when the slices' positions
  coincide) and ``position[0] + (d − D//2)·Δz·slice_dir`` for partition d of a 3D slab;
* Slice Thickness = ``fov_z / matrix_z`` for 2D (the slice thickness), ``Δz``
  for 3D; Spacing Between Slices = the centre-to-centre step of the stack;
  Slice Location = ``IPP · (row_dir × col_dir)``.

:func:`molrecon.io.dicom.read_dicom_series` (:mod:`.reader`) reads such a series
back.

Intensities are the magnitude, stored as uint16 (MONOCHROME2) with one Rescale
Slope for the whole series (``max / 65535``, intercept 0), so that stored value ×
slope reproduces the float magnitude to within ``max / 131070``.

The series is written into a hidden temporary folder beside ``out_dir`` and
renamed into place at the end: a failed or interrupted job leaves no partial
series. An existing non-empty ``out_dir`` is only replaced with ``force`` (and
only when it holds nothing but ``.dcm`` files, so that a mistyped path cannot
wipe an unrelated folder); the new series is complete before the old one is
moved away.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ... import __version__
from ...atomic import check_parent
from ...errors import ConfigError, OutputError
from ..types import KINDS, ImageVolume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset, FileMetaDataset

__all__ = ["check_dicom_output", "write_dicom"]

#: Largest stored value (uint16).
_STORED_MAX = 65535
#: Patient Name / ID when none is given.
ANONYMOUS = "ANONYMOUS"
_PATIENT_KEYS = ("name", "id")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


# ---- output folder ---------------------------------------------------------------------

def check_dicom_output(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Fail early (before any work) if a DICOM series cannot be written into folder ``path``.

    ``path`` may be missing or an empty folder; a non-empty folder needs ``force``
    and must hold nothing but ``.dcm`` files.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError("exists and is not a folder (a DICOM series is written as a folder)",
                          path=p)
    if p.is_dir() and any(p.iterdir()):
        if not force:
            raise OutputError("folder already exists and is not empty (use --force to replace "
                              "it)", path=p)
        _check_replaceable(p)
    check_parent(p)
    return p


def _check_replaceable(folder: Path) -> None:
    """Refuse to replace a folder that holds anything but ``.dcm`` files."""
    for entry in folder.iterdir():
        if entry.is_symlink() or not entry.is_file() or entry.suffix.lower() != ".dcm":
            raise OutputError(f"will not replace a folder that holds more than DICOM files "
                              f"(found {entry.name!r}); remove it or choose another folder",
                              path=folder)


@contextlib.contextmanager
def _atomic_folder(target: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; on success rename it to ``target``.

    On any exception the temporary folder is removed and ``target`` is untouched.
    With ``force`` an existing ``target`` is moved aside only once the new folder is
    complete, then deleted (and moved back if the swap fails).
    """
    parent = target.parent if str(target.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    # mkdtemp creates 0700; give the output the permissions a plain mkdir() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        _swap_into_place(tmp, target, force=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(new: Path, target: Path, *, force: bool) -> None:
    """Rename the finished folder ``new`` to ``target`` (replacing it only with ``force``)."""
    if target.is_dir() and any(target.iterdir()):
        if not force:
            raise OutputError("appeared while the job ran (use --force to replace it)",
                              path=target)
        _check_replaceable(target)
        holder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old",
                                       dir=new.parent))
        old = holder / "old"
        try:
            os.rename(target, old)
            try:
                os.rename(new, target)
            except OSError:
                os.rename(old, target)
                raise
        except OSError as exc:
            shutil.rmtree(holder, ignore_errors=True)
            raise OutputError(f"cannot replace the folder ({exc.strerror or exc})",
                              path=target) from None
        shutil.rmtree(holder, ignore_errors=True)
        return
    try:
        # POSIX rename replaces a missing or empty folder and refuses a non-empty one.
        os.replace(new, target)
    except OSError as exc:
        raise OutputError(f"cannot move the series into place ({exc.strerror or exc})",
                          path=target) from None


# ---- value formatting ------------------------------------------------------------------

def _ds(value: float) -> str:
    """A Decimal String (at most 16 characters) for ``value``."""
    from pydicom.valuerep import format_number_as_ds

    number = float(value) + 0.0     # + 0.0 turns -0.0 into 0.0
    shortest = repr(number)         # the shortest exact form, when it fits
    return shortest if len(shortest) <= 16 else format_number_as_ds(number)


def _text(value: str, limit: int, *, single: bool = True) -> str:
    """``value`` cut to ``limit`` characters; for single-valued short strings (LO, SH)
    control characters and the value separator ``\\`` are replaced."""
    if single:
        value = _CONTROL.sub(" ", value).replace("\\", "/")
    return value[:limit]


# ---- geometry ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Stack:
    """The LPS geometry of the K planes along the stack (NIfTI ``k``)."""

    row_dir: np.ndarray          # read_dir: the column index (X) grows along it
    col_dir: np.ndarray          # phase_dir: the row index (Y) grows along it
    spacing_yx: tuple[float, float]
    corners: np.ndarray          # (K, 3) LPS centre of pixel (0, 0) of each plane
    thickness: float
    step: float                  # centre-to-centre spacing along the stack


def _stack_geometry(image: ImageVolume) -> _Stack:
    geometry = image.geometry
    b_n, d_n, y_n, x_n = (int(s) for s in image.data.shape)
    read = np.asarray(geometry.read_dir, dtype=np.float64).reshape(3)
    phase = np.asarray(geometry.phase_dir, dtype=np.float64).reshape(3)
    normal = np.asarray(geometry.slice_dir, dtype=np.float64).reshape(3)
    positions = np.asarray(geometry.position, dtype=np.float64).reshape(-1, 3)
    if positions.shape[0] < 1:
        raise ConfigError("the image geometry has no slice position")
    dx = geometry.fov_mm[0] / x_n
    dy = geometry.fov_mm[1] / y_n
    in_plane = -(x_n // 2) * dx * read - (y_n // 2) * dy * phase
    if image.kind == "3d":
        dz = geometry.fov_mm[2] / d_n
        offsets = (np.arange(d_n) - d_n // 2)[:, None] * dz * normal
        corners = positions[0] + in_plane + offsets
        thickness = step = dz
    else:
        thickness = geometry.fov_mm[2] / max(int(geometry.matrix[2]), 1)
        step = float(geometry.slice_spacing_mm)
        if b_n > 1 and positions.shape[0] != b_n:
            raise ConfigError(f"the geometry has {positions.shape[0]} slice positions for "
                              f"{b_n} slices")
        if b_n > 1 and float(np.linalg.norm(positions[-1] - positions[0])) >= 1e-6:
            corners = positions + in_plane
            step = float(np.linalg.norm(positions[-1] - positions[0])) / (b_n - 1)
        else:   # one slice, or slices at one position: stacked along slice_dir (as NIfTI)
            corners = positions[0] + in_plane + np.arange(b_n)[:, None] * step * normal
    values = np.concatenate([read, phase, corners.ravel(), [dx, dy, thickness, step]])
    if not np.all(np.isfinite(values)) or min(dx, dy) <= 0:
        raise ConfigError("the image geometry is not finite or has non-positive voxel sizes")
    return _Stack(row_dir=read, col_dir=phase, spacing_yx=(dy, dx), corners=corners,
                  thickness=float(thickness), step=abs(float(step)))


# ---- writing -----------------------------------------------------------------------------

def _quantise(magnitude: np.ndarray) -> tuple[np.ndarray, float]:
    """uint16 values and the shared rescale slope (as it will be read back from the DS)."""
    peak = float(magnitude.max()) if magnitude.size else 0.0
    slope = float(_ds(peak / _STORED_MAX)) if peak > 0 else 1.0
    if slope <= 0:   # a peak so small that the DS rounds it to 0
        slope = 1.0
    stored = np.clip(np.rint(magnitude / slope), 0, _STORED_MAX).astype(np.uint16)
    return stored, slope


def _window(magnitude: np.ndarray) -> tuple[float, float]:
    """Window centre and width (rescaled units) spanning the 1st..99.5th percentile."""
    flat = magnitude.ravel()
    if flat.size > 1_000_000:    # percentiles of a regular subsample are plenty
        flat = flat[:: flat.size // 1_000_000]
    lo, hi = (float(v) for v in np.percentile(flat, [1.0, 99.5]))
    if hi <= lo:
        lo, hi = 0.0, float(magnitude.max()) if magnitude.size else 0.0
    if hi <= lo:
        return 0.5, 1.0
    return (lo + hi) / 2.0, hi - lo


def _description(image: ImageVolume, method_text: str | None, model_sha256: str | None,
                 source: str | os.PathLike[str] | None) -> tuple[str, str, str]:
    """(short method line, method line with the model's sha256, derivation line)."""
    method = method_text if method_text is not None else (image.method or "reconstruction")
    short = f"molrecon {__version__} {method}".strip()
    line = short
    if model_sha256 and model_sha256 not in line:
        line += f"; model sha256 {model_sha256}"
    derivation = line
    if source is not None:
        derivation += f"; from {Path(source).name}"   # the file name only, never its folders
    return short, line, derivation


def _patient(patient: Mapping[str, str] | None, target: Path) -> tuple[str, str]:
    """(Patient Name, Patient ID), placeholders where not given."""
    if patient is None:
        return ANONYMOUS, ANONYMOUS
    unknown = sorted(set(patient) - set(_PATIENT_KEYS))
    if unknown:
        raise ConfigError(f"unknown patient fields {unknown}; use {list(_PATIENT_KEYS)}",
                          path=target)
    name = str(patient.get("name") or ANONYMOUS)
    pid = str(patient.get("id") or ANONYMOUS)
    return _text(name, 64), _text(pid, 64)


def write_dicom(image: ImageVolume, out_dir: str | os.PathLike[str], *, force: bool = False,
                series_description: str | None = None, method_text: str | None = None,
                model_sha256: str | None = None, patient: Mapping[str, str] | None = None,
                study_uid: str | None = None,
                source: str | os.PathLike[str] | None = None) -> Path:
    """Write the magnitude of ``image`` as an MR Image series into folder ``out_dir``.

    One file per 2D plane (see the module docstring for planes and geometry),
    written atomically; an existing non-empty ``out_dir`` is only replaced with
    ``force``. ``method_text`` (default: ``image.method``) and ``model_sha256`` go
    into Image Comments and Derivation Description (and the default Series
    Description); ``source`` is the raw-data file the image came from (only its
    name is recorded). ``patient`` may give ``{"name": ..., "id": ...}`` (default
    ``ANONYMOUS``); ``study_uid`` puts the series into an existing study (default: a
    new one). Returns ``out_dir``.
    """
    import pydicom

    target = check_dicom_output(out_dir, force=force)
    _check_image(image, model_sha256, study_uid, target)
    magnitude = image.magnitude()
    if not np.all(np.isfinite(magnitude)):
        raise ConfigError("the image holds non-finite values (NaN or inf)", path=target)
    stack = _stack_geometry(image)
    stored, slope = _quantise(magnitude)
    common = _series_values(stack, slope, _window(magnitude),
                            _description(image, method_text, model_sha256, source),
                            _patient(patient, target), series_description, study_uid)
    planes = _planes(image)
    digits = max(4, len(str(len(planes))))

    with _atomic_folder(target, force=force) as tmp:
        for number, (b, d, k, t) in enumerate(planes, start=1):
            ds = _plane_dataset(image, stored[b, d], k, t, number, len(planes), common)
            try:
                pydicom.dcmwrite(tmp / f"IM_{number:0{digits}d}.dcm", ds,
                                 enforce_file_format=True)
            except OSError as exc:
                raise OutputError(f"cannot write DICOM file ({exc.strerror or exc})",
                                  path=target) from None
    return target


def _check_image(image: ImageVolume, model_sha256: str | None, study_uid: str | None,
                 target: Path) -> None:
    """Refuse an image, model hash or study UID that cannot become the series."""
    if image.kind not in KINDS:
        raise ConfigError(f"image kind must be one of {KINDS}, got {image.kind!r}", path=target)
    if image.data.ndim != 4 or min(image.data.shape) < 1:
        raise ConfigError(f"image must be (B, D, Y, X), got shape {image.data.shape}",
                          path=target)
    b_n, d_n, _, _ = image.data.shape
    if image.kind == "3d" and b_n != 1:
        raise ConfigError(f"a 3D image with {b_n} slabs cannot be written as one series; "
                          "write each slab separately", path=target)
    if image.kind == "2d" and d_n != 1:
        raise ConfigError(f"a 2d image has D = 1, got shape {image.data.shape}", path=target)
    if model_sha256 is not None and not _SHA256.match(model_sha256):
        raise ConfigError(f"model sha256 must be 64 lowercase hex digits, got {model_sha256!r}",
                          path=target)
    if study_uid is not None and not (len(study_uid) <= 64 and _UID.match(study_uid)):
        raise ConfigError(f"not a valid DICOM UID: {study_uid!r}", path=target)


def _series_values(stack: _Stack, slope: float, window: tuple[float, float],
                   lines: tuple[str, str, str], patient: tuple[str, str],
                   series_description: str | None, study_uid: str | None) -> dict[str, Any]:
    """What every file of the series shares: clock, UIDs, texts, patient, rescale, window."""
    from pydicom.uid import generate_uid

    short_line, method_line, derivation = lines
    name, pid = patient
    now = _dt.datetime.now().astimezone()
    offset = now.utcoffset() or _dt.timedelta(0)
    minutes = int(offset.total_seconds() // 60)
    return {
        "date": now.strftime("%Y%m%d"),
        "time": now.strftime("%H%M%S.%f"),
        "tz": f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}",
        "study_uid": study_uid or generate_uid(),
        "new_study": study_uid is None,
        "series_uid": generate_uid(),
        "frame_uid": generate_uid(),
        "series_description": _text(series_description if series_description is not None
                                    else short_line, 64),
        "comments": _text(method_line, 10240, single=False),
        "derivation": _text(derivation, 1024, single=False),
        "patient_name": name,
        "patient_id": pid,
        "slope": slope,
        "window": window,
        "stack": stack,
    }


def _planes(image: ImageVolume) -> list[tuple[int, int, int, int | None]]:
    """The planes in file order: (b, d) index into data, k along the stack, t in time (or None)."""
    b_n, d_n, _, _ = image.data.shape
    if image.kind == "3d":
        return [(0, d, d, None) for d in range(d_n)]
    if image.kind == "2dt":
        return [(b, t, b, t) for b in range(b_n) for t in range(d_n)]
    return [(b, 0, b, None) for b in range(b_n)]


def _plane_dataset(image: ImageVolume, pixels: np.ndarray, k: int, t: int | None,
                   number: int, total: int, common: dict[str, Any]) -> Dataset:
    """The dataset of one plane (``pixels`` is its uint16 ``(Y, X)`` array)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = _file_meta(sop_uid)
    _set_sop_patient_study(ds, sop_uid, common)
    _set_series_equipment(ds, common)
    _set_image(ds, image, number, total, common)
    _set_plane_geometry(ds, common["stack"], k)
    if t is not None:
        _set_temporal(ds, image, t)
    _set_pixels(ds, pixels, common)
    return ds


def _file_meta(sop_uid: str) -> FileMetaDataset:
    """The Part-10 file meta information of one file (explicit VR little endian)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["molrecon", __version__])
    meta.ImplementationVersionName = f"MOLRECON_{__version__}"[:16]
    return meta


def _set_sop_patient_study(ds: Dataset, sop_uid: str, common: dict[str, Any]) -> None:
    """SOP common, patient and study attributes."""
    from pydicom.uid import MRImageStorage

    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = common["date"]
    ds.InstanceCreationTime = common["time"]
    ds.TimezoneOffsetFromUTC = common["tz"]
    ds.PatientName = common["patient_name"]
    ds.PatientID = common["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = common["study_uid"]
    ds.StudyDate = common["date"] if common["new_study"] else ""
    ds.StudyTime = common["time"] if common["new_study"] else ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""


def _set_series_equipment(ds: Dataset, common: dict[str, Any]) -> None:
    """Series, frame of reference and equipment attributes."""
    ds.Modality = "MR"
    ds.SeriesInstanceUID = common["series_uid"]
    ds.SeriesNumber = 1
    ds.SeriesDate = common["date"]
    ds.SeriesTime = common["time"]
    ds.SeriesDescription = common["series_description"]
    ds.Laterality = ""
    ds.PatientPosition = ""
    ds.FrameOfReferenceUID = common["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = ""
    ds.SoftwareVersions = f"molrecon {__version__}"


def _set_image(ds: Dataset, image: ImageVolume, number: int, total: int,
               common: dict[str, Any]) -> None:
    """General and MR image attributes (acquisition parameters are not known here: type 2
    attributes left empty)."""
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.InstanceNumber = number
    ds.AcquisitionNumber = 1
    ds.ImagesInAcquisition = total
    ds.ContentDate = common["date"]
    ds.ContentTime = common["time"]
    ds.ImageComments = common["comments"]
    ds.DerivationDescription = common["derivation"]
    ds.BurnedInAnnotation = "NO"
    ds.ScanningSequence = "RM"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D" if image.kind == "3d" else "2D"
    ds.RepetitionTime = ""
    ds.EchoTime = ""
    ds.EchoTrainLength = ""


def _set_plane_geometry(ds: Dataset, stack: _Stack, k: int) -> None:
    """Orientation, position, spacing, thickness and location of plane ``k`` of the stack."""
    corner = stack.corners[k]
    normal = np.cross(stack.row_dir, stack.col_dir)
    ds.ImageOrientationPatient = [_ds(v) for v in (*stack.row_dir, *stack.col_dir)]
    ds.ImagePositionPatient = [_ds(v) for v in corner]
    ds.PixelSpacing = [_ds(v) for v in stack.spacing_yx]
    ds.SliceThickness = _ds(stack.thickness)
    if stack.step > 0:
        ds.SpacingBetweenSlices = _ds(stack.step)
    ds.SliceLocation = _ds(float(corner @ normal))
    ds.InStackPositionNumber = k + 1


def _set_temporal(ds: Dataset, image: ImageVolume, t: int) -> None:
    """Temporal position ``t`` of a ``"2dt"`` frame, with its trigger time where known."""
    ds.TemporalPositionIdentifier = t + 1
    ds.NumberOfTemporalPositions = int(image.data.shape[1])
    frame_ms = image.geometry.frame_time_ms
    if frame_ms is not None and np.isfinite(frame_ms):
        ds.TriggerTime = _ds(t * float(frame_ms))
        ds.TemporalResolution = _ds(float(frame_ms))
    else:
        ds.TriggerTime = ""


def _set_pixels(ds: Dataset, pixels: np.ndarray, common: dict[str, Any]) -> None:
    """The uint16 pixels ``(Y, X)`` with the series' rescale slope and window."""
    rows, columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = _ds(common["slope"])
    ds.RescaleType = "US"
    centre, width = common["window"]
    ds.WindowCenter = _ds(centre)
    ds.WindowWidth = _ds(width)
    if width < 1:   # LINEAR windows need a width of at least 1 (in rescaled units)
        ds.VOILUTFunction = "LINEAR_EXACT"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
