"""Previews: radiological orientation from the geometry, labels, 3D planes, 2D+time, PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from molrecon.errors import OutputError
from molrecon.io.nifti import nifti_affine
from molrecon.io.types import Geometry, ImageVolume
from molrecon.preview import (
    Panel,
    _Font,
    montage_png,
    orientation_for,
    plane_of,
    preview_panels,
    render_preview,
    write_preview,
    yx_orientation,
)

# Direction cosines are in the scanner's LPS frame (+x = L, +y = P, +z = S).
L, P, S = np.eye(3)
R, A, I = -L, -P, -S


def _rot(axis: np.ndarray, deg: float) -> np.ndarray:
    """Rotation matrix about a unit ``axis`` (Rodrigues)."""
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _geom(read, phase, normal, matrix=(32, 32, 1), fov=None, n_batch=1, known=True,
          frame_ms=None) -> Geometry:
    fov = fov or tuple(float(m) for m in matrix)
    pos = np.array([[5.0, -3.0, 12.0]]) + np.arange(n_batch)[:, None] * 4.0 * np.asarray(normal)
    return Geometry(fov_mm=fov, matrix=matrix, position=pos, read_dir=np.asarray(read, float),
                    phase_dir=np.asarray(phase, float), slice_dir=np.asarray(normal, float),
                    slice_spacing_mm=4.0, frame_time_ms=frame_ms, orientation_known=known)


def _octant_pattern(geom: Geometry, kind: str, shape: tuple[int, int, int, int],
                    weights: tuple[float, float, float] = (1.0, 2.0, 4.0)) -> np.ndarray:
    """1 + (R of centre) + 2·(anterior of centre) + 4·(superior of centre), per voxel
    (``weights`` replace 1, 2, 4).

    Every radiological view puts the positive RAS end of its axes at the left and top
    (axial R/A, coronal R/S, sagittal A/S), so a correctly oriented panel is brighter on
    its left half and its top half, by the weights of the axes it shows.
    """
    b_n, d_n, y_n, x_n = shape
    aff = nifti_affine(geom, kind, shape)
    k_n = d_n if kind == "3d" else b_n
    i, j, k = np.meshgrid(np.arange(x_n), np.arange(y_n), np.arange(k_n), indexing="ij")
    ras = np.einsum("ab,bxyz->axyz", aff[:3, :3], np.stack([i, j, k]).astype(float))
    centre = aff[:3, :3] @ np.array([x_n // 2, y_n // 2, k_n // 2], float)
    off = ras - centre[:, None, None, None]
    wr, wa, ws = weights
    val = 1.0 + wr * (off[0] > 1e-6) + wa * (off[1] > 1e-6) + ws * (off[2] > 1e-6)  # (X, Y, K)
    if kind == "3d":
        return val.transpose(2, 1, 0)[None]                       # (1, D, Y, X)
    return np.repeat(val.transpose(2, 1, 0)[:, None], d_n, axis=1)  # (B, D, Y, X)


def _halves(img: np.ndarray) -> tuple[float, float]:
    """(left − right, top − bottom) mean differences."""
    h, w = img.shape
    return (float(img[:, : w // 2].mean() - img[:, w - w // 2:].mean()),
            float(img[: h // 2].mean() - img[h - h // 2:].mean()))


CASES_2D = {
    # name: (read, phase, normal, plane, (left-right weight, top-bottom weight))
    "axial": (L, P, S, "axial", (1, 2)),
    "axial_flipped": (R, A, S, "axial", (1, 2)),
    "coronal": (L, S, P, "coronal", (1, 4)),
    "sagittal": (P, S, L, "sagittal", (2, 4)),
    "sagittal_transposed": (I, A, R, "sagittal", (2, 4)),
    "siemens_axial_readout_AP": (P, R, S, "axial", (1, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES_2D))
def test_planes_shown_radiologically(name):
    read, phase, normal, plane, (lr, tb) = CASES_2D[name]
    geom = _geom(read, phase, normal)
    vol = ImageVolume(_octant_pattern(geom, "2d", (1, 1, 32, 32)), "2d", geom)
    (panel,) = preview_panels(vol, "mol")
    assert panel.title == f"mol · {plane}"
    d_lr, d_tb = _halves(panel.image)
    assert d_lr == pytest.approx(lr, rel=0.1) and d_tb == pytest.approx(tb, rel=0.1)
    assert panel.letters == {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"),
                             "sagittal": ("S", "I", "A", "P")}[plane]


def test_oblique_axial_snaps_to_axial():
    rot = _rot(S, 20.0) @ _rot(L, 15.0)          # 20° in-plane, tilted 15° towards coronal
    geom = _geom(rot @ L, rot @ P, rot @ S)
    # no S weight: the tilt makes the top of an axial view inferior as well as anterior
    vol = ImageVolume(_octant_pattern(geom, "2d", (1, 1, 32, 32), (1.0, 2.0, 0.0)), "2d", geom)
    (panel,) = preview_panels(vol, "sense")
    assert "axial" in panel.title
    d_lr, d_tb = _halves(panel.image)
    assert d_lr > 0.4 and d_tb > 1.0             # R on the left, anterior at the top


def test_siemens_like_axial_is_turned_by_90_degrees():
    """Readout A→P (rows of the raw array run left→right across the patient): the raw
    top-left corner is anterior-left, so it must show at the top right."""
    tilt = _rot(R, 2.2)                           # the real file's small tilt
    geom = _geom(tilt @ P, R, tilt @ S, matrix=(40, 32, 1), fov=(200.0, 160.0, 4.0))
    raw = np.zeros((1, 1, 32, 40), np.float32)
    raw[0, 0, :8, :10] = 1.0
    (panel,) = preview_panels(ImageVolume(raw, "2d", geom), "mol")
    assert np.array_equal(panel.image, raw[0, 0].T[:, ::-1])
    h, w = panel.image.shape
    assert panel.image[: h // 2, w // 2:].sum() == raw.sum()        # top right quadrant
    assert panel.pixel_mm == (5.0, 5.0) and panel.letters[2:] == ("R", "L")
    assert yx_orientation(ImageVolume(raw, "2d", geom)).transpose


def test_unknown_orientation_keeps_raw_array():
    geom = Geometry.default((24, 16, 1))
    raw = np.random.default_rng(0).random((1, 1, 16, 24)).astype(np.float32)
    (panel,) = preview_panels(ImageVolume(raw, "2d", geom), "zf")
    assert np.array_equal(panel.image, raw[0, 0])
    assert panel.title == "zf · orientation unknown" and panel.letters == ("", "", "", "")


def test_plane_helpers():
    assert plane_of(np.array([0.1, -0.9, 0.3])) == "coronal"
    o = orientation_for(np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0]))  # rows S, cols R
    assert (o.plane, o.transpose, o.flip_rows, o.flip_cols) == ("coronal", False, True, True)


def test_multislice_shows_middle_slice_labelled():
    geom = _geom(L, P, S, n_batch=5)
    raw = np.zeros((5, 1, 16, 16), np.float32)
    raw[2, 0, 3, 4] = 7.0
    (panel,) = preview_panels(ImageVolume(raw, "2d", geom), "mol")
    assert panel.title == "mol · axial · slice 3/5"
    assert panel.image[3, 4] == 7.0 and panel.image.sum() == 7.0


def test_3d_three_planes_with_voxel_aspect():
    shape = (1, 16, 64, 48)                       # 4 mm partitions, 1 mm in plane
    geom = _geom(L, P, S, matrix=(48, 64, 16), fov=(48.0, 64.0, 64.0))
    vol = ImageVolume(_octant_pattern(geom, "3d", shape), "3d", geom)
    panels = preview_panels(vol, "mol")
    assert [p.title for p in panels] == ["mol · axial · partition 9/16",
                                         "mol · coronal · line 33/64",
                                         "mol · sagittal · readout 25/48"]
    assert [p.image.shape for p in panels] == [(64, 48), (16, 48), (16, 64)]
    assert [p.extent_mm for p in panels] == [(64.0, 48.0), (64.0, 48.0), (64.0, 64.0)]
    for p, weights in zip(panels, [(1, 2), (1, 4), (2, 4)]):
        assert _halves(p.image) == pytest.approx(weights, rel=0.15), p.title
    png = Image.open(io.BytesIO(render_preview([panels, panels])))
    # one scale for all panels: 4 px/mm, so the 64 mm side is 256 px
    assert png.size[0] == pytest.approx(48 * 4 + 48 * 4 + 64 * 4 + 2 * 6, abs=2)
    assert 2 * 256 < png.size[1] < 2 * 256 + 120


def test_oblique_sagittal_3d_assigns_three_distinct_planes():
    rot = _rot(S, 30.0) @ _rot(P, 10.0)
    shape = (1, 20, 24, 28)
    geom = _geom(rot @ P, rot @ S, rot @ L, matrix=(28, 24, 20), fov=(28.0, 24.0, 40.0))
    vol = ImageVolume(_octant_pattern(geom, "3d", shape), "3d", geom)
    panels = preview_panels(vol, "mol")
    assert [p.title.split(" · ")[1] for p in panels] == ["axial", "coronal", "sagittal"]
    assert panels[2].title.endswith("partition 11/20")  # the slab's own plane is sagittal
    for p in panels:
        d_lr, d_tb = _halves(p.image)
        assert d_lr > 0.3 and d_tb > 0.3, p.title


def test_3d_single_readout_position_shows_one_plane():
    geom = Geometry.default((1, 12, 20))
    raw = np.random.default_rng(1).random((1, 20, 12, 1)).astype(np.float32)
    (panel,) = preview_panels(ImageVolume(raw, "3d", geom), "mol")
    assert np.array_equal(panel.image, raw[0, :, :, 0])
    assert "readout 1/1" in panel.title and "orientation unknown" in panel.title


def test_2dt_middle_frame_and_profile():
    n_t = 12
    geom = _geom(L, P, S, frame_ms=50.0)
    raw = np.zeros((1, n_t, 32, 32), np.float32)
    for t in range(n_t):
        raw[0, t, 14:18, 2 + 2 * t] = 1.0          # a bar moving towards the patient's left
    frame, profile = preview_panels(ImageVolume(raw, "2dt", geom), "mol")
    assert frame.title == "mol · axial · frame 7/12" and frame.tick_row == 16
    assert np.array_equal(frame.image, raw[0, 6])
    assert profile.title == "mol · R-L profile vs time"
    assert profile.image.shape == (n_t, 32)
    assert [int(np.argmax(row)) for row in profile.image] == [2 + 2 * t for t in range(n_t)]
    assert profile.letters == ("frame 1", "frame 12 (0.55 s)", "R", "L")
    assert profile.extent_mm == pytest.approx(frame.extent_mm)


def test_write_preview_png(tmp_path):
    geom = _geom(P, R, S, matrix=(64, 64, 1), fov=(200.0, 200.0, 4.0))
    rng = np.random.default_rng(2)
    vols = [(name, ImageVolume(rng.random((1, 1, 64, 64)).astype(np.float32) * s, "2d", geom))
            for name, s in (("zf", 1.0), ("sense", 2.0), ("mol", 3.0))]
    out = write_preview(tmp_path / "p.png", vols)
    png = Image.open(out)
    png.load()
    # one row of three 384-px panels (64 px zoomed ×6), titles above
    assert png.mode == "RGB" and png.size[0] == 3 * 384 + 2 * 6
    assert 384 < png.size[1] < 384 + 60
    with pytest.raises(OutputError):
        write_preview(tmp_path / "p.png", vols)     # no overwrite without force
    write_preview(tmp_path / "p.png", vols, force=True)


def test_rendered_png_has_block_where_expected():
    """End to end through the PNG: Siemens-like raw top-left block → top-right of the panel."""
    geom = _geom(P, R, S, matrix=(64, 64, 1), fov=(200.0, 200.0, 4.0))
    raw = np.zeros((1, 1, 64, 64), np.float32)
    raw[0, 0, :24, :24] = 1.0
    png = np.asarray(Image.open(io.BytesIO(render_preview(
        [preview_panels(ImageVolume(raw, "2d", geom), "mol")]))).convert("L"), float)
    h, w = png.shape
    body = png[h - 384:]                              # the image below the title
    assert body[:150, w - 150:].mean() > 200 and body[:150, :150].mean() < 60


def test_shared_window_and_legacy_montage():
    a, b = np.ones((8, 8)), 0.5 * np.ones((8, 8))
    own = np.asarray(Image.open(io.BytesIO(montage_png([("a", a), ("b", b)], scale=4))).convert("L"))
    shared = np.asarray(Image.open(io.BytesIO(
        montage_png([("a", a), ("b", b)], scale=4, shared_window=True))).convert("L"))
    assert own.shape == (own.shape[0], 2 * 32 + 6)
    assert own[-2, -2] == 255 and 120 < shared[-2, -2] < 135


def test_labels_legible():
    font = _Font(15)
    assert font.size("mol · axial · slice 3/5")[1] >= 12
    assert font.line_height >= 15
    with pytest.raises(ValueError):
        render_preview([])
    with pytest.raises(ValueError):
        render_preview([[Panel("x", np.zeros((0, 3)))]])


@pytest.mark.parametrize("name", [*sorted(CASES_2D), "oblique"])
def test_agrees_with_nibabel_canonical_view(name):
    """Cross-check with nibabel: reorder the NIfTI array to its closest canonical RAS+
    layout and read it the radiological way; the preview must show the same pixels."""
    nib = pytest.importorskip("nibabel")
    if name == "oblique":
        rot = _rot(S, 20.0) @ _rot(P, 10.0)
        read, phase, normal, plane = rot @ P, rot @ S, rot @ L, "sagittal"
    else:
        read, phase, normal, plane = CASES_2D[name][:4]
    geom = _geom(read, phase, normal, matrix=(20, 14, 1), fov=(40.0, 28.0, 4.0))
    raw = np.random.default_rng(3).random((1, 1, 14, 20)).astype(np.float32)
    aff = nifti_affine(geom, "2d", raw.shape)
    ornt = nib.orientations.io_orientation(aff)
    can = nib.orientations.apply_orientation(raw[0, 0].T[:, :, None], ornt)   # (R, A, S)+
    view = {"axial": lambda c: c[::-1, ::-1, 0].T,      # rows A→P, cols R→L
            "coronal": lambda c: c[::-1, 0, ::-1].T,    # rows S→I, cols R→L
            "sagittal": lambda c: c[0, ::-1, ::-1].T}[plane](can)
    (panel,) = preview_panels(ImageVolume(raw, "2d", geom), "mol")
    assert plane in panel.title
    assert np.array_equal(panel.image, view)
