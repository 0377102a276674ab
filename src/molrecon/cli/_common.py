"""Shared CLI plumbing: the typer app, error reporting, console."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

from ..errors import MolreconError

# typer ships click under a private name in some versions; reach it through a public class.
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
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


@contextlib.contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn library errors into one red line on stderr and exit code 1.

    Usage errors (typer.BadParameter and friends) keep typer's exit code 2.
    Anything unexpected is also reported on one line (exit 1) unless ``--debug``.
    """
    try:
        yield
    except (typer.Exit, typer.Abort, _ClickException, KeyboardInterrupt):
        raise
    except MolreconError as exc:
        if debug:
            raise
        console.print(f"[red]error:[/red] {exc}", markup=True, soft_wrap=True)
        raise typer.Exit(1) from None
    except MemoryError:
        if debug:
            raise
        console.print("[red]error:[/red] out of memory (try --device cpu, or a smaller input)",
                      soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence, one line not a traceback
        if debug:
            raise
        console.print(f"[red]error:[/red] internal error: {type(exc).__name__}: {exc} "
                      "(rerun with --debug for the traceback)", soft_wrap=True)
        raise typer.Exit(1) from None


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

    Raw Cartesian k-space (ISMRMRD or fastMRI HDF5) in, NIfTI out. Run
    `molrecon COMMAND --help` for each command.
    """
