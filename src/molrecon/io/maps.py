"""Coil sensitivity maps supplied by the user instead of molrecon's ESPIRiT estimate.

Accepted files (recognised by extension; the content is checked):

* ``.npy`` — a complex array in molrecon's axis order ``(B, C, D, Y, X)``; for a
  single slice also ``(C, Y, X)``, and for one slab or one slice stack entry
  ``(C, D, Y, X)``.
* ``.h5`` / ``.hdf5`` — the same array as the dataset ``maps`` (or the file's only
  dataset); a real dataset with a trailing axis of 2 is read as (real, imag).
* ``.cfl`` (with its ``.hdr`` beside it; either name may be given) — BART's layout:
  complex64 in Fortran order, dimensions ``(X=readout, Y=phase, Z, coils, maps, …)``
  with slices on BART's dimension 13. Of several ESPIRiT map sets (dimension 4),
  the first is used and a warning says so.

The maps must describe the reconstruction grid of the scan: X without readout
oversampling (molrecon removes it on reading, as BART's users do with ``bart
resize`` or the scanner's converter), Y and D as encoded, one map per coil in the
order of the file's channels. For ``2d`` data D is 1, for ``3d`` data D is the
partition count, for ``2dt`` data D is 1 (one set for every frame) or the frame
count. Values must be finite and not all zero. The maps are used as given except
for one real factor that makes their root-sum-of-squares peak at 1, so that the
coil-combined image (and the intensity a learned prior sees) does not depend on
how the file was normalised.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import InputDataError, InputDataWarning
from .types import RawScan

__all__ = ["load_maps", "read_cfl", "write_cfl"]

#: BART's dimension of slices (SLICE_DIM in its dimension list).
_BART_SLICE_DIM = 13


def read_cfl(path: str | os.PathLike[str]) -> np.ndarray:
    """A BART ``.cfl``/``.hdr`` pair as a complex64 array with BART's dimension order."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".cfl", ".hdr") else base
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for p in (hdr, cfl):
        if not p.is_file():
            raise InputDataError("BART file pair incomplete: no such file", path=p)
    try:
        lines = [ln.strip() for ln in hdr.read_text(encoding="ascii").splitlines()]
        at = lines.index("# Dimensions")
        dims = [int(v) for v in lines[at + 1].split()]
    except (ValueError, IndexError, UnicodeDecodeError):
        raise InputDataError("not a BART header (no '# Dimensions' line of integers)",
                             path=hdr) from None
    if not dims or any(d < 1 for d in dims):
        raise InputDataError(f"BART header gives invalid dimensions {dims}", path=hdr)
    count = int(np.prod(dims))
    size = cfl.stat().st_size
    if size != count * 8:
        raise InputDataError(f"holds {size} bytes, the header's dimensions {dims} need "
                             f"{count * 8}", path=cfl)
    data = np.fromfile(cfl, dtype=np.complex64, count=count)
    return data.reshape(dims, order="F")


def write_cfl(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a BART ``.cfl``/``.hdr`` pair (BART's dimension order, Fortran layout)."""
    base = Path(path)
    base = base.with_suffix("") if base.suffix in (".cfl", ".hdr") else base
    arr = np.asarray(array, dtype=np.complex64)
    dims = list(arr.shape) or [1]
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n",
                                        encoding="ascii")
    np.asfortranarray(arr).reshape(-1, order="F").tofile(base.with_suffix(".cfl"))
    return base.with_suffix(".cfl")


def _from_bart(arr: np.ndarray, path: Path) -> np.ndarray:
    """BART (X, Y, Z, C, M, …, slices at 13, …) → molrecon (B, C, D, Y, X)."""
    dims = list(arr.shape) + [1] * max(0, 16 - arr.ndim)
    arr = arr.reshape(dims, order="A")
    extra = [i for i, d in enumerate(dims) if d > 1 and i not in (0, 1, 2, 3, 4, _BART_SLICE_DIM)]
    if extra:
        raise InputDataError(f"BART maps with more than X, Y, Z, coil, map and slice dimensions "
                             f"(dimensions {extra} are > 1)", path=path)
    if dims[4] > 1:
        warnings.warn(f"{path}: {dims[4]} ESPIRiT map sets; using the first", InputDataWarning,
                      stacklevel=3)
    sel = arr[:, :, :, :, 0]                                  # (X, Y, Z, C, 1…, S, …)
    sel = sel.reshape(dims[:4] + [dims[_BART_SLICE_DIM]], order="A")  # (X, Y, Z, C, S)
    return np.ascontiguousarray(np.transpose(sel, (4, 3, 2, 1, 0)))   # (S, C, Z, Y, X)


def _read_any(path: Path) -> np.ndarray:
    name = path.name.lower()
    if name.endswith((".cfl", ".hdr")):
        return _from_bart(read_cfl(path), path)
    if not path.is_file():
        raise InputDataError("no such file" if not path.exists() else "is not a file", path=path)
    if name.endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputDataError(f"not a readable .npy array ({exc})", path=path) from None
    if name.endswith((".h5", ".hdf5")):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                names = [k for k in f if isinstance(f[k], h5py.Dataset)]
                key = "maps" if "maps" in names else (names[0] if len(names) == 1 else None)
                if key is None:
                    raise InputDataError(f"holds no dataset 'maps' (datasets: "
                                         f"{', '.join(names) or 'none'})", path=path)
                arr = f[key][()]
        except OSError as exc:
            raise InputDataError(f"not a readable HDF5 file ({exc})", path=path) from None
        if not np.iscomplexobj(arr) and arr.ndim >= 1 and arr.shape[-1] == 2:
            arr = arr[..., 0] + 1j * arr[..., 1]
        return np.asarray(arr)
    raise InputDataError("coil maps must be .npy, .h5/.hdf5 or BART .cfl/.hdr", path=path)


def load_maps(path: str | os.PathLike[str], scan: RawScan) -> np.ndarray:
    """The user's coil maps for ``scan``, as complex64 ``(B, C, D|1, Y, X)`` (see module docstring)."""
    p = Path(path)
    arr = _read_any(p)
    if not np.issubdtype(arr.dtype, np.number):
        raise InputDataError(f"maps must be numeric, got dtype {arr.dtype}", path=p)
    b_n, c_n, d_n, y_n, x_n = scan.shape
    if arr.ndim == 3:
        arr = arr[None, :, None]
    elif arr.ndim == 4:
        arr = arr[None]
    if arr.ndim != 5:
        raise InputDataError(f"maps must be (B, C, D, Y, X), (C, D, Y, X) or (C, Y, X); got "
                             f"shape {arr.shape}", path=p)
    if arr.shape[0] == 1 and b_n > 1:
        raise InputDataError(f"maps hold 1 slice, the scan has {b_n}", path=p)
    allowed_d = {"2d": (1,), "3d": (d_n,), "2dt": (1, d_n)}[scan.kind]
    want = f"({b_n}, {c_n}, {'|'.join(str(d) for d in allowed_d)}, {y_n}, {x_n})"
    if arr.shape[0] != b_n or arr.shape[1] != c_n or arr.shape[2] not in allowed_d \
            or arr.shape[3] != y_n or arr.shape[4] != x_n:
        hint = ""
        if arr.shape[4] == 2 * x_n:
            hint = " (its readout looks oversampled: crop it to the central half)"
        raise InputDataError(f"maps have shape {arr.shape}, this {scan.kind} scan needs "
                             f"{want} (B, C, D, Y, X){hint}", path=p)
    maps = arr.astype(np.complex64)
    if not np.isfinite(maps.view(np.float32)).all():
        raise InputDataError("maps contain NaN or Inf values", path=p)
    rss = np.sqrt(np.sum(np.abs(maps) ** 2, axis=1))
    peak = float(rss.max())
    if peak == 0.0:
        raise InputDataError("maps are all zero", path=p)
    return maps / np.float32(peak)
