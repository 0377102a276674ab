"""`molrecon simulate`: realistic raw multicoil k-space (ISMRMRD) from real anatomy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import DebugOpt, app, console, stdout, user_errors

_KINDS = ("2d", "3d", "2dt")
_MASKS = ("equispaced", "random", "poisson", "interleaved")
_SPLITS = ("train", "val", "test")
_ORIENTATIONS = ("axial", "coronal", "sagittal")


def _choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    if value not in allowed:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}",
                                 param_hint=option)
    return value


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

    from ..anatomy import anatomy_available, anatomy_sources, anatomy_subjects

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


@app.command("simulate")
def simulate_cmd(
    output: Annotated[Path | None, typer.Argument(
        help="Raw file to write (ISMRMRD HDF5). Leave out with --dataset.")] = None,
    kind: Annotated[str, typer.Option("--kind", help="2d | 3d | 2dt (2D + time).")] = "2d",
    coils: Annotated[int, typer.Option("--coils", help="Receive coils (1-64).")] = 8,
    acceleration: Annotated[float | None, typer.Option(
        "--acceleration", "-R", help="Net acceleration R, ACS included "
        "(default 4; 1 = fully sampled, the default with --dataset).")] = None,
    acs: Annotated[int | None, typer.Option(
        "--acs", help="Width of the fully sampled centre in lines (default: 8 % of the "
        "phase lines, at least 8, at most half the sampled lines).")] = None,
    mask: Annotated[str | None, typer.Option(
        "--mask", help="equispaced | random | poisson (3d) | interleaved (2dt); "
        "default: equispaced (2d), poisson (3d), interleaved (2dt).")] = None,
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
        "--truth", help="Also write the noise-free truth image here (.nii or .nii.gz).")] = None,
    complex_truth: Annotated[bool, typer.Option(
        "--complex-truth", help="Write the truth as complex64 instead of magnitude.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (same seed, same file).")] = 0,
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", help="Write a dataset of --count files into this folder instead.")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", help="Number of files in --dataset mode.")] = None,
    split: Annotated[str, typer.Option(
        "--split", help="train | val | test: which anatomy the dataset draws from.")] = "train",
    with_truth: Annotated[bool, typer.Option(
        "--with-truth", help="In --dataset mode, write NAME_truth.nii.gz beside each file.")] = False,
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
    """
    if list_anatomy:
        with user_errors(debug):
            _list_anatomy()
        return
    # Usage errors first (exit code 2), before any work.
    _choice(kind, _KINDS, "--kind")
    _choice(orientation, _ORIENTATIONS, "--orientation")
    _choice(split, _SPLITS, "--split")
    if mask is not None:
        _choice(mask, _MASKS, "--mask")
    if (output is None) == (dataset is None):
        raise typer.BadParameter("give either OUT.h5 or --dataset DIR (not both)",
                                 param_hint="OUTPUT")
    if dataset is None and (count is not None or with_truth):
        raise typer.BadParameter("--count and --with-truth belong to --dataset mode",
                                 param_hint="--count")
    if dataset is not None and truth is not None:
        raise typer.BadParameter("in --dataset mode use --with-truth", param_hint="--truth")
    if dataset is not None and count is None:
        raise typer.BadParameter("--dataset needs --count N", param_hint="--count")
    n_axes = 3 if kind == "3d" else 2
    grid = None if matrix is None else _sizes(matrix, n_axes, "--matrix", integer=True)
    fov_mm = None if fov is None else _sizes(fov, n_axes, "--fov", integer=False)
    if truth is not None and not str(truth).endswith((".nii", ".nii.gz")):
        raise typer.BadParameter("the truth image must end in .nii or .nii.gz",
                                 param_hint="--truth")

    with user_errors(debug):
        from ..simulate import SimulationConfig, simulate_dataset, simulate_to_file

        r = acceleration if acceleration is not None else (1.0 if dataset is not None else 4.0)
        config = SimulationConfig(
            kind=kind,  # type: ignore[arg-type]
            matrix=None if grid is None else tuple(int(v) for v in grid),
            fov_mm=fov_mm, coils=coils, acceleration=r, acs=acs, mask=mask, noise=noise,
            oversampling=oversampling, seed=seed, anatomy=anatomy, slice_position=position,
            slices=slices, slice_thickness_mm=thickness, frames=frames,
            orientation=orientation, tilt_deg=tilt,  # type: ignore[arg-type]
        )

        if dataset is not None:
            from ..simulate import dataset_plan

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
