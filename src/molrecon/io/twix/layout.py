"""The twix file and its measurements: recognition, measurement layout, twixtools.

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

:func:`file_layout` lists the measurements (offset, length) and refuses a file
shorter than its multi-raid header or whose measurements end past its end;
:func:`call_twixtools` parses measurements with twixtools (MIT; imported only
here, when a twix file is read), its failures turned into one-line
:class:`~molrecon.errors.InputDataError`; :func:`check_complete` refuses a
measurement without its closing ACQEND block or with a readout that runs past
its end (a truncated copy).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import InputDataError, ResourceError
from ..kspace import first_line

__all__ = ["Layout", "call_twixtools", "check_complete", "file_layout", "is_twix"]

_RAID_HEADER_BYTES = 8 + 64 * 152  # MrParcRaidFileHeader + 64 MrParcRaidFileEntry
_MAX_MEASUREMENTS = 64
_MEAS_HEADER_NAME = re.compile(rb"[A-Za-z]\w{3,}\x00")
_TWIXTOOLS_VD_LIMIT = 10000  # twixtools takes a file for VD/VE when its first uint32 is below this


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
class Layout:
    version: str  # "VB" or "VD"
    measurements: tuple[tuple[int, int], ...]  # (offset, length) in bytes


def file_layout(path: Path, size: int) -> Layout:
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
        return Layout("VB", ((0, size),))
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
    return Layout("VD", tuple(measurements))


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


def call_twixtools(path: Path, scans: list[int], *, data: bool) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------- completeness
def check_complete(mdbs: list[Any], offset: int, length: int, k: int, count: int,
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
