"""The MOL problems the guarantees are measured on, and what the measurements share.

:func:`load_problems` reads raw scans into normalised MOL problems (the same
preparation as ``molrecon reconstruct``: slices spread over the scan, the
intensity scale, ESPIRiT maps, the SENSE operator A and the CG-SENSE start);
:func:`example_scan` is the bundled scan used when no data is given.
:func:`solve_mol` finds a problem's MOL fixed point and :func:`operator_norm`
measures ‖A‖. The private helpers below them (per-item norms, seeded complex
noise, the prior in the problem's precision, the MOL step of a checkpoint) are
shared by :mod:`.certificate` and :mod:`.robustness`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..deq.fixed_point import FixedPointConfig, FixedPointResult
from ..deq.inference import solve_mol_fixed_point
from ..deq.mol import MolStep, support_of
from ..errors import ConfigError, InputDataError
from ..io.detect import read_raw
from ..io.types import RawScan
from ..memory import plan_batches
from ..models.certificate import seeded_generator
from ..problem import Problem, from_scan, with_sense_start

if TYPE_CHECKING:
    from ..deq.mol import MolConfig
    from ..models.cnn import MolCNN
    from ..physics.sense import SenseOperator


def example_scan() -> Path:
    """The raw example scan shipped with molrecon (2D brain, 8 coils, R = 4)."""
    return Path(str(resources.files("molrecon") / "data" / "examples" / "brain_2d_r4.h5"))


def _pick_items(n: int, points: int | None) -> list[int]:
    """``points`` slice indices spread evenly over ``n`` slices (all when None or ≥ n)."""
    if points is None or points >= n:
        return list(range(n))
    if points == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (points - 1)) for i in range(points)})


def load_problems(paths: Sequence[str | os.PathLike[str]], *, kinds: Sequence[str] | None = None,
                  points: int | None = 4, device: str | torch.device = "cpu",
                  double: bool = False) -> list[Problem]:
    """Read raw files and build their normalised MOL problems, as ``molrecon reconstruct`` does.

    Per file: up to ``points`` slices spread evenly over the scan (batch items;
    a 3D scan is one item), the intensity scale of
    :mod:`molrecon.physics.scaling`, ESPIRiT maps, the SENSE operator and the
    CG-SENSE start. ``kinds``: the data kinds the model applies to (a file of
    another kind is refused with :class:`~molrecon.errors.ConfigError`).
    ``double`` builds everything in complex128. The slices of a file are one problem
    when they fit the free memory together, else several (planned like
    ``reconstruct``'s batches, with room for the gradients of the local estimates);
    a scan of which not even one slice fits is refused before any work
    (:class:`~molrecon.errors.ResourceError`).
    """
    if points is not None and points < 1:
        raise ConfigError(f"points must be at least 1, got {points}")
    dev = torch.device(device)
    out: list[Problem] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise InputDataError("no such file", path=p)
        scan = read_raw(p)
        if kinds is not None and scan.kind not in kinds:
            raise ConfigError(f"the scan is {scan.kind} data, the model applies to "
                              f"{'/'.join(kinds)} data", path=p)
        idx = _pick_items(scan.shape[0], points)
        for part in _batches(idx, scan, dev, double=double):
            prep = from_scan(scan, part, dev)
            op, kn = prep.op, prep.kspace
            if double:
                op = op.to(dtype=torch.complex128)
                kn = kn.to(torch.complex128)
            out.append(with_sense_start(op, kn, kind=scan.kind, source=p.name, items=part))
    return out


def _batches(idx: list[int], scan: RawScan, device: torch.device, *,
             double: bool) -> list[list[int]]:
    """``idx`` cut into batches that fit the free memory: the reconstruction's plan for MOL
    with twice the room (the local estimates differentiate through the prior), and twice
    again in double precision."""
    shape = (len(idx), *scan.shape[1:])
    factor = 2 * (2 if double else 1)
    planned = plan_batches((len(idx) * factor, *shape[1:]), scan.kind, "mol", device)
    size = max(1, planned // factor)
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def solve_mol(step: MolStep, problem: Problem, x0: torch.Tensor, *, tol: float,
              max_iter: int, on_iteration: Callable[[int, float], None] | None = None
              ) -> FixedPointResult:
    """The MOL fixed point of ``problem`` from ``x0`` (Anderson, no graph).

    Returns :class:`~molrecon.deq.fixed_point.FixedPointResult`; ``on_iteration(k,
    residual)`` follows the iteration. ``tol`` and the residuals are on the α = 1 scale
    (:func:`molrecon.deq.inference.solve_mol_fixed_point`).
    """
    cfg = FixedPointConfig(method="anderson", tol=tol, max_iter=max_iter, warn=False)
    with torch.no_grad():
        aty = problem.aty                                                     # (B, D, Y, X)
        fn = step.bind(normal=problem.op.normal, aty=aty, support=support_of(problem.op))
        return solve_mol_fixed_point(fn, x0, alpha=step.alpha, config=cfg,
                                     on_iteration=on_iteration)


def operator_norm(op: SenseOperator, *, iters: int = 30, seed: int = 0) -> float:
    """‖A‖ = √λ_max(AᴴA) by power iteration (largest over batch items; a lower estimate
    that converges from below)."""
    gen = seeded_generator(seed)
    with torch.no_grad():
        v = _complex_noise(op.image_shape, op.dtype, op.device, gen)           # (B, D, Y, X)
        v = v / _bcast(_item_norm(v), v)
        est = torch.zeros(v.shape[0], dtype=v.real.dtype, device=v.device)
        for _ in range(iters):
            w = op.normal(v)                                                    # (B, D, Y, X)
            nw = _item_norm(w)
            est = torch.maximum(est, torch.sqrt(torch.sum((v.conj() * w).real.reshape(
                v.shape[0], -1), dim=1).clamp_min(0)))
            safe = nw > 0
            v = torch.where(_bcast(safe, v), w / _bcast(torch.where(safe, nw, 1.0), w), v)
    return float(est.max())


# ===================================================================================== helpers
def _item_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every batch item, (B,)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _complex_noise(shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                   generator: torch.Generator) -> torch.Tensor:
    """Circular complex white noise, E|n|² = 1, drawn on the CPU generator."""
    real = torch.empty((), dtype=dtype).real.dtype
    n = torch.randn((*shape, 2), generator=generator, dtype=real) * (0.5 ** 0.5)
    return torch.view_as_complex(n).to(device)


def _mol_step(model: MolCNN, mol_config: MolConfig, device: torch.device) -> MolStep:
    return MolStep(model, replace(mol_config, learn_lam=False)).to(device).eval()
