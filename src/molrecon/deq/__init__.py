"""The MOL engine: solving x − H(x) + λAᴴ(Ax − b) = 0 and differentiating its solution.

* :mod:`.mol` — the MOL step T (gradient step on H, CG data consistency), its config.
* :mod:`.fixed_point` — plain and Anderson fixed-point solvers with residual-based stopping.
* :mod:`.implicit` — deep-equilibrium (implicit) differentiation and the unrolled baseline.
"""

from .fixed_point import FixedPointConfig, FixedPointResult, solve_fixed_point
from .implicit import BackwardStats, DEQFixedPoint, DEQOutput, deq_solve, unrolled
from .mol import (
    MolConfig,
    MolStep,
    NormalOperator,
    contraction_factor,
    regularised_sense,
    residual_scale,
)

__all__ = [
    "BackwardStats",
    "DEQFixedPoint",
    "DEQOutput",
    "FixedPointConfig",
    "FixedPointResult",
    "MolConfig",
    "MolStep",
    "NormalOperator",
    "contraction_factor",
    "deq_solve",
    "regularised_sense",
    "residual_scale",
    "solve_fixed_point",
    "unrolled",
]
