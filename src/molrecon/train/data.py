"""Training samples from a folder of raw scans (ISMRMRD and fastMRI HDF5, any mix).

Each fully sampled scan becomes ground truth once, and is then undersampled
retrospectively with a fresh mask for every draw:

* the k-space of each file is divided by its intensity scale
  (``physics.scaling``); the training step normalises again after
  undersampling, exactly as reconstruction does;
* ESPIRiT maps are estimated from the fully sampled data (the largest fully
  acquired centre, capped at ESPIRiT's calibration size): a fully sampled scan
  calibrates on more than its flagged ACS lines, which on small 3D slabs are
  too few for ESPIRiT's kernel;
* the ground truth is the coil combination of the fully sampled data with
  those maps, x_gt = Aᴴ_full y (the SENSE combination; exact for a full mask);
* a sample is ``(kspace_full, maps, x_gt)`` for one slice (2D), one volume (3D)
  or one slice's frame series (2D+time); :func:`draw_mask` gives it a mask
  from the configured family, and :func:`make_problem` the undersampled,
  normalised problem a training step solves.

"Fully sampled" means at least ``FULL_FRACTION`` (95 %) of the phase-encoding
positions acquired (fastMRI files leave a few edge lines empty); the missing
ones are then kept out of every drawn mask (``Sample.acquired``).

Everything that costs time (reading, ESPIRiT) is done once per file and kept
in memory; an epoch only draws masks. Files that cannot serve as ground truth
(unreadable, not raw data, undersampled, a different data kind, no signal)
are skipped with one warning line each and listed in ``skipped``; so are the
individual slices that hold no signal.

The validation split is by file (:func:`split_dataset`): all slices of a file
are either training or validation data, never both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, InputDataError, InputDataWarning, MolreconError

# torch (and what needs it) is imported where it is used: TrainConfig takes MaskSpec from
# here, and the command line checks its options without importing torch.
if TYPE_CHECKING:
    from ..problem import Problem

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd")
#: Smallest fraction of acquired phase-encoding positions that counts as fully sampled.
FULL_FRACTION = 0.95

WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class MaskSpec:
    """Retrospective masks: ``family`` may list several ("equispaced,random"), one drawn per sample.

    ``acceleration`` is the net R (ACS included); ``accelerations``, if given,
    lists several, one drawn per sample. ``acs`` is the fully sampled centre
    width in lines (a box for 3D Poisson masks).
    """

    family: str = "equispaced"
    acceleration: float = 4.0
    acs: int = 16
    accelerations: tuple[float, ...] = ()   # if given, each draw picks one of these

    def families(self) -> list[str]:
        return [f.strip() for f in self.family.split(",") if f.strip()]

    def all_accelerations(self) -> tuple[float, ...]:
        return tuple(self.accelerations) if self.accelerations else (self.acceleration,)


@dataclass
class Sample:
    """One training item on the CPU, normalised; shapes with batch size 1.

    ``acquired`` is None for a completely sampled item, else the boolean
    (1, 1, D, Y, 1) positions that hold data (every drawn mask stays inside).
    """

    kspace: Any          # torch complex (1, C, D, Y, X), fully sampled
    maps: Any            # torch complex (1, C, D|1, Y, X)
    target: Any          # torch complex (1, D, Y, X)
    source: str
    index: int
    acquired: np.ndarray | None = None


@dataclass
class FolderDataset:
    """Samples of one data kind; ``files`` the files they came from, ``skipped`` (file, reason)."""

    kind: str
    samples: list[Sample]
    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, files: list[str]) -> FolderDataset:
        """The samples of ``files`` only (same kind, no skipped list)."""
        keep = set(files)
        return FolderDataset(kind=self.kind, samples=[s for s in self.samples if s.source in keep],
                             files=[f for f in self.files if f in keep])


def list_raw_files(folder: str | Path) -> list[Path]:
    """The raw-data files (by suffix, case-insensitive) directly inside ``folder``, sorted."""
    folder = Path(folder)
    if not folder.exists():
        raise InputDataError("no such folder", path=folder)
    if not folder.is_dir():
        raise InputDataError("not a folder (--data takes a folder of raw files)", path=folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RAW_SUFFIXES)


def _read(path: Path, warn: WarnFn) -> Any:
    """read_raw with its warnings routed: data notes to ``warn``, geometry notes dropped."""
    from ..io.detect import read_raw

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan = read_raw(path)
    for w in caught:
        # Geometry does not matter for training; anything else about the data does.
        if issubclass(w.category, InputDataWarning):
            warn(str(w.message))
    return scan


def load_folder(files: list[Path], kind: str | None, *, warn: WarnFn | None = None
                ) -> FolderDataset:
    """Read, normalise and coil-combine every usable file (see the module docstring).

    ``kind`` None: the first usable (fully sampled) file sets it, and files of
    other kinds are skipped. Raises :class:`InputDataError` only when ``files``
    is empty; a folder with nothing usable gives an empty dataset whose
    ``skipped`` says why (the caller decides what that means).
    """
    if not files:
        raise InputDataError("no raw files to load")
    say: WarnFn = warn or (lambda msg: warnings.warn(msg, InputDataWarning, stacklevel=3))
    samples: list[Sample] = []
    used: list[str] = []
    skipped: list[tuple[str, str]] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append((str(path), reason))
        say(f"{path}: skipped: {reason}")

    for path in files:
        try:
            scan = _read(path, say)
        except MolreconError as exc:
            skip(path, exc.message)
            continue
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - one unreadable file must not end the run
            skip(path, f"unreadable ({type(exc).__name__}: {exc})")
            continue
        if kind is not None and scan.kind != kind:
            skip(path, f"is {scan.kind} data, the training set is {kind}")
            continue
        fraction = float(np.mean(scan.mask))
        if fraction < FULL_FRACTION:
            skip(path, f"undersampled (R={scan.acceleration:.2f}); training needs fully sampled "
                       "scans as ground truth")
            continue
        try:
            file_samples, dropped = _samples_of(scan, str(path))
        except MolreconError as exc:
            skip(path, exc.message)
            continue
        if not file_samples:
            skip(path, "no slice holds signal (empty k-space or empty coil maps)")
            continue
        if dropped:
            say(f"{path}: {dropped} slice(s) without signal left out")
        if kind is None:
            kind = scan.kind
        samples.extend(file_samples)
        used.append(str(path))
    return FolderDataset(kind=kind or "", samples=samples, files=used, skipped=skipped)


def _samples_of(scan: Any, source: str) -> tuple[list[Sample], int]:
    """The usable samples of one fully sampled scan, and how many items were left out.

    Each item is normalised and gets ESPIRiT maps as in reconstruction
    (:func:`molrecon.problem.prepare`, the whole acquired centre calibrating); its
    target is the coil combination Aᴴb of the normalised reference k-space.
    """
    import torch

    from ..problem import prepare

    k_all = torch.from_numpy(np.ascontiguousarray(scan.kspace))           # (B, C, D, Y, X)
    mask_all = np.ascontiguousarray(scan.mask, dtype=bool)                # (B, 1, D, Y, 1)
    peak = k_all.abs().reshape(k_all.shape[0], -1).amax(dim=1)           # (B,)
    if not bool(torch.isfinite(peak).all()):
        raise InputDataError("k-space contains NaN or Inf values")
    keep = [b for b in range(k_all.shape[0]) if float(peak[b]) > 0]
    dropped = k_all.shape[0] - len(keep)
    if not keep:
        return [], dropped
    mask = torch.from_numpy(mask_all[keep])                               # (B', 1, D, Y, 1)
    ref = prepare(k_all[keep], mask, None, scan.kind)
    k, maps = ref.kspace, ref.op.maps                                     # (B', C, D, Y, X)
    target = ref.aty                                                      # (B', D, Y, X)
    out: list[Sample] = []
    for i, b in enumerate(keep):
        energy = float(torch.sum(target[i].abs() ** 2))
        if not energy > 0 or not bool(torch.isfinite(target[i]).all()):
            dropped += 1
            continue
        acquired = mask_all[b:b + 1]
        out.append(Sample(kspace=k[i:i + 1].clone(), maps=maps[i:i + 1].clone(),
                          target=target[i:i + 1].clone(), source=source, index=b,
                          acquired=None if acquired.all() else acquired.copy()))
    return out, dropped


def split_files(files: list[Path], val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """Hold out whole files (never slices of a file) for validation.

    ``round(val_fraction · n)`` files, at least one when ``val_fraction > 0``
    and at most ``n − 1`` (training keeps one file); a seeded permutation picks them.
    """
    if not files:
        return [], []
    if len(files) == 1:
        return list(files), []
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(files))
    n_val = max(1, round(val_fraction * len(files))) if val_fraction > 0 else 0
    n_val = min(n_val, len(files) - 1)
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def split_dataset(data: FolderDataset, val_fraction: float, seed: int
                  ) -> tuple[FolderDataset, FolderDataset]:
    """Training and validation sets, split by file over the usable files (:func:`split_files`)."""
    train_files, val_files = split_files([Path(f) for f in data.files], val_fraction, seed)
    train = data.subset([str(f) for f in train_files])
    val = data.subset([str(f) for f in val_files])
    train.skipped = list(data.skipped)
    return train, val


def draw_mask(sample: Sample, kind: str, spec: MaskSpec, rng: np.random.Generator) -> np.ndarray:
    """A fresh retrospective mask (1, 1, D, Y, 1) for ``sample``: family and R drawn from ``spec``.

    The random choices are made in a fixed order (R, family, pattern) from
    ``rng``, so a seeded generator reproduces the mask.
    """
    from ..physics.masks import make_mask

    _, _, d, y, _ = sample.kspace.shape
    accelerations = spec.all_accelerations()
    r = float(rng.choice(accelerations)) if len(accelerations) > 1 else accelerations[0]
    families = spec.families()
    if not families:
        raise ConfigError("no mask family given")
    family = families[int(rng.integers(len(families)))] if len(families) > 1 else families[0]
    m = np.asarray(make_mask(kind, family, (1, 1, d, y, 1), r, spec.acs, rng), dtype=bool)
    if sample.acquired is not None:
        m = m & sample.acquired                                           # (1, 1, D, Y, 1)
    return m


def make_problem(sample: Sample, kind: str, spec: MaskSpec, rng: np.random.Generator,
                 extra_noise: float, device: Any, readout_block: int | None = None, *,
                 maps_from: str = "reference", lam_rule: Any = None) -> Problem:
    """Undersample ``sample`` with a fresh mask drawn from ``spec`` and normalise it as
    reconstruction would (:func:`molrecon.problem.undersampled`; ``readout_block`` keeps an
    exact hybrid-space block of readout positions, ``maps_from`` says whose coil maps the
    problem has, ``lam_rule`` sets its λ factor from its noise level and acceleration)."""
    from ..problem import undersampled

    mask = draw_mask(sample, kind, spec, rng)                              # (1, 1, D, Y, 1)
    return undersampled(sample.kspace, sample.maps, sample.target, mask, kind, rng,
                        extra_noise, device, readout_block, maps_from=maps_from,
                        lam_rule=lam_rule)


def check_masks(data: FolderDataset, spec: MaskSpec) -> None:
    """Fail before training if a mask family/acceleration/ACS cannot be drawn for the data.

    Draws every (family, R) combination once for every distinct (D, Y) shape
    and turns the mask module's complaint into a :class:`ConfigError` that
    names the data shape.
    """
    from ..physics.masks import make_mask

    families = spec.families()
    if not families:
        raise ConfigError("no mask family given (--mask)")
    shapes = sorted({tuple(int(n) for n in s.kspace.shape[2:4]) for s in data.samples})
    for d, y in shapes:
        for family in families:
            for r in spec.all_accelerations():
                try:
                    make_mask(data.kind, family, (1, 1, d, y, 1), r, spec.acs,
                              np.random.default_rng(0))
                except MolreconError as exc:
                    raise ConfigError(f"mask {family} at R={r:g} with {spec.acs} ACS lines does "
                                      f"not fit the {data.kind} data ({d}×{y} phase-encoding "
                                      f"positions): {exc.message}") from exc
