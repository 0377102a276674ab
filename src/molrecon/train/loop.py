"""The training run (``molrecon train``, :func:`train`): setup, the steps, validation, saves.

:func:`train` joins the process group under ``torchrun``, then :func:`_train` runs the stages
in their fixed order — the outputs and a resume state are checked before any data is read
(:func:`~molrecon.train.state._check_outputs`), the data are loaded and split
(:func:`_load_data`), the model and optimiser are built from the seed, ``--init`` or the
resume state (:func:`_setup`), the log and the validation problems are prepared
(:func:`_prepare`), the start is logged and a new run validates its untrained model
(:func:`_start`), and :func:`_run_steps` steps until ``max_steps`` or the time budget. A step
is :func:`_gradients` (this process's samples, then the all-reduce), then :func:`_skip` or
:func:`_update` (the optimiser's step, :func:`_validate` on its cadence, :func:`_save_all` on
the checkpoint cadence). These functions keep every random draw and every computation of a
step in one order, so a run is reproducible bit for bit and a resumed run continues exactly;
:mod:`molrecon.train` describes the whole.
"""

from __future__ import annotations

import copy
import datetime as _dt
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deq.fixed_point import FixedPointConfig
from ..device import resolve_device
from ..errors import ConfigError, InputDataError, MolreconError
from ..models.checkpoint import save_checkpoint
from ..problem import Problem
from .config import Change, RecordFn, TrainConfig, TrainResult, WarnFn, _plain
from .data import FolderDataset, check_masks, list_raw_files, load_folder, split_dataset
from .distributed import (
    Dist,
    _agree,
    _broadcast_parameters,
    _finish_together,
    _init_distributed,
    _leave,
    _process_device,
    _reduce_gradients,
)
from .patches import degraded_bank, sample_scales
from .probes import PenaltyProbes
from .state import (
    _check_outputs,
    _check_state,
    _remove_stale_temporaries,
    _restore_state,
    _RunLog,
    _save_state,
    _state_record,
    _write,
    output_paths,
)
from .step import (
    _build,
    _denoise_step,
    _kinds,
    _local_step,
    _model_dims,
    _probe_penalty,
    _StepOutcome,
    load_init,
    noise_rule,
)
from .validate import _certificate, _load_validation, _val_problems, evaluate


# ------------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """A run in progress: what setup built (:func:`_setup`, :func:`_prepare`) and what the
    loop moves on (the step count ``s``, the best validation, the skip counts, timings)."""

    config: TrainConfig
    device: Any
    dist_info: Dist
    t_start: float
    on_record: RecordFn
    warn: WarnFn
    paths: dict[str, Path]
    data: FolderDataset
    train_set: FolderDataset
    val_set: FolderDataset
    changes: list[Change]
    scales: list[float]
    step: Any = None                    # the MOL step: the prior H and the learnable λ
    cnn: Any = None                     # H
    ema: Any = None                     # --ema: the moving average of ``step`` (a copy)
    ema_updates: int = 0                # its updates so far (the warm-up's n)
    optim: Any = None
    all_params: list[Any] = field(default_factory=list)
    bank: list[Any] = field(default_factory=list)
    log: _RunLog | None = None
    val_problems: list[Problem] = field(default_factory=list)
    lam_rule: Any = None                # --lam-from-noise: the --init checkpoint's noise rule
    fwd: FixedPointConfig | None = None
    bwd: FixedPointConfig | None = None
    start_step: int = 0
    best: float = -math.inf
    skips: int = 0
    elapsed_before: float = 0.0         # wall-clock seconds of the earlier invocations
    s: int = 0                          # steps done
    saved_at: int = -1
    best_step: int = -1          # the step whose validation set ``best`` (its save may be pending)
    updating: bool = False              # inside the optimiser's step (not to be saved)
    pending: dict[str, Any] | None = None   # a finished step whose log record is not yet written
    order_epoch: int = -1
    order: np.ndarray = field(default_factory=lambda: np.arange(0))
    last_record: dict[str, Any] = field(default_factory=dict)
    best_sense: float | None = None
    val_fixed_points: list[Any] = field(default_factory=list)
    # (step, certificate) of the last validation: the local estimates at its fixed points,
    # logged with it and reused by a save of the same step
    val_certificate: tuple[int, dict[str, Any]] | None = None
    probes: PenaltyProbes | None = None   # the "power" penalty's probe problems
    saved_probes: Any = None              # their vectors in the resume state
    bound_probes: PenaltyProbes | None = None   # --project-bound's whole-scan probe problems
    saved_bound_probes: Any = None              # their Ritz vectors in the resume state
    skipped_here: int = 0
    stopped: str = "max_steps"
    # Seconds of the recent steps, of the last validation and of the last save: the time
    # budget starts no step that these say cannot end (and be saved) within it.
    recent_steps: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    timing: dict[str, float] = field(default_factory=lambda: {"val": 0.0, "save": 0.0})

    @property
    def kind(self) -> str:
        return self.data.kind

    @property
    def n_train(self) -> int:
        return len(self.train_set)

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.dist_info.world

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_train // self.global_batch)

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.t_start, 1)

    @property
    def model(self) -> Any:
        """The MOL step that is validated and saved: the moving average with --ema, else
        the trained one."""
        return self.step if self.ema is None else self.ema

    def emit(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)
        self.on_record(record)


def train(config: TrainConfig, *, on_record: RecordFn | None = None,
          warn: WarnFn | None = None) -> TrainResult:
    """Run (or resume) a training job; see :mod:`molrecon.train`.

    ``on_record`` receives every log record (rank 0 only), ``warn`` one-line
    warnings (skipped files and steps). Raises :class:`MolreconError`
    subclasses for everything a user can fix.
    """
    t_start = time.perf_counter()
    device = resolve_device(config.device)
    dist_info, created = _init_distributed(device)
    try:
        result = _train(config, device, dist_info, t_start,
                        on_record if (on_record and dist_info.main) else (lambda rec: None),
                        warn if (warn and dist_info.main) else (lambda msg: None))
        _finish_together(dist_info)
        return result
    finally:
        _leave(created)


def _train(config: TrainConfig, device: Any, dist_info: Dist, t_start: float,
           on_record: RecordFn, warn: WarnFn) -> TrainResult:
    device = _process_device(device, dist_info)
    paths = output_paths(config.out)
    if not paths["best"].name.endswith(".pt"):
        raise ConfigError(f"{config.out}: --out must end in .pt")
    state, changes = _check_outputs(config, paths, dist_info, warn)
    data, train_set, val_set = _load_data(config, warn)
    scales = _denoise_scales(config, data.kind, train_set)
    if state is not None:
        config = _check_state(state, config, data.kind, paths["state"])
    run = _Run(config=config, device=device, dist_info=dist_info, t_start=t_start,
               on_record=on_record, warn=warn, paths=paths, data=data, train_set=train_set,
               val_set=val_set, changes=changes, scales=scales)
    _setup(run, state)
    _prepare(run)
    _start(run)
    _run_steps(run)
    return TrainResult(out=paths["best"], steps=run.s,
                       best_val_psnr=None if run.best == -math.inf else run.best,
                       val_sense_psnr=run.best_sense, log=paths["log"],
                       skipped_files=data.skipped, stopped=run.stopped,
                       skipped_steps=run.skipped_here, train_files=list(train_set.files),
                       val_files=list(val_set.files), main_process=dist_info.main)


# ------------------------------------------------------------------------------- setup
def _load_data(config: TrainConfig, warn: WarnFn
               ) -> tuple[FolderDataset, FolderDataset, FolderDataset]:
    """The usable scans of ``config.data`` and the (training, validation) split of them, or
    the whole of them and the scans of ``config.val_data``."""
    files = list_raw_files(config.data)
    if not files:
        raise InputDataError("no raw files (*.h5, *.hdf5, *.mrd) in this folder", path=config.data)
    data = load_folder(files, config.kind, warn=warn)
    if not data.samples:
        what = f"{config.kind} " if config.kind else ""
        raise InputDataError(f"no usable fully sampled {what}scans: all {len(files)} raw file(s) "
                             "were skipped (see the warnings above)", path=config.data)
    if data.skipped:
        warn(f"using {len(data.files)} of {len(files)} raw files ({len(data.skipped)} skipped)")
    kind = data.kind
    check_masks(data, config.mask)
    if config.val_data is None:
        train_set, val_set = split_dataset(data, config.val_fraction, config.seed)
    else:
        train_set, val_set = data, _load_validation(config.val_data, kind, config.data, warn)
    return data, train_set, val_set


def _denoise_scales(config: TrainConfig, kind: str, train_set: FolderDataset) -> list[float]:
    """Stage 0: reconstruction's intensity scale of every training sample (else none)."""
    if config.stage != "denoise":
        return []
    return sample_scales(train_set.samples, kind, config.mask, config.seed)


def _setup(run: _Run, state: dict[str, Any] | None) -> None:
    """The model and its optimiser: seeded initial weights (or ``--init``'s), then the resume
    state's, the same on every process."""
    config = run.config
    torch.manual_seed(config.seed)
    loaded = load_init(config)
    run.step, run.cnn = _build(config, run.kind, run.device, loaded=loaded)
    run.lam_rule = noise_rule(config, loaded)
    params = [p for n, p in run.step.named_parameters() if n != "log_lam"]
    run.optim = torch.optim.Adam([{"params": params, "lr": config.lr},
                                  {"params": [run.step.log_lam], "lr": config.lam_lr}])
    run.all_params = [p for p in run.step.parameters() if p.requires_grad]
    if state is not None:
        run.start_step, run.best, run.skips, run.elapsed_before = _restore_state(
            state, run.step, run.optim, config, run.changes, run.paths["state"])
        run.saved_probes = state.get("probes")
        run.saved_bound_probes = state.get("bound_probes")
    _broadcast_parameters(run.step, run.dist_info)
    if config.ema > 0:
        run.ema = _ema_copy(run.step)
        saved = None if state is None else state.get("ema")
        if saved is not None:          # else the average starts at the resumed weights
            run.ema.load_state_dict(saved["step"])
            run.ema_updates = int(saved["updates"])


def _ema_copy(step: Any) -> Any:
    """A frozen copy of the MOL step that holds the moving average."""
    ema = copy.deepcopy(step)
    for p in ema.parameters():
        p.requires_grad_(False)
    if hasattr(ema.prior, "clear_spectral_cache"):
        ema.prior.clear_spectral_cache()
    return ema


def _ema_update(run: _Run) -> None:
    """avg ← d·avg + (1 − d)·w after a step, d = min(--ema, (1 + n)/(10 + n)) at the n-th
    update (the warm-up lets an early average forget its start)."""
    d = min(run.config.ema, (1 + run.ema_updates) / (10 + run.ema_updates))
    with torch.no_grad():
        for avg, w in zip(run.ema.parameters(), run.step.parameters(), strict=True):
            avg.lerp_(w.detach(), 1.0 - d)
    run.ema_updates += 1
    if hasattr(run.ema.prior, "clear_spectral_cache"):
        run.ema.prior.clear_spectral_cache()


def _prepare(run: _Run) -> None:
    """Stage 0's degraded images, the log (rank 0), the validation problems (rank 0) and the
    fixed-point solvers' settings."""
    config = run.config
    if config.stage == "denoise" and config.patch.sense_fraction > 0:
        run.bank = degraded_bank(run.train_set.samples, run.kind, config.mask,
                                 float(run.step.lam.detach()), config.init_iters,
                                 config.patch.sense_masks, config.seed)
    if run.dist_info.main:
        _remove_stale_temporaries(run.paths)
    run.log = _RunLog(run.paths["log"], resume_at=run.start_step if config.resume else None) \
        if run.dist_info.main else None
    run.val_problems = _val_problems(run.val_set, config, run.device, run.lam_rule) \
        if run.dist_info.main else []
    run.fwd = FixedPointConfig(tol=config.fwd_tol, max_iter=config.fwd_max_iter, warn=False)
    run.bwd = FixedPointConfig(tol=config.bwd_tol, max_iter=config.bwd_max_iter, warn=False)
    if (config.stage == "deq" and config.constraint == "lr" and config.penalty_weight > 0
            and config.penalty_estimator == "power"):
        run.probes = PenaltyProbes.build(config, run.train_set, run.device)
        run.probes.restore(run.saved_probes)
    if config.project_bound is not None:
        run.bound_probes = PenaltyProbes.build(config, run.train_set, run.device, whole=True)
        run.bound_probes.restore(run.saved_bound_probes)


def _start(run: _Run) -> None:
    """The ``start`` record, and a new run's validation of its untrained model (step 0)."""
    config = run.config
    run.emit({"event": "start", "step": run.start_step, "kind": run.kind,
              "model_dims": _model_dims(run.kind), "constraint": config.constraint,
              "resumed": bool(config.resume), "train_files": len(run.train_set.files),
              "val_files": len(run.val_set.files), "train_samples": run.n_train,
              "val_samples": len(run.val_set), "skipped_files": len(run.data.skipped),
              "device": str(run.device), "world_size": run.dist_info.world,
              "max_steps": config.max_steps, "stage": config.stage,
              "threads": torch.get_num_threads(), "elapsed_s": run.elapsed(),
              **({"resumed_elapsed_s": round(run.elapsed_before, 1),
                  "best_val_psnr": None if run.best == -math.inf else run.best,
                  "changed": [str(c) for c in run.changes]} if config.resume else {})})
    if run.val_problems and not config.resume:
        t0 = time.perf_counter()
        vm = evaluate(run.model, run.val_problems, config,
                      run.val_fixed_points if config.init_weights else None)
        if config.init_weights:
            vm.update(_val_lipschitz(run, 0))
        run.timing["val"] = time.perf_counter() - t0
        run.emit({"event": "validation", "step": 0, **vm})
        at_bound = (config.best_max_lipschitz is None
                    or vm.get("val_lipschitz", math.inf) <= config.best_max_lipschitz)
        if config.init_weights and vm.get("val_psnr") is not None and at_bound:
            # Started from trained weights: they are the model to beat, and the best model
            # until a step beats them (a fine-tuning run never ends worse than it began).
            run.best = float(vm["val_psnr"])
            _timed_save(run, 0, {"step": 0, **vm}, True)


# ------------------------------------------------------------------------------- the loop
def _run_steps(run: _Run) -> None:
    """Steps up to ``max_steps`` (or the time budget), then a save of the last step; Ctrl-C
    saves the state of the last completed step before stopping."""
    config = run.config
    run.s = run.start_step
    run.saved_at = run.start_step if config.resume else -1
    run.updating = False
    run.pending = None
    run.order_epoch, run.order = -1, np.arange(run.n_train)
    try:
        run.step.train()
        while run.s < config.max_steps:
            if _out_of_time(run):
                run.stopped = "time_budget"
                break
            epoch, within = divmod(run.s, run.steps_per_epoch)
            if epoch != run.order_epoch:
                run.order = np.random.default_rng([config.seed, 1, epoch]).permutation(run.n_train)
                run.order_epoch = epoch
            t_step = time.perf_counter()
            reason, outcome, stats = _gradients(run, within)
            if reason is not None:
                _skip(run, reason, t_step)
                continue
            _update(run, epoch, outcome, stats, t_step)
        if run.s != run.saved_at and (run.s > run.start_step or not run.paths["best"].exists()):
            _save_all(run, run.s, run.last_record, run.best_step == run.s)
            run.saved_at = run.s
    except KeyboardInterrupt:
        if run.dist_info.main and not run.updating and run.s != run.saved_at:
            # An interrupt during the save of a new best model must still write it: the
            # state records that best PSNR, and a resumed run only saves models beating it.
            if run.pending is not None:
                run.emit(run.pending)
                run.last_record, run.pending = run.pending, None
            _save_all(run, run.s, run.last_record, run.best_step == run.s)
            run.warn(f"interrupted: state saved after step {run.s}; continue with --resume")
        raise
    finally:
        if run.log is not None:
            run.log.close()


def next_step_fits(used_s: float, budget_s: float, recent_steps_s: list[float],
                   extra_s: float = 0.0) -> bool:
    """Whether one more step can end within the time budget: ``used_s`` seconds spent, plus
    the slowest of the recent steps (none yet: nothing), plus ``extra_s`` (the validation
    the step would run and the save that follows) must not exceed ``budget_s``."""
    step_s = max(recent_steps_s) if recent_steps_s else 0.0
    return used_s + step_s + extra_s <= budget_s


def _out_of_time(run: _Run) -> bool:
    """Whether the time budget (read by rank 0, agreed by all) leaves no room for step s + 1."""
    config, s = run.config, run.s
    validates = bool(run.val_problems) and ((s + 1) % config.val_every == 0
                                            or s + 1 == config.max_steps)
    over = (run.dist_info.main and config.time_budget_s is not None
            and not next_step_fits(time.perf_counter() - run.t_start, config.time_budget_s,
                                   list(run.recent_steps),
                                   (run.timing["val"] if validates else 0.0)
                                   + run.timing["save"]))
    return _agree(over, run.dist_info, run.device)


def _gradients(run: _Run, within: int
               ) -> tuple[str | None, _StepOutcome, dict[str, float | None]]:
    """This process's samples of step ``s`` forward and backward, and the gradients averaged
    over the processes. Returns why the step must be skipped (None: it may step), this
    process's outcome and the global batch's statistics."""
    config, dist_info = run.config, run.dist_info
    run.optim.zero_grad(set_to_none=True)
    if config.stage == "denoise":
        outcome = _denoise_step(run.cnn, config, run.train_set, run.scales, run.bank, run.order,
                                run.s, within, run.global_batch, dist_info, run.device)
    else:
        outcome = _local_step(run.step, run.cnn, config, run.train_set, run.order, run.s,
                              within, run.global_batch, dist_info, run.device, run.fwd, run.bwd,
                              run.lam_rule)
        if outcome.bad is None:
            # Every process adds the same penalty gradient (its probes are the same), so
            # the average over processes is that gradient.
            _probe_penalty(run.step, run.cnn, config, run.probes, run.s, outcome, run.fwd)
    bad = outcome.bad
    if bad is None and dist_info.world == 1:
        grads = [p.grad for p in run.all_params if p.grad is not None]
        if any(not bool(torch.isfinite(g).all()) for g in grads):
            bad = "non-finite gradient"
    outcome.bad = bad
    any_bad, stats = _reduce_gradients(run.all_params, outcome, dist_info)
    loss_mean = stats["loss"]
    if any_bad or loss_mean is None or not math.isfinite(loss_mean) or not all(
            bool(torch.isfinite(p.grad).all()) for p in run.all_params if p.grad is not None):
        reason = bad or ("non-finite gradient" if dist_info.world == 1
                         else "a sample failed on another process")
        return reason, outcome, stats
    return None, outcome, stats


def _skip(run: _Run, reason: str, t_step: float) -> None:
    """A failed step: no optimiser step, every learning rate halved, the skip logged; after
    ``max_skips`` consecutive ones the state of the last good step is saved and the run stops."""
    run.skips += 1
    run.skipped_here += 1
    for group in run.optim.param_groups:
        group["lr"] *= 0.5
    run.s += 1
    run.recent_steps.append(time.perf_counter() - t_step)
    lr = run.optim.param_groups[0]["lr"]
    run.warn(f"step {run.s}: skipped: {reason}; learning rates halved (H: {lr:.3g})")
    run.emit({"step": run.s, "skipped": reason, "lr": lr, "consecutive_skips": run.skips})
    if run.skips >= run.config.max_skips:
        _save_all(run, run.s, run.last_record, False)
        raise MolreconError(
            f"training stopped: {run.skips} consecutive steps failed (last: {reason}); "
            f"the state of the last good step is saved in {run.paths['state']}. Lower "
            "--lr, raise --fwd-max-iter, or check the data")


def _update(run: _Run, epoch: int, outcome: _StepOutcome, stats: dict[str, float | None],
            t_step: float) -> None:
    """A good step: clip and apply the gradients, log the step (with a validation on its
    cadence and at the last step), save on the checkpoint cadence, at a new best and at the
    last step."""
    config, cnn = run.config, run.cnn
    run.skips = 0
    torch.nn.utils.clip_grad_norm_(run.all_params, config.grad_clip)
    run.updating = True
    run.optim.step()
    projection = _project(run, run.s + 1)
    if run.ema is not None:
        _ema_update(run)
    run.s += 1
    rec: dict[str, Any] = {
        "step": run.s, "epoch": epoch, "loss": stats["loss"],
        "fwd_iterations": stats["fwd_iterations"],
        "bwd_iterations": stats["bwd_iterations"],
        "lambda": float(run.step.lam.detach()), "lr": run.optim.param_groups[0]["lr"],
        "step_s": round(time.perf_counter() - t_step, 3), "elapsed_s": run.elapsed(),
        **projection}
    # Until the record is in the log, an interrupt writes it before the state (a resumed
    # run starts after this step, so its log line must not be lost).
    run.pending = rec
    run.updating = False
    if hasattr(cnn, "clear_spectral_cache"):
        cnn.clear_spectral_cache()
    run.recent_steps.append(time.perf_counter() - t_step)
    if outcome.lipschitz:
        rec["lipschitz_local"] = float(np.max(outcome.lipschitz))
    if outcome.norms:
        rec["norm_local"] = float(np.max(outcome.norms))
    is_best = _validate(run, rec)
    run.last_record = rec
    run.emit(rec)
    run.pending = None
    s = run.s
    if s % config.checkpoint_every == 0 or is_best or s == config.max_steps:
        _timed_save(run, s, rec, is_best)
        run.saved_at = s


#: --project-bound's Lanczos steps at a probe's first visit and, from the Ritz vector it
#: left, at the next ones. 20 from noise read the top singular value at a 2D fixed point to
#: three or four digits (``benchmarks/bench_lipschitz_estimates.py``); from the last
#: visit's vector 10 cost half as much and read the largest of six probes within 5e-5 of 40
#: from noise, single probes up to 0.6 % low (``benchmarks/bench_projection.py``).
PROJECT_LANCZOS = (20, 10)


def _project(run: _Run, s: int) -> dict[str, Any]:
    """``--project-bound T`` on step ``s`` (every ``project_every``-th): the largest Jacobian
    norm of H at the probes' fixed points, measured after the optimiser's step, and H's
    output scaled by T over it where it exceeds T. Returns what the log records (nothing on
    other steps). Every process measures the same probes with the same weights, so all
    apply the same scale. The measurement belongs to the step's update: an interrupt
    during it saves nothing of this step (the resume repeats it), as the state of a step
    measured but not yet scaled would not be the uninterrupted run's."""
    config = run.config
    if run.bound_probes is None or s % config.project_every != 0:
        return {}
    with torch.no_grad():
        run.step.eval()
        try:
            norms = run.bound_probes.jacobian_norms(
                run.step, run.cnn, cold_steps=PROJECT_LANCZOS[0], warm_steps=PROJECT_LANCZOS[1],
                init_iters=config.init_iters, fwd=run.fwd, measure=config.bound_measure)
        finally:
            run.step.train()
    top = max(norms)
    key = "probe_monotone" if config.bound_measure == "monotone" else "probe_lipschitz"
    if not math.isfinite(top):
        run.warn(f"step {s}: the {config.bound_measure} estimate at the probes is {top}: "
                 "not projected")
        return {key: None}
    factor = 1.0
    if top > config.project_bound:
        # H -> cH scales J, and with it both its norm and the top of its symmetric part, by c
        factor = config.project_bound / top
        run.cnn.scale_output(factor)
    return {key: top, f"{key}_each": [round(v, 5) for v in norms], "output_scale": factor}


def _validate(run: _Run, rec: dict[str, Any]) -> bool:
    """On a validation step, evaluate (keeping the fixed points for the certificate) into
    ``rec``; whether the model is the best so far."""
    config, s = run.config, run.s
    if not (run.val_problems and (s % config.val_every == 0 or s == config.max_steps)):
        return False
    run.val_fixed_points.clear()
    t0 = time.perf_counter()
    vm = evaluate(run.model, run.val_problems, config, run.val_fixed_points)
    vm.update(_val_lipschitz(run, s))
    run.timing["val"] = time.perf_counter() - t0
    rec.update(vm)
    run.best_sense = vm.get("val_sense_psnr")
    limit = config.best_max_lipschitz
    held = "val_monotone" if config.bound_measure == "monotone" else "val_lipschitz"
    if limit is not None and not vm.get(held, math.inf) <= limit:
        return False                       # not at the bound: never the best model
    if vm["val_psnr"] is not None and vm["val_psnr"] > run.best:
        run.best = float(vm["val_psnr"])
        run.best_step = s
        return True
    return False


def _val_lipschitz(run: _Run, s: int) -> dict[str, Any]:
    """The certificate's local estimates at this validation's fixed points (the checkpoint
    of step ``s`` reuses it): ``val_lipschitz`` is their largest, the number that says how
    far the model is from the bound where it reconstructs, logged beside its PSNR, and
    ``val_monotone`` the largest top of the spectrum of ½(J + Jᵀ) there (F = I − H is
    monotone where it is below 1)."""
    cert = _certificate(run.model.prior, run.val_fixed_points, run.config.seed,
                        data=[Path(f).name for f in run.val_set.files],
                        points=run.config.val_points)
    run.val_certificate = (s, cert)
    names = {"local_max": "val_lipschitz", "local_monotone_max": "val_monotone"}
    return {log: cert[key] for key, log in names.items() if cert.get(key) is not None}


# ------------------------------------------------------------------------------- saving
def _timed_save(run: _Run, steps_done: int, metrics: dict[str, Any], is_best: bool) -> None:
    t0 = time.perf_counter()
    _save_all(run, steps_done, metrics, is_best)
    run.timing["save"] = time.perf_counter() - t0


def _save_all(run: _Run, steps_done: int, metrics: dict[str, Any], is_best: bool) -> None:
    """Rank 0 writes the latest model, the best one (when ``is_best``, or when there is no
    validation, or no best file yet) and the resume state."""
    if not run.dist_info.main:
        return
    config, cnn, kind, paths = run.config, run.model.prior, run.kind, run.paths
    meta = _metadata(config, kind, run.train_set, run.val_set, steps_done, metrics,
                     run.dist_info)
    if run.val_certificate is not None and run.val_certificate[0] == steps_done:
        cert = run.val_certificate[1]           # measured at this step's validation
    else:
        # Between validations a 3D or 2D+time checkpoint keeps the global bound only:
        # whole volumes at every save would cost minutes on a CPU.
        cert = _certificate(cnn, run.val_fixed_points, config.seed,
                            data=[Path(f).name for f in run.val_set.files],
                            local=cnn.config.dims != 3, points=config.val_points)
    model_cfg = run.model.to_config()
    _write(paths["last"], "latest model", steps_done,
           lambda: save_checkpoint(paths["last"], cnn, model_cfg, metadata=meta,
                                   certificate=cert, kinds=_kinds(kind), force=True,
                                   lam_noise=run.lam_rule))
    if is_best or not run.val_problems or not paths["best"].exists():
        _write(paths["best"], "best model", steps_done,
               lambda: save_checkpoint(paths["best"], cnn, model_cfg, metadata=meta,
                                       certificate=cert, kinds=_kinds(kind), force=True,
                                       lam_noise=run.lam_rule))
    state = _state_record(kind, config, steps_done, run.best, run.skips, run.elapsed(),
                          run.step, run.optim,
                          probes=None if run.probes is None else run.probes.state(),
                          bound_probes=None if run.bound_probes is None
                          else run.bound_probes.state(),
                          ema=None if run.ema is None else {"step": run.ema.state_dict(),
                                                            "updates": run.ema_updates})
    _write(paths["state"], "resume state", steps_done,
           lambda: _save_state(paths["state"], state))


def _metadata(config: TrainConfig, kind: str, train_set: FolderDataset, val_set: FolderDataset,
              steps: int, metrics: dict[str, Any], dist_info: Dist) -> dict[str, Any]:
    return {
        "trained_with": "molrecon train",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "steps": steps,
        "train_files": [Path(f).name for f in train_set.files],
        "val_files": [Path(f).name for f in val_set.files],
        "train_samples": len(train_set),
        "val_samples": len(val_set),
        "world_size": dist_info.world,
        "mask": _plain(asdict(config.mask)),
        "config": _plain(asdict(config)),
        "last_metrics": _plain(metrics),
    }
