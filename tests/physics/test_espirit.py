"""ESPIRiT coil maps: ground truth, precision, kinds, batching, errors, BART."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_sense import generate, read_cfl, read_generator_file, write_cfl

from conftest import have
from molrecon.errors import ConfigError, InputDataError
from molrecon.physics.espirit import EspiritConfig, estimate_maps, subspace_agreement
from molrecon.physics.fft import fftc


# ---------------------------------------------------------------------- synthetic data
def smooth_maps(shape: tuple[int, int, int], coils: int, seed: int = 0) -> np.ndarray:
    """Smooth complex sensitivities (C, D, Y, X) of loops on a ring around the FOV."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n // 2) / max(n / 2, 1) for n in shape],
                             indexing="ij")
    maps = []
    for c in range(coils):
        a = 2 * np.pi * c / coils
        cy, cx, cz = 1.5 * np.sin(a), 1.5 * np.cos(a), rng.uniform(-0.5, 0.5)
        mag = 1.0 / (0.5 + (yy - cy) ** 2 + (xx - cx) ** 2 + 0.5 * (zz - cz) ** 2)
        maps.append(mag * np.exp(1j * (a + 0.7 * (xx * np.cos(a) + yy * np.sin(a)) + 0.3 * zz)))
    return np.stack(maps)


def ellipsoid(shape: tuple[int, int, int]) -> np.ndarray:
    """An ellipsoid (an ellipse when D = 1) with smooth texture and phase: (D, Y, X)."""
    zz, yy, xx = np.meshgrid(*[(np.arange(n) - n // 2) / max(n / 2, 1) for n in shape],
                             indexing="ij")
    r2 = (xx / 0.8) ** 2 + (yy / 0.7) ** 2 + ((zz / 0.85) ** 2 if shape[0] > 1 else 0)
    obj = (r2 <= 1) * (1.0 + 0.3 * np.cos(3 * xx) * np.sin(2 * yy))
    return obj * np.exp(0.5j * (xx + yy))


def simulate(shape: tuple[int, int, int], coils: int, kind: str, *, noise: float = 1e-4,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fully sampled k-space (C, D, Y, X), true maps (C, D, Y, X), object (D, Y, X)."""
    maps = smooth_maps(shape, coils, seed)
    obj = ellipsoid(shape)
    dims = (-3, -2, -1) if kind == "3d" else (-2, -1)
    k = fftc(torch.from_numpy(maps * obj), dims).numpy()
    rng = np.random.default_rng(seed + 1)
    k = k + noise * np.abs(k).max() * (rng.standard_normal(k.shape)
                                       + 1j * rng.standard_normal(k.shape))
    return k, maps, obj


def lines_mask(ny: int, accel: int, acs: int, offset: int = 0) -> np.ndarray:
    m = np.zeros(ny, dtype=bool)
    m[offset::accel] = True
    m[ny // 2 - acs // 2: ny // 2 + (acs + 1) // 2] = True
    return m


def agreement_inside(maps: torch.Tensor, truth: np.ndarray, inside: np.ndarray) -> torch.Tensor:
    a = subspace_agreement(maps, torch.from_numpy(truth).to(maps.dtype))
    return a[torch.from_numpy(np.broadcast_to(inside, a.shape).copy())]


# ---------------------------------------------------------------------- ground truth
@pytest.mark.external
@pytest.mark.skipif(not have("ismrmrd_generate_cartesian_shepp_logan"),
                    reason="ismrmrd-tools not installed")
def test_matches_generator_ground_truth(tmp_path: Path) -> None:
    data = read_generator_file(generate(tmp_path, "-m", "64", "-c", "8", "-w", "24"))
    k = torch.from_numpy(data["kspace"])
    maps = estimate_maps(k, torch.from_numpy(data["calib"]), "2d")
    assert maps.shape == k.shape and maps.dtype == torch.complex64
    inside = np.abs(data["phantom"]) > 0.05                               # (Y, X)
    agree = agreement_inside(maps, data["csm"], inside)
    assert float(agree.mean()) > 0.99
    assert float(agree.min()) > 0.95
    kept = (maps.abs().sum(dim=1) > 0)[0, 0].numpy()
    assert kept[inside].mean() > 0.999                     # nothing cropped inside the object
    norm = torch.linalg.vector_norm(maps, dim=1)[0, 0].numpy()
    assert np.allclose(norm[kept], 1.0, atol=1e-5)         # unit norm where kept
    assert kept.mean() < 0.95                              # and cropped somewhere outside


def test_synthetic_2d_accuracy_and_undersampling() -> None:
    k, truth, obj = simulate((1, 48, 44), 8, "2d")
    mask = lines_mask(48, 3, 16)
    ku = torch.from_numpy(k[None] * mask[None, None, None, :, None]).to(torch.complex64)
    calib = torch.zeros(1, 1, 1, 48, 1, dtype=torch.bool)
    calib[..., 16:32, :] = True
    maps = estimate_maps(ku, calib, "2d")
    agree = agreement_inside(maps, truth[None], np.abs(obj) > 0)
    assert float(agree.mean()) > 0.999
    # No flagged calibration: the acquired lines calibrate (here 17 contiguous lines:
    # an R=3 line touches the 16 ACS lines), giving practically the same maps.
    maps_auto = estimate_maps(ku, None, "2d")
    kept = (maps.abs().sum(1) > 0) & (maps_auto.abs().sum(1) > 0)
    assert float(subspace_agreement(maps_auto, maps)[kept].min()) > 0.999
    assert float(((maps.abs().sum(1) > 0) ^ (maps_auto.abs().sum(1) > 0)).float().mean()) < 0.005
    maps_empty = estimate_maps(ku, torch.zeros_like(calib), "2d")       # documented fallback
    assert torch.equal(maps_empty, maps_auto)


def test_float64_matches_float32() -> None:
    k, _, obj = simulate((1, 40, 36), 6, "2d", noise=1e-3)
    k64 = torch.from_numpy(k[None])
    m64 = estimate_maps(k64, None, "2d")
    m32 = estimate_maps(k64.to(torch.complex64), None, "2d")
    assert m64.dtype == torch.complex128 and m32.dtype == torch.complex64
    both = (m64.abs().sum(1) > 0) & (m32.abs().sum(1) > 0)
    agree = subspace_agreement(m32.to(torch.complex128), m64)[both]
    assert float(agree.min()) > 0.9999
    # Same phase convention: the maps themselves agree, not only their subspaces.
    assert float((m32.to(torch.complex128) - m64).abs()[both.unsqueeze(1).expand_as(m64)].max()) \
        < 1e-3
    support_diff = ((m64.abs().sum(1) > 0) ^ (m32.abs().sum(1) > 0)).float().mean()
    assert float(support_diff) < 0.005
    assert bool((both[0, 0].numpy() | ~(np.abs(obj[0]) > 0)).all())


def test_coarse_grid_agrees_with_full_grid_eigendecomposition() -> None:
    k, _, obj = simulate((1, 96, 80), 8, "2d", noise=1e-3)
    kt = torch.from_numpy(k[None]).to(torch.complex64)
    full = estimate_maps(kt, None, "2d", config=EspiritConfig(eigen_grid=None))
    fast = estimate_maps(kt, None, "2d", config=EspiritConfig(eigen_grid=32))
    inside = torch.from_numpy(np.abs(obj) > 0)[None]
    agree = subspace_agreement(fast, full)[inside]
    assert float(agree.mean()) > 0.9995
    assert float(agree.min()) > 0.99


def test_scale_invariance() -> None:
    k, _, _ = simulate((1, 32, 32), 4, "2d")
    kt = torch.from_numpy(k[None]).to(torch.complex64)
    ref = estimate_maps(kt, None, "2d")
    for c in (1e-9, 1e9):
        assert torch.allclose(estimate_maps(kt * c, None, "2d"), ref, atol=1e-4)


@pytest.mark.parametrize("phase", ["first", "virtual"])
def test_phase_reference(phase: str) -> None:
    k, _, _ = simulate((1, 32, 32), 4, "2d")
    maps = estimate_maps(torch.from_numpy(k[None]), None, "2d",
                         config=EspiritConfig(phase=phase))                 # complex128
    kept = maps.abs().sum(1) > 0
    if phase == "first":
        first = maps[:, 0][kept]
        assert float(first.imag.abs().max()) < 1e-10 and float(first.real.min()) >= 0
    else:
        # The phase is smooth: neighbouring pixels differ by a small angle.
        inner = maps[..., 8:24, 8:24]
        step = torch.angle(torch.sum(inner[..., 1:] * inner[..., :-1].conj(), dim=1))
        assert float(step.abs().max()) < 0.3


def test_batch_items_are_independent() -> None:
    k1, _, _ = simulate((1, 32, 30), 4, "2d", seed=0)
    k2, _, _ = simulate((1, 32, 30), 4, "2d", seed=5)
    k2 = k2 * 1e3
    batch = torch.from_numpy(np.stack([k1, k2])).to(torch.complex64)       # (2, C, 1, Y, X)
    maps = estimate_maps(batch, None, "2d")
    for i in range(2):
        alone = estimate_maps(batch[i:i + 1], None, "2d")
        assert torch.allclose(maps[i:i + 1], alone, atol=1e-5)


def test_3d_hybrid_readout() -> None:
    shape = (20, 24, 16)
    k, truth, obj = simulate(shape, 6, "3d")
    mask = np.zeros((20, 24), dtype=bool)
    mask[::2, ::2] = True
    mask[4:16, 6:18] = True                                                 # 12×12 ACS
    ku = torch.from_numpy(k[None] * mask[None, None, :, :, None]).to(torch.complex64)
    maps = estimate_maps(ku, None, "3d")
    assert maps.shape == (1, 6) + shape
    inside = np.abs(obj) > 0
    agree = agreement_inside(maps, truth[None], inside)
    assert float(agree.mean()) > 0.999
    kept = (maps.abs().sum(1) > 0)[0].numpy()
    assert kept[inside].mean() > 0.999
    assert kept[:, :, 0].sum() == 0                  # readout columns outside the object: cropped
    strided = estimate_maps(ku, None, "3d", config=EspiritConfig(readout_stride=2))
    agree_s = agreement_inside(strided, truth[None], inside)
    assert float(agree_s.mean()) > 0.995
    assert (strided.abs().sum(1) > 0)[0].numpy()[inside].mean() > 0.999


def test_2dt_time_averaged_calibration() -> None:
    """Interleaved R=4 frames without ACS: their union fills the centre."""
    k, truth, obj = simulate((1, 48, 40), 8, "2d")
    frames = 4
    masks = np.stack([lines_mask(48, 4, 0, offset=t) for t in range(frames)])  # (T, Y)
    kt = np.repeat(k, frames, axis=1) * masks[None, :, :, None]                # (C, T, Y, X)
    maps = estimate_maps(torch.from_numpy(kt[None]).to(torch.complex64), None, "2dt")
    assert maps.shape == (1, 8, 1, 48, 40)
    agree = agreement_inside(maps, truth[None], np.abs(obj) > 0)
    assert float(agree.mean()) > 0.999


def test_2dt_without_usable_centre_is_an_input_error() -> None:
    k, _, _ = simulate((1, 48, 40), 4, "2d")
    masks = np.stack([lines_mask(48, 4, 0, offset=0) for _ in range(3)])     # same lines
    kt = np.repeat(k, 3, axis=1) * masks[None, :, :, None]
    with pytest.raises(InputDataError, match="calibration region"):
        estimate_maps(torch.from_numpy(kt[None]).to(torch.complex64), None, "2dt")


def test_acs_smaller_than_kernel_is_an_input_error() -> None:
    k, _, _ = simulate((1, 40, 40), 4, "2d")
    mask = lines_mask(40, 4, 4)                                             # 4 ACS lines < 6
    ku = torch.from_numpy(k[None] * mask[None, None, None, :, None]).to(torch.complex64)
    with pytest.raises(InputDataError, match=r"smaller than the 6×6"):
        estimate_maps(ku, None, "2d")
    # A smaller kernel fits.
    maps = estimate_maps(ku, None, "2d", config=EspiritConfig(kernel=3, calib_max=24))
    assert bool((maps.abs().sum(1) > 0).any())


def test_forced_calibration_size() -> None:
    k, _, _ = simulate((1, 40, 40), 4, "2d")
    ku = torch.from_numpy(k[None] * lines_mask(40, 4, 12)[None, None, None, :, None])
    maps = estimate_maps(ku, None, "2d", config=EspiritConfig(calib_size=12))
    assert bool((maps.abs().sum(1) > 0).any())
    with pytest.raises(InputDataError, match="not fully acquired"):
        estimate_maps(ku, None, "2d", config=EspiritConfig(calib_size=16))


MESSAGES = {"zero": "all zero", "nan": "NaN", "real": "complex", "calib_shape": "calib must",
            "kind": "kind must"}


@pytest.mark.parametrize("problem", sorted(MESSAGES))
def test_bad_input(problem: str) -> None:
    k = torch.from_numpy(simulate((1, 32, 32), 4, "2d")[0][None]).to(torch.complex64)
    with pytest.raises(InputDataError, match=MESSAGES[problem]):
        if problem == "zero":
            estimate_maps(torch.zeros_like(k), None, "2d")
        elif problem == "nan":
            k[0, 0, 0, 3, 3] = float("nan")
            estimate_maps(k, None, "2d")
        elif problem == "real":
            estimate_maps(k.real, None, "2d")
        elif problem == "calib_shape":
            estimate_maps(k, torch.ones(1, 1, 1, 31, 1, dtype=torch.bool), "2d")
        else:
            estimate_maps(k, None, "4d")


@pytest.mark.parametrize("kwargs", [{"kernel": 0}, {"calib_max": 4}, {"crop": 1.5},
                                    {"sv_threshold": -1.0}, {"eigen_grid": 5},
                                    {"readout_stride": 0}, {"phase": "coil"}])
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        EspiritConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.gpu
def test_gpu_matches_cpu() -> None:
    k, _, obj = simulate((1, 64, 64), 8, "2d", noise=1e-3)
    kt = torch.from_numpy(k[None]).to(torch.complex64)
    cpu = estimate_maps(kt, None, "2d")
    gpu = estimate_maps(kt.cuda(), None, "2d")
    assert gpu.device.type == "cuda"
    inside = torch.from_numpy(np.abs(obj) > 0)[None]
    agree = subspace_agreement(gpu.cpu(), cpu)[inside]
    assert float(agree.min()) > 0.9999


# ---------------------------------------------------------------------- BART
@pytest.mark.external
@pytest.mark.skipif(not have("bart"), reason="bart not installed")
def test_agrees_with_bart_ecalib(tmp_path: Path) -> None:
    k, _, _ = simulate((1, 64, 64), 8, "2d", noise=1e-3)
    ku = k * lines_mask(64, 2, 20)[None, None, :, None]                     # (C, 1, Y, X)
    write_cfl(tmp_path / "k", np.transpose(ku[:, 0], (2, 1, 0))[:, :, None, :])  # (X, Y, 1, C)
    subprocess.run(["bart", "ecalib", "-m1", str(tmp_path / "k"), str(tmp_path / "s")],
                   check=True, capture_output=True)
    bart = read_cfl(tmp_path / "s").reshape(64, 64, 8)                     # (X, Y, C)
    bart_maps = torch.from_numpy(np.transpose(bart, (2, 1, 0))[None, :, None].copy())
    ours = estimate_maps(torch.from_numpy(ku[None]).to(torch.complex64), None, "2d")
    kept_ours = ours.abs().sum(1) > 0
    kept_bart = bart_maps.abs().sum(1) > 0
    both = kept_ours & kept_bart
    assert float(subspace_agreement(ours, bart_maps)[both].mean()) > 0.999
    # The same crop rule (eigenvalue ≥ 0.8) keeps nearly the same pixels.
    assert float((kept_ours ^ kept_bart).float().mean()) < 0.02


def test_narrow_calibration_region_still_gives_usable_maps() -> None:
    """8 ACS lines with the default 6-wide kernel used to give maps that ruined CG-SENSE
    (15 dB below a 4-wide kernel); the kernel now shrinks for narrow regions."""
    import warnings

    from molrecon.metrics import compare
    from molrecon.physics.sense import SenseOperator, cg_sense
    from molrecon.recon import zero_filled_rss
    from molrecon.sim import SimulationConfig, simulate

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sim = simulate(SimulationConfig(kind="2d", matrix=(96, 96), coils=8, acceleration=4.0,
                                        acs=8, noise=0.005, seed=3, slice_position=0.74))
    raw = sim.raw()
    k = torch.from_numpy(raw.kspace)
    k = k / k.abs().max()
    maps = estimate_maps(k, torch.from_numpy(raw.calib), "2d")
    x = cg_sense(SenseOperator(maps, torch.from_numpy(raw.mask), "2d"), k).x
    truth = np.abs(sim.truth.data)
    sense_psnr = compare(x.numpy(), truth).psnr
    zf_psnr = compare(zero_filled_rss(k, "2d").numpy(), truth).psnr
    assert sense_psnr > zf_psnr + 3.0, (sense_psnr, zf_psnr)
