"""Reconstruction jobs as the command line runs them: one file, or a whole folder of scans.

One file: read → reconstruct (:func:`molrecon.recon.reconstruct`) → write the image
(NIfTI, or a DICOM series folder), and optionally a PNG preview and a JSON report.
Every output is written atomically; the warnings raised while reading and
reconstructing are collected and returned with the report.

A batch (a folder, or a glob pattern): every raw file is one job with the same
options. Outputs go into one folder, named after the input (``scan.h5`` →
``scan.nii.gz``, or the series folder ``scan/`` for DICOM; inputs from different
folders with the same name get their relative path joined by ``_``). A failure
is recorded and the batch goes on; ``summary.json`` lists every file with its
status, output, error and report. ``skip_existing`` leaves files whose output
already exists alone, so that an interrupted batch resumes. All jobs share one
loaded model per data kind. Under ``torchrun`` (``WORLD_SIZE`` > 1) the files
are dealt to the ranks in turn (rank r takes files r, r + N, …), each rank on
its own device, and rank 0 writes the merged summary.

Which files a folder holds: its regular, non-hidden files whose names end in
:data:`RAW_SUFFIXES` (its sub-folders are not searched); a glob takes the files
it matches whatever their names, so that a user who names a file gets an
answer about it.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import (
    ConfigError,
    ConvergenceWarning,
    GeometryWarning,
    InputDataError,
    InputDataWarning,
    MolreconError,
)

__all__ = [
    "RAW_SUFFIXES",
    "FileOutcome",
    "collect_inputs",
    "is_batch_input",
    "output_format",
    "outputs_for",
    "reconstruct_file",
    "run_batch",
    "write_summary",
]

OutputFormat = Literal["nifti", "dicom"]

#: File names a folder's raw scans end in (ISMRMRD/MRD and fastMRI HDF5, Siemens twix).
RAW_SUFFIXES = (".h5", ".hdf5", ".mrd", ".ismrmrd", ".dat")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_GLOB_CHARS = "*?["
_REPORTED = (GeometryWarning, ConvergenceWarning, InputDataWarning)


def is_batch_input(spec: str | os.PathLike[str]) -> bool:
    """A folder or a glob pattern (as opposed to one file)."""
    text = str(spec)
    return Path(text).is_dir() or (any(c in text for c in _GLOB_CHARS) and not Path(text).exists())


def collect_inputs(spec: str | os.PathLike[str]) -> list[Path]:
    """The raw files of a folder or a glob pattern, sorted; an error if there are none."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and not p.name.startswith(".")
                       and p.name.lower().endswith(RAW_SUFFIXES))
        if not files:
            raise InputDataError(f"folder holds no raw scan (no file ending in "
                                 f"{', '.join(RAW_SUFFIXES)})", path=path)
        return files
    files = sorted(Path(p) for p in globlib.glob(text, recursive=True) if Path(p).is_file())
    if not files:
        raise InputDataError("pattern matches no file", path=text)
    return files


def output_format(output: str | os.PathLike[str], fmt: str | None) -> OutputFormat:
    """``nifti`` for a ``.nii``/``.nii.gz`` target, ``dicom`` for ``--format dicom`` or a
    ``.dcm`` folder; ``fmt`` must agree with the target's name when both say something."""
    name = str(output).lower()
    if fmt not in (None, "nifti", "dicom"):
        raise ConfigError(f"--format must be nifti or dicom, got {fmt!r}")
    if fmt == "dicom" or (fmt is None and name.rstrip("/").endswith(".dcm")):
        if name.endswith(_NIFTI_SUFFIXES):
            raise ConfigError(f"{output}: a DICOM series is a folder; give a folder name, "
                              "not a .nii file")
        return "dicom"
    if not name.endswith(_NIFTI_SUFFIXES):
        raise ConfigError(f"{output}: output must end in .nii or .nii.gz (or use --format "
                          "dicom for a DICOM series folder)")
    return "nifti"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(RAW_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem or name


def outputs_for(inputs: list[Path], out_dir: Path, fmt: OutputFormat) -> list[Path]:
    """One output path per input inside ``out_dir`` (see the module docstring)."""
    stems = [_stem(p) for p in inputs]
    if len(set(stems)) < len(stems):
        parents = [p.resolve().parent for p in inputs]
        common = Path(os.path.commonpath([str(p) for p in parents]))
        stems = ["_".join(p.resolve().parent.relative_to(common).parts + (_stem(p),))
                 for p in inputs]
        if len(set(stems)) < len(stems):
            dup = sorted({s for s in stems if stems.count(s) > 1})
            raise ConfigError(f"several inputs would write the same output ({', '.join(dup)})")
    suffix = ".nii.gz" if fmt == "nifti" else ""
    return [out_dir / f"{s}{suffix}" for s in stems]


def check_target(output: Path, fmt: OutputFormat, *, force: bool) -> None:
    """Fail before any work if the image output cannot be written."""
    from .atomic import check_output

    if fmt == "nifti":
        check_output(output, force=force)
        return
    from .io.dicom import check_dicom_output

    check_dicom_output(output, force=force)


def _write_image(result: Any, output: Path, fmt: OutputFormat, *, complex_out: bool,
                 force: bool) -> None:
    if fmt == "nifti":
        from .io.nifti import write_nifti

        write_nifti(result.image, output, complex_output=complex_out, force=force)
        return
    if complex_out:
        raise ConfigError("--complex is for NIfTI output (a DICOM series stores magnitude)")
    from . import __version__
    from .io.dicom import write_dicom

    rep = result.report
    sha = rep.get("weights_sha256")
    text = f"molrecon {__version__} {rep.get('method', '')}"
    if rep.get("weights"):
        text += f" ({Path(str(rep['weights'])).stem})"
    write_dicom(result.image, output, force=force, method_text=text, model_sha256=sha,
                source=rep.get("source") or None)


def reconstruct_file(input: Path, output: Path, config: Any, *, fmt: OutputFormat,
                     complex_out: bool = False, force: bool = False,
                     preview: Path | None = None, report: Path | None = None,
                     engines: dict[Any, Any] | None = None, dataset: str | None = None,
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> tuple[Any, list[str]]:
    """Read, reconstruct and write one scan; returns the result and the warning lines.

    Library errors propagate (with the input's name) and leave no output behind.
    """
    from .io.detect import read_raw
    from .recon import reconstruct

    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        for category in _REPORTED:
            warnings.simplefilter("always", category)
        if progress is not None:
            progress("reading", 0, 1)
        scan = read_raw(input) if dataset is None else read_raw(input, dataset=dataset)
        result = reconstruct(scan, config, progress=progress, engines=engines)
    for w in caught:
        if issubclass(w.category, _REPORTED):
            text = str(w.message)
            lines.append(text if text.startswith(str(input)) else f"{input}: {text}")
            result.report.setdefault("warnings", []).append(text)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    write_outputs(result, output, fmt=fmt, complex_out=complex_out, force=force,
                  preview=preview, report=report)
    return result, lines


def write_outputs(result: Any, output: Path, *, fmt: OutputFormat = "nifti",
                  complex_out: bool = False, force: bool = False, preview: Path | None = None,
                  report: Path | None = None, panels: Sequence[tuple[str, Any]] = (),
                  report_extra: dict[str, Any] | None = None) -> None:
    """Write a reconstruction: the image (NIfTI or a DICOM series), and when asked its PNG
    preview (the baselines, the image, then ``panels``) and its JSON report (with
    ``report_extra`` added). Each file is written atomically."""
    from .atomic import write_text_atomic

    _write_image(result, output, fmt, complex_out=complex_out, force=force)
    result.report["output"] = str(output)
    if preview is not None:
        from .preview import write_preview

        shown = [*result.baselines.items(), (result.report["method"], result.image), *panels]
        write_preview(preview, shown, force=force)
    if report is not None:
        doc = {**result.report, **(report_extra or {})}
        write_text_atomic(report, json.dumps(doc, indent=2, default=str) + "\n", force=force)


@dataclass
class FileOutcome:
    """What happened to one file of a batch."""

    input: str
    output: str
    status: Literal["ok", "failed", "skipped"]
    seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    report: dict[str, Any] | None = None

    def row(self) -> dict[str, Any]:
        rep = self.report or {}
        return {"input": self.input, "output": self.output, "status": self.status,
                "seconds": round(self.seconds, 3), "error": self.error,
                "kind": rep.get("kind"), "method": rep.get("method"),
                "iterations": rep.get("iterations"), "converged": rep.get("converged"),
                "warnings": self.warnings, "report": self.report}


def run_batch(inputs: list[Path], outputs: list[Path], config: Any, *, fmt: OutputFormat,
              complex_out: bool = False, force: bool = False, skip_existing: bool = False,
              preview_dir: Path | None = None, dataset: str | None = None,
              rank: int = 0, world: int = 1,
              on_start: Callable[[int, Path], None] | None = None,
              on_done: Callable[[int, FileOutcome], None] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> list[FileOutcome]:
    """Reconstruct this rank's share of ``inputs`` into ``outputs``; never raises for one
    file's failure (library errors and unexpected exceptions alike become its outcome)."""
    if len(outputs) != len(inputs):
        raise ConfigError(f"{len(inputs)} inputs but {len(outputs)} outputs")
    for folder in sorted({o.parent for o in outputs}):
        folder.mkdir(parents=True, exist_ok=True)
    engines: dict[Any, Any] = {}
    outcomes: list[FileOutcome] = []
    for i in range(rank, len(inputs), world):
        src, dst = inputs[i], outputs[i]
        if on_start is not None:
            on_start(i, src)
        t0 = time.perf_counter()
        exists = dst.exists() and (fmt == "nifti" or (dst.is_dir() and any(dst.iterdir())))
        if skip_existing and exists:
            outcome = FileOutcome(str(src), str(dst), "skipped", error="output exists")
        else:
            base = dst.name.removesuffix(".gz").removesuffix(".nii").removesuffix(".dcm")
            preview = None if preview_dir is None else preview_dir / f"{base}.png"
            try:
                check_target(dst, fmt, force=force)
                result, lines = reconstruct_file(src, dst, config, fmt=fmt,
                                                 complex_out=complex_out, force=force,
                                                 preview=preview, engines=engines,
                                                 dataset=dataset, progress=progress)
                outcome = FileOutcome(str(src), str(dst), "ok", warnings=lines,
                                      report=_slim(result.report))
            except MolreconError as exc:
                if exc.path is None:
                    exc.path = str(src)
                outcome = FileOutcome(str(src), str(dst), "failed", error=str(exc))
            except MemoryError:
                outcome = FileOutcome(str(src), str(dst), "failed",
                                      error=f"{src}: out of memory")
            except Exception as exc:  # noqa: BLE001 - one file's crash must not end the batch
                outcome = FileOutcome(str(src), str(dst), "failed",
                                      error=f"{src}: internal error: {type(exc).__name__}: {exc}")
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
        if on_done is not None:
            on_done(i, outcome)
    return outcomes


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    """The report without the bulky parts (per-iteration traces, model metadata)."""
    out = {k: v for k, v in report.items() if k not in ("model_metadata", "certificate")}
    if "chunks" in out:
        out["chunks"] = [{k: v for k, v in c.items() if k != "residual_trace"}
                         for c in out["chunks"]]
    return out


def write_summary(out_dir: Path, outcomes: list[FileOutcome], *, options: dict[str, Any],
                  force: bool = True) -> Path:
    """``out_dir/summary.json``: totals, the options, one row per file (input order)."""
    from . import __version__
    from .atomic import write_text_atomic

    rows = [o.row() for o in outcomes]
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "failed", "skipped")}
    doc = {"molrecon": __version__, "files": len(outcomes), **counts,
           "options": options, "results": rows}
    return write_text_atomic(out_dir / "summary.json",
                             json.dumps(doc, indent=2, default=str) + "\n", force=force)
