"""Choosing the compute device (``--device auto|cpu|cuda``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is usable, else the CPU; ``cuda`` without a GPU is an error."""
    import torch

    name = name.lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA GPU is available "
                              "(use --device cpu or --device auto)")
        return torch.device(name)
    raise ConfigError(f"unknown device {name!r}: use one of {', '.join(DEVICES)}")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: GPU allocations on CUDA, resident set size on the CPU."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
