"""Acquisition planning: where every acquisition of a scan goes, from the headers alone.

:func:`plan_acquisitions` takes the acquisition headers (ISMRMRD layout, one row
per acquisition: read from an ISMRMRD table, or built by the twix and MRD v2
readers) and the XML header's facts, and works out, before any sample is read,
the :class:`AcquisitionPlan`: the scan kind, the k-space shape ``(B, C, D, Y, X)``,
the file rows whose samples are placed and their ``(b, d, y)`` grid positions,
the number of lines averaged per position, the calibration lines, and the
slice positions and orientation. The rules (which acquisitions are used, how
indices become grid positions, what is refused) are those of the package
docstring of :mod:`molrecon.io.ismrmrd`; every size is checked against
``MAX_KSPACE_ELEMENTS`` and the memory available now before anything is
allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import GeometryWarning, InputDataError
from ..kspace import MAX_KSPACE_ELEMENTS, Notes, check_memory
from ..types import Kind
from .header import EncodingLimit, HeaderFields
from .layout import (
    ACQ_IS_NOISE_MEASUREMENT,
    ACQ_IS_PARALLEL_CALIBRATION,
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    ACQ_IS_REVERSE,
    MAX_FOV_MM,
    SKIPPED_FLAGS,
    TICK_MS,
    flag_bit,
)

__all__ = ["AcquisitionPlan", "plan_acquisitions"]


@dataclass(frozen=True)
class AcquisitionPlan:
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


def plan_acquisitions(heads: np.ndarray, hdr: HeaderFields, path: Path,
                      notes: Notes) -> AcquisitionPlan:
    """The :class:`AcquisitionPlan` of acquisition headers ``heads`` under header ``hdr``.

    Raises :class:`InputDataError` (naming ``path``) for data molrecon does not
    reconstruct or a file whose indices do not fit its header; what is dropped
    or adjusted on the way is recorded in ``notes``.
    """
    if heads.shape[0] == 0:
        raise InputDataError("contains no acquisitions", path=path)
    if 0 in hdr.recon_matrix[:2]:
        shown = " × ".join(str(v) for v in hdr.recon_matrix)
        notes.add(f"the header's reconSpace matrix is {shown}: the image keeps the encoded "
                  "matrix (readout oversampling removed from the FOVs' ratio when they are given)")
    flags = heads["flags"].astype(np.uint64)
    use = _imaging_acquisitions(heads, flags, path, notes)
    _check_cartesian(heads, flags, use, hdr, path)
    use = _first_contrast_and_set(heads["idx"], use, notes)
    enc_x, enc_y, enc_z = hdr.encoded_matrix
    if min(enc_x, enc_y, enc_z) <= 0:
        raise InputDataError(f"encoded matrix size {hdr.encoded_matrix} has a zero dimension",
                             path=path)
    is3d = enc_z > 1
    use, frame_source = _frame_axis(heads["idx"], use, is3d, notes)
    kind: Kind = "3d" if is3d else ("2dt" if frame_source else "2d")

    rows = np.flatnonzero(use)
    n_coils, n_samples = _line_shape(heads, rows, path)
    b, b_n, d, d_n, y, y_n = _grid(heads["idx"], rows, hdr, is3d, frame_source, path, notes)
    x_n = _readout_matrix(hdr, enc_x)
    _check_size((b_n, n_coils, d_n, y_n, max(x_n, enc_x)), path)
    row_flags = flags[rows]
    positions, dirs, b, dirs_problem = _slice_positions(heads, rows, b, b_n, notes)
    place, counts, calib, any_calib = _placement(row_flags, b, d, y, (b_n, d_n, y_n))
    stamps = _frame_stamps(heads, rows, d, d_n) if kind == "2dt" else None

    return AcquisitionPlan(
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
        calib=calib,
        any_calib_flag=any_calib,
        positions=positions,
        dirs=dirs,
        dirs_problem=dirs_problem,
        frame_source=frame_source,
        frame_stamps_ms=stamps,
        lines_per_frame=float(place.sum()) / max(b_n * d_n, 1),
        n_used=int(rows.size),
    )


def _has(flags: np.ndarray, flag: int) -> np.ndarray:
    return (flags & flag_bit(flag)) != 0


def _imaging_acquisitions(heads: np.ndarray, flags: np.ndarray, path: Path,
                          notes: Notes) -> np.ndarray:
    """Rows that are image data of encoding space 0: not noise, not a skipped class."""
    noise = _has(flags, ACQ_IS_NOISE_MEASUREMENT)
    skipped = np.zeros(heads.shape[0], dtype=bool)
    for flag in SKIPPED_FLAGS:
        skipped |= _has(flags, flag)
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
        kinds = sorted({name for flag, name in SKIPPED_FLAGS.items()
                        if (_has(flags, flag)).any()})
        raise InputDataError("contains no imaging acquisitions"
                             + (f" (only {', '.join(kinds)} data)" if kinds else ""), path=path)
    return use


def _check_cartesian(heads: np.ndarray, flags: np.ndarray, use: np.ndarray, hdr: HeaderFields,
                     path: Path) -> None:
    """Refuse non-Cartesian trajectories and reversed (EPI) readouts."""
    if hdr.trajectory != "cartesian":
        raise InputDataError(f"trajectory is {hdr.trajectory!r}: molrecon reconstructs "
                             "Cartesian data only", path=path)
    if (heads["trajectory_dimensions"][use] > 0).any():
        raise InputDataError("acquisitions carry k-space trajectory coordinates "
                             "(non-Cartesian data): molrecon reconstructs Cartesian data only",
                             path=path)
    if _has(flags, ACQ_IS_REVERSE)[use].any():
        raise InputDataError("has reversed readouts (EPI); they need a phase correction "
                             "that molrecon does not do", path=path)


def _first_contrast_and_set(idx: np.ndarray, use: np.ndarray, notes: Notes) -> np.ndarray:
    """Keep only the first contrast and the first set (with a note where there are more)."""
    for name in ("contrast", "set"):
        values = idx[name][use]
        first = int(values.min())
        if (values != first).any():
            n_values = np.unique(values).size
            notes.add(f"{n_values} {name}s found; only {name} {first} is used")
            use &= idx[name] == first
    return use


def _frame_axis(idx: np.ndarray, use: np.ndarray, is3d: bool,
                notes: Notes) -> tuple[np.ndarray, str | None]:
    """The counter that numbers the frames of a 2D time series (``phase``, else
    ``repetition``), or None; any other counter with several values keeps its first."""
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
    return use, frame_source


def _line_shape(heads: np.ndarray, rows: np.ndarray, path: Path) -> tuple[int, int]:
    """Coils and readout samples of every used line (the same for all of them)."""
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
    return n_coils, n_samples


def _grid(idx: np.ndarray, rows: np.ndarray, hdr: HeaderFields, is3d: bool,
          frame_source: str | None, path: Path, notes: Notes
          ) -> tuple[np.ndarray, int, np.ndarray, int, np.ndarray, int]:
    """Slice, frame or partition, and line index of every used row, with the grid sizes:
    ``(b, B, d, D, y, Y)``."""
    _, enc_y, enc_z = hdr.encoded_matrix
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
    return b, b_n, d, d_n, y, y_n


def _check_size(shape: tuple[int, int, int, int, int], path: Path) -> None:
    """Refuse a k-space beyond ``MAX_KSPACE_ELEMENTS`` or the memory available now."""
    b_n, n_coils, d_n, y_n, x_n = shape
    elements = b_n * n_coils * d_n * y_n * x_n
    if elements > MAX_KSPACE_ELEMENTS:
        raise InputDataError(
            f"k-space of {b_n}×{n_coils}×{d_n}×{y_n}×{x_n} values "
            f"({elements * 8 / 2**30:.0f} GiB) exceeds the limit of {MAX_KSPACE_ELEMENTS} values: "
            "absurd matrix sizes in the header or indices", path=path)
    check_memory(elements * 8, f"k-space of {b_n}×{n_coils}×{d_n}×{y_n}×{x_n} values", path)


def _placement(row_flags: np.ndarray, b: np.ndarray, d: np.ndarray, y: np.ndarray,
               grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Which lines are placed, lines per ``(b, d, y)``, calibration positions, any flag.

    Calibration lines: ACS-only lines are data too, unless an imaging line covers the spot.
    """
    b_n, d_n, y_n = grid
    cal_only = ((row_flags & flag_bit(ACQ_IS_PARALLEL_CALIBRATION)) != 0) & (
        (row_flags & flag_bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)) == 0)
    cal_any = (row_flags & (flag_bit(ACQ_IS_PARALLEL_CALIBRATION)
                            | flag_bit(ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))) != 0
    key = (b * d_n + d) * y_n + y  # (L,) flat (b, d, y) position
    place = np.ones(b.size, dtype=bool)
    if cal_only.any() and (~cal_only).any():
        place &= ~(cal_only & np.isin(key, key[~cal_only]))
    cells = b_n * d_n * y_n
    counts = np.bincount(key[place], minlength=cells).reshape(b_n, d_n, y_n)
    calib = np.zeros(cells, dtype=bool)
    calib[key[cal_any]] = True
    return place, counts, calib.reshape(b_n, d_n, y_n), bool(cal_any.any())


def _frame_stamps(heads: np.ndarray, rows: np.ndarray, d: np.ndarray, d_n: int) -> np.ndarray:
    """Mean acquisition time (ms) of each frame."""
    t = heads["acquisition_time_stamp"][rows].astype(np.float64)
    per_frame = np.bincount(d, weights=t, minlength=d_n) / np.maximum(
        np.bincount(d, minlength=d_n), 1)
    return per_frame * TICK_MS


def _grid_positions(k: np.ndarray, n_enc: int, limits: EncodingLimit | None, name: str,
                    path: Path, notes: Notes) -> tuple[int, np.ndarray]:
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
                     notes: Notes
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
