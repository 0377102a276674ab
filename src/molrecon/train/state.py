"""The files of a training run beside ``--out MODEL.pt``: the resume state and the run log.

The resume state (``MODEL.state.pt``) holds what a run needs to continue exactly where it was
saved: the weights and λ, the optimiser (moments, step counts and the current, possibly
halved, learning rates), the step count, the consecutive-skip count, the best validation PSNR
and the wall-clock seconds trained so far (and, with ``--penalty-estimator power``, the probe
problems' power-iteration vectors; with ``--ema``, the moving average of the weights and its
update count). There is no random-number state to keep: every
draw of step ``s`` comes from a generator seeded with the run's seed and ``s`` (the module
:mod:`molrecon.train` says how), so the step count is the random state.

The log (``MODEL.log.jsonl``) holds one JSON record per line; a resume rewrites it without
the records of the steps the state does not include. Every file is written to a temporary
file and renamed (``molrecon.atomic``): a kill mid-write leaves the previous file intact, and a
resume removes the temporary files a kill left behind.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path, check_output, write_text_atomic
from ..errors import CheckpointError, OutputError
from .config import Change, TrainConfig, WarnFn, _check_resume_options, _plain
from .distributed import Dist

STATE_VERSION = 1


def output_paths(out: str | Path) -> dict[str, Path]:
    """``best`` (MODEL.pt), ``last``, ``state`` and ``log`` paths beside ``out``."""
    p = Path(out)
    stem = p.name.removesuffix(".pt")
    return {"best": p, "last": p.with_name(stem + ".last.pt"),
            "state": p.with_name(stem + ".state.pt"), "log": p.with_name(stem + ".log.jsonl")}


def _check_outputs(config: TrainConfig, paths: dict[str, Path], dist_info: Dist, warn: WarnFn
                   ) -> tuple[dict[str, Any] | None, list[Change]]:
    """Before any data is read: a new run must be free to write its files (``force``); a
    resumed run needs its state, whose options must be this run's (a change is refused at
    once, unless ``override``). Returns the state (None for a new run) and the changes
    ``override`` let through."""
    state: dict[str, Any] | None = None
    changes: list[Change] = []
    if config.resume:
        if not paths["state"].is_file():
            raise OutputError(f"nothing to resume: {paths['state']} does not exist (start the "
                              "run without --resume)", path=config.out)
        for key in ("best", "last", "log"):
            check_output(paths[key], force=True)
        # Before any data is read: a resume with other options is refused at once.
        state = _load_state(paths["state"])
        changes = _check_resume_options(state, config, paths["state"])
        if changes:
            warn("resuming with changed options (--override): " + "; ".join(map(str, changes)))
    elif dist_info.main:
        for key in ("best", "last", "state", "log"):
            check_output(paths[key], force=config.force)
    return state, changes


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"unreadable resume state: {exc}", path=path) from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError("not a molrecon resume state (or a different version)", path=path)
    for key in ("kind", "config", "steps", "best", "step", "optim"):
        if key not in state:
            raise CheckpointError(f"resume state lacks '{key}'", path=path)
    return state


def _check_state(state: dict[str, Any], config: TrainConfig, kind: str, path: Path
                 ) -> TrainConfig:
    """Refuse a state written for another data kind; return ``config`` with the saved
    spectral grid when this run leaves it unset (the SN rescaling, and so the network,
    depends on it). The options were compared before (:func:`_check_resume_options`)."""
    saved = state["config"] if isinstance(state["config"], dict) else {}
    if state["kind"] != kind:
        raise CheckpointError(f"resume state is for {state['kind']} data, this folder holds "
                              f"{kind} data", path=path)
    grid = saved.get("spectral_grid")
    if config.spectral_grid is None and isinstance(grid, int) and not isinstance(grid, bool):
        return replace(config, spectral_grid=grid)
    return config


def _state_record(kind: str, config: TrainConfig, steps: int, best: float, skips: int,
                  elapsed_s: float, step: Any, optim: Any, *,
                  probes: dict[str, Any] | None = None,
                  bound_probes: dict[str, Any] | None = None,
                  ema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The resume state after ``steps`` steps, as :func:`_save_state` writes it (with the
    "power" penalty's probe vectors, :mod:`.probes`, --project-bound's probes' Ritz
    vectors, and --ema's moving average and its update count, when the run has them)."""
    record = {"version": STATE_VERSION, "kind": kind, "config": _plain(asdict(config)),
              "steps": steps, "best": best, "skips": skips, "elapsed_s": elapsed_s,
              "step": step.state_dict(),
              "optim": optim.state_dict()}
    if step.prior.config.skip > 0:       # the identity path's gain is not a parameter
        record["skip_gain"] = float(step.prior.config.skip)
    if probes is not None:
        record["probes"] = probes
    if bound_probes is not None:
        record["bound_probes"] = bound_probes
    if ema is not None:
        record["ema"] = ema
    return record


def _restore_state(state: dict[str, Any], step: Any, optim: Any, config: TrainConfig,
                   changes: list[Change], path: Path) -> tuple[int, float, int, float]:
    """Load the saved weights, λ and optimiser into ``step`` and ``optim``; return the saved
    (steps, best validation PSNR, consecutive skips, seconds trained). A learning rate
    that ``override`` changed replaces the saved (possibly halved) one."""
    try:
        step.load_state_dict(state["step"])
        optim.load_state_dict(state["optim"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"resume state does not fit this model: {exc}",
                              path=path) from exc
    if "skip_gain" in state:          # the identity path's gain, as the run left it
        prior = step.prior
        prior.config = replace(prior.config, skip=float(state["skip_gain"]))
    # A --lam other than the saved run's restarts λ there (λ is learned in the deep-
    # equilibrium stage; stage 0 validates, and makes its regularised-SENSE patches, at it).
    saved_lam = state["config"].get("lam_init") if isinstance(state["config"], dict) else None
    if config.lam_init is not None and saved_lam != config.lam_init:
        with torch.no_grad():
            step.log_lam.fill_(math.log(config.lam_init))
    steps = int(state["steps"])
    best = float(state["best"])
    skips = int(state.get("skips", 0))
    elapsed_s = float(state.get("elapsed_s", 0.0))
    # --override with a new learning rate: it replaces the saved (possibly halved) one.
    for option, group in (("--lr", 0), ("--lam-lr", 1)):
        if any(c.option == option for c in changes):
            optim.param_groups[group]["lr"] = config.lr if group == 0 else config.lam_lr
    return steps, best, skips, elapsed_s


class _RunLog:
    """The JSON-lines log (rank 0 only); a write failure becomes an OutputError."""

    def __init__(self, path: Path, *, resume_at: int | None) -> None:
        self.path = path
        try:
            if resume_at is None:
                self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            else:
                self._rewrite_upto(resume_at)
                self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(f"cannot write the training log ({exc.strerror or exc})",
                              path=path) from exc

    def _rewrite_upto(self, steps: int) -> None:
        """Keep the records of steps ≤ ``steps`` (those the resume state includes)."""
        kept: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    at = int(rec.get("step", 0)) if isinstance(rec, dict) else None
                except (json.JSONDecodeError, TypeError, ValueError):
                    continue              # a line cut short by a kill
                if at is not None and at <= steps:
                    kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept), force=True)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise OutputError(f"cannot write the training log ({exc.strerror or exc})",
                              path=self.path) from exc

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files (``.NAME.*``) that a killed run left beside its outputs."""
    for target in paths.values():
        prefix = f".{target.name}."
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.name.startswith(prefix) and f.is_file():
                try:
                    f.unlink()
                except OSError:
                    pass


def _write(path: Path, what: str, steps: int, writer: Callable[[], Any]) -> None:
    """Run ``writer`` (an atomic write of ``path``); a failed write becomes an OutputError
    that says training stopped and the previous file is kept."""
    try:
        writer()
    except (OSError, OutputError) as exc:
        # molrecon.atomic turns an OSError of the write into an OutputError naming the target;
        # its cause keeps the system's reason.
        cause = exc.__cause__ if isinstance(exc, OutputError) else exc
        reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause or exc)
        raise OutputError(f"cannot write the {what} after step {steps} ({reason}); training "
                          "stopped, the previous file is kept", path=path) from exc
