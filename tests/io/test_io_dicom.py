"""DICOM output: per-plane MR Image files, geometry equal to the NIfTI affine, atomic folders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from molrecon.errors import ConfigError, GeometryWarning, InputDataError, OutputError
from molrecon.io.dicom import check_dicom_output, read_dicom_series, write_dicom
from molrecon.io.nifti import LPS_TO_RAS, nifti_affine, nifti_array, write_nifti
from molrecon.io.types import Geometry, ImageVolume

SHA = "0123456789abcdef" * 4


def rotation() -> np.ndarray:
    """A doubly oblique right-handed rotation (30° about x, −15° about y, 20° about z)."""
    a, b, c = np.deg2rad([30.0, -15.0, 20.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def geometry(kind: str, shape: tuple[int, int, int, int], *, spacing: float = 4.0,
             frame_time_ms: float | None = None) -> Geometry:
    """Oblique geometry for an image of ``shape`` (B, D, Y, X): anisotropic voxels
    (X: 1.5 mm, Y: 2.2 mm), slices spaced ``spacing`` mm along slice_dir from a
    non-zero first centre."""
    b_n, d_n, y_n, x_n = shape
    r = rotation()
    read, phase, slc = r[:, 0], r[:, 1], r[:, 2]
    first = np.array([12.5, -33.0, 41.0])
    fov_z = 5.0 * d_n if kind == "3d" else 3.0
    return Geometry(
        fov_mm=(1.5 * x_n, 2.2 * y_n, fov_z),
        matrix=(x_n, y_n, d_n if kind == "3d" else 1),
        position=first + np.arange(b_n)[:, None] * spacing * slc,
        read_dir=read, phase_dir=phase, slice_dir=slc,
        slice_spacing_mm=5.0 if kind == "3d" else spacing,
        frame_time_ms=frame_time_ms,
    )


def volume(kind: str, shape: tuple[int, int, int, int], *, complex_data: bool = False,
           seed: int = 0, **kw: object) -> ImageVolume:
    rng = np.random.default_rng(seed)
    data = rng.uniform(0.0, 3e-4, shape)   # scanner-like small intensities
    if complex_data:
        data = (data * np.exp(1j * rng.uniform(-np.pi, np.pi, shape))).astype(np.complex64)
    else:
        data = data.astype(np.float32)
    return ImageVolume(data=data, kind=kind, geometry=geometry(kind, shape, **kw),  # type: ignore[arg-type]
                       method="mol")


CASES = {
    "2d": ("2d", (3, 1, 5, 6), {}),
    "2d_single": ("2d", (1, 1, 7, 4), {}),
    "3d": ("3d", (1, 5, 6, 8), {}),
    "2dt": ("2dt", (2, 4, 5, 6), {"frame_time_ms": 40.0}),
}


def files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def read_all(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in files(folder)]


def floats(value: object) -> np.ndarray:
    return np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]


def lps_of_voxel(image: ImageVolume, ijk: tuple[float, float, float]) -> np.ndarray:
    aff = LPS_TO_RAS @ nifti_affine(image.geometry, image.kind, image.data.shape)
    return (aff @ np.array([*ijk, 1.0]))[:3]


# ---- tags and geometry ---------------------------------------------------------------------

def test_multislice_tags_and_pixel_positions(tmp_path: Path) -> None:
    img = volume("2d", (3, 1, 5, 6), complex_data=True)
    out = write_dicom(img, tmp_path / "series", model_sha256=SHA, source="/data/raw/scan.h5")
    assert out == tmp_path / "series"
    assert [p.name for p in files(out)] == ["IM_0001.dcm", "IM_0002.dcm", "IM_0003.dcm"]
    assert list(tmp_path.iterdir()) == [out]          # no temporary folder left behind
    geo = img.geometry
    mag = img.magnitude()
    datasets = read_all(out)
    slope = float(datasets[0].RescaleSlope)
    assert slope == pytest.approx(mag.max() / 65535, rel=1e-6)
    for b, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.preamble is not None
        assert ds.SOPClassUID == MRImageStorage
        assert ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
        assert ds.InstanceNumber == b + 1
        assert ds.InStackPositionNumber == b + 1
        assert str(ds.PatientName) == "ANONYMOUS" and ds.PatientID == "ANONYMOUS"
        assert ds.Manufacturer == ""
        assert SHA in ds.ImageComments and "molrecon 0.1.0 mol" in ds.ImageComments
        assert SHA in ds.DerivationDescription and "scan.h5" in ds.DerivationDescription
        assert "/data/raw" not in ds.DerivationDescription
        assert ds.SeriesDescription.startswith("molrecon 0.1.0 mol")
        assert ds.ContentDate and ds.ContentTime
        # rows = Y (phase), columns = X (readout)
        assert (ds.Rows, ds.Columns) == (5, 6)
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 0)
        assert np.allclose(floats(ds.ImageOrientationPatient),
                           [*geo.read_dir, *geo.phase_dir], atol=1e-9)
        assert np.allclose(floats(ds.PixelSpacing), [2.2, 1.5])   # [between rows, between columns]
        assert float(ds.SliceThickness) == pytest.approx(3.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
        assert float(ds.RescaleSlope) == slope and float(ds.RescaleIntercept) == 0.0
        assert ds.RescaleType == "US"
        # pixel (0, 0) is the slice centre (pixel (Y//2, X//2)) minus the half-FOV offsets
        expected = geo.position[b] - 3 * 1.5 * geo.read_dir - 2 * 2.2 * geo.phase_dir
        ipp = floats(ds.ImagePositionPatient)
        assert np.allclose(ipp, expected, atol=1e-6)
        normal = np.cross(geo.read_dir, geo.phase_dir)
        assert float(ds.SliceLocation) == pytest.approx(float(ipp @ normal), abs=1e-6)
        # every pixel (row r, column c) lies where NIfTI voxel (i=c, j=r, k=b) lies
        iop = floats(ds.ImageOrientationPatient)
        ps = floats(ds.PixelSpacing)
        for r, c in [(0, 0), (4, 0), (0, 5), (3, 2)]:
            pos = ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]
            assert np.allclose(pos, lps_of_voxel(img, (c, r, b)), atol=1e-6)
        # and holds the magnitude of image pixel (b, 0, y=r, x=c)
        values = ds.pixel_array * slope
        assert values.shape == (5, 6)
        assert np.abs(values - mag[b, 0]).max() <= mag.max() / 65535
    assert len({ds.SOPInstanceUID for ds in datasets}) == 3
    for keyword in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert len({ds[keyword].value for ds in datasets}) == 1
    centre, width = float(datasets[0].WindowCenter), float(datasets[0].WindowWidth)
    assert 0 < centre < mag.max() and 0 < width <= mag.max()
    assert datasets[0].VOILUTFunction == "LINEAR_EXACT"   # width < 1 in these small units


def test_3d_partitions(tmp_path: Path) -> None:
    img = volume("3d", (1, 5, 6, 8))
    datasets = read_all(write_dicom(img, tmp_path / "s"))
    assert len(datasets) == 5
    geo = img.geometry
    for d, ds in enumerate(datasets):
        assert ds.MRAcquisitionType == "3D"
        assert float(ds.SliceThickness) == pytest.approx(5.0)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(5.0)
        # partition d's centre is the slab centre + (d − D//2)·Δz·slice_dir
        centre = geo.position[0] + (d - 2) * 5.0 * geo.slice_dir
        expected = centre - 4 * 1.5 * geo.read_dir - 3 * 2.2 * geo.phase_dir
        assert np.allclose(floats(ds.ImagePositionPatient), expected, atol=1e-6)
        assert "TemporalPositionIdentifier" not in ds


def test_2dt_temporal_tags(tmp_path: Path) -> None:
    img = volume("2dt", (2, 4, 5, 6), frame_time_ms=40.0)
    datasets = read_all(write_dicom(img, tmp_path / "s"))
    assert len(datasets) == 8
    for n, ds in enumerate(datasets):
        b, t = divmod(n, 4)          # slice-major
        assert ds.InstanceNumber == n + 1
        assert ds.InStackPositionNumber == b + 1
        assert ds.TemporalPositionIdentifier == t + 1
        assert ds.NumberOfTemporalPositions == 4
        assert float(ds.TriggerTime) == pytest.approx(40.0 * t)
        assert float(ds.TemporalResolution) == pytest.approx(40.0)
        assert ds.MRAcquisitionType == "2D"
        expected = (img.geometry.position[b] - 3 * 1.5 * img.geometry.read_dir
                    - 2 * 2.2 * img.geometry.phase_dir)
        assert np.allclose(floats(ds.ImagePositionPatient), expected, atol=1e-6)
        slope = float(ds.RescaleSlope)
        assert np.abs(ds.pixel_array * slope - img.magnitude()[b, t]).max() <= slope


@pytest.mark.parametrize("case", sorted(CASES))
def test_read_back_matches_nifti(tmp_path: Path, case: str) -> None:
    kind, shape, kw = CASES[case]
    img = volume(kind, shape, complex_data=True, **kw)  # type: ignore[arg-type]
    out = write_dicom(img, tmp_path / "s")
    # any ordering of the files: give them names that sort in reverse
    names = files(out)
    for n, p in enumerate(reversed(names)):
        p.rename(out / f"x{n:03d}.dcm")
    data, affine = read_dicom_series(out)
    expected = nifti_array(img.magnitude(), img.kind)
    assert data.dtype == np.float32
    assert data.shape == expected.shape
    assert np.abs(data - expected).max() <= img.magnitude().max() / 65535 * 1.0001
    assert np.allclose(affine, nifti_affine(img.geometry, img.kind, img.data.shape), atol=1e-4)


def test_descending_slices_keep_their_order(tmp_path: Path) -> None:
    img = volume("2d", (4, 1, 5, 6), spacing=-3.0)      # positions run against slice_dir
    _, affine = read_dicom_series(write_dicom(img, tmp_path / "s"))
    assert np.allclose(affine, nifti_affine(img.geometry, "2d", img.data.shape), atol=1e-4)


def test_uneven_slices_keep_their_true_positions(tmp_path: Path) -> None:
    img = volume("2d", (3, 1, 5, 6))
    pos = img.geometry.position.copy()
    pos[2] += 1.0 * img.geometry.slice_dir
    img = dataclasses.replace(img, geometry=dataclasses.replace(img.geometry, position=pos))
    datasets = read_all(write_dicom(img, tmp_path / "s"))
    for b, ds in enumerate(datasets):
        expected = pos[b] - 3 * 1.5 * img.geometry.read_dir - 2 * 2.2 * img.geometry.phase_dir
        assert np.allclose(floats(ds.ImagePositionPatient), expected, atol=1e-6)
    with pytest.warns(GeometryWarning):
        read_dicom_series(tmp_path / "s")


def test_nifti_and_dicom_agree(tmp_path: Path) -> None:
    img = volume("2d", (3, 1, 5, 6))
    nii = write_nifti(img, tmp_path / "img.nii.gz")
    folder = write_dicom(img, tmp_path / "dicom")
    loaded = nib.load(str(nii))
    data, affine = read_dicom_series(folder)
    assert np.allclose(affine, loaded.affine, atol=1e-4)
    assert nib.aff2axcodes(affine) == nib.aff2axcodes(loaded.affine)
    assert np.abs(data - np.asarray(loaded.dataobj)).max() <= img.magnitude().max() / 65535


# ---- identity and description ----------------------------------------------------------------

def test_uids_patient_and_study(tmp_path: Path) -> None:
    img = volume("2d", (2, 1, 5, 6))
    study = "1.2.826.0.1.3680043.8.498.12345"
    a = read_all(write_dicom(img, tmp_path / "a", study_uid=study,
                             patient={"name": "Doe^Jane", "id": "P-17"},
                             series_description="my recon", method_text="sense"))
    b = read_all(write_dicom(img, tmp_path / "b", study_uid=study))
    c = read_all(write_dicom(img, tmp_path / "c"))
    assert {ds.StudyInstanceUID for ds in a + b} == {study}
    assert c[0].StudyInstanceUID != study and c[0].StudyDate
    assert a[0].StudyDate == ""                     # an existing study keeps its own date
    assert len({ds.SeriesInstanceUID for ds in a + b + c}) == 3
    assert len({ds.FrameOfReferenceUID for ds in a + b + c}) == 3
    assert str(a[0].PatientName) == "Doe^Jane" and a[0].PatientID == "P-17"
    assert a[0].SeriesDescription == "my recon"
    assert a[0].ImageComments == "molrecon 0.1.0 sense"


def test_zero_image(tmp_path: Path) -> None:
    img = volume("2d", (1, 1, 5, 6))
    img = dataclasses.replace(img, data=np.zeros_like(img.data))
    data, _ = read_dicom_series(write_dicom(img, tmp_path / "s"))
    assert np.all(data == 0)


@pytest.mark.parametrize("change, message", [
    ({"data": np.zeros((2, 3, 5, 6), np.float32), "kind": "3d"}, "slabs"),
    ({"data": np.zeros((2, 3, 5, 6), np.float32)}, "D = 1"),
    ({"data": np.full((3, 1, 5, 6), np.nan, np.float32)}, "non-finite"),
])
def test_bad_images_refused(tmp_path: Path, change: dict[str, object], message: str) -> None:
    img = dataclasses.replace(volume("2d", (3, 1, 5, 6)), **change)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message):
        write_dicom(img, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw", [{"model_sha256": "abc"}, {"study_uid": "1.2.abc"},
                                {"patient": {"age": "40"}}])
def test_bad_options_refused(tmp_path: Path, kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        write_dicom(volume("2d", (1, 1, 5, 6)), tmp_path / "s", **kw)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ---- atomic folder ------------------------------------------------------------------------

def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pydicom.dcmwrite
    calls = {"n": 0}

    def failing(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("disk on fire")
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmwrite", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_dicom(volume("2d", (3, 1, 5, 6)), tmp_path / "s")
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []


def test_failure_with_force_keeps_old_series(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = write_dicom(volume("2d", (3, 1, 5, 6)), tmp_path / "s")
    before = {p.name: p.read_bytes() for p in files(out)}

    def failing(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom, "dcmwrite", failing)
    with pytest.raises(OutputError, match="No space left"):
        write_dicom(volume("2d", (3, 1, 5, 6)), out, force=True)
    assert {p.name: p.read_bytes() for p in files(out)} == before
    assert list(tmp_path.iterdir()) == [out]


def test_existing_folder_needs_force(tmp_path: Path) -> None:
    out = write_dicom(volume("2d", (3, 1, 5, 6)), tmp_path / "s")
    old_uid = pydicom.dcmread(files(out)[0]).SeriesInstanceUID
    with pytest.raises(OutputError, match="--force") as err:
        write_dicom(volume("2d", (1, 1, 5, 6)), out)
    assert err.value.path == str(out)
    assert len(files(out)) == 3
    write_dicom(volume("2d", (1, 1, 5, 6)), out, force=True)
    assert [p.name for p in files(out)] == ["IM_0001.dcm"]
    assert pydicom.dcmread(files(out)[0]).SeriesInstanceUID != old_uid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]   # the old series is gone


def test_empty_folder_is_used(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    write_dicom(volume("2d", (2, 1, 5, 6)), tmp_path / "s")
    assert len(files(tmp_path / "s")) == 2


def test_force_refuses_foreign_folders(tmp_path: Path) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(OutputError, match="more than DICOM"):
        write_dicom(volume("2d", (1, 1, 5, 6)), folder, force=True)
    assert (folder / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        check_dicom_output(tmp_path / "file", force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_dicom_output(tmp_path / "missing" / "s")


# ---- reading --------------------------------------------------------------------------------

def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="no such folder"):
        read_dicom_series(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("not dicom")
    with pytest.raises(InputDataError, match="no DICOM images"):
        read_dicom_series(tmp_path / "empty")
    a = write_dicom(volume("2d", (1, 1, 5, 6)), tmp_path / "a")
    b = write_dicom(volume("2d", (1, 1, 5, 6)), tmp_path / "b")
    files(b)[0].rename(a / "other.dcm")
    with pytest.raises(InputDataError, match="2 series"):
        read_dicom_series(a)
