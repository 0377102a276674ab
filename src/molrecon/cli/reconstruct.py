"""`molrecon reconstruct IN OUT`: raw multicoil k-space → NIfTI image or DICOM series.

IN is one raw file, a folder of them, or a glob pattern; with several inputs OUT
is a folder that receives one image per scan and ``summary.json`` (see
:mod:`molrecon.jobs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..config import ENSEMBLE_SIZES, SENSE_ITERS, SENSE_LAMBDA
from ..memory import ANDERSON_MEMORY
from ._common import DebugOpt, app, console, stage_logger, stdout, user_errors, warn

_METHOD_HELP = ("mol: Monotone Operator Learning (bundled weights unless --weights); "
                "sense: CG-SENSE; zf: zero-filled root-sum-of-squares.")
_INPUT_HELP = ("Raw k-space: an ISMRMRD, MRD v2, fastMRI or Siemens twix file; or a folder of them, or "
               "a quoted glob pattern such as 'scans/*.h5' (then OUTPUT is a folder).")
_OUTPUT_HELP = ("Output image: .nii or .nii.gz, or a folder for a DICOM series (--format "
                "dicom, or a name ending in .dcm). With several inputs: the output folder.")


# Over 80 lines: the signature declares every command-line option (typer reads it).
@app.command("reconstruct")
def reconstruct_cmd(
    input: Annotated[str, typer.Argument(help=_INPUT_HELP, metavar="INPUT")],
    output: Annotated[Path, typer.Argument(help=_OUTPUT_HELP, metavar="OUTPUT")],
    method: Annotated[Literal["mol", "sense", "zf"], typer.Option(
        "--method", "-m", help=_METHOD_HELP)] = "mol",
    weights: Annotated[Path | None, typer.Option(
        "--weights", "-w", help="MOL checkpoint (.pt) or a bundled model's name (see `molrecon models`); default: the bundled model for the data kind.")] = None,
    fmt: Annotated[Literal["nifti", "dicom"] | None, typer.Option(
        "--format", help="nifti | dicom (default: from OUTPUT's name; a batch writes .nii.gz).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N")] = "auto",
    coils: Annotated[str | None, typer.Option(
        "--coils", help="Compress the receive channels to N virtual coils first, or 'auto' (the fewest keeping 99.5 % of the calibration energy, at least 8).")] = None,
    coil_compression: Annotated[Literal["auto", "scc", "gcc"], typer.Option(
        "--coil-compression", help="auto | scc | gcc: one matrix per slice (scc), or one per readout position, aligned (gcc; what auto uses).")] = "auto",
    maps: Annotated[Path | None, typer.Option(
        "--maps", help="Coil sensitivities to use instead of ESPIRiT: .npy or .h5 (B, C, D, Y, X), or BART .cfl.")] = None,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="ISMRMRD group to read in a file that holds several (see `molrecon info`).")] = None,
    max_iter: Annotated[int, typer.Option("--max-iter", help="MOL fixed-point iteration cap.",
                                          min=1, metavar="N")] = 100,
    tol: Annotated[float, typer.Option("--tol", help="Stop when ‖T(x)−x‖/‖x‖ ≤ TOL, in (0, 1) (the residual of the α = 1 step, bounded from the α step's).")] = 1e-4,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help="MOL step size α in (0, 1] (speed only; the fixed point does not depend on it).")] = None,
    cg_iters: Annotated[int | None, typer.Option(
        "--cg-iters", help="CG iterations of each MOL data-consistency step (default: the model's).", min=1, metavar="N")] = None,
    ensemble: Annotated[int | None, typer.Option(
        "--ensemble", help="Average the prior over N flips of the image: 1 (off, the fastest), 2 (left-right) or 4 (left-right and up-down; N times the prior's cost). Default: the model's (the card says).", metavar="N")] = None,
    lam: Annotated[str, typer.Option(
        "--lam", help="MOL data weight λ: auto (set per slice from the data's noise level and acceleration by the model's rule; the model card says how it was measured), fixed (the model's λ for every scan) or a number in [1e-6, 1e6].", metavar="auto|fixed|LAMBDA")] = "auto",
    solver: Annotated[Literal["anderson", "plain"], typer.Option(
        "--solver", help="anderson | plain")] = "anderson",
    anderson_memory: Annotated[int, typer.Option(
        "--anderson-memory", help="Past iterates the Anderson solver mixes (speed and memory only; the fixed point does not depend on it).", min=1, metavar="M")] = ANDERSON_MEMORY,
    sense_lambda: Annotated[float, typer.Option(
        "--sense-lambda", help="Tikhonov weight of CG-SENSE (the start of MOL), relative to the normalised data.", min=0.0, metavar="LAMBDA")] = SENSE_LAMBDA,
    sense_iters: Annotated[int, typer.Option("--sense-iters", help="CG-SENSE iterations.",
                                             min=1, metavar="N")] = SENSE_ITERS,
    espirit_crop: Annotated[float, typer.Option(
        "--espirit-crop", help="Zero the ESPIRiT coil maps where their eigenvalue is below this (BART ecalib -c; 0.8 as ecalib -m1): removes the noise outside the object, and can cut into an object that fills the field of view; 0 keeps the maps everywhere.", min=0.0, max=0.99, metavar="C")] = 0.8,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Slices per batch on the device (default: as many as fit).",
        min=1, metavar="N")] = None,
    compile_step: Annotated[bool, typer.Option(
        "--compile/--no-compile", help="MOL: run the step compiled by torch.compile (frozen prior, data-consistency CG with FFTs along the undersampled axes only; CUDA graphs on a GPU). The first solve pays the compilation. Default: off (eager).")] = False,
    precision: Annotated[Literal["fp32", "bf16", "auto"], typer.Option(
        "--precision", help="MOL prior precision: fp32 | bf16 (bfloat16 autocast of the CNN; changes the result slightly) | auto (bf16 only on CUDA when the model records a passed bf16 accuracy gate, else fp32). Default: fp32.")] = "fp32",
    complex_out: Annotated[bool, typer.Option("--complex", help="Write complex64 instead of magnitude (NIfTI only).")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Write a JSON report here (one file; a batch writes OUTPUT/summary.json).")] = None,
    preview: Annotated[Path | None, typer.Option(
        "--preview", help="Write a PNG preview here (a batch: a folder that receives one PNG per scan).")] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also show zf and sense beside the result in the preview.")] = False,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Batch: leave scans whose output exists alone (resume a batch).")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option(
        "--quiet", "-q", help="No per-stage log lines when stderr is not a terminal.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Reconstruct raw multicoil Cartesian k-space into an image with correct geometry."""
    n_coils = _check_usage(device=device, coils=coils, tol=tol, alpha=alpha, ensemble=ensemble)
    lam_value = _check_lam(lam)
    for flag, used in (("--compile", compile_step), ("--precision", precision != "fp32"),
                       ("--ensemble", ensemble is not None), ("--lam", lam != "auto")):
        if used and method != "mol":
            raise typer.BadParameter(f"{flag} is used by --method mol only (this run is "
                                     f"--method {method})", param_hint=flag)
    if weights is not None and method != "mol":
        raise typer.BadParameter(f"--weights is used by --method mol only (this run is "
                                 f"--method {method})", param_hint="--weights")
    with user_errors(debug):
        from ..jobs import is_batch_input, output_format
        from ..recon import ReconConfig

        batch = is_batch_input(input)
        out_fmt = output_format(output, fmt) if not batch else (fmt or "nifti")  # type: ignore[assignment]
        if complex_out and out_fmt == "dicom":
            from ..errors import ConfigError

            raise ConfigError("--complex is for NIfTI output (a DICOM series stores magnitude)")
        if maps is not None and not (maps.exists() or maps.with_suffix(".cfl").exists()):
            from ..errors import InputDataError

            raise InputDataError("no such file", path=maps)
        _check_device(device)
        if weights is not None:
            # A wrong model is found before the (possibly long) read of the scan.
            from ..models.bundled import resolve_weights
            from ..models.checkpoint import load_checkpoint

            load_checkpoint(resolve_weights(weights), map_location="cpu")
        config = ReconConfig(
            method=method, weights=None if weights is None else str(weights), device=device,  # type: ignore[arg-type]
            max_iter=max_iter, tol=tol, alpha=alpha, solver=solver,  # type: ignore[arg-type]
            anderson_memory=anderson_memory,
            batch_size=batch_size, keep_baselines=compare, cg_iters=cg_iters, ensemble=ensemble,
            sense_lambda=sense_lambda, sense_iters=sense_iters, espirit_crop=espirit_crop,
            coils=n_coils,
            coil_compression=coil_compression, maps=None if maps is None else str(maps),
            compile=compile_step, precision=precision,  # type: ignore[arg-type]
            lam=lam_value,
        )
        if batch:
            if report is not None:
                raise typer.BadParameter("a batch writes OUTPUT/summary.json; --report names "
                                         "one file's report", param_hint="--report")
            _run_batch(input, output, config, fmt=out_fmt, complex_out=complex_out,  # type: ignore[arg-type]
                       force=force, skip_existing=skip_existing, preview_dir=preview,
                       dataset=dataset, quiet=quiet)
        else:
            if skip_existing and output.exists():
                console.print(f"skipped {input}: {output} exists (--skip-existing)")
                return
            _run_one(Path(input), output, config, fmt=out_fmt, complex_out=complex_out,  # type: ignore[arg-type]
                     force=force, preview=preview, report=report, dataset=dataset, quiet=quiet)


def _check_device(device: str) -> None:
    """A CUDA device that is not there is refused before any work."""
    if device.startswith("cuda"):
        from ..device import resolve_device

        resolve_device(device)


def _run_one(input: Path, output: Path, config: Any, *, fmt: str, complex_out: bool,
             force: bool, preview: Path | None, report: Path | None,
             dataset: str | None, quiet: bool) -> None:
    from ..errors import ConfigError, InputDataError
    from ..jobs import check_target, reconstruct_file

    if not input.exists():
        raise InputDataError("no such file", path=input)
    # No output may replace the input or another output (a --report aimed at the raw
    # file with --force would destroy the scan).
    named = [("input", input), ("output", output), ("--report", report), ("--preview", preview),
             ("--maps", Path(config.maps) if config.maps else None)]
    seen: dict[Path, str] = {}
    for role, path in named:
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise ConfigError(f"{path}: {role} is the same file as the {seen[key]}; use a different path")
        seen[key] = role
    # Fail before any work if an output cannot be written.
    check_target(output, fmt, force=force)  # type: ignore[arg-type]
    from ..atomic import check_output

    for out in (report, preview):
        if out is not None:
            check_output(out, force=force)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(f"{config.method} {input.name}", total=None)
        log_stage = stage_logger(input.name, quiet)

        def on_progress(stage: str, done: int, total: int) -> None:
            bar.update(task, description=f"{config.method} {input.name}: {stage}",
                       completed=done, total=total)
            log_stage(stage)

        result, lines = reconstruct_file(input, output, config, fmt=fmt,  # type: ignore[arg-type]
                                         complex_out=complex_out, force=force, preview=preview,
                                         report=report, dataset=dataset, progress=on_progress)
    for line in lines:
        warn(line)
    rep = result.report
    line = (f"[green]wrote[/green] {output}  ({rep['kind']}, {config.method}, "
            f"{rep['wall_time_s']:.2f} s on {rep['device']}")
    if "iterations" in rep:
        line += f", {rep['iterations']} MOL iterations"
    lams = rep.get("lambda_per_item") or []
    if lams:
        lo, hi = min(lams), max(lams)
        line += f", λ {lo:.3g}" if hi <= lo * 1.0005 else f", λ {lo:.3g}–{hi:.3g}"
    if "coil_compression" in rep:
        cc = rep["coil_compression"]
        line += f", {cc['coils_in']}→{cc['coils_out']} coils"
    console.print(line + ")")


def _run_batch(spec: str, out_dir: Path, config: Any, *, fmt: str, complex_out: bool,
               force: bool, skip_existing: bool, preview_dir: Path | None,
               dataset: str | None, quiet: bool) -> None:
    from dataclasses import asdict, replace

    from ..errors import OutputError
    from ..jobs import FileOutcome, collect_inputs, outputs_for, run_batch, write_summary

    inputs = collect_inputs(spec)
    outputs = outputs_for(inputs, out_dir, fmt)  # type: ignore[arg-type]
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError("exists and is not a folder (several inputs need an output folder)",
                          path=out_dir)
    summary = out_dir / "summary.json"
    if summary.exists() and not (force or skip_existing):
        raise OutputError("holds a summary.json of an earlier batch (use --skip-existing to "
                          "resume it, or --force to redo it)", path=out_dir)
    rank, world = _dist_rank_world()
    if world > 1:
        config = replace(config, device=_rank_device(config.device))
    out_dir.mkdir(parents=True, exist_ok=True)
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)

    total = len(inputs)
    mine = len(range(rank, total, world))
    who = f"\\[rank {rank}] " if world > 1 else ""        # escaped: not rich markup
    interactive = console.is_terminal
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} files"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not interactive) as bar:
        task = bar.add_task(f"{who}{config.method}", total=mine)
        current = {"name": ""}
        log_stage = stage_logger("", quiet)

        def on_start(i: int, src: Path) -> None:
            current["name"] = src.name
            bar.update(task, description=f"{who}{config.method} {src.name}")

        def on_progress(stage: str, done: int, n: int) -> None:
            bar.update(task, description=f"{who}{config.method} {current['name']}: {stage}")
            log_stage(stage, f"{who}{current['name']}")

        def on_done(i: int, outcome: FileOutcome) -> None:
            bar.advance(task)
            for line in outcome.warnings:
                warn(line)
            detail = _outcome_text(outcome)
            console.print(f"{who}[{i + 1}/{total}] {Path(outcome.input).name}: {detail}",
                          soft_wrap=True, highlight=False)

        outcomes = run_batch(inputs, outputs, config, fmt=fmt, complex_out=complex_out,  # type: ignore[arg-type]
                             force=force, skip_existing=skip_existing, preview_dir=preview_dir,
                             dataset=dataset, rank=rank, world=world, on_start=on_start,
                             on_done=on_done, progress=on_progress)
    outcomes = _gather(outcomes, inputs, world)
    failed = sum(1 for o in outcomes if o.status == "failed")
    if rank == 0:
        options = {k: v for k, v in asdict(config).items() if k != "keep_baselines"}
        options.update({"format": fmt, "input": spec, "ranks": world})
        path = write_summary(out_dir, outcomes, options=options)
        _print_table(outcomes)
        ok = sum(1 for o in outcomes if o.status == "ok")
        skipped = sum(1 for o in outcomes if o.status == "skipped")
        colour = "red" if failed else "green"
        console.print(f"[{colour}]{ok} reconstructed, {failed} failed, {skipped} skipped[/{colour}]"
                      f"; summary: {path}")
    if failed:
        raise typer.Exit(1)


def _outcome_text(outcome: Any) -> str:
    if outcome.status == "failed":
        return f"[red]failed[/red] {outcome.error}"
    if outcome.status == "skipped":
        return f"skipped ({outcome.error})"
    rep = outcome.report or {}
    text = f"[green]ok[/green] {outcome.output} ({outcome.seconds:.1f} s"
    if rep.get("iterations") is not None:
        text += f", {rep['iterations']} MOL iterations"
    return text + ")"


def _print_table(outcomes: list[Any]) -> None:
    from rich.table import Table

    table = Table(title="molrecon reconstruct", show_lines=False)
    for col in ("input", "status", "kind", "iterations", "seconds", "output / error"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        rep = o.report or {}
        its = rep.get("iterations")
        status = {"ok": "[green]ok[/green]", "failed": "[red]failed[/red]"}.get(o.status, o.status)
        table.add_row(Path(o.input).name, status, str(rep.get("kind") or ""),
                      "" if its is None else str(its), f"{o.seconds:.1f}",
                      o.output if o.status == "ok" else str(o.error or ""))
    stdout.print(table)


def _dist_rank_world() -> tuple[int, int]:
    """This process's rank and the world size under ``torchrun`` (0, 1 otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")     # only Python objects travel between ranks
    return dist.get_rank(), dist.get_world_size()


def _rank_device(device: str) -> str:
    """Under torchrun each rank takes its own GPU (LOCAL_RANK) when the device is auto/cuda."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu" if device == "auto" else device
    local = int(os.environ.get("LOCAL_RANK", "0")) % max(torch.cuda.device_count(), 1)
    return f"cuda:{local}"


def _gather(outcomes: list[Any], inputs: list[Path], world: int) -> list[Any]:
    """Every rank's outcomes, in input order (a no-op without torchrun)."""
    if world <= 1:
        return outcomes
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, outcomes)
    dist.barrier()
    dist.destroy_process_group()
    merged = [o for part in parts for o in (part or [])]
    order = {str(p): i for i, p in enumerate(inputs)}
    return sorted(merged, key=lambda o: order.get(o.input, len(order)))


def _check_lam(lam: str) -> float | str:
    """``--lam``: ``auto``, ``fixed`` or a number in ``recon.LAM_RANGE`` (else a usage error)."""
    from ..recon import LAM_RANGE

    if lam in ("auto", "fixed"):
        return lam
    try:
        value = float(lam)
    except ValueError:
        raise typer.BadParameter(f"{lam!r} is not auto, fixed or a number",
                                 param_hint="--lam") from None
    if not LAM_RANGE[0] <= value <= LAM_RANGE[1]:
        raise typer.BadParameter(f"must lie in [{LAM_RANGE[0]:g}, {LAM_RANGE[1]:g}]",
                                 param_hint="--lam")
    return value


def _check_usage(*, device: str, coils: str | None, tol: float,
                 alpha: float | None, ensemble: int | None = None) -> int | str | None:
    """The option values that typer's choices and closed ranges cannot express are usage
    errors (exit 2), checked before any work. Returns ``--coils`` as an int, ``"auto"`` or None."""
    if not 0.0 < tol < 1.0:
        raise typer.BadParameter("must lie in (0, 1)", param_hint="--tol")
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise typer.BadParameter("must lie in (0, 1]", param_hint="--alpha")
    if ensemble is not None and ensemble not in ENSEMBLE_SIZES:
        raise typer.BadParameter(f"must be one of {', '.join(map(str, ENSEMBLE_SIZES))}",
                                 param_hint="--ensemble")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda", param_hint="--device")
    if coils is None or coils == "auto":
        return coils
    try:
        n = int(coils)
    except ValueError:
        raise typer.BadParameter(f"{coils!r} is not a number of coils or 'auto'",
                                 param_hint="--coils") from None
    if n < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--coils")
    return n
