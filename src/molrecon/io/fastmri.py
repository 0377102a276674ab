"""fastMRI HDF5 raw data (``kspace``, ``ismrmrd_header``, optional ``mask``).

A fastMRI multicoil file stores ``kspace`` as complex64 ``(slices, coils, rows,
cols)``: ``rows`` is the readout (frequency encoding), still 2× oversampled
(encoded x = 640, recon x = 320 for the knee and brain sets), and ``cols`` the
phase encoding, already on a centred grid. Single-coil files drop the coil axis
(``(slices, rows, cols)``) and are read with C = 1.

Mapping to molrecon's ``(B, C, D, Y, X)``: slices -> B, coils -> C, D = 1,
cols -> Y, rows -> X after the readout oversampling is removed (centred
inverse FFT, crop ``X = rows · FOV_recon,x / FOV_enc,x`` from the header, forward
FFT: :func:`~molrecon.io.kspace.remove_readout_oversampling`). The phase grid is
kept as stored (no crop to the recon matrix), so the image covers the encoded
phase field of view.

The sampling mask comes from the ``mask`` dataset (one number per column,
non-zero = acquired) if present, else from the columns holding any non-zero
sample. Columns outside the mask are set to exactly 0 (with an
:class:`~molrecon.errors.InputDataWarning` if they held data). A mask of the
wrong length, of non-numbers or with NaN is an
:class:`~molrecon.errors.InputDataError`, as are a ``kspace`` of another rank,
a real dtype, NaN/Inf samples or more than ``MAX_KSPACE_ELEMENTS`` values
(checked before anything is read). fastMRI files carry no slice position or orientation:
the geometry has identity orientation, slices stacked along +z at the header's
slice thickness and centred on the origin, and a :class:`GeometryWarning`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import numpy as np

from ..errors import GeometryWarning, InputDataError, InputDataWarning
from .ismrmrd import HeaderFields, parse_ismrmrd_header
from .kspace import (
    MAX_KSPACE_ELEMENTS,
    check_memory,
    find_calibration_region,
    hdf5_errors,
    open_hdf5,
    partial_fourier_fraction,
    remove_readout_oversampling,
)
from .types import Geometry, RawScan, ScanInfo

__all__ = ["read_fastmri"]


def read_fastmri(path: str | os.PathLike[str]) -> RawScan:
    """Read a fastMRI HDF5 file into a :class:`RawScan` of kind ``"2d"`` (see module docstring)."""
    p = Path(path)
    notes: list[str] = []
    with open_hdf5(p) as f, hdf5_errors(p):
        node = f.get("kspace")
        if not isinstance(node, h5py.Dataset):
            raise InputDataError("no /kspace dataset: not a fastMRI file", path=p)
        if node.ndim not in (3, 4):
            raise InputDataError(f"/kspace has rank {node.ndim}, expected (slices, coils, rows, "
                                 "cols) or single-coil (slices, rows, cols)", path=p)
        if node.dtype.kind != "c":
            raise InputDataError(f"/kspace is {node.dtype}, not complex", path=p)
        if min(node.shape) == 0:
            raise InputDataError(f"/kspace has an empty dimension {node.shape}", path=p)
        if node.size > MAX_KSPACE_ELEMENTS:
            raise InputDataError(f"/kspace declares {node.shape} = {node.size} values, more than "
                                 f"the limit of {MAX_KSPACE_ELEMENTS}", path=p)
        # The stored array, its complex64 copy and the transposed k-space (+ FFT workspace).
        check_memory(int(node.size) * (node.dtype.itemsize + 8 * 3), f"/kspace {node.shape}", p)
        hdr = parse_ismrmrd_header(_header_text(f, p), path=p)
        mask_cols = _read_mask(f, node.shape[-1], p)
        protocol_attr = f.attrs.get("acquisition")
        data = node[...].astype(np.complex64, copy=False)  # (S, C, rows, cols)
    if data.ndim == 3:
        data = data[:, None]
    s_n, _, rows, cols = data.shape
    if not np.isfinite(data.view(np.float32)).all():
        raise InputDataError("/kspace contains NaN or infinite samples", path=p)

    if mask_cols is not None:
        sampled = mask_cols
        outside = np.flatnonzero(np.any(data[..., ~sampled] != 0, axis=(0, 1, 2)))
        if outside.size:
            message = (f"/mask leaves out {outside.size} phase-encoding column(s) that hold "
                       "non-zero samples; those samples were discarded")
            notes.append(message)
            warnings.warn(f"{p}: {message}", InputDataWarning, stacklevel=2)
    else:
        sampled = np.any(data != 0, axis=(0, 1, 2))  # (cols,)
    if not sampled.any():
        raise InputDataError("no phase-encoding column was acquired", path=p)

    x_n = _readout_matrix(hdr, rows)
    k = np.ascontiguousarray(np.swapaxes(data, 2, 3))  # (S, C, cols=Y, rows=Xenc)
    del data
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        k = remove_readout_oversampling(k, x_n)  # (S, C, Y, X)
    k[:, :, ~sampled, :] = 0
    if not np.isfinite(k.view(np.float32)).all():
        raise InputDataError("/kspace overflows single precision (samples close to the float32 "
                             "limit of 3.4e38)", path=p)
    kspace = np.ascontiguousarray(k[:, :, None], dtype=np.complex64)  # (B, C, 1, Y, X)
    mask = np.broadcast_to(sampled[None, None, None, :, None], (s_n, 1, 1, cols, 1)).copy()
    calib = find_calibration_region(mask, "2d")

    geometry = _geometry(hdr, s_n, cols, x_n, rows, notes, p)
    protocol = hdr.protocol
    if protocol is None and protocol_attr is not None:
        protocol = protocol_attr.decode() if isinstance(protocol_attr, bytes) else str(protocol_attr)
    info = ScanInfo(
        format="fastmri",
        vendor=hdr.vendor,
        model=hdr.model,
        field_strength_t=hdr.field_strength_t,
        protocol=protocol,
        tr_ms=hdr.tr_ms,
        te_ms=hdr.te_ms,
        encoded_matrix=hdr.encoded_matrix,
        encoded_fov_mm=hdr.encoded_fov_mm,
        readout_oversampling=rows / x_n,
        partial_fourier=(partial_fourier_fraction(sampled), 1.0),
        averages=1,
        n_acquisitions=int(sampled.sum()) * s_n,
        n_noise_acquisitions=0,
        warnings=tuple(notes),
    )
    return RawScan(kspace=kspace, mask=mask, calib=calib, kind="2d", geometry=geometry,
                   info=info, source=str(p))


def _header_text(f: h5py.File, path: Path) -> bytes | str:
    """The ISMRMRD XML header string of ``/ismrmrd_header``."""
    hdr_node = f.get("ismrmrd_header")
    if not isinstance(hdr_node, h5py.Dataset):
        raise InputDataError("no /ismrmrd_header: cannot tell the readout oversampling",
                             path=path)
    if hdr_node.size > 1:
        raise InputDataError(f"/ismrmrd_header holds {hdr_node.size} values, not one header "
                             "string", path=path)
    raw_hdr = hdr_node[()]
    if isinstance(raw_hdr, np.ndarray):  # a one-element array instead of a scalar string
        raw_hdr = raw_hdr.reshape(-1)[0] if raw_hdr.size else b""
    if isinstance(raw_hdr, np.bytes_):
        raw_hdr = bytes(raw_hdr)
    if not isinstance(raw_hdr, (bytes, str)):
        raise InputDataError("/ismrmrd_header is not a string", path=path)
    return raw_hdr


def _read_mask(f: h5py.File, cols: int, path: Path) -> np.ndarray | None:
    """``/mask`` as one boolean per phase-encoding column (non-zero: acquired), or None."""
    node = f.get("mask")
    if node is None:
        return None
    if not isinstance(node, h5py.Dataset):
        raise InputDataError("/mask is not a dataset", path=path)
    if node.size != cols:
        raise InputDataError(f"/mask has {node.size} entries but /kspace has {cols} "
                             "phase-encoding columns", path=path)
    if node.dtype.kind not in "biuf":
        raise InputDataError(f"/mask is {node.dtype}, not numbers", path=path)
    values = np.asarray(node[...]).reshape(-1)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise InputDataError("/mask contains NaN or infinite values", path=path)
    return values != 0


def _readout_matrix(hdr: HeaderFields, rows: int) -> int:
    enc_fov, rec_fov = hdr.encoded_fov_mm[0], hdr.recon_fov_mm[0]
    if enc_fov > 0 and rec_fov > 0:
        x_n = round(rows * min(rec_fov / enc_fov, 1.0))
    elif hdr.encoded_matrix[0] > 0 and hdr.recon_matrix[0] > 0:
        x_n = round(rows * min(hdr.recon_matrix[0] / hdr.encoded_matrix[0], 1.0))
    else:
        x_n = rows
    return min(max(x_n, 1), rows)


def _geometry(hdr: HeaderFields, s_n: int, y_n: int, x_n: int, rows: int, notes: list[str],
              path: Path) -> Geometry:
    fx, fy, fz = hdr.encoded_fov_mm
    fov = (fx * (x_n / rows), fy, fz)
    if min(fov) <= 0:
        fov = (float(x_n), float(y_n), 1.0)
    message = ("fastMRI files carry no slice position or orientation; identity orientation "
               "assumed, slices centred on the origin")
    notes.append(message)
    warnings.warn(f"{path}: {message}", GeometryWarning, stacklevel=3)
    offsets = (np.arange(s_n) - (s_n - 1) / 2.0) * fov[2]
    positions = np.stack([np.zeros(s_n), np.zeros(s_n), offsets], axis=1)  # (B, 3)
    return Geometry(
        fov_mm=(float(fov[0]), float(fov[1]), float(fov[2])),
        matrix=(x_n, y_n, 1),
        position=positions,
        read_dir=np.array([1.0, 0.0, 0.0]),
        phase_dir=np.array([0.0, 1.0, 0.0]),
        slice_dir=np.array([0.0, 0.0, 1.0]),
        slice_spacing_mm=float(fov[2]),
        orientation_known=False,
    )
