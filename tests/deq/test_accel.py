"""The fast MOL step (``reconstruct --compile``, ``--precision``): the same fixed point as the
eager step, bf16 only where asked or gated, CUDA graphs never on the CPU, and batches that
halve on an out-of-memory error instead of crashing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from molrecon import recon as recon_mod
from molrecon.cli import app
from molrecon.cli.demo import example_paths
from molrecon.config import MolConfig
from molrecon.deq import FixedPointConfig, MolStep, solve_fixed_point
from molrecon.deq.accel import FastDataConsistency, FrozenPrior, fast_step, resolve_precision
from molrecon.deq.inference import MolEngine, precision_gate
from molrecon.deq.mol import support_of
from molrecon.errors import ConfigError
from molrecon.io.detect import read_raw
from molrecon.models import CNNConfig, MolCNN, load_checkpoint, save_checkpoint
from molrecon.physics.sense import SenseOperator, normal_from_parts
from molrecon.recon import ReconConfig, load_engine, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

runner = CliRunner()


def _case(kind: str = "2d", b: int = 2, c: int = 3, d: int = 1, y: int = 16, x: int = 12
          ) -> tuple[SenseOperator, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(b, c, d, y, x, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()
    mask = torch.rand(b, 1, d, y, 1, generator=g) < 0.5
    mask[..., y // 2 - 2:y // 2 + 2, :] = True
    op = SenseOperator(maps, mask, kind)
    truth = torch.randn(b, d, y, x, dtype=torch.complex64, generator=g)
    k = op.forward(truth)
    return op, k, truth


def _loaded(tmp_path: Path) -> Any:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.95)
    path = save_checkpoint(tmp_path / "tiny.pt", model, MolConfig(alpha=1.0, lam=50.0, cg_iters=3))
    return load_checkpoint(path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("kind,d", [("2d", 1), ("3d", 4)])
def test_normal_with_phase_encoding_ffts_equals_the_operator(kind: str, d: int) -> None:
    op, _, truth = _case(kind, d=d)
    parts = op.normal_parts()
    assert -1 not in parts.fft_dims and -2 in parts.fft_dims     # no FFT along the readout
    got = normal_from_parts(truth, *parts)
    assert _rel(got, op.normal(truth)) < 1e-6


@pytest.mark.parametrize("dims,d,constraint,skip,ensemble", [
    (2, 1, "sn", 0.0, 1), (3, 4, "sn", 0.0, 1), (2, 1, "sn", 0.0, 4),
    (2, 1, "lr", 0.97, 1), (3, 4, "lr", 0.97, 2)])
def test_frozen_prior_is_the_model_bit_for_bit(dims: int, d: int, constraint: str, skip: float,
                                               ensemble: int) -> None:
    # The identity path and the flip ensemble too: the bundled LR models have the path.
    torch.manual_seed(1)
    model = MolCNN(CNNConfig(dims=dims, layers=3, channels=8, skip=skip, ensemble=ensemble),
                   constraint, 0.95)  # type: ignore[arg-type]
    x = torch.randn(2, d, 16, 12, dtype=torch.complex64)
    with torch.no_grad():
        assert torch.equal(FrozenPrior(model)(x), model(x))


def test_fast_step_reaches_the_eager_fixed_point() -> None:
    op, k, _ = _case()
    torch.manual_seed(1)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.95).eval()
    step = MolStep(model, MolConfig(alpha=1.0, lam=50.0, cg_iters=3))
    cfg = FixedPointConfig(tol=1e-7, max_iter=300, warn=False)
    with torch.no_grad():
        aty = op.adjoint(k)
        eager = solve_fixed_point(step.bind(normal=op.normal, aty=aty, support=support_of(op)),
                                  aty, config=cfg)
        fast = fast_step(prior=FrozenPrior(model), alpha=1.0, lam=step.lam,
                         dc=FastDataConsistency(3, compile=False, device=torch.device("cpu")),
                         parts=op.normal_parts(), aty=aty, support=support_of(op))
        res = solve_fixed_point(fast, aty, config=cfg)
    assert eager.converged and res.converged
    assert _rel(res.x, eager.x) < 1e-5


def test_defaults_keep_the_eager_step(tmp_path: Path) -> None:
    engine = MolEngine.from_loaded(_loaded(tmp_path), FixedPointConfig(), torch.device("cpu"))
    assert engine.fast is None and engine.precision == "fp32" and not engine.compile
    assert engine.report_header()["ensemble"] == 1


def test_the_engine_sets_the_flip_ensemble_and_the_fixed_point_moves(tmp_path: Path) -> None:
    op, k, _ = _case()
    xs = {}
    for g in (1, 4):
        (tmp_path / str(g)).mkdir()
        engine = MolEngine.from_loaded(_loaded(tmp_path / str(g)), FixedPointConfig(tol=1e-6),
                                       torch.device("cpu"), ensemble=g)
        assert engine.report_header()["ensemble"] == g
        assert engine.step.prior.config.ensemble == g
        res = engine.solve(op, k, op.adjoint(k))
        assert res.converged
        xs[g] = res.x
    assert _rel(xs[4], xs[1]) > 1e-4               # another operator, another fixed point


def test_bf16_prior_passes_the_gate_on_a_small_case(tmp_path: Path) -> None:
    op, k, truth = _case()
    loaded = _loaded(tmp_path)
    fp = FixedPointConfig(tol=1e-4, max_iter=100)
    engine = MolEngine.from_loaded(loaded, fp, torch.device("cpu"), precision="bf16")
    assert engine.precision == "bf16" and engine.fast is not None
    gate = precision_gate(loaded, op, k, op.adjoint(k), truth, fixed_point=fp,
                          device=torch.device("cpu"))
    assert gate.distance > 0.0                                    # bf16 did run
    assert gate.passed == (abs(gate.psnr_change_db) <= 0.05 and gate.distance <= 1e-3)
    assert set(gate.record()) >= {"passed", "psnr_change_db", "distance"}


def test_auto_precision_is_bf16_only_on_cuda_with_a_passed_gate() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    passed = {"bf16_gate": {"passed": True}}
    assert resolve_precision("auto", cuda, passed) == "bf16"
    assert resolve_precision("auto", cpu, passed) == "fp32"
    assert resolve_precision("auto", cuda, {"bf16_gate": {"passed": False}}) == "fp32"
    assert resolve_precision("auto", cuda, {}) == "fp32"
    assert resolve_precision("auto", cuda, {"bf16_gate": "yes"}) == "fp32"
    assert resolve_precision("bf16", cpu, {}) == "bf16"
    assert resolve_precision("fp32", cuda, passed) == "fp32"
    with pytest.raises(ConfigError, match="--precision"):
        resolve_precision("fp16", cpu, {})


def test_cpu_path_never_asks_for_cuda_graphs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    modes: list[str] = []

    def fake_compile(fn: Any, **kwargs: Any) -> Any:
        modes.append(kwargs.get("mode", "default"))
        return fn

    def no_graphs() -> None:
        raise AssertionError("CUDA graphs on the CPU path")

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", no_graphs)
    monkeypatch.setattr(torch.cuda, "graph", no_graphs)
    op, k, _ = _case()
    engine = MolEngine.from_loaded(_loaded(tmp_path), FixedPointConfig(max_iter=5),
                                   torch.device("cpu"), compile=True)
    engine.solve(op, k, op.adjoint(k))
    assert modes and all(m == "default" for m in modes)


@pytest.mark.slow
def test_compiled_engine_reaches_the_eager_fixed_point(tmp_path: Path) -> None:
    op, k, _ = _case()
    loaded = _loaded(tmp_path)
    fp = FixedPointConfig(tol=1e-7, max_iter=300)
    x0 = op.adjoint(k)
    eager = MolEngine.from_loaded(loaded, fp, torch.device("cpu")).solve(op, k, x0)
    compiled = MolEngine.from_loaded(loaded, fp, torch.device("cpu"), compile=True)
    got = compiled.solve(op, k, x0)
    assert eager.converged and got.converged
    assert _rel(got.x, eager.x) < 1e-5


# ---------------------------------------------------------------- out of memory: halve and retry
@pytest.fixture(scope="module")
def three_slices(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("scan") / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(24, 24), coils=3, acceleration=2.0,
                                      acs=10, seed=5), path)
    scan = read_raw(path)
    rep = (3, 1, 1, 1, 1)
    return scan.replace(kspace=np.tile(scan.kspace, rep), mask=np.tile(scan.mask, rep),
                        calib=np.tile(scan.calib, rep))


def _oom_above(limit: int, monkeypatch: pytest.MonkeyPatch, message: str) -> list[int]:
    sizes: list[int] = []
    original = recon_mod._reconstruct_chunk

    def chunk(run: Any, sl: slice, ci: int, n: int) -> Any:
        sizes.append(sl.stop - sl.start)
        if sl.stop - sl.start > limit:
            raise torch.cuda.OutOfMemoryError(message) if "CUDA" in message \
                else RuntimeError(message)
        return original(run, sl, ci, n)

    monkeypatch.setattr(recon_mod, "_reconstruct_chunk", chunk)
    return sizes


@pytest.mark.parametrize("message", [
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory"])
def test_out_of_memory_halves_the_batch_and_retries(three_slices: Any, message: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ReconConfig(method="sense", device="cpu", batch_size=3)
    want = reconstruct(three_slices, ReconConfig(method="sense", device="cpu", batch_size=1))
    sizes = _oom_above(1, monkeypatch, message)
    got = reconstruct(three_slices, cfg)
    assert sizes == [3, 1, 1, 1]
    assert got.report["out_of_memory_halvings"] == 1 and got.report["batch_size"] == 1
    np.testing.assert_allclose(got.image.data, want.image.data, rtol=0, atol=1e-5 * float(
        np.abs(want.image.data).max()))


def test_out_of_memory_at_one_slice_and_other_errors_are_raised(
        three_slices: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _oom_above(0, monkeypatch, "CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        reconstruct(three_slices, ReconConfig(method="sense", device="cpu", batch_size=2))
    monkeypatch.undo()
    _oom_above(1, monkeypatch, "some other failure")
    with pytest.raises(RuntimeError, match="some other failure"):
        reconstruct(three_slices, ReconConfig(method="sense", device="cpu", batch_size=2))


# ---------------------------------------------------------------- options
def test_recon_config_validates_the_new_options() -> None:
    with pytest.raises(ConfigError, match="--precision"):
        ReconConfig(precision="fp16")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--compile"):
        ReconConfig(compile="yes")  # type: ignore[arg-type]
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ConfigError, match="--anderson-memory"):
            ReconConfig(anderson_memory=bad)  # type: ignore[arg-type]


def test_the_anderson_memory_reaches_the_solver_and_leaves_the_fixed_point() -> None:
    """``anderson_memory`` sets the engine's solver, and only the speed: two memories
    reach the same fixed point (to the tolerance's order)."""
    engine = load_engine(ReconConfig(anderson_memory=9), "2d", torch.device("cpu"))
    assert engine.fixed_point.memory == 9
    scan = read_raw(example_paths()[0])
    short, long = (reconstruct(scan, ReconConfig(device="cpu", tol=1e-5, anderson_memory=m))
                   for m in (2, 12))
    a, b = short.image.data, long.image.data
    assert short.report["converged"] and long.report["converged"]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-3
    # On the example scan the longer history needs fewer steps (27 against 19).
    assert short.report["iterations"] > long.report["iterations"]


@pytest.mark.parametrize("args,name", [
    (["--precision", "fp16"], "--precision"),
    (["--method", "sense", "--compile"], "--compile"),
    (["--method", "zf", "--precision", "bf16"], "--precision")])
def test_cli_refuses_bad_fast_step_options(tmp_path: Path, args: list[str], name: str) -> None:
    res = runner.invoke(app, ["reconstruct", str(tmp_path / "in.h5"), str(tmp_path / "o.nii"),
                              *args])
    assert res.exit_code == 2
    assert name in res.output + (res.stderr or "")


def test_cli_precision_bf16_runs_and_is_reported(tmp_path: Path) -> None:
    import json

    raw = tmp_path / "scan.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(24, 24), coils=3, acceleration=2.0,
                                      acs=10, seed=5), raw)
    weights = _loaded(tmp_path).path
    report = tmp_path / "r.json"
    res = runner.invoke(app, ["reconstruct", str(raw), str(tmp_path / "o.nii"), "--weights",
                              str(weights), "--precision", "bf16", "--device", "cpu",
                              "--max-iter", "5", "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["precision"] == "bf16" and rep["compile"] is False
    assert rep["config"]["precision"] == "bf16"


def test_a_per_item_lambda_is_each_item_solved_at_its_own_lambda() -> None:
    """λ scaled per batch item (λ from each slice's noise level) gives each item the step of
    a model with that λ, in the eager and in the fast step; the per-item shift's gradient
    in the exact backward is each item's own."""
    op, k, _ = _case()
    torch.manual_seed(1)
    model = MolCNN(CNNConfig(dims=2, layers=3, channels=8), "sn", 0.95).eval()
    scale = torch.tensor([1.0, 0.25])
    x = torch.randn(2, 1, 16, 12, dtype=torch.complex64)
    with torch.no_grad():
        aty = op.adjoint(k)
        both = MolStep(model, MolConfig(alpha=0.5, lam=40.0, cg_iters=4))(
            x, normal=op.normal, aty=aty, support=support_of(op), lam_scale=scale)
        fast = fast_step(prior=FrozenPrior(model), alpha=0.5, lam=torch.tensor(40.0),
                         dc=FastDataConsistency(4, compile=False, device=torch.device("cpu")),
                         parts=op.normal_parts(), aty=aty, support=support_of(op),
                         lam_scale=scale)(x)
        for i, lam in enumerate((40.0, 10.0)):
            alone = MolStep(model, MolConfig(alpha=0.5, lam=lam, cg_iters=4))(
                x, normal=op.normal, aty=aty, support=support_of(op))
            assert _rel(both[i], alone[i]) < 1e-6
            assert _rel(fast[i], alone[i]) < 1e-5
    with pytest.raises(ValueError, match="2 batch items"):
        MolStep(model)(x, normal=op.normal, aty=aty, lam_scale=torch.ones(3))
    # The exact backward: the gradient of the per-item shift is each item's own.
    step = MolStep(model, MolConfig(alpha=1.0, lam=40.0, cg_iters=4, learn_lam=True))
    step.exact_dc_grad = True
    out = step(x, normal=op.normal, aty=aty, lam_scale=scale)
    out.real[1].sum().backward()
    g_both = step.log_lam.grad.clone()
    step.log_lam.grad = None
    single = MolStep(model, MolConfig(alpha=1.0, lam=10.0, cg_iters=4, learn_lam=True))
    single.exact_dc_grad = True
    single(x, normal=op.normal, aty=aty).real[1].sum().backward()
    assert torch.allclose(g_both, single.log_lam.grad, rtol=1e-4)
