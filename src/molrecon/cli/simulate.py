"""`molrecon simulate`: realistic raw multicoil k-space (ISMRMRD) from real anatomy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..kinds import KINDS
from ._common import (
    ACCEL_HELP,
    DebugOpt,
    app,
    bad_option,
    check_option,
    choice,
    console,
    parse_accelerations,
    stdout,
    user_errors,
)

_MASKS = ("equispaced", "random", "poisson", "interleaved")
_SPLITS = ("train", "val", "test")
_ORIENTATIONS = ("axial", "coronal", "sagittal")


def _sizes(text: str, n_axes: int, option: str, *, integer: bool) -> tuple[float, ...]:
    """Parse ``N``, ``NxM`` or ``NxMxK`` into ``n_axes`` numbers (``N`` repeats in-plane)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        values = [int(p) if integer else float(p) for p in parts]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not N, NxM or NxMxK", param_hint=option) from None
    if len(values) == 1 and n_axes == 2:
        values = values * 2
    elif len(values) == 1 and n_axes == 3:
        z = max(4, int(values[0]) // 4) if integer else values[0] / 4.0
        values = [values[0], values[0], z]
    if len(values) != n_axes:
        raise typer.BadParameter(
            f"{text!r}: a {'3d' if n_axes == 3 else '2d'} scan needs "
            f"{'N or NxMxK' if n_axes == 3 else 'N or NxM'}", param_hint=option)
    return tuple(values)


def _list_anatomy() -> None:
    from rich.table import Table

    from ..sim import anatomy_available, anatomy_sources, anatomy_subjects

    splits: dict[str, list[str]] = {}
    for subject in anatomy_subjects():
        slabs = ", ".join(f"{a:.2f}-{b:.2f}" for a, b in subject.slabs)
        splits.setdefault(subject.source, []).append(f"{subject.split} [{slabs}]")
    table = Table(title="anatomy sources (molrecon simulate --anatomy NAME)")
    for col in ("name", "installed", "what", "splits (head-height fractions)", "to install"):
        table.add_column(col)
    for src in anatomy_sources():
        ok = anatomy_available(src.name)
        table.add_row(src.name, "[green]yes[/green]" if ok else "[red]no[/red]", src.description,
                      "; ".join(splits.get(src.name, [])), "" if ok else src.install_hint)
    stdout.print(table)


# Over 80 lines: the signature declares every command-line option (typer reads it).
@app.command("simulate")
def simulate_cmd(
    output: Annotated[Path | None, typer.Argument(
        metavar="OUT.h5", help="Raw file to write (ISMRMRD HDF5). Leave out with --dataset.",
        show_default=False)] = None,
    kind: Annotated[str, typer.Option("--kind", help="2d | 3d | 2dt (2D + time).")] = "2d",
    coils: Annotated[int, typer.Option("--coils", help="Receive coils (1-64).")] = 8,
    acceleration: Annotated[str | None, typer.Option(
        "--acceleration", "-R", metavar="R", show_default=False,
        help=ACCEL_HELP + " One value here (train takes a comma list like 4,6); default 4, "
        "1 with --dataset.")] = None,
    acs: Annotated[int | None, typer.Option(
        "--acs", show_default=False,
        help="Fully sampled centre (ACS) lines (default: about 8 % of the phase lines, at "
        "least 8 and at most half the sampled ones: 20 of 256 at R=4; `train` uses a fixed "
        "16).")] = None,
    mask: Annotated[str | None, typer.Option(
        "--mask", metavar="FAMILY", show_default=False,
        help="Mask family: equispaced | random | poisson (3d) | interleaved (2dt). One family "
        "here (train takes a comma list like equispaced,random; default: equispaced (2d), "
        "poisson (3d), interleaved (2dt)).")] = None,
    noise: Annotated[float, typer.Option(
        "--noise", help="Noise std relative to bright tissue (1/SNR of the combined image).")] = 0.01,
    matrix: Annotated[str | None, typer.Option(
        "--matrix", help="Reconstruction matrix, readout x phase (x partitions): N, NxM, "
        "NxMxK (default 256 for 2d, 128 for 2dt, 128x128x32 for 3d).")] = None,
    fov: Annotated[str | None, typer.Option(
        "--fov", help="Field of view in mm, like --matrix (default 240, 3d 240x240x64).")] = None,
    slices: Annotated[int | None, typer.Option(
        "--slices", help="Slices of a multi-slice 2d scan (default 1).")] = None,
    frames: Annotated[int | None, typer.Option(
        "--frames", help="Frames of a 2dt scan (default 16).")] = None,
    thickness: Annotated[float, typer.Option(
        "--thickness", help="Slice thickness of 2d and 2dt scans, mm.")] = 3.0,
    position: Annotated[float, typer.Option(
        "--position", help="Where the slice (stack, slab) sits across the head, 0 = "
        "lowest, 1 = highest.")] = 0.55,
    orientation: Annotated[str, typer.Option(
        "--orientation", help="axial | coronal | sagittal.")] = "axial",
    tilt: Annotated[float, typer.Option(
        "--tilt", help="Oblique tilt about the readout axis, degrees.")] = 0.0,
    oversampling: Annotated[int, typer.Option(
        "--oversampling", help="Readout oversampling written to the file.")] = 2,
    anatomy: Annotated[str, typer.Option(
        "--anatomy", help="Anatomy source (see --list-anatomy).")] = "colin27",
    truth: Annotated[Path | None, typer.Option(
        "--truth", metavar="TRUTH.nii.gz",
        help="Also write the noise-free truth image here (.nii or .nii.gz), in the object's "
        "units (see above).")] = None,
    complex_truth: Annotated[bool, typer.Option(
        "--complex-truth", help="Write the truth as complex64 instead of magnitude.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same file).")] = 0,
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", metavar="DIR",
        help="Write a dataset of --count files into this folder instead.")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", help="Number of files in --dataset mode.", show_default=False)] = None,
    split: Annotated[str, typer.Option(
        "--split", help="train | val | test: which anatomy the dataset draws from.")] = "train",
    with_truth: Annotated[bool, typer.Option(
        "--with-truth", help="In --dataset mode, write NAME_truth.nii.gz beside each file (in the object's units, see above).")] = False,
    list_anatomy: Annotated[bool, typer.Option(
        "--list-anatomy", help="List the anatomy sources and their split, then exit.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Simulate realistic raw multicoil k-space from real anatomy and write it as ISMRMRD.

    Coil maps, smooth image phase, correlated coil noise with a noise scan, a
    readout-oversampled encoding and a sampling mask; simulated on a finer grid
    than the reconstruction (no inverse crime). --truth writes the matching
    noise-free image on the reconstruction grid, for `molrecon metrics`.

    The truth is in the object's units (|truth| ≈ 1 in bright tissue), not in a
    reconstruction's: molrecon reconstructs prewhitened data, whose unit is the
    noise's standard deviation, so a reconstruction is about 1/--noise times
    brighter (≈ 170× at --noise 0.01). `molrecon metrics` fits that scale by
    default; --no-fit would count it as error.
    """
    if list_anatomy:
        with user_errors(debug):
            _list_anatomy()
        return
    # Usage errors first (exit code 2, naming the option), before any work.
    config = _checked_config(
        output=output, kind=kind, coils=coils, acceleration=acceleration, acs=acs, mask=mask,
        noise=noise, matrix=matrix, fov=fov, slices=slices, frames=frames, thickness=thickness,
        position=position, orientation=orientation, tilt=tilt, oversampling=oversampling,
        anatomy=anatomy, truth=truth, seed=seed, dataset=dataset, count=count, split=split,
        with_truth=with_truth)
    r = config.acceleration

    with user_errors(debug):
        from ..sim import simulate_dataset, simulate_to_file

        if dataset is not None:
            from ..sim import dataset_plan

            dataset_plan(config, int(count or 0), split)   # refuse impossible requests up front
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                          transient=True) as bar:
                task = bar.add_task(f"simulating {split} {kind}", total=count)
                result = simulate_dataset(
                    config, dataset, count=int(count or 0), split=split, truth=with_truth,
                    force=force, on_file=lambda i, path: bar.update(task, completed=i + 1))
            sources = sorted({e.anatomy for e in result.entries})
            console.print(f"[green]wrote[/green] {len(result.entries)} {split} files to "
                          f"{dataset} ({kind}, R={r:g}, anatomy: {', '.join(sources)}; "
                          f"manifest {result.manifest.name})", soft_wrap=True)
            return

        target = Path(output or "")
        with console.status(f"simulating {kind} k-space from {anatomy}..."):
            scan = simulate_to_file(config, target, truth, force=force,
                                    complex_truth=complex_truth)
        b_n, c_n, d_n, y_n, x_n = scan.kspace.shape
        line = (f"[green]wrote[/green] {target}  ({kind}, {c_n} coils, "
                f"{b_n}x{d_n}x{y_n}x{x_n // scan.oversampling} (BxDxYxX), R={scan.acceleration:.2f} "
                f"{config.mask_family}, {config.acs_lines} ACS lines")
        if truth is not None:
            line += f"; truth {truth}"
        console.print(line + ")", soft_wrap=True)


# Which option a SimulationConfig complaint is about (the checks above catch the common ones
# with their own words; this names the option of whatever the config still refuses).
_CONFIG_HINTS = (("matrix", "--matrix"), ("field of view", "--fov"), ("coils", "--coils"),
                 ("acceleration", "-R"), ("ACS", "--acs"), ("mask", "--mask"),
                 ("noise", "--noise"), ("oversampling", "--oversampling"), ("seed", "--seed"),
                 ("anatomy", "--anatomy"), ("slice position", "--position"),
                 ("slice thickness", "--thickness"), ("slices", "--slices"),
                 ("frames", "--frames"), ("orientation", "--orientation"), ("tilt", "--tilt"),
                 ("simulation grid", "--matrix"))


# Over 80 lines: one usage check per option of `simulate`, in the order of --help.
def _checked_config(*, output: Path | None, kind: str, coils: int, acceleration: str | None,
                    acs: int | None, mask: str | None, noise: float, matrix: str | None,
                    fov: str | None, slices: int | None, frames: int | None, thickness: float,
                    position: float, orientation: str, tilt: float, oversampling: int,
                    anatomy: str, truth: Path | None, seed: int, dataset: Path | None,
                    count: int | None, split: str, with_truth: bool) -> Any:
    """Every option value checked (usage errors, exit 2, naming the option) and the
    :class:`~molrecon.sim.SimulationConfig` they make, before any work."""
    import math

    import numpy as np

    from ..errors import ConfigError
    from ..physics.masks import FAMILIES_FOR_KIND, make_mask
    from ..sim import SimulationConfig, anatomy_sources

    choice(kind, KINDS, "--kind")
    choice(orientation, _ORIENTATIONS, "--orientation")
    choice(split, _SPLITS, "--split")
    if mask is not None:
        choice(mask, _MASKS, "--mask")
        check_option(mask in FAMILIES_FOR_KIND[kind], f"{mask!r} does not apply to {kind} "
                     f"data (use {' or '.join(FAMILIES_FOR_KIND[kind])})", "--mask")
    if (output is None) == (dataset is None):
        raise bad_option("give either OUT.h5 or --dataset DIR (not both)", "OUT.h5")
    if dataset is None and (count is not None or with_truth):
        raise bad_option("--count and --with-truth belong to --dataset mode", "--count")
    if dataset is not None and truth is not None:
        raise bad_option("in --dataset mode use --with-truth", "--truth")
    if dataset is not None and count is None:
        raise bad_option("--dataset needs --count N", "--count")
    check_option(count is None or count >= 1, "must be at least 1", "--count")
    if dataset is not None:
        check_option(orientation == "axial" and tilt == 0, "--dataset keeps axial slices "
                     "without tilt, so that the train, val and test slabs stay disjoint",
                     ["--orientation", "--tilt"])
    n_axes = 3 if kind == "3d" else 2
    grid = None if matrix is None else _sizes(matrix, n_axes, "--matrix", integer=True)
    check_option(grid is None or all(4 <= v <= 2048 for v in grid),
                 "every size must lie in [4, 2048]", "--matrix")
    fov_mm = None if fov is None else _sizes(fov, n_axes, "--fov", integer=False)
    check_option(fov_mm is None or all(math.isfinite(v) and v > 0 for v in fov_mm),
                 "every size must be a positive number of mm", "--fov")
    if truth is not None and not str(truth).endswith((".nii", ".nii.gz")):
        raise bad_option("the truth image must end in .nii or .nii.gz", "--truth")
    check_option(1 <= coils <= 64, f"must lie in [1, 64], got {coils}", "--coils")
    values = (parse_accelerations(acceleration, "-R") if acceleration is not None
              else ((1.0 if dataset is not None else 4.0),))
    check_option(len(values) == 1, f"simulate writes one mask: give one R, not {acceleration!r} "
                 "(train draws from a list)", "-R")
    check_option(acs is None or acs >= 0, f"must be >= 0, got {acs}", "--acs")
    check_option(math.isfinite(noise) and noise >= 0, f"must be >= 0, got {noise}", "--noise")
    check_option(slices is None or 1 <= slices <= 256, f"must lie in [1, 256], got {slices}",
                 "--slices")
    check_option(slices in (None, 1) or kind == "2d",
                 f"several slices are for 2d scans, not {kind}", "--slices")
    check_option(frames is None or 1 <= frames <= 1024, f"must lie in [1, 1024], got {frames}",
                 "--frames")
    check_option(frames in (None, 1) or kind == "2dt",
                 f"frames are for 2dt scans, not {kind}", "--frames")
    check_option(math.isfinite(thickness) and thickness > 0, f"must be positive, got {thickness}",
                 "--thickness")
    check_option(0.0 <= position <= 1.0, f"must lie in [0, 1], got {position}", "--position")
    check_option(math.isfinite(tilt) and abs(tilt) < 90, f"must lie in (-90, 90), got {tilt}",
                 "--tilt")
    check_option(1 <= oversampling <= 4, f"must be 1, 2, 3 or 4, got {oversampling}",
                 "--oversampling")
    check_option(seed >= 0, f"must be >= 0, got {seed}", "--seed")
    names = [src.name for src in anatomy_sources()]
    check_option(anatomy in names, f"{anatomy!r} is not one of {', '.join(names)}",
                 "--anatomy")
    try:
        config = SimulationConfig(
            kind=kind,  # type: ignore[arg-type]
            matrix=None if grid is None else tuple(int(v) for v in grid),
            fov_mm=fov_mm, coils=coils, acceleration=values[0], acs=acs, mask=mask,
            noise=noise, oversampling=oversampling, seed=seed, anatomy=anatomy,
            slice_position=position, slices=slices, slice_thickness_mm=thickness,
            frames=frames, orientation=orientation, tilt_deg=tilt,  # type: ignore[arg-type]
        )
    except ConfigError as exc:
        hint = next((opt for key, opt in _CONFIG_HINTS if key in exc.message), None)
        raise typer.BadParameter(exc.message, param_hint=hint) from None
    # The mask (R, ACS, family) for this matrix: refused here rather than after the anatomy.
    n_b = config.n_slices if kind == "2d" else 1
    n_d = config.grid[2] if kind == "3d" else config.n_frames
    try:
        make_mask(kind, config.mask_family, (n_b, n_d, config.grid[1]), config.acceleration,
                  config.acs_lines, np.random.default_rng(0))
    except ConfigError as exc:
        raise bad_option(exc.message, ["-R", "--acs"]) from None
    return config
