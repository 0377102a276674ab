"""`molrecon models`: the bundled MOL models, which data each serves and its certificate."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from ._common import DebugOpt, app, stdout, user_errors


def _describe(entry: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry plus what its checkpoint says of itself (read without running code)."""
    from ..models.checkpoint import load_checkpoint

    loaded = load_checkpoint(entry["path"])
    meta = loaded.metadata
    cert = loaded.certificate
    last = meta.get("last_metrics") or {}
    check = cert.get("at_bundled_example") or {}
    return {**entry, "dims": loaded.model.config.dims, "ensemble": loaded.model.config.ensemble,
            "steps": meta.get("steps"),
            "lam": float(f"{loaded.mol_config.lam:.6g}"),
            "lam_from_noise": loaded.lam_noise is not None,
            "certified_bound": cert.get("certified_bound"),
            "verdict": check.get("verdict"), "local_lipschitz": (check.get("local") or {}).get("max"),
            "local_monotone": (check.get("local") or {}).get("monotone_max"),
            "val_psnr": last.get("val_psnr"), "val_sense_psnr": last.get("val_sense_psnr"),
            "card": entry["path"].removesuffix(".pt") + ".md"}


@app.command("models")
def models_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """List the bundled MOL models: kinds served, constraint, default use, certificate.

    Pick one by name with `molrecon reconstruct --weights NAME`.
    """
    with user_errors(debug):
        from ..models.bundled import bundled_models

        rows = [_describe(e) for e in bundled_models()]
        if as_json:
            stdout.print_json(json.dumps(rows, default=str))
            return
        from rich.table import Table

        table = Table("name", "kinds", "constraint", "default for", "steps", "Lipschitz",
                      "val PSNR (CG-SENSE)", box=None)
        for r in rows:
            bound = r["certified_bound"]
            if r["verdict"] == "certified" and bound is not None:
                lip = f"certified {bound:.4f}"
            elif r["local_lipschitz"] is not None:
                lip = f"{r['verdict']}, local {r['local_lipschitz']:.3f}"
                if r["local_monotone"] is not None:
                    lip += f", μ {r['local_monotone']:.3f}"
            else:
                lip = str(r["verdict"] or "-")
            val = "" if r["val_psnr"] is None else f"{r['val_psnr']:.2f}"
            if r["val_psnr"] is not None and r["val_sense_psnr"] is not None:
                val += f" ({r['val_sense_psnr']:.2f})"
            table.add_row(r["name"], ",".join(r["kinds"]), r["constraint"],
                          ",".join(r["default_for"]) or "-", str(r["steps"]),
                          lip, val)
        stdout.print(table)
        lams = ", ".join(f"{r['name']} {r['lam']:.3g}" + (" (set per scan by its noise rule)"
                                                         if r["lam_from_noise"] else "")
                         for r in rows)
        stdout.print(f"λ: {lams}; `reconstruct --lam fixed` keeps each model's own")
        stdout.print(f"model cards: {rows[0]['card'].rsplit('/', 1)[0] if rows else '-'}/NAME.md")
