"""The parts of the ISMRMRD acquisition layout molrecon relies on.

Acquisition flags (1-based bit numbers, as the ISMRMRD standard numbers them),
the acquisition classes that are never placed in k-space, the numpy type of an
acquisition header, and the limits that keep a damaged or hostile file from
asking for absurd sizes. The twix and MRD v2 readers build acquisition headers
of this layout and hand them to the same planner as ISMRMRD files.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "ACQ_FIRST_IN_SLICE",
    "ACQ_IS_NOISE_MEASUREMENT",
    "ACQ_IS_PARALLEL_CALIBRATION",
    "ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING",
    "ACQ_IS_REVERSE",
    "ACQ_LAST_IN_MEASUREMENT",
    "ACQ_LAST_IN_SLICE",
    "MAX_ACQUISITIONS",
    "MAX_FOV_MM",
    "SKIPPED_FLAGS",
    "TICK_MS",
    "flag_bit",
    "head_dtype",
]

# ISMRMRD acquisition flags, as 1-based bit numbers (flag n is the bit 1 << (n - 1)).
ACQ_FIRST_IN_SLICE = 7
ACQ_LAST_IN_SLICE = 8
ACQ_IS_NOISE_MEASUREMENT = 19
ACQ_IS_PARALLEL_CALIBRATION = 20
ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING = 21
ACQ_IS_REVERSE = 22
ACQ_LAST_IN_MEASUREMENT = 25

#: Acquisitions with one of these flags are skipped (never placed in k-space).
SKIPPED_FLAGS = {
    23: "navigator",
    24: "phase correction",
    26: "HP feedback",
    27: "dummy scan",
    28: "RT feedback",
    29: "surface coil correction",
    30: "phase stabilisation reference",
    31: "phase stabilisation",
}

#: Most acquisitions an acquisition table may declare (their headers alone take 340 bytes
#: each: 5.3 GiB at the limit); checked before the headers are read.
MAX_ACQUISITIONS = 2**24

#: Largest field of view (mm) and slice position offset (mm) taken as real; larger values
#: (which would overflow NIfTI's float32 affine) count as missing.
MAX_FOV_MM = 1e5

TICK_MS = 2.5  # acquisition_time_stamp unit


def flag_bit(flag: int) -> np.uint64:
    """The bit of the 1-based acquisition flag number ``flag``: ``1 << (flag - 1)``."""
    return np.uint64(1 << (flag - 1))


def head_dtype() -> np.dtype:
    """The numpy type of one ISMRMRD acquisition header (ismrmrd-python's)."""
    from ismrmrd.hdf5 import acquisition_header_dtype

    return np.dtype(acquisition_header_dtype)
