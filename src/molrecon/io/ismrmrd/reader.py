"""Reading an ISMRMRD file (HDF5 ``/dataset/xml`` + ``/dataset/data``) in bulk.

All acquisition headers come from one h5py read of the ``head`` member of the
compound table (converted field by field when written with other widths), the
acquisitions are planned from them (:mod:`.plan`), and the samples are read in
blocks of consecutive rows (about ``BLOCK_BYTES`` each) and scattered into the
k-space array (:mod:`.assemble`). No per-acquisition Python object is created,
so tens of thousands of acquisitions load in seconds. The noise acquisitions
give the coil noise covariance; a ``phantom`` dataset beside ``data`` becomes
the ground truth. What a file maps to is described in the package docstring of
:mod:`molrecon.io.ismrmrd`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ...errors import InputDataError
from ..kspace import (
    BLOCK_BYTES,
    Notes,
    check_memory,
    first_line,
    hdf5_errors,
    noise_covariance,
    noise_whitener,
    open_hdf5,
)
from ..types import RawScan
from .assemble import assemble_kspace, assemble_scan
from .header import parse_ismrmrd_header
from .layout import ACQ_IS_NOISE_MEASUREMENT, MAX_ACQUISITIONS, flag_bit, head_dtype
from .plan import AcquisitionPlan, plan_acquisitions

__all__ = ["read_ismrmrd"]


def read_ismrmrd(path: str | os.PathLike[str], *, prewhiten: bool = True,
                 group: str = "dataset") -> RawScan:
    """Read a Cartesian ISMRMRD file into a :class:`RawScan` (see :mod:`molrecon.io.ismrmrd`).

    ``prewhiten`` multiplies the data by the inverse Cholesky factor of the noise
    covariance when the file has noise acquisitions (``RawScan.whitened``).
    ``group`` is the HDF5 group holding ``xml`` and ``data``.
    """
    p = Path(path)
    notes = Notes(p)
    with open_hdf5(p) as f, hdf5_errors(p):
        if group not in f or not isinstance(f[group], h5py.Group):
            raise InputDataError(f"no /{group} group: not an ISMRMRD file", path=p)
        grp = f[group]
        hdr = parse_ismrmrd_header(_xml_text(grp, p), path=p)
        if hdr.unknown_elements_ignored:
            notes.add("the XML header has elements unknown to the installed ismrmrd schema; "
                      "they were ignored")
        if hdr.n_encodings > 1:
            notes.add(f"the header has {hdr.n_encodings} encoding spaces; only the first is used")
        ds = _acquisition_table(grp, p)
        heads = _read_heads(ds, p)
        plan = plan_acquisitions(heads, hdr, p, notes)
        noise_rows = np.flatnonzero((heads["flags"] & flag_bit(ACQ_IS_NOISE_MEASUREMENT)) != 0)
        noise_cov = None
        whitener = None
        if noise_rows.size:
            noise_cov = _noise_covariance(ds, heads, noise_rows, plan, p)
            if noise_cov is None:
                notes.add("the noise acquisitions hold no samples; the data were not prewhitened")
            elif prewhiten:
                whitener = noise_whitener(noise_cov, notes)
        blocks = _iter_blocks(ds, plan.rows, plan.shape[1], plan.n_samples, p)
        kspace = assemble_kspace(blocks, plan, whitener, p)
        truth = _ground_truth(grp, plan)

    return assemble_scan(plan, hdr, kspace, notes, fmt="ismrmrd", path=p, noise_cov=noise_cov,
                         whitened=whitener is not None, n_noise=int(noise_rows.size),
                         truth=truth)


def _xml_text(grp: h5py.Group, path: Path) -> bytes:
    if "xml" not in grp:
        raise InputDataError(f"no XML header ({grp.name}/xml is missing)", path=path)
    node = grp["xml"]
    if not isinstance(node, h5py.Dataset) or node.size == 0:
        raise InputDataError(f"{grp.name}/xml is not a header string", path=path)
    value = node[()] if node.shape == () else node[0]
    if isinstance(value, np.ndarray):
        value = value.tobytes()
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, (bytes, np.bytes_)):
        raise InputDataError(f"{grp.name}/xml is not a header string", path=path)
    return bytes(value)


def _acquisition_table(grp: h5py.Group, path: Path) -> h5py.Dataset:
    if "data" not in grp:
        raise InputDataError(f"no acquisitions ({grp.name}/data is missing)", path=path)
    ds = grp["data"]
    names = ds.dtype.names if isinstance(ds, h5py.Dataset) else None
    if not names or not {"head", "data"} <= set(names) or ds.ndim != 1:
        raise InputDataError(f"{grp.name}/data is not an ISMRMRD acquisition table", path=path)
    if ds.shape[0] > MAX_ACQUISITIONS:
        raise InputDataError(f"{grp.name}/data declares {ds.shape[0]} acquisitions, more than "
                             f"the limit of {MAX_ACQUISITIONS}: a damaged table", path=path)
    return ds


def _read_heads(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """All acquisition headers, converted field by field to ISMRMRD's header layout.

    A table written with other integer or float widths is read all the same; a
    header that lacks a field molrecon uses is an :class:`InputDataError`.
    """
    ref = head_dtype()
    stored = ds.dtype["head"]
    check_memory(ds.shape[0] * max(stored.itemsize, ref.itemsize) * 2, "the acquisition headers",
                 path)
    try:
        raw = ds.fields("head")[...]
    except ValueError as exc:  # h5py: "array is too big" and friends
        raise InputDataError(f"acquisition headers cannot be read ({first_line(exc)})",
                             path=path) from None
    if raw.dtype == ref:
        return raw
    out = np.zeros(raw.shape, dtype=ref)

    def copy(dst: np.ndarray, src: np.ndarray, dtype: np.dtype, prefix: str) -> None:
        for name in dtype.names or ():
            if src.dtype.names is None or name not in src.dtype.names:
                raise InputDataError(f"acquisition headers lack the field {prefix}{name}",
                                     path=path)
            sub = dtype[name]
            if sub.names:
                copy(dst[name], src[name], sub, f"{prefix}{name}.")
                continue
            value = src[name]
            if value.shape != dst[name].shape:
                raise InputDataError(f"acquisition header field {prefix}{name} has shape "
                                     f"{value.shape[1:]}, expected {dst[name].shape[1:]}",
                                     path=path)
            if value.dtype.kind not in "biuf":
                raise InputDataError(f"acquisition header field {prefix}{name} is "
                                     f"{value.dtype}, not a number", path=path)
            with np.errstate(invalid="ignore", over="ignore"):
                dst[name] = value

    copy(out, raw, ref, "")
    return out


def _iter_blocks(ds: h5py.Dataset, rows: np.ndarray, n_coils: int, n_samples: int,
                 path: Path) -> Iterator[tuple[slice, np.ndarray]]:
    """Sample data of ``rows`` (ascending), as ``(n, C, Ns)`` complex64 blocks."""
    field = ds.fields("data")
    block_rows = max(1, BLOCK_BYTES // (8 * n_coils * n_samples))
    expected = 2 * n_coils * n_samples
    i = 0
    while i < rows.size:
        start = int(rows[i])
        j = int(np.searchsorted(rows, start + block_rows, side="left"))
        raw = field[start:int(rows[j - 1]) + 1]  # object array of float32 vectors
        picked = raw[rows[i:j] - start]
        sizes = np.fromiter((a.size for a in picked), dtype=np.int64, count=picked.size)
        if (sizes != expected).any():
            raise InputDataError(f"acquisition data length {sizes[sizes != expected][0]} does not "
                                 f"match its header ({n_coils} channels × {n_samples} samples)",
                                 path=path)
        flat = np.stack(list(picked)).astype(np.float32, copy=False)  # (n, 2·C·Ns)
        yield slice(i, j), flat.view(np.complex64).reshape(j - i, n_coils, n_samples)
        i = j


def _noise_covariance(ds: h5py.Dataset, heads: np.ndarray, rows: np.ndarray, plan: AcquisitionPlan,
                      path: Path) -> np.ndarray | None:
    """``Ψ = (1/N) Σ n nᴴ`` over all noise samples, scaled to the data's dwell time.

    None when the noise acquisitions hold no sample at all.
    """
    n_coils = plan.shape[1]
    channels = heads["active_channels"][rows]
    if (channels != n_coils).any():
        raise InputDataError(f"inconsistent coil counts: noise acquisitions have "
                             f"{int(channels[channels != n_coils][0])} channels, imaging "
                             f"acquisitions {n_coils}", path=path)
    field = ds.fields("data")
    samples = []
    # Read each run of consecutive noise rows on its own (noise may sit at both ends of a
    # large file), at most 4096 rows per call.
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        for lo in range(0, run.size, 4096):
            part = run[lo:lo + 4096]
            raw = field[int(part[0]):int(part[-1]) + 1]  # object array of float32 vectors
            for row, vec in zip(part, raw):
                n_s = int(heads["number_of_samples"][row])
                if vec.size != 2 * n_coils * n_s:
                    raise InputDataError("noise acquisition data length does not match its "
                                         "header", path=path)
                samples.append(np.asarray(vec, dtype=np.float32).view(np.complex64)
                               .reshape(n_coils, n_s))
    dwell_noise = float(heads["sample_time_us"][rows].astype(np.float64).mean())
    dwell_data = (float(heads["sample_time_us"][plan.rows].astype(np.float64).mean())
                  if plan.rows.size else 0.0)
    return noise_covariance(np.concatenate(samples, axis=1), dwell_noise, dwell_data, path=path)


def _ground_truth(grp: h5py.Group, plan: AcquisitionPlan) -> np.ndarray | None:
    """``/dataset/phantom`` (written by ismrmrd_generate_cartesian_shepp_logan) as (B, D, Y, X)."""
    node = grp.get("phantom")
    if not isinstance(node, h5py.Dataset) or node.ndim != 3:
        return None
    b_n, _, d_n, y_n, x_n = plan.shape
    if node.shape[1:] != (y_n, x_n):
        return None
    arr = node[...]
    if arr.dtype.names and {"real", "imag"} <= set(arr.dtype.names):
        arr = arr["real"] + 1j * arr["imag"]
    arr = np.asarray(arr).astype(np.complex64)  # (Z, Y, X)
    if plan.kind == "3d" and arr.shape[0] == d_n and b_n == 1:
        return arr[None]
    if plan.kind != "3d" and arr.shape[0] == b_n:
        return np.repeat(arr[:, None], d_n, axis=1)
    return None
