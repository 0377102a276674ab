"""Exception and warning types. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

#: How a library message that advises overwriting reads from the Python API, and on the
#: command line (``OutputError`` stores the API wording; the CLI prints :meth:`cli_text`).
_FORCE_API = "pass force=True (--force on the command line) to"
_FORCE_CLI = "use --force to"


class MolreconError(Exception):
    """Base class of every error molrecon reports to a user.

    ``path`` names the file the problem is about (if any); the CLI prints
    ``<path>: <message>`` on one line and exits with status 1.
    """

    def __init__(self, message: str, *, path: object | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else str(path)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def cli_text(self) -> str:
        """The one line the command line prints (``str(self)`` in the CLI's wording)."""
        return str(self)


class InputDataError(MolreconError):
    """A raw-data or image file cannot be used (unreadable, malformed, unsupported)."""


class CheckpointError(MolreconError):
    """A model file is not a valid molrecon checkpoint (or is unsafe to load)."""


class ConfigError(MolreconError):
    """Options that contradict each other or the data."""


class OutputError(MolreconError):
    """An output cannot be written (exists without --force, missing folder, unwritable).

    Writers word the advice for the command line ("use --force to overwrite"); the
    exception rewords it for the Python API ("pass force=True (--force on the command
    line) to overwrite"), and :meth:`cli_text` gives the command line's wording back.
    """

    def __init__(self, message: str, *, path: object | None = None) -> None:
        super().__init__(message.replace(_FORCE_CLI, _FORCE_API), path=path)

    def cli_text(self) -> str:
        return str(self).replace(_FORCE_API, _FORCE_CLI)


class ResourceError(MolreconError):
    """The job would not fit into the available memory (CPU or GPU)."""


class ConvergenceWarning(UserWarning):
    """A fixed-point or CG iteration stopped at its cap before reaching its tolerance."""


class GeometryWarning(UserWarning):
    """Scan geometry was missing or degenerate and a default was used."""


class InputDataWarning(UserWarning):
    """Raw data were usable but something was dropped or assumed (see the message)."""
