"""The procedural torso: a cine-like chest whose left ventricle beats in 2D+time scans."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from molrecon.sim import (
    SPLITS,
    AnatomyTransform,
    SimulationConfig,
    anatomy_landmarks,
    dataset_plan,
    load_anatomy,
    simulate,
)
from molrecon.sim.coils import _CoilArray
from molrecon.sim.image import _PlacedAnatomy
from molrecon.sim.torso import BODY_SEMI_AXES_MM, HEART_AXIS_MM, VOXEL_MM, torso_volume

# A short-axis cine slice through the mid ventricle (validation level), 2.5 mm pixels.
CINE = SimulationConfig(kind="2dt", anatomy="torso", matrix=(128, 96), fov_mm=(320.0, 240.0),
                        frames=8, coils=4, acceleration=1.0, noise=0.0, slice_position=0.6,
                        motion_mm=0.0, contraction=0.45, seed=5)


def test_torso_has_cine_contrast_where_its_heart_is() -> None:
    vol, voxel = load_anatomy("torso")
    assert voxel == (VOXEL_MM,) * 3 and not vol.flags.writeable
    assert 0.0 <= vol.min() and vol.max() == pytest.approx(1.0)
    hx, hy = anatomy_landmarks("torso")["heart_axis"]
    k = int(0.6 * vol.shape[2])
    step = 1.0 / VOXEL_MM                                  # voxels per mm
    blood = vol[round(hx), round(hy), k]                   # the left ventricle's blood pool
    wall = vol[round(hx - 28 * step), round(hy), k]        # its lateral wall, 28 mm out
    lung = vol[round(hx - 75 * step), round(hy), k]        # the left lung beyond it
    assert blood > 0.75 and 0.15 < wall < 0.4 and lung < 0.1
    assert anatomy_landmarks("colin27") == {}
    again, _ = torso_volume()
    assert np.array_equal(torso_volume()[0], again)        # generated the same every time


def test_datasets_draw_the_torso_only_when_asked() -> None:
    brain = SimulationConfig(kind="2dt", matrix=(64, 64), frames=4, acceleration=1.0)
    for split in SPLITS:
        assert all(c.anatomy != "torso" for c, _ in dataset_plan(brain, 40, split))
        chest = dataset_plan(replace(brain, anatomy="torso"), 6, split)
        assert {c.anatomy for c, _ in chest} == {"torso"}
        assert all(s.split == split for _, s in chest)


def test_placed_anatomy_maps_an_index_back_to_its_position() -> None:
    transform = AnatomyTransform(rotation_deg=9.0, flip_lr=True)
    anat = _PlacedAnatomy("torso", transform, np.array([0.0, 0.0, 1.0]))
    idx = np.array([101.0, 87.0, 50.0])
    p = anat.lps_of_index(idx)
    value = anat.sample(tuple(np.array([v], dtype=np.float64) for v in p))[0]
    assert value == pytest.approx(float(anat.volume[101, 87, 50]), abs=1e-5)


def test_coils_sit_outside_the_body() -> None:
    rng = np.random.default_rng(0)
    a, b = BODY_SEMI_AXES_MM
    for n in (4, 8, 16):
        xy = _CoilArray.random(n, rng, body=BODY_SEMI_AXES_MM).xy
        # 10 mm clearance minus the array's off-centring (at most 12 mm)
        assert np.all((np.abs(xy[:, 0]) + 12.0 >= a) | (np.abs(xy[:, 1]) + 12.0 >= b) |
                      ((xy[:, 0] / a) ** 2 + (xy[:, 1] / b) ** 2 > 1.0))
        assert np.all((xy[:, 0] / (a + 60)) ** 2 + (xy[:, 1] / (b + 60)) ** 2 < 1.0)


def _blood_area(frames: np.ndarray, centre: tuple[int, int], radius_px: int,
                inside: bool) -> np.ndarray:
    """Pixels brighter than half the maximum, per frame, within (or beyond) ``radius_px``."""
    t, ny, nx = frames.shape
    yy, xx = np.mgrid[:ny, :nx]
    near = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius_px ** 2
    region = near if inside else ~near
    return ((frames > 0.5 * frames.max()) & region).sum(axis=(1, 2))


def test_the_ventricle_contracts_and_the_rest_stays() -> None:
    still = np.abs(simulate(replace(CINE, contraction=0.0)).truth.data)[0]
    beat = np.abs(simulate(CINE).truth.data)[0]
    assert np.allclose(still, still[0:1], atol=1e-6)        # no motion: identical frames
    # The heart in the image: the brightest blob of the still frame near the axis. The
    # displayed image is radiological (patient left on the right), rows anterior first.
    ny, nx = still.shape[1:]
    col = round(nx / 2 - HEART_AXIS_MM[0] / 2.5)
    row = round(ny / 2 - HEART_AXIS_MM[1] / 2.5)
    assert still[0, row, col] > 0.7 * still.max()           # the blood pool is where it should be
    near = _blood_area(beat, (row, col), 11, inside=True)   # within 27 mm of the axis
    far = _blood_area(beat, (row, col), 36, inside=False)   # beyond 90 mm
    mid = CINE.frames // 2
    assert near[mid] < 0.75 * near[0]                       # systole: the pool shrinks by > 25 %
    assert abs(int(far[mid]) - int(far[0])) <= 0.02 * far[0]   # fat, aorta, spine do not move
    assert np.allclose(beat[0], still[0], atol=1e-6)        # frame 0 is end-diastole
