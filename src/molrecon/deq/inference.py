"""MOL inference: a loaded checkpoint and a fixed-point configuration → the MOL fixed point.

Solves x − H(x) + λAᴴ(Ax − b) = 0 (see :mod:`molrecon.deq.mol`) for a batch of
slices with the deep-equilibrium forward solver (no autograd graph), from a
given start (CG-SENSE in ``molrecon reconstruct``). Stops when the relative
fixed-point residual ‖T(x) − x‖/‖x‖ ≤ tol for every item, the residual of a step
with α < 1 divided by α (:func:`molrecon.deq.mol.residual_scale`: then it bounds
the α = 1 step's residual, so tol means the same at every α). When the checkpoint
carries a certified Lipschitz bound L < 1, the result also gives the certified
relative distance to the exact solution, residual·ρ/(1 − ρ), with ρ the step's
contraction factor.

Which checkpoint serves which scan is decided in :mod:`molrecon.models.bundled`;
this module only runs the one it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..models.checkpoint import LoadedModel
from ..physics.noise import NoiseLambdaRule, effective_acceleration, periphery_sigma
from ..physics.sense import SenseOperator
from .accel import FastDataConsistency, fast_prior, fast_step, resolve_precision
from .fixed_point import FixedPointConfig, FixedPointResult, solve_fixed_point
from .mol import MolStep, contraction_factor, residual_scale, support_of

#: The bf16 gate's limits (:func:`precision_gate`).
GATE_MAX_PSNR_CHANGE_DB = 0.05
GATE_MAX_DISTANCE = 1e-3


@dataclass(frozen=True)
class _Fast:
    """The parts of the fast step an engine keeps between solves (compiled once)."""

    prior: nn.Module
    dc: FastDataConsistency


@dataclass
class MolEngine:
    """A MOL step ready to solve: the checkpoint's prior and λ, on ``device``.

    ``contraction`` is the certified contraction factor ρ of the step (None when the
    checkpoint has no certified bound below 1). ``fixed_point.tol`` is the tolerance on
    the α = 1 residual; the solver runs at ``residual_scale(α)`` times it, and every
    residual the engine reports is the solver's divided by that scale. ``lam_rule``,
    when set, scales λ per batch item by the item's noise level
    (:mod:`molrecon.physics.noise`; :meth:`lam_scales`).
    """

    loaded: LoadedModel
    step: MolStep
    fixed_point: FixedPointConfig
    device: torch.device
    contraction: float | None
    #: ``fp32`` or ``bf16``: the precision the prior runs in (resolved from ``auto``).
    precision: str = "fp32"
    compile: bool = False
    fast: _Fast | None = None
    lam_rule: NoiseLambdaRule | None = None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, fixed_point: FixedPointConfig,
                    device: torch.device, *, alpha: float | None = None,
                    cg_iters: int | None = None, ensemble: int | None = None,
                    compile: bool = False, precision: str = "fp32",
                    lam: float | None = None, lam_from_noise: bool = True) -> MolEngine:
        """The engine of ``loaded``; ``alpha``/``cg_iters`` override the checkpoint's (the
        fixed point does not depend on α, only the speed does), and ``ensemble`` the
        number of flips its prior averages over (``CNNConfig.ensemble``). ``compile`` and
        ``precision`` (``fp32`` | ``bf16`` | ``auto``) select the fast step of
        :mod:`molrecon.deq.accel`; with both at their defaults the eager step runs.
        ``lam`` replaces the checkpoint's λ for every scan; otherwise, with
        ``lam_from_noise``, the checkpoint's noise rule (if it has one) sets λ per item."""
        mol_cfg = loaded.mol_config
        if lam is not None:
            if not (lam > 0 and lam < float("inf")):
                raise ValueError(f"λ must be positive and finite, got {lam}")
            mol_cfg = replace(mol_cfg, lam=float(lam))
        rule = loaded.lam_noise if (lam is None and lam_from_noise) else None
        if alpha is not None:
            mol_cfg = replace(mol_cfg, alpha=alpha)
        if cg_iters is not None:
            mol_cfg = replace(mol_cfg, cg_iters=cg_iters)
        mol_cfg = replace(mol_cfg, learn_lam=False)
        if ensemble is not None:
            loaded.model.config = replace(loaded.model.config, ensemble=ensemble)
        step = MolStep(loaded.model, mol_cfg).to(device).eval()
        bound = loaded.certificate.get("certified_bound")
        rho = None
        if isinstance(bound, (int, float)) and bound < 1.0:
            r = contraction_factor(mol_cfg.alpha, float(bound))
            rho = r if r < 1.0 else None
        prec = resolve_precision(precision, device, loaded.metadata)
        fast = None
        if compile or prec != "fp32":
            fast = _Fast(prior=fast_prior(loaded.model, precision=prec, compile=compile,
                                          device=device),
                         dc=FastDataConsistency(mol_cfg.cg_iters, compile=compile, device=device))
        return cls(loaded=loaded, step=step, fixed_point=replace(fixed_point, warn=False),
                   device=device, contraction=rho, precision=prec, compile=bool(compile),
                   fast=fast, lam_rule=rule)

    def lam_scales(self, kspace: torch.Tensor, mask: torch.Tensor, kind: str
                   ) -> tuple[list[float | None], list[float], list[float]] | None:
        """Each item's noise level σ, effective acceleration R and λ factor under the engine's
        rule, for normalised Cartesian ``kspace`` (b, C, D, Y, X) acquired on ``mask``;
        None without a rule."""
        if self.lam_rule is None:
            return None
        sigmas = periphery_sigma(kspace, mask, kind)
        accels = effective_acceleration(mask, int(kspace.shape[0]))
        return sigmas, accels, [self.lam_rule.factor(s, r) for s, r in zip(sigmas, accels)]

    def solve(self, op: SenseOperator, kspace: torch.Tensor, x0: torch.Tensor, *,
              on_iteration: Callable[[int, float], None] | None = None,
              lam_scale: Sequence[float] | torch.Tensor | None = None) -> FixedPointResult:
        """The fixed point for normalised ``kspace`` (b, C, D, Y, X) from ``x0`` (b, D, Y, X);
        ``lam_scale`` (b,) multiplies λ per item (:meth:`lam_scales`)."""
        scale_t = None if lam_scale is None else torch.as_tensor(
            lam_scale, dtype=x0.real.dtype, device=x0.device).reshape(-1)
        mol = self.step
        plane = self.loaded.model.config.dims == 2 and x0.shape[-1] == 1 and x0.shape[1] > 1
        if plane:
            mol = plane_step(mol)
        with torch.no_grad():
            aty = op.adjoint(kspace)                                      # (b, D, Y, X)
            if self.fast is not None and hasattr(op, "normal_parts"):
                prior = _PhaseEncodingPlane(self.fast.prior) if plane else self.fast.prior
                step = fast_step(prior=prior, alpha=mol.alpha, lam=mol.lam, dc=self.fast.dc,
                                 parts=op.normal_parts(), aty=aty, support=support_of(op),
                                 lam_scale=scale_t)
            else:
                step = mol.bind(normal=op.normal, aty=aty, support=support_of(op),
                                lam_scale=scale_t)
            return solve_mol_fixed_point(step, x0, alpha=mol.alpha, config=self.fixed_point,
                                         contraction=self.contraction,
                                         on_iteration=on_iteration)

    def describe(self, res: FixedPointResult) -> dict[str, Any]:
        """Per-chunk facts for the report (plain JSON types)."""
        out: dict[str, Any] = {
            "iterations": [int(i) for i in res.item_iterations.tolist()],
            "final_residual": [float(r) for r in res.final_residual.tolist()],
            "converged": bool(res.converged),
            "residual_trace": [[float(v) for v in row] for row in res.residuals.T.tolist()],
        }
        if res.distance_bound is not None:
            out["certified_relative_distance"] = [float(d) for d in res.distance_bound.tolist()]
        return out

    def report_header(self) -> dict[str, Any]:
        """What ran, for the report: the checkpoint, its certificate and the solver settings."""
        ld = self.loaded
        cfg = self.step.to_config()
        return {
            "weights": str(ld.path),
            "weights_sha256": ld.sha256,
            "constraint": ld.constraint,
            "alpha": cfg.alpha,
            "lambda": cfg.lam,
            "lambda_noise_rule": None if self.lam_rule is None else {
                k: v for k, v in self.lam_rule.record().items() if k != "measured"},
            "cg_iters": cfg.cg_iters,
            "ensemble": ld.model.config.ensemble,
            "solver": self.fixed_point.method,
            "compile": self.compile,
            "precision": self.precision,
            "tol": self.fixed_point.tol,
            "max_iter": self.fixed_point.max_iter,
            "contraction_factor": self.contraction,
            "certificate": ld.certificate,
            "model_metadata": ld.metadata,
        }


def solve_mol_fixed_point(step: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, *,
                          alpha: float, config: FixedPointConfig,
                          contraction: float | None = None,
                          on_iteration: Callable[[int, float], None] | None = None
                          ) -> FixedPointResult:
    """:func:`solve_fixed_point` for a bound MOL step of step size ``alpha``, with
    ``config.tol`` and every residual (the result's and ``on_iteration``'s) on the α = 1
    scale: the solver stops at ``residual_scale(alpha)·tol`` of its own residual, which
    bounds the α = 1 step's residual by tol (:mod:`molrecon.deq.mol`)."""
    scale = residual_scale(alpha)
    report = None if on_iteration is None else (lambda n, r: on_iteration(n, r / scale))
    res = solve_fixed_point(step, x0, config=replace(config, tol=config.tol * scale),
                            contraction=contraction, label="MOL fixed-point iteration",
                            on_iteration=report)
    return res if scale == 1.0 else replace(res, residuals=res.residuals / scale)


class _PhaseEncodingPlane(nn.Module):
    """A 2D prior applied to ``(b, D, Y, 1)`` images viewed as one ``(D, Y)`` image each."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, y, _ = x.shape
        return self.prior(x.reshape(b, 1, d, y)).reshape(b, d, y, 1)


def plane_step(step: MolStep) -> MolStep:
    """The MOL step of a 2D prior for a 3D scan with one readout position (data already
    transformed along the readout): the prior sees the (partition, phase-encoding) plane,
    ``(b, D, Y, 1)`` viewed as one ``(D, Y)`` image, instead of D images of Y × 1 pixels.
    A reshape is an isometry, so the prior's Lipschitz bound and certificate carry over."""
    out = MolStep(_PhaseEncodingPlane(step.prior), replace(step.to_config(), learn_lam=False))
    out.log_lam = step.log_lam
    return out


@dataclass(frozen=True)
class PrecisionGate:
    """The bf16 accuracy gate of a model on one case (:func:`precision_gate`).

    psnr_change_db   PSNR(bf16) − PSNR(fp32) against the reference image (dB)
    distance         ‖x_bf16 − x_fp32‖ / ‖x_fp32‖ (the fixed-point distance)
    passed           |psnr_change_db| ≤ ``max_psnr_change_db`` and distance ≤ ``max_distance``
    """

    psnr_fp32: float
    psnr_bf16: float
    psnr_change_db: float
    distance: float
    passed: bool
    max_psnr_change_db: float = GATE_MAX_PSNR_CHANGE_DB
    max_distance: float = GATE_MAX_DISTANCE

    def record(self) -> dict[str, Any]:
        """Plain values for a model's metadata (``metadata["bf16_gate"]``)."""
        return {"passed": self.passed, "psnr_change_db": self.psnr_change_db,
                "distance": self.distance, "max_psnr_change_db": self.max_psnr_change_db,
                "max_distance": self.max_distance}


def precision_gate(loaded: LoadedModel, op: SenseOperator, kspace: torch.Tensor,
                   x0: torch.Tensor, reference: torch.Tensor, *, fixed_point: FixedPointConfig,
                   device: torch.device) -> PrecisionGate:
    """Measure the bf16 prior against fp32 on one case: both fixed points from ``x0``, their
    PSNRs against ``reference`` (magnitudes, least-squares fitted; :func:`molrecon.metrics.compare`)
    and their relative distance. The gate passes when the PSNR changes by at most 0.05 dB
    and the fixed points lie within 1e-3 of each other (relative)."""
    from ..metrics import compare

    results = {}
    for prec in ("fp32", "bf16"):
        engine = MolEngine.from_loaded(loaded, fixed_point, device, precision=prec)
        results[prec] = engine.solve(op, kspace, x0).x
    x32, x16 = results["fp32"], results["bf16"]
    dist = float(torch.linalg.vector_norm(x16 - x32) / torch.linalg.vector_norm(x32).clamp_min(
        torch.finfo(x32.real.dtype).tiny))
    ref = reference.detach().cpu().numpy()
    p32 = float(compare(x32.cpu().numpy(), ref).psnr)
    p16 = float(compare(x16.cpu().numpy(), ref).psnr)
    change = p16 - p32
    passed = abs(change) <= GATE_MAX_PSNR_CHANGE_DB and dist <= GATE_MAX_DISTANCE
    return PrecisionGate(psnr_fp32=p32, psnr_bf16=p16, psnr_change_db=change, distance=dist,
                         passed=bool(passed))
