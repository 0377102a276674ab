"""MOL inference for the reconstruction job: checkpoint → MOL step → fixed point.

Solves x − H(x) + λAᴴ(Ax − b) = 0 (see :mod:`molrecon.deq.mol`) for every
batch of slices with the deep-equilibrium forward solver (no autograd graph),
starting from the CG-SENSE image. Stops when the relative fixed-point residual
‖T(x) − x‖/‖x‖ ≤ tol for every item. When the checkpoint carries a certified
Lipschitz bound L < 1, the report also gives the certified relative distance
to the exact solution, residual·ρ/(1 − ρ), with ρ the step's contraction factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from .deq.fixed_point import FixedPointResult
    from .models.checkpoint import LoadedModel
    from .recon import ReconConfig


@dataclass
class MolEngine:
    loaded: LoadedModel
    step: Any                 # deq.mol.MolStep
    config: ReconConfig
    device: torch.device
    contraction: float | None

    @classmethod
    def load(cls, config: ReconConfig, kind: str, device: torch.device, *,
             one_readout: bool = False) -> MolEngine:
        """The engine for ``kind`` data: ``config.weights`` or the bundled default. A 3D
        scan with one readout position (``one_readout``) gets the bundled 2D default, which
        sees its (partition, phase) plane (:func:`plane_step`), when that model declares
        3D data."""
        from dataclasses import replace

        from .deq.mol import MolStep, contraction_factor
        from .models.checkpoint import load_checkpoint
        from .weights import bundled_checkpoint, resolve_weights

        if config.weights is not None:
            path = resolve_weights(config.weights)
        else:
            path = None
            if kind == "3d" and one_readout:
                planar = bundled_checkpoint("2d")
                if "3d" in load_checkpoint(planar).kinds:
                    path = planar
            if path is None:
                path = bundled_checkpoint(kind)
        loaded = load_checkpoint(path, map_location=device)
        if kind not in loaded.kinds:
            raise CheckpointError(f"model is for {'/'.join(loaded.kinds)} data, the scan is {kind} "
                                  "(pick a matching --weights)", path=path)
        mol_cfg = loaded.mol_config
        if config.alpha is not None:
            mol_cfg = replace(mol_cfg, alpha=config.alpha)
        if config.cg_iters is not None:
            mol_cfg = replace(mol_cfg, cg_iters=config.cg_iters)
        mol_cfg = replace(mol_cfg, learn_lam=False)
        step = MolStep(loaded.model, mol_cfg).to(device).eval()
        bound = loaded.certificate.get("certified_bound")
        rho = None
        if isinstance(bound, (int, float)) and bound < 1.0:
            r = contraction_factor(mol_cfg.alpha, float(bound))
            rho = r if r < 1.0 else None
        return cls(loaded=loaded, step=step, config=config, device=device, contraction=rho)

    def solve(self, op: Any, kspace: torch.Tensor, x0: torch.Tensor, *,
              on_iteration: Any = None) -> FixedPointResult:
        import torch

        from .deq.fixed_point import FixedPointConfig, solve_fixed_point
        from .deq.mol import support_of

        fp = FixedPointConfig(method=self.config.solver, tol=self.config.tol,
                              max_iter=self.config.max_iter, warn=False)
        mol = self.step
        if self.loaded.model.config.dims == 2 and x0.shape[-1] == 1 and x0.shape[1] > 1:
            mol = plane_step(mol)
        with torch.no_grad():
            aty = op.adjoint(kspace)                                      # (b, D, Y, X)
            step = mol.bind(normal=op.normal, aty=aty, support=support_of(op))
            return solve_fixed_point(step, x0, config=fp, contraction=self.contraction,
                                     label="MOL fixed-point iteration",
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
        ld = self.loaded
        cfg = self.step.to_config()
        return {
            "weights": str(ld.path),
            "weights_sha256": ld.sha256,
            "constraint": ld.constraint,
            "alpha": cfg.alpha,
            "lambda": cfg.lam,
            "cg_iters": cfg.cg_iters,
            "solver": self.config.solver,
            "tol": self.config.tol,
            "max_iter": self.config.max_iter,
            "contraction_factor": self.contraction,
            "certificate": ld.certificate,
            "model_metadata": ld.metadata,
        }


def plane_step(step: Any) -> Any:
    """The MOL step of a 2D prior for a 3D scan with one readout position (data already
    transformed along the readout): the prior sees the (partition, phase-encoding) plane,
    ``(b, D, Y, 1)`` viewed as one ``(D, Y)`` image, instead of D images of Y × 1 pixels.
    A reshape is an isometry, so the prior's Lipschitz bound and certificate carry over."""
    from dataclasses import replace

    from torch import nn

    from .deq.mol import MolStep

    class PhaseEncodingPlane(nn.Module):
        def __init__(self, prior: nn.Module) -> None:
            super().__init__()
            self.prior = prior

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, d, y, _ = x.shape
            return self.prior(x.reshape(b, 1, d, y)).reshape(b, d, y, 1)

    out = MolStep(PhaseEncodingPlane(step.prior), replace(step.to_config(), learn_lam=False))
    out.log_lam = step.log_lam
    return out
