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
