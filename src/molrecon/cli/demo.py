"""`molrecon demo [OUTDIR]`: reconstruct the bundled example scan, the quickest end-to-end check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import DebugOpt, app, console, stdout, user_errors, warn


def example_paths() -> tuple[Path, Path]:
    """The bundled raw example (2D brain, 8 coils, R = 4) and its noise-free truth image."""
    from importlib import resources

    root = Path(str(resources.files("molrecon") / "data" / "examples"))
    return root / "brain_2d_r4.h5", root / "brain_2d_r4_truth.nii.gz"


_MARKER = ".molrecon-demo"


@app.command("demo")
def demo_cmd(
    outdir: Annotated[Path, typer.Argument(help="Folder for the outputs (created if missing).")] = Path("molrecon-demo"),
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    force: Annotated[bool, typer.Option(
        "--force", "-f", help="Overwrite files of these names that an earlier demo did not write.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Reconstruct the bundled example scan with MOL, zf and CG-SENSE and score them against its truth.

    The example is a simulated 8-coil 2D brain slice (Colin 27 anatomy, a slab never used for training) at R = 4. Writes mol.nii.gz, report.json and preview.png into OUTDIR; a rerun replaces what an earlier demo wrote there (the folder carries a .molrecon-demo marker), and anything else only with --force.
    """
    with user_errors(debug):
        import numpy as np

        from ..atomic import check_output
        from ..device import resolve_device
        from ..io.nifti import read_nifti
        from ..io.types import ImageVolume
        from ..jobs import write_outputs
        from ..metrics import compare
        from ..recon import ReconConfig, reconstruct

        resolve_device(device)                    # a missing GPU is reported before any output
        raw, truth_path = example_paths()
        marker = outdir / _MARKER
        replace = force or marker.is_file()       # a rerun replaces the demo's own outputs
        names = ("mol.nii.gz", "sense.nii.gz", "preview.png", "report.json")
        if outdir.exists():
            for name in names:
                check_output(outdir / name, force=replace)
        force = replace
        outdir.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by `molrecon demo`; a rerun replaces the outputs here\n")
        method = "mol"
        try:
            from ..models.bundled import bundled_checkpoint

            bundled_checkpoint("2d")
        except Exception as exc:  # noqa: BLE001 - no bundled weights: say so, show CG-SENSE
            warn(f"{exc}; showing CG-SENSE instead")
            method = "sense"
        result = reconstruct(raw, ReconConfig(method=method, device=device, keep_baselines=True))  # type: ignore[arg-type]
        truth, _ = read_nifti(truth_path)
        # The example is one 2D slice: NIfTI (i = X, j = Y, k = slice) → (B, D, Y, X).
        t = np.asarray(truth)
        t = t[..., None] if t.ndim == 2 else t
        truth_img = t.transpose(2, 1, 0)[:, None]                          # (B, 1, Y, X)
        rows = {}
        for name, vol in [*result.baselines.items(), (method, result.image)]:
            rows[name] = compare(vol.data, truth_img).as_dict()
        out_nii = outdir / f"{method}.nii.gz"
        truth_vol = ImageVolume(truth_img, result.image.kind, result.image.geometry, "truth")
        write_outputs(result, out_nii, force=force, preview=outdir / "preview.png",
                      report=outdir / "report.json", panels=[("truth", truth_vol)],
                      report_extra={"metrics_vs_truth": rows})
        report = result.report
        from rich.table import Table

        table = Table(title=f"bundled example ({raw.name}) vs its ground truth")
        for col in ("method", "PSNR (dB)", "SSIM", "NRMSE"):
            table.add_column(col, justify="right" if col != "method" else "left")
        for name, m in rows.items():
            table.add_row(name, f"{m['psnr']:.2f}", f"{m['ssim']:.4f}", f"{m['nrmse']:.4f}")
        stdout.print(table)
        line = f"[green]wrote[/green] {out_nii}, {outdir / 'preview.png'}, {outdir / 'report.json'}"
        if "iterations" in report:
            line += f"  (MOL: {report['iterations']} iterations, converged: {report['converged']})"
        console.print(line)
