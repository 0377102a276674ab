"""Builders shared by several test modules: tiny training runs and hand-made ISMRMRD files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from molrecon.train import TrainConfig
from molrecon.train.data import MaskSpec


def tiny_config(data: Path, out: Path, **changes: Any) -> TrainConfig:
    """A training run small enough for a unit test: 3 layers × 8 channels, R = 3, two steps."""
    base: dict[str, Any] = {
        "layers": 3, "channels": 8, "mask": MaskSpec(acceleration=3.0, acs=8), "max_steps": 2,
        "val_every": 2, "checkpoint_every": 2, "val_samples": 2, "device": "cpu",
        "constraint": "sn", "cg_iters": 5}
    base.update(changes)
    return TrainConfig(data=str(data), out=str(out), **base)


class Crash(Exception):
    """Raised by :func:`crash_at` to kill a training run from its record callback."""


def crash_at(step: int) -> Any:
    """An ``on_record`` callback that kills the run once step ``step`` has been logged (the
    state on disk is then that of the last checkpoint before it)."""
    def callback(rec: dict[str, Any]) -> None:
        if rec.get("step") == step and "loss" in rec:
            raise Crash
    return callback


def records(log: Path) -> list[dict[str, Any]]:
    """The records of a training log (.log.jsonl)."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def write_raw_table(path: Path, xml: str, table: np.ndarray) -> Path:
    """An ISMRMRD file from a header and an acquisition table, exactly as given."""
    with h5py.File(path, "w") as f:
        grp = f.create_group("dataset")
        ds = grp.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        ds[0] = xml.encode()
        grp.create_dataset("data", data=table, maxshape=(None,))
    return path


def probe_norms(config: TrainConfig, checkpoint: Path, measure: str = "lipschitz") -> list[float]:
    """The largest Jacobian norm (or, ``measure`` "monotone", the top of the spectrum of the
    Jacobian's symmetric part) of a saved model's H at the MOL fixed points of the whole-scan
    probes ``train --project-bound`` measures for ``config`` (30 Lanczos steps from noise)."""
    import torch

    from molrecon.deq.fixed_point import FixedPointConfig
    from molrecon.deq.mol import MolConfig, MolStep
    from molrecon.models.checkpoint import load_checkpoint
    from molrecon.train.loop import _load_data
    from molrecon.train.probes import PenaltyProbes

    loaded = load_checkpoint(checkpoint)
    step = MolStep(loaded.model, MolConfig(alpha=config.alpha, lam=loaded.mol_config.lam,
                                           cg_iters=config.cg_iters))
    _, train_set, _ = _load_data(config, lambda _: None)
    probes = PenaltyProbes.build(config, train_set, torch.device("cpu"), whole=True)
    return probes.jacobian_norms(step, loaded.model, cold_steps=30, warm_steps=10,
                                 init_iters=config.init_iters,
                                 fwd=FixedPointConfig(tol=config.fwd_tol,
                                                      max_iter=config.fwd_max_iter),
                                 measure=measure)
