"""Validation of a training run: the held-out scans, the fixed problems made of them, and
:func:`evaluate` — full MOL reconstructions of those problems against CG-SENSE.

The validation problems are drawn once per run with masks seeded per item (the highest of
several accelerations), so every evaluation of a run sees the same problems; the fixed points
of the last evaluation give the local Lipschitz estimates of the checkpoint's certificate.
Only rank 0 of a distributed run validates.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deq.fixed_point import FixedPointConfig, solve_fixed_point
from ..deq.mol import regularised_sense
from ..errors import ConfigError, InputDataError
from ..metrics import compare
from ..physics.sense import cg_sense
from ..problem import SENSE_ITERS, SENSE_LAMBDA, Problem
from .config import TrainConfig, WarnFn
from .data import FolderDataset, list_raw_files, load_folder, make_problem
from .step import problem_lam


def _load_validation(folder: str, kind: str, train_folder: str,
                     warn: WarnFn | None) -> FolderDataset:
    """The scans of a separate validation folder; their kind must be the training data's."""
    if Path(folder).resolve() == Path(train_folder).resolve():
        raise ConfigError(f"--val-data {folder} is the training folder: validation scans must be "
                          "held out")
    files = list_raw_files(folder)
    if not files:
        raise InputDataError("no raw files (*.h5, *.hdf5, *.mrd) in the validation folder",
                             path=folder)
    val = load_folder(files, kind, warn=warn)
    if not val.samples:
        raise InputDataError(f"no usable fully sampled {kind} scans among {len(files)} validation "
                             "file(s)", path=folder)
    return val


def spread_indices(n: int, k: int) -> list[int]:
    """min(k, n) indices spread evenly over range(n), the first and the last included (the
    first alone for one): which validation items are used, and which of their fixed points
    the training certificate measures."""
    m = min(k, n)
    return [int(i) for i in np.linspace(0, n - 1, m).round()] if m > 0 else []


def spread_samples(folder: str | Path, count: int, *,
                   warn: Any = None) -> tuple[FolderDataset, list[int]]:
    """The scans of a validation ``folder`` and ``count`` of their items spread over it
    (:func:`spread_indices`), for the scripts that tune or measure on validation data;
    an error naming the folder when it is missing or holds no usable scan."""
    try:
        val = load_folder(list_raw_files(folder), None, warn=warn)
    except InputDataError as exc:
        if exc.path is not None:
            raise
        raise InputDataError(exc.message, path=folder) from exc
    if not val.samples:
        raise ConfigError(f"{folder}: no usable validation scans")
    return val, spread_indices(len(val), count)


def _val_problems(val: FolderDataset, config: TrainConfig, device: Any,
                  lam_rule: Any = None) -> list[Problem]:
    """Fixed validation problems (masks and noise seeded per item, the same for every
    evaluation).

    With several accelerations the highest is used. ``--val-noise`` levels are cycled over
    the problems; ``--val-maps`` says whose coil maps they have; ``lam_rule``
    (``--lam-from-noise``) sets each one's λ factor.
    """
    out = []
    idx = spread_indices(len(val), config.val_samples)
    spec = config.mask
    if spec.accelerations:
        spec = replace(spec, acceleration=max(spec.accelerations), accelerations=())
    for j, i in enumerate(idx):
        rng = np.random.default_rng([config.seed, 7_777_777, j])
        noise = config.val_noise[j % len(config.val_noise)] if config.val_noise else 0.0
        out.append(make_problem(val.samples[i], val.kind, spec, rng, noise, device,
                                maps_from=config.val_maps, lam_rule=lam_rule))
    return out


def validation_problems(folder: str | Path, *, mask: str, accelerations: tuple[float, ...],
                        acs: int, samples: int, seed: int
                        ) -> tuple[list[Problem], list[str], TrainConfig]:
    """The validation problems ``molrecon train`` would build from ``folder`` with these mask
    options, sample count and seed (for benchmarks that measure a checkpoint where its
    training validated), their names (``file #index``) and the config that evaluates them."""
    from .data import MaskSpec

    config = TrainConfig(data=str(folder), out="unused.pt", val_samples=samples,
                         mask=MaskSpec(family=mask, accelerations=accelerations, acs=acs),
                         seed=seed, device="cpu")
    val = load_folder(list_raw_files(folder), None)
    problems = _val_problems(val, config, torch.device("cpu"))
    names = [f"{Path(val.samples[i].source).name} #{val.samples[i].index}"
             for i in spread_indices(len(val), config.val_samples)]   # _val_problems' items
    return problems, names, config


def evaluate(step: Any, problems: list[Problem], config: TrainConfig,
             fixed_points: list[Any] | None = None) -> dict[str, float | None]:
    """Mean PSNR/SSIM of MOL and of CG-SENSE on fixed validation problems (magnitudes).

    CG-SENSE uses the settings of ``molrecon reconstruct --method sense``
    (:data:`~molrecon.problem.SENSE_LAMBDA`, :data:`~molrecon.problem.SENSE_ITERS`).
    MOL solves the fixed point to ``fwd_tol`` (at most max(fwd_max_iter, 100)
    iterations). A problem whose MOL image is not finite counts in
    ``val_failed`` and makes ``val_psnr``/``val_ssim`` None. The fixed points are
    appended to ``fixed_points`` when a list is given.
    """
    if not problems:
        return {}
    psnr, ssim, s_psnr, s_ssim, iters = [], [], [], [], []
    failed = 0
    was_training = step.training
    step.eval()
    fp = FixedPointConfig(tol=config.fwd_tol, max_iter=max(config.fwd_max_iter, 100), warn=False)
    try:
        with torch.no_grad():
            for p in problems:
                x0 = regularised_sense(p.op.normal, p.aty, lam=problem_lam(step, p),
                                       iters=config.init_iters)
                res = solve_fixed_point(step.bind(normal=p.op.normal, aty=p.aty,
                                                  support=p.op.support(),
                                                  lam_scale=p.lam_scale), x0, config=fp)
                sense = cg_sense(p.op, p.kspace, lam=SENSE_LAMBDA, max_iter=SENSE_ITERS).x
                tgt = p.target.cpu().numpy()
                ms = compare(sense.cpu().numpy(), tgt)
                s_psnr.append(ms.psnr)
                s_ssim.append(ms.ssim)
                iters.append(res.iterations)
                if not bool(torch.isfinite(res.x).all()):
                    failed += 1
                    continue
                m = compare(res.x.cpu().numpy(), tgt)
                psnr.append(m.psnr)
                ssim.append(m.ssim)
                if fixed_points is not None:
                    fixed_points.append(res.x)
    finally:
        if was_training:
            step.train()
    ok = failed == 0
    return {"val_psnr": float(np.mean(psnr)) if ok else None,
            "val_ssim": float(np.mean(ssim)) if ok else None,
            "val_sense_psnr": float(np.mean(s_psnr)), "val_sense_ssim": float(np.mean(s_ssim)),
            "val_iterations": float(np.mean(iters)), "val_failed": failed}




def _certificate(cnn: Any, fixed_points: list[Any], seed: int,
                 data: list[str] | None = None, *, local: bool = True,
                 points: int = TrainConfig.val_points) -> dict[str, Any]:
    """The checkpoint's certificate: the global bound and local estimates at validation fixed
    points, computed by the same code as ``molrecon check-lipschitz`` (10 power iterations
    and 20 Lanczos steps, which read the top singular value at a fixed point to three or
    four digits: ``benchmarks/bench_lipschitz_estimates.py``).

    Up to ``points`` (``train --val-points``, default 4) fixed points spread over the validation problems (so
    that every part of a mixed folder, e.g. brain and torso series, is read), each whole:
    the norm at a crop of a volume is the norm of another operator: central 64² crops read
    0.98–0.99 where the whole 2D+time series read 1.09–1.24
    (``benchmarks/bench_val_lipschitz.py``, BENCHMARKS.md). ``local`` False
    (a 3D or 2D+time checkpoint saved between validations, where whole volumes would cost
    minutes per save on a CPU) keeps the global bound only; the validation records carry
    the local estimates."""
    from ..models.certificate import certificate_for

    if not fixed_points:
        return {}
    picks = spread_indices(len(fixed_points), points) if local else []
    at = [fixed_points[i].detach() for i in picks]
    # Ten power iterations alone read the top of the Jacobian's crowded spectrum low by up to
    # a few per cent; the 20 Lanczos steps are what read it.
    return certificate_for(cnn, at, data=data or [], power_iters=10,
                           ratio_steps=0, lanczos_steps=20, seed=seed)
