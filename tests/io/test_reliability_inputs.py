"""Every bad input through the real command line: one line on stderr, exit 1, nothing written.

Each broken file is made in ``tmp_path`` from a small simulated scan (the
project's own simulator and ISMRMRD writer), then given to ``molrecon
reconstruct`` (and ``molrecon info``). The contract checked every time:

* exit status 1 (2 for usage errors), no traceback (unless ``--debug``);
* exactly one line on stderr, naming the file and the problem;
* no output file, and no temporary file left in the output folder.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner, Result

from conftest import message_lines
from molrecon.cli import app
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()

NOISE_BIT = np.uint64(1 << 18)  # ACQ_IS_NOISE_MEASUREMENT
REVERSE_BIT = np.uint64(1 << 21)  # ACQ_IS_REVERSE
CAL_BITS = np.uint64((1 << 19) | (1 << 20))  # the two parallel-calibration flags
COILS = 4


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def scan_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 2D scan: 32×32, 4 coils, R = 2 with 12 ACS lines, noise scan, 2× readout OS."""
    path = tmp_path_factory.mktemp("valid") / "scan.h5"
    cfg = SimulationConfig(kind="2d", matrix=(32, 32), coils=COILS, acceleration=2.0, acs=12,
                           seed=3)
    simulate_to_file(cfg, path)
    return path


@pytest.fixture(scope="module")
def parts(scan_file: Path) -> tuple[str, np.ndarray]:
    """The header text and the acquisition table of the valid scan."""
    with h5py.File(scan_file, "r") as f:
        return bytes(f["dataset/xml"][0]).decode(), f["dataset/data"][...]


def write_raw(path: Path, xml: str | bytes | None, table: np.ndarray | None) -> Path:
    """An ISMRMRD-layout HDF5 file with the given header and table (None: left out)."""
    with h5py.File(path, "w") as f:
        grp = f.create_group("dataset")
        if xml is not None:
            ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
            ds[0] = xml.encode() if isinstance(xml, str) else xml
        if table is not None:
            grp.create_dataset("data", data=table, maxshape=(None,))
    return path


def noise_rows(table: np.ndarray) -> np.ndarray:
    return (table["head"]["flags"] & NOISE_BIT) != 0


def set_samples(table: np.ndarray, rows: np.ndarray,
                edit: Callable[[np.ndarray], None]) -> np.ndarray:
    """A copy of ``table`` whose rows' samples (complex (C, Ns)) went through ``edit``."""
    out = table.copy()
    for i in rows:
        samples = np.array(out["data"][i], dtype=np.float32).view(np.complex64).reshape(
            COILS, -1)
        edit(samples)
        out["data"][i] = samples.reshape(-1).view(np.float32)
    return out


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_one_line_error(result: Result, *, names: Path | None, needle: str,
                          code: int = 1) -> str:
    """Exit ``code``, one stderr line containing ``needle`` (and the file), no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = message_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    line = lines[0]
    if names is not None:
        assert str(names) in line, line
    assert re.search(needle, line, flags=re.IGNORECASE), (needle, line)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    return line


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- broken files
Maker = Callable[[Path, Path, str, np.ndarray], Path]


def _empty(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    dst.write_bytes(b"")
    return dst


def _text(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    dst.write_text("patient,slice,value\n1,2,3\n")
    return dst


def _truncated(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    data = scan.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _nifti(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    import nibabel as nib

    target = dst.with_name(dst.name + ".nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 1), np.float32), np.eye(4)), str(target))
    target.rename(dst)                       # the name does not matter, the content does
    return dst


def _dicom(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    dst.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + bytes(64))
    return dst


def _png(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    dst.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    return dst


def _other_hdf5(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    with h5py.File(dst, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 4)))
    return dst


def _no_xml(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    return write_raw(dst, None, table)


def _no_table(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    return write_raw(dst, xml, None)


def _xml(edit: Callable[[str], str]) -> Maker:
    def make(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
        changed = edit(xml)
        assert changed != xml, "the header edit did not apply"
        return write_raw(dst, changed, table)
    return make


def _table(edit: Callable[[np.ndarray], np.ndarray]) -> Maker:
    def make(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
        return write_raw(dst, xml, edit(table.copy()))
    return make


def _drop_encoding(xml: str) -> str:
    return re.sub(r"<encoding>.*</encoding>", "", xml, flags=re.DOTALL)


def _drop_encoded_space(xml: str) -> str:
    return re.sub(r"<encodedSpace>.*?</encodedSpace>", "", xml, count=1, flags=re.DOTALL)


def _first_matrix_value(xml: str, axis: str, value: str) -> str:
    return re.sub(rf"<{axis}>\d+</{axis}>", f"<{axis}>{value}</{axis}>", xml, count=1)


_LAUGHS = ('<?xml version="1.0"?><!DOCTYPE h [<!ENTITY a "aaaaaaaaaa">'
           + "".join(f'<!ENTITY a{i + 1} "' + ("&a;" if i == 0 else f"&a{i};") * 10 + '">'
                     for i in range(9))
           + "]><ismrmrdHeader><studyInformation><studyID>&a9;</studyID>"
           "</studyInformation></ismrmrdHeader>")
_EXTERNAL = ('<?xml version="1.0"?><!DOCTYPE h [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
             "<ismrmrdHeader><studyInformation><studyID>&x;</studyID></studyInformation>"
             "</ismrmrdHeader>")


def _only_noise(t: np.ndarray) -> np.ndarray:
    return t[noise_rows(t)]


def _trajectory_coords(t: np.ndarray) -> np.ndarray:
    img = ~noise_rows(t)
    t["head"]["trajectory_dimensions"][img] = 2
    for i in np.flatnonzero(img):
        t["traj"][i] = np.zeros(2 * int(t["head"]["number_of_samples"][i]), np.float32)
    return t


def _poke_last_line(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def edit(t: np.ndarray) -> np.ndarray:
        def poke(s: np.ndarray) -> None:
            s[1, 5] = value
        return set_samples(t, np.array([t.size - 1]), poke)
    return edit


def _poke_noise(t: np.ndarray) -> np.ndarray:
    def poke(s: np.ndarray) -> None:
        s[0, 0] = np.nan
    return set_samples(t, np.flatnonzero(noise_rows(t))[:1], poke)


def _field(name: str, value: int, *, idx: bool = False, rows: str = "last") -> Callable[
        [np.ndarray], np.ndarray]:
    def edit(t: np.ndarray) -> np.ndarray:
        head = t["head"]
        target = head["idx"][name] if idx else head[name]
        if rows == "last":
            target[-1] = value
        elif rows == "first_noise":
            target[np.flatnonzero(noise_rows(t))[0]] = value
        else:
            target[~noise_rows(t)] = value
        return t
    return edit


def _reversed(t: np.ndarray) -> np.ndarray:
    t["head"]["flags"][~noise_rows(t)] |= REVERSE_BIT
    return t


def _short_data(t: np.ndarray) -> np.ndarray:
    t["data"][-1] = np.asarray(t["data"][-1])[:-8]
    return t


def _huge_table(scan: Path, dst: Path, xml: str, table: np.ndarray) -> Path:
    """A table that declares 10⁹ rows (317 GiB of headers) but stores a few."""
    with h5py.File(dst, "w") as f:
        grp = f.create_group("dataset")
        ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = xml.encode()
        data = grp.create_dataset("data", shape=(10**9,), dtype=table.dtype, chunks=(64,),
                                  maxshape=(None,))
        data[: table.size] = table
    return dst


BROKEN: list[tuple[str, Maker, str]] = [
    ("empty", _empty, "not a readable HDF5"),
    ("text", _text, "not a readable HDF5"),
    ("truncated", _truncated, "not a readable HDF5 file .*truncated"),
    ("png bytes", _png, "is a PNG image, not raw k-space"),
    ("a NIfTI image", _nifti, "is a NIfTI image, not raw k-space"),
    ("a DICOM file", _dicom, "is a DICOM image, not raw k-space"),
    ("hdf5 of another kind", _other_hdf5, "neither ISMRMRD .* nor fastMRI"),
    ("no xml header", _no_xml, r"no XML header \(/dataset/xml is missing\)"),
    ("no acquisition table", _no_table, r"no acquisitions \(/dataset/data is missing\)"),
    ("unparsable xml", _xml(lambda x: x[: len(x) // 2]), "XML header cannot be parsed"),
    ("not ismrmrd xml", _xml(lambda x: "<html><body>scan</body></html>"),
     "XML header cannot be parsed"),
    ("xml entity expansion", _xml(lambda x: _LAUGHS), "XML header cannot be parsed"),
    ("xml external entity", _xml(lambda x: _EXTERNAL), "XML header cannot be parsed"),
    ("schema type violation", _xml(lambda x: _first_matrix_value(x, "x", "sixty-four")),
     "unusable value"),
    ("matrix beyond the schema", _xml(lambda x: _first_matrix_value(x, "y", "70000")),
     "outside the schema's range"),
    ("no encoding section", _xml(_drop_encoding), "no <encoding> section"),
    ("no encoded space", _xml(_drop_encoded_space), "not a complete ISMRMRD header"),
    ("zero matrix", _xml(lambda x: _first_matrix_value(x, "y", "0")), "zero dimension"),
    ("absurd matrix", _xml(lambda x: _first_matrix_value(
        _first_matrix_value(x, "x", "65535"), "y", "65535")), "exceeds the limit"),
    ("radial trajectory", _xml(lambda x: x.replace(">cartesian<", ">radial<")),
     "Cartesian data only"),
    ("zero acquisitions", _table(lambda t: t[:0]), "contains no acquisitions"),
    ("only noise scans", _table(_only_noise), "only noise acquisitions"),
    ("trajectory coordinates", _table(_trajectory_coords), "Cartesian data only"),
    ("NaN sample", _table(_poke_last_line(np.nan)), "NaN or infinite"),
    ("Inf sample", _table(_poke_last_line(np.inf)), "NaN or infinite"),
    ("NaN noise sample", _table(_poke_noise), "noise acquisitions contain NaN"),
    ("float32 overflow", _table(_poke_last_line(3e38)), "overflow single precision"),
    ("ky outside the limits", _table(_field("kspace_encode_step_1", 40, idx=True)),
     "outside the header's encoding limits"),
    ("kz in a 2D scan", _table(_field("kspace_encode_step_2", 3, idx=True)),
     "outside the limits of a 2D scan"),
    ("one line with fewer coils", _table(_field("active_channels", COILS - 1)),
     "inconsistent coil counts"),
    ("noise with other coils", _table(_field("active_channels", COILS + 1, rows="first_noise")),
     "inconsistent coil counts"),
    ("one shorter readout", _table(_field("number_of_samples", 48)),
     "inconsistent readout lengths"),
    ("samples shorter than the header", _table(_short_data), "does not match its header"),
    ("reversed readouts", _table(_reversed), "reversed readouts"),
    ("damaged table size", _huge_table, "damaged table"),
]


@pytest.fixture
def big_allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record (and fail) every numpy allocation over 1 GiB made while the test runs."""
    seen: list[str] = []
    limit = 1 << 30
    originals = {name: getattr(np, name) for name in ("zeros", "empty", "ones")}

    def guard(name: str) -> Callable[..., np.ndarray]:
        original = originals[name]

        def wrapper(shape: object, dtype: object = None, *args: object,
                    **kwargs: object) -> np.ndarray:
            dims = [int(shape)] if isinstance(shape, (int, np.integer)) else [
                int(d) for d in shape]  # type: ignore[union-attr]
            size = int(np.prod(dims, dtype=object)) * np.dtype(dtype or float).itemsize
            if size > limit:
                seen.append(f"np.{name}({dims}, {dtype})")
                raise MemoryError(f"test guard: {size} bytes")
            return original(shape, dtype, *args, **kwargs)  # type: ignore[operator]
        return wrapper

    for name in originals:
        monkeypatch.setattr(np, name, guard(name))
    yield seen


@pytest.mark.parametrize(("name", "make", "needle"), BROKEN, ids=[b[0] for b in BROKEN])
@pytest.mark.parametrize("command", ["reconstruct", "info"])
def test_broken_file_is_one_line_exit_1_and_writes_nothing(
        command: str, name: str, make: Maker, needle: str, scan_file: Path,
        parts: tuple[str, np.ndarray], tmp_path: Path, out_dir: Path,
        big_allocations: list[str]) -> None:
    xml, table = parts
    bad = make(scan_file, tmp_path / "bad.h5", xml, table)
    before = listing(out_dir)
    out = out_dir / "image.nii.gz"
    if command == "reconstruct":
        result = invoke("reconstruct", bad, out, "--method", "sense", "--report",
                        out_dir / "report.json", "--preview", out_dir / "preview.png")
    else:
        result = invoke("info", bad)
    assert_one_line_error(result, names=bad, needle=needle)
    assert listing(out_dir) == before  # no output, no temporary file
    assert big_allocations == []


def test_input_is_a_directory_or_missing(tmp_path: Path, out_dir: Path) -> None:
    folder = tmp_path / "scan.h5"
    folder.mkdir()
    # a folder is a batch of scans: an empty one (or one named like a file) has none
    for bad, needle in ((folder, "holds no raw scan"), (tmp_path / "absent.h5", "no such file")):
        result = invoke("reconstruct", bad, out_dir / "x.nii", "--method", "sense")
        assert_one_line_error(result, names=bad, needle=needle)
        result = invoke("info", bad)
        assert_one_line_error(result, names=bad, needle="directory|does not exist")
    assert listing(out_dir) == set()


# --------------------------------------------------------------------------- tolerated input
def test_header_from_a_newer_schema_is_tolerated_with_one_warning(
        scan_file: Path, parts: tuple[str, np.ndarray], tmp_path: Path, out_dir: Path) -> None:
    """Unknown elements (a newer ISMRMRD schema) are ignored, as ``io.ismrmrd`` documents."""
    xml, table = parts
    newer = xml.replace("</encoding>", "<multiband><factor>2</factor></multiband></encoding>")
    newer = newer.replace("</ismrmrdHeader>", "<futureSection><v>1</v></futureSection>"
                          "</ismrmrdHeader>")
    path = write_raw(tmp_path / "newer.h5", newer, table)
    out = out_dir / "newer.nii"
    result = invoke("reconstruct", path, out, "--method", "sense")
    assert result.exit_code == 0, result.output
    warnings_ = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings_) == 1 and "unknown to the installed ismrmrd schema" in warnings_[0]
    assert str(path) in warnings_[0]
    assert out.stat().st_size > 352  # a NIfTI header and data


def test_zero_recon_matrix_falls_back_to_the_encoded_one_with_a_warning(
        parts: tuple[str, np.ndarray], tmp_path: Path, out_dir: Path) -> None:
    import re as re_

    xml, table = parts
    zero = re_.sub(r"(<reconSpace>\s*<matrixSize>\s*)<x>\d+</x>\s*<y>\d+</y>\s*<z>\d+</z>",
                   r"\1<x>0</x><y>0</y><z>0</z>", xml)
    assert zero != xml
    path = write_raw(tmp_path / "zero.h5", zero, table)
    out = out_dir / "zero.nii"
    result = invoke("reconstruct", path, out, "--method", "zf")
    assert result.exit_code == 0, result.output
    warnings_ = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings_) == 1 and "reconSpace matrix is 0 × 0 × 0" in warnings_[0], warnings_
    assert "encoded matrix" in warnings_[0]
    assert out.stat().st_size > 352


def test_warning_line_names_the_file_once(parts: tuple[str, np.ndarray], tmp_path: Path) -> None:
    xml, table = parts
    newer = xml.replace("</encoding>", "<multiband><factor>2</factor></multiband></encoding>")
    path = write_raw(tmp_path / "newer.h5", newer, table)
    result = invoke("reconstruct", path, tmp_path / "newer.nii", "--method", "sense")
    assert result.exit_code == 0
    line = next(ln for ln in result.stderr.splitlines() if ln.startswith("warning:"))
    assert line.count(str(path)) == 1, line


def test_silent_coil_is_reconstructed(scan_file: Path, parts: tuple[str, np.ndarray],
                                      tmp_path: Path, out_dir: Path) -> None:
    """A coil with no signal (data and noise all zero) is not fatal: no prewhitening, a warning."""
    xml, table = parts

    def silence(s: np.ndarray) -> None:
        s[2] = 0
    path = write_raw(tmp_path / "silent.h5", xml, set_samples(table, np.arange(table.size),
                                                               silence))
    result = invoke("reconstruct", path, out_dir / "silent.nii", "--method", "sense")
    assert result.exit_code == 0, result.output
    assert "not positive definite" in result.stderr and "not prewhitened" in result.stderr


@pytest.fixture
def zero_signal(parts: tuple[str, np.ndarray], tmp_path: Path) -> Path:
    """The scan with every imaging sample zero (noise scans kept)."""
    xml, table = parts

    def zero(s: np.ndarray) -> None:
        s[:] = 0
    return write_raw(tmp_path / "zero.h5", xml,
                     set_samples(table, np.flatnonzero(~noise_rows(table)), zero))


def test_all_zero_signal_is_refused_by_reconstruct(zero_signal: Path, out_dir: Path) -> None:
    path = zero_signal
    assert invoke("info", path).exit_code == 0  # the file itself is readable
    result = invoke("reconstruct", path, out_dir / "zero.nii", "--method", "sense")
    assert_one_line_error(result, names=None, needle="all zero")
    assert listing(out_dir) == set()


def test_all_zero_signal_error_names_the_file(zero_signal: Path, out_dir: Path) -> None:
    path = zero_signal
    result = invoke("reconstruct", path, out_dir / "zero.nii", "--method", "sense")
    assert_one_line_error(result, names=path, needle="all zero")


# --------------------------------------------------------------------------- fastMRI files
def _fastmri_header(rows: int, cols: int) -> bytes:
    from ismrmrd import xsd

    def space(x: int, fx: float) -> object:
        return xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=x, y=cols, z=1),
                                     fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=200.0, z=3.0))

    hdr = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_000_000),
        encoding=[xsd.encodingType(encodedSpace=space(rows, 400.0),
                                   reconSpace=space(rows // 2, 200.0),
                                   encodingLimits=xsd.encodingLimitsType(),
                                   trajectory=xsd.trajectoryType.CARTESIAN)])
    return hdr.toXML("utf-8").encode()


def _fastmri(path: Path, kspace: np.ndarray | None, *, mask: object = None,
             header: bool = True, declared: tuple[int, ...] | None = None) -> Path:
    with h5py.File(path, "w") as f:
        if declared is not None:
            f.create_dataset("kspace", shape=declared, dtype=np.complex64, chunks=True)
        elif kspace is not None:
            f.create_dataset("kspace", data=kspace)
        if header:
            f.create_dataset("ismrmrd_header", data=_fastmri_header(32, 16))
        if mask is not None:
            f.create_dataset("mask", data=mask)
    return path


def _fm_kspace(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((2, 3, 32, 16))
            + 1j * rng.standard_normal((2, 3, 32, 16))).astype(np.complex64)


FASTMRI: list[tuple[str, Callable[[Path, np.random.Generator], Path], str]] = [
    ("rank 2", lambda p, r: _fastmri(p, np.ones((32, 16), np.complex64)), "rank 2"),
    ("rank 5", lambda p, r: _fastmri(p, np.ones((1, 1, 1, 32, 16), np.complex64)), "rank 5"),
    ("real dtype", lambda p, r: _fastmri(p, np.ones((2, 3, 32, 16), np.float32)),
     "not complex"),
    ("mask length", lambda p, r: _fastmri(p, _fm_kspace(r), mask=np.ones(15, np.float32)),
     "15 entries but /kspace has 16"),
    ("mask NaN", lambda p, r: _fastmri(p, _fm_kspace(r), mask=np.full(16, np.nan, np.float32)),
     "NaN"),
    ("mask of strings", lambda p, r: _fastmri(p, _fm_kspace(r), mask=np.array([b"yes"] * 16)),
     "not numbers"),
    ("empty mask", lambda p, r: _fastmri(p, _fm_kspace(r), mask=np.zeros(16, np.float32)),
     "no phase-encoding column"),
    ("no header", lambda p, r: _fastmri(p, _fm_kspace(r), header=False), "no /ismrmrd_header"),
    ("NaN k-space", lambda p, r: _fastmri(p, np.full((1, 2, 32, 16), np.nan, np.complex64)),
     "NaN or infinite"),
    ("declared 5 TiB", lambda p, r: _fastmri(p, None, declared=(100000, 32, 640, 368)),
     "more than the limit"),
]


@pytest.mark.parametrize(("name", "make", "needle"), FASTMRI, ids=[f[0] for f in FASTMRI])
def test_broken_fastmri_file(name: str, make: Callable[[Path, np.random.Generator], Path],
                             needle: str, tmp_path: Path, out_dir: Path,
                             rng: np.random.Generator, big_allocations: list[str]) -> None:
    bad = make(tmp_path / "knee.h5", rng)
    result = invoke("reconstruct", bad, out_dir / "knee.nii", "--method", "sense")
    assert_one_line_error(result, names=bad, needle=needle)
    assert_one_line_error(invoke("info", bad), names=bad, needle=needle)
    assert listing(out_dir) == set()
    assert big_allocations == []


def test_fastmri_mask_that_discards_data_warns(tmp_path: Path, rng: np.random.Generator) -> None:
    mask = np.zeros(16, np.float32)
    mask[4:12] = 1
    path = _fastmri(tmp_path / "knee.h5", _fm_kspace(rng), mask=mask)
    result = invoke("info", path, "--json")
    assert result.exit_code == 0, result.output
    assert "leaves out 8 phase-encoding column(s)" in result.stderr


# --------------------------------------------------------------------------- outputs
def test_existing_output_is_untouched_without_force(scan_file: Path, out_dir: Path) -> None:
    out = out_dir / "image.nii"
    out.write_bytes(b"precious bytes \x00\x01")
    report = out_dir / "report.json"
    result = invoke("reconstruct", scan_file, out, "--method", "sense", "--report", report)
    assert_one_line_error(result, names=out, needle="already exists.*--force")
    assert out.read_bytes() == b"precious bytes \x00\x01"
    assert listing(out_dir) == {"image.nii"}
    # An existing report (not the image) blocks the run before any work, too.
    out.unlink()
    report.write_text("{}")
    result = invoke("reconstruct", scan_file, out, "--method", "sense", "--report", report)
    assert_one_line_error(result, names=report, needle="already exists")
    assert listing(out_dir) == {"report.json"} and report.read_text() == "{}"
    # With --force both are replaced.
    out.write_bytes(b"old")
    result = invoke("reconstruct", scan_file, out, "--method", "sense", "--report", report,
                    "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[344:348] == b"n+1\x00" and report.read_text().startswith("{\n")
    assert listing(out_dir) == {"image.nii", "report.json"}


@pytest.mark.parametrize(("target", "needle"), [
    ("missing/image.nii", "folder .*missing does not exist"),
    ("a_folder.nii", "is a directory"),
    ("image.png", "must end in .nii or .nii.gz"),
])
def test_unwritable_output_is_refused_before_any_work(scan_file: Path, out_dir: Path,
                                                      target: str, needle: str) -> None:
    (out_dir / "a_folder.nii").mkdir()
    before = listing(out_dir)
    out = out_dir / target
    result = invoke("reconstruct", scan_file, out, "--method", "sense")
    assert_one_line_error(result, names=out, needle=needle)
    assert listing(out_dir) == before
    assert list((out_dir / "a_folder.nii").iterdir()) == []


def test_report_in_a_missing_folder_leaves_no_image(scan_file: Path, out_dir: Path) -> None:
    report = out_dir / "missing" / "report.json"
    result = invoke("reconstruct", scan_file, out_dir / "image.nii", "--method", "sense",
                    "--report", report)
    assert_one_line_error(result, names=report, needle="does not exist")
    assert listing(out_dir) == set()


def test_report_on_the_image_path_is_refused_before_any_work(scan_file: Path,
                                                             out_dir: Path) -> None:
    out = out_dir / "image.nii"
    result = invoke("reconstruct", scan_file, out, "--method", "sense", "--report", out)
    assert_one_line_error(result, names=out, needle="same|different")
    assert listing(out_dir) == set()


def test_outputs_never_overwrite_the_input_even_with_force(scan_file: Path,
                                                           tmp_path: Path) -> None:
    victim = Path(shutil.copy(scan_file, tmp_path / "victim.h5"))
    before = victim.read_bytes()
    result = invoke("reconstruct", victim, tmp_path / "image.nii", "--method", "sense",
                    "--report", victim, "--force")
    assert victim.read_bytes() == before
    assert_one_line_error(result, names=victim, needle="input")


def test_failure_while_writing_leaves_no_partial_file(scan_file: Path, out_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The NIfTI writer dies half-way (disk full): no output, no temporary file."""
    import nibabel as nib

    def half_write(img: object, filename: str) -> None:
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", half_write)
    out = out_dir / "image.nii.gz"
    result = invoke("reconstruct", scan_file, out, "--method", "sense")
    assert result.exit_code == 1
    assert len(message_lines(result.stderr)) == 1
    assert "No space left on device" in result.stderr and str(out) in result.stderr
    assert listing(out_dir) == set()


def test_failure_during_reconstruction_leaves_no_file(parts: tuple[str, np.ndarray],
                                                      tmp_path: Path, out_dir: Path) -> None:
    """Too few calibration lines for ESPIRiT: refused after reading, nothing written."""
    xml, table = parts
    ky = table["head"]["idx"]["kspace_encode_step_1"]
    keep = noise_rows(table) | (ky % 2 == 0)
    thin = table[keep].copy()
    thin["head"]["flags"] &= ~CAL_BITS
    path = write_raw(tmp_path / "thin.h5", xml, thin)
    result = invoke("reconstruct", path, out_dir / "image.nii", "--method", "sense",
                    "--report", out_dir / "r.json", "--preview", out_dir / "p.png")
    assert_one_line_error(result, names=None, needle="calibration region .* smaller than the "
                          "6×6 ESPIRiT kernel")
    assert listing(out_dir) == set()


# --------------------------------------------------------------------------- usage errors
@pytest.mark.parametrize("args", [
    ["reconstruct"],
    ["reconstruct", "a.h5"],
    ["reconstruct", "a.h5", "b.nii", "--max-iter", "many"],
    ["reconstruct", "a.h5", "b.nii", "--no-such-option"],
    ["info"],
    ["no-such-command"],
])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("option", [["--method", "magic"], ["--device", "tpu"],
                                    ["--solver", "newton"]])
def test_invalid_choice_is_a_usage_error(option: list[str], scan_file: Path,
                                         out_dir: Path) -> None:
    result = invoke("reconstruct", scan_file, out_dir / "x.nii", *option)
    assert result.exit_code == 2, result.output


# --------------------------------------------------------------------------- the real entry point
def _molrecon(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "molrecon", *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=180, check=False,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "COLUMNS": "80"})


def test_subprocess_bad_file_one_line_and_debug_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "notes.h5"
    bad.write_text("not a scan")
    out = tmp_path / "image.nii"
    proc = _molrecon("reconstruct", bad, out, "--method", "sense")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "not a readable HDF5" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    proc = _molrecon("reconstruct", bad, out, "--method", "sense", "--debug")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "InputDataError" in proc.stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["notes.h5"]


def test_subprocess_usage_error_exit_2(tmp_path: Path) -> None:
    proc = _molrecon("reconstruct", "--max-iter", "x")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_shutil_copy_of_valid_scan_still_reads(scan_file: Path, tmp_path: Path) -> None:
    """Control: the fixture itself is a valid scan (so every failure above is the edit's)."""
    copy = Path(shutil.copy(scan_file, tmp_path / "copy.h5"))
    result = invoke("info", copy, "--json")
    assert result.exit_code == 0, result.output
    assert '"kind": "2d"' in result.stdout and result.stderr == ""


def test_scan_larger_than_free_memory_is_refused_before_reading(
        scan_file: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader compares its k-space (and header table) with MemAvailable before allocating."""
    import molrecon.io.kspace as kspace_io

    monkeypatch.setattr(kspace_io, "available_memory_bytes", lambda device="cpu": 1 << 12)
    result = invoke("reconstruct", scan_file, out_dir / "x.nii", "--method", "sense")
    line = assert_one_line_error(result, names=scan_file, needle="GiB of memory available")
    assert "acquisition headers" in line or "k-space" in line
    assert listing(out_dir) == set()
