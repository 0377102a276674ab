"""Writing Cartesian multicoil k-space as an ISMRMRD file (``/dataset/xml`` + ``/dataset/data``).

:func:`write_ismrmrd` is how ``molrecon simulate`` stores its scans and how the
tests build files: one acquisition per sampled ``(slice, frame or partition,
line)``, noise acquisitions first, flags and counters as the reader expects
them, and an XML header whose encoded and recon spaces say how much readout
oversampling the data carry. The file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...atomic import atomic_path
from ..types import KINDS, Geometry, Kind, ScanInfo
from .layout import (
    ACQ_FIRST_IN_SLICE,
    ACQ_IS_NOISE_MEASUREMENT,
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    ACQ_LAST_IN_MEASUREMENT,
    ACQ_LAST_IN_SLICE,
    TICK_MS,
    flag_bit,
)

__all__ = ["write_ismrmrd"]

_WRITER_DWELL_US = 5.0  # nominal dwell time written by write_ismrmrd (data and noise alike)


def write_ismrmrd(
    path: str | os.PathLike[str],
    kspace: np.ndarray,
    mask: np.ndarray,
    *,
    kind: Kind,
    geometry: Geometry,
    calib: np.ndarray | None = None,
    noise: np.ndarray | None = None,
    oversampling: int = 1,
    info: ScanInfo | None = None,
    force: bool = False,
) -> Path:
    """Write Cartesian multicoil k-space as an ISMRMRD file (atomically, mode 'w').

    ``kspace`` is complex ``(B, C, D, Y, Xenc)`` on the *encoded* grid, with
    ``Xenc = geometry.matrix[0] · oversampling`` (the readout still oversampled)
    and the k-space centre at index ``n // 2`` on every axis. One acquisition
    is written per ``(b, d, y)`` where ``mask`` (``(B, 1, D, Y, 1)``) is True:
    ``idx.slice = b``; ``d`` goes to ``kspace_encode_step_2`` (``"3d"``) or to
    ``idx.phase`` (``"2dt"``, with ``acquisition_time_stamp`` advancing by
    ``geometry.frame_time_ms`` per frame); ``kspace_encode_step_1 = y`` with the
    header's encoding-limit centre at ``Y // 2``. ``calib`` lines get
    ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``. ``noise`` (complex ``(C, N)``) is
    written first, as noise-measurement acquisitions of ``Xenc`` samples. If the
    orientation is unknown (``geometry.orientation_known`` False) the direction
    vectors are written as zeros, which is how ISMRMRD files say so.
    """
    k, m, cal, positions, noise_arr = _checked_inputs(kspace, mask, kind, geometry, calib,
                                                      noise, oversampling)
    table = _acquisition_rows(k, m, cal, positions, noise_arr, kind, geometry)
    b_n, c_n, d_n, y_n, xe_n = k.shape
    xml = _header_xml(kind, geometry, oversampling, (b_n, c_n, d_n, y_n, xe_n), m, info)
    with atomic_path(path, force=force) as tmp, h5py.File(tmp, "w") as f:
        grp = f.create_group("dataset")
        xml_ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml_ds[0] = xml
        grp.create_dataset("data", data=table, maxshape=(None,), chunks=True)
    return Path(path)


def _checked_inputs(kspace: np.ndarray, mask: np.ndarray, kind: Kind, geometry: Geometry,
                    calib: np.ndarray | None, noise: np.ndarray | None, oversampling: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The arrays of :func:`write_ismrmrd`, checked against each other and the geometry:
    ``(kspace, mask, calib & mask, positions (B, 3), noise)``; ``ValueError`` otherwise."""
    k = np.asarray(kspace)
    if k.ndim != 5 or not np.iscomplexobj(k):
        raise ValueError(f"kspace must be complex (B, C, D, Y, Xenc), got {k.dtype} {k.shape}")
    b_n, c_n, d_n, y_n, xe_n = k.shape
    m = np.asarray(mask, dtype=bool)
    if m.shape != (b_n, 1, d_n, y_n, 1):
        raise ValueError(f"mask must be {(b_n, 1, d_n, y_n, 1)}, got {m.shape}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "2d" and d_n != 1:
        raise ValueError(f"a 2d scan has D = 1, got {d_n}")
    if oversampling < 1 or geometry.matrix[0] * oversampling != xe_n:
        raise ValueError(f"readout of {xe_n} samples does not match geometry.matrix[0] "
                         f"{geometry.matrix[0]} × oversampling {oversampling}")
    if geometry.matrix[1] != y_n or (kind == "3d" and geometry.matrix[2] != d_n):
        raise ValueError(f"geometry.matrix {geometry.matrix} does not match k-space {k.shape}")
    positions = np.asarray(geometry.position, dtype=np.float64).reshape(-1, 3)
    if positions.shape[0] != b_n:
        raise ValueError(f"geometry.position must be ({b_n}, 3), got {positions.shape}")
    if not m.any():
        raise ValueError("mask selects no line")
    cal = np.zeros_like(m) if calib is None else np.asarray(calib, dtype=bool)
    if cal.shape != m.shape:
        raise ValueError(f"calib must be {m.shape}, got {cal.shape}")
    cal = cal & m
    noise_arr = None
    if noise is not None:
        noise_arr = np.asarray(noise)
        if noise_arr.ndim != 2 or noise_arr.shape[0] != c_n or noise_arr.shape[1] == 0:
            raise ValueError(f"noise must be complex ({c_n}, N), got {noise_arr.shape}")
    return k, m, cal, positions, noise_arr


def _acquisition_rows(k: np.ndarray, m: np.ndarray, cal: np.ndarray, positions: np.ndarray,
                      noise_arr: np.ndarray | None, kind: Kind, geometry: Geometry) -> np.ndarray:
    """The acquisition table: noise acquisitions first, then one row per sampled line."""
    from ismrmrd.hdf5 import acquisition_dtype

    c_n, xe_n = k.shape[1], k.shape[4]
    bb, dd, yy = np.nonzero(m[:, 0, :, :, 0])  # (L,) lexicographic: slice, then d, then line
    n_lines = bb.size
    lines = np.ascontiguousarray(k[bb, :, dd, yy, :], dtype=np.complex64)  # (L, C, Xenc)
    noise_rows: list[np.ndarray] = []
    if noise_arr is not None:
        nz = noise_arr.astype(np.complex64)
        noise_rows = [np.ascontiguousarray(nz[:, s:s + xe_n]) for s in
                      range(0, nz.shape[1], xe_n)]
    n_noise = len(noise_rows)
    table = np.zeros(n_noise + n_lines, dtype=acquisition_dtype)
    head = table["head"]

    head["version"] = 1
    head["scan_counter"] = np.arange(1, table.size + 1, dtype=np.uint32)
    head["available_channels"] = c_n
    head["active_channels"] = c_n
    channel_mask = np.zeros(16, dtype=np.uint64)
    for ch in range(c_n):
        channel_mask[ch // 64] |= np.uint64(1 << (ch % 64))
    head["channel_mask"] = channel_mask
    head["sample_time_us"] = _WRITER_DWELL_US

    # Noise acquisitions first.
    for i, row in enumerate(noise_rows):
        head["flags"][i] = flag_bit(ACQ_IS_NOISE_MEASUREMENT)
        head["number_of_samples"][i] = row.shape[1]
    # Image lines.
    _image_heads(head, slice(n_noise, n_noise + n_lines), (bb, dd, yy), cal, positions, kind,
                 geometry, k.shape)

    empty = np.zeros(0, dtype=np.float32)
    traj = np.empty(table.size, dtype=object)
    data = np.empty(table.size, dtype=object)
    flat = lines.reshape(n_lines, -1).view(np.float32)  # (L, 2·C·Xenc)
    for i in range(table.size):
        traj[i] = empty
        data[i] = (noise_rows[i].reshape(-1).view(np.float32) if i < n_noise
                   else flat[i - n_noise])
    table["traj"] = traj
    table["data"] = data
    return table


def _image_heads(head: np.ndarray, img: slice, lines: tuple[np.ndarray, np.ndarray, np.ndarray],
                 cal: np.ndarray, positions: np.ndarray, kind: Kind, geometry: Geometry,
                 shape: tuple[int, ...]) -> None:
    """Fill the headers ``head[img]`` of the image lines at ``(b, d, y) = lines``."""
    bb, dd, yy = lines
    d_n, xe_n = shape[2], shape[4]
    head["number_of_samples"][img] = xe_n
    head["center_sample"][img] = xe_n // 2
    if geometry.orientation_known:
        head["read_dir"][img] = np.asarray(geometry.read_dir, dtype=np.float32)
        head["phase_dir"][img] = np.asarray(geometry.phase_dir, dtype=np.float32)
        head["slice_dir"][img] = np.asarray(geometry.slice_dir, dtype=np.float32)
    head["position"][img] = positions[bb].astype(np.float32)
    idx = head["idx"]
    idx["kspace_encode_step_1"][img] = yy
    idx["slice"][img] = bb
    if kind == "3d":
        idx["kspace_encode_step_2"][img] = dd
    elif kind == "2dt":
        idx["phase"][img] = dd
        if geometry.frame_time_ms is not None:
            head["acquisition_time_stamp"][img] = np.round(
                dd * geometry.frame_time_ms / TICK_MS).astype(np.uint32)
    line_flags = np.zeros(bb.size, dtype=np.uint64)
    line_flags[cal[bb, 0, dd, yy, 0]] |= flag_bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    group = bb * d_n + dd if kind != "3d" else bb  # a "slice" of lines: per (b, frame), or per slab
    first = np.r_[True, group[1:] != group[:-1]]
    last = np.r_[group[1:] != group[:-1], True]
    line_flags[first] |= flag_bit(ACQ_FIRST_IN_SLICE)
    line_flags[last] |= flag_bit(ACQ_LAST_IN_SLICE)
    line_flags[-1] |= flag_bit(ACQ_LAST_IN_MEASUREMENT)
    head["flags"][img] = line_flags


def _header_xml(kind: Kind, geometry: Geometry, oversampling: int,
                shape: tuple[int, int, int, int, int], mask: np.ndarray,
                info: ScanInfo | None) -> bytes:
    from ismrmrd import xsd

    b_n, c_n, d_n, y_n, xe_n = shape
    fx, fy, fz = geometry.fov_mm
    z_n = d_n if kind == "3d" else 1
    sampled = mask[:, 0, :, :, 0]  # (B, D, Y)
    ys = np.flatnonzero(sampled.any(axis=(0, 1)))
    zs = np.flatnonzero(sampled.any(axis=(0, 2)))

    def lim(lo: int, hi: int, center: int) -> Any:
        return xsd.limitType(minimum=int(lo), maximum=int(hi), center=int(center))

    zero = lim(0, 0, 0)
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=lim(0, xe_n - 1, xe_n // 2),
        kspace_encoding_step_1=lim(ys[0], ys[-1], y_n // 2),
        kspace_encoding_step_2=lim(zs[0], zs[-1], d_n // 2) if kind == "3d" else zero,
        average=zero,
        slice=lim(0, b_n - 1, 0),
        contrast=zero,
        phase=lim(0, d_n - 1, 0) if kind == "2dt" else zero,
        repetition=zero,
        set=zero,
        segment=zero,
    )
    encoding = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=xe_n, y=y_n, z=z_n),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fx * oversampling, y=fy, z=fz)),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=xe_n // oversampling, y=y_n, z=z_n),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=fy, z=fz)),
        encodingLimits=limits,
        trajectory=xsd.trajectoryType.CARTESIAN,
    )
    field_t = info.field_strength_t if info is not None else None
    # H1 frequency is required by the schema: from the field strength, else a nominal 1.5 T.
    larmor_hz = round(42.577478518e6 * (field_t if field_t else 1.5))
    system = xsd.acquisitionSystemInformationType(
        systemVendor=None if info is None else info.vendor,
        systemModel=None if info is None else info.model,
        systemFieldStrength_T=field_t,
        receiverChannels=c_n,
    )
    measurement = None
    if info is not None and info.protocol:
        measurement = xsd.measurementInformationType(patientPosition=xsd.patientPositionType.HFS,
                                                     protocolName=info.protocol)
    sequence = None
    if info is not None and (info.tr_ms is not None or info.te_ms is not None):
        sequence = xsd.sequenceParametersType(
            TR=[] if info.tr_ms is None else [float(info.tr_ms)],
            TE=[] if info.te_ms is None else [float(info.te_ms)])
    hdr = xsd.ismrmrdHeader(
        measurementInformation=measurement,
        acquisitionSystemInformation=system,
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=larmor_hz),
        encoding=[encoding],
        sequenceParameters=sequence,
    )
    text = hdr.toXML("utf-8")
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)
