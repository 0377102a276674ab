"""Memory planning: how much a reconstruction needs, and how many slices fit at once.

:func:`estimate_recon_memory` is a model of the tensors that are alive at the
peak of one batch of ``b`` slices (see ``recon.py`` for the steps), and
:func:`plan_batches` picks the largest ``b`` whose estimate fits into the
memory that is free now (``MemAvailable`` of ``/proc/meminfo`` on the CPU,
``torch.cuda.mem_get_info`` plus the allocator's unused cache on CUDA).

The model (complex64 = 8 bytes; shape ``(B, C, D, Y, X)``, ``N = D·Y·X`` voxels
per item, ``E = b·C·N`` multicoil values and ``I = b·N`` image values per batch;
``M`` multicoil map values: ``E``, or ``b·C·Y·X`` for ``"2dt"`` whose maps are
shared by the frames)::

    k-space     2·E·8      the batch and its normalised copy (on the CPU the batch is a
                           view of the scan, so only the copy counts)
    ESPIRiT     3·8·min(2²⁴, max(b·P·C², P·C²))   per-pixel C×C matrices, built in chunks
                           of 2²⁴ values (P pixels per calibration problem: Y·X, or D·Y
                           for "3d")
    maps        3·M·8      the maps and the operator's shifted copy and its conjugate
    CG          5·I·8      x, r, p, A·p and the right-hand side
    normal op   2·E·8      coil images and their FFT inside AᴴA
    MOL         (2m + 4)·I·8 + max(2·E·8, b·2·K·N·4)
                           Anderson history (m iterates and residuals, ``anderson_memory``),
                           and the larger
                           of the normal operator and two K-channel float32 activations
                           of the CNN (inference: no graph is kept)

``zf`` needs ``2·E·8 + I·8`` (the batch, its coil images and the combined image).
``sense`` peaks at ``k-space + max(ESPIRiT, maps + CG + normal op)``; ``mol`` adds
its term to the solve phase. On the CPU the whole scan (``B·C·N·8``) and the
output image (``B·N·8``) live in the same memory and are added once, whatever
``b``. The model leaves out allocator fragmentation and the interpreter itself;
:func:`plan_batches` therefore keeps a reserve (20 % by default) of the free
memory unused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import ConfigError, ResourceError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ANDERSON_MEMORY",
    "COMPLEX_BYTES",
    "ESPIRIT_CHUNK",
    "available_memory_bytes",
    "estimate_recon_memory",
    "plan_batches",
]

COMPLEX_BYTES = 8            # complex64
REAL_BYTES = 4               # float32 (CNN activations)
ESPIRIT_CHUNK = 1 << 24      # coils.EspiritConfig.chunk_elements default
#: Past iterates (and their residuals) the Anderson fixed-point solver mixes: the default of
#: ``deq.fixed_point.FixedPointConfig.memory`` and ``reconstruct --anderson-memory``, and
#: what the planner reserves for it (here, the lowest layer that needs it).
ANDERSON_MEMORY = 10
DEFAULT_RESERVE = 0.2
_MEMINFO = Path("/proc/meminfo")

DeviceType = Literal["cpu", "cuda"]


def _shape(shape_bcdyx: tuple[int, ...]) -> tuple[int, int, int, int, int]:
    if len(shape_bcdyx) != 5:
        raise ConfigError(f"shape must be (B, C, D, Y, X), got {tuple(shape_bcdyx)}")
    values = tuple(int(s) for s in shape_bcdyx)
    if min(values) < 1:
        raise ConfigError(f"shape must be positive, got {values}")
    return values  # type: ignore[return-value]


def estimate_recon_memory(shape_bcdyx: tuple[int, ...], kind: str, method: str,
                          device_type: str, *, batch_size: int | None = None,
                          cnn_channels: int = 64, anderson_memory: int = ANDERSON_MEMORY) -> int:
    """Peak bytes of reconstructing a scan of ``shape_bcdyx`` ``batch_size`` slices at a time.

    ``kind`` is "2d", "3d" or "2dt"; ``method`` "zf", "sense" or "mol";
    ``device_type`` "cpu" or "cuda" (on the CPU the scan and the output image
    are counted too; see the module docstring for the model). ``batch_size``
    ``None`` means all B slices at once. ``cnn_channels`` is the width K of
    the MOL prior, ``anderson_memory`` the number of iterates and residuals the
    fixed-point solver keeps.
    """
    b_total, c, d, y, x = _shape(shape_bcdyx)
    if kind not in ("2d", "3d", "2dt"):
        raise ConfigError(f"kind must be 2d, 3d or 2dt, got {kind!r}")
    if method not in ("zf", "sense", "mol"):
        raise ConfigError(f"method must be zf, sense or mol, got {method!r}")
    if device_type not in ("cpu", "cuda"):
        raise ConfigError(f"device type must be cpu or cuda, got {device_type!r}")
    if cnn_channels < 1:
        raise ConfigError(f"cnn_channels must be >= 1, got {cnn_channels}")
    if anderson_memory < 1:
        raise ConfigError(f"anderson_memory must be >= 1, got {anderson_memory}")
    b = b_total if batch_size is None else min(max(int(batch_size), 1), b_total)
    n = d * y * x
    e = b * c * n                                   # multicoil values of the batch
    i = b * n                                       # image values of the batch
    m = b * c * y * x if kind == "2dt" else e       # map values
    cb = COMPLEX_BYTES
    on_cpu = device_type == "cpu"

    resident = (b_total * c * n + b_total * n) * cb if on_cpu else 0
    batch_k = e * cb if not on_cpu else 0           # on the CPU the batch is a view of the scan
    if method == "zf":
        return resident + batch_k + e * cb + i * cb

    kspace = batch_k + e * cb                       # + the normalised copy
    pixels = d * y if kind == "3d" else y * x
    espirit = 3 * cb * min(ESPIRIT_CHUNK, max(b * pixels * c * c, pixels * c * c))
    maps = 3 * m * cb
    cg = 5 * i * cb
    normal_tmp = 2 * e * cb
    solve = maps + cg + normal_tmp
    if method == "mol":
        cnn = b * 2 * cnn_channels * n * REAL_BYTES
        solve = maps + cg + (2 * anderson_memory + 4) * i * cb + max(normal_tmp, cnn)
    return resident + kspace + max(espirit, solve)


def _meminfo_available(path: Path | None = None) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        text = (path or _MEMINFO).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                value = int(parts[1])
            except (IndexError, ValueError):
                return None
            unit = parts[2].lower() if len(parts) > 2 else "kb"
            return value * 1024 if unit == "kb" else value
    return None


def available_memory_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation could use now on ``device``; None where it cannot be told.

    CPU: ``MemAvailable`` from ``/proc/meminfo`` (Linux), else the free physical
    pages (``sysconf``). CUDA: the driver's free memory plus what torch's
    caching allocator holds but does not use (``reserved − allocated``).
    """
    dev_type = device if isinstance(device, str) else device.type
    dev_type = dev_type.split(":")[0]
    if dev_type == "cuda":
        import torch

        dev = torch.device(device)
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free) + max(int(cached), 0)
    if dev_type != "cpu":
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
    value = _meminfo_available()
    if value is not None:
        return value
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def plan_batches(shape: tuple[int, ...], kind: str, method: str, device: torch.device | str,
                 *, available: int | None = None, cnn_channels: int = 64,
                 anderson_memory: int = ANDERSON_MEMORY,
                 reserve: float = DEFAULT_RESERVE) -> int:
    """The largest number of slices per batch whose estimated peak fits into free memory.

    ``available`` (bytes) overrides the measurement of
    :func:`available_memory_bytes`; only ``(1 − reserve)`` of it is planned
    for. Returns B when everything fits (or when the free memory cannot be
    told). Raises :class:`~molrecon.errors.ResourceError` when even one slice
    does not fit, naming the memory needed and what would fit instead.
    """
    b_total, c, d, y, x = _shape(shape)
    if not 0.0 <= reserve < 1.0:
        raise ConfigError(f"reserve must lie in [0, 1), got {reserve}")
    dev_type = (device if isinstance(device, str) else device.type).split(":")[0]
    if available is None:
        available = available_memory_bytes(device)
        if available is None:
            return b_total
    budget = int(available * (1.0 - reserve))

    def need(batch: int, coils: int = c) -> int:
        return estimate_recon_memory((b_total, coils, d, y, x), kind, method, dev_type,
                                     batch_size=batch, cnn_channels=cnn_channels,
                                     anderson_memory=anderson_memory)

    if need(b_total) <= budget:
        return b_total
    if need(1) > budget:
        fitting = [cc for cc in range(c - 1, 0, -1) if need(1, cc) <= budget]
        if fitting:
            hint = (f"one slice with at most {fitting[0]} coils would fit (compress the coils), "
                    "or free memory")
        else:
            hint = "not even one coil of this matrix fits; free memory or use a smaller matrix"
        where = "GPU" if dev_type == "cuda" else "CPU"
        raise ResourceError(
            f"{method} reconstruction of one slice of {b_total}×{c}×{d}×{y}×{x} "
            f"(B×C×D×Y×X) needs about {_gib(need(1))} on the {where}, but only "
            f"{_gib(budget)} of {_gib(available)} free can be planned for: {hint}"
            + (" (or run with --device cpu)" if dev_type == "cuda" else ""))
    lo, hi = 1, b_total        # need(lo) fits, need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
