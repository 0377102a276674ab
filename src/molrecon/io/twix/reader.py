"""Siemens twix raw data (``.dat``): VB single-measurement and VD/VE multi-raid files.

The file is parsed with twixtools (MIT; imported only when a twix file is read):
its protocol header (the ``MeasYaps`` ASCCONV text, ``Meas``/``Dicom``
XProtocol maps) and its measurement data headers (MDHs), one per readout.
molrecon then translates every MDH into an ISMRMRD acquisition header in memory
and hands the lines to the ISMRMRD reader's planner and assembler
(:mod:`molrecon.io.ismrmrd`): flags, counters, readout placement, readout
oversampling removal, averaging, calibration, slice ordering, geometry and
prewhitening are then exactly those of an ISMRMRD file converted from the same
scan, and the two readers cannot drift apart.

Recognising a twix file (:func:`is_twix`, from content, never the name)
-----------------------------------------------------------------------
* VD/VE: a multi-raid header: two uint32 ``0`` and the number of measurements
  (1..64), then 152-byte entries whose first offset lies past the 9736-byte
  header; where the file reaches that offset, a measurement header must start
  there (below).
* VB: the file starts with a measurement header: uint32 header length, uint32
  number of protocol buffers (1..64), then the first buffer's name (``Config``:
  a letter, 3 or more word characters, a NUL) and its uint32 length, which must
  fit within the header.

Which data are used
-------------------
The image scan is the file's last measurement. Coil noise comes from its
``NOISEADJSCAN`` readouts, or, without any, from those of the measurement before
(the noise-adjustment measurement of a VD/VE file).

MDH -> ISMRMRD acquisition header
---------------------------------
==========================================  =========================================
twix                                        ISMRMRD
==========================================  =========================================
Counter Lin / Par / Sli                     kspace_encode_step_1 / _2, slice
Counter Ave / Eco / Phs / Rep / Set / Seg   average, contrast, phase, repetition, set,
                                            segment
SamplesInScan, UsedChannels                 number_of_samples, active_channels
CutOff.Pre / Post, CenterCol                discard_pre / _post, center_sample
TimeStamp (2.5 ms ticks)                    acquisition_time_stamp (same unit)
SliceData.SlicePos (Sag, Cor, Tra)          position (Siemens' patient frame is LPS, mm)
SliceData.Quaternion (w, x, y, z)           read_dir, phase_dir, slice_dir: the columns
                                            of the quaternion's rotation matrix
sRXSPEC.alDwellTime[0] (ns)                 sample_time_us
NOISEADJSCAN                                noise measurement (19)
PATREFSCAN (without PATREFANDIMASCAN)       parallel calibration (20)
PATREFANDIMASCAN                            parallel calibration and imaging (21)
REFLECT                                     reverse (22)
RTFEEDBACK, HPFEEDBACK, RETRO_DUMMYSCAN,    skipped: RT / HP feedback, dummy scan,
REFPHASESTABSCAN, PHASESTABSCAN             phase stabilisation (reference)
SYNCDATA, ACQEND                            dropped (no readout)
==========================================  =========================================

The direction cosines follow the ISMRMRD conversion shipped with the test data
(``siemens_gre_2coil_full.h5``: read = first column, phase = second, slice =
third); Siemens' C++ ``siemens_to_ismrmrd`` assigns the first two columns the
other way round (phase, read).

So (see :mod:`molrecon.io.ismrmrd` for the details): lines sit at their Lin/Par
counters with the MDH k-space centre (``CenterLin`` / ``CenterPar``, Siemens'
``ushKSpaceCentreLineNo`` / ``...PartitionNo``) at grid index ``n // 2`` and the
readout's ``CenterCol`` at ``x_enc // 2`` (asymmetric echoes and partial
Fourier zero-filled); averages are averaged; ``PATREFSCAN`` lines are data
where no imaging line covers their position and mark ``calib`` (without any
such flag ``calib`` is the fully sampled centre); slices (Sli -> B) are ordered
along the slice direction; a 3D scan (``sKSpace.ucDimension`` 4) puts Par on D;
a 2D scan with several cardiac phases (Phs), or else several repetitions
(Rep), becomes ``"2dt"`` with the frames on D, ``frame_time_ms`` from the MDH
time stamps (what the converters copy into ``acquisition_time_stamp``), else
from the protocol's TR; only the first echo (Eco) and set are used, with a
warning.

Protocol -> encoding (ISMRMRD ``encodedSpace`` / ``reconSpace``)
----------------------------------------------------------------
* readout: ``x_enc`` = ``Meas.iNoOfFourierColumns`` (else ``lBaseResolution`` ×
  oversampling), encoded FOV ``dReadoutFOV`` × ``flReadoutOSFactor``, recon FOV
  ``dReadoutFOV``: the oversampling is cropped to ``x_enc / flReadoutOSFactor``
  points (``remove_readout_oversampling``);
* phase: ``Meas.iNoOfFourierLines`` (else ``lPhaseEncodingLines`` × (1 + phase
  oversampling)) lines over ``dPhaseFOV`` × (1 + ``dPhaseOversamplingForDialog``);
  phase oversampling is kept, as for ISMRMRD;
* 3D partitions: ``Meas.iNoOfFourierPartitions`` (else ``lPartitions``) over the
  slab ``dThickness`` × (1 + ``dSliceOversamplingForDialog``); 2D: ``dThickness``;
* both encoded sizes are at least twice the MDH centre (a header that counts
  only the lines a partial-Fourier scan acquires still gets the whole k-space);
* TR / TE: ``alTR[0]`` / ``alTE[0]`` (µs -> ms); scanner: ``Dicom``
  (``ManufacturersModelName``, ``flMagneticFieldStrength``); protocol name:
  ``tProtocolName``.

Noise and prewhitening: as for ISMRMRD (:func:`~molrecon.io.kspace.noise_covariance`
over all noise samples, scaled by the noise measurement's dwell time over the
image scan's; ``L⁻¹`` of its Cholesky factor applied to every line). Noise
readouts with another channel count than the image scan are not used (warning).

Memory: the k-space and the noise samples are checked against the memory
available before they are allocated (``check_memory``, ``MAX_KSPACE_ELEMENTS``);
twixtools' index of the file (a small Python object per readout) is not.

Refused (:class:`~molrecon.errors.InputDataError`, one line naming the file)
----------------------------------------------------------------------------
EPI (an EPI factor above 1 or phase-correction readouts), simultaneous
multi-slice, non-Cartesian trajectories (radial, spiral, PROPELLER/BLADE),
reflected readouts outside EPI; an empty file; a file shorter than its
multi-raid header or whose measurements end past the end of the file, a
measurement without its closing ACQEND block or with a readout that runs past
its end (a truncated copy); any failure of twixtools (its message, first line);
and everything the ISMRMRD planner refuses (inconsistent readout lengths or coil
counts, k-space beyond ``MAX_KSPACE_ELEMENTS`` or the memory available now).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputDataError, ResourceError
from ..ismrmrd import (
    ACQ_IS_NOISE_MEASUREMENT,
    ACQ_IS_PARALLEL_CALIBRATION,
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    ACQ_IS_REVERSE,
    SKIPPED_FLAGS,
    EncodingLimit,
    HeaderFields,
    assemble_kspace,
    assemble_scan,
    flag_bit,
    head_dtype,
    plan_acquisitions,
)
from ..kspace import (
    BLOCK_BYTES,
    Notes,
    check_memory,
    first_line,
    noise_covariance,
    noise_whitener,
    raw_file_size,
)
from ..types import RawScan

__all__ = ["is_twix", "read_twix"]

_RAID_HEADER_BYTES = 8 + 64 * 152  # MrParcRaidFileHeader + 64 MrParcRaidFileEntry
_MAX_MEASUREMENTS = 64
_MEAS_HEADER_NAME = re.compile(rb"[A-Za-z]\w{3,}\x00")
_TWIXTOOLS_VD_LIMIT = 10000  # twixtools takes a file for VD/VE when its first uint32 is below this

# Siemens sKSpace.ucTrajectory values.
_TRAJECTORIES = {1: "cartesian", 2: "radial", 4: "spiral", 8: "propeller (BLADE)"}

# twix EvalInfoMask flags -> ISMRMRD acquisition flags (1-based bit numbers).
_FLAG_MAP = {
    "NOISEADJSCAN": ACQ_IS_NOISE_MEASUREMENT,
    "PATREFSCAN": ACQ_IS_PARALLEL_CALIBRATION,
    "PATREFANDIMASCAN": ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    "REFLECT": ACQ_IS_REVERSE,
    "PHASCOR": 24,
    "HPFEEDBACK": 26,
    "RETRO_DUMMYSCAN": 27,
    "RTFEEDBACK": 28,
    "REFPHASESTABSCAN": 30,
    "PHASESTABSCAN": 31,
}

_COUNTERS = {  # MDH counter -> ISMRMRD idx field
    "Lin": "kspace_encode_step_1", "Par": "kspace_encode_step_2", "Sli": "slice",
    "Ave": "average", "Eco": "contrast", "Phs": "phase", "Rep": "repetition", "Set": "set",
    "Seg": "segment",
}


# --------------------------------------------------------------------------- recognition
def _is_meas_header(head: bytes) -> bool:
    """``head`` starts like a twix measurement header (header length, buffers, 1st buffer)."""
    if len(head) < 8:
        return False
    hdr_len, n_buffers = struct.unpack_from("<II", head)
    if not 1 <= n_buffers <= _MAX_MEASUREMENTS:
        return False
    name = _MEAS_HEADER_NAME.match(head, 8)
    if name is None or len(head) < name.end() + 4:
        return False
    (buf_len,) = struct.unpack_from("<I", head, name.end())
    return name.end() + 4 + buf_len <= hdr_len


def _raid_first_offset(head: bytes) -> int | None:
    """Offset of the first measurement if ``head`` starts with a VD/VE multi-raid header."""
    if len(head) < 32:
        return None
    hd_size, count = struct.unpack_from("<II", head)
    if hd_size != 0 or not 1 <= count <= _MAX_MEASUREMENTS:
        return None
    (offset,) = struct.unpack_from("<Q", head, 16)
    return offset if offset >= _RAID_HEADER_BYTES else None


def is_twix(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds Siemens twix raw data (VB or VD/VE), judged from its first bytes.

    Reads at most 64 bytes at the start and 64 where the first measurement of a
    VD/VE file begins. A VD/VE file cut short before its first measurement still
    counts (:func:`read_twix` then says it is truncated). Missing or unreadable
    paths are not twix.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if _is_meas_header(head):
                return True  # VB: the protocol header starts the file
            offset = _raid_first_offset(head)
            if offset is None:
                return False
            f.seek(offset)
            meas = f.read(64)
    except OSError:
        return False
    # Past the end of a truncated copy, or too short to tell: the raid header decides.
    return len(meas) < 24 or _is_meas_header(meas)


# --------------------------------------------------------------------------- file layout
@dataclass(frozen=True)
class _Layout:
    version: str  # "VB" or "VD"
    measurements: tuple[tuple[int, int], ...]  # (offset, length) in bytes


def _layout(path: Path, size: int) -> _Layout:
    """The measurements of the file, checked against its size (truncated copies refused)."""
    with open(path, "rb") as f:
        head = f.read(_RAID_HEADER_BYTES)
    if _is_meas_header(head[:64]):
        (hdr_len,) = struct.unpack_from("<I", head)
        if hdr_len > size:
            raise InputDataError(f"is truncated: its protocol header needs {hdr_len} bytes, the "
                                 f"file has {size}", path=path)
        if hdr_len < _TWIXTOOLS_VD_LIMIT:
            raise InputDataError(f"VB twix file with a protocol header of only {hdr_len} bytes, "
                                 "which twixtools cannot tell from a VD/VE file", path=path)
        return _Layout("VB", ((0, size),))
    if len(head) < _RAID_HEADER_BYTES:
        raise InputDataError(f"is truncated: {size} bytes, shorter than the twix multi-raid "
                             f"header ({_RAID_HEADER_BYTES} bytes)", path=path)
    (count,) = struct.unpack_from("<I", head, 4)
    if not 1 <= count <= _MAX_MEASUREMENTS:
        raise InputDataError(f"the multi-raid header declares {count} measurements (1 to "
                             f"{_MAX_MEASUREMENTS} expected)", path=path)
    measurements = []
    for k in range(count):
        offset, length = struct.unpack_from("<QQ", head, 8 + 152 * k + 8)
        if length == 0 and count == 1:
            length = max(size - offset, 0)
        end = offset + length
        if offset < _RAID_HEADER_BYTES or length == 0:
            raise InputDataError(f"the multi-raid header's entry for measurement {k + 1} of "
                                 f"{count} is damaged (offset {offset}, length {length})",
                                 path=path)
        if end > size:
            raise InputDataError(f"is truncated: measurement {k + 1} of {count} ends at byte "
                                 f"{end}, but the file has only {size} bytes", path=path)
        measurements.append((offset, length))
    return _Layout("VD", tuple(measurements))


# --------------------------------------------------------------------------- twixtools
@contextlib.contextmanager
def _twixtools_path(path: Path) -> Iterator[str]:
    """A path string twixtools opens as ``path`` itself.

    twixtools appends ``.dat`` to a name without an extension (and takes anything
    but a string for a measurement id), so such a file is reached through a
    symbolic link named ``scan.dat``; twixtools resolves links before opening.
    """
    name = str(path.resolve())
    if os.path.splitext(name)[1]:
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="molrecon-twix-") as tmp:
        link = os.path.join(tmp, "scan.dat")
        try:
            os.symlink(name, link)
        except OSError as exc:
            raise InputDataError(f"a twix file without an extension cannot be handed to "
                                 f"twixtools here ({first_line(exc)}); rename it to .dat",
                                 path=path) from None
        yield link


def _call_twixtools(path: Path, scans: list[int], *, data: bool) -> list[dict[str, Any]]:
    """``twixtools.read_twix`` on measurements ``scans``: its output silenced, its errors ours."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import twixtools
    except ImportError:
        raise InputDataError("reading Siemens twix files needs the Python package twixtools, "
                             "which is not installed (pip install twixtools)", path=path) from None
    out = io.StringIO()
    try:
        with _twixtools_path(path) as name, contextlib.redirect_stdout(out), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = twixtools.read_twix(
                name, include_scans=scans, parse_prot=not data, parse_data=data,
                parse_pmu=False, parse_geometry=False, verbose=False, keep_acqend=True,
                keep_syncdata=False)
    except InputDataError:
        raise
    except MemoryError:
        raise ResourceError("the twix file's headers do not fit into memory", path=path) from None
    except Exception as exc:  # noqa: BLE001 - any twixtools failure means "unreadable file"
        raise InputDataError(f"twixtools cannot read the file ({type(exc).__name__}: "
                             f"{first_line(exc)})", path=path) from None
    printed = out.getvalue()
    if "Mdb parsing encountered an error" in printed:
        where = re.search(r"position (\d+)", printed)
        raise InputDataError("is damaged or truncated: a measurement data header "
                             + (f"at byte {where.group(1)} " if where else "")
                             + "cannot be parsed", path=path)
    if "Error parsing twix header" in printed:
        raise InputDataError("the protocol header cannot be parsed (damaged file)", path=path)
    if not isinstance(result, list) or len(result) != len(scans):
        raise InputDataError(f"twixtools found {len(result)} of the {len(scans)} measurements "
                             "asked for", path=path)
    return result


# --------------------------------------------------------------------------- protocol
def _get(tree: Any, *keys: str | int) -> Any:
    """``tree[k0][k1]...`` through dicts and lists, or None where a step is missing."""
    node = tree
    for key in keys:
        if isinstance(key, int):
            if not isinstance(node, list) or not -len(node) <= key < len(node):
                return None
        elif not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _number(value: Any) -> float | None:
    """A finite float, or None (twixtools leaves unset XProtocol values as ``''``)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _positive(*values: Any) -> float | None:
    """The first of ``values`` that is a positive number."""
    for value in values:
        number = _number(value)
        if number is not None and number > 0:
            return number
    return None


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


@dataclass(frozen=True)
class _Protocol:
    """What molrecon uses from a measurement's protocol header (None: not in the header)."""

    base_resolution: float | None
    readout_oversampling: float
    fourier_columns: float | None
    fourier_lines: float | None  # phase-encoding positions, phase oversampling included
    fourier_partitions: float | None
    phase_oversampling: float
    slice_oversampling: float
    dimension: int | None  # sKSpace.ucDimension: 2 for 2D, 4 for 3D
    fov_mm: tuple[float, float, float]  # dReadoutFOV, dPhaseFOV, dThickness (0: missing)
    trajectory: str
    dwell_us: float
    epi_factor: int
    multiband: int
    model: str | None
    field_strength_t: float | None
    protocol: str | None
    tr_ms: float | None
    te_ms: float | None
    acceleration: tuple[int, int] | None


def _protocol(hdr: Any, path: Path) -> _Protocol:
    yaps = _get(hdr, "MeasYaps")
    if not isinstance(yaps, dict) or not yaps:
        raise InputDataError("the protocol header has no MeasYaps (ASCCONV) section", path=path)
    meas = _get(hdr, "Meas") or {}
    dicom = _get(hdr, "Dicom") or {}
    ksp = _get(yaps, "sKSpace") or {}
    slc = _get(yaps, "sSliceArray", "asSlice", 0) or {}

    base = _positive(_get(ksp, "lBaseResolution"))
    columns = _positive(_get(meas, "iNoOfFourierColumns"))
    os_x = _positive(_get(meas, "flReadoutOSFactor"), _get(dicom, "flReadoutOSFactor"))
    if os_x is None:
        os_x = columns / base if columns and base and columns >= base else 1.0
    phase_os = max(_number(_get(ksp, "dPhaseOversamplingForDialog")) or 0.0, 0.0)
    slice_os = max(_number(_get(ksp, "dSliceOversamplingForDialog")) or 0.0, 0.0)
    lines = _positive(_get(meas, "iNoOfFourierLines"))
    if lines is None:
        pe = _positive(_get(ksp, "lPhaseEncodingLines"))
        lines = None if pe is None else float(round(pe * (1.0 + phase_os)))
    dimension = _number(_get(ksp, "ucDimension"))
    code = _number(_get(ksp, "ucTrajectory"))
    trajectory = ("cartesian" if code is None
                  else _TRAJECTORIES.get(int(code), f"code {int(code)}"))
    tr = _number(_get(yaps, "alTR", 0))
    te = _number(_get(yaps, "alTE", 0))
    accel = (_number(_get(yaps, "sPat", "lAccelFactPE")),
             _number(_get(yaps, "sPat", "lAccelFact3D")))
    return _Protocol(
        base_resolution=base,
        readout_oversampling=os_x,
        fourier_columns=columns,
        fourier_lines=lines,
        fourier_partitions=_positive(_get(meas, "iNoOfFourierPartitions"),
                                     _get(ksp, "lPartitions")),
        phase_oversampling=phase_os,
        slice_oversampling=slice_os,
        dimension=None if dimension is None else int(dimension),
        fov_mm=(_positive(_get(slc, "dReadoutFOV")) or 0.0,
                _positive(_get(slc, "dPhaseFOV")) or 0.0,
                _positive(_get(slc, "dThickness")) or 0.0),
        trajectory=trajectory,
        dwell_us=(_number(_get(yaps, "sRXSPEC", "alDwellTime", 0)) or 0.0) / 1000.0,
        epi_factor=int(_number(_get(yaps, "sFastImaging", "lEPIFactor")) or 1),
        multiband=int(_number(_get(yaps, "sSliceAcceleration", "lMultiBandFactor")) or 1),
        model=_text(_get(dicom, "ManufacturersModelName")),
        field_strength_t=_positive(_get(dicom, "flMagneticFieldStrength"),
                                   _get(yaps, "sProtConsistencyInfo", "flNominalB0")),
        protocol=_text(_get(yaps, "tProtocolName")) or _text(_get(dicom, "tProtocolName")),
        tr_ms=None if tr is None else tr / 1000.0,
        te_ms=None if te is None else te / 1000.0,
        acceleration=(None if accel[0] is None or accel[1] is None
                      else (int(accel[0]), int(accel[1]))),
    )


def _refuse_protocol(prot: _Protocol, path: Path) -> None:
    """Refuse what the protocol alone shows to be unsupported (before any readout is parsed)."""
    if prot.epi_factor > 1:
        raise InputDataError(f"is an EPI scan (EPI factor {prot.epi_factor}): EPI is not "
                             "supported (its reflected readouts need a phase correction that "
                             "molrecon does not do)", path=path)
    if prot.multiband > 1:
        raise InputDataError(f"uses simultaneous multi-slice (multiband factor {prot.multiband}), "
                             "which molrecon does not reconstruct", path=path)
    if prot.trajectory != "cartesian":
        raise InputDataError(f"trajectory is {prot.trajectory}: molrecon reconstructs "
                             "Cartesian data only", path=path)


# --------------------------------------------------------------------------- MDHs
def _mdh_table(mdbs: list[Any], version: str) -> np.ndarray:
    """The MDHs of ``mdbs`` as one structured array (twixtools' ctypes layout as a dtype)."""
    from twixtools import mdh_def

    dtype = np.dtype(mdh_def.Scan_header if version == "VD" else mdh_def.VB17_header)
    if not mdbs:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(b"".join(bytes(m.mdh) for m in mdbs), dtype=dtype)


def _flag_mask(mdh: np.ndarray, name: str) -> np.ndarray:
    from twixtools import mdh_def

    return (mdh["EvalInfoMask"] & np.uint64(1 << mdh_def.mask_dict[name])) != 0


def _check_complete(mdbs: list[Any], offset: int, length: int, k: int, count: int,
                    path: Path) -> list[Any]:
    """The readouts of a measurement, refusing one cut short; ACQEND removed."""
    if not mdbs or not mdbs[-1].is_flag_set("ACQEND"):
        raise InputDataError(f"is truncated mid-measurement: measurement {k + 1} of {count} "
                             "has no closing ACQEND block", path=path)
    end = offset + length
    data = mdbs[:-1]
    for mdb in data:
        if int(mdb.mem_pos) + int(mdb.dma_len) > end:
            raise InputDataError(f"is truncated mid-measurement: a readout of measurement "
                                 f"{k + 1} of {count} runs past its end (byte {end})", path=path)
    return data


def _directions(quaternion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns of the rotation matrix of quaternions ``(L, 4)`` (w, x, y, z): read, phase, slice.

    A quaternion of norm 0 (orientation not recorded) gives zero vectors, which
    the planner reports as unknown orientation.
    """
    q = np.asarray(quaternion, dtype=np.float64)
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = (q / np.where(norm > 0, norm, 1.0)).T
    read = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)], axis=1)
    phase = np.stack([2 * (x * y - w * z), 1 - 2 * (x * x + z * z), 2 * (y * z + w * x)], axis=1)
    slc = np.stack([2 * (x * z + w * y), 2 * (y * z - w * x), 1 - 2 * (x * x + y * y)], axis=1)
    zero = (norm[:, 0] == 0)[:, None]
    return (np.where(zero, 0.0, read), np.where(zero, 0.0, phase), np.where(zero, 0.0, slc))


def _ismrmrd_heads(mdh: np.ndarray, dwell_us: float) -> np.ndarray:
    """ISMRMRD acquisition headers for the MDHs (see the module docstring's table)."""
    heads = np.zeros(mdh.shape[0], dtype=head_dtype())
    heads["version"] = 1
    flags = np.zeros(mdh.shape[0], dtype=np.uint64)
    for name, flag in _FLAG_MAP.items():
        flags[_flag_mask(mdh, name)] |= flag_bit(flag)
    # PATREFANDIMASCAN is set together with PATREFSCAN: imaging and calibration, not ACS only.
    both = _flag_mask(mdh, "PATREFANDIMASCAN")
    flags[both] &= ~flag_bit(ACQ_IS_PARALLEL_CALIBRATION)
    heads["flags"] = flags
    heads["measurement_uid"] = mdh["MeasUID"].astype(np.uint32)
    heads["scan_counter"] = mdh["ScanCounter"]
    heads["acquisition_time_stamp"] = mdh["TimeStamp"]
    heads["physiology_time_stamp"][:, 0] = mdh["PMUTimeStamp"]
    heads["number_of_samples"] = mdh["SamplesInScan"]
    heads["available_channels"] = mdh["UsedChannels"]
    heads["active_channels"] = mdh["UsedChannels"]
    heads["discard_pre"] = mdh["CutOff"]["Pre"]
    heads["discard_post"] = mdh["CutOff"]["Post"]
    heads["center_sample"] = mdh["CenterCol"]
    heads["sample_time_us"] = dwell_us
    pos = mdh["SliceData"]["SlicePos"]
    heads["position"] = np.stack([pos["Sag"], pos["Cor"], pos["Tra"]], axis=1)
    read, phase, slc = _directions(mdh["SliceData"]["Quaternion"])
    heads["read_dir"], heads["phase_dir"], heads["slice_dir"] = read, phase, slc
    for counter, field in _COUNTERS.items():
        heads["idx"][field] = mdh["Counter"][counter]
    return heads


def _mode(values: np.ndarray) -> int:
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[np.argmax(counts)])


def _header_fields(prot: _Protocol, mdh: np.ndarray, lines: np.ndarray) -> HeaderFields:
    """The ISMRMRD header fields of the scan: protocol sizes, MDH counters of ``lines``.

    3D when ``ucDimension`` is 4 (or, without it, when the partition counter varies).
    The encoding limits span the lines' counters, centred on the MDH k-space centre;
    an encoded size is at least twice its centre (the whole k-space, also where a
    header counts only the lines a partial-Fourier scan acquires).
    """
    lin = mdh["Counter"]["Lin"][lines]
    par = mdh["Counter"]["Par"][lines]
    is3d = prot.dimension == 4 if prot.dimension is not None else np.unique(par).size > 1
    ky = EncodingLimit(int(lin.min()), int(lin.max()), _mode(mdh["CenterLin"][lines]))
    enc_y = max(round(prot.fourier_lines or 0), 2 * ky.center, ky.maximum + 1)
    kz = None
    enc_z = 1
    if is3d:
        kz = EncodingLimit(int(par.min()), int(par.max()), _mode(mdh["CenterPar"][lines]))
        enc_z = max(round(prot.fourier_partitions or 0), 2 * kz.center, kz.maximum + 1)
    os_x = prot.readout_oversampling
    if prot.fourier_columns:
        enc_x = round(prot.fourier_columns)
    elif prot.base_resolution:
        enc_x = round(prot.base_resolution * os_x)
    else:
        enc_x = int(mdh["SamplesInScan"][lines].max())
    fov_read, fov_phase, thickness = prot.fov_mm
    fov_y = fov_phase * (1.0 + prot.phase_oversampling)
    fov_z = thickness * (1.0 + prot.slice_oversampling) if is3d else thickness
    return HeaderFields(
        encoded_matrix=(enc_x, enc_y, enc_z),
        encoded_fov_mm=(fov_read * os_x, fov_y, fov_z),
        recon_matrix=(round(prot.base_resolution or enc_x / os_x), enc_y, enc_z),
        recon_fov_mm=(fov_read, fov_phase, thickness),
        ky_limits=ky,
        kz_limits=kz,
        trajectory=prot.trajectory,
        vendor="Siemens",
        model=prot.model,
        field_strength_t=prot.field_strength_t,
        protocol=prot.protocol,
        tr_ms=prot.tr_ms,
        te_ms=prot.te_ms,
        acceleration=prot.acceleration,
    )


def _empty_fields(prot: _Protocol) -> HeaderFields:
    """Header fields of a measurement without readouts (the planner refuses it)."""
    return HeaderFields(encoded_matrix=(1, 1, 1), encoded_fov_mm=prot.fov_mm,
                        recon_matrix=(1, 1, 1), recon_fov_mm=prot.fov_mm, ky_limits=None,
                        kz_limits=None, trajectory=prot.trajectory)


def _refuse_readouts(mdh: np.ndarray, path: Path) -> None:
    """Refuse EPI and PROPELLER scans recognised from their readouts' flags."""
    phascor = _flag_mask(mdh, "PHASCOR")
    if phascor.any():
        reflect = _flag_mask(mdh, "REFLECT")
        what = f"{int(phascor.sum())} phase-correction readouts"
        if reflect.any():
            what += f", {int(reflect.sum())} reflected readouts"
        raise InputDataError(f"is an EPI scan ({what}): EPI is not supported (its reflected "
                             "readouts need a phase correction that molrecon does not do)",
                             path=path)
    for name in ("FIRST_SCAN_IN_BLADE", "LAST_SCAN_IN_BLADE"):
        if _flag_mask(mdh, name).any():
            raise InputDataError("has PROPELLER/BLADE readouts: molrecon reconstructs "
                                 "Cartesian data only", path=path)


def _blocks(mdbs: list[Any], rows: np.ndarray, n_coils: int, n_samples: int,
            path: Path) -> Iterator[tuple[slice, np.ndarray]]:
    """Samples of ``mdbs[rows]`` as ``(n, C, Ns)`` complex64 blocks of about 64 MiB."""
    per_block = max(1, BLOCK_BYTES // (8 * n_coils * n_samples))
    for start in range(0, rows.size, per_block):
        stop = min(start + per_block, rows.size)
        out = np.empty((stop - start, n_coils, n_samples), dtype=np.complex64)
        for i, row in enumerate(rows[start:stop]):
            out[i] = _samples(mdbs[int(row)], n_coils, n_samples, path)
        yield slice(start, stop), out


def _samples(mdb: Any, n_coils: int, n_samples: int, path: Path) -> np.ndarray:
    """One readout's samples ``(C, Ns)`` via twixtools, its failures as InputDataError."""
    try:
        data = mdb.data
    except Exception as exc:  # noqa: BLE001 - a short read or a vanished file
        raise InputDataError(f"the samples of a readout cannot be read ({type(exc).__name__}: "
                             f"{first_line(exc)}); the file is damaged or truncated",
                             path=path) from None
    if not isinstance(data, np.ndarray) or data.shape != (n_coils, n_samples):
        shape = getattr(data, "shape", None)
        raise InputDataError(f"a readout holds samples of shape {shape}, its header says "
                             f"{n_coils} channels × {n_samples} samples; the file is damaged",
                             path=path)
    return data


def _noise(mdbs: list[Any], rows: np.ndarray, path: Path) -> np.ndarray | None:
    """The samples ``(C, N)`` of the noise readouts ``rows``; None if the channel counts differ."""
    channels = {int(mdbs[int(r)].mdh.UsedChannels) for r in rows}
    if len(channels) != 1:
        return None
    n_coils = channels.pop()
    total = sum(int(mdbs[int(r)].mdh.SamplesInScan) for r in rows)
    check_memory(n_coils * total * 16 * 2, f"noise samples ({n_coils}×{total})", path)
    parts = [_samples(mdbs[int(r)], n_coils, int(mdbs[int(r)].mdh.SamplesInScan), path)
             for r in rows]
    return np.concatenate(parts, axis=1) if parts else None


# --------------------------------------------------------------------------- reading
def read_twix(path: str | os.PathLike[str], *, prewhiten: bool = True) -> RawScan:
    """Read the image scan of a Siemens twix file into a :class:`RawScan` (module docstring).

    The last measurement is the image scan; ``prewhiten`` multiplies its lines by
    the inverse Cholesky factor of the coil noise covariance when the file has
    noise-adjustment readouts (``RawScan.whitened``). Unsupported or damaged
    files raise :class:`InputDataError` naming the file, with one line saying why.
    """
    p = Path(path)
    size = raw_file_size(p)
    if not is_twix(p):
        raise InputDataError("is not a Siemens twix file (neither a VD/VE multi-raid header "
                             "nor a VB protocol header at its start)", path=p)
    layout = _layout(p, size)
    count = len(layout.measurements)
    image = count - 1
    scans = [image - 1, image] if count > 1 else [image]
    notes = Notes(p)

    headers = _call_twixtools(p, scans, data=False)
    prot = _protocol(headers[-1].get("hdr"), p)
    _refuse_protocol(prot, p)

    image_mdbs = _check_complete(_call_twixtools(p, [image], data=True)[0]["mdb"],
                                 *layout.measurements[image], image, count, p)
    mdh = _mdh_table(image_mdbs, layout.version)
    _refuse_readouts(mdh, p)
    heads = _ismrmrd_heads(mdh, prot.dwell_us)
    not_imaging = flag_bit(ACQ_IS_NOISE_MEASUREMENT)
    for flag in SKIPPED_FLAGS:
        not_imaging |= flag_bit(flag)
    lines = np.flatnonzero((heads["flags"] & not_imaging) == 0)  # what the planner may place
    if lines.size == 0:  # the planner says what the measurement holds instead
        lines = np.arange(mdh.size)
    fields = _header_fields(prot, mdh, lines) if mdh.size else _empty_fields(prot)
    plan = plan_acquisitions(heads, fields, p, notes)

    noise_cov, n_noise = _noise_scan(p, layout, image_mdbs, _flag_mask(mdh, "NOISEADJSCAN"),
                                     headers, prot, plan.shape[1], notes)
    whitener = noise_whitener(noise_cov, notes) if noise_cov is not None and prewhiten else None
    kspace = assemble_kspace(
        _blocks(image_mdbs, plan.rows, plan.shape[1], plan.n_samples, p), plan, whitener, p)

    return assemble_scan(plan, fields, kspace, notes, fmt="twix", path=p, noise_cov=noise_cov,
                         whitened=whitener is not None, n_noise=n_noise)


def _noise_scan(path: Path, layout: _Layout, image_mdbs: list[Any], noise_flag: np.ndarray,
                headers: list[dict[str, Any]], prot: _Protocol, n_coils: int, notes: Notes,
                ) -> tuple[np.ndarray | None, int]:
    """Noise covariance (at the image scan's dwell time) and the number of noise readouts used.

    From the image measurement's NOISEADJSCAN readouts; without any, from those of
    the measurement before it, at that measurement's own dwell time.
    """
    rows = np.flatnonzero(noise_flag)
    mdbs, dwell_noise = image_mdbs, prot.dwell_us
    where = "the image measurement"
    if rows.size == 0 and len(headers) > 1:
        k = len(layout.measurements) - 2
        before = _check_complete(_call_twixtools(path, [k], data=True)[0]["mdb"],
                                 *layout.measurements[k], k, len(layout.measurements), path)
        mdh = _mdh_table(before, layout.version)
        rows = np.flatnonzero(_flag_mask(mdh, "NOISEADJSCAN"))
        mdbs = before
        dwell = _number(_get(headers[0].get("hdr"), "MeasYaps", "sRXSPEC", "alDwellTime", 0))
        dwell_noise = dwell / 1000.0 if dwell and dwell > 0 else 0.0
        where = f"measurement {k + 1} (the noise scan)"
    if rows.size == 0:
        return None, 0
    samples = _noise(mdbs, rows, path)
    if samples is None or samples.shape[0] != n_coils:
        channels = "differing" if samples is None else str(samples.shape[0])
        notes.add(f"the noise readouts of {where} have {channels} channels, the image scan "
                  f"{n_coils}; the noise was not used and the data were not prewhitened")
        return None, 0
    cov = noise_covariance(samples, dwell_noise, prot.dwell_us, path=path)
    if cov is None:
        notes.add("the noise readouts hold no samples; the data were not prewhitened")
        return None, 0
    return cov, int(rows.size)
