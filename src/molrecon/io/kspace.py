"""What the raw-data readers share: k-space operations in numpy and the guards of a read.

The ISMRMRD, MRD v2, Siemens twix and fastMRI readers all turn a file into a
:class:`~molrecon.io.types.RawScan` ``(B, C, D, Y, X)``, and they do the same
steps on the way:

* readout oversampling removal (:func:`remove_readout_oversampling`: centred
  inverse FFT along the readout, crop, centred forward FFT, all orthonormal);
* the calibration region when no line is flagged as calibration
  (:func:`find_calibration_region`: the largest fully sampled block around the
  k-space centre) and the partial Fourier fraction of an encoding axis
  (:func:`partial_fourier_fraction`);
* noise prewhitening: the coil noise covariance at the data's dwell time
  (:func:`noise_covariance`) and the inverse of its Cholesky factor
  (:func:`noise_whitener`);
* refusing what does not fit: more than ``MAX_KSPACE_ELEMENTS`` k-space values or
  more than the memory available now (:func:`check_memory`), a path that is
  missing, a folder or empty (:func:`raw_file_size`, :func:`open_hdf5`), and
  failures of the HDF5 library on damaged content (:func:`hdf5_errors`);
* collecting the warnings of a read for ``ScanInfo.warnings`` (:class:`Notes`).

numpy only (scipy's FFT where installed), no torch.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputDataError, InputDataWarning, ResourceError
from ..memory import available_memory_bytes
from .types import Kind

try:  # scipy's pocketfft runs single precision natively: ~5x numpy's speed on readouts
    from scipy import fft as _fft
except ImportError:  # pragma: no cover - scipy is optional
    _fft = np.fft

__all__ = [
    "BLOCK_BYTES",
    "MAX_KSPACE_ELEMENTS",
    "Notes",
    "check_memory",
    "find_calibration_region",
    "first_line",
    "hdf5_errors",
    "noise_covariance",
    "noise_whitener",
    "open_hdf5",
    "partial_fourier_fraction",
    "raw_file_size",
    "remove_readout_oversampling",
]

#: Largest k-space (B·C·D·Y·X complex64 values, 16 GiB) a file may ask for; checked
#: against the header and the acquisition indices before anything is allocated.
MAX_KSPACE_ELEMENTS = 2**31

BLOCK_BYTES = 64 << 20  # sample data read per call of a reader's block loop


# --------------------------------------------------------------------------- reading guards
class Notes:
    """Warnings raised while reading; also kept for ``ScanInfo.warnings``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []

    def add(self, message: str, category: type[Warning] = InputDataWarning) -> None:
        self.messages.append(message)
        warnings.warn(f"{self.path}: {message}", category, stacklevel=4)


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def raw_file_size(p: Path) -> int:
    """The size of a raw-data file that a stream reader (twix, MRD v2) is about to open;
    :class:`InputDataError` for a missing path, a folder, an unreadable or empty file."""
    if not p.exists():
        raise InputDataError("file does not exist", path=p)
    if p.is_dir():
        raise InputDataError("is a directory, not a raw-data file", path=p)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise InputDataError(f"cannot be read ({first_line(exc)})", path=p) from None
    if size == 0:
        raise InputDataError("is empty (0 bytes)", path=p)
    return size


@contextlib.contextmanager
def hdf5_errors(path: Path) -> Iterator[None]:
    """Report a failure of the HDF5 library while reading ``path`` as :class:`InputDataError`.

    h5py raises ``OSError`` (damaged or truncated storage, a missing compression
    filter), ``KeyError`` (an object that cannot be opened), ``RuntimeError`` and
    ``UnicodeDecodeError`` (damaged names or type descriptions): for a file
    that opened they all mean that its content is damaged. ``MemoryError``
    becomes a :class:`~molrecon.errors.ResourceError`.
    """
    try:
        yield
    except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as exc:
        raise InputDataError(f"HDF5 content is damaged or unreadable ({type(exc).__name__}: "
                             f"{first_line(exc)})", path=path) from None
    except MemoryError:
        raise ResourceError("the file's content does not fit into memory", path=path) from None


def check_memory(n_bytes: int, what: str, path: Path) -> None:
    """Refuse (:class:`ResourceError`) to allocate more than the memory available now."""
    available = available_memory_bytes("cpu")
    if available is not None and n_bytes > available:
        raise ResourceError(f"{what} needs {n_bytes / 2**30:.1f} GiB, more than the "
                            f"{available / 2**30:.1f} GiB of memory available", path=path)


def open_hdf5(path: Path) -> h5py.File:
    """Open ``path`` read-only as HDF5, or raise :class:`InputDataError` saying why not."""
    if not path.exists():
        raise InputDataError("file does not exist", path=path)
    if path.is_dir():
        raise InputDataError("is a directory, not a raw-data file", path=path)
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise InputDataError(f"not a readable HDF5 file ({exc})", path=path) from None


# --------------------------------------------------------------------------- readout
def remove_readout_oversampling(k: np.ndarray, n_out: int) -> np.ndarray:
    """Crop the readout field of view: ``F_n_out · crop · F⁻¹_n_in`` along the last axis.

    ``k`` is k-space with the readout on the last axis (DC at ``n_in // 2``). The
    image pixel ``n_in // 2`` becomes pixel ``n_out // 2`` of the cropped image, so
    the image centre stays put. Orthonormal transforms: the image values and the
    per-sample noise variance are unchanged. Returns ``k`` itself if nothing is
    cropped; the dtype (complex64 or complex128) is kept.

    The centring shifts are folded into one gather with a phase ramp instead of
    four array rolls. With ``h = n_in // 2``, ``hx = n_out // 2`` and ``u = F⁻¹ k``
    (uncentred, orthonormal), the result is ``F g`` with
    ``g[q] = u[p_q] · exp(-2πi h p_q / n_in) · exp(2πi hx q / n_out)`` and
    ``p_q = ((q + hx) mod n_out − hx) mod n_in``.
    """
    n_in = k.shape[-1]
    if not 1 <= n_out <= n_in:
        raise ValueError(f"cannot crop a readout of {n_in} samples to {n_out}")
    if n_out == n_in:
        return k
    h, hx = n_in // 2, n_out // 2
    q = np.arange(n_out)
    p = ((q + hx) % n_out - hx) % n_in
    ramp = np.exp(-2j * np.pi * h * p / n_in) * np.exp(2j * np.pi * hx * q / n_out)
    u = _fft.ifft(k, axis=-1, norm="ortho")  # (..., n_in)
    g = u[..., p] * ramp.astype(u.dtype)  # (..., n_out)
    return _fft.fft(g, axis=-1, norm="ortho")


# --------------------------------------------------------------------------- calibration
def find_calibration_region(mask: np.ndarray, kind: Kind = "2d") -> np.ndarray:
    """The largest fully sampled block around the k-space centre, per slice (and frame).

    ``mask`` is boolean ``(B, 1, D, Y, 1)``; the result has the same shape.
    For ``"2d"`` and ``"2dt"`` each ``(b, d)`` gets the contiguous run of sampled
    lines that contains ``Y // 2`` (empty if the centre line is missing). For
    ``"3d"`` each ``b`` gets the largest-area rectangle ``[z0, z1] × [y0, y1]``
    containing ``(D // 2, Y // 2)`` in which every ``(kz, ky)`` is sampled.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 5 or m.shape[1] != 1 or m.shape[4] != 1:
        raise ValueError(f"mask must be (B, 1, D, Y, 1), got {m.shape}")
    b_n, _, d_n, y_n, _ = m.shape
    grid = m[:, 0, :, :, 0]  # (B, D, Y)
    out = np.zeros_like(grid)
    lo, hi = _centre_runs(grid)  # (B, D) each; hi < lo where the centre line is missing
    if kind != "3d":
        ys = np.arange(y_n)
        out = (ys >= lo[..., None]) & (ys <= hi[..., None])  # (B, D, Y)
        return out[:, None, :, :, None]
    cz = d_n // 2
    for b in range(b_n):
        best = _largest_centred_rectangle(lo[b], hi[b], cz)
        if best is not None:
            z0, z1, y0, y1 = best
            out[b, z0:z1 + 1, y0:y1 + 1] = True
    return out[:, None, :, :, None]


def _largest_centred_rectangle(lo: np.ndarray, hi: np.ndarray, cz: int,
                               max_cells: int = 1 << 22) -> tuple[int, int, int, int] | None:
    """Largest-area ``[z0, z1] × [y0, y1]`` with ``z0 ≤ cz ≤ z1`` inside the rows' runs.

    ``lo[z]..hi[z]`` is the sampled run of row ``z`` through the centre line
    (``hi < lo``: none). The rectangle's width over rows ``z0..z1`` is
    ``min(hi) − max(lo) + 1``. Among equal areas the smallest ``z0``, then the
    smallest ``z1``, wins. Only rows where the running intersection, taken
    outwards from ``cz``, changes are candidates: going one row further out
    with the same intersection only adds height. Candidate pairs are scored
    in blocks of at most ``max_cells``, so a file declaring tens of thousands
    of partitions costs no more memory than a few MiB.
    """
    lo_dn = np.maximum.accumulate(lo[cz::-1])[::-1]  # rows 0..cz: intersection z..cz
    hi_dn = np.minimum.accumulate(hi[cz::-1])[::-1]
    lo_up = np.maximum.accumulate(lo[cz:])  # rows cz..: intersection cz..z
    hi_up = np.minimum.accumulate(hi[cz:])
    ok_dn = np.flatnonzero(hi_dn >= lo_dn)  # valid z0 (a contiguous range ending at cz)
    ok_up = np.flatnonzero(hi_up >= lo_up)  # valid z1 - cz (a range starting at 0)
    if ok_dn.size == 0 or ok_up.size == 0:
        return None
    # Outermost row of every run of equal intersections.
    z0s = ok_dn[np.r_[True, (lo_dn[ok_dn][1:] != lo_dn[ok_dn][:-1])
                      | (hi_dn[ok_dn][1:] != hi_dn[ok_dn][:-1])]]
    u1s = ok_up[np.r_[(lo_up[ok_up][1:] != lo_up[ok_up][:-1])
                      | (hi_up[ok_up][1:] != hi_up[ok_up][:-1]), True]]
    best: tuple[int, int, int, int, int] | None = None  # (area, z0, z1, y0, y1)
    rows_per_block = max(1, max_cells // u1s.size)
    for start in range(0, z0s.size, rows_per_block):
        z0 = z0s[start:start + rows_per_block]
        left = np.maximum(lo_dn[z0][:, None], lo_up[u1s][None, :])  # (n0, n1)
        right = np.minimum(hi_dn[z0][:, None], hi_up[u1s][None, :])
        height = (cz + u1s)[None, :] - z0[:, None] + 1
        area = np.where(right >= left, (right - left + 1) * height, 0)
        i0, i1 = np.unravel_index(int(np.argmax(area)), area.shape)
        if area[i0, i1] > 0 and (best is None or area[i0, i1] > best[0]):
            best = (int(area[i0, i1]), int(z0[i0]), int(cz + u1s[i1]), int(left[i0, i1]),
                    int(right[i0, i1]))
    return None if best is None else best[1:]


def _centre_runs(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of the sampled run through ``Y // 2`` along the last axis."""
    y_n = grid.shape[-1]
    cy = y_n // 2
    ys = np.arange(y_n)
    holes = ~grid
    below = np.where(holes & (ys < cy), ys, -1).max(axis=-1)  # last hole before the centre
    above = np.where(holes & (ys > cy), ys, y_n).min(axis=-1)  # first hole after it
    lo = below + 1
    hi = above - 1
    centre_missing = holes[..., cy]
    lo = np.where(centre_missing, cy + 1, lo)
    hi = np.where(centre_missing, cy, hi)
    return lo.astype(np.int64), hi.astype(np.int64)


def partial_fourier_fraction(sampled: np.ndarray) -> float:
    """Fraction of an encoding axis spanned by the acquired lines, if asymmetric.

    Reported as 1.0 when both unsampled edge bands are narrower than the widest
    gap between acquired lines (the edges are then explained by undersampling).
    """
    idx = np.flatnonzero(sampled)
    n = sampled.size
    if idx.size < 2:
        return 1.0
    gap = int(np.diff(idx).max())
    if idx[0] < gap and (n - 1 - idx[-1]) < gap:
        return 1.0
    return float(idx[-1] - idx[0] + 1) / n


# --------------------------------------------------------------------------- noise
def noise_covariance(noise: np.ndarray, dwell_noise_us: float, dwell_data_us: float, *,
                     path: object | None = None) -> np.ndarray | None:
    """``Ψ = (1/N) Σ n nᴴ`` (C×C, complex128) of noise samples ``(C, N)``, at the data's dwell.

    Ψ is multiplied by ``dwell_noise_us / dwell_data_us`` when both are positive
    (noise variance grows with the bandwidth). None when there is no sample;
    samples that are NaN or infinite are an :class:`InputDataError` naming ``path``.
    """
    samples = np.asarray(noise).astype(np.complex128)  # (C, N)
    if samples.ndim != 2 or samples.shape[1] == 0:
        return None
    if not np.isfinite(samples).all():
        raise InputDataError("noise acquisitions contain NaN or infinite samples", path=path)
    cov = samples @ samples.conj().T / samples.shape[1]  # (C, C)
    ratio = dwell_noise_us / dwell_data_us if dwell_noise_us > 0 and dwell_data_us > 0 else 1.0
    if math.isfinite(ratio) and ratio > 0:
        cov *= ratio
    return cov


def noise_whitener(cov: np.ndarray, notes: Notes) -> np.ndarray | None:
    """``L⁻¹`` with ``Ψ = L Lᴴ``; None (with a warning) if Ψ is not positive definite."""
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        notes.add("the noise covariance is not positive definite (a silent channel, or fewer "
                  "noise samples than coils); the data were not prewhitened")
        return None
    return np.linalg.inv(chol).astype(np.complex64)
