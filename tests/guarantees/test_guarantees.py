"""The guarantees module: certificate vs dense Jacobians, verdicts on networks with known
Lipschitz constants, uniqueness of the fixed point, and the robustness attack against the
analytic worst case of a linear prior. Tiny problems (≤ 24×24, ≤ 4 coils, ≤ 3×8 CNNs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from molrecon.deq import MolConfig
from molrecon.errors import ConfigError
from molrecon.guarantees import (
    CheckConfig,
    RobustnessConfig,
    StepContraction,
    certificate_for,
    check_lipschitz,
    check_uniqueness,
    decide,
    global_bound,
    layer_norms_at_size,
    load_problems,
    local_estimates,
    operator_norm,
    robustness,
    robustness_bounds,
)
from molrecon.models import CNNConfig, LoadedModel, MolCNN, load_checkpoint, save_checkpoint
from molrecon.physics.sense import SenseOperator
from molrecon.problem import Problem, with_sense_start

# ------------------------------------------------------------------------------------ helpers


def tiny_problem(y: int = 16, x: int = 16, coils: int = 4, *, step: int = 2, acs: int = 4,
                 batch: int = 1, seed: int = 0,
                 dtype: torch.dtype = torch.complex64) -> Problem:
    """Smooth coil maps with Σ|S_c|² = 1, every ``step``-th line plus ``acs`` centre lines."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, y, dtype=torch.float64),
                            torch.linspace(-1, 1, x, dtype=torch.float64), indexing="ij")
    maps = []
    for c in range(coils):
        ang = 2 * math.pi * c / coils
        mag = torch.exp(-((yy - 0.8 * math.sin(ang)) ** 2 + (xx - 0.8 * math.cos(ang)) ** 2))
        maps.append(mag * torch.exp(1j * (0.7 * c * yy + 0.3 * (c - 1) * xx)))
    s = torch.stack(maps)                                                  # (C, Y, X)
    s = s / torch.sqrt((s.abs() ** 2).sum(0, keepdim=True))
    s = s[None, :, None].expand(batch, -1, -1, -1, -1).to(dtype)           # (B, C, 1, Y, X)
    mask = torch.zeros(1, 1, 1, y, 1, dtype=torch.bool)
    mask[..., ::step, :] = True
    mask[..., y // 2 - acs // 2: y // 2 + acs // 2, :] = True
    op = SenseOperator(s, mask, "2d")
    img = torch.exp(-(yy ** 2 + (xx / 0.7) ** 2) * 2) * torch.exp(1j * 0.5 * yy)
    img = img[None, None].expand(batch, 1, -1, -1).to(dtype)               # (B, 1, Y, X)
    noise = torch.randn((*op.kspace_shape, 2), generator=g, dtype=torch.float64) * 1e-3
    k = op.forward(img) + torch.view_as_complex(noise).to(dtype)
    return with_sense_start(op, k)


def designed_model(weights: list[torch.Tensor], constraint: str = "lr") -> MolCNN:
    """A bias-free MolCNN with 1×1 kernels set to the given channel matrices."""
    channels = weights[0].shape[0] if len(weights) > 1 else 2
    model = MolCNN(CNNConfig(layers=len(weights), channels=channels, kernel=1, bias=False),
                   constraint)  # type: ignore[arg-type]
    with torch.no_grad():
        for conv, w in zip(model.convs, weights):
            conv.weight.copy_(w.reshape(*w.shape, 1, 1))
    return model


def as_loaded(tmp_path: Path, model: MolCNN, *, lam: float = 4.0, alpha: float = 1.0,
              name: str = "m.pt") -> LoadedModel:
    path = save_checkpoint(tmp_path / name, model, MolConfig(alpha=alpha, lam=lam), force=True)
    return load_checkpoint(path)


def linear_model(c: float) -> MolCNN:
    """H(x) = c·x (one 1×1 layer, no bias): Lip(H) = |c| exactly."""
    return designed_model([c * torch.eye(2)])


def half_relu_model() -> MolCNN:
    """H(x) = ½·relu(x) per real channel, written as [I, −½I]·relu([I; I]·x).

    Lip(H) = ½, but the product of the layer norms is √2 · √1.25 ≈ 1.58.
    """
    eye = torch.eye(2)
    return designed_model([torch.cat([eye, eye], 0), torch.cat([eye, -0.5 * eye], 1)])


def dense_jacobian_norm(model: MolCNN, x: torch.Tensor) -> float:
    """‖J_H(x)‖₂ from the explicit Jacobian of the real view (float64)."""
    xr = torch.view_as_real(x).reshape(-1)

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(model(torch.view_as_complex(v.reshape(*x.shape, 2)))).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, xr)                        # (n, n)
    return float(torch.linalg.matrix_norm(jac, ord=2))


# ------------------------------------------------------------------------------ certificate


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_certified_bound_dominates_dense_jacobian(seed: int) -> None:
    torch.manual_seed(seed)
    model = MolCNN(CNNConfig(layers=3, channels=4), "lr").double()
    with torch.no_grad():
        for conv in model.convs:
            conv.weight.mul_(2.0 + seed)        # far from contractive: the bound must still hold
    bound = global_bound(model).bound
    x = torch.randn(1, 1, 8, 8, dtype=torch.complex128)
    dense = dense_jacobian_norm(model, x)
    assert 0 < dense <= bound
    est = local_estimates(model, [x], power_iters=60, ratio_steps=0)
    # The power iteration converges to the dense norm from below.
    assert dense * 0.97 <= est.points[0].power <= dense * (1 + 1e-9)


def test_linear_layer_certificate_is_tight_and_size_independent() -> None:
    torch.manual_seed(3)
    model = MolCNN(CNNConfig(layers=1, kernel=3), "lr").double()           # one linear conv
    gb = global_bound(model, size=(24, 24), layer_iters=300)
    assert gb.all_sizes and len(gb.layer_bounds) == 1
    x = torch.zeros(1, 1, 24, 24, dtype=torch.complex128)
    dense = dense_jacobian_norm(model, x)                                  # exact norm at 24×24
    assert dense <= gb.bound
    assert dense >= 0.9 * gb.bound                # zero padding costs little at 24×24
    assert gb.measured_layer_norms is not None
    assert gb.measured_layer_norms[0] == pytest.approx(dense, rel=2e-3)
    # Smaller images can only have smaller norms; the certificate covers them all.
    small = layer_norms_at_size(model, (5, 7), iters=300)[0]
    assert small <= gb.bound and small <= gb.measured_layer_norms[0] * (1 + 1e-6)


def test_layer_norms_3d_model_below_bound() -> None:
    torch.manual_seed(4)
    model = MolCNN(CNNConfig(dims=3, layers=2, channels=3), "lr")
    gb = global_bound(model, size=(6, 8, 8), layer_iters=100)
    assert gb.measured_layer_norms is not None
    for measured, bound in zip(gb.measured_layer_norms, gb.layer_bounds):
        assert 0.5 * bound < measured <= bound
    with pytest.raises(ConfigError):
        layer_norms_at_size(MolCNN(CNNConfig(layers=2, channels=3), "lr"), (4, 8, 8))


# ------------------------------------------------------------------------------ verdicts


def test_decide_rules() -> None:
    assert decide(certified_bound=0.9, local_max=0.5)[0] == "certified"
    assert decide(certified_bound=3.0, local_max=0.9)[0] == "empirical"
    assert decide(certified_bound=3.0, local_max=1.0)[0] == "violated"
    assert decide(certified_bound=0.9, local_max=0.5, uniqueness_consistent=False)[0] == "violated"
    # Expansive but monotone: the verdict says so; not monotone, or uniqueness broken: violated.
    assert decide(certified_bound=3.0, local_max=1.2, monotone_max=0.6)[0] == "monotone"
    assert decide(certified_bound=3.0, local_max=1.2, monotone_max=1.0)[0] == "violated"
    verdict, reasons = decide(certified_bound=3.0, local_max=1.2, monotone_max=0.6,
                              uniqueness_consistent=False)
    assert verdict == "violated" and len(reasons) == 2


def test_certified_linear_model(tmp_path: Path) -> None:
    loaded = as_loaded(tmp_path, linear_model(0.5))
    said: list[str] = []
    rep = check_lipschitz(loaded, [tiny_problem(batch=2)], CheckConfig(power_iters=10),
                          progress=said.append)
    assert rep.verdict == "certified"
    # the stages as they go: the bound, the solve with its residual, one line per point
    assert said[0].startswith("certified bound")
    assert any(s.startswith("MOL fixed points 1/1") and "residual" in s for s in said)
    assert [s for s in said if s.startswith("local estimates")] == [
        "local estimates: point 1/2 (, slice 0)", "local estimates: point 2/2 (, slice 1)"]
    assert rep.global_bound.bound == pytest.approx(0.5, rel=1e-9)
    assert rep.local.power.min == pytest.approx(0.5, rel=1e-4)          # linear: J = 0.5·I
    assert rep.local.ratio.max == pytest.approx(0.5, rel=1e-4)
    assert len(rep.local.points) == 2 and all(p.converged for p in rep.local.points)
    assert all(p.point == "fixed point" for p in rep.local.points)
    assert rep.contraction_certified.margin == pytest.approx(0.5, rel=1e-9)
    assert rep.contraction_certified.factor == pytest.approx(0.5, rel=1e-9)   # α = 1
    assert rep.contraction_certified.alpha_max == pytest.approx(2 / 1.5, rel=1e-9)
    rb = rep.robustness
    assert rb.basis == "certified" and 0.95 < rep.op_norm <= 1 + 1e-5
    assert rb.tight == pytest.approx(0.5 * math.sqrt(4.0 / 0.5), rel=1e-6)
    assert rb.paper == pytest.approx(4.0 / 0.5 * rep.op_norm, rel=1e-6)
    d = rep.as_dict()
    assert d["verdict"] == "certified" and d["certified"]["holds_for_all_image_sizes"] is True


def test_empirical_relu_model(tmp_path: Path) -> None:
    loaded = as_loaded(tmp_path, half_relu_model())
    rep = check_lipschitz(loaded, [tiny_problem()], CheckConfig(power_iters=10))
    assert rep.global_bound.bound == pytest.approx(math.sqrt(2) * math.sqrt(1.25), rel=1e-6)
    assert rep.local.power.max == pytest.approx(0.5, rel=1e-3)       # reaches Lip(H) = ½
    assert rep.local.max <= 0.5 * (1 + 1e-4)
    assert rep.verdict == "empirical"
    # The margin of uniqueness and robustness comes from μ, the top of H's numerical range
    # (½ here too: H's Jacobian is ½ on the active channels, 0 elsewhere).
    assert rep.robustness.basis == "monotone"
    assert rep.robustness.lipschitz == pytest.approx(0.5, rel=1e-3)
    assert rep.local.monotone_max <= rep.local.max + 1e-6
    assert not rep.contraction_certified.contracts and rep.contraction_local.contracts


def rotation_model(gain: float, degrees: float) -> MolCNN:
    """H(x) = gain·e^{iθ}·x (a 1×1 layer rotating the (re, im) channel pair): ‖J‖ = gain, and
    ½(J + Jᵀ) = gain·cos θ · I, so F = I − H is (1 − gain·cos θ)-monotone."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return designed_model([gain * torch.tensor([[c, -s], [s, c]])])


def test_expansive_but_monotone_model(tmp_path: Path) -> None:
    """‖J‖ = 1.2 but μ = 0.6: verdict monotone, the margin 0.4 from μ, and the fixed point
    unique from four starts (Anderson converges where the α = 1 step expands)."""
    loaded = as_loaded(tmp_path, rotation_model(1.2, 60.0))
    rep = check_lipschitz(loaded, [tiny_problem()],
                          CheckConfig(power_iters=20, max_iter=200, uniqueness=True))
    assert rep.local.max == pytest.approx(1.2, rel=1e-3)
    assert rep.local.monotone_max == pytest.approx(0.6, rel=1e-3)
    assert rep.verdict == "monotone", rep.reasons
    assert rep.robustness.basis == "monotone"
    assert rep.robustness.margin == pytest.approx(0.4, rel=1e-3)
    assert rep.uniqueness is not None and rep.uniqueness.consistent
    assert all(rep.uniqueness.converged)
    assert not rep.contraction_local.contracts


def test_violated_model(tmp_path: Path) -> None:
    loaded = as_loaded(tmp_path, linear_model(1.5))
    rep = check_lipschitz(loaded, [tiny_problem()], CheckConfig(power_iters=5, max_iter=50))
    assert rep.verdict == "violated"
    assert rep.local.max == pytest.approx(1.5, rel=1e-3)
    assert "not a contraction" in rep.reasons[0]
    assert rep.robustness.tight is None and rep.robustness.paper is None
    assert rep.contraction_local.alpha_max is None and not rep.contraction_local.contracts


def test_diverging_model_falls_back_to_cg_sense(tmp_path: Path) -> None:
    # H(x) = 1e20·x overflows float32 within two MOL steps (and in the power iteration).
    loaded = as_loaded(tmp_path, linear_model(1e20))
    rep = check_lipschitz(loaded, [tiny_problem()], CheckConfig(power_iters=3, ratio_steps=2))
    assert rep.local.points[0].point == "cg-sense"
    assert rep.local.points[0].converged is False
    assert rep.verdict == "violated"
    assert json_safe(rep.as_dict())


def json_safe(d: dict[str, object]) -> bool:
    import json

    json.loads(json.dumps(d, allow_nan=False))
    return True


def test_step_contraction_formula() -> None:
    sc = StepContraction(alpha=0.5, lipschitz=0.8)
    assert sc.factor == pytest.approx(max(1 - 0.5 * 0.2, 0.5 * 1.8 - 1))
    assert StepContraction(alpha=1.2, lipschitz=0.8).factor == pytest.approx(1.2 * 1.8 - 1)
    assert not StepContraction(alpha=1.12, lipschitz=0.8).contracts       # α ≥ 2/(1 + L)
    assert robustness_bounds(lam=100.0, lipschitz=0.98, op_norm=1.0, basis="x").tight == \
        pytest.approx(0.5 * math.sqrt(100 / 0.02))


# ------------------------------------------------------------------------------ uniqueness


def test_unique_fixed_point_from_all_starts() -> None:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(layers=3, channels=8), "sn", 0.9).double()
    prob = tiny_problem(dtype=torch.complex128)
    from molrecon.deq import MolStep

    step = MolStep(model, MolConfig(alpha=1.0, lam=4.0, learn_lam=False))
    bound = global_bound(model).bound
    res = check_uniqueness(step, prob, lipschitz=bound, basis="certified", tol=1e-11,
                           max_iter=300)
    assert res.starts == ("zero", "zero-filled", "cg-sense", "random")
    assert all(res.converged)
    assert res.max_distance < 1e-8
    assert res.bound is not None and res.max_distance <= res.bound
    assert res.consistent is True


# ------------------------------------------------------------------------------ robustness


def test_attack_reaches_analytic_worst_case_of_linear_prior(tmp_path: Path) -> None:
    c, lam = 0.5, 4.0
    loaded = as_loaded(tmp_path, linear_model(c), lam=lam)
    prob = tiny_problem(8, 8, coils=2, step=3, acs=2, dtype=torch.complex128)
    # Dense K = ((1 − c)I + λAᴴA)⁻¹ λAᴴ restricted to sampled k-space entries.
    n = 64
    basis = torch.eye(n, dtype=torch.complex128).reshape(n, 1, 8, 8)
    a_cols = torch.stack([prob.op.forward(basis[j:j + 1]).reshape(-1) for j in range(n)], 1)
    rows = (prob.support().expand(prob.kspace.shape) != 0).reshape(-1)
    a = a_cols[rows]                                                       # (m, n)
    lam_eff = float(torch.exp(torch.tensor(math.log(lam))))                # λ as MolStep stores it
    k = torch.linalg.solve((1 - c) * torch.eye(n, dtype=a.dtype) + lam_eff * a.conj().T @ a,
                           lam_eff * a.conj().T)
    sigma = float(torch.linalg.matrix_norm(k, ord=2))
    said: list[str] = []
    rep = robustness(loaded, [prob], RobustnessConfig(eps=(0.01, 0.05), steps=15,
                                                      unrolled_k=3), progress=said.append)
    assert [s.split(",")[0] for s in said] == [
        "fixed point", "MOL attack ε=0.01", "unrolled-3 attack ε=0.01", "MOL attack ε=0.05",
        "unrolled-3 attack ε=0.05"]
    for att in rep.mol:
        assert 0.95 * sigma <= att.amplification <= sigma * (1 + 1e-6)
        assert att.converged
        # the paper-style bound at the Δb found is a valid upper bound
        assert att.paper_at_found is not None and att.amplification <= att.paper_at_found
    assert rep.bounds.basis == "certified"
    assert rep.bounds.tight is not None and sigma <= rep.bounds.tight
    assert rep.bounds.paper is not None and rep.bounds.tight <= rep.bounds.paper
    # The unrolled network is linear too: its amplification is that of its own dense map.
    assert len(rep.unrolled) == 2 and all(u.amplification > 0 for u in rep.unrolled)
    assert all(u.paper_at_found is None for u in rep.unrolled)
    d = rep.as_dict()
    assert d["mol"][0]["eps"] == 0.01 and d["unrolled"][0]["network"] == "unrolled-3"


def test_robustness_local_basis_takes_the_larger_of_power_and_lanczos(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncertified prior (½·relu: bound 1.58, Lip ½): the bounds rest on the local estimate,
    the larger of the power iteration and Lanczos. A power iteration made to read low (0.1)
    is overruled by Lanczos, which reads the true ½; without Lanczos the low value stands."""
    import importlib

    from molrecon.models.lipschitz import PowerEstimate

    rob = importlib.import_module("molrecon.guarantees.robustness")   # the module, not the function

    def low(*args: object, **kwargs: object) -> PowerEstimate:
        return PowerEstimate(value=0.1, iterations=1, converged=False)

    monkeypatch.setattr(rob, "jacobian_norm", low)
    loaded = as_loaded(tmp_path, half_relu_model())
    prob = tiny_problem(8, 8, coils=2, step=3, acs=2)
    base: dict[str, Any] = {"eps": (0.01,), "steps": 1, "unrolled_k": 0}
    with_lz = robustness(loaded, [prob], RobustnessConfig(**base, lanczos_steps=10))
    # With Lanczos steps the margin comes from μ, read by Lanczos on ½(J + Jᵀ) (½ here: the
    # Jacobian is symmetric), not from the low power iteration.
    assert with_lz.bounds.basis == "monotone"
    assert with_lz.bounds.lipschitz == pytest.approx(0.5, rel=1e-4)
    without = robustness(loaded, [prob], RobustnessConfig(**base, lanczos_steps=0))
    assert without.bounds.basis == "local"
    assert without.bounds.lipschitz == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lanczos_steps"):
        RobustnessConfig(lanczos_steps=-1)


# ------------------------------------------------------------------------------ misc


def test_operator_norm_fully_sampled_is_one() -> None:
    prob = tiny_problem(step=1, dtype=torch.complex128)           # Σ|S|² = 1, all lines
    assert operator_norm(prob.op, iters=10) == pytest.approx(1.0, abs=1e-9)
    under = tiny_problem(step=3, dtype=torch.complex128)
    assert 0.5 < operator_norm(under.op, iters=30) <= 1.0 + 1e-9


def test_certificate_for_is_plain_and_stored(tmp_path: Path) -> None:
    model = linear_model(0.5)
    prob = tiny_problem(batch=2)
    cert = certificate_for(model, [prob.start], data=["a.h5"], power_iters=5, ratio_steps=2)
    assert cert["points"] == 2 and cert["data"] == ["a.h5"]
    assert cert["local_max"] == pytest.approx(0.5, rel=1e-4)
    assert cert["certified_bound"] == pytest.approx(0.5, rel=1e-9)
    assert cert["verdict"] == "certified" and "date" in cert
    path = save_checkpoint(tmp_path / "c.pt", model, MolConfig(), certificate=cert)
    stored = load_checkpoint(path).certificate
    assert stored["local_power"] == cert["local_power"] and stored["points"] == 2
    # the LoadedModel form gives the same numbers
    again = certificate_for(load_checkpoint(path), [prob.start], power_iters=5, ratio_steps=2)
    assert again["local_power"] == pytest.approx(cert["local_power"], rel=1e-6)
    # with Lanczos: its values are stored and enter the maximum (Lip = ½ exactly)
    lz = certificate_for(model, [prob.start], power_iters=1, ratio_steps=0, lanczos_steps=4)
    assert lz["lanczos_steps"] == 4 and len(lz["local_lanczos"]) == 2
    assert lz["local_max"] == pytest.approx(0.5, rel=1e-4)
    assert "local_lanczos" not in cert
    empty = certificate_for(model, [])
    assert empty["points"] == 0 and empty["local_max"] is None


def test_configs_reject_bad_values() -> None:
    with pytest.raises(ConfigError):
        CheckConfig(power_iters=0)
    with pytest.raises(ConfigError):
        CheckConfig(size=(0, 8))
    with pytest.raises(ConfigError):
        RobustnessConfig(eps=())
    with pytest.raises(ConfigError):
        RobustnessConfig(eps=(0.01,), beta=0.0)
    with pytest.raises(ConfigError, match="must differ"):
        RobustnessConfig(eps=(0.01, 0.01))


def test_load_problems_from_file(tmp_path: Path) -> None:
    from molrecon.sim import SimulationConfig, simulate_to_file

    path = tmp_path / "s.h5"
    simulate_to_file(SimulationConfig(matrix=(32, 32), coils=4, slices=3, acceleration=2.0,
                                      acs=8), path)
    (prob,) = load_problems([path], kinds=("2d",), points=1)
    assert prob.items == (1,) and prob.kspace.shape == (1, 4, 1, 32, 32)
    assert prob.source == "s.h5" and prob.start.shape == (1, 1, 32, 32)
    # normalised: the bright tissue of the CG-SENSE image sits near 1
    assert 0.3 < float(prob.start.abs().max()) < 3.0
    (both,) = load_problems([path], points=2, double=True)
    assert both.items == (0, 2) and both.kspace.dtype == torch.complex128
    with pytest.raises(ConfigError):
        load_problems([path], kinds=("3d",))


def test_load_problems_plans_batches_by_free_memory(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices that do not fit together become several problems; a slice that cannot fit at
    all is refused before any work."""
    from molrecon import memory
    from molrecon.errors import ResourceError
    from molrecon.sim import SimulationConfig, simulate_to_file

    path = tmp_path / "s.h5"
    simulate_to_file(SimulationConfig(matrix=(32, 32), coils=4, slices=3, acceleration=2.0,
                                      acs=8), path)
    shape = (3 * 2, 4, 1, 32, 32)                   # three slices, room for the gradients
    two = memory.estimate_recon_memory(shape, "2d", "mol", "cpu", batch_size=2 * 2)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device="cpu": int(two / 0.8) + 1)
    probs = load_problems([path], points=3)
    assert [p.items for p in probs] == [(0, 1), (2,)]
    assert all(p.source == "s.h5" for p in probs)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device="cpu": 1000)
    with pytest.raises(ResourceError):
        load_problems([path], points=3)
