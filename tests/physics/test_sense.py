"""SENSE operator properties, the 3D readout split and CG-SENSE."""

from __future__ import annotations

import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import have, real_file
from molrecon.errors import ConvergenceWarning, InputDataError
from molrecon.physics.checks import (
    adjoint_error,
    check_operator,
    linearity_error,
    normal_error,
    random_complex,
)
from molrecon.physics.fft import fftc, ifftc
from molrecon.physics.sense import SenseOperator, cg_sense, decouple_readout

TOL = 1e-10


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    batch: int
    coils: int
    depth: int
    ny: int
    nx: int
    shared_maps: bool = False     # 2dt maps (B, C, 1, Y, X)
    weights: bool = False         # real sampling weights instead of 0/1
    mask_batch1: bool = False     # one mask shared by the batch


CASES = [
    Case("2d-odd", "2d", 1, 4, 1, 37, 31),
    Case("2d-even", "2d", 1, 3, 1, 32, 24),
    Case("2d-multislice", "2d", 3, 4, 1, 21, 16),
    Case("3d", "3d", 1, 3, 7, 9, 10),
    Case("3d-even-batch2", "3d", 2, 2, 6, 8, 5),
    Case("2dt-frames", "2dt", 2, 3, 4, 13, 11, shared_maps=True),
    Case("2dt-full-maps", "2dt", 1, 2, 3, 12, 9),
    Case("2d-weights", "2d", 2, 3, 1, 15, 14, weights=True),
    Case("2d-shared-mask", "2d", 3, 2, 1, 11, 12, mask_batch1=True),
]


def make_mask(case: Case, seed: int = 0) -> torch.Tensor:
    """Per-frame (per-plane) masks: every ``r``-th line with a frame-dependent offset + centre."""
    gen = torch.Generator().manual_seed(seed)
    b = 1 if case.mask_batch1 else case.batch
    m = torch.zeros(b, 1, case.depth, case.ny, 1)
    for i in range(b):
        for d in range(case.depth):
            m[i, 0, d, (i + d) % 3::3] = 1
            m[i, 0, d, case.ny // 2 - 1: case.ny // 2 + 2] = 1
    if case.kind == "3d":   # a random (kz, ky) pattern: the mask varies along D too
        m = torch.maximum(m, (torch.rand(m.shape, generator=gen) < 0.3).float())
    if case.weights:
        m = m * (0.5 + torch.rand(m.shape, generator=gen))
        return m.double()
    return m.bool()


def make_operator(case: Case, dtype: torch.dtype = torch.complex128) -> SenseOperator:
    d_maps = 1 if case.shared_maps else case.depth
    maps = random_complex((case.batch, case.coils, d_maps, case.ny, case.nx), dtype=dtype, seed=7)
    return SenseOperator(maps, make_mask(case), case.kind)


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def test_adjoint(case: Case) -> None:
    assert adjoint_error(make_operator(case)) < TOL


@pytest.mark.parametrize("kind", ["2d", "3d"])
def test_operator_and_cg_sense_agree_across_devices(device: str, kind: str) -> None:
    """On every device the operator is adjoint to its forward and CG-SENSE gives the CPU's
    image (single precision: what reconstruction runs)."""
    case = next(c for c in CASES if c.kind == kind)
    op = make_operator(case, dtype=torch.complex64)
    on_device = op.to(device=torch.device(device))
    assert adjoint_error(on_device) < 1e-5
    k = op.forward(random_complex(tuple(op.domain_shape), dtype=torch.complex64, seed=3))
    ref = cg_sense(op, k, lam=1e-3, max_iter=20).x
    got = cg_sense(on_device, k.to(device), lam=1e-3, max_iter=20).x
    assert got.device.type == torch.device(device).type
    assert torch.linalg.vector_norm(got.cpu() - ref) <= 1e-4 * torch.linalg.vector_norm(ref)


def test_normal_is_adjoint_of_forward(case: Case) -> None:
    assert normal_error(make_operator(case)) < TOL


def test_linearity(case: Case) -> None:
    assert linearity_error(make_operator(case)) < TOL


def test_forward_matches_the_definition(case: Case) -> None:
    """A x = M · fftc(S x) and Aᴴ k = Σ conj(S) ifftc(M k), written out directly."""
    op = make_operator(case)
    maps = op.maps                                                  # (B, C, D|1, Y, X)
    mask = make_mask(case).to(torch.float64)
    dims = (-3, -2, -1) if case.kind == "3d" else (-2, -1)
    x = random_complex(op.image_shape, seed=3)
    want = mask * fftc(maps * x.unsqueeze(1), dims)
    assert torch.allclose(op.forward(x), want, atol=1e-12)
    k = random_complex(op.kspace_shape, seed=4)
    want_adj = torch.sum(maps.conj() * ifftc(mask * k, dims), dim=1)
    assert torch.allclose(op.adjoint(k), want_adj, atol=1e-12)


@pytest.mark.parametrize(("kind", "hybrid"), [("2d", False), ("3d", False), ("3d", True),
                                              ("2dt", False)])
def test_support_is_where_the_maps_are_not_zero(kind: str, hybrid: bool) -> None:
    """An off-centre hole in the maps (odd sizes: an fftshift error would move it), also
    for hybrid-space blocks and 2dt maps shared over frames."""
    g = torch.Generator().manual_seed(0)
    d_maps, d = {"2d": (1, 1), "3d": (5, 5), "2dt": (1, 4)}[kind]
    maps = torch.randn(2, 3, d_maps, 9, 7, dtype=torch.complex128, generator=g)
    maps[:, :, :, 1:4, 0:2] = 0
    maps[1, :, :, 6, 5] = 0
    mask = torch.ones(1, 1, d, 9, 1, dtype=torch.bool)
    op = SenseOperator(maps, mask, kind, hybrid_readout=hybrid)
    want = (maps.abs().sum(dim=1) > 0).double()                     # (B, D|1, Y, X)
    assert torch.equal(op.support(), want)
    # Outside the support the operator sees nothing: Aᴴ and AᴴA vanish there.
    x = torch.randn(2, d, 9, 7, dtype=torch.complex128, generator=g)
    assert float((op.normal(x) * (1 - want)).abs().max()) < 1e-12


def test_checks_detect_a_broken_adjoint() -> None:
    """The property checks must be able to fail: a wrong adjoint gives an O(1) error."""

    class Broken(SenseOperator):
        def adjoint(self, k: torch.Tensor) -> torch.Tensor:
            return super().adjoint(k).conj()

    good = make_operator(CASES[0])
    bad = Broken(good.maps, make_mask(CASES[0]), "2d")
    errs = check_operator(bad)
    assert errs["adjoint"] > 0.01
    assert errs["normal"] > 0.01


def test_2dt_shared_maps_equal_expanded_maps() -> None:
    case = CASES[5]
    op = make_operator(case)
    full = op.maps.expand(-1, -1, case.depth, -1, -1).contiguous()
    op_full = SenseOperator(full, make_mask(case), "2dt")
    x = random_complex(op.image_shape, seed=5)
    assert torch.allclose(op.forward(x), op_full.forward(x), atol=1e-12)
    assert torch.allclose(op.normal(x), op_full.normal(x), atol=1e-12)


def test_normal_diagonal_is_exact() -> None:
    """Probe the diagonal of AᴴA with unit vectors on a tiny operator."""
    for case in (Case("t2", "2d", 1, 2, 1, 5, 4, weights=True), Case("t3", "3d", 1, 2, 3, 4, 3)):
        op = make_operator(case)
        n = int(np.prod(op.image_shape))
        diag = op.normal_diagonal().reshape(-1)
        for i in range(0, n, 7):
            e = torch.zeros(n, dtype=torch.complex128)
            e[i] = 1
            val = torch.sum(e.conj() * op.normal(e.reshape(op.image_shape)).reshape(-1))
            assert abs(complex(val) - float(diag[i])) < 1e-12


def test_repr_names_shapes() -> None:
    maps = torch.zeros(1, 8, 64, 64, 64, dtype=torch.complex64)
    mask = torch.ones(1, 1, 64, 64, 1, dtype=torch.bool)
    assert repr(SenseOperator(maps, mask, "3d")) == \
        "<SenseOperator 3d (1,8,64,64,64)->(1,64,64,64)>"


def test_dtype_and_device_follow_the_maps() -> None:
    op = make_operator(CASES[0], dtype=torch.complex64)
    x = random_complex(op.image_shape, dtype=torch.complex64, seed=1)
    assert op.forward(x).dtype == torch.complex64
    assert op.normal(x).dtype == torch.complex64
    op64 = op.to(dtype=torch.complex128)
    assert op64.dtype == torch.complex128
    assert adjoint_error(op64) < TOL
    # complex64 arithmetic: the adjoint test holds at single-precision level.
    assert adjoint_error(op) < 1e-5


@pytest.mark.parametrize("bad", ["maps_real", "mask_coils", "mask_shape", "kind", "x_shape"])
def test_shape_errors_are_domain_errors(bad: str) -> None:
    maps = random_complex((1, 2, 1, 6, 5), seed=0)
    mask = torch.ones(1, 1, 1, 6, 1, dtype=torch.bool)
    with pytest.raises(InputDataError):
        if bad == "maps_real":
            SenseOperator(maps.real, mask, "2d")
        elif bad == "mask_coils":
            SenseOperator(maps, torch.ones(1, 2, 1, 6, 1), "2d")
        elif bad == "mask_shape":
            SenseOperator(maps, torch.ones(1, 1, 1, 7, 1), "2d")
        elif bad == "kind":
            SenseOperator(maps, mask, "4d")
        else:
            SenseOperator(maps, mask, "2d").forward(torch.zeros(1, 1, 5, 6, dtype=maps.dtype))


def test_normal_supports_autograd() -> None:
    """The in-place steps of ``normal`` must not break differentiation (gradcheck, float64)."""
    op = make_operator(Case("g", "2d", 1, 2, 1, 5, 4))
    x = random_complex(op.image_shape, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(op.normal, (x,), eps=1e-6, atol=1e-8, fast_mode=True)


# ---------------------------------------------------------------------- 3D readout split
def test_decoupled_readout_reproduces_the_3d_operator() -> None:
    case = CASES[4]                            # 3d, B = 2
    op = make_operator(case)
    x = random_complex(op.image_shape, seed=8)
    mask = make_mask(case)
    dec = decouple_readout(op.forward(x), "3d", mask=mask, maps=op.maps)
    sub = dec.operator()
    assert sub.kind == "2d"
    assert dec.kspace.shape == (case.batch * case.nx, case.coils, 1, case.depth, case.ny)
    x_split = x.permute(0, 3, 1, 2).reshape(case.batch * case.nx, 1, case.depth, case.ny)
    assert torch.allclose(sub.forward(x_split), dec.kspace, atol=1e-12)
    assert torch.equal(dec.recouple(x_split), x)
    assert adjoint_error(sub) < TOL


@pytest.mark.parametrize("index", [0, 3, 4, 5])      # 2d, 3d, 3d batch 2, 2dt shared maps
def test_a_block_of_readout_positions_is_an_exact_problem(index: int) -> None:
    """hybrid_readout: the operator on a block of readout positions of the hybrid data
    (ifft along x) is the full operator restricted to that block."""
    case = CASES[index]
    op = make_operator(case)
    x = random_complex(op.image_shape, seed=9)
    k = op.forward(x)
    cut = slice(1, 4)
    block = SenseOperator(op.maps[..., cut], make_mask(case), case.kind, hybrid_readout=True)
    assert adjoint_error(block) < TOL and normal_error(block) < TOL
    hybrid = ifftc(k, dims=(-1,))[..., cut]
    assert torch.allclose(block.forward(x[..., cut]), hybrid, atol=1e-12)
    assert torch.allclose(block.adjoint(hybrid), op.adjoint(k)[..., cut], atol=1e-12)
    assert torch.allclose(block.normal(x[..., cut]), op.normal(x)[..., cut], atol=1e-12)


def test_decouple_rejects_2d() -> None:
    with pytest.raises(InputDataError):
        decouple_readout(torch.zeros(1, 2, 1, 4, 4, dtype=torch.complex64), "2d")


# ---------------------------------------------------------------------- CG-SENSE
def _system_residual(op: SenseOperator, y: torch.Tensor, x: torch.Tensor, lam: float) -> float:
    shift = lam * float(op.normal_diagonal().mean())
    rhs = op.adjoint(y)
    r = op.normal(x) + shift * x - rhs
    return float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(rhs))


@pytest.mark.parametrize("name", ["2d-odd", "2dt-frames", "3d"])
def test_cg_sense_solves_the_regularised_normal_equations(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    op = make_operator(case)
    y = op.forward(random_complex(op.image_shape, seed=9))
    res = cg_sense(op, y, lam=1e-2, max_iter=200, tol=1e-11)
    assert res.converged
    for b in range(case.batch):   # each item has its own λ (relative to its own diagonal)
        sub = SenseOperator(op.maps[b:b + 1], make_mask(case)[b:b + 1], case.kind)
        assert _system_residual(sub, y[b:b + 1], res.x[b:b + 1], 1e-2) < 1e-9


def test_cg_sense_3d_decoupled_equals_full_volume() -> None:
    case = CASES[3]
    op = make_operator(case)
    y = op.forward(random_complex(op.image_shape, seed=10))
    full = cg_sense(op, y, lam=1e-2, max_iter=300, tol=1e-12, decouple=False)
    split = cg_sense(op, y, lam=1e-2, max_iter=300, tol=1e-12, decouple=True)
    chunked = cg_sense(op, y, lam=1e-2, max_iter=300, tol=1e-12, decouple=True, readout_chunk=3)
    scale = float(full.x.abs().max())
    assert float((split.x - full.x).abs().max()) < 1e-9 * scale
    assert torch.allclose(chunked.x, split.x, atol=1e-12 * scale)
    assert split.residuals.shape[1] == 1 and float(split.residuals[-1, 0]) <= 1e-12
    assert float(split.residuals[0, 0]) == pytest.approx(1.0)


def test_cg_sense_lambda_is_relative_and_solution_is_linear() -> None:
    case = CASES[0]
    op = make_operator(case)
    y = op.forward(random_complex(op.image_shape, seed=11))
    ref = cg_sense(op, y, lam=1e-2, max_iter=15)
    # Scaling the maps by c and the data by c leaves the solution unchanged (λ follows diag(AᴴA)).
    op_c = SenseOperator(op.maps * 10.0, make_mask(case), "2d")
    scaled = cg_sense(op_c, y * 10.0, lam=1e-2, max_iter=15)
    assert torch.allclose(scaled.x, ref.x, atol=1e-10 * float(ref.x.abs().max()))
    doubled = cg_sense(op, 2 * y, lam=1e-2, max_iter=15)
    assert torch.allclose(doubled.x, 2 * ref.x, atol=1e-10 * float(ref.x.abs().max()))
    assert ref.iterations == 15


def test_cg_sense_warns_when_tolerance_is_missed() -> None:
    op = make_operator(CASES[0])
    y = op.forward(random_complex(op.image_shape, seed=12))
    with pytest.warns(ConvergenceWarning):
        res = cg_sense(op, y, lam=0.0, max_iter=2, tol=1e-12)
    assert not res.converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cg_sense(op, y, lam=0.0, max_iter=2)        # tol = 0: fixed iterations, no warning


def test_cg_sense_rejects_bad_input() -> None:
    op = make_operator(CASES[0])
    with pytest.raises(InputDataError):
        cg_sense(op, torch.zeros(1, 4, 1, 37, 30, dtype=torch.complex128))
    with pytest.raises(InputDataError):
        cg_sense(op, torch.zeros(op.kspace_shape, dtype=torch.complex128), lam=-1.0)


# ---------------------------------------------------------------------- data from other programs
def read_generator_file(path: Path, repetition: int = 0) -> dict[str, np.ndarray]:
    """k-space (1, C, 1, Y, X) and truth of an ``ismrmrd_generate_cartesian_shepp_logan`` file.

    The file stores 2× readout oversampling; lines are placed by
    ``kspace_encode_step_1``; the readout oversampling is removed by cropping the
    centre after an inverse FFT along the readout. With ``-a R`` the generator
    writes R repetitions with shifted line patterns: one is read.
    """
    with h5py.File(path, "r") as f:
        acq = f["dataset/data"][:]
        csm = f["dataset/csm"][:]
        phantom = f["dataset/phantom"][:]
    head = acq["head"]
    n_coils = int(head["active_channels"][0])
    n_samples = int(head["number_of_samples"][0])
    csm_c = (csm["real"] + 1j * csm["imag"])[0]                             # (C, Y, X)
    ny, nx = csm_c.shape[-2:]
    k = np.zeros((n_coils, ny, n_samples), dtype=np.complex64)
    calib = np.zeros(ny, dtype=bool)
    cal_bits = (1 << 19) | (1 << 20)   # ACQ_IS_PARALLEL_CALIBRATION(_AND_IMAGING): bits 20, 21
    for i in range(len(acq)):
        if int(head["idx"]["repetition"][i]) != repetition:
            continue
        line = int(head["idx"]["kspace_encode_step_1"][i])
        k[:, line] = acq["data"][i].view(np.complex64).reshape(n_coils, n_samples)
        calib[line] |= bool(int(head["flags"][i]) & cal_bits)
    hybrid = ifftc(torch.from_numpy(k), (-1,))
    start = (n_samples - nx) // 2
    k = fftc(hybrid[..., start:start + nx], (-1,)).numpy()
    mask = np.abs(k).sum(axis=(0, 2)) > 0
    return {
        "kspace": k[None, :, None],                                         # (1, C, 1, Y, X)
        "mask": mask[None, None, None, :, None],
        "calib": calib[None, None, None, :, None],
        "csm": csm_c[None, :, None],                                        # (1, C, 1, Y, X)
        "phantom": (phantom["real"] + 1j * phantom["imag"])[0],             # (Y, X)
    }


def write_cfl(stem: Path, array: np.ndarray) -> None:
    """BART ``.hdr`` + ``.cfl`` (complex64, column-major)."""
    dims = list(array.shape) + [1] * (16 - array.ndim)
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: Path) -> np.ndarray:
    dims = [int(v) for v in stem.with_suffix(".hdr").read_text().splitlines()[1].split()]
    return np.fromfile(stem.with_suffix(".cfl"), dtype=np.complex64).reshape(dims, order="F")


def generate(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "shepp_logan.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", *args, "-o", str(out)],
                   check=True, capture_output=True, cwd=tmp_path)
    return out


@pytest.mark.external
@pytest.mark.skipif(not have("ismrmrd_generate_cartesian_shepp_logan"),
                    reason="ismrmrd-tools not installed")
def test_cg_sense_beats_zero_filled_rss_on_generator_r2(tmp_path: Path) -> None:
    from molrecon.physics.espirit import estimate_maps

    data = read_generator_file(generate(tmp_path, "-m", "64", "-c", "8", "-a", "2", "-w", "24"))
    k = torch.from_numpy(data["kspace"])
    mask = torch.from_numpy(data["mask"])
    maps = estimate_maps(k, torch.from_numpy(data["calib"]), "2d")
    op = SenseOperator(maps, mask, "2d")
    x = cg_sense(op, k, lam=1e-2, max_iter=30).x[0, 0].abs().numpy()
    zf = torch.sqrt((ifftc(k).abs() ** 2).sum(dim=1))[0, 0].numpy()
    # What both methods estimate: |phantom| · RSS(true coil maps) (unit-norm ESPIRiT maps).
    truth = np.abs(data["phantom"]) * np.sqrt((np.abs(data["csm"][0, :, 0]) ** 2).sum(axis=0))
    inside = np.abs(data["phantom"]) > 0.05

    def nrmse(img: np.ndarray) -> float:
        a = float(np.sum(img[inside] * truth[inside]) / np.sum(img[inside] ** 2))   # LS scale
        err = np.linalg.norm(a * img[inside] - truth[inside])
        return float(err / np.linalg.norm(truth[inside]))

    # Measured (default generator noise 0.05): SENSE ≈ 0.107, zero-filled RSS ≈ 0.21.
    err_sense, err_zf = nrmse(x), nrmse(zf)
    assert float(mask.float().mean()) < 0.7                  # really undersampled (one repetition)
    assert err_sense < 0.6 * err_zf, (err_sense, err_zf)
    assert err_sense < 0.15


def _psnr_fit(x: np.ndarray, ref: np.ndarray, support: np.ndarray) -> float:
    """PSNR (dB) of ``x`` against ``ref`` in ``support`` after a complex least-squares scale fit."""
    a, r = x[support], ref[support]
    err = np.sqrt(np.mean(np.abs(np.vdot(a, r) / np.vdot(a, a) * a - r) ** 2))
    return float(20 * np.log10(np.abs(r).max() / err))


@pytest.mark.external
@pytest.mark.skipif(not have("bart"), reason="bart not installed")
def test_cg_sense_matches_bart_pics_l2(tmp_path: Path) -> None:
    """Same k-space, same maps, same λ: ``bart pics -l2 -r λ -w 1`` solves the same equations.

    BART's FFT is unitary and ``-w 1`` switches off its data scaling, so its
    ``-r`` is our absolute λ = lam · mean(diag(AᴴA)).
    """
    from test_espirit import lines_mask, simulate

    from molrecon.physics.espirit import estimate_maps

    k, _, _ = simulate((1, 64, 64), 8, "2d", noise=1e-3)
    mask = lines_mask(64, 3, 16)
    ku = k * mask[None, None, :, None]                                      # (C, 1, Y, X)
    kt = torch.from_numpy(ku[None]).to(torch.complex64)
    maps = estimate_maps(kt, None, "2d")
    m = torch.from_numpy(mask)[None, None, None, :, None]
    op = SenseOperator(maps, m, "2d")
    lam = 1e-2
    ours = cg_sense(op, kt, lam=lam, max_iter=30).x[0, 0].numpy()
    lam_abs = lam * float(op.normal_diagonal().mean())
    write_cfl(tmp_path / "k", np.transpose(ku[:, 0], (2, 1, 0))[:, :, None, :])    # (X, Y, 1, C)
    write_cfl(tmp_path / "s", np.transpose(maps[0, :, 0].numpy(), (2, 1, 0))[:, :, None, :])
    subprocess.run(["bart", "pics", "-l2", "-r", f"{lam_abs:.8g}", "-i", "30", "-w", "1",
                    str(tmp_path / "k"), str(tmp_path / "s"), str(tmp_path / "x")],
                   check=True, capture_output=True)
    bart = read_cfl(tmp_path / "x").reshape(64, 64).T                        # (Y, X)
    ref = SenseOperator(maps, torch.ones_like(m), "2d").adjoint(
        torch.from_numpy(k[None]).to(torch.complex64))[0, 0].numpy()
    support = maps.abs().sum(1)[0, 0].numpy() > 0
    assert abs(_psnr_fit(ours, ref, support) - _psnr_fit(bart, ref, support)) < 0.5
    # Stronger: the two images are the same to single precision, with no rescaling.
    assert np.linalg.norm(ours - bart) / np.linalg.norm(ours) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["2d-odd", "3d", "2dt-frames"])
def test_gpu_operator_matches_cpu(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    op = make_operator(case)
    op_gpu = op.to("cuda")
    assert adjoint_error(op_gpu) < TOL and normal_error(op_gpu) < TOL
    x = random_complex(op.image_shape, seed=13)
    assert torch.allclose(op_gpu.forward(x.cuda()).cpu(), op.forward(x), atol=1e-12)
    y = op.forward(x)
    res_cpu = cg_sense(op, y, lam=1e-2, max_iter=20)
    res_gpu = cg_sense(op_gpu, y.cuda(), lam=1e-2, max_iter=20)
    assert torch.allclose(res_gpu.x.cpu(), res_cpu.x, atol=1e-9 * float(res_cpu.x.abs().max()))


def test_real_3d_poisson_disc_scan_against_bart_reference(real_data: Path) -> None:
    """In-vivo brain, (ky, kz) Poisson disc at R≈7.9, one readout position (a 3D scan
    with X = 1): ESPIRiT on the 2D calibration block + CG-SENSE gets closer to
    BART's own ``pics`` reconstruction than the zero-filled RSS image does.
    Measured: NRMSE 0.164 (CG-SENSE) vs 0.232 (zero-filled); correlation 0.974 vs 0.959.
    """
    from molrecon.physics.espirit import estimate_maps

    with h5py.File(real_file(real_data, "invivo_brain_8coil_poisson_r8.h5"), "r") as f:
        acq = f["dataset/data"][:]
    head = acq["head"]
    k = np.zeros((1, 8, 230, 180, 1), dtype=np.complex64)            # (B, C, D=kz, Y=ky, X)
    for i in range(len(acq)):
        k[0, :, head["idx"]["kspace_encode_step_2"][i], head["idx"]["kspace_encode_step_1"][i],
          0] = acq["data"][i].view(np.complex64)
    kt = torch.from_numpy(k)
    mask = (kt != 0).any(dim=1, keepdim=True)                         # (1, 1, D, Y, 1)
    assert 7.0 < mask.numel() / float(mask.sum()) < 9.0
    maps = estimate_maps(kt, None, "3d")
    x = cg_sense(SenseOperator(maps, mask, "3d"), kt, lam=1e-2, max_iter=50).x
    ours = x[0, :, :, 0].abs().numpy().T                              # (Y, D) like BART's
    zf = torch.sqrt((ifftc(kt, (-3, -2, -1)).abs() ** 2).sum(1))[0, :, :, 0].numpy().T
    ref = np.abs(np.load(real_file(real_data, "invivo_brain_bart_pics_reference.npy"))[..., 0])

    def nrmse(img: np.ndarray) -> float:
        a = float((img * ref).sum() / (img * img).sum())
        return float(np.linalg.norm(a * img - ref) / np.linalg.norm(ref))

    assert nrmse(ours) < 0.2
    assert nrmse(ours) < 0.8 * nrmse(zf)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.96
