"""Shared CLI plumbing: the typer app, error reporting, console."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ..errors import MolreconError

# typer ships click under a private name in some versions; reach it through a public class.
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _plain_flags(params: list[Any]) -> list[Any]:
    """Flags take no value: show no type for them in --help (typer >= 0.2x prints ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) and getattr(param, "metavar", None) is None:
            param.metavar = ""
    return params


class MolreconCommand(TyperCommand):
    """A typer command whose --help reads like a conventional CLI's.

    The usage line names arguments by their metavar, ``FILE`` for a required one and
    ``[FILE]`` for an optional one (typer >= 0.2x writes ``{file}``; hidden arguments, kept
    for compatibility, are left out), and flags show no ``<bool>`` type.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                if getattr(param, "hidden", False):
                    continue
                name = param.metavar or (param.name or "").upper()
                name = name if param.required else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class _Typer(typer.Typer):
    """``app.command`` makes :class:`MolreconCommand` commands unless told otherwise."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("cls") is None:
            kwargs["cls"] = MolreconCommand
        return super().command(*args, **kwargs)


app = _Typer(
    cls=_Group,
    name="molrecon",
    help="MRI reconstruction from raw multicoil k-space with Monotone Operator Learning (MOL).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)

DebugOpt = typer.Option(False, "--debug", help="Show the full traceback on errors.")


#: errno values of an output that cannot be written for a reason the user can fix.
_WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device (free some space, or write elsewhere)",
                 errno.EDQUOT: "disk quota exceeded (free some space, or write elsewhere)",
                 errno.EROFS: "read-only file system (write elsewhere)",
                 errno.EACCES: "permission denied (check the file's and its folder's "
                               "permissions)"}
# The temporary file of an atomic write (molrecon.atomic): ".NAME.XXXXXXXX[SUFFIXES]" beside NAME.
_ATOMIC_TMP = re.compile(r"^\.(?P<name>.+?)\.[A-Za-z0-9_]{8}(\.[^/]*)?$")


def os_error_line(exc: OSError) -> str | None:
    """One line for an OSError a user can act on (full disk, quota, read-only, permissions),
    naming the file (the target of an atomic write rather than its temporary file); None for
    any other OSError."""
    cause = _WRITE_ERRNOS.get(exc.errno or -1)
    if cause is None:
        return None
    name = exc.filename if exc.filename is not None else exc.filename2
    if name is None:
        return cause
    name = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    head, tail = os.path.split(name)
    match = _ATOMIC_TMP.match(tail)
    if match:
        name = os.path.join(head, match.group("name"))
    return f"{name}: {cause}"


@contextlib.contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn library errors into one red line on stderr and exit code 1.

    Usage errors (typer.BadParameter and friends) keep typer's exit code 2. An OSError of
    a full disk, an exceeded quota, a read-only file system or a denied permission is one
    line naming the file and the cause. Anything unexpected is also reported on one line
    (exit 1) unless ``--debug``.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, _ClickException, KeyboardInterrupt):
        raise
    except MolreconError as exc:
        if debug:
            raise
        error_line(exc.cli_text())
        raise typer.Exit(1) from None
    except MemoryError:
        if debug:
            raise
        console.print("[red]error:[/red] out of memory (try --device cpu, or a smaller input)",
                      soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if debug:
            raise
        line = os_error_line(exc)
        if line is None:
            _internal(exc)
        error_line(line)
        raise typer.Exit(1) from None
    except Exception as exc:
        if debug:
            raise
        _internal(exc)


def error_line(text: str) -> None:
    """``error: TEXT`` in red on stderr, TEXT printed as it is (no rich markup)."""
    console.print(f"[red]error:[/red] {escape(text)}", soft_wrap=True)


def _internal(exc: BaseException) -> NoReturn:
    error_line(f"internal error: {type(exc).__name__}: {exc} "
               "(rerun with --debug for the traceback)")
    raise typer.Exit(1) from None


# ------------------------------------------------------------------------------ option values
def bad_option(message: str, option: str | list[str]) -> typer.BadParameter:
    """A usage error (exit 2) about an option's value, naming the option (or options)."""
    return typer.BadParameter(message, param_hint=option if isinstance(option, str)
                              else " / ".join(option))


def check_option(ok: bool, message: str, option: str | list[str]) -> None:
    """Raise :func:`bad_option` unless ``ok``."""
    if not ok:
        raise bad_option(message, option)


def choice(value: str, allowed: tuple[str, ...], option: str) -> str:
    check_option(value in allowed, f"{value!r} is not one of {', '.join(allowed)}", option)
    return value


#: -R in `simulate` and `train`: the same syntax, metavar and wording.
ACCEL_METAVAR = "R[,R...]"
ACCEL_HELP = "Net acceleration R, the ACS lines included (1 = fully sampled)."


def parse_accelerations(text: str, option: str = "-R") -> tuple[float, ...]:
    """``R`` or ``R,R,...`` (each a number >= 1) → the values, in order."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    check_option(bool(parts), "expected a number or a comma list like 4,6", option)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise bad_option(f"expected a number or a comma list like 4,6, got {text!r}",
                         option) from None
    check_option(all(v >= 1 and v != float("inf") for v in values),
                 f"every acceleration must be a number >= 1, got {text!r}", option)
    return values


def stage_logger(name: str, quiet: bool = False) -> Any:
    """Without a terminal (a batch system, a pipe), one plain line per stage of a job
    (``[elapsed] name: stage``, on stderr; a stage's key is its text before the first
    colon, printed once) instead of the live display; with a terminal, or with ``quiet``,
    nothing. Reading and the end are not printed (most bad input ends at reading)."""
    import time

    t0 = time.perf_counter()
    last: dict[str, str | None] = {"key": None}

    def log(stage: str, who: str | None = None) -> None:
        if console.is_terminal or quiet:
            return
        key = stage.split(":")[0]
        label = who if who is not None else name
        if (label, key) == last["key"] or key in ("done", "reading", "reconstructing"):
            return                      # reading is quick, and most bad input ends there
        last["key"] = (label, key)  # type: ignore[assignment]
        console.print(f"[{time.perf_counter() - t0:7.1f} s] {label}: {key}", markup=False,
                      highlight=False, soft_wrap=True)

    return log


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        stdout.print(f"molrecon {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """MRI reconstruction from raw multicoil k-space with Monotone Operator Learning (MOL).

    Raw Cartesian k-space (ISMRMRD, MRD v2, fastMRI HDF5, Siemens twix) in, NIfTI or DICOM out. Run
    `molrecon COMMAND --help` for each command.
    """
