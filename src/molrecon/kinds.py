"""The data kinds and the axis order every layer of molrecon uses (a leaf: imports nothing).

Kinds
-----
``2d``   one slice, or a stack of slices reconstructed one by one;
``3d``   a volume encoded in two phase-encoding directions (partitions × phase);
``2dt``  a 2D slice over time (frames), a dynamic series.

Axis order
----------
k-space and coil maps: ``(B, C, D, Y, X)``
    B  batch: slices of a multi-slice 2D scan (1 for a single slice, 3D or 2D+time scan)
    C  receive coils
    D  depth: 1 for 2D; kz / partitions for 3D (``kspace_encode_step_2``); frames for 2D+time
    Y  phase encoding (``kspace_encode_step_1``)
    X  readout (``kspace_encode_step_0``), always fully sampled, oversampling removed
images: ``(B, D, Y, X)`` (the coil axis combined away).
sampling masks: ``(B, 1, D, Y, 1)`` boolean, broadcast over coils and readout.

The Fourier transform acts on (Y, X) for ``2d`` and ``2dt`` data and on
(D, Y, X) for ``3d`` data (:func:`spatial_dims`).
"""

from __future__ import annotations

from typing import Literal

Kind = Literal["2d", "3d", "2dt"]
KINDS: tuple[str, ...] = ("2d", "3d", "2dt")
LABELS: dict[str, str] = {"2d": "2D", "3d": "3D", "2dt": "2D + time"}
# The data kinds a prior of each dimensionality can serve: a 2D prior sees 2D slices,
# 2D+time frames one by one and the (partition, phase) planes of a 3D scan with one readout
# position; a 3D prior sees volumes and (t, y, x) blocks of a series.
KINDS_BY_PRIOR_DIMS: dict[int, tuple[str, ...]] = {2: ("2d", "2dt", "3d"), 3: ("3d", "2dt")}


def spatial_dims(kind: str) -> tuple[int, ...]:
    """Axes of a ``(B, C, D, Y, X)`` tensor that the Fourier transform acts on."""
    return (-3, -2, -1) if kind == "3d" else (-2, -1)
