"""The twix protocol header (``MeasYaps`` ASCCONV, ``Meas`` / ``Dicom`` XProtocol) -> ISMRMRD.

:func:`parse_protocol` reads what molrecon uses from twixtools' parsed header into a
:class:`Protocol`; :func:`refuse_protocol` refuses what the protocol alone shows to
be unsupported (EPI, simultaneous multi-slice, non-Cartesian trajectories);
:func:`header_fields` then gives the ISMRMRD header fields of the scan
(:class:`~molrecon.io.ismrmrd.HeaderFields`), its encoding limits spanning the
MDH counters of the lines.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputDataError
from ..ismrmrd import EncodingLimit, HeaderFields

__all__ = [
    "Protocol",
    "empty_fields",
    "header_fields",
    "noise_dwell_us",
    "parse_protocol",
    "refuse_protocol",
]

# Siemens sKSpace.ucTrajectory values.
_TRAJECTORIES = {1: "cartesian", 2: "radial", 4: "spiral", 8: "propeller (BLADE)"}


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
class Protocol:
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


def parse_protocol(hdr: Any, path: Path) -> Protocol:
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
    return Protocol(
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


def refuse_protocol(prot: Protocol, path: Path) -> None:
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


def noise_dwell_us(hdr: Any) -> float:
    """The dwell time (µs) in the protocol header of a noise measurement; 0 where unset."""
    dwell = _number(_get(hdr, "MeasYaps", "sRXSPEC", "alDwellTime", 0))
    return dwell / 1000.0 if dwell and dwell > 0 else 0.0


# --------------------------------------------------------------------------- header fields
def _mode(values: np.ndarray) -> int:
    uniq, counts = np.unique(values, return_counts=True)
    return int(uniq[np.argmax(counts)])


def header_fields(prot: Protocol, mdh: np.ndarray, lines: np.ndarray) -> HeaderFields:
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


def empty_fields(prot: Protocol) -> HeaderFields:
    """Header fields of a measurement without readouts (the planner refuses it)."""
    return HeaderFields(encoded_matrix=(1, 1, 1), encoded_fov_mm=prot.fov_mm,
                        recon_matrix=(1, 1, 1), recon_fov_mm=prot.fov_mm, ky_limits=None,
                        kz_limits=None, trajectory=prot.trajectory)
