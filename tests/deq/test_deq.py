"""The MOL engine: the step, the fixed-point solvers and implicit differentiation."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call

from molrecon.deq import (
    DEQFixedPoint,
    FixedPointConfig,
    MolConfig,
    MolStep,
    contraction_factor,
    deq_solve,
    regularised_sense,
    residual_scale,
    solve_fixed_point,
    unrolled,
)
from molrecon.errors import ConfigError, ConvergenceWarning
from molrecon.models import CNNConfig, MolCNN, certified_bound
from molrecon.physics.fft import fftc, ifftc


class MaskedSense:
    """A = M F S on (B, D, Y, X) images, k-space (B, C, D, Y, X); written here so the
    engine is tested against nothing but the normal/adjoint interface."""

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor) -> None:
        self.maps = maps        # (B, C, D, Y, X)
        self.mask = mask        # (B, 1, D, Y, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * fftc(self.maps * x[:, None])

    def adjoint(self, k: torch.Tensor) -> torch.Tensor:
        return torch.sum(self.maps.conj() * ifftc(self.mask * k), dim=1)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        return self.adjoint(self.forward(x))


def make_problem(b: int = 2, c: int = 3, y: int = 12, x: int = 10, seed: int = 0,
                 accel: int = 3, acs: int = 3,
                 dtype: torch.dtype = torch.complex128) -> tuple[MaskedSense, torch.Tensor]:
    """Random coil maps (Σ|S|² = 1), equispaced mask with ``acs`` central lines, noisy data;
    returns the operator and Aᴴb."""
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(b, c, 1, y, x, dtype=dtype, generator=g)
    maps = maps / maps.abs().square().sum(dim=1, keepdim=True).sqrt()     # Σ|S|² = 1
    mask = torch.zeros(b, 1, 1, y, 1, dtype=maps.real.dtype)
    mask[..., ::accel, :] = 1.0
    mask[..., y // 2 - acs // 2:y // 2 - acs // 2 + acs, :] = 1.0
    op = MaskedSense(maps, mask)
    truth = torch.randn(b, 1, y, x, dtype=dtype, generator=g)
    kspace = op.forward(truth) + 0.05 * mask * torch.randn(b, c, 1, y, x, dtype=dtype, generator=g)
    return op, op.adjoint(kspace)


def sn_prior(target: float = 0.8, layers: int = 3, channels: int = 6, seed: int = 0) -> MolCNN:
    torch.manual_seed(seed)
    prior = MolCNN(CNNConfig(layers=layers, channels=channels), "sn", target).double()
    with torch.no_grad():
        for conv in prior.convs:
            conv.weight.mul_(20.0)       # every layer at its budget
    return prior


def scaled_identity_prior(gain: float) -> MolCNN:
    """H(x) = gain·x (a centre tap): on the null space of A the α = 1 step contracts only by
    ``gain``, the slowest case for plain iteration."""
    prior = MolCNN(CNNConfig(layers=1, bias=False), "lr").double()
    with torch.no_grad():
        prior.convs[0].weight.zero_()
        prior.convs[0].weight[0, 0, 1, 1] = gain
        prior.convs[0].weight[1, 1, 1, 1] = gain
    return prior


def tight(tol: float = 1e-12, max_iter: int = 500, method: str = "anderson") -> FixedPointConfig:
    return FixedPointConfig(method=method, tol=tol, max_iter=max_iter)  # type: ignore[arg-type]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the step ---------------------------------------------------------------------------------


def test_mol_config_validation() -> None:
    for bad in ({"alpha": 0.0}, {"alpha": 2.0}, {"lam": 0.0}, {"lam": float("inf")},
                {"cg_iters": 0}, {"cg_iters": 2.5}, {"learn_lam": 1}):
        with pytest.raises(ConfigError):
            MolConfig(**bad)  # type: ignore[arg-type]


def test_step_solves_its_linear_system() -> None:
    """T(x) = (I + αλAᴴA)⁻¹((1 − α)x + αH(x) + αλAᴴb), checked against an explicit solve."""
    op, aty = make_problem(b=1, y=6, x=5)
    prior = sn_prior()
    alpha, lam = 0.7, 3.0
    step = MolStep(prior, MolConfig(alpha=alpha, lam=lam, cg_iters=60))
    x = torch.randn_like(aty)
    with torch.no_grad():
        tx = step(x, normal=op.normal, aty=aty)
        n = aty.numel()
        eye = torch.eye(n, dtype=aty.dtype)
        normal_mat = torch.stack([op.normal(e.reshape(aty.shape)).reshape(-1) for e in eye], dim=1)
        rhs = ((1 - alpha) * x + alpha * prior(x) + alpha * lam * aty).reshape(-1)
        exact = torch.linalg.solve(eye + alpha * lam * normal_mat, rhs).reshape(aty.shape)
    assert rel(tx, exact) < 1e-10
    assert step.lam.item() == pytest.approx(lam)
    cfg = step.to_config()
    assert (cfg.alpha, cfg.cg_iters, cfg.learn_lam) == (alpha, 60, True)
    assert cfg.lam == pytest.approx(lam, rel=1e-12)


def test_fixed_point_does_not_depend_on_alpha_or_solver() -> None:
    op, aty = make_problem()
    prior = sn_prior()
    base = MolStep(prior, MolConfig(alpha=1.0, lam=5.0, cg_iters=5))
    x0 = regularised_sense(op.normal, aty, lam=5.0)
    fast = solve_fixed_point(base.bind(normal=op.normal, aty=aty), x0, config=tight())
    plain1 = solve_fixed_point(base.bind(normal=op.normal, aty=aty), x0,
                               config=tight(method="plain"))
    slow_step = base.with_alpha(0.01)
    slow = solve_fixed_point(slow_step.bind(normal=op.normal, aty=aty), x0,
                             config=tight(tol=1e-9, max_iter=20000, method="plain"))
    assert fast.converged and plain1.converged and slow.converged
    assert rel(plain1.x, fast.x) < 1e-6
    assert rel(slow.x, fast.x) < 1e-6
    assert slow.iterations > 50 * fast.iterations
    # It is the solution of x − H(x) + λAᴴ(Ax − b) = 0.
    with torch.no_grad():
        res = base.equation_residual(fast.x, normal=op.normal, aty=aty)
    assert float(res.norm() / (5.0 * aty).norm()) < 1e-10


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.9, 1.5])
def test_scaled_residual_of_any_alpha_bounds_the_alpha_one_residual(alpha: float) -> None:
    """‖T_α(x) − x‖/min(α, 1) ≥ ‖T_1(x) − x‖ at any x (exact resolvent), and for α ≤ 1 the
    unscaled residual is at most the α = 1 one, so the scale is as small as it can be."""
    op, aty = make_problem(seed=3)
    prior = sn_prior(target=0.95)
    one = MolStep(prior, MolConfig(alpha=1.0, lam=5.0, cg_iters=200))
    other = one.with_alpha(alpha)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _ in range(3):
            x = regularised_sense(op.normal, aty, lam=5.0) + 0.3 * torch.randn(
                aty.shape, dtype=aty.dtype, generator=g)
            r1 = (one.bind(normal=op.normal, aty=aty)(x) - x).norm()
            ra = (other.bind(normal=op.normal, aty=aty)(x) - x).norm()
            assert float(ra) / residual_scale(alpha) >= float(r1) * (1 - 1e-9)
            if alpha <= 1.0:
                assert float(ra) <= float(r1) * (1 + 1e-9)
                assert float(ra) < float(r1) * 0.999      # strictly: α < 1 moves less
    assert residual_scale(0.5) == 0.5 and residual_scale(1.5) == 1.0


def test_fixed_point_does_not_depend_on_cg_iterations() -> None:
    """Warm-started CG makes the fixed points exact for any CG count."""
    op, aty = make_problem(seed=1)
    prior = sn_prior(seed=1)
    sols = []
    for cg in (1, 3, 40):
        step = MolStep(prior, MolConfig(alpha=1.0, lam=20.0, cg_iters=cg))
        sols.append(solve_fixed_point(step.bind(normal=op.normal, aty=aty), aty,
                                      config=tight(max_iter=2000)).x)
    assert rel(sols[0], sols[2]) < 1e-8
    assert rel(sols[1], sols[2]) < 1e-8


def test_anderson_needs_far_fewer_iterations() -> None:
    op, aty = make_problem(c=2, y=16, seed=2, accel=4, acs=2)     # A has a null space
    for prior, alpha in ((scaled_identity_prior(0.95), 1.0), (sn_prior(seed=2), 0.1)):
        step = MolStep(prior, MolConfig(alpha=alpha, lam=5.0, cg_iters=5)).bind(
            normal=op.normal, aty=aty)
        plain = solve_fixed_point(step, aty, config=tight(tol=1e-8, max_iter=3000, method="plain"))
        anderson = solve_fixed_point(step, aty, config=tight(tol=1e-8))
        assert plain.converged and anderson.converged
        assert anderson.iterations * 3 <= plain.iterations
        assert rel(anderson.x, plain.x) < 1e-6


def test_distance_bounds_cover_the_true_distance() -> None:
    """A loose 1e-4 residual at α = 0.01 is far from x*; both certified bounds say so honestly."""
    op, aty = make_problem(seed=3)
    prior = sn_prior(target=0.8, seed=3)
    lip = certified_bound(prior)
    step = MolStep(prior, MolConfig(alpha=0.01, lam=5.0, cg_iters=10))   # CG exact here
    exact = solve_fixed_point(step.with_alpha(1.0).bind(normal=op.normal, aty=aty), aty,
                              config=tight()).x
    rho = contraction_factor(0.01, lip)
    assert rho == pytest.approx(1 - 0.01 * (1 - lip))
    loose = solve_fixed_point(step.bind(normal=op.normal, aty=aty), aty,
                              config=FixedPointConfig(method="plain", tol=1e-4, max_iter=5000),
                              contraction=rho)
    assert loose.converged and loose.distance_bound is not None
    dist = (loose.x - exact).reshape(2, -1).norm(dim=1) / loose.x.reshape(2, -1).norm(dim=1)
    assert torch.all(dist <= loose.distance_bound)
    assert torch.all(loose.final_residual <= 1e-4)
    assert float(dist.max()) > 1e-3           # the change rule alone would have hidden this
    monotone = step.distance_bound(loose.x, normal=op.normal, aty=aty, lipschitz=lip)
    assert torch.all((loose.x - exact).reshape(2, -1).norm(dim=1) <= monotone)


# -- the solver on its own --------------------------------------------------------------------


def _linear_map(rho: float, n: int = 30, batch: int = 3, seed: int = 0,
                complex_: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T(x) = M x + c with ‖M‖ = rho per item, and its exact fixed point."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_ else torch.float64
    m = torch.randn(batch, n, n, dtype=dtype, generator=g)
    m = rho * m / torch.linalg.matrix_norm(m, ord=2).reshape(-1, 1, 1)
    c = torch.randn(batch, n, dtype=dtype, generator=g)
    eye = torch.eye(n, dtype=dtype)
    xstar = torch.linalg.solve(eye - m, c.unsqueeze(-1)).squeeze(-1)
    return m, c, xstar


@pytest.mark.parametrize("complex_", [True, False])
@pytest.mark.parametrize("method", ["plain", "anderson"])
def test_solver_reaches_a_known_fixed_point(method: str, complex_: bool) -> None:
    m, c, xstar = _linear_map(0.9, complex_=complex_)

    def step(x: torch.Tensor) -> torch.Tensor:
        return (m @ x.unsqueeze(-1)).squeeze(-1) + c

    res = solve_fixed_point(step, torch.zeros_like(c), config=tight(tol=1e-10, max_iter=1000,
                                                                   method=method),
                            contraction=0.9)
    assert res.converged and bool(res.converged_items.all())
    assert res.residuals.shape == (res.iterations, 3)
    err = (res.x - xstar).norm(dim=1) / res.x.norm(dim=1)
    assert res.distance_bound is not None
    assert torch.all(err <= res.distance_bound) and float(err.max()) < 1e-8


def test_items_stop_separately_and_check_interval_does_not_change_results() -> None:
    m, c, _ = _linear_map(0.5)
    scale = torch.tensor([0.1, 1.0, 1.9], dtype=torch.float64).reshape(-1, 1, 1)
    m = m * scale                                     # contraction 0.05, 0.5, 0.95

    def step(x: torch.Tensor) -> torch.Tensor:
        return (m @ x.unsqueeze(-1)).squeeze(-1) + c

    a = solve_fixed_point(step, torch.zeros_like(c), config=tight(tol=1e-9, method="plain",
                                                                 max_iter=1000))
    b = solve_fixed_point(step, torch.zeros_like(c),
                          config=FixedPointConfig(method="plain", tol=1e-9, max_iter=1000,
                                                  check_every=7))
    it = a.item_iterations.tolist()
    assert it[0] < it[1] < it[2] == a.iterations
    assert torch.equal(a.x, b.x) and torch.equal(a.item_iterations, b.item_iterations)
    assert b.iterations >= a.iterations and b.iterations % 7 == 0


def test_non_convergence_warns_and_flags() -> None:
    m, c, _ = _linear_map(0.99)

    def step(x: torch.Tensor) -> torch.Tensor:
        return (m @ x.unsqueeze(-1)).squeeze(-1) + c

    with pytest.warns(ConvergenceWarning, match="stopped after 5 iterations"):
        res = solve_fixed_point(step, torch.zeros_like(c),
                                config=FixedPointConfig(method="plain", tol=1e-12, max_iter=5))
    assert not res.converged and not bool(res.converged_items.any())

    def blowup(x: torch.Tensor) -> torch.Tensor:
        out = step(x)
        out[1] = float("nan")
        return out

    with pytest.warns(ConvergenceWarning):
        res = solve_fixed_point(blowup, torch.zeros_like(c), config=tight(tol=1e-8))
    assert res.converged_items.tolist() == [True, False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_fixed_point(step, torch.zeros_like(c),
                          config=FixedPointConfig(tol=1e-12, max_iter=3, warn=False))


# -- implicit differentiation -----------------------------------------------------------------


@pytest.mark.parametrize("exact_dc_grad", [False, True])
def test_gradcheck_of_the_implicit_backward(exact_dc_grad: bool) -> None:
    op, aty0 = make_problem(b=1, c=2, y=6, x=5, seed=4)
    torch.manual_seed(4)
    prior = MolCNN(CNNConfig(layers=2, channels=3), "lr").double()
    with torch.no_grad():
        for conv in prior.convs:
            conv.weight.mul_(0.5)
    mol = MolStep(prior, MolConfig(alpha=1.0, lam=4.0, cg_iters=4)).double()
    mol.exact_dc_grad = exact_dc_grad
    names = [n for n, _ in mol.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in mol.named_parameters())
    aty = aty0.detach().clone().requires_grad_(True)
    fwd = tight(tol=1e-14, max_iter=300)

    def solve(*args: torch.Tensor) -> torch.Tensor:
        *ps, b = args
        state = dict(zip(names, ps))

        def step(x: torch.Tensor) -> torch.Tensor:
            return functional_call(mol, state, (x,), {"normal": op.normal, "aty": b})

        return deq_solve(step, b.detach(), forward=fwd, backward=fwd).x

    assert "log_lam" in names
    assert torch.autograd.gradcheck(solve, (*params, aty), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_implicit_gradient_matches_long_unrolled_differentiation() -> None:
    op, aty = make_problem(seed=5)
    prior = sn_prior(target=0.9, seed=5)
    mol = MolStep(prior, MolConfig(alpha=1.0, lam=8.0, cg_iters=5))
    step = mol.bind(normal=op.normal, aty=aty)
    weight = torch.randn_like(aty)
    x0 = regularised_sense(op.normal, aty, lam=8.0)
    names, params = zip(*mol.named_parameters())

    out = deq_solve(step, x0, forward=tight(), backward=tight())
    loss = (weight.conj() * out.x).real.sum()
    g_deq = torch.autograd.grad(loss, params)
    assert out.backward.converged == [True] and out.backward.iterations[0] > 1

    x_k = unrolled(step, x0, 80)
    g_unr = torch.autograd.grad((weight.conj() * x_k).real.sum(), params)
    for a, b in zip(g_deq, g_unr):
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()) + 1e-12
    assert float(g_deq[names.index("log_lam")].abs()) > 0    # λ is learned through x*


def test_support_projection_zeroes_the_unobserved_background() -> None:
    """Where the maps are zero the data say nothing: without P the fixed point there is H's own
    (an offset c of H(x) = g·x + c gives c/(1 − g)); with P it is zero, the equation holds with
    P∘H, and inside the support nothing else changes (maps without zeros: P = I)."""
    op, aty = make_problem(seed=7)
    op.maps[:, :, :, 2:5, 3:7] = 0                                   # a hole in every coil
    aty = op.adjoint(op.forward(torch.ones_like(aty)))
    support = (op.maps.abs().sum(dim=1) > 0).to(torch.float64)      # (B, 1, Y, X)
    prior = MolCNN(CNNConfig(layers=1), "lr").double()
    with torch.no_grad():                                            # H(x) = 0.5 x + 0.1 (1 + i)
        prior.convs[0].weight.zero_()
        prior.convs[0].weight[0, 0, 1, 1] = 0.5
        prior.convs[0].weight[1, 1, 1, 1] = 0.5
        prior.convs[0].bias.fill_(0.1)
    mol = MolStep(prior, MolConfig(alpha=1.0, lam=4.0, cg_iters=8))
    x0 = regularised_sense(op.normal, aty, lam=4.0)
    free = solve_fixed_point(mol.bind(normal=op.normal, aty=aty), x0, config=tight()).x
    proj = solve_fixed_point(mol.bind(normal=op.normal, aty=aty, support=support), x0,
                             config=tight()).x
    hole = support == 0
    expect = 0.1 * (1 + 1j) / (1 - 0.5)
    assert torch.allclose(free[hole.expand_as(free)], torch.full_like(free[hole.expand_as(free)],
                                                                      expect), atol=1e-8)
    assert float(proj[hole.expand_as(proj)].abs().max()) < 1e-10
    with torch.no_grad():
        r = mol.equation_residual(proj, normal=op.normal, aty=aty, support=support)
    assert float(r.norm() / proj.norm()) < 1e-8
    full = torch.ones_like(support)
    a = solve_fixed_point(mol.bind(normal=op.normal, aty=aty, support=full), x0, config=tight()).x
    assert torch.allclose(a, free, atol=1e-10)


def test_jacobian_free_gradient_is_one_step_at_the_fixed_point() -> None:
    """gradient="jfb": no backward solve; the gradient is that of one recorded step at x*,
    close to but not equal to the implicit one, and a descent direction for the loss."""
    op, aty = make_problem(seed=6)
    prior = sn_prior(target=0.9, seed=6)
    mol = MolStep(prior, MolConfig(alpha=1.0, lam=8.0, cg_iters=5))
    step = mol.bind(normal=op.normal, aty=aty)
    weight = torch.randn_like(aty)
    x0 = regularised_sense(op.normal, aty, lam=8.0)
    params = [p for _, p in mol.named_parameters()]

    out = deq_solve(step, x0, forward=tight(), backward=tight(), gradient="jfb")
    assert out.backward.iterations == []
    g_jfb = torch.autograd.grad((weight.conj() * out.x).real.sum(), params)
    one = step(out.forward.x.detach())
    g_one = torch.autograd.grad((weight.conj() * one).real.sum(), params)
    for a, b in zip(g_jfb, g_one):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)
    exact = deq_solve(step, x0, forward=tight(), backward=tight())
    g_imp = torch.autograd.grad((weight.conj() * exact.x).real.sum(), params)
    flat_j = torch.cat([g.reshape(-1) for g in g_jfb])
    flat_i = torch.cat([g.reshape(-1) for g in g_imp])
    assert float((flat_j - flat_i).norm()) > 1e-6 * float(flat_i.norm())
    assert float(torch.dot(flat_j, flat_i)) > 0
    with pytest.raises(ValueError, match="gradient"):
        deq_solve(step, x0, gradient="phantom")


def test_exact_solve_gradient_is_the_implicit_gradient_where_cg_differentiation_stalls() -> None:
    """Large λ and few CG iterations: differentiating through the CG iterations gives a
    backward map that does not contract (its plain iteration stalls; Anderson with a long
    history can still solve that linear system, like GMRES); the exact-inverse VJP
    converges in a few iterations to the derivative of x*(θ) (checked by central differences)."""
    op, aty = make_problem(seed=8)
    prior = sn_prior(target=0.9, seed=8).double()
    mol = MolStep(prior, MolConfig(alpha=1.0, lam=300.0, cg_iters=2)).double()
    weight = torch.randn_like(aty)
    x0 = regularised_sense(op.normal, aty, lam=300.0)
    _, params = zip(*mol.named_parameters())

    def solve(exact: bool, backward: FixedPointConfig) -> tuple[torch.Tensor, list[int]]:
        mol.exact_dc_grad = exact
        out = deq_solve(mol.bind(normal=op.normal, aty=aty), x0, forward=tight(),
                        backward=backward)
        return (weight.conj() * out.x).real.sum(), out.backward

    loss, stats = solve(True, tight(tol=1e-10, max_iter=300))
    grads = torch.autograd.grad(loss, params)
    assert stats.converged == [True] and stats.iterations[0] < 100

    loss, stats = solve(False, FixedPointConfig(method="plain", tol=1e-10, max_iter=300,
                                                warn=False))
    torch.autograd.grad(loss, params)
    assert stats.converged == [False]

    # central differences of x*(θ), solved with exact data consistency (same fixed point)
    mol.cg_iters = 60
    g = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    eps = 1e-6
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(sign * eps * d)
            values.append(float(solve(True, tight())[0]))
            for p, d in zip(params, direction):
                p.sub_(sign * eps * d)
    fd = (values[0] - values[1]) / (2 * eps)
    analytic = float(sum((gr * d).sum() for gr, d in zip(grads, direction)))
    assert abs(analytic - fd) <= 1e-5 * abs(fd)


def test_deq_module_and_gradient_to_the_data() -> None:
    op, aty = make_problem(seed=6)
    prior = sn_prior(seed=6)
    deq = DEQFixedPoint(MolStep(prior, MolConfig(lam=5.0)),
                        forward_config=tight(tol=1e-10), backward_config=tight(tol=1e-10))
    b = aty.clone().requires_grad_(True)
    out = deq(b.detach(), normal=op.normal, aty=b, contraction=certified_bound(prior))
    assert out.forward.converged and out.forward.distance_bound is not None
    out.x.abs().square().sum().backward()
    assert b.grad is not None and float(b.grad.abs().sum()) > 0
    with torch.no_grad():
        plain = deq(aty, normal=op.normal, aty=aty)
    assert not plain.x.requires_grad and plain.backward.iterations == []
