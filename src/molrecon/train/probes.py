"""MOL-LR's penalty measured where the model operates: the Jacobian norm of H at the MOL fixed
points of a few fixed training problems, tracked from step to step (``--penalty-estimator
power``).

Why: the default penalty (a 10-step ratio search on a 96² crop of each training fixed point)
reads well below the Jacobian norm that ``check-lipschitz`` measures once its power iteration
has converged. For the 2D model bundled on 2026-12-05 the search read 0.92-0.94 while the
converged norm at the validation fixed points was 1.009-1.017
(``benchmarks/bench_lipschitz_estimates.py``), so a penalty that held the search under its
threshold let H become expansive near the data. A power iteration needs 98-315 iterations
to converge there (the top of the Jacobian's spectrum is crowded), far too many per step,
and its top vector belongs to one image, so it is carried per problem, not from one
training image to the next. Here a few *probe* problems are fixed
for the whole run (``penalty_probes`` training samples with masks drawn once from the run's
seed); step ``s`` visits probe ``s mod N``: it solves that problem's fixed point with the
current H (no gradient), continues the probe's power iteration by ``penalty_steps``
iterations from the vector it left there, and penalises the resulting ‖J v‖. As H changes
slowly, each probe's iteration converges over a few visits, as the persistent vectors of
spectral normalisation do. The vectors are part of the resume state, so a resumed run
continues exactly.

The same probes, as whole scans, serve ``--project-bound``: every few steps the largest
singular value of the Jacobian at each probe's fixed point is read by Lanczos
(:meth:`PenaltyProbes.jacobian_norms`), and the training loop scales H's output down to the
bound where their largest exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..deq.fixed_point import FixedPointConfig, solve_fixed_point
from ..deq.mol import regularised_sense
from ..models.lipschitz import (lanczos_jacobian_norm, monotonicity_estimate,
                                tracked_jacobian_norm)
from ..problem import Problem
from .config import TrainConfig
from .data import FolderDataset, make_problem

_PROBE_STREAM = 7          # the seed stream of the probes' choice, masks and first vectors


@dataclass
class PenaltyProbes:
    """The fixed probe problems of a run and the power-iteration vector each one carries."""

    problems: list[Problem]
    samples: list[int]
    vectors: list[torch.Tensor | None] = field(default_factory=list)
    seed: int = 0

    @classmethod
    def build(cls, config: TrainConfig, train_set: FolderDataset, device: Any, *,
              whole: bool = False) -> PenaltyProbes:
        """``config.penalty_probes`` training samples (a seeded choice) and their problems:
        blocks of ``config.readout_block`` readout positions where the run trains on them,
        unless ``whole`` (whole scans, as reconstructed)."""
        n = min(config.penalty_probes, len(train_set))
        order = np.random.default_rng([config.seed, _PROBE_STREAM]).permutation(len(train_set))
        samples = [int(i) for i in order[:n]]
        problems = [
            make_problem(train_set.samples[i], train_set.kind, config.mask,
                         np.random.default_rng([config.seed, _PROBE_STREAM, k]),
                         config.extra_noise, device, None if whole else config.readout_block)
            for k, i in enumerate(samples)]
        return cls(problems=problems, samples=samples, vectors=[None] * n, seed=config.seed)

    def fixed_point(self, step: Any, k: int, *, init_iters: int,
                     fwd: FixedPointConfig) -> torch.Tensor:
        """Probe ``k``'s MOL fixed point with the current model (no gradient)."""
        prob = self.problems[k]
        support = prob.op.support()
        with torch.no_grad():
            x0 = regularised_sense(prob.op.normal, prob.aty, lam=step.lam.detach(),
                                   iters=init_iters)

            def fn(x: torch.Tensor) -> torch.Tensor:
                return step(x, normal=prob.op.normal, aty=prob.aty, support=support)

            return solve_fixed_point(fn, x0, config=fwd).x

    def jacobian_norms(self, step: Any, cnn: Any, *, cold_steps: int, warm_steps: int,
                       init_iters: int, fwd: FixedPointConfig,
                       measure: str = "lipschitz") -> list[float]:
        """At every probe's fixed point (no gradient), what ``--project-bound`` holds at the
        bound: the largest singular value of H's Jacobian (``measure`` "lipschitz") or the
        top of the spectrum of its symmetric part ("monotone"). Lanczos runs ``cold_steps``
        steps from noise at a probe's first visit and ``warm_steps`` from the top Ritz
        vector it left there at the next ones (the model moves little between visits; the
        vectors are part of the resume state, :meth:`state`)."""
        values = []
        for k in range(len(self.problems)):
            x_star = self.fixed_point(step, k, init_iters=init_iters, fwd=fwd)
            gen = torch.Generator().manual_seed(int(np.random.default_rng(
                [self.seed, _PROBE_STREAM, k, 2]).integers(2**31 - 1)))
            start = self.vectors[k]
            iters = cold_steps if start is None else warm_steps
            if measure == "monotone":
                found = monotonicity_estimate(cnn, x_star, iters=iters, generator=gen,
                                              start=start)
                top, ritz = found.top, found.vectors
            else:
                top, ritz = lanczos_jacobian_norm(cnn, x_star, iters=iters, generator=gen,
                                                  start=start)
            self.vectors[k] = ritz[:1]
            values.append(float(top.detach().max()))
        return values

    def estimate(self, step: Any, cnn: Any, s: int, *, iters: int, init_iters: int,
                 fwd: FixedPointConfig) -> tuple[torch.Tensor, int]:
        """Step ``s``'s estimate: probe ``s mod N``'s fixed point with the current model, the
        probe's power iteration continued by ``iters`` iterations there, and ‖J v‖ (carrying
        gradients to H). Returns the estimate and the probe's index."""
        k = s % len(self.problems)
        x_star = self.fixed_point(step, k, init_iters=init_iters, fwd=fwd)
        gen = torch.Generator().manual_seed(int(np.random.default_rng(
            [self.seed, _PROBE_STREAM, k, 1]).integers(2**31 - 1)))
        value, v = tracked_jacobian_norm(cnn, x_star, self.vectors[k], iters=iters,
                                         generator=gen)
        self.vectors[k] = v
        return value, k

    # ------------------------------------------------------------------ the resume state
    def state(self) -> dict[str, Any]:
        return {"samples": list(self.samples),
                "vectors": [None if v is None else v.detach().cpu() for v in self.vectors]}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """The vectors of a resume state (ignored when it chose other probe samples)."""
        if not isinstance(saved, dict) or saved.get("samples") != self.samples:
            return
        device = self.problems[0].aty.device if self.problems else torch.device("cpu")
        self.vectors = [None if v is None else v.to(device) for v in saved["vectors"]]
