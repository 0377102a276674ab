"""Raw-data simulation: file round trips, truth, noise, masks, determinism, anatomy and splits."""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import have
from molrecon.errors import ConfigError, InputDataError, OutputError
from molrecon.io.detect import read_raw
from molrecon.io.ismrmrd import read_ismrmrd
from molrecon.io.nifti import nifti_affine
from molrecon.sim import (
    SPLITS,
    AnatomyTransform,
    SimulationConfig,
    anatomy_available,
    anatomy_extent,
    anatomy_sources,
    anatomy_subjects,
    dataset_plan,
    load_anatomy,
    simulate,
    simulate_dataset,
    simulate_to_file,
)

SMALL = SimulationConfig(kind="2d", matrix=(64, 64), coils=4, acceleration=4.0, acs=8, seed=3)
SMALL_3D = SimulationConfig(kind="3d", matrix=(48, 48, 12), fov_mm=(240.0, 240.0, 36.0),
                            coils=4, acceleration=3.0, acs=8, seed=3)
SMALL_2DT = SimulationConfig(kind="2dt", matrix=(64, 64), coils=4, frames=6, acceleration=3.0,
                             acs=8, seed=3)


def _ifft(k: np.ndarray, kind: str) -> np.ndarray:
    axes = (-3, -2, -1) if kind == "3d" else (-2, -1)
    return np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(k, axes=axes), axes=axes, norm="ortho"),
                           axes=axes)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.abs(a).ravel(), np.abs(b).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _nrmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------- file round trips

@pytest.mark.parametrize("config", [SMALL, SMALL_3D, SMALL_2DT], ids=["2d", "3d", "2dt"])
def test_file_reads_back_with_shapes_kind_mask_and_geometry(tmp_path: Path,
                                                            config: SimulationConfig) -> None:
    out = tmp_path / "scan.h5"
    sim = simulate_to_file(config, out)
    scan = read_raw(out)
    x, y, z = config.grid
    d = z if config.kind == "3d" else config.n_frames
    assert scan.kind == config.kind
    assert scan.shape == (1, config.coils, d, y, x)          # readout oversampling removed
    assert sim.kspace.shape == (1, config.coils, d, y, 2 * x)
    assert scan.info.readout_oversampling == pytest.approx(2.0)
    assert np.array_equal(scan.mask, sim.mask)
    assert abs(scan.acceleration - config.acceleration) / config.acceleration < 0.03
    assert np.array_equal(scan.calib, sim.calib) and sim.calib.any()
    g, t = scan.geometry, sim.truth.geometry
    assert g.matrix == t.matrix and np.allclose(g.fov_mm, t.fov_mm)
    for a, b in [(g.position, t.position), (g.read_dir, t.read_dir),
                 (g.phase_dir, t.phase_dir), (g.slice_dir, t.slice_dir)]:
        assert np.allclose(a, b, atol=1e-6)
    assert g.slice_spacing_mm == pytest.approx(t.slice_spacing_mm, rel=1e-6)
    # the truth lands on the same NIfTI voxel grid as a reconstruction of the file
    assert np.allclose(nifti_affine(g, scan.kind, sim.truth.data.shape),
                       nifti_affine(t, sim.kind, sim.truth.data.shape), atol=1e-4)
    assert sim.truth.data.shape == (1, d, y, x)
    if config.kind == "2dt":
        assert g.frame_time_ms == pytest.approx(config.frame_time_ms)


def test_multislice_stack_positions_and_spacing(tmp_path: Path) -> None:
    cfg = replace(SMALL, slices=3, slice_thickness_mm=4.0, slice_gap=0.5)
    sim = simulate_to_file(cfg, tmp_path / "ms.h5")
    scan = read_raw(tmp_path / "ms.h5")
    assert scan.shape[0] == 3 and sim.truth.data.shape == (3, 1, 64, 64)
    steps = np.diff(scan.geometry.position @ scan.geometry.slice_dir)
    assert np.allclose(steps, 6.0, atol=1e-4)
    assert scan.geometry.slice_spacing_mm == pytest.approx(6.0, abs=1e-4)
    # different slices show different anatomy
    assert _nrmse(np.abs(sim.truth.data[0]), np.abs(sim.truth.data[2])) > 0.05


def test_noise_scan_matches_the_simulated_covariance(tmp_path: Path) -> None:
    cfg = replace(SMALL, coils=6, noise=0.05)
    sim = simulate_to_file(cfg, tmp_path / "n.h5")
    scan = read_raw(tmp_path / "n.h5")
    assert scan.noise_cov is not None and scan.whitened
    # 4096 samples: the estimate is within a few per cent
    assert _nrmse(scan.noise_cov, sim.noise_cov) < 0.1
    diag = np.sqrt(np.real(np.diag(sim.noise_cov)))
    corr = np.abs(sim.noise_cov) / np.outer(diag, diag)
    off = corr[~np.eye(6, dtype=bool)]
    assert 0.1 <= off.max() <= 0.35                  # correlated coils, like a real array
    # the noise in the k-space has the same statistics as the noise scan
    clean = simulate(replace(cfg, noise=0.0))
    n = (sim.kspace - clean.kspace)[0, :, 0][:, sim.mask[0, 0, 0, :, 0]].reshape(6, -1)
    emp = n @ n.conj().T / n.shape[1]
    assert _nrmse(emp, sim.noise_cov) < 0.1


@pytest.mark.parametrize("config", [SMALL, SMALL_3D, SMALL_2DT], ids=["2d", "3d", "2dt"])
def test_fully_sampled_rss_matches_the_truth(tmp_path: Path, config: SimulationConfig) -> None:
    cfg = replace(config, acceleration=1.0)
    sim = simulate_to_file(cfg, tmp_path / "full.h5")
    scan = read_raw(tmp_path / "full.h5")                       # prewhitened
    rss = np.sqrt(np.sum(np.abs(_ifft(scan.kspace, scan.kind)) ** 2, axis=1))   # (B, D, Y, X)
    assert _ncc(rss, sim.truth.data) > 0.98
    # without noise and whitening, RSS and SENSE combination equal the truth up to the
    # smoothing of the coil maps by the k-space window
    clean = replace(cfg, noise=0.0)
    simulate_to_file(clean, tmp_path / "clean.h5")
    raw = read_ismrmrd(tmp_path / "clean.h5", prewhiten=False)
    coil_images = _ifft(raw.kspace, raw.kind)                   # (B, C, D, Y, X)
    truth = simulate(clean).truth.data
    rss = np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=1))
    sense = np.sum(np.conj(sim.maps) * coil_images, axis=1)
    assert _nrmse(rss, np.abs(truth)) < 0.01
    assert _nrmse(sense, truth) < 0.02
    assert np.abs(truth).max() == pytest.approx(1.0, abs=0.35)  # anatomy units, ~1 in tissue


def test_in_memory_raw_matches_the_file(tmp_path: Path) -> None:
    sim = simulate_to_file(SMALL, tmp_path / "a.h5")
    file_scan = read_ismrmrd(tmp_path / "a.h5", prewhiten=False)
    mem = sim.raw()
    assert mem.shape == file_scan.shape and not mem.whitened
    assert _nrmse(mem.kspace, file_scan.kspace) < 1e-5
    assert mem.ground_truth is not None and mem.ground_truth.shape == (1, 1, 64, 64)


def test_sense_with_the_true_maps_recovers_the_truth() -> None:
    """The data, the maps and the truth are one consistent model (but not a discrete copy)."""
    sim = simulate(replace(SMALL, coils=8, acceleration=2.0, noise=0.0))
    raw = sim.raw()
    maps = sim.maps[0, :, 0].astype(np.complex128)                  # (C, Y, X)
    mask = raw.mask[0, 0, 0].astype(np.float64)                      # (Y, 1)

    def fwd(x: np.ndarray) -> np.ndarray:
        return mask * np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(maps * x, axes=(-2, -1)),
                                                  norm="ortho"), axes=(-2, -1))

    def adj(k: np.ndarray) -> np.ndarray:
        return np.sum(np.conj(maps) * _ifft(mask * k, "2d"), axis=0)

    b = adj(raw.kspace[0, :, 0].astype(np.complex128))
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rs = np.vdot(r, r).real
    for _ in range(40):                                               # CG on A^H A x = A^H y
        ap = adj(fwd(p))
        step = rs / np.vdot(p, ap).real
        x += step * p
        r -= step * ap
        rs_new = np.vdot(r, r).real
        p = r + (rs_new / rs) * p
        rs = rs_new
    truth = sim.truth.data[0, 0]
    zero_filled = np.sqrt(np.sum(np.abs(_ifft(raw.kspace[0, :, 0], "2d")) ** 2, axis=0))
    assert _nrmse(x, truth) < 0.03                                  # measured 0.020
    assert _nrmse(zero_filled, np.abs(truth)) > 0.1                  # the aliasing is real


def test_default_acs_leaves_room_for_outer_lines() -> None:
    assert SimulationConfig(matrix=(256, 256), acceleration=4.0).acs_lines == 20
    assert SimulationConfig(matrix=(64, 64), acceleration=8.0).acs_lines == 4
    cfg = SimulationConfig(kind="3d", matrix=(32, 32, 8), acceleration=6.0)
    assert cfg.acs_lines * min(cfg.acs_lines, 8) <= round(32 * 8 / 6.0) // 2
    sim = simulate(replace(SMALL, acs=None, acceleration=8.0))
    assert (sim.mask & ~sim.calib).any()


# --------------------------------------------------------------------------- realism

def test_maps_are_normalised_smooth_and_distinct() -> None:
    sim = simulate(replace(SMALL, coils=8))
    maps = sim.maps[0, :, 0]                                      # (C, Y, X)
    assert np.allclose(np.sum(np.abs(maps) ** 2, axis=0), 1.0, atol=1e-4)
    # smooth over the object: neighbouring pixels (3.75 mm apart) differ little
    tissue = np.abs(sim.truth.data[0, 0]) > 0.1
    step = np.abs(np.diff(maps, axis=-1))[:, tissue[:, 1:] & tissue[:, :-1]]
    assert np.median(step) < 0.02 and step.max() < 0.15
    # coils see different regions: the brightest pixel of each map differs
    peaks = {int(np.argmax(np.abs(m))) for m in maps}
    assert len(peaks) == 8


def test_image_phase_is_smooth_but_not_flat() -> None:
    sim = simulate(replace(SMALL, noise=0.0))
    t = sim.truth.data[0, 0]
    tissue = np.abs(t) > 0.3 * np.abs(t).max()
    phase = np.angle(t)
    assert np.ptp(np.unwrap(phase[tissue])) > 0.3 or np.std(phase[tissue]) > 0.1
    both = tissue[:, 1:] & tissue[:, :-1]
    step = np.abs(np.angle(t[:, 1:] * np.conj(t[:, :-1])))[both]
    assert np.median(step) < 0.2


def test_no_inverse_crime_the_fine_grid_matters() -> None:
    fine = simulate(replace(SMALL, noise=0.0)).truth.data
    coarse = simulate(replace(SMALL, noise=0.0, grid_factor=1)).truth.data
    err = _nrmse(np.abs(coarse), np.abs(fine))
    assert 0.005 < err < 0.3


def test_motion_is_smooth_and_periodic() -> None:
    cfg = replace(SMALL_2DT, frames=8, motion_period=4.0, noise=0.0, acceleration=1.0)
    truth = np.abs(simulate(cfg).truth.data[0])                 # (T, Y, X)
    assert _nrmse(truth[2], truth[0]) > 0.05                    # peak of the cycle moved
    assert np.allclose(truth[4], truth[0], atol=1e-5)           # back after one period
    assert _nrmse(truth[1], truth[0]) < _nrmse(truth[2], truth[0])


def test_interleaved_2dt_file_fills_kspace_over_frames(tmp_path: Path) -> None:
    simulate_to_file(replace(SMALL_2DT, frames=8, acceleration=4.0), tmp_path / "t.h5")
    scan = read_raw(tmp_path / "t.h5")
    assert scan.mask[0, 0, :, :, 0].any(axis=0).all()
    assert not np.array_equal(scan.mask[0, 0, 0], scan.mask[0, 0, 1])


def test_3d_uses_a_poisson_mask_with_a_calibration_box() -> None:
    sim = simulate(SMALL_3D)
    m = sim.mask[0, 0, :, :, 0]                                   # (kz, ky)
    assert m.shape == (12, 48)
    assert abs(m.size / m.sum() - 3.0) / 3.0 < 0.03
    assert sim.calib[0, 0, :, :, 0].sum() == 8 * 8
    assert not m.all(axis=0).any() or not m.all(axis=1).any()    # truly 2D undersampling


def test_oblique_geometry_is_right_handed_and_stored() -> None:
    sim = simulate(replace(SMALL, orientation="coronal", tilt_deg=20.0))
    g = sim.geometry
    assert np.allclose(np.cross(g.read_dir, g.phase_dir), g.slice_dir, atol=1e-6)
    assert abs(float(g.slice_dir @ np.array([0.0, -1.0, 0.0]))) == pytest.approx(
        np.cos(np.radians(20.0)), abs=1e-6)
    assert np.abs(sim.truth.data).max() > 0.3                     # the slice hits the head


# --------------------------------------------------------------------------- determinism

def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b = simulate(SMALL), simulate(SMALL)
    assert np.array_equal(a.kspace, b.kspace) and np.array_equal(a.noise, b.noise)
    assert np.array_equal(a.mask, b.mask)
    c = simulate(replace(SMALL, seed=4))
    assert not np.allclose(c.maps, a.maps)
    # independent random streams: another acceleration changes the mask, not coils or noise
    d = simulate(replace(SMALL, acceleration=2.0))
    both = (a.mask & d.mask)[0, 0, 0, :, 0]
    assert np.array_equal(d.kspace[..., both, :], a.kspace[..., both, :])


# --------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("changes,match", [
    ({"coils": 0}, "coils"),
    ({"kind": "4d"}, "unknown kind"),
    ({"matrix": (64, 64, 8)}, "matrix"),
    ({"kind": "3d", "matrix": (64, 64)}, "matrix"),
    ({"acceleration": 0.5}, "acceleration"),
    ({"acs": 100}, "exceeds"),
    ({"mask": "poisson"}, "does not apply"),
    ({"slices": 2, "kind": "2dt"}, "several slices"),
    ({"frames": 4}, "frames are for 2dt"),
    ({"anatomy": "elephant"}, "unknown anatomy"),
    ({"slice_position": 1.5}, "slice position"),
    ({"noise": -0.1}, "noise"),
    ({"tilt_deg": 95.0}, "tilt"),
    ({"matrix": (2048, 2048), "grid_factor": 4, "oversampling": 3}, "grid would hold"),
])
def test_config_rejects_impossible_requests(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(SMALL, **changes)


def test_acceleration_too_high_for_the_acs_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ACS"):
        simulate(replace(SMALL, acceleration=16.0, acs=16))


def test_transform_validation_and_effect() -> None:
    with pytest.raises(ConfigError):
        AnatomyTransform(gamma=0.0)
    with pytest.raises(ConfigError):
        AnatomyTransform(curve=(0.5, 0.2))
    base = np.abs(simulate(replace(SMALL, noise=0.0)).truth.data[0, 0])
    flipped = np.abs(simulate(replace(SMALL, noise=0.0,
                                      transform=AnatomyTransform(flip_lr=True))).truth.data[0, 0])
    # a left-right flip about the isocentre mirrors the readout (L-R) axis of an axial slice
    # (pixel i lies at (i - 32) * dx, so its mirror image is pixel 64 - i)
    assert _nrmse(flipped[:, :0:-1], base[:, 1:]) < 0.02
    assert _nrmse(flipped, base) > 0.1


# --------------------------------------------------------------------------- outputs

def test_outputs_are_checked_before_work_and_written_together(tmp_path: Path) -> None:
    out = tmp_path / "x.h5"
    out.write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        simulate_to_file(SMALL, out, tmp_path / "t.nii.gz")
    assert out.read_bytes() == b"keep" and not (tmp_path / "t.nii.gz").exists()
    with pytest.raises(OutputError, match=".nii"):
        simulate_to_file(SMALL, tmp_path / "y.h5", tmp_path / "t.png")
    assert not (tmp_path / "y.h5").exists()
    simulate_to_file(SMALL, out, tmp_path / "t.nii.gz", force=True)
    with h5py.File(out) as f:
        assert "dataset" in f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.nii.gz", "x.h5"]


# --------------------------------------------------------------------------- anatomy

def test_bundled_anatomy_and_notice() -> None:
    vol, voxel = load_anatomy("colin27")
    assert vol.dtype == np.float32 and vol.ndim == 3 and voxel == (1.0, 1.0, 1.0)
    assert 0.0 <= vol.min() and vol.max() == pytest.approx(1.0)
    assert not vol.flags.writeable
    lo, hi = anatomy_extent("colin27")
    assert hi[2] - lo[2] > 150                                     # a whole head, 1 mm voxels
    folder = Path(__file__).resolve().parents[2] / "src" / "molrecon" / "data" / "anatomy"
    notice = (folder / "NOTICE").read_text()
    assert "Montreal Neurological Institute" in notice and "BSD" in notice
    assert sum(p.stat().st_size for p in folder.iterdir()) < 4 * 2**20


def test_every_source_loads_or_says_it_is_not_installed() -> None:
    for src in anatomy_sources():
        if anatomy_available(src.name):
            vol, voxel = load_anatomy(src.name)
            assert 0.0 <= vol.min() <= vol.max() <= 1.0 and min(voxel) > 0
            assert (vol.shape[2] == 1) == src.planar
        else:
            with pytest.raises(InputDataError, match="not installed"):
                load_anatomy(src.name)
    with pytest.raises(ConfigError, match="unknown anatomy"):
        load_anatomy("nope")


def test_splits_are_disjoint_and_complete() -> None:
    by_source: dict[str, list[tuple[str, float, float]]] = {}
    for s in anatomy_subjects():
        for a, b in s.slabs:
            assert 0.0 <= a < b <= 1.0
            by_source.setdefault(s.source, []).append((s.split, a, b))
    for slabs in by_source.values():
        for i, (sa, a0, a1) in enumerate(slabs):
            for sb, b0, b1 in slabs[i + 1:]:
                if sa != sb:    # slabs of different splits never overlap, with a gap
                    assert a1 + 0.03 <= b0 or b1 + 0.03 <= a0
    for split in SPLITS:
        assert any(s.source == "colin27" for s in anatomy_subjects(split, available_only=True))
    with pytest.raises(ConfigError):
        anatomy_subjects("holdout")


def test_dataset_plan_keeps_each_split_in_its_slabs() -> None:
    cfg = replace(SMALL, acceleration=1.0)
    for split in SPLITS:
        plans = dataset_plan(cfg, 12, split)
        assert plans == dataset_plan(cfg, 12, split)              # deterministic
        for c, subject in plans:
            assert subject.split == split
            if anatomy_available(c.anatomy) and load_anatomy(c.anatomy)[0].shape[2] != 1:
                half = 0.5 * c.slice_thickness_mm / (
                    anatomy_extent(c.anatomy)[1][2] - anatomy_extent(c.anatomy)[0][2])
                assert any(a - 1e-9 <= c.slice_position - half and
                           c.slice_position + half <= b + 1e-9 for a, b in subject.slabs)
        assert len({c.seed for c, _ in plans}) == 12
    with pytest.raises(ConfigError, match="axial"):
        dataset_plan(replace(cfg, orientation="sagittal"), 2, "train")
    thick = replace(SMALL_3D, fov_mm=(240.0, 240.0, 60.0), acceleration=1.0)
    with pytest.raises(ConfigError, match="stack"):
        dataset_plan(thick, 2, "val")


def test_simulate_dataset_writes_files_truths_and_manifest(tmp_path: Path) -> None:
    cfg = replace(SMALL, acceleration=1.0, anatomy="colin27")
    result = simulate_dataset(cfg, tmp_path / "ds", count=2, split="test", truth=True)
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == ["manifest_test.json", "test_0000.h5", "test_0000_truth.nii.gz",
                     "test_0001.h5", "test_0001_truth.nii.gz"]
    manifest = json.loads(result.manifest.read_text())
    assert manifest["split"] == "test" and len(manifest["files"]) == 2
    assert read_raw(tmp_path / "ds" / "test_0000.h5").acceleration == 1.0
    with pytest.raises(OutputError, match="already exists"):
        simulate_dataset(cfg, tmp_path / "ds", count=1, split="test")


# --------------------------------------------------------------------------- programs we did not write

@pytest.mark.external
@pytest.mark.skipif(not have("ismrmrd_recon_cartesian_2d"), reason="ismrmrd-tools not installed")
@pytest.mark.parametrize("config", [replace(SMALL, acceleration=1.0),
                                    replace(SMALL_2DT, frames=3)], ids=["2d", "2dt"])
def test_debian_cpp_reconstruction_reads_our_files(tmp_path: Path,
                                                   config: SimulationConfig) -> None:
    path = tmp_path / "cpp.h5"
    sim = simulate_to_file(config, path)
    done = subprocess.run(["ismrmrd_recon_cartesian_2d", str(path)], check=False, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with h5py.File(path) as f:
        image = np.abs(f["dataset/cpp/data"][...]).astype(np.float64)
    if config.kind == "2d":
        assert image.shape[-2:] == (64, 64)
        assert _ncc(image[0, 0, 0], sim.truth.data[0, 0]) > 0.99
