"""Property-based fuzzing of the ISMRMRD reader: a valid RawScan or an InputDataError, nothing else.

Hypothesis rewrites the XML header (matrix sizes, encoding limits and centres,
fields of view, trajectory, readout oversampling through the two FOVs) and the
acquisition table (idx values, sample counts, channels, centre sample, flags,
discards, geometry vectors, sample values including NaN and ±inf) of a small
valid scan, and flips bytes of the file itself. For every variant the reader
must either return a RawScan that keeps the axis contract of ``io.types``
(shapes, bool masks, finite complex64 data that are zero off the mask, finite
geometry), or raise :class:`~molrecon.errors.InputDataError` naming the file —
quickly, and without a large allocation (the k-space limit is lowered to 2²⁰
values for the run, so any absurd size is refused long before memory matters).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from unittest import mock

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import molrecon.io.ismrmrd as ismrmrd_io
import molrecon.io.ismrmrd.plan as ismrmrd_plan
from _builders import write_raw_table
from molrecon.errors import InputDataError
from molrecon.io.detect import read_raw
from molrecon.io.ismrmrd import read_ismrmrd, write_ismrmrd
from molrecon.io.types import KINDS, Geometry, RawScan

B, C, Y, X, OS = 2, 3, 8, 6, 2
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_LIMIT = 1 << 20  # k-space values allowed while fuzzing (8 MiB of complex64)
SECONDS = 10.0  # a read of this tiny file that takes longer counts as a hang


# --------------------------------------------------------------------------- the valid scan
@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, Path]:
    """(valid file, its acquisition table, a scratch folder) for a 2-slice 3-coil scan."""
    folder = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(7)
    k = (rng.standard_normal((B, C, 1, Y, X * OS))
         + 1j * rng.standard_normal((B, C, 1, Y, X * OS))).astype(np.complex64)
    mask = np.zeros((B, 1, 1, Y, 1), dtype=bool)
    mask[..., ::2, :] = True
    mask[..., 3:6, :] = True
    calib = np.zeros_like(mask)
    calib[..., 3:6, :] = True
    geo = Geometry(fov_mm=(180.0, 160.0, 4.0), matrix=(X, Y, 1),
                   position=np.array([[0.0, 0.0, -2.5], [0.0, 0.0, 2.5]]),
                   read_dir=np.array([1.0, 0, 0]), phase_dir=np.array([0, 1.0, 0]),
                   slice_dir=np.array([0, 0, 1.0]), slice_spacing_mm=5.0)
    noise = rng.standard_normal((C, 64)) + 1j * rng.standard_normal((C, 64))
    path = write_ismrmrd(folder / "valid.h5", k * mask, mask, kind="2d", geometry=geo,
                         calib=calib, noise=noise, oversampling=OS)
    with h5py.File(path, "r") as f:
        table = f["dataset/data"][...]
    return path, table, folder


def check_contract(scan: RawScan) -> None:
    """The axis contract of ``io.types`` and the finiteness the reconstruction relies on."""
    assert isinstance(scan, RawScan)
    assert scan.kspace.dtype == np.complex64 and scan.kspace.ndim == 5
    b, c, d, y, x = scan.kspace.shape
    assert min(b, c, d, y, x) >= 1
    assert scan.kspace.size <= SMALL_LIMIT
    assert scan.mask.dtype == np.bool_ and scan.mask.shape == (b, 1, d, y, 1)
    assert scan.calib.dtype == np.bool_ and scan.calib.shape == (b, 1, d, y, 1)
    assert scan.kind in KINDS and (scan.kind != "2d" or d == 1)
    assert scan.mask.any()
    assert np.isfinite(scan.kspace.view(np.float32)).all()
    assert not np.any(scan.kspace * ~scan.mask)  # unacquired entries are exactly zero
    g = scan.geometry
    assert np.isfinite(g.fov_mm).all() and min(g.fov_mm) > 0
    assert np.isfinite(g.position).all() and g.position.shape == (b, 3)
    for v in (g.read_dir, g.phase_dir, g.slice_dir):
        assert np.isfinite(v).all() and abs(float(np.linalg.norm(v)) - 1.0) < 1e-6
    assert np.isfinite(g.slice_spacing_mm) and g.slice_spacing_mm > 0
    assert g.matrix[0] == x and g.matrix[1] == y
    if scan.noise_cov is not None:
        assert scan.noise_cov.shape == (c, c) and np.isfinite(scan.noise_cov).all()


def read_or_refuse(path: Path, *, fmt: str = "ismrmrd") -> RawScan | None:
    """Read ``path``; None when refused with an InputDataError naming it. Anything else fails."""
    start = time.perf_counter()
    with warnings.catch_warnings(), mock.patch.object(ismrmrd_plan, "MAX_KSPACE_ELEMENTS",
                                                       SMALL_LIMIT):
        warnings.simplefilter("ignore")
        try:
            scan = read_ismrmrd(path) if fmt == "ismrmrd" else read_raw(path)
        except InputDataError as exc:
            assert exc.path == str(path)
            assert "\n" not in exc.message and exc.message
            scan = None
    assert time.perf_counter() - start < SECONDS
    if scan is not None:
        check_contract(scan)
    return scan


def test_the_unmodified_scan_reads(base: tuple[Path, np.ndarray, Path]) -> None:
    scan = read_or_refuse(base[0])
    assert scan is not None and scan.shape == (B, C, 1, Y, X)


# --------------------------------------------------------------------------- header fuzzing
_HEADER = """<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz>
</experimentalConditions>
<encoding>
<encodedSpace><matrixSize><x>{ex}</x><y>{ey}</y><z>{ez}</z></matrixSize>
<fieldOfView_mm><x>{efx}</x><y>{efy}</y><z>{efz}</z></fieldOfView_mm></encodedSpace>
<reconSpace><matrixSize><x>{rx}</x><y>{ry}</y><z>{rz}</z></matrixSize>
<fieldOfView_mm><x>{rfx}</x><y>{rfy}</y><z>{rfz}</z></fieldOfView_mm></reconSpace>
<encodingLimits>{limits}</encodingLimits>
<trajectory>{trajectory}</trajectory>
</encoding>
</ismrmrdHeader>
"""

_ints = st.one_of(st.integers(0, 20), st.integers(0, 70000), st.integers(-3, -1),
                  st.sampled_from(["", "7.5", "1e3", "x"]))
_sizes = st.one_of(st.integers(1, 24), st.integers(1, 24), _ints)
_floats = st.one_of(st.floats(0.5, 500.0), st.floats(0.5, 500.0),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["0", "-1", "1e300", "NaN", "INF", "abc"]))


_LIMITS = st.one_of(
    st.just(""),
    st.tuples(_ints, _ints, _ints).map(
        lambda v: f"<minimum>{v[0]}</minimum><maximum>{v[1]}</maximum><center>{v[2]}</center>"),
    st.tuples(st.integers(0, 3), st.integers(4, 40), st.integers(0, 40)).map(
        lambda v: f"<minimum>{v[0]}</minimum><maximum>{v[1]}</maximum><center>{v[2]}</center>"),
)


@st.composite
def headers(draw: st.DrawFn) -> str:
    """The valid header of the base scan with one to four of its fields rewritten."""
    oversampling = draw(st.sampled_from([1, 2, 3]))
    fields: dict[str, object] = {
        "ex": X * OS, "ey": Y, "ez": 1, "efx": 180.0 * oversampling, "efy": 160.0, "efz": 4.0,
        "rx": X, "ry": Y, "rz": 1, "rfx": 180.0, "rfy": 160.0, "rfz": 4.0,
        "ky": f"<minimum>0</minimum><maximum>{Y - 1}</maximum><center>{Y // 2}</center>",
        "kz": "<minimum>0</minimum><maximum>0</maximum><center>0</center>",
        "trajectory": "cartesian",
    }
    choices = {"ex": _sizes, "ey": _sizes, "ez": _sizes, "rx": _sizes, "ry": _sizes,
               "rz": _sizes, "efx": _floats, "efy": _floats, "efz": _floats, "rfx": _floats,
               "rfy": _floats, "rfz": _floats, "ky": _LIMITS, "kz": _LIMITS,
               "trajectory": st.sampled_from(["radial", "spiral", "epi", "other", "Cartesian",
                                              " cartesian ", ""])}
    for name in draw(st.sets(st.sampled_from(sorted(choices)), min_size=1, max_size=4)):
        fields[name] = draw(choices[name])
    limits = "".join(f"<kspace_encoding_step_{i}>{fields[key]}</kspace_encoding_step_{i}>"
                     for i, key in ((1, "ky"), (2, "kz")) if fields[key])
    return _HEADER.format(limits=limits, **fields)


@FUZZ
@given(xml=headers())
def test_fuzzed_header(base: tuple[Path, np.ndarray, Path], xml: str) -> None:
    path = write_raw_table(base[2] / "header.h5", xml, base[1])
    read_or_refuse(path)


# --------------------------------------------------------------------------- table fuzzing
_U16 = st.one_of(st.integers(0, 16), st.integers(0, 65535))
_HEAD_FIELDS: dict[str, st.SearchStrategy[object]] = {
    "number_of_samples": _U16,
    "active_channels": _U16,
    "available_channels": _U16,
    "center_sample": _U16,
    "discard_pre": _U16,
    "discard_post": _U16,
    "trajectory_dimensions": st.integers(0, 3),
    "encoding_space_ref": st.integers(0, 2),
    "flags": st.one_of(st.sampled_from([1 << (n - 1) for n in (7, 8, 19, 20, 21, 22, 23, 25,
                                                               27, 29)]),
                       st.integers(0, 2**64 - 1)),
    "sample_time_us": st.one_of(st.floats(0.1, 50.0), st.floats(allow_nan=True,
                                                                 allow_infinity=True, width=32)),
    "acquisition_time_stamp": st.integers(0, 2**32 - 1),
}
_IDX_FIELDS = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast",
               "phase", "repetition", "set", "segment")
_VECTOR_FIELDS = ("position", "read_dir", "phase_dir", "slice_dir")
_SAMPLES = st.one_of(st.floats(-10.0, 10.0, width=32),
                     st.floats(allow_nan=True, allow_infinity=True, width=32),
                     st.sampled_from([3.0e38, -3.4e38, 0.0]))


@st.composite
def table_edits(draw: st.DrawFn, n_rows: int) -> list[tuple[str, int, str, object]]:
    """A few edits: (what, row, field, value); ``row`` −1 means every row."""
    row = st.one_of(st.integers(0, n_rows - 1), st.just(-1))
    edit = st.one_of(
        st.tuples(st.just("head"), row, st.sampled_from(sorted(_HEAD_FIELDS)), st.none()),
        st.tuples(st.just("idx"), row, st.sampled_from(_IDX_FIELDS), _U16),
        st.tuples(st.just("vector"), row, st.sampled_from(_VECTOR_FIELDS),
                  st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32),
                           min_size=3, max_size=3)),
        st.tuples(st.just("sample"), row, st.integers(0, 2 * C * X * OS - 1), _SAMPLES),
        st.tuples(st.just("length"), row, st.sampled_from(["shorter", "longer", "empty"]),
                  st.none()),
    )
    edits = draw(st.lists(edit, min_size=1, max_size=5))
    out = []
    for what, r, name, value in edits:
        if what == "head":
            value = draw(_HEAD_FIELDS[name])  # type: ignore[index]
        out.append((what, r, name, value))
    return out


def apply_edits(table: np.ndarray, edits: list[tuple[str, int, str, object]]) -> np.ndarray:
    t = table.copy()
    head = t["head"]
    for what, row, name, value in edits:
        rows = np.arange(t.size) if row < 0 else np.array([row])
        if what == "head":
            head[name][rows] = value
        elif what == "idx":
            head["idx"][name][rows] = value
        elif what == "vector":
            head[name][rows] = np.asarray(value, dtype=np.float32)
        elif what == "sample":
            for r in rows:
                vec = np.array(t["data"][r], dtype=np.float32)
                if vec.size:
                    vec[int(name) % vec.size] = np.float32(value)  # type: ignore[arg-type]
                t["data"][r] = vec
        else:
            for r in rows:
                vec = np.array(t["data"][r], dtype=np.float32)
                t["data"][r] = (vec[:-2] if name == "shorter" else
                                np.r_[vec, vec[:2]] if name == "longer" else vec[:0])
    return t


@FUZZ
@given(data=st.data())
def test_fuzzed_acquisitions(base: tuple[Path, np.ndarray, Path], data: st.DataObject) -> None:
    path, table, folder = base
    with h5py.File(path, "r") as f:
        xml = bytes(f["dataset/xml"][0]).decode()
    edits = data.draw(table_edits(table.size))
    read_or_refuse(write_raw_table(folder / "table.h5", xml, apply_edits(table, edits)))


@FUZZ
@given(data=st.data())
def test_fuzzed_header_and_acquisitions_together(base: tuple[Path, np.ndarray, Path],
                                                 data: st.DataObject) -> None:
    _, table, folder = base
    xml = data.draw(headers())
    edits = data.draw(table_edits(table.size))
    read_or_refuse(write_raw_table(folder / "both.h5", xml, apply_edits(table, edits)))


# --------------------------------------------------------------------------- byte flipping
@FUZZ
@given(data=st.data())
def test_flipped_bytes(base: tuple[Path, np.ndarray, Path], data: st.DataObject) -> None:
    """Damage anywhere in the HDF5 file (superblock, B-trees, heaps, the table, the header)."""
    path, _, folder = base
    raw = bytearray(path.read_bytes())
    n_edits = data.draw(st.integers(1, 4))
    for _ in range(n_edits):
        start = data.draw(st.integers(0, len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        raw[start:start + len(chunk)] = chunk
    damaged = folder / "damaged.h5"
    damaged.write_bytes(bytes(raw[: len(path.read_bytes())]))
    read_or_refuse(damaged, fmt="any")


def test_lowered_limit_refuses_before_allocating(base: tuple[Path, np.ndarray, Path]) -> None:
    """Control for the fuzz runs: a header asking for more than SMALL_LIMIT values is refused."""
    path, table, folder = base
    with h5py.File(path, "r") as f:
        xml = bytes(f["dataset/xml"][0]).decode()
    big = xml.replace(f"<x>{X * OS}</x>", "<x>60000</x>", 1)
    assert big != xml
    with pytest.raises(InputDataError, match="exceeds the limit"), \
            mock.patch.object(ismrmrd_plan, "MAX_KSPACE_ELEMENTS", SMALL_LIMIT):
        read_ismrmrd(write_raw_table(folder / "big.h5", big, table))


# --------------------------------------------------------------------------- calibration region
def _brute_force_calibration(mask: np.ndarray) -> np.ndarray:
    """Largest-area fully sampled rectangle containing (D//2, Y//2), every candidate tried."""
    grid = mask[0, 0, :, :, 0]
    d_n, y_n = grid.shape
    cz, cy = d_n // 2, y_n // 2
    best = (0, 0, 0, 0, 0)  # (area, -z0, -z1) ordering: smallest z0, then z1, wins ties
    found = None
    for z0 in range(cz + 1):
        for z1 in range(cz, d_n):
            rows = grid[z0:z1 + 1]
            if not rows[:, cy].all():
                continue
            lo = cy
            while lo > 0 and rows[:, lo - 1].all():
                lo -= 1
            hi = cy
            while hi < y_n - 1 and rows[:, hi + 1].all():
                hi += 1
            area = (hi - lo + 1) * (z1 - z0 + 1)
            if area > best[0]:
                best, found = (area, z0, z1, lo, hi), (z0, z1, lo, hi)
    out = np.zeros_like(grid)
    if found is not None:
        z0, z1, lo, hi = found
        out[z0:z1 + 1, lo:hi + 1] = True
    return out[None, None, :, :, None]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(data=st.data())
def test_3d_calibration_region_is_the_largest_centred_rectangle(data: st.DataObject) -> None:
    d_n = data.draw(st.integers(1, 9))
    y_n = data.draw(st.integers(1, 9))
    p = data.draw(st.floats(0.3, 1.0))
    seed = data.draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random((1, 1, d_n, y_n, 1)) < p
    got = ismrmrd_io.find_calibration_region(mask, "3d")
    assert got.shape == mask.shape and got.dtype == np.bool_
    assert np.array_equal(got, _brute_force_calibration(mask))
    assert not (got & ~mask).any()


def test_3d_calibration_region_of_a_huge_sparse_grid_is_cheap() -> None:
    """65535 partitions with a few lines: no (D/2)² work arrays (that was 34 GB and minutes)."""
    import tracemalloc

    mask = np.zeros((1, 1, 65535, 6, 1), dtype=bool)
    mask[0, 0, 32760:32775, :, 0] = True
    mask[0, 0, ::97, 2, 0] = True
    tracemalloc.start()
    start = time.perf_counter()
    try:
        got = ismrmrd_io.find_calibration_region(mask, "3d")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 5.0
    assert peak < 32 * 2**20
    expected = np.zeros_like(mask)
    expected[0, 0, 32760:32775, :, 0] = True
    assert np.array_equal(got, expected)


# --------------------------------------------------------------------------- header layouts
def _retyped_table(table: np.ndarray, change: dict[str, object]) -> np.ndarray:
    """The table with its ``head`` member rebuilt: fields retyped (dtype) or dropped (None)."""
    head = table.dtype["head"]
    fields = []
    for name in head.names:
        if name in change and change[name] is None:
            continue
        sub = head[name]
        dtype = np.dtype(change[name]) if name in change else sub
        fields.append((name, dtype.base if dtype.shape else dtype, sub.shape))
    new_head = np.dtype(fields)
    members = [(n, new_head if n == "head" else table.dtype[n]) for n in table.dtype.names]
    out = np.zeros(table.shape, dtype=members)
    for name in table.dtype.names:
        if name != "head":
            out[name] = table[name]
    for name in new_head.names:
        out["head"][name] = table["head"][name]
    return out


def test_headers_with_other_field_widths_are_converted(
        base: tuple[Path, np.ndarray, Path]) -> None:
    path, table, folder = base
    with h5py.File(path, "r") as f:
        xml = bytes(f["dataset/xml"][0]).decode()
    wide = _retyped_table(table, {"active_channels": np.int64, "number_of_samples": np.int32,
                                  "sample_time_us": np.float64})
    assert wide.dtype["head"] != table.dtype["head"]
    scan = read_or_refuse(write_raw_table(folder / "wide.h5", xml, wide))
    reference = read_or_refuse(path)
    assert scan is not None and reference is not None
    assert np.array_equal(scan.kspace, reference.kspace)


def test_header_without_a_field_molrecon_uses_is_refused(
        base: tuple[Path, np.ndarray, Path]) -> None:
    path, table, folder = base
    with h5py.File(path, "r") as f:
        xml = bytes(f["dataset/xml"][0]).decode()
    bad = write_raw_table(folder / "noflags.h5", xml, _retyped_table(table, {"flags": None}))
    with pytest.raises(InputDataError, match="lack the field flags"):
        read_ismrmrd(bad)
