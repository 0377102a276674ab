"""`molrecon reconstruct IN OUT.nii[.gz]`: raw multicoil k-space → NIfTI image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DebugOpt, app, console, user_errors, warn

_METHOD_HELP = ("mol: Monotone Operator Learning (bundled weights unless --weights); "
                "sense: CG-SENSE; zf: zero-filled root-sum-of-squares.")


@app.command("reconstruct")
def reconstruct_cmd(
    input: Annotated[Path, typer.Argument(help="Raw k-space: ISMRMRD or fastMRI multicoil HDF5.")],
    output: Annotated[Path, typer.Argument(help="Output image, .nii or .nii.gz.")],
    method: Annotated[str, typer.Option("--method", "-m", help=_METHOD_HELP)] = "mol",
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", "-w", help="MOL checkpoint (.pt) or a bundled model's name (see `molrecon models`); default: the bundled model for the data kind.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    max_iter: Annotated[int, typer.Option("--max-iter", help="MOL fixed-point iteration cap.")] = 100,
    tol: Annotated[float, typer.Option("--tol", help="Stop when ‖T(x)−x‖/‖x‖ ≤ TOL.")] = 1e-4,
    alpha: Annotated[Optional[float], typer.Option(
        "--alpha", help="MOL step size α in (0, 1] (speed only; the fixed point does not depend on it).")] = None,
    solver: Annotated[str, typer.Option("--solver", help="anderson | plain")] = "anderson",
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Slices per batch on the device (default: all).")] = None,
    complex_out: Annotated[bool, typer.Option("--complex", help="Write complex64 instead of magnitude.")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write a JSON report here.")] = None,
    preview: Annotated[Optional[Path], typer.Option("--preview", help="Write a PNG preview here.")] = None,
    compare: Annotated[bool, typer.Option(
        "--compare", help="Also show zf and sense beside the result in the preview.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite existing outputs.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Reconstruct raw multicoil Cartesian k-space into a NIfTI image with correct geometry."""
    _check_usage(method=method, device=device, solver=solver, max_iter=max_iter, tol=tol,
                 alpha=alpha, batch_size=batch_size)
    if weights is not None and method != "mol":
        raise typer.BadParameter(f"--weights is used by --method mol only (this run is "
                                 f"--method {method})", param_hint="--weights")
    with user_errors(debug):
        import warnings

        from ..errors import (ConfigError, ConvergenceWarning, GeometryWarning, InputDataError,
                              InputDataWarning)
        from ..io.atomic import check_output, write_text_atomic

        if not str(output).endswith((".nii", ".nii.gz")):
            raise ConfigError(f"{output}: output must end in .nii or .nii.gz")
        if not input.exists():
            raise InputDataError("no such file", path=input)
        # No output may replace the input or another output (a --report aimed at the raw
        # file with --force would destroy the scan).
        named = [("input", input), ("output", output), ("--report", report), ("--preview", preview)]
        seen: dict[Path, str] = {}
        for role, path in named:
            if path is None:
                continue
            key = path.resolve()
            if key in seen:
                raise ConfigError(f"{path}: {role} is the same file as the {seen[key]}; use a different path")
            seen[key] = role
        # Fail before any work if an output cannot be written.
        for out in (output, report, preview):
            if out is not None:
                check_output(out, force=force)

        from ..io.detect import read_raw
        from ..io.nifti import write_nifti
        from ..recon import ReconConfig, reconstruct

        if weights is not None:
            # A wrong model is found before the (possibly long) read of the scan.
            from ..models.checkpoint import load_checkpoint
            from ..weights import resolve_weights

            load_checkpoint(resolve_weights(weights), map_location="cpu")

        config = ReconConfig(
            method=method, weights=None if weights is None else str(weights), device=device,  # type: ignore[arg-type]
            max_iter=max_iter, tol=tol, alpha=alpha, solver=solver,  # type: ignore[arg-type]
            batch_size=batch_size, keep_baselines=compare,
        )
        with warnings.catch_warnings(record=True) as caught:
            for category in (GeometryWarning, ConvergenceWarning, InputDataWarning):
                warnings.simplefilter("always", category)
            scan = read_raw(input)
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total} batches"), TimeElapsedColumn(),
                          console=console, transient=True,
                          disable=not console.is_terminal) as bar:
                task = bar.add_task(f"{method} {input.name}", total=None)

                def on_progress(stage: str, done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                result = reconstruct(scan, config, progress=on_progress)
        for w in caught:
            if issubclass(w.category, (GeometryWarning, ConvergenceWarning, InputDataWarning)):
                text = str(w.message)
                warn(text if text.startswith(str(input)) else f"{input}: {text}")
                result.report.setdefault("warnings", []).append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

        write_nifti(result.image, output, complex_output=complex_out, force=force)
        if preview is not None:
            from ..preview import middle_plane, write_preview

            panels = [(name, middle_plane(vol.data)) for name, vol in result.baselines.items()]
            panels.append((method, middle_plane(result.image.data)))
            write_preview(preview, panels, force=force)
        if report is not None:
            result.report["output"] = str(output)
            write_text_atomic(report, json.dumps(result.report, indent=2, default=str) + "\n",
                              force=force)
        rep = result.report
        line = f"[green]wrote[/green] {output}  ({rep['kind']}, {method}, {rep['wall_time_s']:.2f} s on {rep['device']}"
        if "iterations" in rep:
            line += f", {rep['iterations']} MOL iterations"
        console.print(line + ")")


def _check_usage(*, method: str, device: str, solver: str, max_iter: int, tol: float,
                 alpha: float | None, batch_size: int | None) -> None:
    """Option values that can never work are usage errors (exit 2), checked before any work."""
    if method not in ("mol", "sense", "zf"):
        raise typer.BadParameter(f"{method!r} is not one of mol, sense, zf", param_hint="--method")
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda", param_hint="--device")
    if solver not in ("anderson", "plain"):
        raise typer.BadParameter(f"{solver!r} is not one of anderson, plain", param_hint="--solver")
    if max_iter < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--max-iter")
    if not 0.0 < tol < 1.0:
        raise typer.BadParameter("must lie in (0, 1)", param_hint="--tol")
    if alpha is not None and not 0.0 < alpha <= 1.0:
        raise typer.BadParameter("must lie in (0, 1]", param_hint="--alpha")
    if batch_size is not None and batch_size < 1:
        raise typer.BadParameter("must be at least 1", param_hint="--batch-size")
