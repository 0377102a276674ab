"""The ``molrecon`` command line. Each command lives in its own module and registers on ``app``.

Nothing here imports torch at import time: ``molrecon --help`` must answer at once.
"""

from __future__ import annotations

import importlib

from ._common import app

# Command modules, in the order they appear in --help.
_COMMANDS = ("reconstruct", "demo", "info", "simulate", "metrics", "train", "guarantees", "models")
for _name in _COMMANDS:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a command module not written yet
        if _exc.name != f"{__name__}.{_name}":
            raise


def main() -> None:
    app()


__all__ = ["app", "main"]
