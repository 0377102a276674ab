"""`molrecon metrics RECON REF`: PSNR, SSIM and NRMSE between two NIfTI images."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ._common import DebugOpt, app, stdout, user_errors


@app.command("metrics")
def metrics_cmd(
    recon: Annotated[Path, typer.Argument(help="Reconstructed image (NIfTI).")],
    reference: Annotated[Path, typer.Argument(help="Reference image on the same grid (NIfTI).")],
    no_fit: Annotated[bool, typer.Option("--no-fit", help="Do not fit the intensity scale "
                                         "(by default RECON is scaled by least squares onto REF).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """PSNR, SSIM and NRMSE of RECON against REF (magnitudes, after a least-squares intensity fit)."""
    with user_errors(debug):
        from ..metrics import metrics

        m = metrics(str(recon), str(reference), fit=not no_fit)
        if as_json:
            # JSON has no Infinity: identical images get "psnr": null and "identical": true.
            out: dict[str, object] = dict(m.as_dict())
            out["identical"] = not math.isfinite(m.psnr)
            if out["identical"]:
                out["psnr"] = None
            stdout.print_json(json.dumps(out, allow_nan=False))
            return
        from rich.table import Table

        table = Table(title=f"{recon.name} vs {reference.name}", show_header=True)
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("PSNR", f"{m.psnr:.2f} dB" if math.isfinite(m.psnr) else "∞ (identical)")
        table.add_row("SSIM", f"{m.ssim:.4f}")
        table.add_row("NRMSE", f"{m.nrmse:.4f}")
        table.add_row("intensity fit", f"{m.scale:.4g}" if not no_fit else "off")
        stdout.print(table)
