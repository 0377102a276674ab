"""Twix measurement data headers (MDHs, one per readout) -> ISMRMRD acquisition headers.

The MDHs of a measurement become one numpy structured array (twixtools' ctypes
layout as a dtype, :func:`mdh_table`), and :func:`ismrmrd_heads` translates it
into acquisition headers of the ISMRMRD layout
(:func:`~molrecon.io.ismrmrd.head_dtype`) for the ISMRMRD planner:

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

:func:`refuse_readouts` refuses EPI (phase-correction readouts) and
PROPELLER/BLADE scans recognised from the readouts' flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputDataError
from ..ismrmrd import (
    ACQ_IS_NOISE_MEASUREMENT,
    ACQ_IS_PARALLEL_CALIBRATION,
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    ACQ_IS_REVERSE,
    flag_bit,
    head_dtype,
)

__all__ = ["flag_mask", "ismrmrd_heads", "mdh_table", "refuse_readouts"]

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


def mdh_table(mdbs: list[Any], version: str) -> np.ndarray:
    """The MDHs of ``mdbs`` as one structured array (twixtools' ctypes layout as a dtype)."""
    from twixtools import mdh_def

    dtype = np.dtype(mdh_def.Scan_header if version == "VD" else mdh_def.VB17_header)
    if not mdbs:
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(b"".join(bytes(m.mdh) for m in mdbs), dtype=dtype)


def flag_mask(mdh: np.ndarray, name: str) -> np.ndarray:
    from twixtools import mdh_def

    return (mdh["EvalInfoMask"] & np.uint64(1 << mdh_def.mask_dict[name])) != 0

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


def ismrmrd_heads(mdh: np.ndarray, dwell_us: float) -> np.ndarray:
    """ISMRMRD acquisition headers for the MDHs (see the module docstring's table)."""
    heads = np.zeros(mdh.shape[0], dtype=head_dtype())
    heads["version"] = 1
    flags = np.zeros(mdh.shape[0], dtype=np.uint64)
    for name, flag in _FLAG_MAP.items():
        flags[flag_mask(mdh, name)] |= flag_bit(flag)
    # PATREFANDIMASCAN is set together with PATREFSCAN: imaging and calibration, not ACS only.
    both = flag_mask(mdh, "PATREFANDIMASCAN")
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

def refuse_readouts(mdh: np.ndarray, path: Path) -> None:
    """Refuse EPI and PROPELLER scans recognised from their readouts' flags."""
    phascor = flag_mask(mdh, "PHASCOR")
    if phascor.any():
        reflect = flag_mask(mdh, "REFLECT")
        what = f"{int(phascor.sum())} phase-correction readouts"
        if reflect.any():
            what += f", {int(reflect.sum())} reflected readouts"
        raise InputDataError(f"is an EPI scan ({what}): EPI is not supported (its reflected "
                             "readouts need a phase correction that molrecon does not do)",
                             path=path)
    for name in ("FIRST_SCAN_IN_BLADE", "LAST_SCAN_IN_BLADE"):
        if flag_mask(mdh, name).any():
            raise InputDataError("has PROPELLER/BLADE readouts: molrecon reconstructs "
                                 "Cartesian data only", path=path)
