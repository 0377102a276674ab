"""``molrecon check-lipschitz``: is a checkpoint's prior H a contraction near real data?

:func:`check_lipschitz` solves the MOL problems of real scans, measures the
local Lipschitz estimates at their fixed points (the network-only pieces —
certified global bound, local estimates, verdict — are in
:mod:`molrecon.models.certificate`), and runs the uniqueness test
(:func:`check_uniqueness`), which solves from several starts and compares the
fixed points with the monotonicity margin. The theory behind each number is in
the docstring of :mod:`molrecon.guarantees`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..deq.mol import support_of
from ..errors import ConfigError
from ..models.certificate import (
    LocalEstimates,
    decide,
    global_bound,
    local_estimates,
    prior_in_precision,
    seeded_generator,
)
from .problems import (
    _bcast,
    _complex_noise,
    _item_norm,
    _mol_step,
    operator_norm,
    solve_mol,
)
from .report import (
    START_NAMES,
    CheckConfig,
    LipschitzReport,
    StepContraction,
    UniquenessResult,
    robustness_bounds,
)

if TYPE_CHECKING:
    from ..deq.mol import MolConfig, MolStep
    from ..models.checkpoint import LoadedModel
    from ..models.cnn import MolCNN
    from ..problem import Problem


def check_uniqueness(step: MolStep, problem: Problem, *, lipschitz: float, basis: str,
                     tol: float = 1e-5, max_iter: int = 200, seed: int = 0) -> UniquenessResult:
    """Solve ``problem`` from every start in ``START_NAMES`` and compare the fixed points.

    Distances are relative to the norm of the CG-SENSE-started solution; the
    bound of a pair is (‖r_i‖ + ‖r_j‖)/(m‖x_ref‖) with r the equation residual
    (package docstring), m = 1 − ``lipschitz``.
    """
    gen = seeded_generator(seed)
    with torch.no_grad():
        aty = problem.aty                                                     # (B, D, Y, X)
        start = problem.start
        rms = _item_norm(start) / math.sqrt(start[0].numel())                  # (B,)
        noise = _complex_noise(start.shape, start.dtype, start.device, gen)
        starts = {
            "zero": torch.zeros_like(start),
            "zero-filled": aty,
            "cg-sense": start,
            "random": noise * _bcast(rms, noise).to(noise.dtype),
        }
        sols: dict[str, torch.Tensor] = {}
        res_norm: dict[str, torch.Tensor] = {}
        residuals, converged, iterations = [], [], []
        for name in START_NAMES:
            fp = solve_mol(step, problem, starts[name], tol=tol, max_iter=max_iter)
            sols[name] = fp.x
            r = step.equation_residual(fp.x, normal=problem.op.normal, aty=aty,
                                       support=support_of(problem.op))
            res_norm[name] = _item_norm(r)                                      # (B,)
            residuals.append(float(fp.final_residual.max()))
            converged.append(bool(fp.converged))
            iterations.append(int(fp.item_iterations.max()))
        ref = _item_norm(sols["cg-sense"]).clamp_min(torch.finfo(start.real.dtype).tiny)
        m = 1.0 - lipschitz
        worst, worst_pair, worst_bound = -1.0, (START_NAMES[0], START_NAMES[1]), None
        consistent: bool | None = True if m > 0 else None
        for i, a in enumerate(START_NAMES):
            for b in START_NAMES[i + 1:]:
                d = _item_norm(sols[a] - sols[b]) / ref                          # (B,)
                bound = (res_norm[a] + res_norm[b]) / (m * ref) if m > 0 else None
                if not bool(torch.isfinite(d).all()):
                    d = torch.full_like(d, math.inf)
                if bound is not None and bool((d > bound).any()):
                    consistent = False
                k = int(torch.argmax(d))
                if float(d[k]) > worst:
                    worst, worst_pair = float(d[k]), (a, b)
                    worst_bound = None if bound is None else float(bound[k])
    return UniquenessResult(starts=START_NAMES, max_distance=worst, bound=worst_bound,
                            basis=basis, consistent=consistent, worst_pair=worst_pair,
                            residuals=tuple(residuals), converged=tuple(converged),
                            iterations=tuple(iterations))


# ===================================================================================== jobs
def check_lipschitz(loaded: LoadedModel, problems: Sequence[Problem],
                    config: CheckConfig | None = None, *,
                    progress: Callable[[str], None] | None = None) -> LipschitzReport:
    """Certificate, local estimates at MOL fixed points, margins, bounds and verdict.

    The fixed points are those of real MOL reconstructions of ``problems``
    (Anderson from the CG-SENSE start, the checkpoint's α, λ and CG count).
    Where the iteration produced non-finite values (a non-contractive model),
    the CG-SENSE image of that slice serves as the point instead. ``progress`` receives
    a line per stage as the check goes (``stage: detail``).
    """
    cfg = CheckConfig() if config is None else config
    say = progress or _quiet
    if not problems:
        raise ConfigError("check-lipschitz needs at least one data file")
    model = loaded.model
    mol_cfg = loaded.mol_config
    say("certified bound: layer by layer")
    gb = global_bound(model, size=cfg.size, layer_iters=cfg.layer_iters, seed=cfg.seed)
    est, op_norm = _estimates_at_fixed_points(model, mol_cfg, problems, cfg, say)
    local_max = est.max
    mono = est.monotone_max
    # The margin m of uniqueness and robustness: 1 − the certified bound where there is one;
    # otherwise 1 − μ, the top of H's numerical range at the data, which is what F = I − H's
    # monotonicity needs (μ ≤ the Jacobian norm, so this margin is never the smaller one);
    # 1 − the local Lipschitz estimate where μ was not measured (no Lanczos steps).
    if gb.certified:
        lip, basis = gb.bound, "certified"
    elif mono is not None:
        lip, basis = mono, "monotone"
    else:
        lip, basis = local_max, "local"
    bounds = robustness_bounds(lam=mol_cfg.lam, lipschitz=lip, op_norm=op_norm, basis=basis)

    uniq = None
    if cfg.uniqueness:
        results = []
        for n, prob in enumerate(problems, 1):
            say(f"uniqueness {n}/{len(problems)}: {prob.source}, four starts")
            step = _mol_step(prior_in_precision(model, prob.dtype), mol_cfg, prob.start.device)
            results.append(check_uniqueness(step, prob, lipschitz=lip, basis=basis, tol=cfg.tol,
                                            max_iter=cfg.max_iter, seed=cfg.seed))
        uniq = _merge_uniqueness(results)
    verdict, reasons = decide(certified_bound=gb.bound, local_max=local_max,
                              uniqueness_consistent=None if uniq is None else uniq.consistent,
                              monotone_max=mono)
    if est.power_converged is False:
        reasons = (*reasons, f"a power iteration stopped at its cap ({cfg.power_iters}) before "
                             "converging: the local estimates may read low")
    return LipschitzReport(
        model=str(loaded.path), sha256=loaded.sha256, constraint=loaded.constraint,
        alpha=float(mol_cfg.alpha), lam=float(mol_cfg.lam), cg_iters=int(mol_cfg.cg_iters),
        data=tuple(p.source for p in problems), global_bound=gb, local=est, op_norm=op_norm,
        contraction_certified=StepContraction(float(mol_cfg.alpha), gb.bound),
        contraction_local=StepContraction(float(mol_cfg.alpha), local_max),
        robustness=bounds, uniqueness=uniq, verdict=verdict, reasons=reasons,
        stored_certificate=dict(loaded.certificate))


def _estimates_at_fixed_points(model: MolCNN, mol_cfg: MolConfig, problems: Sequence[Problem],
                               cfg: CheckConfig, say: Callable[[str], None]
                               ) -> tuple[LocalEstimates, float]:
    """Solve every problem, estimate Lip(H) at its fixed points (each labelled with its
    file, slice and solve facts), and measure ‖A‖: ``(estimates, largest ‖A‖)``."""
    points: list[torch.Tensor] = []
    labels: list[tuple[str, int, str]] = []
    facts: list[tuple[float | None, int, bool]] = []
    op_norm = 0.0
    for n, prob in enumerate(problems, 1):
        def on_iteration(it: int, residual: float, n: int = n, prob: Problem = prob) -> None:
            say(f"MOL fixed points {n}/{len(problems)}: {prob.source}, iteration {it}, "
                f"residual {residual:.1e} (tol {cfg.tol:g})")

        step = _mol_step(prior_in_precision(model, prob.dtype), mol_cfg, prob.start.device)
        fp = solve_mol(step, prob, prob.start, tol=cfg.tol, max_iter=cfg.max_iter,
                       on_iteration=on_iteration)
        finite = torch.isfinite(torch.view_as_real(fp.x)).reshape(fp.x.shape[0], -1).all(dim=1)
        x = torch.where(_bcast(finite, fp.x), fp.x, prob.start)                 # (B, D, Y, X)
        points.append(x)
        final = fp.final_residual
        for i in range(x.shape[0]):
            ok = bool(finite[i])
            labels.append((prob.source, prob.items[i] if i < len(prob.items) else i,
                           "fixed point" if ok else "cg-sense"))
            facts.append((float(final[i]) if ok else None, int(fp.item_iterations[i]),
                          bool(fp.converged_items[i]) and ok))
        op_norm = max(op_norm, operator_norm(prob.op, iters=cfg.norm_iters, seed=cfg.seed))
    total = len(labels)

    def on_point(i: int) -> None:
        say(f"local estimates: point {i + 1}/{total} ({labels[i][0]}, slice {labels[i][1]})")

    est = local_estimates(model, points, labels=labels, power_iters=cfg.power_iters,
                          power_tol=cfg.power_tol, ratio_steps=cfg.ratio_steps,
                          lanczos_steps=cfg.lanczos_steps, seed=cfg.seed, on_point=on_point)
    est = LocalEstimates(tuple(replace(p, residual=f[0], iterations=f[1], converged=f[2])
                               for p, f in zip(est.points, facts)))
    return est, op_norm


def _quiet(_: str) -> None:
    return None


def _merge_uniqueness(results: Sequence[UniquenessResult]) -> UniquenessResult:
    """Worst case over problems (files)."""
    worst = max(results, key=lambda r: r.max_distance)
    flags = [r.consistent for r in results]
    consistent = False if False in flags else (None if None in flags else True)
    return replace(
        worst, consistent=consistent,
        residuals=tuple(max(r.residuals[i] for r in results) for i in range(len(worst.starts))),
        converged=tuple(all(r.converged[i] for r in results) for i in range(len(worst.starts))),
        iterations=tuple(max(r.iterations[i] for r in results)
                         for i in range(len(worst.starts))))
