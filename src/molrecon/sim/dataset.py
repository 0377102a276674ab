"""Simulated scans written to disk: one file and its truth, a dataset, examples.

:func:`simulate_to_file` writes one scan as ISMRMRD and, if asked, its truth
image as NIfTI, all or nothing. :func:`simulate_dataset` writes the files of one
split (train, val or test; see :mod:`molrecon.sim.anatomy`) with a manifest of
the subject, slice position, seed and augmentation of each, planned by
:func:`dataset_plan`. :func:`simulated_example` makes a 3D or 2D+time scan to
test a model on where the bundled 2D example does not fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, check_output, write_text_atomic
from ..errors import ConfigError, OutputError
from .anatomy import (
    SPLITS,
    AnatomySubject,
    anatomy_extent,
    anatomy_source,
    anatomy_subjects,
    load_anatomy,
)
from .config import AnatomyTransform, SimulationConfig
from .kspace import SimulatedScan, simulate


def simulate_to_file(config: SimulationConfig, out_h5: str | os.PathLike[str],
                     truth_path: str | os.PathLike[str] | None = None, *, force: bool = False,
                     complex_truth: bool = False) -> SimulatedScan:
    """Simulate and write an ISMRMRD file (and the truth as NIfTI), all or nothing.

    Both outputs are checked before any work, written to temporary files beside
    their targets and renamed at the end; an existing output is replaced only
    with ``force``. The truth NIfTI holds ``|truth|`` (or the complex image with
    ``complex_truth``) on the reconstruction grid, with the scan's geometry.
    """
    out = check_output(out_h5, force=force)
    truth_target = None
    if truth_path is not None:
        if not str(truth_path).endswith((".nii", ".nii.gz")):
            raise OutputError("the truth image must end in .nii or .nii.gz", path=truth_path)
        truth_target = check_output(truth_path, force=force)
        if truth_target.resolve() == out.resolve():
            raise OutputError("the truth image and the raw file must be different files",
                              path=truth_target)
    scan = simulate(config)
    _write_scan(scan, out, truth_target, force=force, complex_truth=complex_truth)
    return scan


def _write_scan(scan: SimulatedScan, out: Path, truth_target: Path | None, *, force: bool,
                complex_truth: bool) -> None:
    from ..io.ismrmrd import write_ismrmrd

    with atomic_path(out, force=force) as tmp_h5:
        write_ismrmrd(tmp_h5, scan.kspace, scan.mask, kind=scan.kind, geometry=scan.geometry,
                      calib=scan.calib, noise=scan.noise, oversampling=scan.oversampling,
                      info=scan.info, force=True)
        if truth_target is not None:
            from ..io.nifti import write_nifti

            with atomic_path(truth_target, force=force) as tmp_nii:
                write_nifti(scan.truth, tmp_nii, complex_output=complex_truth, force=True)


@dataclass(frozen=True)
class DatasetEntry:
    """What one file of a simulated dataset holds (also written to the manifest)."""

    file: str
    truth: str | None
    split: str
    anatomy: str
    slice_position: float
    seed: int
    transform: AnatomyTransform


@dataclass(frozen=True)
class DatasetResult:
    entries: tuple[DatasetEntry, ...]
    manifest: Path


def _stack_extent_mm(cfg: SimulationConfig) -> float:
    """Extent along the slice axis that a file's slices (stack, slab) cover."""
    if cfg.kind == "3d":
        return cfg.field_of_view[2]
    return (cfg.n_slices - 1) * cfg.slice_spacing_mm + cfg.slice_thickness_mm


def _positions_for(subject: AnatomySubject, cfg: SimulationConfig
                   ) -> list[tuple[float, float]]:
    """The ranges of ``slice_position`` that keep the whole stack inside a slab."""
    if anatomy_source(subject.source).planar:
        return [(0.5, 0.5)] if cfg.kind != "3d" else []
    voxel = load_anatomy(subject.source)[1]
    lo, hi = anatomy_extent(subject.source)
    height = float((hi[2] - lo[2]) * voxel[2])
    half = 0.5 * _stack_extent_mm(cfg) / max(height, 1e-6)
    return [(a + half, b - half) for a, b in subject.slabs if b - a >= 2 * half]


def dataset_plan(config: SimulationConfig, count: int, split: str
                 ) -> list[tuple[SimulationConfig, AnatomySubject]]:
    """The per-file configs of a dataset: subject, slice position, augmentation and seed.

    Subjects of ``split`` that are installed here are drawn uniformly (only the
    config's own anatomy when it is a source drawn on request, such as the torso;
    otherwise every source but those), a slab of
    the subject in proportion to its length, a slice position uniformly inside it
    (so that the stack or slab stays inside), and a fresh augmentation and seed.
    Slices stay axial (only in-plane rotations), so splits never overlap.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose train, val or test)")
    if int(count) != count or count < 1:
        raise ConfigError(f"count must be a positive integer, got {count}")
    if config.orientation != "axial" or config.tilt_deg != 0:
        raise ConfigError("dataset mode keeps axial slices without tilt, so that the train, "
                          "val and test slabs stay disjoint")
    options: list[tuple[AnatomySubject, list[tuple[float, float]]]] = []
    asked = anatomy_source(config.anatomy)
    for subject in anatomy_subjects(split, available_only=True):
        # A source drawn only on request (the procedural torso) makes a dataset of its
        # own; every other dataset draws from the other sources, as it always did.
        if asked.on_request and subject.source != asked.name:
            continue
        if not asked.on_request and anatomy_source(subject.source).on_request:
            continue
        ranges = _positions_for(subject, config)
        if ranges:
            options.append((subject, ranges))
    if not options:
        raise ConfigError(f"no installed anatomy of the {split!r} split can hold a "
                          f"{_stack_extent_mm(config):.0f} mm {config.kind} stack; use fewer "
                          "or thinner slices (or a thinner 3d slab)")
    root = np.random.SeedSequence([int(config.seed), SPLITS.index(split)])
    plans = []
    for child in root.spawn(int(count)):
        rng = np.random.default_rng(child)
        subject, ranges = options[int(rng.integers(len(options)))]
        lengths = np.array([b - a for a, b in ranges]) + 1e-9
        a, b = ranges[int(rng.choice(len(ranges), p=lengths / lengths.sum()))]
        cfg = replace(config, anatomy=subject.source, slice_position=float(rng.uniform(a, b)),
                      seed=int(rng.integers(2**31 - 1)),
                      transform=AnatomyTransform.random(rng))
        plans.append((cfg, subject))
    return plans


def simulate_dataset(config: SimulationConfig, out_dir: str | os.PathLike[str], *, count: int,
                     split: str = "train", truth: bool = False, force: bool = False,
                     on_file: Callable[[int, Path], None] | None = None) -> DatasetResult:
    """Write ``count`` simulated files of ``split`` into ``out_dir`` plus a manifest.

    Files are ``{split}_{i:04d}.h5`` (and ``{split}_{i:04d}_truth.nii.gz`` with
    ``truth``); ``manifest_{split}.json`` records subject, slice position, seed and
    augmentation of each. The acceleration is the config's (the command line uses
    R = 1 here: training undersamples retrospectively). Every output name is
    checked before the first file is written; ``on_file(i, path)`` is called after
    each file.
    """
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise OutputError("exists and is not a folder", path=folder)
    plans = dataset_plan(config, count, split)
    names = [(folder / f"{split}_{i:04d}.h5",
              folder / f"{split}_{i:04d}_truth.nii.gz" if truth else None)
             for i in range(len(plans))]
    manifest = folder / f"manifest_{split}.json"
    if folder.is_dir():
        for h5, nii in names:
            check_output(h5, force=force)
            if nii is not None:
                check_output(nii, force=force)
        check_output(manifest, force=force)
    else:
        try:
            folder.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"cannot create the folder: {exc.strerror}", path=folder) from None
    entries = []
    for i, ((cfg, subject), (h5, nii)) in enumerate(zip(plans, names)):
        scan = simulate(cfg)
        _write_scan(scan, h5, nii, force=force, complex_truth=False)
        entries.append(DatasetEntry(file=h5.name, truth=None if nii is None else nii.name,
                                    split=split, anatomy=subject.source,
                                    slice_position=cfg.slice_position, seed=cfg.seed,
                                    transform=cfg.transform))
        if on_file is not None:
            on_file(i, h5)
    record = {
        "split": split,
        "kind": config.kind,
        "matrix": list(config.grid),
        "fov_mm": list(config.field_of_view),
        "coils": config.coils,
        "acceleration": config.acceleration,
        "mask": config.mask_family,
        "noise": config.noise,
        "files": [asdict(e) for e in entries],
    }
    write_text_atomic(manifest, json.dumps(record, indent=2) + "\n", force=force)
    return DatasetResult(entries=tuple(entries), manifest=manifest)


#: The matrices of :func:`simulated_example` (x, y[, z]; 2D+time: x, y and frames).
EXAMPLE_MATRIX = {("3d", False): (128, 128, 16), ("3d", True): (64, 64, 12),
                  ("2dt", False): (128, 128, 12), ("2dt", True): (64, 64, 8)}


def simulated_example(kind: str, folder: str | os.PathLike[str], *, quick: bool = False) -> Path:
    """A scan of ``kind`` to test a model on when the bundled (2D) example does not fit:
    simulated from the *validation* slab of the bundled anatomy, 8 coils, R = 4 with the
    kind's default mask, written as ISMRMRD into ``folder``. ``quick``: a coarser grid
    over the same field of view (:data:`EXAMPLE_MATRIX`), for checks that must take
    seconds on a CPU rather than minutes."""
    if quick and kind in ("3d", "2dt"):
        x, y, z = EXAMPLE_MATRIX[(kind, True)]
        if kind == "3d":
            cfg = SimulationConfig(kind="3d", matrix=(x, y, z), fov_mm=(240.0, 240.0, 20.0),
                                   coils=8, acceleration=4.0, acs=8, mask="poisson", noise=0.01,
                                   seed=4242, slice_position=0.60)
        else:
            cfg = SimulationConfig(kind="2dt", matrix=(x, y), frames=z, coils=8,
                                   acceleration=4.0, acs=8, mask="interleaved", noise=0.01,
                                   seed=4243, slice_position=0.60)
        path = Path(folder) / f"example_{kind}_quick.h5"
        simulate_to_file(cfg, path, force=True)
        return path
    if kind == "3d":
        cfg = SimulationConfig(kind="3d", matrix=(128, 128, 16), fov_mm=(240.0, 240.0, 20.0),
                               coils=8, acceleration=4.0, acs=12, mask="poisson", noise=0.01,
                               seed=4242, slice_position=0.60)
    elif kind == "2dt":
        cfg = SimulationConfig(kind="2dt", matrix=(128, 128), frames=12, coils=8,
                               acceleration=4.0, acs=8, mask="interleaved", noise=0.01,
                               seed=4243, slice_position=0.60)
    else:
        raise ConfigError(f"no simulated example for {kind!r} data (the bundled example is 2d)")
    path = Path(folder) / f"example_{kind}.h5"
    simulate_to_file(cfg, path, force=True)
    return path


__all__ = [
    "EXAMPLE_MATRIX", "DatasetEntry", "DatasetResult", "dataset_plan", "simulate_dataset",
    "simulate_to_file", "simulated_example",
]
