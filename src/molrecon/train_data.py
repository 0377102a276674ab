"""Training samples from a folder of raw scans (ISMRMRD and fastMRI HDF5, any mix).

Each fully sampled scan becomes ground truth once, and is then undersampled
retrospectively with a fresh mask for every draw:

* the k-space is normalised by the same intensity scale that reconstruction
  uses (``physics.scaling``), so training and inference see the same range;
* ESPIRiT maps are estimated from the fully sampled centre;
* the ground truth is the coil combination of the fully sampled data with
  those maps, x_gt = Aᴴ_full y (the SENSE combination; exact for a full mask);
* a sample is ``(kspace_full, maps, x_gt)`` for one slice (2D), one volume (3D)
  or one slice's frame series (2D+time); ``draw`` applies a mask from the
  configured family and optional extra complex noise.

Everything that costs time (reading, ESPIRiT) is done once per file and kept
in memory; an epoch only draws masks. Files that cannot serve as ground truth
(unreadable, undersampled, a different data kind) are skipped with one
warning line each and listed in ``skipped``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, InputDataError, MolreconError

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd")


@dataclass(frozen=True)
class MaskSpec:
    """Retrospective masks: ``family`` may list several ("equispaced,random"), one drawn per sample."""

    family: str = "equispaced"
    acceleration: float = 4.0
    acs: int = 16
    accelerations: tuple[float, ...] = ()   # if given, each draw picks one of these


@dataclass
class Sample:
    """One training item on the CPU, normalised; shapes with batch size 1."""

    kspace: Any          # torch complex (1, C, D, Y, X), fully sampled
    maps: Any            # torch complex (1, C, D|1, Y, X)
    target: Any          # torch complex (1, D, Y, X)
    source: str
    index: int


@dataclass
class FolderDataset:
    kind: str
    samples: list[Sample]
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)


def list_raw_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputDataError("not a folder of raw files", path=folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RAW_SUFFIXES)


def _fully_sampled(mask: np.ndarray, kind: str) -> bool:
    return bool(mask.all())


def load_folder(files: list[Path], kind: str | None, *, crop: tuple[int, int] | None = None,
                warn: Any = None) -> FolderDataset:
    """Read, normalise and coil-combine every usable file (see module docstring)."""
    import torch

    from .coils import estimate_maps
    from .io.detect import read_raw
    from .physics.scaling import scale_factor
    from .physics.sense import SenseOperator

    warn = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    samples: list[Sample] = []
    used: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in files:
        try:
            scan = read_raw(path)
        except MolreconError as exc:
            skipped.append((str(path), exc.message))
            warn(f"{path}: skipped: {exc.message}")
            continue
        if kind is None:
            kind = scan.kind
        if scan.kind != kind:
            reason = f"is {scan.kind} data, the training set is {kind}"
            skipped.append((str(path), reason))
            warn(f"{path}: skipped: {reason}")
            continue
        if not _fully_sampled(scan.mask, scan.kind):
            reason = (f"undersampled (R={scan.acceleration:.2f}); training needs fully sampled "
                      "scans as ground truth")
            skipped.append((str(path), reason))
            warn(f"{path}: skipped: {reason}")
            continue
        k = torch.from_numpy(np.ascontiguousarray(scan.kspace))           # (B, C, D, Y, X)
        mask = torch.from_numpy(np.ascontiguousarray(scan.mask))
        calib = torch.from_numpy(np.ascontiguousarray(scan.calib))
        scale = torch.as_tensor(scale_factor(k, mask, scan.kind), dtype=torch.float32).reshape(-1)
        k = k / scale.reshape(-1, 1, 1, 1, 1)
        try:
            maps = estimate_maps(k, calib, scan.kind)
        except MolreconError as exc:
            skipped.append((str(path), exc.message))
            warn(f"{path}: skipped: {exc.message}")
            continue
        full = torch.ones_like(mask, dtype=torch.bool)
        target = SenseOperator(maps, full, scan.kind).adjoint(k)            # (B, D, Y, X)
        for b in range(k.shape[0]):
            samples.append(Sample(kspace=k[b:b + 1].clone(), maps=maps[b:b + 1].clone(),
                                  target=target[b:b + 1].clone(), source=str(path), index=b))
        used.append(str(path))
    if kind is None:
        raise InputDataError("no readable raw files", path=files[0].parent if files else None)
    return FolderDataset(kind=kind, samples=samples, files=used, skipped=skipped)


def split_files(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out whole files (never slices of a file) for validation."""
    if not files:
        return [], []
    if len(files) == 1:
        return files, []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    n_val = max(1, int(round(val_fraction * len(files)))) if val_fraction > 0 else 0
    n_val = min(n_val, len(files) - 1)
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def draw_mask(sample: Sample, kind: str, spec: MaskSpec, rng: np.random.Generator) -> np.ndarray:
    """A fresh retrospective mask (1, 1, D, Y, 1) for ``sample``."""
    from .physics.masks import make_mask

    _, _, d, y, _ = sample.kspace.shape
    r = float(rng.choice(spec.accelerations)) if spec.accelerations else spec.acceleration
    families = [f.strip() for f in spec.family.split(",") if f.strip()]
    family = families[int(rng.integers(len(families)))] if len(families) > 1 else families[0]
    m = make_mask(kind, family, (1, 1, d, y, 1), r, spec.acs, rng)
    m = np.asarray(m, dtype=bool)
    if m.shape != (1, 1, d, y, 1):
        try:
            m = np.broadcast_to(m.reshape(m.shape), (1, 1, d, y, 1)).copy()
        except ValueError as exc:
            raise ConfigError(f"mask family {spec.family!r} gave shape {m.shape}, "
                              f"expected {(1, 1, d, y, 1)}") from exc
    return m
