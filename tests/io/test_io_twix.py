"""Siemens twix reader: the same scan as its ISMRMRD conversion, content detection, refusals.

``twix_gre.dat`` and ``siemens_gre_2coil_full.h5`` are one 2D GRE scan, raw and converted
to ISMRMRD; both readers must give the same k-space, sampling, geometry and images.
Synthetic variants (noise scans, calibration and averaged lines) are written with
twixtools' own writer from the real file.
"""

from __future__ import annotations

import copy
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import real_file
from molrecon.cli import app
from molrecon.errors import InputDataError
from molrecon.io.detect import detect_format, read_raw
from molrecon.io.ismrmrd import read_ismrmrd
from molrecon.io.twix import is_twix, read_twix

pytest.importorskip("twixtools")

runner = CliRunner()

GRE = "twix_gre.dat"
GRE_H5 = "siemens_gre_2coil_full.h5"
EPI = "twix_epi.dat"


def one_line_error(args: list[str], needle: str) -> str:
    """Run the CLI; expect exit 1 and one stderr line holding ``needle``, no traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


# --------------------------------------------------------------------------- equivalence
def test_same_kspace_sampling_and_geometry_as_the_ismrmrd_conversion(real_data: Path) -> None:
    twix = read_twix(real_file(real_data, GRE))
    ref = read_ismrmrd(real_file(real_data, GRE_H5))
    assert twix.shape == ref.shape == (1, 2, 1, 160, 160)
    assert twix.kind == ref.kind == "2d"
    # Same raw samples, same placement and oversampling removal: equal to float32 rounding
    # (measured: identical). Neither file has a noise scan, so neither is prewhitened.
    assert not twix.whitened and not ref.whitened and twix.noise_cov is None
    scale = float(np.abs(ref.kspace).max())
    assert float(np.abs(twix.kspace - ref.kspace).max()) <= 1e-6 * scale
    assert np.array_equal(twix.mask, ref.mask) and np.array_equal(twix.calib, ref.calib)

    g, h = twix.geometry, ref.geometry
    assert g.matrix == h.matrix == (160, 160, 1)
    assert g.fov_mm == pytest.approx(h.fov_mm) and g.fov_mm == pytest.approx((200, 200, 4))
    assert g.slice_spacing_mm == pytest.approx(h.slice_spacing_mm)
    assert np.allclose(g.position, h.position, atol=0.01)
    for name in ("read_dir", "phase_dir", "slice_dir"):
        assert np.allclose(getattr(g, name), getattr(h, name), atol=1e-4), name
    assert g.orientation_known

    i, j = twix.info, ref.info
    assert (i.format, i.vendor) == ("twix", "Siemens")
    for name in ("model", "field_strength_t", "protocol", "tr_ms", "te_ms", "encoded_matrix",
                 "encoded_fov_mm", "readout_oversampling", "partial_fourier", "averages",
                 "n_acquisitions", "n_noise_acquisitions"):
        assert getattr(i, name) == pytest.approx(getattr(j, name)), name
    assert i.warnings == ()


def test_sense_images_equal(real_data: Path) -> None:
    from molrecon.recon import ReconConfig, reconstruct

    config = ReconConfig(method="sense")
    a = reconstruct(read_twix(real_file(real_data, GRE)), config).image.data
    b = reconstruct(read_ismrmrd(real_file(real_data, GRE_H5)), config).image.data
    assert a.shape == b.shape == (1, 1, 160, 160)
    assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(b).max())


# --------------------------------------------------------------------------- detection
def test_recognised_by_content_not_by_name(real_data: Path, tmp_path: Path) -> None:
    src = real_file(real_data, GRE)
    expected = read_twix(src).kspace
    for name in ("scan.h5", "scan"):
        copy_ = tmp_path / name
        copy_.write_bytes(src.read_bytes())
        assert is_twix(copy_)
        assert detect_format(copy_) == ("twix", None)
        assert np.array_equal(read_raw(copy_).kspace, expected)

    h5 = real_file(real_data, GRE_H5)
    assert not is_twix(h5)
    assert detect_format(h5) == ("ismrmrd", "dataset")

    text = tmp_path / "notes.dat"
    text.write_text("patient,slice,value\n1,2,3\n")
    assert not is_twix(text)
    with pytest.raises(InputDataError, match="not a readable HDF5"):
        read_raw(text)
    with pytest.raises(InputDataError, match="not a Siemens twix file"):
        read_twix(text)
    assert not is_twix(tmp_path / "absent.dat") and not is_twix(tmp_path)


def test_import_does_not_load_twixtools() -> None:
    code = ("import sys, molrecon.io.detect, molrecon.cli; "
            "assert 'twixtools' not in sys.modules, 'twixtools imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- refusals
def test_epi_is_refused_in_one_line(real_data: Path, tmp_path: Path) -> None:
    epi = real_file(real_data, EPI)
    assert is_twix(epi)
    line = one_line_error(["info", str(epi)], "EPI is not supported")
    assert str(epi) in line
    one_line_error(["reconstruct", str(epi), str(tmp_path / "o.nii"), "--method", "zf"],
                   "EPI is not supported")
    assert not list(tmp_path.iterdir())


def _cut(data: bytes, n: int, fix_length: bool) -> bytes:
    """The first ``n`` bytes; with ``fix_length`` the raid entry is made to end there too."""
    out = bytearray(data[:n])
    if fix_length:
        (offset,) = struct.unpack_from("<Q", out, 16)
        struct.pack_into("<Q", out, 24, n - offset)
    return bytes(out)


@pytest.mark.parametrize(("cut", "needle"), [
    (lambda d: _cut(d, len(d) // 2, False), "is truncated: measurement 1 of 1 ends at byte"),
    (lambda d: _cut(d, 1000, False), "shorter than the twix multi-raid header"),
    (lambda d: _cut(d, int(len(d) * 0.6), True), "truncated mid-measurement"),
    (lambda d: _cut(d, int(len(d) * 0.75), True), "damaged or truncated"),
], ids=["half", "1000-bytes", "no-acqend", "cut-readout"])
def test_truncated_copies_are_refused_in_one_line(real_data: Path, tmp_path: Path,
                                                  cut: Callable[[bytes], bytes],
                                                  needle: str) -> None:
    bad = tmp_path / "cut.dat"
    bad.write_bytes(cut(real_file(real_data, GRE).read_bytes()))
    assert is_twix(bad)
    one_line_error(["info", str(bad)], needle)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.dat"
    empty.write_bytes(b"")
    assert not is_twix(empty)
    with pytest.raises(InputDataError, match="is empty"):
        read_twix(empty)
    one_line_error(["info", str(empty)], "not a readable HDF5")  # not twix: tried as HDF5


def test_non_cartesian_protocol_is_refused(real_data: Path, tmp_path: Path) -> None:
    data = real_file(real_data, GRE).read_bytes()
    radial = data.replace(b"sKSpace.ucTrajectory\t = \t1", b"sKSpace.ucTrajectory\t = \t2")
    assert radial != data and len(radial) == len(data)
    bad = tmp_path / "radial.dat"
    bad.write_bytes(radial)
    with pytest.raises(InputDataError, match="trajectory is radial: .*Cartesian data only"):
        read_twix(bad)


# --------------------------------------------------------------------------- synthetic scans
def _rewrite(src: Path, dst: Path, edit: Callable[[list], list[list]],
             protocol: tuple[bytes, bytes] | None = None) -> Path:
    """``src`` rewritten by twixtools with the measurements ``edit(readouts)`` returns.

    ``protocol`` = ``(old, new)`` replaces text of the same length in the protocol header.
    """
    import twixtools

    scan = twixtools.read_twix(str(src), verbose=False, parse_pmu=False, parse_geometry=False)[0]
    header = scan["hdr_str"]
    if protocol is not None:
        text = header.tobytes()
        assert protocol[0] in text and len(protocol[0]) == len(protocol[1])
        header = np.frombuffer(text.replace(*protocol), dtype=header.dtype)
    readouts = [m.convert_to_local() for m in scan["mdb"]]
    measurements = [{"hdr_str": header, "raidfile_hdr": scan["raidfile_hdr"].copy(),
                     "mdb": mdbs} for mdbs in edit(readouts)]
    twixtools.write_twix(measurements, str(dst))  # prints that it adds the ACQEND blocks
    return dst


def _noise_readouts(template: object, noise: np.ndarray, n: int) -> list:
    from twixtools import mdh_def

    out = []
    for part in np.split(noise, n, axis=1):
        m = copy.deepcopy(template)
        m.mdh.EvalInfoMask = 1 << mdh_def.mask_dict["NOISEADJSCAN"]
        m.data = part
        out.append(m)
    return out


@pytest.mark.parametrize("where", ["measurement before", "image measurement"])
def test_noise_scan_prewhitens_like_ismrmrd(real_data: Path, tmp_path: Path,
                                            rng: np.random.Generator, where: str) -> None:
    src = real_file(real_data, GRE)
    mix = np.array([[1.0, 0.0], [0.4 + 0.3j, 0.8]])
    noise = (mix @ (rng.standard_normal((2, 2048)) + 1j * rng.standard_normal((2, 2048)))
             ).astype(np.complex64)

    def edit(readouts: list) -> list[list]:
        lines = _noise_readouts(readouts[0], noise, 8)
        if where == "image measurement":
            return [lines + readouts]
        return [lines, readouts]

    scan_file = _rewrite(src, tmp_path / "noise.dat", edit)
    white = read_twix(scan_file)
    plain = read_twix(scan_file, prewhiten=False)
    cov = noise.astype(np.complex128) @ noise.conj().T.astype(np.complex128) / noise.shape[1]
    assert white.whitened and not plain.whitened
    assert white.info.n_noise_acquisitions == 8
    assert np.allclose(white.noise_cov, cov, rtol=1e-6)
    whitener = np.linalg.inv(np.linalg.cholesky(cov))
    expected = np.einsum("ij,bjdyx->bidyx", whitener, plain.kspace)
    assert np.allclose(white.kspace, expected, atol=1e-5 * float(np.abs(expected).max()))
    assert np.array_equal(plain.kspace, read_twix(src).kspace)


def test_calibration_lines_undersampling_and_averages(real_data: Path, tmp_path: Path) -> None:
    """GRAPPA-style R = 2 with 26 integrated ACS lines, plus a second average of one line.

    In the ACS block the lines of the imaging pattern are PATREFANDIMASCAN, the others
    PATREFSCAN only; an extra ACS-only copy of an imaging line must not be used.
    """
    from twixtools import mdh_def

    src = real_file(real_data, GRE)
    bit = {name: 1 << mdh_def.mask_dict[name] for name in ("PATREFSCAN", "PATREFANDIMASCAN")}

    def edit(readouts: list) -> list[list]:
        kept = []
        for m in readouts:
            lin = int(m.mdh.Counter.Lin)
            if 64 <= lin < 90:
                m.mdh.EvalInfoMask |= bit["PATREFSCAN"]
                if lin % 2 == 0:
                    m.mdh.EvalInfoMask |= bit["PATREFANDIMASCAN"]
            elif lin % 2:
                continue
            kept.append(m)

        def scaled_copy(lin: int, factor: float) -> object:
            m = copy.deepcopy(next(m for m in kept if m.mdh.Counter.Lin == lin))
            m.data = np.asarray(m.data) * factor
            return m

        again = scaled_copy(40, 3.0)
        again.mdh.Counter.Ave = 1
        acs_copy = scaled_copy(80, 5.0)
        acs_copy.mdh.EvalInfoMask &= ~bit["PATREFANDIMASCAN"]
        return [kept + [again, acs_copy]]

    scan = read_twix(_rewrite(src, tmp_path / "acs.dat", edit))
    full = read_twix(src)
    sampled = scan.mask[0, 0, 0, :, 0]
    lines = np.arange(160)
    assert np.array_equal(sampled, (lines % 2 == 0) | ((lines >= 64) & (lines < 90)))
    assert np.array_equal(np.flatnonzero(scan.calib[0, 0, 0, :, 0]), np.arange(64, 90))
    k, f = scan.kspace[0, :, 0], full.kspace[0, :, 0]
    assert np.allclose(k[:, sampled & (lines != 40)], f[:, sampled & (lines != 40)])
    assert np.allclose(k[:, 40], 2 * f[:, 40], rtol=1e-5)  # (1 + 3) / 2
    assert not np.any(k[:, ~sampled])
    assert scan.info.averages == 2


def _copies(readouts: list, change: Callable[[object, int], None], n: int) -> list:
    """``n`` copies of every readout, copy ``i`` changed by ``change(mdb, i)``."""
    out = []
    for i in range(n):
        for m in readouts:
            c = copy.deepcopy(m)
            change(c, i)
            out.append(c)
    return out


def _slice(m: object, i: int) -> None:  # slice i: 5·i mm below slice 0, samples × (i + 1)
    m.mdh.Counter.Sli = i
    m.data = np.asarray(m.data) * (i + 1)
    normal = np.array([0.0, 0.0383878015, 0.9992629886])
    pos = m.mdh.SliceData.SlicePos
    pos.Sag, pos.Cor, pos.Tra = np.array([pos.Sag, pos.Cor, pos.Tra]) - 5.0 * i * normal


def _repetition(m: object, i: int) -> None:  # 400 ticks of 2.5 ms apart, samples × (i + 1)
    m.mdh.Counter.Rep = i
    m.data = np.asarray(m.data) * (i + 1)
    m.mdh.TimeStamp = m.mdh.TimeStamp + 400 * i


def _partition(m: object, i: int) -> None:  # 4 partitions, centre partition 2
    m.mdh.Counter.Par = i
    m.mdh.CenterPar = 2


@pytest.mark.parametrize(("change", "protocol", "kind", "shape"), [
    (_slice, None, "2d", (2, 2, 1, 160, 160)),
    (_repetition, None, "2dt", (1, 2, 2, 160, 160)),
    (_partition, (b"sKSpace.ucDimension\t = \t2", b"sKSpace.ucDimension\t = \t4"), "3d",
     (1, 2, 4, 160, 160)),
], ids=["multi-slice", "repetitions", "3d"])
def test_slices_frames_and_partitions(real_data: Path, tmp_path: Path,
                                      change: Callable[[object, int], None],
                                      protocol: tuple[bytes, bytes] | None, kind: str,
                                      shape: tuple[int, ...]) -> None:
    src = real_file(real_data, GRE)
    n = shape[0] * shape[2]
    scan = read_twix(_rewrite(src, tmp_path / "x.dat", lambda r: [_copies(r, change, n)],
                              protocol))
    one = read_twix(src)
    assert (scan.kind, scan.shape) == (kind, shape)
    g = scan.geometry
    if kind == "2d":  # ordered along +slice_dir: Sli 1 (5 mm below Sli 0) comes first
        assert np.allclose(scan.kspace[0], 2 * one.kspace[0], rtol=1e-5)
        assert np.allclose(scan.kspace[1], one.kspace[0])
        assert g.slice_spacing_mm == pytest.approx(5.0)
        assert np.allclose(g.position[1] - g.position[0], 5.0 * g.slice_dir, atol=1e-3)
        assert np.allclose(g.position[1], one.geometry.position[0], atol=1e-4)
    elif kind == "2dt":
        assert g.frame_time_ms == pytest.approx(1000.0)
        assert np.allclose(scan.kspace[:, :, 1], 2 * one.kspace[:, :, 0], rtol=1e-5)
    else:  # the slab (4 mm) is encoded by 4 partitions; the same lines in each
        assert g.matrix == (160, 160, 4) and g.voxel_mm == pytest.approx((1.25, 1.25, 1.0))
        assert np.allclose(scan.kspace[:, :, 3], one.kspace[:, :, 0])
    assert scan.info.warnings == ()


# --------------------------------------------------------------------------- CLI
def test_info_shows_a_twix_file(real_data: Path) -> None:
    gre = real_file(real_data, GRE)
    result = runner.invoke(app, ["info", str(gre)])
    assert result.exit_code == 0, result.output
    for text in ("twix", "2D, 1 slice(s)", "320 × 160 × 1", "160 × 160 × 1", "200.0 × 200.0 × 4.0",
                 "Siemens Skyra, 2.89 T", "gre", "10.00 / 3.00", "2×"):
        assert text in result.stdout, text
    result = runner.invoke(app, ["info", str(gre), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "twix" and data["shape"] == [1, 2, 1, 160, 160]
    assert data["recon_matrix"] == [160, 160, 1] and data["warnings"] == []


def test_reconstruct_writes_the_geometry_of_the_ismrmrd_conversion(real_data: Path,
                                                                   tmp_path: Path) -> None:
    out, ref = tmp_path / "twix.nii", tmp_path / "ismrmrd.nii"
    for src, dst in ((real_file(real_data, GRE), out), (real_file(real_data, GRE_H5), ref)):
        result = runner.invoke(app, ["reconstruct", str(src), str(dst), "--method", "sense"])
        assert result.exit_code == 0, result.output
    a, b = nib.load(out), nib.load(ref)
    assert a.shape == b.shape
    assert np.allclose(a.affine, b.affine, atol=1e-4)
    assert np.allclose(a.get_fdata(), b.get_fdata(), atol=1e-4 * float(np.abs(b.get_fdata()).max()))
