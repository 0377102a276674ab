"""ISMRMRD raw data (HDF5 ``/dataset/xml`` + ``/dataset/data``): bulk reader and writer.

Reading is done in bulk: all acquisition headers come from one h5py read of the
``head`` member of the compound table, and the samples are read in blocks of
consecutive rows (about 64 MiB each) and scattered into the k-space array with
vectorised indexing. No per-acquisition Python object is created, so tens of
thousands of acquisitions load in seconds.

How acquisitions become ``RawScan.kspace`` (shape ``(B, C, D, Y, X)``)
----------------------------------------------------------------------
Acquisition classes (flags are 1-based bit numbers, flag ``n`` is ``1 << (n-1)``):

* noise (``ACQ_IS_NOISE_MEASUREMENT``, 19): used only to estimate the coil noise
  covariance, never placed in k-space;
* skipped: navigators (23), phase correction (24), HP feedback (26), dummy scans
  (27), RT feedback (28), surface-coil correction (29), phase stabilisation (30, 31);
* everything else is image data, including calibration lines. Lines flagged
  ``ACQ_IS_PARALLEL_CALIBRATION`` (20, ACS only) are real measurements of the
  same object: they are placed in ``kspace`` and count as sampled in ``mask``,
  unless an imaging line exists at the same k-space position (then the imaging
  line wins and the ACS line is not used). Lines with either calibration flag
  (20 or ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``, 21) mark ``calib``.
  Without any calibration flag, ``calib`` is the largest fully sampled block
  around the k-space centre (:func:`find_calibration_region`).
* reversed readouts (``ACQ_IS_REVERSE``, 22; EPI) are rejected: they need a
  phase correction molrecon does not do.

Kinds: encoded matrix z > 1 gives ``"3d"`` (``kspace_encode_step_2`` -> D).
Otherwise frames in ``idx.phase`` (cine), or else several ``idx.repetition``
values, give ``"2dt"`` with frames -> D; else ``"2d"``. ``idx.slice`` -> B, for
every kind. Only the first contrast and the first set are used (with a
warning), and likewise the first repetition/phase where they are not the frame
axis. Slices and frames are numbered compactly in index order; the slices of a
multi-slice scan are then ordered by their position along the slice direction,
so that B runs along ``+slice_dir`` with a constant step (what NIfTI needs).

Lines that land on the same ``(b, d, y)`` position (``idx.average``, repeated
ACS lines) are averaged: summed and divided by their count. ``mask`` is True
exactly where at least one line landed.

Readout (``X``): the samples of a line, after dropping ``discard_pre`` /
``discard_post``, are placed on the encoded grid of ``encodedSpace.x`` points so
that ``center_sample`` lands on index ``x_enc // 2``; the rest is zero-filled
(asymmetric echoes). A ``center_sample`` of 0 on a full-length line is read as
"not set" and the line taken as symmetric. The readout oversampling is then
removed: centred inverse FFT along the readout, crop the central
``X = x_enc · FOV_recon,x / FOV_enc,x`` points (the recon matrix x whenever the
header is self-consistent), centred forward FFT. All FFTs are orthonormal, so
the cropped image equals the centre of the oversampled one and white noise
keeps its per-sample variance.

Phase and partition encoding (``Y``, ``D`` for 3D): a line with index ``k`` goes
to grid index ``N // 2 + (k - center)`` where ``center`` comes from the header's
``encodingLimits`` (``N // 2`` if absent, or if it is 0 while the maximum is not:
a limit left unfilled) and ``N`` is the *encoded* matrix size.
Indices outside the header's limits are an error. If the encoded matrix is too
small to hold the lines around their centre (some converters count only the
acquired lines of a partial-Fourier scan), the grid is enlarged just enough,
keeping the encoded field of view, with a warning. The reconstruction covers
the encoded field of view in y and z: phase/slice oversampling is kept (not
cropped to ``reconSpace``), and ``Geometry`` describes that grid exactly.

Noise: the covariance ``Ψ = (1/N) Σ n nᴴ`` (C×C, complex128) over all noise
samples, scaled by ``dwell_noise / dwell_data`` when the two dwell times
(``sample_time_us``) differ (noise variance grows with the bandwidth). With
``prewhiten=True`` every line is multiplied by ``L⁻¹`` where ``Ψ = L Lᴴ``
(Cholesky), so coil noise becomes white with unit variance per sample (on
lines averaged n times the variance is 1/n).

Ground truth: a ``phantom`` dataset beside ``data`` (as written by Debian's
``ismrmrd_generate_cartesian_shepp_logan``) is returned as
``RawScan.ground_truth`` ``(B, D, Y, X)`` when its shape fits; its intensity
scale is the producer's, not the k-space's.

Header: parsed with ``ismrmrd.xsd.CreateFromDocument``. Headers written against
a newer schema (elements this ismrmrd-python does not know) fail there with an
xsdata ``ParserError``; molrecon then parses again with unknown elements
ignored (the same xsdata classes, ``fail_on_unknown_properties=False``) and
records a warning. Malformed XML or a header without the required elements is
an :class:`~molrecon.errors.InputDataError`, and so are matrix sizes and
encoding limits outside the schema's ``unsignedShort`` range (0..65535). XML
entities are never expanded beyond expat's amplification limit nor fetched
from outside. A field of view that is not finite or beyond ``MAX_FOV_MM``
counts as missing.

Hostile or damaged files
------------------------
Every size is checked before the allocation it implies: at most
``MAX_ACQUISITIONS`` rows in the table, at most ``MAX_KSPACE_ELEMENTS`` k-space
values, and neither more than the memory available now
(:class:`~molrecon.errors.ResourceError`). Failures of the HDF5 library on a
file that opened (damaged B-trees, heaps or type descriptions) become an
:class:`~molrecon.errors.InputDataError`. Acquisition headers written with
other field widths are converted to ISMRMRD's layout; a missing field is an
error. Samples that are finite in the file but overflow float32 in the readout
FFT or the whitening are refused. Slice positions that are not finite (or
beyond ``MAX_FOV_MM``) are replaced by the origin, and direction vectors that
are not finite or not an orthonormal frame count as unknown orientation, each
with a :class:`~molrecon.errors.GeometryWarning`.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...atomic import atomic_path
from ...errors import GeometryWarning, InputDataError, InputDataWarning, ResourceError
from ...memory import available_memory_bytes
from ..types import KINDS, Geometry, Kind, RawScan, ScanInfo

try:  # scipy's pocketfft runs single precision natively: ~5x numpy's speed on readouts
    from scipy import fft as _fft
except ImportError:  # pragma: no cover - scipy is optional
    _fft = np.fft

__all__ = [
    "MAX_ACQUISITIONS",
    "MAX_KSPACE_ELEMENTS",
    "EncodingLimit",
    "HeaderFields",
    "find_calibration_region",
    "noise_covariance",
    "open_hdf5",
    "parse_ismrmrd_header",
    "partial_fourier_fraction",
    "read_ismrmrd",
    "remove_readout_oversampling",
    "write_ismrmrd",
]

# --------------------------------------------------------------------------- flags
# ISMRMRD acquisition flags, as 1-based bit numbers (flag n is the bit 1 << (n - 1)).
ACQ_FIRST_IN_SLICE = 7
ACQ_LAST_IN_SLICE = 8
ACQ_IS_NOISE_MEASUREMENT = 19
ACQ_IS_PARALLEL_CALIBRATION = 20
ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING = 21
ACQ_IS_REVERSE = 22
ACQ_LAST_IN_MEASUREMENT = 25
_SKIPPED_FLAGS = {
    23: "navigator",
    24: "phase correction",
    26: "HP feedback",
    27: "dummy scan",
    28: "RT feedback",
    29: "surface coil correction",
    30: "phase stabilisation reference",
    31: "phase stabilisation",
}

#: Largest k-space (B·C·D·Y·X complex64 values, 16 GiB) a file may ask for; checked
#: against the header and the acquisition indices before anything is allocated.
MAX_KSPACE_ELEMENTS = 2**31

#: Most acquisitions an acquisition table may declare (their headers alone take 340 bytes
#: each: 5.3 GiB at the limit); checked before the headers are read.
MAX_ACQUISITIONS = 2**24

#: Largest field of view (mm) and slice position offset (mm) taken as real; larger values
#: (which would overflow NIfTI's float32 affine) count as missing.
MAX_FOV_MM = 1e5

_USHORT_MAX = 65535  # matrix sizes, encoding limits and idx values are 16-bit in ISMRMRD

_TICK_MS = 2.5  # acquisition_time_stamp unit
_BLOCK_BYTES = 64 << 20  # sample data read per h5py call
_WRITER_DWELL_US = 5.0  # nominal dwell time written by write_ismrmrd (data and noise alike)


def _bit(flag: int) -> np.uint64:
    return np.uint64(1 << (flag - 1))


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


# --------------------------------------------------------------------------- header
@dataclass(frozen=True)
class EncodingLimit:
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
        return _header_fields(hdr, ignored)
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


def _header_fields(hdr: Any, ignored: bool) -> HeaderFields:
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


# --------------------------------------------------------------------------- reading
class _Notes:
    """Warnings raised while reading; also kept for ``ScanInfo.warnings``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []

    def add(self, message: str, category: type[Warning] = InputDataWarning) -> None:
        self.messages.append(message)
        warnings.warn(f"{self.path}: {message}", category, stacklevel=4)


@dataclass(frozen=True)
class _Plan:
    """Where every used acquisition goes, worked out from the headers alone."""

    kind: Kind
    shape: tuple[int, int, int, int, int]  # (B, C, D, Y, X)
    enc_x: int
    n_samples: int
    rows: np.ndarray  # (L,) file rows whose samples are placed, ascending
    b: np.ndarray  # (L,) grid positions of those rows
    d: np.ndarray
    y: np.ndarray
    discard_pre: np.ndarray  # (L,)
    discard_post: np.ndarray
    center_sample: np.ndarray
    counts: np.ndarray  # (B, D, Y) lines averaged per position
    calib: np.ndarray  # (B, D, Y) positions with a calibration flag
    any_calib_flag: bool
    positions: np.ndarray  # (B, 3) LPS mm
    dirs: tuple[np.ndarray, np.ndarray, np.ndarray] | None  # None: no usable orientation
    dirs_problem: str  # why ``dirs`` is None ("zero", "not finite", "not orthonormal")
    frame_source: str | None
    frame_stamps_ms: np.ndarray | None  # (D,) mean acquisition time of each frame
    lines_per_frame: float
    n_used: int


def _first_line(exc: BaseException, limit: int = 160) -> str:
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
        raise InputDataError(f"cannot be read ({_first_line(exc)})", path=p) from None
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
                             f"{_first_line(exc)})", path=path) from None
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


def _head_dtype() -> np.dtype:
    from ismrmrd.hdf5 import acquisition_header_dtype

    return np.dtype(acquisition_header_dtype)


def _read_heads(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """All acquisition headers, converted field by field to ISMRMRD's header layout.

    A table written with other integer or float widths is read all the same; a
    header that lacks a field molrecon uses is an :class:`InputDataError`.
    """
    ref = _head_dtype()
    stored = ds.dtype["head"]
    check_memory(ds.shape[0] * max(stored.itemsize, ref.itemsize) * 2, "the acquisition headers",
                 path)
    try:
        raw = ds.fields("head")[...]
    except ValueError as exc:  # h5py: "array is too big" and friends
        raise InputDataError(f"acquisition headers cannot be read ({_first_line(exc)})",
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


def read_ismrmrd(path: str | os.PathLike[str], *, prewhiten: bool = True,
                 group: str = "dataset") -> RawScan:
    """Read a Cartesian ISMRMRD file into a :class:`RawScan` (see the module docstring).

    ``prewhiten`` multiplies the data by the inverse Cholesky factor of the noise
    covariance when the file has noise acquisitions (``RawScan.whitened``).
    ``group`` is the HDF5 group holding ``xml`` and ``data``.
    """
    p = Path(path)
    notes = _Notes(p)
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
        plan = _plan(heads, hdr, p, notes)
        noise_rows = np.flatnonzero((heads["flags"] & _bit(ACQ_IS_NOISE_MEASUREMENT)) != 0)
        noise_cov = None
        whitener = None
        if noise_rows.size:
            noise_cov = _noise_covariance(ds, heads, noise_rows, plan, p)
            if noise_cov is None:
                notes.add("the noise acquisitions hold no samples; the data were not prewhitened")
            elif prewhiten:
                whitener = _whitener(noise_cov, notes)
        blocks = _iter_blocks(ds, plan.rows, plan.shape[1], plan.n_samples, p)
        kspace = _assemble(blocks, plan, whitener, p)
        truth = _ground_truth(grp, plan)

    return assemble_scan(plan, hdr, kspace, notes, fmt="ismrmrd", path=p, noise_cov=noise_cov,
                         whitened=whitener is not None, n_noise=int(noise_rows.size),
                         truth=truth)


def assemble_scan(plan: _Plan, hdr: HeaderFields, kspace: np.ndarray, notes: _Notes, *,
                  fmt: str, path: Path, noise_cov: np.ndarray | None, whitened: bool,
                  n_noise: int, truth: np.ndarray | None = None) -> RawScan:
    """The :class:`RawScan` of a planned and assembled scan: sampling mask, calibration
    region (flagged lines, or the largest fully sampled centre), geometry and the
    header's facts. Shared by every reader that goes through :func:`_plan`."""
    mask = (plan.counts > 0)[:, None, :, :, None]  # (B, 1, D, Y, 1)
    if plan.any_calib_flag:
        calib = (plan.calib & (plan.counts > 0))[:, None, :, :, None]
    else:
        calib = find_calibration_region(mask, plan.kind)
    geometry = _geometry(plan, hdr, notes)
    sampled_y = np.asarray(mask.any(axis=(0, 1, 2, 4)))  # (Y,)
    sampled_z = np.asarray(mask.any(axis=(0, 1, 3, 4)) if plan.kind == "3d" else np.ones(1, bool))
    info = ScanInfo(
        format=fmt,
        vendor=hdr.vendor,
        model=hdr.model,
        field_strength_t=hdr.field_strength_t,
        protocol=hdr.protocol,
        tr_ms=hdr.tr_ms,
        te_ms=hdr.te_ms,
        encoded_matrix=hdr.encoded_matrix,
        encoded_fov_mm=hdr.encoded_fov_mm,
        readout_oversampling=plan.enc_x / plan.shape[4],
        partial_fourier=(partial_fourier_fraction(sampled_y), partial_fourier_fraction(sampled_z)),
        averages=int(plan.counts.max()),
        n_acquisitions=plan.n_used,
        n_noise_acquisitions=n_noise,
        warnings=tuple(notes.messages),
    )
    return RawScan(kspace=kspace, mask=mask, calib=calib, kind=plan.kind, geometry=geometry,
                   info=info, source=str(path), noise_cov=noise_cov, whitened=whitened,
                   ground_truth=truth)


def _plan(heads: np.ndarray, hdr: HeaderFields, path: Path, notes: _Notes) -> _Plan:
    n_total = heads.shape[0]
    if n_total == 0:
        raise InputDataError("contains no acquisitions", path=path)
    if 0 in hdr.recon_matrix[:2]:
        shown = " × ".join(str(v) for v in hdr.recon_matrix)
        notes.add(f"the header's reconSpace matrix is {shown}: the image keeps the encoded "
                  "matrix (readout oversampling removed from the FOVs' ratio when they are given)")
    flags = heads["flags"].astype(np.uint64)
    idx = heads["idx"]

    def has(flag: int) -> np.ndarray:
        return (flags & _bit(flag)) != 0

    noise = has(ACQ_IS_NOISE_MEASUREMENT)
    skipped = np.zeros(n_total, dtype=bool)
    for flag in _SKIPPED_FLAGS:
        skipped |= has(flag)
    use = ~noise & ~skipped
    other_space = use & (heads["encoding_space_ref"] != 0)
    if other_space.any():
        spaces = sorted(set(heads["encoding_space_ref"][other_space].tolist()))
        notes.add(f"{int(other_space.sum())} acquisitions of encoding space(s) {spaces} ignored; "
                  "only encoding space 0 is reconstructed")
        use &= ~other_space
    if not use.any():
        if noise.all():
            raise InputDataError("contains only noise acquisitions, no image data", path=path)
        kinds = sorted({name for flag, name in _SKIPPED_FLAGS.items() if (has(flag)).any()})
        raise InputDataError("contains no imaging acquisitions"
                             + (f" (only {', '.join(kinds)} data)" if kinds else ""), path=path)

    if hdr.trajectory != "cartesian":
        raise InputDataError(f"trajectory is {hdr.trajectory!r}: molrecon reconstructs "
                             "Cartesian data only", path=path)
    if (heads["trajectory_dimensions"][use] > 0).any():
        raise InputDataError("acquisitions carry k-space trajectory coordinates "
                             "(non-Cartesian data): molrecon reconstructs Cartesian data only",
                             path=path)
    if has(ACQ_IS_REVERSE)[use].any():
        raise InputDataError("has reversed readouts (EPI); they need a phase correction "
                             "that molrecon does not do", path=path)

    for name in ("contrast", "set"):
        values = idx[name][use]
        first = int(values.min())
        if (values != first).any():
            n_values = np.unique(values).size
            notes.add(f"{n_values} {name}s found; only {name} {first} is used")
            use &= idx[name] == first

    enc_x, enc_y, enc_z = hdr.encoded_matrix
    if min(enc_x, enc_y, enc_z) <= 0:
        raise InputDataError(f"encoded matrix size {hdr.encoded_matrix} has a zero dimension",
                             path=path)
    is3d = enc_z > 1
    frame_source: str | None = None
    for name in ("phase", "repetition"):
        values = idx[name][use]
        if np.unique(values).size <= 1:
            continue
        if not is3d and frame_source is None:
            frame_source = name
            continue
        first = int(values.min())
        why = "3D time series are not supported" if is3d else f"frames are taken from {frame_source}"
        notes.add(f"{np.unique(values).size} {name} values found; only {name} {first} is used "
                  f"({why})")
        use &= idx[name] == first
    kind: Kind = "3d" if is3d else ("2dt" if frame_source else "2d")

    rows = np.flatnonzero(use)
    coils = heads["active_channels"][rows]
    if coils.min() != coils.max():
        raise InputDataError(f"inconsistent coil counts among imaging acquisitions "
                             f"({coils.min()} to {coils.max()} channels)", path=path)
    n_coils = int(coils[0])
    n_samples_all = heads["number_of_samples"][rows]
    if n_samples_all.min() != n_samples_all.max():
        raise InputDataError(f"inconsistent readout lengths among imaging acquisitions "
                             f"({n_samples_all.min()} to {n_samples_all.max()} samples)", path=path)
    n_samples = int(n_samples_all[0])
    if n_coils == 0 or n_samples == 0:
        raise InputDataError("imaging acquisitions have no channels or no samples", path=path)

    slice_values, b = np.unique(idx["slice"][rows], return_inverse=True)
    b_n = slice_values.size
    ky = idx["kspace_encode_step_1"][rows].astype(np.int64)
    kz = idx["kspace_encode_step_2"][rows].astype(np.int64)
    y_n, y = _grid_positions(ky, enc_y, hdr.ky_limits, "kspace_encode_step_1", path, notes)
    if is3d:
        d_n, d = _grid_positions(kz, enc_z, hdr.kz_limits, "kspace_encode_step_2", path, notes)
    else:
        if (kz != 0).any():
            raise InputDataError(f"kspace_encode_step_2 indices up to {kz.max()} are outside "
                                 "the limits of a 2D scan (encoded matrix z = 1)", path=path)
        if frame_source is not None:
            frame_values, d = np.unique(idx[frame_source][rows], return_inverse=True)
            d_n = frame_values.size
        else:
            d_n, d = 1, np.zeros(rows.size, dtype=np.int64)
    x_n = _readout_matrix(hdr, enc_x)

    elements = b_n * n_coils * d_n * y_n * max(x_n, enc_x)
    if elements > MAX_KSPACE_ELEMENTS:
        raise InputDataError(
            f"k-space of {b_n}×{n_coils}×{d_n}×{y_n}×{max(x_n, enc_x)} values "
            f"({elements * 8 / 2**30:.0f} GiB) exceeds the limit of {MAX_KSPACE_ELEMENTS} values: "
            "absurd matrix sizes in the header or indices", path=path)
    check_memory(elements * 8, f"k-space of {b_n}×{n_coils}×{d_n}×{y_n}×{max(x_n, enc_x)} values",
                 path)

    # Calibration lines: ACS-only lines are data too, unless an imaging line covers the spot.
    row_flags = flags[rows]
    cal_only = ((row_flags & _bit(ACQ_IS_PARALLEL_CALIBRATION)) != 0) & (
        (row_flags & _bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)) == 0)
    cal_any = (row_flags & (_bit(ACQ_IS_PARALLEL_CALIBRATION)
                            | _bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))) != 0
    positions, dirs, b, dirs_problem = _slice_positions(heads, rows, b, b_n, notes)

    key = (b * d_n + d) * y_n + y  # (L,) flat (b, d, y) position
    place = np.ones(rows.size, dtype=bool)
    if cal_only.any() and (~cal_only).any():
        place &= ~(cal_only & np.isin(key, key[~cal_only]))
    cells = b_n * d_n * y_n
    counts = np.bincount(key[place], minlength=cells).reshape(b_n, d_n, y_n)
    calib = np.zeros(cells, dtype=bool)
    calib[key[cal_any]] = True

    stamps = None
    if kind == "2dt":
        t = heads["acquisition_time_stamp"][rows].astype(np.float64)
        per_frame = np.bincount(d, weights=t, minlength=d_n) / np.maximum(
            np.bincount(d, minlength=d_n), 1)
        stamps = per_frame * _TICK_MS

    return _Plan(
        kind=kind,
        shape=(b_n, n_coils, d_n, y_n, x_n),
        enc_x=enc_x,
        n_samples=n_samples,
        rows=rows[place],
        b=b[place],
        d=d[place],
        y=y[place],
        discard_pre=heads["discard_pre"][rows][place].astype(np.int64),
        discard_post=heads["discard_post"][rows][place].astype(np.int64),
        center_sample=heads["center_sample"][rows][place].astype(np.int64),
        counts=counts,
        calib=calib.reshape(b_n, d_n, y_n),
        any_calib_flag=bool(cal_any.any()),
        positions=positions,
        dirs=dirs,
        dirs_problem=dirs_problem,
        frame_source=frame_source,
        frame_stamps_ms=stamps,
        lines_per_frame=float(place.sum()) / max(b_n * d_n, 1),
        n_used=int(rows.size),
    )


def _grid_positions(k: np.ndarray, n_enc: int, limits: EncodingLimit | None, name: str,
                    path: Path, notes: _Notes) -> tuple[int, np.ndarray]:
    """Grid size and grid index ``N // 2 + (k - center)`` of each line (module docstring)."""
    center = n_enc // 2
    if limits is not None:
        if k.min() < limits.minimum or k.max() > limits.maximum:
            raise InputDataError(
                f"{name} indices {k.min()}..{k.max()} lie outside the header's encoding limits "
                f"{limits.minimum}..{limits.maximum}", path=path)
        # A centre of 0 with lines above it means "not filled in": keep n_enc // 2.
        if limits.center != 0 or limits.maximum == 0:
            center = limits.center
    off = k - center
    lo = max(0, -int(off.min()))
    hi = max(0, int(off.max()))
    n = max(n_enc, 2 * lo, 2 * hi + 1)
    while n // 2 < lo or n - 1 - n // 2 < hi:
        n += 1
    if n != n_enc:
        notes.add(f"{name}: the lines reach {lo} below and {hi} above the centre ({center}), "
                  f"beyond the encoded matrix of {n_enc}; the k-space grid was enlarged to {n} "
                  "(same field of view)")
    return n, (n // 2 + off).astype(np.int64)


def _readout_matrix(hdr: HeaderFields, enc_x: int) -> int:
    """Readout points kept after removing oversampling: ``enc_x · FOV_recon / FOV_enc``."""
    enc_fov, rec_fov = hdr.encoded_fov_mm[0], hdr.recon_fov_mm[0]
    if enc_fov > 0 and rec_fov > 0:
        x_n = round(enc_x * min(rec_fov / enc_fov, 1.0))
    else:
        x_n = hdr.recon_matrix[0] if hdr.recon_matrix[0] > 0 else enc_x
    return min(max(x_n, 1), enc_x)


def _slice_positions(heads: np.ndarray, rows: np.ndarray, b: np.ndarray, b_n: int,
                     notes: _Notes
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                                np.ndarray, str]:
    """Mean LPS position per slice, the direction cosines, slices ordered along slice_dir.

    The direction cosines are None (with the reason as the last item) when they are
    all zero, not finite, or do not form an orthonormal frame.
    """
    pos = heads["position"][rows].astype(np.float64)  # (L, 3)
    if not (np.isfinite(pos).all() and np.abs(pos).max(initial=0.0) <= MAX_FOV_MM):
        notes.add("the acquisition headers have unusable slice positions (not finite, or "
                  f"beyond {MAX_FOV_MM:g} mm); the slices were placed at the origin",
                  GeometryWarning)
        pos = np.zeros_like(pos)
    n_per = np.maximum(np.bincount(b, minlength=b_n), 1).astype(np.float64)
    positions = np.stack([np.bincount(b, weights=pos[:, i], minlength=b_n) / n_per
                          for i in range(3)], axis=1)  # (B, 3)
    means = [heads[name][rows].astype(np.float64).mean(axis=0)
             for name in ("read_dir", "phase_dir", "slice_dir")]
    if not all(np.isfinite(v).all() for v in means):
        return positions, None, b, "not finite"
    norms = [float(np.linalg.norm(v)) for v in means]
    if min(norms) <= 1e-3:
        return positions, None, b, "zero"
    dirs = (means[0] / norms[0], means[1] / norms[1], means[2] / norms[2])
    gram = np.abs(np.stack(dirs) @ np.stack(dirs).T - np.eye(3))
    if gram.max() > 0.05:
        return positions, None, b, "not orthonormal"
    if b_n > 1:
        order = np.argsort(positions @ dirs[2], kind="stable")  # new slice i is old order[i]
        rank = np.empty(b_n, dtype=np.int64)
        rank[order] = np.arange(b_n)
        positions = positions[order]
        b = rank[b]
    return positions, dirs, b, ""


def _iter_blocks(ds: h5py.Dataset, rows: np.ndarray, n_coils: int, n_samples: int,
                 path: Path) -> Iterator[tuple[slice, np.ndarray]]:
    """Sample data of ``rows`` (ascending), as ``(n, C, Ns)`` complex64 blocks."""
    field = ds.fields("data")
    block_rows = max(1, _BLOCK_BYTES // (8 * n_coils * n_samples))
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


def _place_readout(data: np.ndarray, pre: np.ndarray, post: np.ndarray, center: np.ndarray,
                   enc_x: int, path: Path) -> np.ndarray:
    """Put each line's samples on the encoded readout grid, ``center_sample`` at ``enc_x // 2``."""
    n, c_n, n_s = data.shape
    keep = n_s - pre - post
    if (keep <= 0).any():
        raise InputDataError("discard_pre + discard_post remove every sample of a line", path=path)
    ctr = center - pre
    unset = (center == 0) & (keep == enc_x)
    ctr = np.where(unset, enc_x // 2, ctr)
    start = enc_x // 2 - ctr
    if ((start < 0) | (start + keep > enc_x)).any():
        raise InputDataError(f"readout samples ({n_s}, centre {int(center[0])}) do not fit the "
                             f"encoded readout of {enc_x} points", path=path)
    if n_s == enc_x and not start.any() and not pre.any() and not post.any():
        return data
    out = np.zeros((n, c_n, enc_x), dtype=data.dtype)  # (n, C, Xenc)
    combos = np.stack([pre, keep, start], axis=1)
    for p0, k0, s0 in np.unique(combos, axis=0):
        sel = np.flatnonzero((combos == (p0, k0, s0)).all(axis=1))
        out[sel, :, s0:s0 + k0] = data[sel, :, p0:p0 + k0]
    return out


def _assemble(blocks: Iterable[tuple[slice, np.ndarray]], plan: _Plan,
              whitener: np.ndarray | None, path: Path) -> np.ndarray:
    """The k-space of ``plan`` from the samples of its rows, block by block.

    ``blocks`` yields ``(sl, data)``: the samples ``(n, C, Ns)`` complex64 of
    ``plan.rows[sl]``, in order (:func:`_iter_blocks` for an ISMRMRD table; the
    twix reader has its own). Lines are placed, stripped of readout
    oversampling, whitened and averaged as the module docstring says.
    """
    try:
        kspace = np.zeros(plan.shape, dtype=np.complex64)  # (B, C, D, Y, X)
    except MemoryError:
        raise ResourceError(f"k-space of shape {plan.shape} does not fit into memory",
                            path=path) from None
    averaged = bool((plan.counts > 1).any())
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, once
        _fill(kspace, blocks, plan, whitener, averaged, path)
    if averaged:
        kspace /= np.maximum(plan.counts, 1)[:, None, :, :, None].astype(np.float32)
    if not np.isfinite(kspace.view(np.float32)).all():
        # Finite samples near the float32 limit overflow in the readout FFT or the whitening.
        raise InputDataError("acquisition data overflow single precision (samples close to "
                             "the float32 limit of 3.4e38)", path=path)
    return kspace


def _fill(kspace: np.ndarray, blocks: Iterable[tuple[slice, np.ndarray]], plan: _Plan,
          whitener: np.ndarray | None, averaged: bool, path: Path) -> None:
    """Place every used line of ``blocks`` into ``kspace`` (summed where ``averaged``)."""
    x_n = plan.shape[4]
    for sl, data in blocks:
        if not np.isfinite(data.view(np.float32)).all():
            raise InputDataError("acquisition data contain NaN or infinite samples", path=path)
        lines = _place_readout(data, plan.discard_pre[sl], plan.discard_post[sl],
                               plan.center_sample[sl], plan.enc_x, path)  # (n, C, Xenc)
        lines = remove_readout_oversampling(lines, x_n)  # (n, C, X)
        if whitener is not None:
            lines = np.matmul(whitener, lines)  # (C, C) @ (n, C, X)
        index = (plan.b[sl], slice(None), plan.d[sl], plan.y[sl], slice(None))
        if averaged:
            np.add.at(kspace, index, lines)  # type: ignore[arg-type]  # mixed index: numpy stubs
        else:
            kspace[index] = lines


def _noise_covariance(ds: h5py.Dataset, heads: np.ndarray, rows: np.ndarray, plan: _Plan,
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


def _whitener(cov: np.ndarray, notes: _Notes) -> np.ndarray | None:
    """``L⁻¹`` with ``Ψ = L Lᴴ``; None (with a warning) if Ψ is not positive definite."""
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        notes.add("the noise covariance is not positive definite (a silent channel, or fewer "
                  "noise samples than coils); the data were not prewhitened")
        return None
    return np.linalg.inv(chol).astype(np.complex64)


def _ground_truth(grp: h5py.Group, plan: _Plan) -> np.ndarray | None:
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


def _geometry(plan: _Plan, hdr: HeaderFields, notes: _Notes) -> Geometry:
    b_n, _, d_n, y_n, x_n = plan.shape
    fx, fy, fz = hdr.encoded_fov_mm
    fov = (fx * (x_n / plan.enc_x), fy, fz)
    matrix = (x_n, y_n, d_n if plan.kind == "3d" else 1)
    if min(fov) <= 0:
        notes.add(f"the header's field of view {hdr.encoded_fov_mm} mm is not positive; "
                  "1 mm voxels assumed", GeometryWarning)
        fov = (float(matrix[0]), float(matrix[1]), float(matrix[2]))
    if plan.dirs is None:
        notes.add(f"the acquisition headers have {plan.dirs_problem} direction vectors; "
                  "identity orientation assumed (read = L, phase = P, slice = S)",
                  GeometryWarning)
        read, phase, slc = np.eye(3)
        known = False
    else:
        read, phase, slc = plan.dirs
        known = True
    spacing = fov[2] / matrix[2]
    if plan.kind != "3d" and b_n > 1:
        steps = np.diff(plan.positions @ slc) if known else np.linalg.norm(
            np.diff(plan.positions, axis=0), axis=1)
        step = float(np.median(np.abs(steps)))
        if step > 1e-3:
            spacing = step
    frame_ms = None
    if plan.kind == "2dt":
        frame_ms = _frame_time(plan, hdr)
    return Geometry(
        fov_mm=(float(fov[0]), float(fov[1]), float(fov[2])),
        matrix=matrix,
        position=plan.positions,
        read_dir=np.asarray(read, dtype=np.float64),
        phase_dir=np.asarray(phase, dtype=np.float64),
        slice_dir=np.asarray(slc, dtype=np.float64),
        slice_spacing_mm=float(spacing),
        frame_time_ms=frame_ms,
        orientation_known=known,
    )


def _frame_time(plan: _Plan, hdr: HeaderFields) -> float | None:
    """Median step of the frames' mean time stamps; else TR-based (see below); else None.

    Without time stamps a repetition (a full k-space per frame) takes TR × lines
    per frame, and a cine phase is taken as one TR apart.
    """
    stamps = plan.frame_stamps_ms
    if stamps is not None and stamps.size > 1:
        steps = np.abs(np.diff(stamps))
        if (steps > 0).any():
            return float(np.median(steps))
    if hdr.tr_ms is None or hdr.tr_ms <= 0:
        return None
    if plan.frame_source == "repetition":
        return float(hdr.tr_ms * plan.lines_per_frame)
    return float(hdr.tr_ms)


# --------------------------------------------------------------------------- writing
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

    from ismrmrd.hdf5 import acquisition_dtype

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
        head["flags"][i] = _bit(ACQ_IS_NOISE_MEASUREMENT)
        head["number_of_samples"][i] = row.shape[1]
    # Image lines.
    img = slice(n_noise, n_noise + n_lines)
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
                dd * geometry.frame_time_ms / _TICK_MS).astype(np.uint32)
    line_flags = np.zeros(n_lines, dtype=np.uint64)
    line_flags[cal[bb, 0, dd, yy, 0]] |= _bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    group = bb * d_n + dd if kind != "3d" else bb  # a "slice" of lines: per (b, frame), or per slab
    first = np.r_[True, group[1:] != group[:-1]]
    last = np.r_[group[1:] != group[:-1], True]
    line_flags[first] |= _bit(ACQ_FIRST_IN_SLICE)
    line_flags[last] |= _bit(ACQ_LAST_IN_SLICE)
    line_flags[-1] |= _bit(ACQ_LAST_IN_MEASUREMENT)
    head["flags"][img] = line_flags

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

    xml = _header_xml(kind, geometry, oversampling, (b_n, c_n, d_n, y_n, xe_n), m, info)
    with atomic_path(path, force=force) as tmp, h5py.File(tmp, "w") as f:
        grp = f.create_group("dataset")
        xml_ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        xml_ds[0] = xml
        grp.create_dataset("data", data=table, maxshape=(None,), chunks=True)
    return Path(path)


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

