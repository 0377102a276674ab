"""fastMRI reader and content-based format detection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

from molrecon.errors import GeometryWarning, InputDataError
from molrecon.io.detect import detect_format, read_raw
from molrecon.io.fastmri import read_fastmri
from molrecon.io.ismrmrd import remove_readout_oversampling, write_ismrmrd
from molrecon.io.types import Geometry


def fastmri_header(rows: int, cols: int, recon: int) -> bytes:
    """A fastMRI-like ISMRMRD header: encoded (rows, cols) at 2× readout FOV, recon (recon²)."""
    from ismrmrd import xsd

    def space(x: int, y: int, fx: float, fy: float) -> object:
        return xsd.encodingSpaceType(matrixSize=xsd.matrixSizeType(x=x, y=y, z=1),
                                     fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=fy, z=3.0))

    hdr = xsd.ismrmrdHeader(
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="SIEMENS", systemModel="Skyra", systemFieldStrength_T=2.89,
            receiverChannels=4),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_000_000),
        encoding=[xsd.encodingType(
            encodedSpace=space(rows, cols, 280.0, 140.0 * cols / recon),
            reconSpace=space(recon, recon, 140.0, 140.0),
            encodingLimits=xsd.encodingLimitsType(kspace_encoding_step_1=xsd.limitType(
                minimum=0, maximum=cols - 1, center=cols // 2)),
            trajectory=xsd.trajectoryType.CARTESIAN)],
        sequenceParameters=xsd.sequenceParametersType(TR=[2750.0], TE=[27.0]),
    )
    return hdr.toXML("utf-8").encode()


def write_fastmri(path: Path, kspace: np.ndarray, *, header: bytes | None,
                  mask: np.ndarray | None = None) -> Path:
    """Write a file laid out like the fastMRI multicoil sets (kspace (S, C, rows, cols))."""
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace)
        if header is not None:
            f.create_dataset("ismrmrd_header", data=header)
        if mask is not None:
            f.create_dataset("mask", data=mask)
        f.attrs["acquisition"] = "CORPD_FBK"
    return path


def fft2c(x: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=axes), norm="ortho"), axes=axes)


def ifft2c(k: np.ndarray) -> np.ndarray:
    axes = (-2, -1)
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=axes), norm="ortho"), axes=axes)


@pytest.fixture
def phantom_file(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, np.ndarray]:
    """2 slices, 3 coils, rows (readout) = 32 with 2× oversampling, cols (phase) = 20.

    The image in fastMRI's (rows, cols) layout is an asymmetric block, so a wrong
    transpose or flip shows.
    """
    s_n, c_n, rows, cols = 2, 3, 32, 20
    img = np.zeros((s_n, c_n, rows, cols), dtype=np.complex128)
    img[:, :, 10:14, 4:9] = 1.0  # upper-left block (inside the central 16 readout rows)
    img[:, :, 18:20, 12:18] = 2.0j
    img *= (1.0 + np.arange(c_n))[None, :, None, None]
    img += 0.01 * (rng.standard_normal(img.shape) + 1j * rng.standard_normal(img.shape))
    k = fft2c(img).astype(np.complex64)
    path = write_fastmri(tmp_path / "knee.h5", k, header=fastmri_header(rows, cols, 16))
    return path, img


def test_layout_transpose_and_oversampling(phantom_file: tuple[Path, np.ndarray]) -> None:
    path, img = phantom_file
    with pytest.warns(GeometryWarning, match="no slice position"):
        scan = read_fastmri(path)
    assert scan.kind == "2d" and scan.shape == (2, 3, 1, 20, 16)  # (B, C, D, Y=cols, X=rows/2)
    recon = ifft2c(scan.kspace[:, :, 0])  # (S, C, Y, X)
    expected = np.swapaxes(img[:, :, 8:24, :], 2, 3)  # crop rows 8..23, then (cols, rows)
    assert np.abs(recon - expected).max() < 1e-4
    assert scan.mask.all() and scan.calib.all()
    assert scan.info.format == "fastmri"
    assert scan.info.readout_oversampling == 2.0
    assert scan.info.vendor == "SIEMENS" and scan.info.tr_ms == 2750.0
    assert scan.info.protocol == "CORPD_FBK"
    g = scan.geometry
    assert g.matrix == (16, 20, 1)
    assert g.fov_mm == pytest.approx((140.0, 140.0 * 20 / 16, 3.0))
    assert not g.orientation_known
    assert np.allclose(g.position[:, 2], [-1.5, 1.5])


def test_mask_from_dataset(tmp_path: Path, rng: np.random.Generator) -> None:
    k = (rng.standard_normal((1, 2, 16, 24)) + 1j * rng.standard_normal((1, 2, 16, 24)))
    mask = np.zeros(24, dtype=np.float32)
    mask[::4] = 1
    mask[10:14] = 1
    k = (k * mask).astype(np.complex64)
    path = write_fastmri(tmp_path / "m.h5", k, header=fastmri_header(16, 24, 8), mask=mask)
    with pytest.warns(GeometryWarning):
        scan = read_raw(path)
    assert np.array_equal(scan.mask[0, 0, 0, :, 0], mask.astype(bool))
    assert np.flatnonzero(scan.calib[0, 0, 0, :, 0]).tolist() == [10, 11, 12, 13]
    assert scan.acceleration == pytest.approx(24 / 9)
    ref = remove_readout_oversampling(np.swapaxes(k, 2, 3).astype(np.complex128), 8)
    assert np.abs(scan.kspace[:, :, 0] - ref).max() < 1e-5


def test_mask_from_nonzero_columns(tmp_path: Path, rng: np.random.Generator) -> None:
    k = (rng.standard_normal((1, 2, 16, 12)) + 1j * rng.standard_normal((1, 2, 16, 12)))
    k[..., [0, 1, 3, 11]] = 0
    path = write_fastmri(tmp_path / "z.h5", k.astype(np.complex64),
                         header=fastmri_header(16, 12, 8))
    with pytest.warns(GeometryWarning):
        scan = read_fastmri(path)
    assert np.flatnonzero(~scan.mask[0, 0, 0, :, 0]).tolist() == [0, 1, 3, 11]
    assert (scan.kspace[..., [0, 1, 3, 11], :] == 0).all()


def test_single_coil_file(tmp_path: Path, rng: np.random.Generator) -> None:
    k = (rng.standard_normal((3, 16, 10)) + 1j * rng.standard_normal((3, 16, 10)))
    path = write_fastmri(tmp_path / "sc.h5", k.astype(np.complex64),
                         header=fastmri_header(16, 10, 8))
    with pytest.warns(GeometryWarning):
        scan = read_fastmri(path)
    assert scan.shape == (3, 1, 1, 10, 8)


@pytest.mark.parametrize(("make", "match"), [
    (lambda rng: np.zeros((4, 16), np.complex64), "rank 2"),
    (lambda rng: np.zeros((1, 2, 16, 8), np.float32), "not complex"),
])
def test_bad_kspace(tmp_path: Path, rng: np.random.Generator, make: object, match: str) -> None:
    path = write_fastmri(tmp_path / "bad.h5", make(rng),  # type: ignore[operator]
                         header=fastmri_header(16, 8, 8))
    with pytest.raises(InputDataError, match=match) as info:
        read_fastmri(path)
    assert info.value.path == str(path)


def test_mask_length_mismatch_and_missing_header(tmp_path: Path) -> None:
    k = np.ones((1, 2, 16, 8), np.complex64)
    bad_mask = write_fastmri(tmp_path / "a.h5", k, header=fastmri_header(16, 8, 8),
                             mask=np.ones(7, np.float32))
    with pytest.raises(InputDataError, match="7 entries but /kspace has 8"):
        read_fastmri(bad_mask)
    no_header = write_fastmri(tmp_path / "b.h5", k, header=None)
    with pytest.raises(InputDataError, match="no /ismrmrd_header"):
        read_fastmri(no_header)
    k[0, 0, 3, 2] = np.inf
    inf = write_fastmri(tmp_path / "c.h5", k, header=fastmri_header(16, 8, 8))
    with pytest.raises(InputDataError, match="NaN or infinite"):
        read_fastmri(inf)


# --------------------------------------------------------------------------- format detection
def test_detect_by_content_not_extension(tmp_path: Path, rng: np.random.Generator,
                                         phantom_file: tuple[Path, np.ndarray]) -> None:
    fastmri_path = phantom_file[0].rename(tmp_path / "looks_like.mrd")
    k = (rng.standard_normal((1, 2, 1, 6, 8)) + 1j).astype(np.complex64)
    geo = Geometry(fov_mm=(8.0, 6.0, 2.0), matrix=(8, 6, 1), position=np.zeros((1, 3)),
                   read_dir=np.array([1.0, 0, 0]), phase_dir=np.array([0, 1.0, 0]),
                   slice_dir=np.array([0, 0, 1.0]), slice_spacing_mm=2.0)
    ismrmrd_path = write_ismrmrd(tmp_path / "scan.fastmri.h5", k, np.ones((1, 1, 1, 6, 1), bool),
                                 kind="2d", geometry=geo)
    assert detect_format(fastmri_path) == ("fastmri", None)
    assert detect_format(ismrmrd_path) == ("ismrmrd", "dataset")
    with pytest.warns(GeometryWarning):
        assert read_raw(fastmri_path).info.format == "fastmri"
    scan = read_raw(ismrmrd_path)
    assert scan.info.format == "ismrmrd" and np.abs(scan.kspace - k).max() < 1e-6


def test_detect_ismrmrd_in_another_group(tmp_path: Path, rng: np.random.Generator) -> None:
    k = (rng.standard_normal((1, 1, 1, 4, 4)) + 0j).astype(np.complex64)
    geo = dataclasses.replace(Geometry.default((4, 4, 1)), orientation_known=True)
    src = write_ismrmrd(tmp_path / "a.h5", k, np.ones((1, 1, 1, 4, 1), bool), kind="2d",
                        geometry=geo)
    with h5py.File(src, "a") as f:
        f.move("dataset", "scan1")
    assert detect_format(src) == ("ismrmrd", "scan1")
    assert np.abs(read_raw(src).kspace - k).max() < 1e-6


def test_detect_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("images", data=np.zeros(3))
    cases = [(tmp_path / "missing.h5", "does not exist"), (tmp_path, "directory"),
             (text, "not a readable HDF5"), (other, "neither ISMRMRD .* nor fastMRI .* images")]
    for path, match in cases:
        with pytest.raises(InputDataError, match=match) as info:
            read_raw(path)
        assert info.value.path == str(path)
