"""Frozen configuration records and defaults shared across layers (no imports above ``errors``).

``MolConfig`` lives here, not in ``deq/``, because the checkpoint format in
``models/`` stores it and parts must not import the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import ConfigError

#: Tikhonov weight of CG-SENSE relative to the data scale (``reconstruct --sense-lambda``),
#: also the MOL start everywhere (:mod:`molrecon.problem`).
SENSE_LAMBDA = 1e-3
#: CG iterations of CG-SENSE (``reconstruct --sense-iters``).
SENSE_ITERS = 30
#: Where a training problem's coil maps come from (:func:`molrecon.problem.undersampled`,
#: ``train --maps`` and ``--val-maps``).
MAPS_FROM: tuple[str, ...] = ("reference", "calibration")
#: How many image flips a prior may average over (``CNNConfig.ensemble``,
#: ``reconstruct --ensemble``): none, left-right, or left-right and up-down.
ENSEMBLE_SIZES: tuple[int, ...] = (1, 2, 4)


@dataclass(frozen=True)
class MolConfig:
    """Hyperparameters of the MOL step.

    alpha     step size α ∈ (0, 2); α = 1 (default) gives the best contraction bound.
    lam       data-consistency weight λ > 0 (the initial value when learned).
    cg_iters  warm-started CG iterations per step (fixed count, see ``deq.mol``).
    learn_lam whether λ is a trainable parameter.

    Why α = 1 and 10 CG iterations (``benchmarks/bench_deq_iterations.py``, 64×64 slice,
    8 coils, R = 4, the slowest contractive prior H = 0.98·x, Anderson, tol 1e-4):

    ===========  ======  ======  =======  =======
    λ, α         CG 5    CG 10   CG 20    CG 40
    ===========  ======  ======  =======  =======
    100, 1       109     24      25       28
    100, 0.5     39      29      52       52
    1000, 1      527     160     21       18
    ===========  ======  ======  =======  =======

    Plain iteration needs 193 (λ = 100, CG 10) and the reference schedule (α = 0.01)
    does not reach the tolerance in 1000. A step with too few CG iterations is a poor
    resolvent and slows the outer iteration far more than the CG iterations cost (one
    CG iteration is one AᴴA, much cheaper than H); the CG count needed grows with αλ
    (the condition number of the CG system in ``deq.mol`` is 1 + αλ‖A‖²): use 20 for λ of
    order 1000.
    """

    alpha: float = 1.0
    lam: float = 100.0
    cg_iters: int = 10
    learn_lam: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 2.0):
            raise ConfigError(f"alpha must lie in (0, 2), got {self.alpha!r}")
        if not (isinstance(self.lam, (int, float)) and 0.0 < self.lam < math.inf):
            raise ConfigError(f"lam must be positive and finite, got {self.lam!r}")
        if isinstance(self.cg_iters, bool) or not isinstance(self.cg_iters, int) \
                or self.cg_iters < 1:
            raise ConfigError(f"cg_iters must be an integer >= 1, got {self.cg_iters!r}")
        if not isinstance(self.learn_lam, bool):
            raise ConfigError(f"learn_lam must be a bool, got {self.learn_lam!r}")
