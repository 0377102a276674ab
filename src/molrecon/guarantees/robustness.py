"""The robustness of MOL to measurement perturbations: the worst case found, beside the bounds.

``molrecon robustness`` is :func:`robustness`. :func:`attack` is projected
gradient ascent on ‖Δx‖ over perturbations Δb of the sampled k-space, with
‖Δb_i‖ ≤ ε‖b_i‖ per slice; it runs once through MOL's equilibrium (implicit
gradient) and once through the same CNN and MOL step unrolled for K steps,
which has no monotone guarantee. The amplifications found are reported beside
the bounds (λ/m)‖A‖ and ½√(λ/m) of the monotone theory
(:class:`~molrecon.guarantees.report.RobustnessBounds`; derivation in the
docstring of :mod:`molrecon.guarantees`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..deq.fixed_point import FixedPointConfig
from ..deq.implicit import deq_solve, unrolled
from ..deq.mol import support_of
from ..errors import ConfigError
from ..models.certificate import global_bound, prior_in_precision, seeded_generator
from ..models.lipschitz import jacobian_norm, lanczos_jacobian_norm, monotonicity_estimate
from .problems import (
    _bcast,
    _complex_noise,
    _item_norm,
    _mol_step,
    operator_norm,
    solve_mol,
)
from .report import AttackResult, RobustnessConfig, RobustnessReport, robustness_bounds

if TYPE_CHECKING:
    from ..deq.mol import MolConfig, MolStep
    from ..models.checkpoint import LoadedModel
    from ..models.cnn import MolCNN
    from ..problem import Problem

# A network's output for Aᴴ(b + Δb), differentiable, and whether its solve converged.
Solve = Callable[[torch.Tensor], tuple[torch.Tensor, bool]]
# One attack on one problem: what :func:`attack` returns, and Aᴴ(best Δb) for the
# paper-style bound at the perturbation found.
_Run = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], bool, torch.Tensor]


def _unit(t: torch.Tensor) -> torch.Tensor:
    n = _item_norm(t)
    safe = n > 0
    return t / _bcast(torch.where(safe, n, torch.ones_like(n)), t).to(t.dtype)


def attack(solve: Solve, problem: Problem, *,
           eps: float, steps: int, beta: float = 1.0, direction: torch.Tensor | None = None,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float], bool]:
    """Projected gradient ascent on Σ_i ‖x(b + Δb)_i − x(b)_i‖², ‖Δb_i‖ ≤ ε‖b_i‖.

    ``solve(aty)`` maps Aᴴ(b + Δb) ``(B, D, Y, X)`` to the network's output
    (differentiably) and a flag whether it converged. ``direction``: initial Δb
    (any scale; default masked complex noise). Δb lives on the sampled
    locations; every iterate lies on the sphere ‖Δb_i‖ = ε‖b_i‖.

    Returns ``(best Δb, best ‖Δx‖ per item, ‖x(b)‖ per item, history of the
    largest amplification, all solves converged)``.
    """
    op, b = problem.op, problem.kspace
    support = problem.support()                                                # broadcastable
    with torch.no_grad():
        x_ref, ok = solve(problem.aty)
        x_ref = x_ref.detach()                                                 # (B, D, Y, X)
    radius = eps * _item_norm(b)                                               # (B,)
    if direction is None:
        direction = _complex_noise(b.shape, b.dtype, b.device, seeded_generator(seed))
    d = _bcast(radius, b).to(b.dtype) * _unit(direction * support)             # (B, C, D, Y, X)
    best = torch.full_like(radius, -1.0)
    best_d = d.clone()
    history: list[float] = []
    converged = ok
    tiny = torch.finfo(radius.dtype).tiny
    for s in range(steps + 1):
        dv = d.detach().requires_grad_(s < steps)
        with torch.set_grad_enabled(s < steps):
            x, ok = solve(op.adjoint(b + dv * support))                        # (B, D, Y, X)
            converged = converged and ok
            dx = _item_norm(x - x_ref)                                         # (B,)
        dxd = dx.detach()
        better = dxd > best
        best = torch.where(better, dxd, best)
        best_d = torch.where(_bcast(better, d), d.detach(), best_d)
        history.append(float((best / radius.clamp_min(tiny)).max()))
        if s == steps:
            break
        (g,) = torch.autograd.grad((dx ** 2).sum(), dv)
        g = _unit(g * support)
        d = _bcast(radius, b).to(b.dtype) * _unit((1.0 - beta) * d.detach()
                                                   / _bcast(radius.clamp_min(tiny), d).to(d.dtype)
                                                   + beta * g)
    return best_d, best, _item_norm(x_ref), history, converged


def robustness(loaded: LoadedModel, problems: Sequence[Problem],
               config: RobustnessConfig | None = None, *,
               progress: Callable[[str], None] | None = None) -> RobustnessReport:
    """Worst-case measurement perturbations of MOL and of the unrolled network, with the bounds.

    MOL: the equilibrium of (1), differentiated implicitly. Unrolled: K MOL
    steps from the zero-filled image Aᴴb, differentiated through the steps.
    The bounds use m from the certificate when it is < 1, else from the local
    estimate at the fixed points, the larger of the power iteration and Lanczos (then they
    are estimates). ``progress`` receives a
    line per stage as the attack goes (``stage: detail``).
    """
    cfg = RobustnessConfig() if config is None else config
    if not problems:
        raise ConfigError("robustness needs at least one data file")
    model = loaded.model
    mol_cfg = loaded.mol_config
    gb = global_bound(model)
    lam = float(mol_cfg.lam)
    gen = seeded_generator(cfg.seed)

    mol_res: dict[float, list[_Run]] = {e: [] for e in cfg.eps}
    unr_res: dict[float, list[_Run]] = {e: [] for e in cfg.eps}
    local_max = 0.0
    mono_max: float | None = None
    op_norm = 0.0
    for n, prob in enumerate(problems, 1):
        def say(stage: str, detail: str = "", n: int = n, prob: Problem = prob) -> None:
            if progress is not None:
                where = f"{stage}, {prob.source} ({n}/{len(problems)})"
                progress(f"{where}: {detail}" if detail else where)

        powers, monos, prob_norm, mol_runs, unr_runs = _attack_problem(model, mol_cfg, prob,
                                                                       cfg, gen, say)
        for v in powers:
            local_max = max(local_max, v)
        for v in monos:
            mono_max = v if mono_max is None else max(mono_max, v)
        op_norm = max(op_norm, prob_norm)
        for e, run in mol_runs:
            mol_res[e].append(run)
        for e, run in unr_runs:
            unr_res[e].append(run)

    # m as in check-lipschitz: certified, else from the top μ of H's numerical range (what
    # monotonicity needs), else from the local Lipschitz estimate.
    if gb.certified:
        lip, basis = gb.bound, "certified"
    elif mono_max is not None:
        lip, basis = mono_max, "monotone"
    else:
        lip, basis = local_max, "local"
    bounds = robustness_bounds(lam=lam, lipschitz=lip, op_norm=op_norm, basis=basis)
    m = bounds.margin
    mol_out = tuple(_summarise("mol", e, mol_res[e], problems, lam=lam, margin=m,
                               steps=cfg.steps) for e in cfg.eps)
    unr_out = tuple(_summarise(f"unrolled-{cfg.unrolled_k}", e, unr_res[e], problems, lam=lam,
                               margin=m, steps=cfg.steps) for e in cfg.eps if unr_res[e])
    return RobustnessReport(model=str(loaded.path), data=tuple(p.source for p in problems),
                            eps=tuple(float(e) for e in cfg.eps), steps=cfg.steps,
                            unrolled_k=cfg.unrolled_k, mol=mol_out, unrolled=unr_out,
                            bounds=bounds, certified_bound=gb.bound)


def _attack_problem(model: MolCNN, mol_cfg: MolConfig, prob: Problem, cfg: RobustnessConfig,
                    gen: torch.Generator, say: Callable[[str], None]
                    ) -> tuple[list[float], list[float], float, list[tuple[float, _Run]],
                               list[tuple[float, _Run]]]:
    """Attack one problem at every ε, MOL and (K > 0) unrolled.

    Returns the local estimates (the larger of the power iteration and Lanczos) at its
    finite fixed points, the top μ of the spectrum of ½(J + Jᵀ) there (with Lanczos steps;
    else empty), its ‖A‖, and
    the (ε, run) pairs of MOL and of the unrolled network. Each ε starts from
    the perturbation the previous ε found; the first from one draw of ``gen``.
    """
    prior = prior_in_precision(model, prob.dtype)
    step = _mol_step(prior, mol_cfg, prob.start.device)
    single = prob.dtype == torch.complex64
    tol = cfg.tol if cfg.tol is not None else (1e-5 if single else 1e-10)
    warm = [prob.start]
    solve_mol_diff = _implicit_solver(step, prob, cfg, tol, warm)
    solve_unrolled = _unrolled_solver(step, prob, cfg.unrolled_k)

    say("fixed point")
    with torch.no_grad():
        x_star = solve_mol(step, prob, prob.start, tol=tol, max_iter=cfg.max_iter).x
        warm[0] = x_star
    powers: list[float] = []
    monos: list[float] = []
    for i in range(x_star.shape[0]):
        xi = x_star[i:i + 1]
        if bool(torch.isfinite(torch.view_as_real(xi)).all()):
            value = jacobian_norm(prior, xi, max_iters=cfg.power_iters, rtol=cfg.power_tol,
                                  generator=gen).value
            if cfg.lanczos_steps > 0:
                top, _ = lanczos_jacobian_norm(prior, xi, iters=cfg.lanczos_steps,
                                               generator=gen)
                value = max(value, float(top.detach().max()))
                found = monotonicity_estimate(prior, xi, iters=cfg.lanczos_steps,
                                              generator=gen)
                monos.append(float(found.top.detach().max()))
            powers.append(value)
    op_norm = operator_norm(prob.op, iters=cfg.norm_iters, seed=cfg.seed)
    direction = _complex_noise(prob.kspace.shape, prob.dtype, prob.kspace.device, gen)
    d_mol, d_unr = direction, direction
    mol_runs: list[tuple[float, _Run]] = []
    unr_runs: list[tuple[float, _Run]] = []
    for e in cfg.eps:
        say(f"MOL attack ε={e:g}", f"{cfg.steps} ascent steps")
        r = attack(solve_mol_diff, prob, eps=e, steps=cfg.steps, beta=cfg.beta,
                   direction=d_mol)
        mol_runs.append((e, (*r, prob.op.adjoint(r[0] * prob.support()))))
        d_mol = r[0]
        if cfg.unrolled_k > 0:
            say(f"unrolled-{cfg.unrolled_k} attack ε={e:g}", f"{cfg.steps} ascent steps")
            r = attack(solve_unrolled, prob, eps=e, steps=cfg.steps, beta=cfg.beta,
                       direction=d_unr)
            unr_runs.append((e, (*r, prob.op.adjoint(r[0] * prob.support()))))
            d_unr = r[0]
    return powers, monos, op_norm, mol_runs, unr_runs


def _implicit_solver(step: MolStep, prob: Problem, cfg: RobustnessConfig, tol: float,
                     warm: list[torch.Tensor]) -> Solve:
    """MOL's equilibrium for a given Aᴴ(b + Δb), differentiated implicitly (:func:`deq_solve`).

    Each forward solve starts from ``warm[0]``, which every finite solution replaces.
    """
    fwd = FixedPointConfig(method="anderson", tol=tol, max_iter=cfg.max_iter, warn=False)
    bwd = FixedPointConfig(method="anderson", tol=cfg.backward_tol, max_iter=cfg.max_iter,
                           warn=False)

    def solve(aty: torch.Tensor) -> tuple[torch.Tensor, bool]:
        fn = step.bind(normal=prob.op.normal, aty=aty, support=support_of(prob.op))
        out = deq_solve(fn, warm[0], forward=fwd, backward=bwd)
        if bool(torch.isfinite(torch.view_as_real(out.forward.x)).all()):
            warm[0] = out.forward.x.detach()
        return out.x, bool(out.forward.converged)

    return solve


def _unrolled_solver(step: MolStep, prob: Problem, k: int) -> Solve:
    """The same MOL step run K times from the zero-filled image, differentiated through."""

    def solve(aty: torch.Tensor) -> tuple[torch.Tensor, bool]:
        fn = step.bind(normal=prob.op.normal, aty=aty, support=support_of(prob.op))
        return unrolled(fn, aty, k), True

    return solve


def _summarise(network: str, e: float, runs: Sequence[_Run], problems: Sequence[Problem], *,
               lam: float, margin: float, steps: int) -> AttackResult:
    """The worst run over the slices of every problem at one ε (the paper-style bound at the
    perturbation found only for MOL with a positive margin)."""
    amps: list[float] = []
    rel: list[float] = []
    paper: list[float] = []
    hist = [0.0] * (steps + 1)
    conv = True
    for prob, (d, dx, xn, h, ok, atdb) in zip(problems, runs):
        db = _item_norm(d * prob.support())                                    # (B,)
        amp = dx / db.clamp_min(torch.finfo(db.dtype).tiny)
        amps.extend(float(v) for v in amp)
        rel.extend(float(v) for v in dx / xn.clamp_min(torch.finfo(xn.dtype).tiny))
        if margin > 0 and network == "mol":
            paper.extend(float(v) for v in lam / margin * _item_norm(atdb)
                         / db.clamp_min(torch.finfo(db.dtype).tiny))
        hist = [max(a, c) for a, c in zip(hist, h)]
        conv = conv and ok
    k = max(range(len(amps)), key=lambda j: amps[j])
    return AttackResult(network=network, eps=e, amplification=amps[k],
                        per_item=tuple(amps), relative_change=rel[k],
                        paper_at_found=paper[k] if paper else None,
                        history=tuple(hist), converged=conv)
