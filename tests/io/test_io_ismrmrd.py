"""ISMRMRD reader and writer: round trips, sorting rules, files made by other programs, bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import have, real_file
from molrecon.errors import GeometryWarning, InputDataError
from molrecon.io.ismrmrd import (
    MAX_KSPACE_ELEMENTS,
    find_calibration_region,
    parse_ismrmrd_header,
    partial_fourier_fraction,
    read_ismrmrd,
    remove_readout_oversampling,
    write_ismrmrd,
)
from molrecon.io.types import Geometry, ScanInfo

NOISE_BIT = 1 << 18
CAL_BIT = 1 << 19  # ACQ_IS_PARALLEL_CALIBRATION (ACS only)
CAL_IMG_BIT = 1 << 20  # ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
NAV_BIT = 1 << 22  # ACQ_IS_NAVIGATION_DATA


# --------------------------------------------------------------------------- helpers
def crandn(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def oblique_geometry(x: int, y: int, z: int, *, n_slices: int = 1, spacing: float = 5.0,
                     frame_time_ms: float | None = None) -> Geometry:
    """A 20° rotation about the LPS x axis, slices along +slice_dir."""
    c, s = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
    slice_dir = np.array([0.0, -s, c])
    centre = np.array([4.0, -12.5, 30.0])
    positions = centre + np.arange(n_slices)[:, None] * spacing * slice_dir
    return Geometry(
        fov_mm=(2.0 * x, 1.5 * y, 3.0 if z == 1 else 1.25 * z),
        matrix=(x, y, z),
        position=positions,
        read_dir=np.array([1.0, 0.0, 0.0]),
        phase_dir=np.array([0.0, c, s]),
        slice_dir=slice_dir,
        slice_spacing_mm=spacing if n_slices > 1 else (3.0 if z == 1 else 1.25),
        frame_time_ms=frame_time_ms,
    )


def load_table(path: Path) -> tuple[bytes, np.ndarray]:
    with h5py.File(path, "r") as f:
        return bytes(f["dataset/xml"][0]), f["dataset/data"][...]


def save_table(path: Path, xml: bytes | str, table: np.ndarray) -> None:
    from ismrmrd.hdf5 import acquisition_dtype

    if isinstance(xml, str):
        xml = xml.encode()
    with h5py.File(path, "w") as f:
        grp = f.create_group("dataset")
        ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = xml
        grp.create_dataset("data", data=table.astype(acquisition_dtype), maxshape=(None,))


def vlen(arrays: list[np.ndarray]) -> np.ndarray:
    """A 1-D object array holding one float32 vector per acquisition."""
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = np.asarray(a, dtype=np.float32)
    return out


def expected_kspace(k_enc: np.ndarray, mask: np.ndarray, x: int) -> np.ndarray:
    return remove_readout_oversampling(k_enc.astype(np.complex128), x) * mask


def ifft2c(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture
def small_2d(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray, np.ndarray]:
    """A fully sampled 2D file (C=3, Y=10, X=8, 2× readout oversampling), no noise scan."""
    k = crandn(rng, 1, 3, 1, 10, 16)
    mask = np.ones((1, 1, 1, 10, 1), dtype=bool)
    path = tmp_path / "small.h5"
    write_ismrmrd(path, k, mask, kind="2d", geometry=oblique_geometry(8, 10, 1), oversampling=2)
    return path, k, mask


# --------------------------------------------------------------------------- readout helpers
@pytest.mark.parametrize(("n_in", "n_out"), [(16, 8), (15, 7), (9, 4), (12, 12), (10, 3)])
def test_remove_readout_oversampling_matches_centred_crop(n_in: int, n_out: int,
                                                          rng: np.random.Generator) -> None:
    k = crandn(rng, 2, n_in).astype(np.complex128)
    img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), norm="ortho"), axes=-1)
    lo = n_in // 2 - n_out // 2
    ref = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(img[:, lo:lo + n_out], axes=-1),
                                     norm="ortho"), axes=-1)
    out = remove_readout_oversampling(k, n_out)
    assert out.shape == (2, n_out)
    assert np.abs(out - ref).max() < 1e-12


def test_remove_readout_oversampling_keeps_single_precision(rng: np.random.Generator) -> None:
    assert remove_readout_oversampling(crandn(rng, 3, 32), 16).dtype == np.complex64


# --------------------------------------------------------------------------- calibration region
def test_find_calibration_region_2d_run_through_centre() -> None:
    mask = np.zeros((1, 1, 2, 16, 1), dtype=bool)
    mask[0, 0, :, ::2, 0] = True
    mask[0, 0, 0, 5:11, 0] = True  # with the even lines: 4..10 fully sampled in frame 0
    calib = find_calibration_region(mask, "2d")[0, 0, :, :, 0]
    assert np.flatnonzero(calib[0]).tolist() == list(range(4, 11))
    assert np.flatnonzero(calib[1]).tolist() == [8]  # only the centre line itself
    mask[0, 0, 1, 8, 0] = False
    assert not find_calibration_region(mask, "2d")[0, 0, 1].any()


def test_find_calibration_region_3d_largest_rectangle() -> None:
    mask = np.zeros((1, 1, 9, 12, 1), dtype=bool)
    grid = mask[0, 0, :, :, 0]
    grid[2:7, 4:9] = True  # 5 × 5 block around (4, 6)
    grid[4, 0:12] = True  # a full row through the centre: 1 × 12 = 12 < 25
    calib = find_calibration_region(mask, "3d")[0, 0, :, :, 0]
    zs, ys = np.nonzero(calib)
    assert (zs.min(), zs.max(), ys.min(), ys.max()) == (2, 6, 4, 8)
    assert calib.sum() == 25


def test_partial_fourier_fraction() -> None:
    line = np.zeros(32, dtype=bool)
    line[1::4] = True
    assert partial_fourier_fraction(line) == 1.0  # edges explained by R = 4
    line[:] = False
    line[12:] = True  # 20 of 32 lines, one side missing
    assert partial_fourier_fraction(line) == pytest.approx(20 / 32)


# --------------------------------------------------------------------------- round trips
def test_round_trip_2d(tmp_path: Path, rng: np.random.Generator) -> None:
    x, y = 12, 14
    k = crandn(rng, 1, 4, 1, y, 2 * x)
    mask = np.zeros((1, 1, 1, y, 1), dtype=bool)
    mask[..., ::2, :] = True
    mask[..., 5:9, :] = True
    calib = np.zeros_like(mask)
    calib[..., 5:9, :] = True
    geo = oblique_geometry(x, y, 1)
    info = ScanInfo(format="ismrmrd", vendor="ACME", model="M1", field_strength_t=3.0,
                    protocol="t1", tr_ms=8.5, te_ms=3.25)
    path = write_ismrmrd(tmp_path / "rt.h5", k, mask, kind="2d", geometry=geo, calib=calib,
                         oversampling=2, info=info)
    scan = read_ismrmrd(path)
    assert scan.kind == "2d"
    assert scan.shape == (1, 4, 1, y, x)
    assert scan.kspace.dtype == np.complex64
    assert np.array_equal(scan.mask, mask)
    assert np.array_equal(scan.calib, calib)
    assert np.abs(scan.kspace - expected_kspace(k, mask, x)).max() < 1e-5
    g = scan.geometry
    assert g.matrix == (x, y, 1)
    assert np.allclose(g.fov_mm, geo.fov_mm)
    assert np.allclose(g.position, geo.position, atol=1e-4)
    for name in ("read_dir", "phase_dir", "slice_dir"):
        assert np.allclose(getattr(g, name), getattr(geo, name), atol=1e-6)
    assert g.orientation_known
    assert g.slice_spacing_mm == pytest.approx(3.0)
    i = scan.info
    assert (i.vendor, i.model, i.protocol) == ("ACME", "M1", "t1")
    assert (i.field_strength_t, i.tr_ms, i.te_ms) == (3.0, 8.5, 3.25)
    assert i.encoded_matrix == (2 * x, y, 1)
    assert i.readout_oversampling == 2.0
    assert i.n_acquisitions == int(mask.sum())
    assert scan.noise_cov is None and not scan.whitened


def test_round_trip_multislice_sorted_along_slice_dir(tmp_path: Path,
                                                      rng: np.random.Generator) -> None:
    x, y = 8, 10
    geo = oblique_geometry(x, y, 1, n_slices=3, spacing=6.0)
    shuffled = [2, 0, 1]  # slice index order differs from the spatial order
    geo_written = dataclasses.replace(geo, position=geo.position[shuffled])
    k = crandn(rng, 3, 2, 1, y, x)
    mask = np.ones((3, 1, 1, y, 1), dtype=bool)
    mask[1, ..., 0:3, :] = False  # a different mask per slice
    path = write_ismrmrd(tmp_path / "ms.h5", k, mask, kind="2d", geometry=geo_written)
    scan = read_ismrmrd(path)
    order = np.argsort(shuffled)  # written slice s went to spatial rank shuffled[s]
    assert scan.shape == (3, 2, 1, y, x)
    assert np.allclose(scan.geometry.position, geo.position, atol=1e-4)
    assert np.abs(scan.kspace - (k * mask)[order]).max() < 1e-6
    assert np.array_equal(scan.mask, mask[order])
    assert scan.geometry.slice_spacing_mm == pytest.approx(6.0, abs=1e-4)


def test_round_trip_3d_with_noise(tmp_path: Path, rng: np.random.Generator) -> None:
    x, y, z, c = 6, 10, 8, 4
    k = crandn(rng, 1, c, z, y, 2 * x)
    mask = rng.random((1, 1, z, y, 1)) < 0.4
    mask[0, 0, 2:6, 3:8, 0] = True
    calib = np.zeros_like(mask)
    calib[0, 0, 2:6, 3:8, 0] = True
    mixing = np.array([[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0, 0.3j, 0.8, 0], [0.1, 0, 0, 1.2]])
    noise = mixing @ crandn(rng, c, 3000)
    geo = oblique_geometry(x, y, z)
    path = write_ismrmrd(tmp_path / "3d.h5", k, mask, kind="3d", geometry=geo, calib=calib,
                         noise=noise, oversampling=2)
    raw = read_ismrmrd(path, prewhiten=False)
    assert raw.kind == "3d" and raw.shape == (1, c, z, y, x)
    assert np.array_equal(raw.mask, mask)
    assert np.array_equal(raw.calib, calib)
    assert np.abs(raw.kspace - expected_kspace(k, mask, x)).max() < 1e-5
    noise64 = noise.astype(np.complex64).astype(np.complex128)
    assert np.allclose(raw.noise_cov, noise64 @ noise64.conj().T / noise.shape[1], atol=1e-6)
    assert raw.info.n_noise_acquisitions == int(np.ceil(3000 / (2 * x)))
    assert raw.geometry.matrix == (x, y, z)
    assert raw.geometry.slice_spacing_mm == pytest.approx(geo.fov_mm[2] / z)

    white = read_ismrmrd(path)
    assert white.whitened
    w = np.linalg.inv(np.linalg.cholesky(white.noise_cov))
    assert np.allclose(w @ white.noise_cov @ w.conj().T, np.eye(c), atol=1e-10)
    ref = np.einsum("ij,bjdyx->bidyx", w, raw.kspace.astype(np.complex128))
    assert np.abs(white.kspace - ref).max() < 1e-4 * np.abs(ref).max()


def test_round_trip_2dt(tmp_path: Path, rng: np.random.Generator) -> None:
    x, y, t = 8, 12, 5
    k = crandn(rng, 1, 2, t, y, x)
    mask = np.zeros((1, 1, t, y, 1), dtype=bool)
    for f in range(t):
        mask[0, 0, f, f % 3::3, 0] = True  # time-interleaved
    mask[0, 0, :, 5:8, 0] = True
    geo = oblique_geometry(x, y, 1, frame_time_ms=40.0)
    path = write_ismrmrd(tmp_path / "t.h5", k, mask, kind="2dt", geometry=geo)
    scan = read_ismrmrd(path)
    assert scan.kind == "2dt" and scan.shape == (1, 2, t, y, x)
    assert np.array_equal(scan.mask, mask)
    assert np.abs(scan.kspace - k * mask).max() < 1e-6
    assert scan.geometry.frame_time_ms == pytest.approx(40.0)
    calib = scan.calib[0, 0, :, :, 0]  # no flags: largest centred run per frame
    for f in range(t):
        run = np.flatnonzero(calib[f])
        assert run.min() <= 5 and run.max() >= 7
        assert mask[0, 0, f, run, 0].all()


def test_repetitions_become_frames(tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]
                                   ) -> None:
    path = small_2d[0]
    xml, table = load_table(path)
    second = table.copy()
    second["head"]["idx"]["repetition"] = 1
    second["head"]["acquisition_time_stamp"] = 400  # 1 s later
    save_table(tmp_path / "rep.h5", xml, np.concatenate([table, second]))
    scan = read_ismrmrd(tmp_path / "rep.h5")
    assert scan.kind == "2dt" and scan.shape == (1, 3, 2, 10, 8)
    assert np.allclose(scan.kspace[:, :, 0], scan.kspace[:, :, 1])
    assert scan.geometry.frame_time_ms == pytest.approx(1000.0)


# --------------------------------------------------------------------------- placement rules
def test_asymmetric_echo_is_zero_filled_into_place(tmp_path: Path,
                                                   small_2d: tuple[Path, np.ndarray, np.ndarray]
                                                   ) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    n_enc, cut = 16, 5  # drop the first 5 of 16 samples; the echo centre (8) becomes sample 3
    for row in table:
        if row["head"]["flags"] & NOISE_BIT:
            continue
        data = row["data"].view(np.complex64).reshape(3, n_enc)[:, cut:]
        row["data"] = np.ascontiguousarray(data).reshape(-1).view(np.float32)
        row["head"]["number_of_samples"] = n_enc - cut
        row["head"]["center_sample"] = n_enc // 2 - cut
    save_table(tmp_path / "asym.h5", xml, table)
    scan = read_ismrmrd(tmp_path / "asym.h5")
    k_asym = k.copy()
    k_asym[..., :cut] = 0
    assert np.abs(scan.kspace - expected_kspace(k_asym, mask, 8)).max() < 1e-5


def test_discard_pre_post_are_dropped(tmp_path: Path,
                                      small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    for row in table:
        data = row["data"].view(np.complex64).reshape(3, 16)
        padded = np.concatenate([np.full((3, 2), 99.0), data, np.full((3, 1), -99.0)], axis=1)
        row["data"] = padded.astype(np.complex64).reshape(-1).view(np.float32)
        row["head"]["number_of_samples"] = 19
        row["head"]["discard_pre"] = 2
        row["head"]["discard_post"] = 1
        row["head"]["center_sample"] = 8 + 2
    save_table(tmp_path / "disc.h5", xml, table)
    scan = read_ismrmrd(tmp_path / "disc.h5")
    assert np.abs(scan.kspace - expected_kspace(k, mask, 8)).max() < 1e-5


def test_partial_fourier_lines_placed_by_header_centre(tmp_path: Path,
                                                       rng: np.random.Generator) -> None:
    x, y = 8, 16
    k = crandn(rng, 1, 2, 1, y, x)
    mask = np.zeros((1, 1, 1, y, 1), dtype=bool)
    mask[..., 6:, :] = True  # 10 of 16 lines: the k-space centre (8) and everything above
    path = write_ismrmrd(tmp_path / "pf.h5", k, mask, kind="2d",
                         geometry=oblique_geometry(x, y, 1))
    xml, table = load_table(path)
    # Renumber the way some converters do: first acquired line = 0, centre = 2,
    # encoded matrix = the 10 acquired lines.
    table["head"]["idx"]["kspace_encode_step_1"] -= 6
    text = xml.decode()
    text = text.replace("<y>16</y>", "<y>10</y>", 1)
    text = text.replace("<minimum>6</minimum>\n    <maximum>15</maximum>\n    <center>8</center>",
                        "<minimum>0</minimum>\n    <maximum>9</maximum>\n    <center>2</center>")
    assert "<center>2</center>" in text
    save_table(tmp_path / "pf2.h5", text, table)
    with pytest.warns(UserWarning, match="enlarged to 15"):
        scan = read_ismrmrd(tmp_path / "pf2.h5")
    # The grid grows to 15 (the smallest with 2 lines below and 7 above index 15 // 2 = 7):
    # line k goes to 7 + (k - 2), i.e. original line 8 (the centre) lands on index 7.
    assert scan.shape == (1, 2, 1, 15, x)
    assert np.flatnonzero(scan.mask[0, 0, 0, :, 0]).tolist() == list(range(5, 15))
    assert np.abs(scan.kspace[..., 5:15, :] - k[..., 6:16, :]).max() < 1e-6
    assert scan.info.partial_fourier[0] == pytest.approx(10 / 15)
    assert scan.geometry.fov_mm[1] == pytest.approx(1.5 * 16)  # the encoded FOV is kept


def test_averages_are_averaged(tmp_path: Path,
                               small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    second = table.copy()
    second["head"]["idx"]["average"] = 1
    second["data"] = vlen([np.asarray(d) + 2.0 for d in table["data"]])
    save_table(tmp_path / "avg.h5", xml, np.concatenate([table, second]))
    scan = read_ismrmrd(tmp_path / "avg.h5")
    shifted = k + (1.0 + 1.0j)  # +2 on real and imaginary parts, averaged: +1 each
    assert scan.info.averages == 2
    assert np.abs(scan.kspace - expected_kspace(shifted, mask, 8)).max() < 1e-5


def test_second_contrast_is_dropped_with_a_warning(
        tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    second = table.copy()
    second["head"]["idx"]["contrast"] = 1
    second["data"] = vlen([np.asarray(d) * 0 + 7 for d in table["data"]])
    save_table(tmp_path / "con.h5", xml, np.concatenate([table, second]))
    with pytest.warns(UserWarning, match="only contrast 0"):
        scan = read_ismrmrd(tmp_path / "con.h5")
    assert np.abs(scan.kspace - expected_kspace(k, mask, 8)).max() < 1e-5
    assert any("contrast" in w for w in scan.info.warnings)


def test_acs_only_lines_are_data_unless_an_imaging_line_covers_them(
        tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, _ = small_2d
    xml, table = load_table(path)
    ky = table["head"]["idx"]["kspace_encode_step_1"]
    keep = (ky % 2 == 0) | ((ky >= 4) & (ky <= 6))
    imaging = table[keep]
    imaging["head"]["flags"][(ky[keep] >= 4) & (ky[keep] <= 6)] |= CAL_IMG_BIT
    acs = table[(ky >= 3) & (ky <= 7)].copy()  # ACS-only copies of lines 3..7, garbage data
    acs["head"]["flags"] = CAL_BIT
    acs["data"] = vlen([np.asarray(d) * 0 + 5 for d in acs["data"]])
    acs_kept = acs[np.isin(acs["head"]["idx"]["kspace_encode_step_1"], [3, 7])]
    acs_kept["data"] = table[np.isin(ky, [3, 7])]["data"]
    acs_dupes = acs[~np.isin(acs["head"]["idx"]["kspace_encode_step_1"], [3, 7])]
    save_table(tmp_path / "acs.h5", xml, np.concatenate([imaging, acs_kept, acs_dupes]))
    scan = read_ismrmrd(tmp_path / "acs.h5")
    lines = np.flatnonzero(scan.mask[0, 0, 0, :, 0]).tolist()
    assert lines == [0, 2, 3, 4, 5, 6, 7, 8]
    assert np.flatnonzero(scan.calib[0, 0, 0, :, 0]).tolist() == [3, 4, 5, 6, 7]
    # ACS-only lines 4..6 duplicate imaging lines: the imaging data (not the 5s) are used.
    assert np.abs(scan.kspace - expected_kspace(k, scan.mask, 8)).max() < 1e-5


def test_navigators_are_skipped(tmp_path: Path,
                                small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    nav = table[:3].copy()
    nav["head"]["flags"] = NAV_BIT
    nav["head"]["idx"]["kspace_encode_step_1"] = 9
    nav["data"] = vlen([np.asarray(d) * 0 + 1e3 for d in nav["data"]])
    save_table(tmp_path / "nav.h5", xml, np.concatenate([nav, table]))
    scan = read_ismrmrd(tmp_path / "nav.h5")
    assert np.abs(scan.kspace - expected_kspace(k, mask, 8)).max() < 1e-5


# --------------------------------------------------------------------------- header parsing
def test_header_from_a_newer_schema_is_read_with_a_warning(
        tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    path, k, mask = small_2d
    xml, table = load_table(path)
    text = xml.decode().replace("<trajectory>cartesian</trajectory>",
                                "<trajectory>cartesian</trajectory>"
                                "<futureThing><value>3</value></futureThing>")
    with pytest.raises(Exception, match="Unknown property"):
        from ismrmrd import xsd

        xsd.CreateFromDocument(text)
    hdr = parse_ismrmrd_header(text)
    assert hdr.unknown_elements_ignored and hdr.encoded_matrix == (16, 10, 1)
    save_table(tmp_path / "new.h5", text, table)
    with pytest.warns(UserWarning, match="unknown to the installed ismrmrd schema"):
        scan = read_ismrmrd(tmp_path / "new.h5")
    assert np.abs(scan.kspace - expected_kspace(k, mask, 8)).max() < 1e-5


def test_header_fields_of_the_real_siemens_file(real_data: Path) -> None:
    with h5py.File(real_file(real_data, "siemens_gre_2coil_full.h5"), "r") as f:
        hdr = parse_ismrmrd_header(f["dataset/xml"][0])
    assert not hdr.unknown_elements_ignored
    assert hdr.encoded_matrix == (320, 160, 1) and hdr.recon_matrix == (160, 160, 1)
    assert hdr.ky_limits is not None and hdr.ky_limits.center == 80
    assert hdr.trajectory == "cartesian"


# --------------------------------------------------------------------------- real scanner data
def test_real_siemens_gre(real_data: Path) -> None:
    scan = read_ismrmrd(real_file(real_data, "siemens_gre_2coil_full.h5"))
    assert scan.shape == (1, 2, 1, 160, 160)
    assert scan.kind == "2d" and scan.mask.all()
    assert scan.info.vendor == "SIEMENS" and scan.info.model == "Skyra"
    assert scan.info.field_strength_t == pytest.approx(2.89362)
    assert (scan.info.tr_ms, scan.info.te_ms) == (10.0, 3.0)
    assert scan.info.readout_oversampling == 2.0
    g = scan.geometry
    assert g.orientation_known
    for v in (g.read_dir, g.phase_dir, g.slice_dir):
        assert abs(np.linalg.norm(v) - 1.0) < 1e-5
    assert abs(float(g.read_dir @ g.phase_dir)) < 1e-5
    assert np.allclose(g.position[0], [-2.5897, 53.92243, -53.999474], atol=1e-3)
    assert g.voxel_mm == pytest.approx((1.25, 1.25, 4.0))
    # A round phantom filling the FOV: no readout aliasing after the crop, dark corners.
    img = np.sqrt((np.abs(ifft2c(scan.kspace[0, :, 0])) ** 2).sum(0))
    bright = np.percentile(img, 90)
    assert img[:15, :15].mean() < 0.25 * bright and img[:15, -15:].mean() < 0.25 * bright


def test_real_invivo_3d_poisson(real_data: Path) -> None:
    with pytest.warns(GeometryWarning, match="zero direction vectors"):
        scan = read_ismrmrd(real_file(real_data, "invivo_brain_8coil_poisson_r8.h5"))
    assert scan.kind == "3d" and scan.shape == (1, 8, 230, 180, 1)
    assert 7.0 < scan.acceleration < 9.0
    assert not scan.geometry.orientation_known
    calib = scan.calib[0, 0, :, :, 0]
    zs, ys = np.nonzero(calib)
    assert calib.sum() == (np.ptp(zs) + 1) * (np.ptp(ys) + 1)  # one rectangle
    assert 18 <= np.ptp(zs) + 1 <= 24 and 18 <= np.ptp(ys) + 1 <= 24
    assert calib[115, 90]


# --------------------------------------------------------------------------- Debian ismrmrd-tools
def shepp_logan(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", *args, "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return out


needs_ismrmrd_tools = pytest.mark.skipif(not have("ismrmrd_generate_cartesian_shepp_logan"),
                                         reason="Debian ismrmrd-tools not installed")


@pytest.mark.external
@needs_ismrmrd_tools
def test_shepp_logan_fully_sampled_matches_phantom(tmp_path: Path) -> None:
    path = shepp_logan(tmp_path, "sl.h5", "-m", "64", "-c", "4", "-C")
    with pytest.warns(GeometryWarning):
        scan = read_ismrmrd(path)
    assert scan.kind == "2d" and scan.shape == (1, 4, 1, 64, 64)
    assert scan.info.readout_oversampling == 2.0 and scan.info.encoded_matrix == (128, 64, 1)
    assert scan.geometry.fov_mm == (300.0, 300.0, 6.0)
    assert scan.mask.all()
    # Noise level 0.05 per real/imaginary part: Ψ_ii ≈ 2·0.05² = 0.005 (128 samples).
    assert scan.noise_cov is not None and scan.whitened
    diag = np.real(np.diag(scan.noise_cov))
    assert np.all((diag > 0.0035) & (diag < 0.0065))
    rss = np.sqrt((np.abs(ifft2c(scan.kspace[0, :, 0])) ** 2).sum(0))
    assert scan.ground_truth is not None and scan.ground_truth.shape == (1, 1, 64, 64)
    assert ncc(rss, np.abs(scan.ground_truth[0, 0])) > 0.95


@pytest.mark.external
@needs_ismrmrd_tools
def test_shepp_logan_accelerated_repetitions(tmp_path: Path) -> None:
    path = shepp_logan(tmp_path, "sl_r2.h5", "-m", "64", "-c", "4", "-a", "2", "-w", "16",
                       "-C", "-r", "2")
    with pytest.warns(GeometryWarning):
        scan = read_ismrmrd(path, prewhiten=False)
    assert scan.kind == "2dt" and scan.shape == (1, 4, 4, 64, 64)  # 2 × R = 4 frames
    mask = scan.mask[0, 0, :, :, 0]
    acs = np.zeros(64, dtype=bool)
    acs[24:40] = True
    for f in range(4):  # each frame: every 2nd line (alternating offset) + 16 ACS lines
        expected = acs.copy()
        expected[f % 2::2] = True
        assert np.array_equal(mask[f], expected)
        assert np.array_equal(scan.calib[0, 0, f, :, 0], acs)
    assert scan.acceleration == pytest.approx(64 / 40)
    assert scan.noise_cov is not None and scan.noise_cov.shape == (4, 4)
    # Frames 0 and 1 together cover k-space: their union reconstructs the phantom.
    full = scan.kspace[0, :, 0] + scan.kspace[0, :, 1] * (~scan.mask[0, 0, 0])[None]
    rss = np.sqrt((np.abs(ifft2c(full)) ** 2).sum(0))
    assert ncc(rss, np.abs(scan.ground_truth[0, 0])) > 0.95


@pytest.mark.external
@pytest.mark.skipif(not have("ismrmrd_recon_cartesian_2d"), reason="ismrmrd-tools not installed")
def test_written_file_is_read_by_the_cpp_reference_recon(tmp_path: Path,
                                                         rng: np.random.Generator) -> None:
    x, y, c = 32, 24, 3
    yy, xx = np.mgrid[:y, :2 * x]
    obj = ((yy - 10) ** 2 / 36 + (xx - 30) ** 2 / 100 < 1).astype(float)  # off-centre ellipse
    coils = np.exp(-((xx[None] - 20.0 * np.arange(c)[:, None, None]) ** 2) / 800.0)
    img = coils * obj  # (C, Y, 2X)
    k_enc = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img, axes=(-2, -1)), norm="ortho"),
                            axes=(-2, -1))[None, :, None].astype(np.complex64)
    mask = np.ones((1, 1, 1, y, 1), dtype=bool)
    path = write_ismrmrd(tmp_path / "cpp.h5", k_enc, mask, kind="2d",
                         geometry=oblique_geometry(x, y, 1), oversampling=2)
    result = subprocess.run(["ismrmrd_recon_cartesian_2d", str(path)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    with h5py.File(path, "r") as f:
        cpp = np.squeeze(f["dataset/cpp/data"][...]).astype(np.float64)
    ours = np.sqrt((np.abs(ifft2c(read_ismrmrd(path).kspace[0, :, 0])) ** 2).sum(0))
    assert cpp.shape == ours.shape == (y, x)
    assert ncc(cpp, ours) > 0.999


# --------------------------------------------------------------------------- bad input
def patched(tmp_path: Path, source: Path, *, xml: str | None = None,
            edit: object = None) -> Path:
    text, table = load_table(source)
    if edit is not None:
        table = edit(table)  # type: ignore[operator]
    out = tmp_path / "bad.h5"
    save_table(out, xml if xml is not None else text, table)
    return out


def assert_input_error(path: Path, match: str) -> None:
    with pytest.raises(InputDataError, match=match) as info:
        read_ismrmrd(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_not_hdf5(tmp_path: Path) -> None:
    p = tmp_path / "text.h5"
    p.write_text("not an HDF5 file\n")
    assert_input_error(p, "not a readable HDF5")


def test_missing_and_directory(tmp_path: Path) -> None:
    assert_input_error(tmp_path / "nope.h5", "does not exist")
    assert_input_error(tmp_path, "directory")


def test_no_dataset_group_and_no_xml(tmp_path: Path) -> None:
    p = tmp_path / "empty.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    assert_input_error(p, "no /dataset")
    with h5py.File(p, "a") as f:
        f.create_group("dataset").create_dataset("data", data=np.zeros(3))
    assert_input_error(p, "no XML header")


@pytest.mark.parametrize(("xml", "match"), [
    ("<ismrmrdHeader><encoding>", "cannot be parsed"),
    ("this is not xml at all", "cannot be parsed"),
    ('<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><version>1</version></ismrmrdHeader>',
     "not a complete ISMRMRD header"),
])
def test_unparsable_header(tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray],
                           xml: str, match: str) -> None:
    assert_input_error(patched(tmp_path, small_2d[0], xml=xml), match)


def test_no_imaging_and_only_noise(tmp_path: Path, rng: np.random.Generator) -> None:
    k = crandn(rng, 1, 2, 1, 4, 8)
    src = write_ismrmrd(tmp_path / "n.h5", k, np.ones((1, 1, 1, 4, 1), bool), kind="2d",
                        geometry=oblique_geometry(8, 4, 1), noise=crandn(rng, 2, 64))

    def noise_only(t: np.ndarray) -> np.ndarray:
        return t[(t["head"]["flags"] & NOISE_BIT) != 0]

    def navigators(t: np.ndarray) -> np.ndarray:
        t["head"]["flags"] = NAV_BIT
        return t

    assert_input_error(patched(tmp_path, src, edit=noise_only), "only noise")
    assert_input_error(patched(tmp_path, src, edit=navigators), "no imaging acquisitions")
    assert_input_error(patched(tmp_path, src, edit=lambda t: t[:0]), "no acquisitions")


def test_non_cartesian(tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    src = small_2d[0]
    xml = load_table(src)[0].decode().replace(">cartesian<", ">radial<")
    assert_input_error(patched(tmp_path, src, xml=xml), "trajectory is 'radial'")

    def with_traj(t: np.ndarray) -> np.ndarray:
        t["head"]["trajectory_dimensions"] = 2
        t["traj"] = vlen([np.zeros(32) for _ in range(len(t))])
        return t

    assert_input_error(patched(tmp_path, src, edit=with_traj), "trajectory coordinates")


def test_nan_samples(tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    def poison(t: np.ndarray) -> np.ndarray:
        d = np.asarray(t["data"][4]).copy()
        d[7] = np.nan
        t["data"][4] = d
        return t

    assert_input_error(patched(tmp_path, small_2d[0], edit=poison), "NaN")


def test_inconsistent_coils_and_readouts(tmp_path: Path,
                                         small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    def fewer_coils(t: np.ndarray) -> np.ndarray:
        t["head"]["active_channels"][3] = 2
        t["data"][3] = np.asarray(t["data"][3])[: 2 * 2 * 16]
        return t

    def shorter(t: np.ndarray) -> np.ndarray:
        t["head"]["number_of_samples"][2] = 12
        t["data"][2] = np.asarray(t["data"][2])[: 2 * 3 * 12]
        return t

    def wrong_length(t: np.ndarray) -> np.ndarray:
        t["data"][5] = np.asarray(t["data"][5])[:-2]
        return t

    assert_input_error(patched(tmp_path, small_2d[0], edit=fewer_coils), "coil counts")
    assert_input_error(patched(tmp_path, small_2d[0], edit=shorter), "readout lengths")
    assert_input_error(patched(tmp_path, small_2d[0], edit=wrong_length), "does not match")


def test_indices_outside_the_limits(tmp_path: Path,
                                    small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    def beyond(t: np.ndarray) -> np.ndarray:
        t["head"]["idx"]["kspace_encode_step_1"][0] = 40
        return t

    def kz_in_2d(t: np.ndarray) -> np.ndarray:
        t["head"]["idx"]["kspace_encode_step_2"][0] = 3
        return t

    assert_input_error(patched(tmp_path, small_2d[0], edit=beyond), "outside the header")
    assert_input_error(patched(tmp_path, small_2d[0], edit=kz_in_2d), "outside the limits")


def test_absurd_and_zero_matrix_sizes(tmp_path: Path,
                                      small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    src = small_2d[0]
    text = load_table(src)[0].decode()
    huge = (text.replace("<x>16</x>", "<x>65535</x>", 1).replace("<y>10</y>", "<y>65535</y>", 1)
            .replace("<z>1</z>", "<z>65535</z>", 1))
    assert 65535**3 * 3 > MAX_KSPACE_ELEMENTS
    assert_input_error(patched(tmp_path, src, xml=huge), "exceeds the limit")
    zero = text.replace("<y>10</y>", "<y>0</y>", 1)
    assert_input_error(patched(tmp_path, src, xml=zero), "zero dimension")


def test_reversed_readouts_are_rejected(tmp_path: Path,
                                        small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    def reverse(t: np.ndarray) -> np.ndarray:
        t["head"]["flags"][1::2] |= 1 << 21
        return t

    assert_input_error(patched(tmp_path, small_2d[0], edit=reverse), "reversed readouts")


def test_zero_direction_vectors_give_identity_and_a_warning(
        tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    def zero_dirs(t: np.ndarray) -> np.ndarray:
        for name in ("read_dir", "phase_dir", "slice_dir"):
            t["head"][name] = 0
        return t

    with pytest.warns(GeometryWarning, match="zero direction vectors"):
        scan = read_ismrmrd(patched(tmp_path, small_2d[0], edit=zero_dirs))
    assert not scan.geometry.orientation_known
    assert np.array_equal(np.stack([scan.geometry.read_dir, scan.geometry.phase_dir,
                                    scan.geometry.slice_dir]), np.eye(3))


# --------------------------------------------------------------------------- writer contract
def test_writer_refuses_to_overwrite_and_checks_shapes(
        tmp_path: Path, small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    from molrecon.errors import OutputError

    path, k, mask = small_2d
    geo = oblique_geometry(8, 10, 1)
    with pytest.raises(OutputError, match="already exists"):
        write_ismrmrd(path, k, mask, kind="2d", geometry=geo, oversampling=2)
    write_ismrmrd(path, k * 2, mask, kind="2d", geometry=geo, oversampling=2, force=True)
    assert np.abs(read_ismrmrd(path).kspace - expected_kspace(2 * k, mask, 8)).max() < 1e-4
    with pytest.raises(ValueError, match="oversampling"):
        write_ismrmrd(tmp_path / "x.h5", k, mask, kind="2d", geometry=geo, oversampling=1)
    with pytest.raises(ValueError, match="mask"):
        write_ismrmrd(tmp_path / "x.h5", k, mask[..., :5, :], kind="2d", geometry=geo,
                      oversampling=2)
    assert not (tmp_path / "x.h5").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.h5"]


def test_writer_sets_flags_and_limits(tmp_path: Path, rng: np.random.Generator) -> None:
    k = crandn(rng, 2, 2, 1, 8, 6)
    mask = np.ones((2, 1, 1, 8, 1), dtype=bool)
    mask[..., 0, :] = False
    calib = np.zeros_like(mask)
    calib[..., 3:6, :] = True
    path = write_ismrmrd(tmp_path / "f.h5", k, mask, kind="2d", calib=calib,
                         geometry=oblique_geometry(6, 8, 1, n_slices=2),
                         noise=crandn(rng, 2, 10))
    xml, table = load_table(path)
    head = table["head"]
    flags = head["flags"]
    assert ((flags[:2] & NOISE_BIT) != 0).all()  # 10 samples in rows of 6: 2 noise rows
    lines = table[2:]
    assert ((lines["head"]["flags"] & CAL_IMG_BIT) != 0).sum() == 6
    assert (lines["head"]["flags"][[0, 7]] & (1 << 6)).all()  # first in slice
    assert (lines["head"]["flags"][[6, 13]] & (1 << 7)).all()  # last in slice
    assert lines["head"]["flags"][-1] & (1 << 24)  # last in measurement
    assert (lines["head"]["center_sample"] == 3).all()
    hdr = parse_ismrmrd_header(xml)
    assert hdr.ky_limits is not None and (hdr.ky_limits.minimum, hdr.ky_limits.maximum,
                                          hdr.ky_limits.center) == (1, 7, 4)
    assert hdr.trajectory == "cartesian" and hdr.receiver_channels == 2


def test_whitening_skipped_for_singular_noise(tmp_path: Path, rng: np.random.Generator) -> None:
    k = crandn(rng, 1, 2, 1, 4, 8)
    noise = crandn(rng, 2, 64)
    noise[1] = 0  # a silent channel
    path = write_ismrmrd(tmp_path / "s.h5", k, np.ones((1, 1, 1, 4, 1), bool), kind="2d",
                         geometry=oblique_geometry(8, 4, 1), noise=noise)
    with pytest.warns(UserWarning, match="not positive definite"):
        scan = read_ismrmrd(path)
    assert not scan.whitened and scan.noise_cov is not None
    assert np.abs(scan.kspace - k).max() < 1e-6


def test_no_warning_for_clean_files(small_2d: tuple[Path, np.ndarray, np.ndarray]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan = read_ismrmrd(small_2d[0])
    assert scan.info.warnings == ()
