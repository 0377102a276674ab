"""`molrecon metrics RECON REF`: PSNR, SSIM and NRMSE between two NIfTI images."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from ._common import DebugOpt, app, stdout, user_errors, warn

#: --no-fit warns when the least-squares fit would scale RECON by more than this (or less
#: than its inverse): the two images are then most likely in different units.
_UNITS_RATIO = 2.0


@app.command("metrics")
def metrics_cmd(
    recon: Annotated[Path, typer.Argument(metavar="RECON",
                                          help="Reconstructed image (NIfTI).")],
    reference: Annotated[Path, typer.Argument(
        metavar="REF", help="Reference image on the same grid (NIfTI).")],
    no_fit: Annotated[bool, typer.Option(
        "--no-fit", help="Do not fit the intensity scale (by default RECON is scaled by least "
        "squares onto REF): only for two images in the same units.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """PSNR, SSIM and NRMSE of RECON against REF (magnitudes, after a least-squares intensity fit).

    Units: a reconstruction by molrecon is in the units of the prewhitened data
    (the noise's standard deviation), while the truth that `molrecon simulate
    --truth` writes is in the object's units (about 1 in bright tissue): the two
    differ by roughly 1/--noise (≈ 170× at simulate's default 0.01). The default
    fit absorbs that; with --no-fit it would count as error (a warning says so
    when the fitted scale is far from 1).
    """
    with user_errors(debug):
        from ..metrics import metrics

        m = metrics(str(recon), str(reference), fit=not no_fit)
        if no_fit:
            scale = metrics(str(recon), str(reference), fit=True).scale
            if scale > 0 and not 1 / _UNITS_RATIO <= scale <= _UNITS_RATIO:
                warn(f"the least-squares fit would scale {recon.name} by {scale:.3g}: the two "
                     "images are probably in different units (a `simulate --truth` image is "
                     "in the object's units, a reconstruction in the noise's); leave out "
                     "--no-fit to compare their shapes")
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
