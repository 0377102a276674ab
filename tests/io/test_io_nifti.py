"""NIfTI output: affine from scanner geometry (LPS -> RAS), array layout, atomic writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from molrecon.errors import ConfigError, GeometryWarning, InputDataError, OutputError
from molrecon.io.nifti import nifti_affine, nifti_array, read_nifti, write_nifti
from molrecon.io.types import Geometry, ImageVolume

COS30 = 0.8660254037844386
SIN30 = 0.5


def oblique_30(n_slices: int = 1, spacing: float = 3.0, z_matrix: int = 1,
               fov_z: float = 3.0, frame_time_ms: float | None = None) -> Geometry:
    """4 × 6 in-plane matrix, 2 × 3 mm voxels, rotated 30° about the LPS x axis.

    read = (1, 0, 0), phase = (0, cos30, sin30), slice = (0, −sin30, cos30); the
    (first) slice centre is (10, −20, 30) mm LPS.
    """
    slice_dir = np.array([0.0, -SIN30, COS30])
    first = np.array([10.0, -20.0, 30.0])
    return Geometry(
        fov_mm=(8.0, 18.0, fov_z),
        matrix=(4, 6, z_matrix),
        position=first + np.arange(n_slices)[:, None] * spacing * slice_dir,
        read_dir=np.array([1.0, 0.0, 0.0]),
        phase_dir=np.array([0.0, COS30, SIN30]),
        slice_dir=slice_dir,
        slice_spacing_mm=spacing,
        frame_time_ms=frame_time_ms,
    )


def world(affine: np.ndarray, ijk: tuple[float, float, float]) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_oblique_affine_against_hand_computed_coordinates() -> None:
    aff = nifti_affine(oblique_30(), "2d", (1, 1, 6, 4))
    # Voxel (2, 3, 0) is the image centre (n // 2 on both axes): the slice position,
    # (10, -20, 30) LPS = (-10, 20, 30) RAS.
    assert np.allclose(world(aff, (2, 3, 0)), [-10.0, 20.0, 30.0])
    # Voxel (0, 0, 0) centre, LPS: (10, -20, 30) - 2·2·read - 3·3·phase
    #   = (10 - 4, -20 - 9·cos30, 30 - 9·sin30) = (6, -27.7942286, 25.5).
    assert np.allclose(world(aff, (0, 0, 0)), [-6.0, 27.7942286, 25.5])
    # Its outer corner (-0.5, -0.5, -0.5) is a further -(1·read + 1.5·phase + 1.5·slice)
    #   = -(1, 1.5·cos30 - 1.5·sin30, 1.5·sin30 + 1.5·cos30) = -(1, 0.5490381, 2.0490381),
    # i.e. (5, -28.3432667, 23.4509619) LPS.
    assert np.allclose(world(aff, (-0.5, -0.5, -0.5)), [-5.0, 28.3432667, 23.4509619])
    # Voxel (3, 5, 0): (10 + 2, -20 + 2·3·cos30, 30 + 2·3·sin30) = (12, -14.8038476, 33) LPS.
    assert np.allclose(world(aff, (3, 5, 0)), [-12.0, 14.8038476, 33.0])
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), [2.0, 3.0, 3.0])


def test_axial_identity_orientation_codes() -> None:
    geo = dataclasses.replace(oblique_30(), phase_dir=np.array([0.0, 1.0, 0.0]),
                              slice_dir=np.array([0.0, 0.0, 1.0]))
    aff = nifti_affine(geo, "2d", (1, 1, 6, 4))
    # LPS axes: i runs towards patient left, j towards posterior, k towards superior.
    assert nib.aff2axcodes(aff) == ("L", "P", "S")


def test_odd_matrix_centre() -> None:
    geo = dataclasses.replace(oblique_30(), matrix=(5, 7, 1), fov_mm=(10.0, 21.0, 3.0))
    aff = nifti_affine(geo, "2d", (1, 1, 7, 5))
    assert np.allclose(world(aff, (2, 3, 0)), [-10.0, 20.0, 30.0])  # 5 // 2, 7 // 2


def test_multislice_stacking_follows_positions() -> None:
    geo = oblique_30(n_slices=3, spacing=5.0)
    aff = nifti_affine(geo, "2d", (3, 1, 6, 4))
    for b in range(3):
        lps = geo.position[b]
        assert np.allclose(world(aff, (2, 3, b)), [-lps[0], -lps[1], lps[2]])
    assert np.linalg.norm(aff[:3, 2]) == pytest.approx(5.0)
    reversed_geo = dataclasses.replace(geo, position=geo.position[::-1])
    aff_rev = nifti_affine(reversed_geo, "2d", (3, 1, 6, 4))
    assert np.allclose(aff_rev[:3, 2], -aff[:3, 2])
    uneven = dataclasses.replace(geo, position=geo.position * np.array([[1.0], [1.0], [1.3]]))
    with pytest.warns(GeometryWarning, match="not evenly spaced"):
        nifti_affine(uneven, "2d", (3, 1, 6, 4))


def test_3d_partitions_about_the_slab_centre() -> None:
    geo = oblique_30(z_matrix=8, fov_z=16.0)
    aff = nifti_affine(geo, "3d", (1, 8, 6, 4))
    assert np.allclose(world(aff, (2, 3, 4)), [-10.0, 20.0, 30.0])  # D // 2 = 4
    # One partition (2 mm) along slice = (0, -sin30, cos30) LPS = (0, sin30, cos30) RAS.
    assert np.allclose(aff[:3, 2], [0.0, 2 * SIN30, 2 * COS30])
    with pytest.raises(ConfigError, match="slabs"):
        nifti_affine(geo, "3d", (2, 8, 6, 4))


def test_array_layout() -> None:
    data = np.arange(2 * 3 * 6 * 4).reshape(2, 3, 6, 4)  # (B, D, Y, X)
    t = nifti_array(data, "2dt")
    assert t.shape == (4, 6, 2, 3) and t[1, 2, 1, 0] == data[1, 0, 2, 1]
    v = nifti_array(data[:1], "3d")
    assert v.shape == (4, 6, 3) and v[3, 5, 2] == data[0, 2, 5, 3]
    s = nifti_array(data[:, :1], "2d")
    assert s.shape == (4, 6, 2) and s[0, 4, 1] == data[1, 0, 4, 0]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_read_round_trip(tmp_path: Path, rng: np.random.Generator, suffix: str) -> None:
    geo = oblique_30(n_slices=2, spacing=4.0)
    data = (rng.standard_normal((2, 1, 6, 4)) + 1j * rng.standard_normal((2, 1, 6, 4)))
    image = ImageVolume(data=data.astype(np.complex64), kind="2d", geometry=geo, method="sense")
    out = write_nifti(image, tmp_path / f"img{suffix}")
    arr, aff = read_nifti(out)
    assert arr.dtype == np.float32 and arr.shape == (4, 6, 2)
    assert np.allclose(arr, np.abs(data).astype(np.float32).transpose(3, 2, 0, 1)[..., 0])
    assert np.allclose(aff, nifti_affine(geo, "2d", data.shape))
    img = nib.load(out)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.get_qform(), aff, atol=1e-4)
    assert b"molrecon" in img.header["descrip"].item() and b"sense" in img.header["descrip"].item()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"img{suffix}"]  # no temp files left


def test_complex_output(tmp_path: Path, rng: np.random.Generator) -> None:
    data = (rng.standard_normal((1, 1, 6, 4)) + 1j * rng.standard_normal((1, 1, 6, 4)))
    image = ImageVolume(data=data.astype(np.complex64), kind="2d", geometry=oblique_30())
    arr, _ = read_nifti(write_nifti(image, tmp_path / "c.nii", complex_output=True))
    assert arr.dtype == np.complex64
    assert np.allclose(arr[..., 0], data[0, 0].T.astype(np.complex64))


def test_time_series_units(tmp_path: Path, rng: np.random.Generator) -> None:
    geo = oblique_30(frame_time_ms=42.5)
    data = rng.random((1, 5, 6, 4)).astype(np.float32)
    out = write_nifti(ImageVolume(data=data, kind="2dt", geometry=geo), tmp_path / "t.nii.gz")
    img = nib.load(out)
    assert img.shape == (4, 6, 1, 5)
    assert img.header.get_zooms() == pytest.approx((2.0, 3.0, 3.0, 42.5))
    assert img.header.get_xyzt_units() == ("mm", "msec")
    assert np.allclose(np.asarray(img.dataobj)[1, 2, 0, 3], data[0, 3, 2, 1])


def test_existing_output_and_bad_names(tmp_path: Path) -> None:
    image = ImageVolume(data=np.ones((1, 1, 6, 4), np.float32), kind="2d", geometry=oblique_30())
    out = write_nifti(image, tmp_path / "a.nii.gz")
    with pytest.raises(OutputError, match="already exists"):
        write_nifti(image, out)
    doubled = ImageVolume(data=2 * np.ones((1, 1, 6, 4), np.float32), kind="2d",
                          geometry=oblique_30())
    write_nifti(doubled, out, force=True)
    assert np.allclose(read_nifti(out)[0], 2.0)
    with pytest.raises(OutputError, match=r"\.nii or \.nii\.gz"):
        write_nifti(image, tmp_path / "a.png")


def test_read_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"\x00" * 10)
    for path, match in [(junk, "cannot read as NIfTI"), (tmp_path / "none.nii", "no such file"),
                        (tmp_path, "is not a file")]:
        with pytest.raises(InputDataError, match=match) as info:
            read_nifti(path)
        assert info.value.path == str(path)
