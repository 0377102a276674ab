"""The records of the guarantees: what ``check-lipschitz`` and ``robustness`` measure and report.

Frozen dataclasses for the certified global bound, the local estimates at the
data, the step contraction, the robustness bounds, the uniqueness test and the
adversarial attack; the two reports that collect them (:class:`LipschitzReport`,
:class:`RobustnessReport`) and the options of the two jobs (:class:`CheckConfig`,
:class:`RobustnessConfig`). Every record turns into plain, strict JSON with
``as_dict()`` (non-finite numbers become ``null``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..deq.mol import contraction_factor
from ..errors import ConfigError
from ..models.certificate import GlobalBound, LocalEstimates, Verdict, finite_or_none

START_NAMES: tuple[str, ...] = ("zero", "zero-filled", "cg-sense", "random")


def _json_safe(value: Any) -> Any:
    """A copy of plain data with non-finite floats replaced by None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float):
        return finite_or_none(value)
    return value


# ===================================================================================== results
@dataclass(frozen=True)
class StepContraction:
    """Contraction facts of the MOL step for a Lipschitz constant L of H.

    factor ρ = |1 − α| + αL (exact resolvent); admissible α ∈ (0, 2/(1 + L)).
    """

    alpha: float
    lipschitz: float

    @property
    def margin(self) -> float:
        """Monotonicity margin m = 1 − L."""
        return 1.0 - self.lipschitz

    @property
    def factor(self) -> float:
        return contraction_factor(self.alpha, self.lipschitz)

    @property
    def alpha_max(self) -> float | None:
        """Upper end of the admissible α range (0, 2/(1 + L)); None when L ≥ 1."""
        return 2.0 / (1.0 + self.lipschitz) if self.lipschitz < 1.0 else None

    @property
    def contracts(self) -> bool:
        return self.lipschitz < 1.0 and self.factor < 1.0

    def as_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "lipschitz": finite_or_none(self.lipschitz),
                "margin": finite_or_none(self.margin), "factor": finite_or_none(self.factor),
                "alpha_range": [0.0, finite_or_none(self.alpha_max)], "contracts": self.contracts,
                "best_alpha": 1.0, "best_factor": finite_or_none(self.lipschitz)}


@dataclass(frozen=True)
class RobustnessBounds:
    """Amplification bounds ‖Δx‖/‖Δb‖ of the normalised problem (see the package docstring).

    ``basis`` is "certified" (m = 1 − L from the global certificate: guarantees),
    "monotone" (m = 1 − μ, μ the largest top of the spectrum of ½(J + Jᵀ) at the data, which
    ``lipschitz`` then holds: estimates) or "local" (m = 1 − the local Lipschitz estimate:
    estimates). ``op_norm`` is ‖A‖.
    """

    lam: float
    lipschitz: float
    op_norm: float
    basis: str

    @property
    def margin(self) -> float:
        return 1.0 - self.lipschitz

    @property
    def paper(self) -> float | None:
        """(λ/m)·‖A‖, or None when m ≤ 0."""
        m = self.margin
        return self.lam / m * self.op_norm if m > 0 else None

    @property
    def tight(self) -> float | None:
        """½·√(λ/m), or None when m ≤ 0."""
        m = self.margin
        return 0.5 * math.sqrt(self.lam / m) if m > 0 else None

    def as_dict(self) -> dict[str, Any]:
        return {"lambda": self.lam, "lipschitz": finite_or_none(self.lipschitz),
                "margin": finite_or_none(self.margin), "op_norm": finite_or_none(self.op_norm),
                "basis": self.basis, "paper": finite_or_none(self.paper), "tight": finite_or_none(self.tight)}


def robustness_bounds(*, lam: float, lipschitz: float, op_norm: float,
                      basis: str) -> RobustnessBounds:
    """Paper-style (λ/m)‖A‖ and tight ½√(λ/m) amplification bounds, m = 1 − L."""
    return RobustnessBounds(lam=float(lam), lipschitz=float(lipschitz), op_norm=float(op_norm),
                            basis=basis)


@dataclass(frozen=True)
class UniquenessResult:
    """Fixed points reached from several starts (per slice, worst over slices).

    ``max_distance``: largest pairwise ‖x_i − x_j‖/‖x_cg-sense‖; ``bound``: the
    tolerance-implied (‖r_i‖ + ‖r_j‖)/(m·‖x_cg-sense‖) of the same pair, r the
    equation residual (None when m ≤ 0); ``consistent``: every pair within its
    bound (None without a bound).
    """

    starts: tuple[str, ...]
    max_distance: float
    bound: float | None
    basis: str
    consistent: bool | None
    worst_pair: tuple[str, str]
    residuals: tuple[float, ...]
    converged: tuple[bool, ...]
    iterations: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"starts": list(self.starts), "max_relative_distance": finite_or_none(self.max_distance),
                "bound": finite_or_none(self.bound), "basis": self.basis,
                "consistent": self.consistent, "worst_pair": list(self.worst_pair),
                "relative_residuals": [finite_or_none(r) for r in self.residuals],
                "converged": list(self.converged), "iterations": list(self.iterations)}


@dataclass(frozen=True)
class LipschitzReport:
    """Everything ``molrecon check-lipschitz`` reports."""

    model: str
    sha256: str
    constraint: str
    alpha: float
    lam: float
    cg_iters: int
    data: tuple[str, ...]
    global_bound: GlobalBound
    local: LocalEstimates
    op_norm: float
    contraction_certified: StepContraction
    contraction_local: StepContraction
    robustness: RobustnessBounds
    uniqueness: UniquenessResult | None
    verdict: Verdict
    reasons: tuple[str, ...]
    stored_certificate: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "sha256": self.sha256,
            "constraint": self.constraint,
            "alpha": self.alpha,
            "lambda": self.lam,
            "cg_iters": self.cg_iters,
            "data": list(self.data),
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "certified": self.global_bound.as_dict(),
            "local": self.local.as_dict(),
            "margin_certified": finite_or_none(self.contraction_certified.margin),
            "margin_local": finite_or_none(self.contraction_local.margin),
            "contraction_certified": self.contraction_certified.as_dict(),
            "contraction_local": self.contraction_local.as_dict(),
            "op_norm": finite_or_none(self.op_norm),
            "robustness_bounds": self.robustness.as_dict(),
            "uniqueness": None if self.uniqueness is None else self.uniqueness.as_dict(),
            "stored_certificate": _json_safe(self.stored_certificate),
        }


@dataclass(frozen=True)
class AttackResult:
    """Worst perturbation found for one network at one ε (worst over slices).

    ``amplification``: ‖Δx‖/‖Δb‖; ``relative_change``: ‖Δx‖/‖x‖ of the same
    slice; ``paper_at_found``: (λ/m)‖AᴴΔb‖/‖Δb‖ at the Δb found (MOL only,
    None without a positive margin); ``history``: best amplification after
    each ascent step; ``converged``: every forward solve reached its tolerance
    (always True for the unrolled network).
    """

    network: str
    eps: float
    amplification: float
    per_item: tuple[float, ...]
    relative_change: float
    paper_at_found: float | None
    history: tuple[float, ...]
    converged: bool

    def as_dict(self) -> dict[str, Any]:
        return {"network": self.network, "eps": self.eps,
                "amplification": finite_or_none(self.amplification),
                "per_item": [finite_or_none(v) for v in self.per_item],
                "relative_change": finite_or_none(self.relative_change),
                "paper_bound_at_found": finite_or_none(self.paper_at_found),
                "history": [finite_or_none(v) for v in self.history], "converged": self.converged}


@dataclass(frozen=True)
class RobustnessReport:
    """Everything ``molrecon robustness`` reports."""

    model: str
    data: tuple[str, ...]
    eps: tuple[float, ...]
    steps: int
    unrolled_k: int
    mol: tuple[AttackResult, ...]
    unrolled: tuple[AttackResult, ...]
    bounds: RobustnessBounds
    certified_bound: float

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": list(self.data), "eps": list(self.eps),
                "steps": self.steps, "unrolled_k": self.unrolled_k,
                "certified_bound": finite_or_none(self.certified_bound),
                "bounds": self.bounds.as_dict(),
                "mol": [a.as_dict() for a in self.mol],
                "unrolled": [a.as_dict() for a in self.unrolled]}


# ===================================================================================== configs
@dataclass(frozen=True)
class CheckConfig:
    """Options of :func:`check_lipschitz`.

    power_iters       most power iterations on JᵀJ per point
    power_tol         stop a power iteration when it rose by less than this (relative)
                      over 10 iterations; None: exactly ``power_iters``
    ratio_steps       ascent steps of the ratio search per point
    lanczos_steps     Lanczos steps on JᵀJ per point (0: none); the local estimate is the
                      largest of the power iteration, the ratio search and Lanczos
    tol, max_iter     MOL fixed-point solve: relative residual ‖T(x) − x‖/‖x‖ ≤ tol
    norm_iters        power iterations on AᴴA for ‖A‖
    uniqueness        also solve from every start in ``START_NAMES`` and compare
    size              image size (Y, X) or (D, Y, X) at which to measure layer norms
    layer_iters       power iterations per layer at ``size``
    seed              seed of every random start / probe
    """

    power_iters: int = 300
    power_tol: float | None = 1e-4
    ratio_steps: int = 10
    lanczos_steps: int = 30
    tol: float = 1e-5
    max_iter: int = 200
    norm_iters: int = 30
    uniqueness: bool = False
    size: tuple[int, ...] | None = None
    layer_iters: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("power_iters", "norm_iters", "max_iter", "layer_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.ratio_steps, bool) or not isinstance(self.ratio_steps, int) \
                or self.ratio_steps < 0:
            raise ConfigError(f"ratio_steps must be an integer >= 0, got {self.ratio_steps!r}")
        if isinstance(self.lanczos_steps, bool) or not isinstance(self.lanczos_steps, int) \
                or self.lanczos_steps < 0:
            raise ConfigError(f"lanczos_steps must be an integer >= 0, got {self.lanczos_steps!r}")
        if not (isinstance(self.tol, (int, float)) and 0.0 < self.tol < 1.0):
            raise ConfigError(f"tol must lie in (0, 1), got {self.tol!r}")
        _check_power_tol(self.power_tol)
        if self.size is not None and (len(self.size) not in (2, 3)
                                      or any(int(s) != s or s < 1 for s in self.size)):
            raise ConfigError(f"size must be 2 or 3 positive integers, got {self.size!r}")


@dataclass(frozen=True)
class RobustnessConfig:
    """Options of :func:`robustness`.

    eps          perturbation radii, relative: ‖Δb_i‖ ≤ ε‖b_i‖ per slice
    steps        gradient-ascent steps per ε (each one forward and one backward solve)
    unrolled_k   K of the unrolled comparison network (0: no comparison)
    beta         ascent step on the sphere: Δb ← r·unit((1 − β)Δb/r + β·ĝ), ĝ the unit
                 gradient; β = 1 is the power iteration of the linearised map
    tol          forward fixed-point tolerance (relative residual); None: 1e-5 in
                 single precision, 1e-10 in double
    backward_tol tolerance of the implicit-gradient solve (only the direction matters)
    max_iter     cap of each forward and backward solve
    power_iters  most power iterations for the local Lipschitz estimate at the fixed point
    power_tol    its stopping rule (as in :class:`CheckConfig`)
    lanczos_steps Lanczos steps on JᵀJ at each fixed point (0: none); the local estimate
                 is the larger of the two (both are lower bounds; Lanczos reads the top of
                 a crowded spectrum that the power iteration approaches slowly)
    norm_iters   power iterations on AᴴA for ‖A‖
    seed         seed of the initial perturbation
    """

    eps: tuple[float, ...] = (0.01, 0.05)
    steps: int = 5
    unrolled_k: int = 10
    beta: float = 1.0
    tol: float | None = None
    backward_tol: float = 1e-4
    max_iter: int = 200
    power_iters: int = 300
    power_tol: float | None = 1e-4
    lanczos_steps: int = 30
    norm_iters: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.eps or any(not (isinstance(e, (int, float)) and 0.0 < e < math.inf)
                               for e in self.eps):
            raise ConfigError(f"eps must be positive numbers, got {self.eps!r}")
        if len(set(self.eps)) != len(self.eps):
            raise ConfigError(f"eps values must differ, got {self.eps!r}")
        for name in ("steps", "unrolled_k", "lanczos_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        for name in ("max_iter", "power_iters", "norm_iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if not (isinstance(self.beta, (int, float)) and 0.0 < self.beta <= 1.0):
            raise ConfigError(f"beta must lie in (0, 1], got {self.beta!r}")
        if self.tol is not None and not (0.0 < self.tol < 1.0):
            raise ConfigError(f"tol must lie in (0, 1), got {self.tol!r}")
        if not 0.0 < self.backward_tol < 1.0:
            raise ConfigError(f"backward_tol must lie in (0, 1), got {self.backward_tol!r}")
        _check_power_tol(self.power_tol)


def _check_power_tol(value: float | None) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and 0.0 < value < 1.0):
        raise ConfigError(f"power_tol must lie in (0, 1) or be None, got {value!r}")
