"""Lazy package attributes: a name is imported from its module on first use (a leaf).

Packages whose modules import torch (``models``, ``train``, the package root) expose
their public names through :func:`lazy_attributes`, so that importing the package — as
the command line does for ``--help`` and for option errors — does not pay torch's
import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, homes: Mapping[str, str],
                    namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each name to the module
    that defines it (relative to ``package``, or absolute when it starts with
    ``molrecon``); a value once imported is kept in ``namespace`` (the package's globals)."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = home if home.startswith("molrecon") else f"{package}.{home}"
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__
