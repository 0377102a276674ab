"""The ISMRMRD XML header: from the document to the facts molrecon uses.

:func:`parse_ismrmrd_header` parses the XML strictly first and, for a header
written against a newer schema, again with unknown elements ignored; it gives
:class:`HeaderFields` (first encoding space: matrix sizes, fields of view,
encoding limits, trajectory, scanner and sequence facts) or an
:class:`~molrecon.errors.InputDataError`. The rules (schema ranges, fields of
view that count as missing, entity expansion) are the "Header" paragraph of
the :mod:`molrecon.io.ismrmrd` docstring. :func:`header_fields` takes an already
parsed header object (the MRD v2 reader builds one from its own header) to
the same :class:`HeaderFields`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any

from ...errors import InputDataError
from .layout import MAX_FOV_MM

__all__ = ["EncodingLimit", "HeaderFields", "header_fields", "parse_ismrmrd_header"]

_USHORT_MAX = 65535  # matrix sizes, encoding limits and idx values are 16-bit in ISMRMRD


@dataclass(frozen=True)
class EncodingLimit:
    """The ``encodingLimits`` of one encoding counter: its range and its centre."""

    minimum: int
    maximum: int
    center: int


@dataclass(frozen=True)
class HeaderFields:
    """What molrecon uses from an ISMRMRD XML header (first encoding space)."""

    encoded_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    ky_limits: EncodingLimit | None
    kz_limits: EncodingLimit | None
    trajectory: str
    n_encodings: int = 1
    vendor: str | None = None
    model: str | None = None
    field_strength_t: float | None = None
    protocol: str | None = None
    tr_ms: float | None = None
    te_ms: float | None = None
    receiver_channels: int | None = None
    acceleration: tuple[int, int] | None = None
    calibration_mode: str | None = None
    unknown_elements_ignored: bool = False


def _enum_text(value: Any) -> str:
    return str(value.value if isinstance(value, Enum) else value)


def _first(values: Any) -> float | None:
    if values is None:
        return None
    if isinstance(values, (list, tuple)):
        return float(values[0]) if values else None
    return float(values)


def parse_ismrmrd_header(xml: bytes | str, *, path: object | None = None) -> HeaderFields:
    """Parse an ISMRMRD XML header (strict first, then ignoring unknown elements).

    Raises :class:`InputDataError` (naming ``path``) for anything that is not a
    usable ISMRMRD header.
    """
    from ismrmrd import xsd
    from xsdata.exceptions import ParserError
    from xsdata.formats.dataclass.parsers import XmlParser
    from xsdata.formats.dataclass.parsers.config import ParserConfig

    if isinstance(xml, str):
        xml = xml.encode("utf-8")
    ignored = False
    with warnings.catch_warnings():
        # xsdata warns when a value does not convert (an unknown enum value): molrecon
        # checks the fields it uses itself, with its own messages.
        warnings.simplefilter("ignore")
        try:
            hdr = xsd.CreateFromDocument(xml)
        except ParserError as exc:
            if "Unknown property" not in str(exc):
                raise InputDataError(f"XML header cannot be parsed: {exc}", path=path) from None
            try:
                parser = XmlParser(config=ParserConfig(fail_on_unknown_properties=False))
                hdr = parser.from_bytes(xml, xsd.ismrmrdHeader)
            except Exception as exc2:  # noqa: BLE001 - any parser failure means "unusable header"
                raise InputDataError(f"XML header cannot be parsed: {exc2}", path=path) from None
            ignored = True
        except Exception as exc:  # noqa: BLE001 - xsdata raises TypeError for missing elements
            raise InputDataError(f"XML header is not a complete ISMRMRD header: {exc}",
                                 path=path) from None
    if not getattr(hdr, "encoding", None):
        raise InputDataError("XML header has no <encoding> section", path=path)
    try:
        return header_fields(hdr, ignored)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputDataError(f"XML header has an unusable value: {exc}", path=path) from None


def _ushort(value: Any, what: str) -> int:
    """An ``unsignedShort`` of the schema (matrix sizes, encoding limits): 0..65535."""
    number = int(value)
    if not 0 <= number <= _USHORT_MAX:
        raise ValueError(f"{what} = {number} is outside the schema's range 0..{_USHORT_MAX}")
    return number


def _finite_or(value: Any, default: float | None) -> float | None:
    """``float(value)``, or ``default`` where it is missing or not finite (NaN, ±inf)."""
    if value is None:
        return default
    number = float(value)
    return number if math.isfinite(number) else default


def header_fields(hdr: Any, ignored: bool) -> HeaderFields:
    """The :class:`HeaderFields` of a parsed header (``ismrmrd.xsd.ismrmrdHeader``).

    ``ignored`` says whether unknown elements were dropped while parsing. Raises
    ``TypeError``, ``ValueError`` or ``AttributeError`` for an unusable value; the
    callers report those as :class:`InputDataError`.
    """
    enc = hdr.encoding[0]

    def matrix(space: Any, name: str) -> tuple[int, int, int]:
        m = space.matrixSize
        return (_ushort(m.x, f"{name} matrix x"), _ushort(m.y, f"{name} matrix y"),
                _ushort(m.z, f"{name} matrix z"))

    def fov(space: Any) -> tuple[float, float, float]:
        # A field of view that is not finite or beyond MAX_FOV_MM counts as missing (0):
        # the geometry then falls back to 1 mm voxels with a GeometryWarning.
        f = space.fieldOfView_mm
        values = (_finite_or(f.x, 0.0), _finite_or(f.y, 0.0), _finite_or(f.z, 0.0))
        return tuple(v if v is not None and abs(v) <= MAX_FOV_MM else 0.0
                     for v in values)  # type: ignore[return-value]

    def limit(lim: Any, name: str) -> EncodingLimit | None:
        if lim is None:
            return None
        return EncodingLimit(_ushort(lim.minimum, f"{name} minimum"),
                             _ushort(lim.maximum, f"{name} maximum"),
                             _ushort(lim.center, f"{name} center"))

    limits = enc.encodingLimits
    system = hdr.acquisitionSystemInformation
    meas = hdr.measurementInformation
    seq = hdr.sequenceParameters
    accel = None
    cal_mode = None
    if enc.parallelImaging is not None:
        af = enc.parallelImaging.accelerationFactor
        accel = (int(af.kspace_encoding_step_1), int(af.kspace_encoding_step_2))
        if enc.parallelImaging.calibrationMode is not None:
            cal_mode = _enum_text(enc.parallelImaging.calibrationMode)
    return HeaderFields(
        encoded_matrix=matrix(enc.encodedSpace, "encoded"),
        encoded_fov_mm=fov(enc.encodedSpace),
        recon_matrix=matrix(enc.reconSpace, "recon"),
        recon_fov_mm=fov(enc.reconSpace),
        ky_limits=(limit(limits.kspace_encoding_step_1, "kspace_encoding_step_1")
                   if limits is not None else None),
        kz_limits=(limit(limits.kspace_encoding_step_2, "kspace_encoding_step_2")
                   if limits is not None else None),
        trajectory=_enum_text(enc.trajectory).strip().lower(),
        n_encodings=len(hdr.encoding),
        vendor=None if system is None else system.systemVendor,
        model=None if system is None else system.systemModel,
        field_strength_t=(None if system is None
                          else _finite_or(system.systemFieldStrength_T, None)),
        protocol=None if meas is None else meas.protocolName,
        tr_ms=None if seq is None else _finite_or(_first(seq.TR), None),
        te_ms=None if seq is None else _finite_or(_first(seq.TE), None),
        receiver_channels=(None if system is None or system.receiverChannels is None
                           else int(system.receiverChannels)),
        acceleration=accel,
        calibration_mode=cal_mode,
        unknown_elements_ignored=ignored,
    )
