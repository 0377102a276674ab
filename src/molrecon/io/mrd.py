"""MRD v2 raw data: the streaming successor of ISMRMRD, as written by mrd-python.

An MRD v2 file is one stream of the yardl protocol ``Mrd``: an optional header
(the ISMRMRD XML header as typed fields), then a stream of items, of which
molrecon uses the acquisitions. Both of yardl's encodings are read: the compact
binary one (``.bin`` / ``.mrd``) and NDJSON (one JSON value per line, much
larger and slower). The stream is decoded by mrd-python (MIT; imported only
when such a file is read).

The v2 header is the ISMRMRD XML header with typed fields, so molrecon builds
the ISMRMRD header objects (``ismrmrd.xsd``, what the XML parses into) from it;
the acquisitions become an in-memory ISMRMRD acquisition header table plus
their sample arrays. Both go to the ISMRMRD reader's header evaluation, planner
and assembler (:mod:`molrecon.io.ismrmrd`), as the twix reader does: flags,
counters, readout placement, oversampling removal, averaging, calibration,
slice ordering, geometry and prewhitening are exactly those of the same scan
stored as ISMRMRD HDF5, and the readers cannot drift apart.

Recognising a file (:func:`is_mrd2`, from content, never the name)
------------------------------------------------------------------
* binary: the magic bytes ``yardl``, a little-endian int32 format version,
  then the protocol's JSON schema as a varint-prefixed string, which must name
  the protocol ``Mrd`` (``{"protocol":{"name":"Mrd",...``);
* NDJSON: a first line ``{"yardl":{"version":1,"schema":{"protocol":{"name":"Mrd",...``.

A binary file cut short after its magic bytes, or an NDJSON one inside its
first line, still counts (:func:`read_mrd2` then says it is truncated). Other
yardl protocols (``MrdNoiseCovariance``) are not MRD v2 raw data.

v2 header -> ISMRMRD header (the fields molrecon uses; names 1:1 with the XML schema)
-------------------------------------------------------------------------------------
==================================================  ==========================================
MRD v2 ``Header``                                   ISMRMRD XML
==================================================  ==========================================
encoding[i].encoded_space / recon_space             encoding[i].encodedSpace / reconSpace
  .matrix_size.x/y/z, .field_of_view_mm.x/y/z         .matrixSize, .fieldOfView_mm
encoding[i].encoding_limits.<counter>               encodingLimits.<counter> (min, max, centre)
encoding[i].trajectory (enum)                       trajectory (its name in lower case)
encoding[i].parallel_imaging.acceleration_factor,   parallelImaging.accelerationFactor,
  .calibration_mode                                   .calibrationMode
acquisition_system_information.system_vendor,       acquisitionSystemInformation.systemVendor,
  system_model, system_field_strength_t,              systemModel, systemFieldStrength_T,
  receiver_channels                                   receiverChannels
measurement_information.protocol_name               measurementInformation.protocolName
sequence_parameters.t_r / t_e                       sequenceParameters.TR / TE
==================================================  ==========================================

The v2 header stores fields of view, field strength, TR and TE as float32; each
is taken as the shortest decimal that rounds to it (2.89362, not 2.8936200142),
the value an ISMRMRD XML header of the same scan holds.

v2 acquisition -> ISMRMRD acquisition header
--------------------------------------------
The flags are ISMRMRD's bit for bit (``AcquisitionFlags``); ``idx`` counters,
``discard_pre`` / ``_post``, ``center_sample``, ``encoding_space_ref``,
``sample_time_us``, time stamps, ``position`` and the direction cosines copy
over by name, an absent optional value becoming 0 (ISMRMRD's "not set"). The
channel and sample counts come from the shape ``(coils, samples)`` of the
acquisition's data; ``trajectory_dimensions`` from its trajectory array (any
trajectory coordinates mean non-Cartesian data, which the planner refuses).
Values beyond the ISMRMRD field widths (counters, sample and channel counts are
16-bit there) are refused.

Other stream items: waveforms (ECG, respiration) are ignored, as in ISMRMRD
files; images and other items are ignored with a warning, and a stream of
nothing else is refused.

Memory: a stream cannot be read out of order, so the samples of every used
acquisition (imaging and noise) are kept while the stream is read, then placed;
the binary file's size is checked against the memory available first.

Refused (:class:`~molrecon.errors.InputDataError`, one line naming the file)
----------------------------------------------------------------------------
A file that is not an MRD v2 stream, an empty or truncated one (the binary
stream ends with an end-of-stream mark; an NDJSON file cut at a line boundary
cannot be told from a complete one), a damaged one (anything mrd-python cannot
decode), one written against another MRD schema or yardl format version than
the installed mrd-python reads, one without a header or without an encoding,
non-Cartesian data (a trajectory other than Cartesian in the header, or
trajectory coordinates in the acquisitions), and everything the ISMRMRD
planner refuses. Without mrd-python installed, reading says to install it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputDataError, ResourceError
from .ismrmrd import (
    ACQ_IS_NOISE_MEASUREMENT,
    SKIPPED_FLAGS,
    assemble_kspace,
    assemble_scan,
    flag_bit,
    head_dtype,
    header_fields,
    plan_acquisitions,
)
from .kspace import (
    BLOCK_BYTES,
    Notes,
    check_memory,
    first_line,
    noise_covariance,
    noise_whitener,
    raw_file_size,
)
from .types import RawScan

__all__ = ["is_mrd2", "read_mrd2"]

_MAGIC = b"yardl"
_PROTOCOL = b'{"protocol":{"name":"Mrd",'
_NDJSON_START = b'{"yardl":{"version":1,"schema":' + _PROTOCOL
_SNIFF_BYTES = 256

# Acquisition header fields (ISMRMRD name) copied from the v2 header: optional scalars.
_OPTIONAL_FIELDS = ("scan_counter", "acquisition_time_stamp", "discard_pre", "discard_post",
                    "center_sample", "encoding_space_ref", "sample_time_us")
_VECTOR_FIELDS = ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position")
_COUNTERS = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast",
             "phase", "repetition", "set", "segment")
_LIMITS = ("kspace_encoding_step_0", "kspace_encoding_step_1", "kspace_encoding_step_2",
           "average", "slice", "contrast", "phase", "repetition", "set", "segment",
           *(f"user_{i}" for i in range(8)))


# --------------------------------------------------------------------------- recognition
def _varint(head: bytes, pos: int) -> tuple[int, int] | None:
    """Unsigned LEB128 varint at ``head[pos:]``: (value, end), or None where ``head`` ends."""
    value = shift = 0
    while pos < len(head) and shift < 64:
        byte = head[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7
    return None


def _encoding(head: bytes) -> str | None:
    """``"binary"`` or ``"ndjson"`` if ``head`` starts an MRD v2 stream, else None."""
    if head.startswith(_MAGIC):
        # magic, int32 format version, varint schema length, schema JSON text
        length = _varint(head, len(_MAGIC) + 4)
        if length is None:  # cut short before the schema: the magic decides
            return "binary"
        schema = head[length[1]:]
        return "binary" if _PROTOCOL.startswith(schema[:len(_PROTOCOL)]) else None
    text = head.lstrip(b" \t\r\n")
    if text.startswith(b"{") and _NDJSON_START.startswith(text[:len(_NDJSON_START)]):
        return "ndjson"
    return None


def _schema_end(head: bytes) -> int | None:
    """Where the schema of a binary stream ends (its first item starts); None if cut before."""
    length = _varint(head, len(_MAGIC) + 4)
    return None if length is None else length[1] + length[0]


def _sniff(path: str | os.PathLike[str]) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    return _encoding(head) if head else None


def is_mrd2(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds an MRD v2 stream (binary or NDJSON), judged from its first bytes.

    Reads at most 256 bytes. Missing, unreadable or empty paths are not MRD v2.
    """
    return _sniff(path) is not None


# --------------------------------------------------------------------------- header
def _enum_name(value: Any) -> str:
    """A v2 enum member as the ISMRMRD schema spells it (lower case); an unknown one as text."""
    name = getattr(value, "name", "") or ""
    return name.lower() if name else str(value)


def _decimal(value: Any) -> Any:
    """A float32 of the v2 header as the shortest decimal that it rounds from (2.89362, not
    2.8936200141906738): the value an ISMRMRD XML header of the same scan holds."""
    return None if value is None else float(str(np.float32(value)))


def _ismrmrd_header(header: Any) -> Any:
    """The ``ismrmrd.xsd.ismrmrdHeader`` of the fields molrecon uses (module docstring)."""
    from ismrmrd import xsd

    def space(s: Any) -> Any:
        m, f = s.matrix_size, s.field_of_view_mm
        return xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=m.x, y=m.y, z=m.z),
            fieldOfView_mm=xsd.fieldOfViewMm(x=_decimal(f.x), y=_decimal(f.y), z=_decimal(f.z)))

    def limit(lim: Any) -> Any:
        return None if lim is None else xsd.limitType(minimum=lim.minimum, maximum=lim.maximum,
                                                      center=lim.center)

    def trajectory(value: Any) -> Any:
        name = _enum_name(value)
        try:
            return xsd.trajectoryType(name)
        except ValueError:
            return name  # the planner refuses it by name

    def parallel(p: Any) -> Any:
        if p is None:
            return None
        mode = None
        if p.calibration_mode is not None:
            name = _enum_name(p.calibration_mode)
            try:
                mode = xsd.calibrationModeType(name)
            except ValueError:
                mode = name
        af = p.acceleration_factor
        return xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(
                kspace_encoding_step_1=af.kspace_encoding_step_1,
                kspace_encoding_step_2=af.kspace_encoding_step_2),
            calibrationMode=mode)

    def patient_position(value: Any) -> Any:  # H_FS -> HFS
        name = _enum_name(value).replace("_", "").upper()
        try:
            return xsd.patientPositionType(name)
        except ValueError:
            return name

    encodings = []
    for enc in header.encoding:
        lims = enc.encoding_limits
        encodings.append(xsd.encodingType(
            encodedSpace=space(enc.encoded_space),
            reconSpace=space(enc.recon_space),
            encodingLimits=xsd.encodingLimitsType(
                **{name: limit(getattr(lims, name, None)) for name in _LIMITS}),
            trajectory=trajectory(enc.trajectory),
            parallelImaging=parallel(enc.parallel_imaging),
        ))
    system = header.acquisition_system_information
    meas = header.measurement_information
    seq = header.sequence_parameters
    return xsd.ismrmrdHeader(
        encoding=encodings,
        acquisitionSystemInformation=None if system is None else
        xsd.acquisitionSystemInformationType(
            systemVendor=system.system_vendor, systemModel=system.system_model,
            systemFieldStrength_T=_decimal(system.system_field_strength_t),
            receiverChannels=system.receiver_channels),
        measurementInformation=None if meas is None else
        xsd.measurementInformationType(protocolName=meas.protocol_name,
                                       patientPosition=patient_position(meas.patient_position)),
        sequenceParameters=None if seq is None else
        xsd.sequenceParametersType(TR=[_decimal(v) for v in seq.t_r],
                                   TE=[_decimal(v) for v in seq.t_e]),
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=header.experimental_conditions.h1resonance_frequency_hz),
    )


def _fields(header: Any, path: Path) -> Any:
    """:class:`~molrecon.io.ismrmrd.HeaderFields` of a v2 header, as for an ISMRMRD file."""
    if header is None:
        raise InputDataError("has no header (the MRD stream's optional header is absent)",
                             path=path)
    if not header.encoding:
        raise InputDataError("header has no encoding", path=path)
    try:
        return header_fields(_ismrmrd_header(header), False)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputDataError(f"header has an unusable value: {exc}", path=path) from None


# --------------------------------------------------------------------------- acquisitions
@dataclass
class _Stream:
    """What the stream held: ISMRMRD-style headers, the kept samples, the other items."""

    heads: np.ndarray
    samples: list[np.ndarray | None]  # (C, Ns) complex64 per acquisition; None where skipped
    others: dict[str, int]


class _Table:
    """Acquisition header columns, filled one v2 acquisition at a time."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in (
            "flags", "measurement_uid", "number_of_samples", "active_channels",
            "trajectory_dimensions", "physiology_time_stamp", "user_int", "user_float",
            *_OPTIONAL_FIELDS, *_VECTOR_FIELDS, *(f"idx.{c}" for c in _COUNTERS), "idx.user")}

    def add(self, head: Any, shape: tuple[int, ...], traj: np.ndarray) -> None:
        c = self.cols
        c["flags"].append(int(head.flags))
        c["measurement_uid"].append(head.measurement_uid)
        c["active_channels"].append(shape[0])
        c["number_of_samples"].append(shape[1])
        c["trajectory_dimensions"].append(traj.shape[0] if traj.size else 0)
        c["physiology_time_stamp"].append(_padded(head.physiology_time_stamp, 3))
        c["user_int"].append(_padded(head.user_int, 8))
        c["user_float"].append(_padded(head.user_float, 8))
        for name in _OPTIONAL_FIELDS:
            value = getattr(head, name)
            c[name].append(0 if value is None else value)
        for name in _VECTOR_FIELDS:
            c[name].append(getattr(head, name))
        idx = head.idx
        for name in _COUNTERS:
            value = getattr(idx, name)
            c[f"idx.{name}"].append(0 if value is None else value)
        c["idx.user"].append(_padded(idx.user, 8))

    def heads(self, path: Path) -> np.ndarray:
        """The columns as ISMRMRD's acquisition header table; values that do not fit refused."""
        n = len(self.cols["flags"])
        heads = np.zeros(n, dtype=head_dtype())
        heads["version"] = 1
        for key, values in self.cols.items():
            target = heads["idx"][key[4:]] if key.startswith("idx.") else heads[key]
            kind = target.dtype.kind
            dtype = np.float64 if kind == "f" else (np.uint64 if key == "flags" else np.int64)
            arr = np.asarray(values, dtype=dtype).reshape(target.shape)
            if kind in "iu" and arr.size:
                info = np.iinfo(target.dtype)
                bad = arr[(arr < info.min) | (arr > info.max)]
                if bad.size:
                    raise InputDataError(
                        f"acquisition header field {key} holds {int(bad[0])}, beyond the range "
                        f"{info.min}..{info.max} that ISMRMRD (and molrecon) use", path=path)
            target[...] = arr
        heads["available_channels"] = heads["active_channels"]
        return heads


def _padded(values: Any, n: int) -> list[Any]:
    """The first ``n`` of ``values``, padded with zeros (v2 lists, ISMRMRD fixed arrays)."""
    out = list(values)[:n]
    return out + [0] * (n - len(out))


def _decode(path: Path, encoding: str, size: int) -> tuple[Any, _Stream]:
    """Header and acquisitions of the stream, decoded by mrd-python; failures refused.

    A decoding failure counts as truncation where the reader got to the end of a
    binary file (the end-of-stream mark is missing), or where an NDJSON file does
    not end with a line break (its last line is incomplete).
    """
    try:
        import mrd
    except ImportError:
        raise InputDataError("reading MRD v2 files needs the Python package mrd-python, which "
                             "is not installed (pip install mrd-python)", path=path) from None
    with open(path, "rb") as raw:
        if encoding == "binary":
            stream: Any = raw

            def at_end() -> bool:
                return raw.tell() >= size
        else:
            raw.seek(-1, os.SEEK_END)
            cut = raw.read(1) != b"\n"
            raw.seek(0)
            stream = io.TextIOWrapper(raw, encoding="utf-8")

            def at_end() -> bool:
                return cut
        try:
            reader = (mrd.BinaryMrdReader if encoding == "binary" else mrd.NDJsonMrdReader)(stream)
        except Exception as exc:  # noqa: BLE001 - mrd-python raises RuntimeError, ValueError, ...
            raise _header_error(exc, encoding, at_end(), path) from None
        return _read_stream(reader, path, at_end)


def _header_error(exc: Exception, encoding: str, at_end: bool, path: Path) -> InputDataError:
    """Why mrd-python refused the stream's preamble (magic, format version, schema)."""
    text = first_line(exc)
    version = _package_version()
    if at_end or isinstance(exc, EOFError):
        why = "is truncated: the stream breaks off inside its schema"
    elif not _schema_is_json(path, encoding):
        why = "is damaged: its schema (the stream's self-description) is not valid JSON"
    elif "schema" in text.lower():
        why = ("was written against another version of the MRD schema than the installed "
               f"mrd-python {version} reads (install the mrd-python that wrote it)")
    elif "version" in text.lower():
        why = (f"uses a yardl {encoding} format version that the installed mrd-python "
               f"{version} does not read")
    else:
        why = f"is not a readable MRD v2 stream ({type(exc).__name__}: {text})"
    return InputDataError(why, path=path)


def _read_stream(reader: Any, path: Path, at_end: Any) -> tuple[Any, _Stream]:
    """Header and acquisitions from an open mrd-python reader (see :func:`_decode`)."""
    import mrd

    skipped = np.uint64(0)
    for flag in SKIPPED_FLAGS:
        skipped |= flag_bit(flag)
    noise = flag_bit(ACQ_IS_NOISE_MEASUREMENT)
    table = _Table()
    samples: list[np.ndarray | None] = []
    others: dict[str, int] = {}
    where = "inside its header"
    try:
        header = reader.read_header()
        where = "before its first acquisition"
        for item in reader.read_data():
            if not isinstance(item, mrd.StreamItem.Acquisition):
                others[item.tag] = others.get(item.tag, 0) + 1
                continue
            acq = item.value
            data = np.asarray(acq.data)
            if data.ndim != 2:
                raise InputDataError(f"acquisition {len(samples) + 1} holds samples of shape "
                                     f"{data.shape}, not (coils, samples)", path=path)
            table.add(acq.head, data.shape, np.asarray(acq.trajectory))
            flags = np.uint64(int(acq.head.flags))
            keep = (flags & noise) != 0 or (flags & skipped) == 0
            samples.append(data.astype(np.complex64, copy=False) if keep else None)
            where = f"after acquisition {len(samples)}"
        reader.close()
    except InputDataError:
        raise
    except MemoryError:
        raise ResourceError(f"the stream does not fit into memory (or is damaged {where})",
                            path=path) from None
    except Exception as exc:  # noqa: BLE001 - any decoding failure: truncated or damaged
        if isinstance(exc, EOFError) or at_end():
            raise InputDataError(f"is truncated: the stream breaks off {where}",
                                 path=path) from None
        raise InputDataError(f"is damaged {where} ({type(exc).__name__}: {first_line(exc)})",
                             path=path) from None
    return header, _Stream(table.heads(path), samples, others)


def _schema_is_json(path: Path, encoding: str) -> bool:
    """Whether the stream's schema parses as JSON (another schema) or not (a damaged one)."""
    try:
        with open(path, "rb") as f:
            if encoding != "binary":
                json.loads(f.readline())
                return True
            head = f.read(32)
            length = _varint(head, len(_MAGIC) + 4)
            if length is None:
                return False
            f.seek(length[1])
            json.loads(f.read(length[0]).decode("utf-8"))
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return False
    return True


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mrd-python")
    except PackageNotFoundError:  # pragma: no cover - imported from a source tree
        return "(unknown version)"


# --------------------------------------------------------------------------- reading
def read_mrd2(path: str | os.PathLike[str], *, prewhiten: bool = True) -> RawScan:
    """Read a Cartesian MRD v2 stream (binary or NDJSON) into a :class:`RawScan`.

    Everything after decoding is the ISMRMRD reader's (module docstring):
    ``prewhiten`` multiplies the data by the inverse Cholesky factor of the coil
    noise covariance estimated from the noise acquisitions (``RawScan.whitened``).
    Unusable files raise :class:`InputDataError` naming the file, in one line.
    """
    p = Path(path)
    size = raw_file_size(p)
    encoding = _sniff(p)
    if encoding is None:
        raise InputDataError("is not an MRD v2 stream (neither the yardl binary magic nor an "
                             "NDJSON yardl header of the Mrd protocol at its start)", path=p)
    if encoding == "binary":
        with open(p, "rb") as f:
            end = _schema_end(f.read(32))
        if end is None or size < end:
            raise InputDataError(f"is truncated: {size} bytes, shorter than its stream header "
                                 "(magic, format version and schema)", path=p)
        check_memory(size, "the MRD stream's samples", p)  # held in memory while read
    notes = Notes(p)
    header, stream = _decode(p, encoding, size)
    fields = _fields(header, p)
    if fields.n_encodings > 1:
        notes.add(f"the header has {fields.n_encodings} encoding spaces; only the first is used")
    if stream.others and not stream.samples:
        kinds = ", ".join(f"{n} {tag}" for tag, n in sorted(stream.others.items()))
        raise InputDataError(f"holds no acquisitions, only {kinds}: not raw data", path=p)
    others = {tag: n for tag, n in stream.others.items() if tag != "WaveformUint32"}
    if others:  # waveforms (ECG, respiration) are ignored silently, as in ISMRMRD files
        kinds = ", ".join(f"{n} {tag}" for tag, n in sorted(others.items()))
        notes.add(f"the stream also holds items that are not acquisitions ({kinds}); ignored")
    heads = stream.heads
    plan = plan_acquisitions(heads, fields, p, notes)

    noise_rows = np.flatnonzero((heads["flags"] & flag_bit(ACQ_IS_NOISE_MEASUREMENT)) != 0)
    noise_cov = whitener = None
    if noise_rows.size:
        noise_cov = _noise(stream, noise_rows, plan.rows, plan.shape[1], p)
        if noise_cov is None:
            notes.add("the noise acquisitions hold no samples; the data were not prewhitened")
        elif prewhiten:
            whitener = noise_whitener(noise_cov, notes)
    kspace = assemble_kspace(
        _blocks(stream.samples, plan.rows, plan.shape[1], plan.n_samples), plan, whitener, p)
    stream.samples.clear()

    return assemble_scan(plan, fields, kspace, notes, fmt="mrd2", path=p, noise_cov=noise_cov,
                         whitened=whitener is not None, n_noise=int(noise_rows.size))


def _blocks(samples: list[np.ndarray | None], rows: np.ndarray, n_coils: int,
            n_samples: int) -> Iterator[tuple[slice, np.ndarray]]:
    """Samples of ``rows`` as ``(n, C, Ns)`` complex64 blocks of about 64 MiB.

    The planner checked that every row has ``n_coils`` × ``n_samples`` samples (the
    header's counts are the data's shape).
    """
    per_block = max(1, BLOCK_BYTES // (8 * n_coils * n_samples))
    for start in range(0, rows.size, per_block):
        stop = min(start + per_block, rows.size)
        yield slice(start, stop), np.stack([samples[int(r)] for r in rows[start:stop]])


def _noise(stream: _Stream, rows: np.ndarray, data_rows: np.ndarray, n_coils: int,
           path: Path) -> np.ndarray | None:
    """Noise covariance over all noise samples, at the data's dwell time (as for ISMRMRD)."""
    heads = stream.heads
    channels = heads["active_channels"][rows]
    if (channels != n_coils).any():
        raise InputDataError(f"inconsistent coil counts: noise acquisitions have "
                             f"{int(channels[channels != n_coils][0])} channels, imaging "
                             f"acquisitions {n_coils}", path=path)
    total = int(heads["number_of_samples"][rows].astype(np.int64).sum())
    check_memory(n_coils * total * 16 * 2, f"noise samples ({n_coils}×{total})", path)
    parts = [stream.samples[int(r)] for r in rows]
    dwell_noise = float(heads["sample_time_us"][rows].astype(np.float64).mean())
    dwell_data = (float(heads["sample_time_us"][data_rows].astype(np.float64).mean())
                  if data_rows.size else 0.0)
    return noise_covariance(np.concatenate(parts, axis=1), dwell_noise, dwell_data, path=path)

