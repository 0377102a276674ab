"""The Lipschitz certificate of a MOL prior H, stored in every checkpoint.

A property of the network alone (no data term): the certified global bound of
Lip(H), the product of the layers' certified operator-norm bounds, valid for
every image size (:func:`global_bound`), with the layers' measured norms on one
size beside it (:func:`layer_norms_at_size`); the local estimates at given
points, lower bounds attained by actual points and directions
(:func:`local_estimates`), with the top μ of the spectrum of the Jacobian's
symmetric part, what F = I − H's monotonicity needs below 1; the verdict certified /
empirical / monotone / violated (:func:`decide`); and the plain dict that training writes into a checkpoint
(:func:`certificate_for`). ``molrecon check-lipschitz`` (:mod:`molrecon.guarantees`)
measures the same quantities at the fixed points of real reconstructions.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as nnf

from ..errors import ConfigError
from .lipschitz import (jacobian_norm, lanczos_jacobian_norm, local_lipschitz_ratio,
                        monotonicity_estimate)
from .spectral import layer_bounds

if TYPE_CHECKING:
    from .checkpoint import LoadedModel
    from .cnn import MolCNN

Verdict = Literal["certified", "empirical", "monotone", "violated"]
VERDICTS: tuple[str, ...] = ("certified", "empirical", "monotone", "violated")

def finite_or_none(v: float | None) -> float | None:
    """JSON-safe float: None for missing or non-finite values."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None



@dataclass(frozen=True)
class Summary:
    """Distribution of an estimate over data points."""

    values: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def median(self) -> float:
        return float(statistics.median(self.values))

    @property
    def max(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {"min": finite_or_none(self.min), "median": finite_or_none(self.median),
                "max": finite_or_none(self.max), "values": [finite_or_none(v) for v in self.values]}


@dataclass(frozen=True)
class GlobalBound:
    """Certified global Lipschitz bound of H: the product of certified layer bounds.

    ``all_sizes`` is True: each layer bound is a supremum over continuous
    frequencies (see the package docstring). ``size`` and ``measured_layer_norms``
    are the power-iteration norms of the zero-padded layers on one image size
    (lower estimates; only when a size was asked for).
    """

    bound: float
    layer_bounds: tuple[float, ...]
    spectral_grid: int
    constraint: str
    lipschitz_target: float
    all_sizes: bool = True
    size: tuple[int, ...] | None = None
    measured_layer_norms: tuple[float, ...] | None = None

    @property
    def certified(self) -> bool:
        return self.bound < 1.0

    @property
    def measured_product(self) -> float | None:
        return None if self.measured_layer_norms is None else math.prod(self.measured_layer_norms)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bound": finite_or_none(self.bound),
            "layer_bounds": [finite_or_none(v) for v in self.layer_bounds],
            "spectral_grid": self.spectral_grid,
            "constraint": self.constraint,
            "lipschitz_target": self.lipschitz_target,
            "holds_for_all_image_sizes": self.all_sizes,
            "certified": self.certified,
            "size": None if self.size is None else list(self.size),
            "measured_layer_norms": (None if self.measured_layer_norms is None
                                     else [finite_or_none(v) for v in self.measured_layer_norms]),
            "measured_product": finite_or_none(self.measured_product),
        }


@dataclass(frozen=True)
class PointEstimate:
    """Local Lipschitz estimates at one data point (one slice of one file).

    ``point`` says what the point is: ``"fixed point"`` (the MOL solution),
    or ``"cg-sense"`` when the MOL iteration produced non-finite values and the
    CG-SENSE start was used instead.
    """

    source: str
    item: int
    point: str
    power: float
    ratio: float
    residual: float | None = None
    iterations: int | None = None
    converged: bool | None = None
    power_iterations: int | None = None
    power_converged: bool | None = None
    #: ‖J v‖ of the top Ritz vector after ``lanczos_steps`` Lanczos steps (None: not run).
    lanczos: float | None = None
    lanczos_steps: int | None = None
    #: μ = max ⟨v, J v⟩ over the top Ritz vector of ½(J + Jᵀ) after ``lanczos_steps`` steps:
    #: F = I − H is (1 − μ)-monotone near the point where μ < 1 (None: not run).
    monotone: float | None = None

    @property
    def max(self) -> float:
        """The largest estimate; a non-finite one (overflow) counts as infinite. Every one is
        ‖H(u) − H(v)‖/‖u − v‖ or ‖J v‖ for some u, v, so each, and their maximum, is a lower
        bound of the local Lipschitz constant."""
        est = [self.power, self.ratio] + ([] if self.lanczos is None else [self.lanczos])
        return max(v if math.isfinite(v) else math.inf for v in est)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "item": self.item, "point": self.point,
                "power": finite_or_none(self.power), "ratio": finite_or_none(self.ratio),
                "fixed_point_residual": finite_or_none(self.residual), "iterations": self.iterations,
                "converged": self.converged, "power_iterations": self.power_iterations,
                "power_converged": self.power_converged,
                "lanczos": None if self.lanczos is None else finite_or_none(self.lanczos),
                "lanczos_steps": self.lanczos_steps,
                "monotone": None if self.monotone is None else finite_or_none(self.monotone)}


@dataclass(frozen=True)
class LocalEstimates:
    """Local estimates at every point, and their distributions."""

    points: tuple[PointEstimate, ...]

    @property
    def power(self) -> Summary:
        return Summary(tuple(p.power for p in self.points))

    @property
    def ratio(self) -> Summary:
        return Summary(tuple(p.ratio for p in self.points))

    @property
    def lanczos(self) -> Summary | None:
        vals = [p.lanczos for p in self.points]
        return None if any(v is None for v in vals) else Summary(tuple(vals))  # type: ignore[arg-type]

    @property
    def max(self) -> float:
        return max(p.max for p in self.points)

    @property
    def monotone(self) -> Summary | None:
        """μ at every point (None unless every point has one)."""
        vals = [p.monotone for p in self.points]
        return None if any(v is None for v in vals) else Summary(tuple(vals))  # type: ignore[arg-type]

    @property
    def monotone_max(self) -> float | None:
        """The largest μ (a non-finite one counts as infinite), or None where not measured."""
        m = self.monotone
        return None if m is None else max(v if math.isfinite(v) else math.inf for v in m.values)

    @property
    def power_converged(self) -> bool | None:
        """Whether every power iteration met its tolerance (None: fixed counts were run)."""
        flags = [p.power_converged for p in self.points]
        return None if any(f is None for f in flags) else all(flags)

    def as_dict(self) -> dict[str, Any]:
        lz = self.lanczos
        mono = self.monotone
        return {"max": finite_or_none(self.max), "power": self.power.as_dict(),
                "ratio": self.ratio.as_dict(), "lanczos": None if lz is None else lz.as_dict(),
                "monotone": None if mono is None else mono.as_dict(),
                "monotone_max": finite_or_none(self.monotone_max),
                "points": [p.as_dict() for p in self.points]}


def global_bound(model: MolCNN, *, size: Sequence[int] | None = None, layer_iters: int = 50,
                 seed: int = 0) -> GlobalBound:
    """The certified bound of ``model`` (and its layers' measured norms at ``size``)."""
    bounds = tuple(layer_bounds(model))
    measured = None
    if size is not None:
        measured = layer_norms_at_size(model, size, iters=layer_iters, seed=seed)
    return GlobalBound(bound=model.bound_from(bounds), layer_bounds=bounds,
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
    gen = seeded_generator(seed)
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
                    power_iters: int = 20, power_tol: float | None = None,
                    ratio_steps: int = 10, lanczos_steps: int = 0, seed: int = 0,
                    on_point: Callable[[int], None] | None = None) -> LocalEstimates:
    """Power-iteration and ratio-search estimates at every item of every tensor in ``points``.

    ``power_tol``: run each power iteration until it rises by less than this (relative) over
    10 iterations, at most ``power_iters`` (:func:`~molrecon.models.lipschitz.jacobian_norm`);
    None: exactly ``power_iters`` iterations. ``lanczos_steps`` > 0 adds the Lanczos estimate
    of :func:`~molrecon.models.lipschitz.lanczos_jacobian_norm` with that many steps, which
    reads the top of a crowded spectrum where the power iteration still climbs, and μ, the
    top of the spectrum of ½(J + Jᵀ) (:func:`~molrecon.models.lipschitz.monotonicity_estimate`,
    as many steps).

    ``points``: complex ``(B, D, Y, X)`` tensors; ``labels``: (source, item,
    point kind) per item, in order (default: ("", index, "point")). ``on_point(i)`` is
    called before the estimates at item ``i``.
    """
    items = [p[i:i + 1].detach() for p in points for i in range(p.shape[0])]
    if not items:
        raise ConfigError("local Lipschitz estimates need at least one data point")
    if labels is not None and len(labels) != len(items):
        raise ValueError("one label per point item is needed")
    gen = seeded_generator(seed)
    priors: dict[torch.dtype, MolCNN] = {}
    out: list[PointEstimate] = []
    for n, x in enumerate(items):
        if on_point is not None:
            on_point(n)
        if x.dtype not in priors:
            priors[x.dtype] = prior_in_precision(model, x.dtype)
        prior = priors[x.dtype]
        power = jacobian_norm(prior, x, max_iters=power_iters, rtol=power_tol, generator=gen)
        with torch.no_grad():
            ratio_t, _ = local_lipschitz_ratio(prior, x, steps=ratio_steps, generator=gen)
        lanczos = mono = None
        if lanczos_steps > 0:
            values, _ = lanczos_jacobian_norm(prior, x, iters=lanczos_steps, generator=gen)
            lanczos = float(values.detach().max())
            found = monotonicity_estimate(prior, x, iters=lanczos_steps, generator=gen)
            mono = float(found.top.detach().max())
        src, item, kind = labels[n] if labels is not None else ("", n, "point")
        out.append(PointEstimate(source=src, item=item, point=kind, power=power.value,
                                 ratio=float(ratio_t), power_iterations=power.iterations,
                                 power_converged=power.converged if power_tol is not None
                                 else None, lanczos=lanczos,
                                 lanczos_steps=lanczos_steps if lanczos_steps > 0 else None,
                                 monotone=mono))
    return LocalEstimates(tuple(out))


def decide(*, certified_bound: float, local_max: float,
           uniqueness_consistent: bool | None = None,
           monotone_max: float | None = None) -> tuple[Verdict, tuple[str, ...]]:
    """The verdict (see the :mod:`molrecon.guarantees` docstring) and the reasons for it.

    ``monotone_max``: the largest μ (top of the spectrum of ½(J + Jᵀ)) at the same points, or
    None where not measured. A local Lipschitz estimate ≥ 1 with every μ < 1 is the verdict
    ``monotone``: H is not a contraction near the data, but F = I − H is monotone there,
    which is what the fixed point's uniqueness and the robustness bounds rest on."""
    uniqueness_broken = ("fixed points from different starts differ by more than the "
                         "monotonicity margin allows")
    if not local_max < 1.0:                     # also NaN: an overflowing estimate refutes
        lip = (f"a local Lipschitz estimate is {local_max:.4g} >= 1: H is not a "
               "contraction near the data")
        if monotone_max is not None and monotone_max < 1.0 and uniqueness_consistent is not False:
            return "monotone", (
                f"{lip}, but the top of its numerical range is {monotone_max:.4g} < 1 at every "
                f"point: F = I − H is monotone there (margin {1.0 - monotone_max:.4g}), so the "
                "fixed point is unique and the robustness bounds hold locally; the plain "
                "α = 1 step does not contract there (convergence is measured)",)
        reasons = [lip]
        if monotone_max is not None and not monotone_max < 1.0:
            reasons.append(f"the top of H's numerical range is {monotone_max:.4g} >= 1: F = "
                           "I − H is not monotone near the data")
        if uniqueness_consistent is False:
            reasons.append(uniqueness_broken)
        return "violated", tuple(reasons)
    if uniqueness_consistent is False:
        return "violated", (uniqueness_broken,)
    if certified_bound < 1.0:                  # NaN is not < 1: no certificate
        reason = (f"certified global bound {certified_bound:.4g} < 1 "
                  "(all inputs, all image sizes)")
        return "certified", (reason,)
    reason = (f"no global certificate (bound {certified_bound:.4g} >= 1); local estimates "
              f"at the data are < 1 (max {local_max:.4g})")
    return "empirical", (reason,)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def prior_in_precision(model: MolCNN, dtype: torch.dtype) -> MolCNN:
    """``model`` itself, or a float64 copy for complex128 problems."""
    if dtype == torch.complex128 and model.raw_weights()[0].dtype != torch.float64:
        return copy.deepcopy(model).double()
    return model


def certificate_for(subject: LoadedModel | MolCNN, points: Sequence[torch.Tensor], *,
                    data: Sequence[str] = (), power_iters: int = 10,
                    power_tol: float | None = None, ratio_steps: int = 10,
                    lanczos_steps: int = 0, seed: int = 0) -> dict[str, Any]:
    """The plain-dict Lipschitz certificate stored in checkpoints.

    ``points``: fixed points (complex ``(B, D, Y, X)``) the local estimates are
    measured at, e.g. the validation reconstructions of training; ``data``:
    what they came from (file names). Keys: ``certified_bound``,
    ``layer_bounds``, ``spectral_grid``, ``holds_for_all_image_sizes``,
    ``local_power``, ``local_ratio``, ``local_max``, ``points``, ``data``,
    ``verdict``, ``date`` (:func:`~molrecon.models.save_checkpoint` recomputes
    the first three from the weights it writes, so they always agree); with
    ``lanczos_steps`` > 0 also ``local_lanczos`` and ``lanczos_steps``, and
    ``local_max`` includes the Lanczos values, and ``local_monotone`` (μ per point) and
    ``local_monotone_max``.
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
            est = local_estimates(model, usable, power_iters=power_iters, power_tol=power_tol,
                                  ratio_steps=ratio_steps, lanczos_steps=lanczos_steps,
                                  seed=seed)
        finally:
            model.train(was_training)
        verdict, _ = decide(certified_bound=gb.bound, local_max=est.max,
                            monotone_max=est.monotone_max)
        cert.update({
            "local_power": [finite_or_none(p.power) for p in est.points],
            "local_ratio": [finite_or_none(p.ratio) for p in est.points],
            "local_max": finite_or_none(est.max),
            "local_power_iterations": [p.power_iterations for p in est.points],
            "local_power_converged": est.power_converged,
            "points": len(est.points),
            "verdict": verdict,
        })
        if lanczos_steps > 0:
            cert["local_lanczos"] = [finite_or_none(p.lanczos) for p in est.points]
            cert["lanczos_steps"] = lanczos_steps
            cert["local_monotone"] = [finite_or_none(p.monotone) for p in est.points]
            cert["local_monotone_max"] = finite_or_none(est.monotone_max)
    else:
        cert.update({"local_power": [], "local_ratio": [], "local_max": None, "points": 0,
                     "verdict": "certified" if gb.certified else None})
    return cert


def _as_model(subject: LoadedModel | MolCNN) -> MolCNN:
    return subject.model if hasattr(subject, "mol_config") else subject  # type: ignore[union-attr]
