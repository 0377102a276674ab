"""`molrecon info FILE`: what a raw-data file holds, on one screen (or as JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..kinds import LABELS
from ._common import DebugOpt, app, stdout, user_errors, warn

if TYPE_CHECKING:
    from ..io.types import RawScan


def scan_summary(scan: RawScan) -> dict[str, Any]:
    """Facts about a scan as plain JSON-able values (what ``info --json`` prints)."""
    import numpy as np

    b_n, c_n, d_n, y_n, x_n = scan.shape
    g = scan.geometry
    info = scan.info
    calib = scan.calib[:, 0, :, :, 0]  # (B, D, Y)
    if scan.kind == "3d":
        zs = np.flatnonzero(calib[0].any(axis=1))
        ys = np.flatnonzero(calib[0].any(axis=0))
        acs: list[int] = [int(zs.size), int(ys.size)]  # (kz, ky) extent
    else:
        acs = [int(calib.sum(axis=-1).max())]  # lines
    return {
        "file": scan.source,
        "format": info.format,
        "kind": scan.kind,
        "shape": [b_n, c_n, d_n, y_n, x_n],
        "coils": c_n,
        "slices": b_n,
        "partitions": d_n if scan.kind == "3d" else 1,
        "frames": d_n if scan.kind == "2dt" else 1,
        "encoded_matrix": list(info.encoded_matrix) if info.encoded_matrix else None,
        "encoded_fov_mm": list(info.encoded_fov_mm) if info.encoded_fov_mm else None,
        "recon_matrix": list(g.matrix),
        "fov_mm": list(g.fov_mm),
        "voxel_mm": [float(v) for v in g.voxel_mm],
        "slice_spacing_mm": g.slice_spacing_mm,
        "frame_time_ms": g.frame_time_ms,
        "acceleration": scan.acceleration,
        "acquired_lines": int(scan.mask.sum()),
        "encoding_positions": int(scan.mask.size),
        "acs_size": acs,
        "noise_scan": scan.noise_cov is not None,
        "noise_acquisitions": info.n_noise_acquisitions,
        "whitened": scan.whitened,
        "readout_oversampling": info.readout_oversampling,
        "partial_fourier": list(info.partial_fourier),
        "averages": info.averages,
        "acquisitions": info.n_acquisitions,
        "vendor": info.vendor,
        "model": info.model,
        "field_strength_t": info.field_strength_t,
        "protocol": info.protocol,
        "tr_ms": info.tr_ms,
        "te_ms": info.te_ms,
        "orientation_known": g.orientation_known,
        "read_dir": [float(v) for v in g.read_dir],
        "phase_dir": [float(v) for v in g.phase_dir],
        "slice_dir": [float(v) for v in g.slice_dir],
        "position_mm": [[float(v) for v in row] for row in np.asarray(g.position)],
        "warnings": list(info.warnings),
    }


def _fmt(values: Any, digits: int = 1, sep: str = " × ") -> str:
    if values is None:
        return "—"
    return sep.join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in values)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _vector(v: list[float]) -> str:
    return "(" + ", ".join(f"{x:+.3f}" for x in v) + ")"


@app.command("info")
def info_cmd(
    file: Annotated[Path, typer.Argument(
        help="Raw data: ISMRMRD or fastMRI HDF5, MRD v2, or Siemens twix (.dat).")],
    dataset: Annotated[str | None, typer.Option(
        "--dataset", help="ISMRMRD group to describe in a file that holds several.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Describe a raw-data file: matrix, FOV, coils, sampling, noise scan, scanner."""
    with user_errors(debug):
        import warnings

        from ..io.detect import ismrmrd_groups, read_raw

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scan = read_raw(file, dataset=dataset)
            groups = ismrmrd_groups(file) if scan.info.format == "ismrmrd" else []
        summary = scan_summary(scan)
        if len(groups) > 1:
            summary["datasets"] = groups
            summary["dataset"] = dataset or groups[0]
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            stdout.print(_table(summary, file.name))
        for w in caught:
            warn(str(w.message))


def _table(s: dict[str, Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    kind = LABELS[s["kind"]]
    extent = f"{s['slices']} slice(s)"
    if s["kind"] == "3d":
        extent += f", {s['partitions']} partitions"
    if s["kind"] == "2dt":
        frame = f", {s['frame_time_ms']:.1f} ms apart" if s["frame_time_ms"] else ""
        extent += f", {s['frames']} frames{frame}"
    acs = " × ".join(str(a) for a in s["acs_size"]) + (" (kz × ky)" if s["kind"] == "3d"
                                                       else " lines")
    noise = "none"
    if s["noise_scan"]:
        noise = f"{s['noise_acquisitions']} acquisition(s), " + (
            "data prewhitened" if s["whitened"] else "not prewhitened")
    pf = s["partial_fourier"]
    orientation = "unknown (identity assumed)"
    if s["orientation_known"]:
        orientation = (f"read {_vector(s['read_dir'])}, phase {_vector(s['phase_dir'])}, "
                       f"slice {_vector(s['slice_dir'])} (LPS)")
    scanner = " ".join(str(v) for v in (s["vendor"], s["model"]) if v) or "—"
    if s["field_strength_t"]:
        scanner += f", {s['field_strength_t']:.2f} T"
    rows = [
        ("format", s["format"]),
        *([("datasets", ", ".join(f"[bold]{g}[/bold] (shown)" if g == s["dataset"] else g
                                  for g in s["datasets"]))] if "datasets" in s else []),
        ("kind", f"{kind}, {extent}"),
        ("coils", str(s["coils"])),
        ("encoded matrix", _fmt(s["encoded_matrix"], 0)),
        ("recon matrix", _fmt(s["recon_matrix"], 0)),
        ("FOV (mm)", _fmt(s["fov_mm"])),
        ("voxel (mm)", _fmt(s["voxel_mm"], 2)),
        ("acceleration", (f"{s['acceleration']:.2f} ({s['acquired_lines']} of "
                          f"{s['encoding_positions']} lines acquired)")),
        ("calibration (ACS)", acs),
        ("noise scan", noise),
        ("readout oversampling", f"{s['readout_oversampling']:g}×"),
        ("partial Fourier", "no" if pf == [1.0, 1.0] else f"ky {pf[0]:.2f}, kz {pf[1]:.2f}"),
        ("averages", str(s["averages"])),
        ("scanner", scanner),
        ("protocol", s["protocol"] or "—"),
        ("TR / TE (ms)", f"{_ms(s['tr_ms'])} / {_ms(s['te_ms'])}"),
        ("orientation", orientation),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
