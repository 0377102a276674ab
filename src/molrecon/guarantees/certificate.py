"""The certificate of a MOL checkpoint: is its prior H a contraction, so that F = I − H is monotone?

``molrecon check-lipschitz`` is :func:`check_lipschitz`; training stores
:func:`certificate_for` in every checkpoint it saves. The pieces, each usable
on its own: the certified global bound of Lip(H), valid for every image size
(:func:`global_bound`), with the layers' measured norms on one size beside it
(:func:`layer_norms_at_size`); the local estimates at the fixed points of real
reconstructions (:func:`local_estimates`); the verdict certified / empirical /
violated (:func:`decide`); and the uniqueness test that solves from several
starts and compares the fixed points with the margin (:func:`check_uniqueness`).
The theory behind each number is in the docstring of :mod:`molrecon.guarantees`.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as nnf

from ..deq.mol import support_of
from ..errors import ConfigError
from ..models.lipschitz import local_lipschitz_power, local_lipschitz_ratio
from ..models.spectral import layer_bounds
from .problems import (
    _bcast,
    _complex_noise,
    _generator,
    _item_norm,
    _mol_step,
    _prior_for,
    operator_norm,
    solve_mol,
)
from .report import (
    START_NAMES,
    CheckConfig,
    GlobalBound,
    LipschitzReport,
    LocalEstimates,
    PointEstimate,
    StepContraction,
    UniquenessResult,
    Verdict,
    _finite,
    robustness_bounds,
)

if TYPE_CHECKING:
    from ..deq.mol import MolConfig, MolStep
    from ..models.checkpoint import LoadedModel
    from ..models.cnn import MolCNN
    from ..problem import Problem


def global_bound(model: MolCNN, *, size: Sequence[int] | None = None, layer_iters: int = 50,
                 seed: int = 0) -> GlobalBound:
    """The certified bound of ``model`` (and its layers' measured norms at ``size``)."""
    bounds = tuple(layer_bounds(model))
    measured = None
    if size is not None:
        measured = layer_norms_at_size(model, size, iters=layer_iters, seed=seed)
    return GlobalBound(bound=math.prod(bounds), layer_bounds=bounds,
                       spectral_grid=int(model.spectral_grid), constraint=model.constraint,
                       lipschitz_target=float(model.lipschitz_target),
                       size=None if size is None else tuple(int(s) for s in size),
                       measured_layer_norms=measured)


def layer_norms_at_size(model: MolCNN, size: Sequence[int], *, iters: int = 50,
                        seed: int = 0) -> tuple[float, ...]:
    """Operator norm of every zero-padded layer (effective weights) on one image size.

    ``size`` is (Y, X) for a 2D model, (D, Y, X) for a 3D one (a 2D size gives
    D = 1 for a 3D model). Power iteration on WᵀW in float64 (W the "same"
    convolution, Wᵀ its transposed convolution); each value is a lower
    estimate of the layer's norm on that size, itself ≤ the certified bound.
    """
    dims = model.config.dims
    shape = tuple(int(s) for s in size)
    if dims == 2 and len(shape) != 2:
        raise ConfigError(f"a 2D model needs a size YxX, got {'x'.join(map(str, shape))}")
    if dims == 3 and len(shape) == 2:
        shape = (1, *shape)
    if any(s < 1 for s in shape):
        raise ConfigError(f"size must be positive, got {shape}")
    conv, convt = ((nnf.conv2d, nnf.conv_transpose2d) if dims == 2
                   else (nnf.conv3d, nnf.conv_transpose3d))
    pad = model.config.kernel // 2
    gen = _generator(seed)
    out: list[float] = []
    with torch.no_grad():
        for w in model.effective_weights():
            w64 = w.detach().to(device="cpu", dtype=torch.float64)             # (Co, Ci, k, ...)
            v = torch.randn((1, w64.shape[1], *shape), generator=gen, dtype=torch.float64)
            v = v / torch.linalg.vector_norm(v)
            sigma = 0.0
            for _ in range(iters):
                wv = conv(v, w64, padding=pad)                                  # (1, Co, *shape)
                sigma = max(sigma, float(torch.linalg.vector_norm(wv)))
                u = convt(wv, w64, padding=pad)                                 # (1, Ci, *shape)
                nu = torch.linalg.vector_norm(u)
                if float(nu) == 0.0:
                    break
                v = u / nu
            out.append(sigma)
    return tuple(out)


def local_estimates(model: MolCNN, points: Sequence[torch.Tensor], *,
                    labels: Sequence[tuple[str, int, str]] | None = None,
                    power_iters: int = 20, ratio_steps: int = 10,
                    seed: int = 0) -> LocalEstimates:
    """Power-iteration and ratio-search estimates at every item of every tensor in ``points``.

    ``points``: complex ``(B, D, Y, X)`` tensors; ``labels``: (source, item,
    point kind) per item, in order (default: ("", index, "point")).
    """
    items = [p[i:i + 1].detach() for p in points for i in range(p.shape[0])]
    if not items:
        raise ConfigError("local Lipschitz estimates need at least one data point")
    if labels is not None and len(labels) != len(items):
        raise ValueError("one label per point item is needed")
    gen = _generator(seed)
    priors: dict[torch.dtype, MolCNN] = {}
    out: list[PointEstimate] = []
    for n, x in enumerate(items):
        if x.dtype not in priors:
            priors[x.dtype] = _prior_for(model, x.dtype)
        prior = priors[x.dtype]
        power = local_lipschitz_power(prior, x, iters=power_iters, generator=gen)
        with torch.no_grad():
            ratio_t, _ = local_lipschitz_ratio(prior, x, steps=ratio_steps, generator=gen)
        src, item, kind = labels[n] if labels is not None else ("", n, "point")
        out.append(PointEstimate(source=src, item=item, point=kind, power=float(power),
                                 ratio=float(ratio_t)))
    return LocalEstimates(tuple(out))


def decide(*, certified_bound: float, local_max: float,
           uniqueness_consistent: bool | None = None) -> tuple[Verdict, tuple[str, ...]]:
    """The verdict (see the package docstring) and the reasons for it."""
    reasons: list[str] = []
    if not local_max < 1.0:                     # also NaN: an overflowing estimate refutes
        reasons.append(f"a local Lipschitz estimate is {local_max:.4g} >= 1: H is not a "
                       "contraction near the data")
    if uniqueness_consistent is False:
        reasons.append("fixed points from different starts differ by more than the "
                       "monotonicity margin allows")
    if reasons:
        return "violated", tuple(reasons)
    if certified_bound < 1.0:                  # NaN is not < 1: no certificate
        reason = (f"certified global bound {certified_bound:.4g} < 1 "
                  "(all inputs, all image sizes)")
        return "certified", (reason,)
    reason = (f"no global certificate (bound {certified_bound:.4g} >= 1); local estimates "
              f"at the data are < 1 (max {local_max:.4g})")
    return "empirical", (reason,)


def check_uniqueness(step: MolStep, problem: Problem, *, lipschitz: float, basis: str,
                     tol: float = 1e-5, max_iter: int = 200, seed: int = 0) -> UniquenessResult:
    """Solve ``problem`` from every start in ``START_NAMES`` and compare the fixed points.

    Distances are relative to the norm of the CG-SENSE-started solution; the
    bound of a pair is (‖r_i‖ + ‖r_j‖)/(m‖x_ref‖) with r the equation residual
    (package docstring), m = 1 − ``lipschitz``.
    """
    gen = _generator(seed)
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
                    config: CheckConfig | None = None) -> LipschitzReport:
    """Certificate, local estimates at MOL fixed points, margins, bounds and verdict.

    The fixed points are those of real MOL reconstructions of ``problems``
    (Anderson from the CG-SENSE start, the checkpoint's α, λ and CG count).
    Where the iteration produced non-finite values (a non-contractive model),
    the CG-SENSE image of that slice serves as the point instead.
    """
    cfg = CheckConfig() if config is None else config
    if not problems:
        raise ConfigError("check-lipschitz needs at least one data file")
    model = loaded.model
    mol_cfg = loaded.mol_config
    gb = global_bound(model, size=cfg.size, layer_iters=cfg.layer_iters, seed=cfg.seed)
    est, op_norm = _estimates_at_fixed_points(model, mol_cfg, problems, cfg)
    local_max = est.max
    if gb.certified:
        lip, basis = gb.bound, "certified"
    else:
        lip, basis = local_max, "local"
    bounds = robustness_bounds(lam=mol_cfg.lam, lipschitz=lip, op_norm=op_norm, basis=basis)

    uniq = None
    if cfg.uniqueness:
        results = []
        for prob in problems:
            step = _mol_step(_prior_for(model, prob.dtype), mol_cfg, prob.start.device)
            results.append(check_uniqueness(step, prob, lipschitz=lip, basis=basis, tol=cfg.tol,
                                            max_iter=cfg.max_iter, seed=cfg.seed))
        uniq = _merge_uniqueness(results)
    verdict, reasons = decide(certified_bound=gb.bound, local_max=local_max,
                              uniqueness_consistent=None if uniq is None else uniq.consistent)
    return LipschitzReport(
        model=str(loaded.path), sha256=loaded.sha256, constraint=loaded.constraint,
        alpha=float(mol_cfg.alpha), lam=float(mol_cfg.lam), cg_iters=int(mol_cfg.cg_iters),
        data=tuple(p.source for p in problems), global_bound=gb, local=est, op_norm=op_norm,
        contraction_certified=StepContraction(float(mol_cfg.alpha), gb.bound),
        contraction_local=StepContraction(float(mol_cfg.alpha), local_max),
        robustness=bounds, uniqueness=uniq, verdict=verdict, reasons=reasons,
        stored_certificate=dict(loaded.certificate))


def _estimates_at_fixed_points(model: MolCNN, mol_cfg: MolConfig, problems: Sequence[Problem],
                               cfg: CheckConfig) -> tuple[LocalEstimates, float]:
    """Solve every problem, estimate Lip(H) at its fixed points (each labelled with its
    file, slice and solve facts), and measure ‖A‖: ``(estimates, largest ‖A‖)``."""
    points: list[torch.Tensor] = []
    labels: list[tuple[str, int, str]] = []
    facts: list[tuple[float | None, int, bool]] = []
    op_norm = 0.0
    for prob in problems:
        step = _mol_step(_prior_for(model, prob.dtype), mol_cfg, prob.start.device)
        fp = solve_mol(step, prob, prob.start, tol=cfg.tol, max_iter=cfg.max_iter)
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
    est = local_estimates(model, points, labels=labels, power_iters=cfg.power_iters,
                          ratio_steps=cfg.ratio_steps, seed=cfg.seed)
    est = LocalEstimates(tuple(replace(p, residual=f[0], iterations=f[1], converged=f[2])
                               for p, f in zip(est.points, facts)))
    return est, op_norm


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


def certificate_for(subject: LoadedModel | MolCNN, points: Sequence[torch.Tensor], *,
                    data: Sequence[str] = (), power_iters: int = 10, ratio_steps: int = 10,
                    seed: int = 0) -> dict[str, Any]:
    """The plain-dict Lipschitz certificate stored in checkpoints.

    ``points``: fixed points (complex ``(B, D, Y, X)``) the local estimates are
    measured at, e.g. the validation reconstructions of training; ``data``:
    what they came from (file names). Keys: ``certified_bound``,
    ``layer_bounds``, ``spectral_grid``, ``holds_for_all_image_sizes``,
    ``local_power``, ``local_ratio``, ``local_max``, ``points``, ``data``,
    ``verdict``, ``date`` (:func:`~molrecon.models.save_checkpoint` recomputes
    the first three from the weights it writes, so they always agree).
    """
    model = _as_model(subject)
    gb = global_bound(model)
    cert: dict[str, Any] = {
        "certified_bound": gb.bound,
        "layer_bounds": list(gb.layer_bounds),
        "spectral_grid": gb.spectral_grid,
        "holds_for_all_image_sizes": True,
        "data": [str(d) for d in data],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    usable = [p for p in points if p.shape[0] > 0]
    if usable:
        was_training = model.training
        model.eval()
        try:
            est = local_estimates(model, usable, power_iters=power_iters,
                                  ratio_steps=ratio_steps, seed=seed)
        finally:
            model.train(was_training)
        verdict, _ = decide(certified_bound=gb.bound, local_max=est.max)
        cert.update({
            "local_power": [_finite(p.power) for p in est.points],
            "local_ratio": [_finite(p.ratio) for p in est.points],
            "local_max": _finite(est.max),
            "points": len(est.points),
            "verdict": verdict,
        })
    else:
        cert.update({"local_power": [], "local_ratio": [], "local_max": None, "points": 0,
                     "verdict": "certified" if gb.certified else None})
    return cert


def _as_model(subject: LoadedModel | MolCNN) -> MolCNN:
    return subject.model if hasattr(subject, "mol_config") else subject  # type: ignore[union-attr]
