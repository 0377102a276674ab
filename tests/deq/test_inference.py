"""MOL inference details: a 2D prior on a 3D scan with a single readout position sees the
(partition, phase-encoding) plane, and on the real in-vivo scan that gives a better image
than CG-SENSE against BART's own reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import real_file
from molrecon.config import MolConfig
from molrecon.deq.fixed_point import FixedPointConfig
from molrecon.deq.inference import plane_step, solve_mol_fixed_point
from molrecon.deq.mol import MolStep, regularised_sense
from molrecon.errors import GeometryWarning
from molrecon.io.detect import read_raw
from molrecon.metrics import compare
from molrecon.models import CNNConfig, MolCNN
from molrecon.models.bundled import bundled_checkpoint
from molrecon.recon import ReconConfig, reconstruct


def test_plane_step_applies_the_prior_to_the_partition_phase_plane() -> None:
    torch.manual_seed(0)
    prior = MolCNN(CNNConfig(dims=2, layers=3, channels=6), "lr").double()
    step = MolStep(prior, MolConfig(alpha=1.0, lam=7.0, cg_iters=3)).double()
    plane = plane_step(step)
    x = torch.randn(2, 9, 11, 1, dtype=torch.complex128)
    with torch.no_grad():
        got = plane.prior(x)
        want = prior(x.reshape(2, 1, 9, 11)).reshape(2, 9, 11, 1)
        per_column = prior(x)            # what the plain step would do: 9 images of 11 × 1
    assert torch.allclose(got, want, atol=1e-14)
    assert not torch.allclose(got, per_column)
    assert plane.log_lam is step.log_lam and plane.alpha == step.alpha


def test_real_invivo_scan_mol_beats_cg_sense_against_bart(real_data: Path) -> None:
    """8 coils, Poisson R ≈ 7.9, stored as 3D with one readout position; reference: BART's
    pics reconstruction shipped with the file (PSNR on the least-squares-fitted magnitude)."""
    with pytest.warns(GeometryWarning, match="zero direction vectors"):
        scan = read_raw(real_file(real_data, "invivo_brain_8coil_poisson_r8.h5"))
    ref = np.load(real_file(real_data, "invivo_brain_bart_pics_reference.npy"))       # (ky, kz, maps)
    ref_mag = np.sqrt(np.sum(np.abs(ref) ** 2, axis=-1)).T[None, :, :, None]   # (1, D, Y, 1)
    sense = reconstruct(scan, ReconConfig(method="sense", device="cpu"))
    mol = reconstruct(scan, ReconConfig(method="mol", device="cpu"))
    # the default for a 3D scan with one readout position is the 2D model on its plane
    assert mol.report["weights"] == str(bundled_checkpoint("2d"))
    assert mol.report["converged"]
    s, m = compare(sense.image.data, ref_mag), compare(mol.image.data, ref_mag)
    assert m.psnr > s.psnr + 1.0 and m.ssim > s.ssim


def test_the_tolerance_means_the_alpha_one_residual_at_every_alpha() -> None:
    """At α = 0.5 the solve stops where the α = 1 step's residual is within tol and reports
    a residual that bounds it; stopping on the α = 0.5 step's own residual at tol would
    leave the α = 1 residual above tol (H = 0.95·x, R = 6: the null space dominates)."""
    from test_deq import make_problem, scaled_identity_prior

    from molrecon.deq import solve_fixed_point

    op, aty = make_problem(seed=5, accel=6, acs=2)
    one = MolStep(scaled_identity_prior(0.95), MolConfig(alpha=1.0, lam=20.0, cg_iters=100))
    step_one = one.bind(normal=op.normal, aty=aty)
    step_half = one.with_alpha(0.5).bind(normal=op.normal, aty=aty)
    x0 = regularised_sense(op.normal, aty, lam=20.0)
    cfg = FixedPointConfig(method="plain", tol=1e-4, max_iter=2000, warn=False)

    def alpha_one_residual(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((step_one(x) - x).norm() / x.norm())

    got = solve_mol_fixed_point(step_half, x0, alpha=0.5, config=cfg)
    loose = solve_fixed_point(step_half, x0, config=cfg)
    assert got.converged and loose.converged
    assert alpha_one_residual(got.x) <= 1e-4 < alpha_one_residual(loose.x)
    assert alpha_one_residual(got.x) <= float(got.final_residual.max()) <= 1e-4


def test_lambda_from_the_noise_level_of_each_slice(tmp_path: Path) -> None:
    """A checkpoint with a λ noise rule: ``--lam auto`` gives each slice λ₀ times the rule's
    factor at its estimated σ (in the report), and the slice's image is the one a fixed λ of
    that value gives; ``fixed`` keeps λ₀; a number replaces it. Noisier slices get less λ."""
    from molrecon.io.types import RawScan
    from molrecon.models import load_checkpoint, save_checkpoint
    from molrecon.physics.noise import NoiseLambdaRule
    from molrecon.sim import SimulationConfig, simulate_to_file

    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=6), "lr")
    rule = NoiseLambdaRule(sigma_ref=0.01, exponent=0.7, min_factor=0.05, max_factor=8.0,
                           accel_ref=4.0, accel_exponent=0.5)
    weights = save_checkpoint(tmp_path / "ruled.pt", model,
                              MolConfig(alpha=1.0, lam=30.0, cg_iters=4), lam_noise=rule)
    assert load_checkpoint(weights).lam_noise == rule
    path = tmp_path / "s.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(64, 64), coils=4, slices=2,
                                      acceleration=2.0, seed=5, noise=0.02), path)
    scan = read_raw(path)
    k = scan.kspace.copy()
    g = np.random.default_rng(0)
    extra = (g.standard_normal(k[1].shape) + 1j * g.standard_normal(k[1].shape)) * np.abs(
        k[1]).max() * 0.01
    k[1] = (k[1] + extra * (k[1] != 0)).astype(np.complex64)   # the second slice: noisier
    scan = RawScan(**{**scan.__dict__, "kspace": k})
    cfg = dict(method="mol", device="cpu", weights=str(weights), tol=1e-6, max_iter=300)
    auto = reconstruct(scan, ReconConfig(**cfg))
    sig = auto.report["noise_sigma_per_item"]
    lams = auto.report["lambda_per_item"]
    assert sig[1] > 2 * sig[0]
    accel = auto.report["effective_acceleration_per_item"]
    assert accel == pytest.approx([scan.acceleration] * 2, rel=1e-3)
    assert lams == pytest.approx([30.0 * rule.factor(s, r) for s, r in zip(sig, accel)],
                                 rel=1e-5)
    assert lams[1] < lams[0]
    assert auto.report["lambda_noise_rule"]["exponent"] == 0.7
    import json

    json.dumps(auto.report, allow_nan=False)                  # strict JSON
    by_slice = reconstruct(scan, ReconConfig(**cfg, batch_size=1))   # two chunks
    for key in ("noise_sigma_per_item", "effective_acceleration_per_item", "lambda_per_item"):
        assert by_slice.report[key] == pytest.approx(auto.report[key], rel=1e-6)
    fixed = reconstruct(scan, ReconConfig(**cfg, lam="fixed"))
    assert fixed.report["lambda_per_item"] == [30.0, 30.0]
    assert "noise_sigma_per_item" not in fixed.report
    for i in (0, 1):
        one = reconstruct(scan, ReconConfig(**cfg, lam=lams[i]))
        assert one.report["lambda_per_item"] == pytest.approx([lams[i]] * 2)
        a, b = auto.image.data[i], one.image.data[i]
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4
    assert np.linalg.norm(auto.image.data[1] - fixed.image.data[1]) > 1e-3 * np.linalg.norm(
        fixed.image.data[1])
