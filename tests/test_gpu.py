"""CUDA against the CPU (skipped without a CUDA device; ``pytest -m gpu``): reconstructions,
coil maps, implicit gradients, and the compiled and bf16 steps on the GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from molrecon.config import MolConfig
from molrecon.deq import FixedPointConfig, MolStep, deq_solve
from molrecon.deq.inference import MolEngine, precision_gate
from molrecon.io.detect import read_raw
from molrecon.models import CNNConfig, MolCNN, load_checkpoint, save_checkpoint
from molrecon.problem import from_scan
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(48, 48), coils=4, acceleration=3.0,
                                      acs=12, seed=2), path)
    return read_raw(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.95)
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt", model,
                           MolConfig(alpha=1.0, lam=50.0, cg_iters=5))


def _rel(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a = torch.as_tensor(a).cpu().to(torch.complex128)
    b = torch.as_tensor(b).cpu().to(torch.complex128)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("method", ["sense", "mol"])
def test_cpu_and_cuda_reconstructions_agree(scan: Any, weights: Path, method: str) -> None:
    kw: dict[str, Any] = {"method": method, "tol": 1e-5}
    if method == "mol":
        kw["weights"] = str(weights)
    cpu = reconstruct(scan, ReconConfig(device="cpu", **kw))
    gpu = reconstruct(scan, ReconConfig(device="cuda", **kw))
    assert gpu.report["device"].startswith("cuda")
    assert _rel(gpu.image.data, cpu.image.data) < 1e-3


def test_cpu_and_cuda_coil_maps_agree(scan: Any) -> None:
    """Compared through AᴴA (blind to each map's arbitrary phase) and the support."""
    cpu = from_scan(scan, slice(0, 1), "cpu")
    gpu = from_scan(scan, slice(0, 1), "cuda")
    x = torch.randn(cpu.op.image_shape, dtype=torch.complex64)
    assert _rel(gpu.op.normal(x.to("cuda")), cpu.op.normal(x)) < 1e-4
    assert float((gpu.op.support().cpu() != cpu.op.support()).float().mean()) < 1e-3
    assert _rel(gpu.scale, cpu.scale) < 1e-5


def test_cpu_and_cuda_implicit_gradients_agree(scan: Any) -> None:
    grads = {}
    for dev in ("cpu", "cuda"):
        prob = from_scan(scan, slice(0, 1), dev)
        torch.manual_seed(0)
        prior = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.9).to(dev)
        step = MolStep(prior, MolConfig(alpha=1.0, lam=50.0, cg_iters=5)).to(dev)
        step.exact_dc_grad = True
        aty = prob.op.adjoint(prob.kspace)
        fn = step.bind(normal=prob.op.normal, aty=aty, support=prob.op.support())
        fp = FixedPointConfig(tol=1e-6, max_iter=200, warn=False)
        out = deq_solve(fn, aty.detach(), forward=fp, backward=fp)
        out.x.abs().square().sum().backward()
        grads[dev] = torch.cat([p.grad.flatten().cpu() for p in step.parameters()
                                if p.grad is not None])
    assert _rel(grads["cuda"], grads["cpu"]) < 1e-3


def test_compiled_and_eager_agree_on_cuda(scan: Any, weights: Path) -> None:
    dev = torch.device("cuda")
    loaded = load_checkpoint(weights, map_location=dev)
    prob = from_scan(scan, slice(0, 1), dev)
    x0 = prob.op.adjoint(prob.kspace)
    fp = FixedPointConfig(tol=1e-7, max_iter=300)
    eager = MolEngine.from_loaded(loaded, fp, dev).solve(prob.op, prob.kspace, x0)
    engine = MolEngine.from_loaded(loaded, fp, dev, compile=True)
    first = engine.solve(prob.op, prob.kspace, x0)
    again = engine.solve(prob.op, prob.kspace, x0)          # CUDA-graph replays
    assert eager.converged and first.converged
    assert _rel(first.x, eager.x) < 1e-5
    assert _rel(again.x, first.x) < 1e-6


def test_bf16_prior_runs_on_cuda_and_is_gated(scan: Any, weights: Path) -> None:
    dev = torch.device("cuda")
    loaded = load_checkpoint(weights, map_location=dev)
    prob = from_scan(scan, slice(0, 1), dev)
    x0 = prob.op.adjoint(prob.kspace)
    fp = FixedPointConfig(tol=1e-4, max_iter=100)
    ref = MolEngine.from_loaded(loaded, FixedPointConfig(tol=1e-7, max_iter=300), dev).solve(
        prob.op, prob.kspace, x0).x
    gate = precision_gate(loaded, prob.op, prob.kspace, x0, ref, fixed_point=fp, device=dev)
    assert 0.0 < gate.distance < 0.05
