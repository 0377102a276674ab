"""Exception and warning types. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


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


class InputDataError(MolreconError):
    """A raw-data or image file cannot be used (unreadable, malformed, unsupported)."""


class CheckpointError(MolreconError):
    """A model file is not a valid molrecon checkpoint (or is unsafe to load)."""


class ConfigError(MolreconError):
    """Options that contradict each other or the data."""


class OutputError(MolreconError):
    """An output cannot be written (exists without --force, missing folder, unwritable)."""


class ResourceError(MolreconError):
    """The job would not fit into the available memory (CPU or GPU)."""


class ConvergenceWarning(UserWarning):
    """A fixed-point or CG iteration stopped at its cap before reaching its tolerance."""


class GeometryWarning(UserWarning):
    """Scan geometry was missing or degenerate and a default was used."""


class InputDataWarning(UserWarning):
    """Raw data were usable but something was dropped or assumed (see the message)."""
