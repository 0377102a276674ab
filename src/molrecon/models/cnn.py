"""The MOL prior H: a plain convolutional network on complex images.

Architecture (MOL reference, 2D): ``layers`` zero-padded convolutions with
``kernel``-tap kernels, channels 2 → C → … → C → 2, ReLU after every layer but
the last, biases, no normalisation, no skip connection (the residual lives in
F = I − H, not inside H). The 5 × 64, 3×3 network has 113 154 parameters.

``skip=s`` > 0 (MOL-LR only) adds an identity path of gain s around the
network, H(x) = s·x + N(x) (training uses s = 1): the network then learns the
correction rather than the whole image, as residual denoisers do, and a freshly
built model (last layer zero) is exactly s·I. Scaling the output by c
(:meth:`MolCNN.scale_output`) scales s and the last layer together. Its global
bound is s + Π‖W_i‖, so it is rarely certified: contractivity rests on the LR
penalty and the local estimates, as for the plain LR network.

``ensemble=G`` (2 or 4; 1, the default, is off) makes H the average of the
network over G in-plane flips of the image (left-right; and up-down and both):
H(x) = (1/G) Σ_g T_g N(T_g x) with T_g its own inverse. Each T_g is a
permutation, so the average is no more expansive than its terms: the global
bound and every constraint hold for it as for the network, the Lipschitz
constant and the top of the symmetric Jacobian's spectrum at x are at most the
largest of the network's at the flipped images, and F = I − H stays monotone
where every term is. The average is equivariant to the flips, as the images'
statistics are, and costs G network passes (one after another: no more memory).
Training trains the network alone (``train --init`` of an ensemble checkpoint
starts from its network); the ensemble is set on the trained model
(``scripts/tune_lambda.py --ensemble``, ``reconstruct --ensemble``).

Complex ↔ real happens only here: an image ``(B, D, Y, X)`` complex becomes
two real channels (real, imaginary). This map is an isometry, so the
Lipschitz constant of H on complex images is that of the real network.

* ``dims=2`` treats every (B, D) pair as an independent 2D image (2D slices,
  the frames of 2D+time data frame by frame, or the partitions of a 3D scan
  plane by plane).
* ``dims=3`` convolves over (D, Y, X): partitions of a 3D scan, or time as
  the third axis of 2D+time data.

Constraint
----------
``constraint="sn"`` (MOL-SN) rescales every kernel in the forward pass,

    W_eff = W / max(1, σ̂(W) / t),   t = L_target^(1/layers) · (1 − 1e−5),

where σ̂ is the certified upper bound of the zero-padded convolution's operator
norm from :mod:`molrecon.models.spectral`. The product of the layer bounds is
then ≤ L_target, a global Lipschitz certificate of H (ReLU is 1-Lipschitz,
biases do not count). The factor 1 − 1e−5 absorbs the float32 rounding of
W_eff, so that the float64 certificate of the stored effective weights stays
≤ L_target. σ̂ is differentiable (the gradient of the bound at its grid
argmax), so training sees the constraint. ``constraint="lr"`` (MOL-LR) uses
the weights as they are; contractivity then rests on the training penalty.

Cost and caching: σ̂ needs one SVD of a C_out × C_in matrix per grid frequency
(1056 in 2D, 14 400 in 3D at the default grids; see ``spectral``), computed
once per kernel and reused until the kernel changes, so a fixed-point solve
pays it once and a training step once per layer. In training (grad mode) only
the SVD at the grid argmax is recomputed with a graph. Changes are detected by
the tensor's identity, its storage address and its autograd version counter,
which every in-place update (optimiser steps, ``load_state_dict``,
``torch.no_grad`` arithmetic) bumps. Writing in place through ``.data``
bypasses the counter: call :meth:`MolCNN.clear_spectral_cache` after such an
edit.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

import torch
import torch.nn.functional as nnf
from torch import nn

from ..config import ENSEMBLE_SIZES
from ..errors import ConfigError
from .spectral import GridMaximum, bound_at, default_grid, grid_correction, grid_maximum

Constraint = Literal["sn", "lr"]
CONSTRAINTS: tuple[str, ...] = ("sn", "lr")

#: Relative headroom of the per-layer budget (see module docstring).
SN_HEADROOM = 1e-5

#: The image axes flipped by each member of an ensemble of G (``CNNConfig.ensemble``).
ENSEMBLE_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((),), 2: ((), (-1,)), 4: ((), (-1,), (-2,), (-2, -1))}
assert tuple(ENSEMBLE_FLIPS) == ENSEMBLE_SIZES


def flip_average(net: Any, x: torch.Tensor, ensemble: int) -> torch.Tensor:
    """(1/G) Σ_g T_g net(T_g x) over the flips of :data:`ENSEMBLE_FLIPS` [G] (x complex
    (B, D, Y, X); each flip is its own inverse), one pass after another."""
    out: torch.Tensor | None = None
    for axes in ENSEMBLE_FLIPS[ensemble]:
        y = net(x.flip(axes)).flip(axes) if axes else net(x)
        out = y if out is None else out + y
    assert out is not None
    return out if ensemble == 1 else out / ensemble


@dataclass(frozen=True)
class CNNConfig:
    """Architecture of the prior network."""

    dims: int = 2
    layers: int = 5
    channels: int = 64
    kernel: int = 3
    bias: bool = True
    skip: float = 0.0
    ensemble: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims not in (2, 3):
            raise ConfigError(f"dims must be 2 or 3, got {self.dims!r}")
        if isinstance(self.layers, bool) or not isinstance(self.layers, int) or self.layers < 1:
            raise ConfigError(f"layers must be a positive integer, got {self.layers!r}")
        if (isinstance(self.channels, bool) or not isinstance(self.channels, int)
                or self.channels < 1):
            raise ConfigError(f"channels must be a positive integer, got {self.channels!r}")
        if (isinstance(self.kernel, bool) or not isinstance(self.kernel, int)
                or self.kernel < 1 or self.kernel % 2 == 0):
            raise ConfigError(f"kernel must be a positive odd integer, got {self.kernel!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be a bool, got {self.bias!r}")
        if (isinstance(self.skip, bool) or not isinstance(self.skip, (int, float))
                or not 0.0 <= self.skip < math.inf):
            raise ConfigError(f"skip (the identity path's gain) must be a finite number >= 0, "
                              f"got {self.skip!r}")
        if isinstance(self.ensemble, bool) or self.ensemble not in ENSEMBLE_FLIPS:
            raise ConfigError(f"ensemble (flips averaged) must be one of "
                              f"{', '.join(map(str, ENSEMBLE_FLIPS))}, got {self.ensemble!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CNNConfig:
        expected = {"dims", "layers", "channels", "kernel", "bias"}
        optional = {"skip", "ensemble"}        # absent in checkpoints from before they existed
        if not expected <= set(data) <= expected | optional:
            raise ConfigError(f"architecture keys must be {sorted(expected)} (and optionally "
                              f"{sorted(optional)}), got {sorted(data)}")
        values = dict(data)
        if isinstance(values.get("skip"), bool):  # the first skip checkpoints stored a flag
            values["skip"] = 1.0 if values["skip"] else 0.0
        return cls(**values)

    def channel_plan(self) -> list[tuple[int, int]]:
        """(in, out) channels of every layer: 2 → C → … → C → 2."""
        if self.layers == 1:
            return [(2, 2)]
        inner = [(self.channels, self.channels)] * (self.layers - 2)
        return [(2, self.channels), *inner, (self.channels, 2)]

    def parameter_count(self) -> int:
        k = self.kernel ** self.dims
        return sum(ci * co * k + (co if self.bias else 0) for ci, co in self.channel_plan())


@dataclass
class _CacheEntry:
    ref: weakref.ReferenceType[torch.Tensor]
    version: int
    data_ptr: int
    grid: int
    result: GridMaximum


class MolCNN(nn.Module):
    """H: complex ``(B, D, Y, X)`` → complex ``(B, D, Y, X)``.

    Parameters live in ``convs`` (``torch.nn.Conv2d``/``Conv3d``), so the
    state dict is ``convs.{i}.weight`` / ``convs.{i}.bias``. For "sn" the stored
    weights are the free parameters and :meth:`effective_weights` the ones used.
    The computation runs in the dtype of the weights; the output has the dtype
    of the input.
    """

    def __init__(self, config: CNNConfig | None = None, constraint: Constraint = "sn",
                 lipschitz_target: float = 0.99, *, spectral_grid: int | None = None) -> None:
        super().__init__()
        self.config = CNNConfig() if config is None else config
        if constraint not in CONSTRAINTS:
            raise ConfigError(f"constraint must be one of {CONSTRAINTS}, got {constraint!r}")
        target = float(lipschitz_target)
        if not 0.0 < target < float("inf"):                  # also refuses NaN
            raise ConfigError("lipschitz_target must be positive and finite, "
                              f"got {lipschitz_target!r}")
        if self.config.skip > 0 and constraint == "sn":
            raise ConfigError("an identity skip cannot be spectrally normalised to a bound "
                              "below 1 (the skip alone has norm 1): use it with constraint 'lr'")
        self.constraint: Constraint = constraint
        self.lipschitz_target = target
        grid = default_grid(self.config.dims) if spectral_grid is None else spectral_grid
        if isinstance(grid, bool) or not isinstance(grid, int):
            raise ConfigError(f"spectral_grid must be an integer, got {spectral_grid!r}")
        try:
            grid_correction(self.config.dims, self.config.kernel, grid)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        self.spectral_grid = grid
        conv = nn.Conv2d if self.config.dims == 2 else nn.Conv3d
        k = self.config.kernel
        self.convs = nn.ModuleList(
            conv(ci, co, k, padding=k // 2, bias=self.config.bias)
            for ci, co in self.config.channel_plan()
        )
        self._cache: dict[int, _CacheEntry] = {}

    # -- constraint ---------------------------------------------------------------------------

    @property
    def layer_budget(self) -> float:
        """Per-layer norm budget t = L_target^(1/layers) · (1 − SN_HEADROOM)."""
        return self.lipschitz_target ** (1.0 / self.config.layers) * (1.0 - SN_HEADROOM)

    def clear_spectral_cache(self) -> None:
        self._cache.clear()

    def _grid_maximum(self, index: int, weight: torch.Tensor) -> GridMaximum:
        entry = self._cache.get(index)
        version = weight._version
        ptr = weight.data_ptr()
        if (entry is not None and entry.ref() is weight and entry.version == version
                and entry.data_ptr == ptr and entry.grid == self.spectral_grid):
            return entry.result
        result = grid_maximum(weight, grid=self.spectral_grid)
        self._cache[index] = _CacheEntry(weakref.ref(weight), version, ptr, self.spectral_grid,
                                         result)
        return result

    def raw_weights(self) -> list[torch.Tensor]:
        """The stored (free) kernels, one per layer."""
        return [cast(torch.Tensor, c.weight) for c in self.convs]

    def biases(self) -> list[torch.Tensor | None]:
        return [cast("torch.Tensor | None", c.bias) for c in self.convs]

    def raw_layer_bounds(self) -> list[torch.Tensor]:
        """Certified bound of every layer's free weights (differentiable), shape () each."""
        return [bound_at(w, self._grid_maximum(i, w)) for i, w in enumerate(self.raw_weights())]

    def bound_from(self, layer_bounds: list[float] | tuple[float, ...]) -> float:
        """The global Lipschitz bound from per-layer bounds: their product (ReLU is
        1-Lipschitz), plus the identity path's gain s (Lip(s·x + N(x)) ≤ s + Lip(N))."""
        return math.prod(layer_bounds) + self.config.skip

    def scale_output(self, factor: float) -> None:
        """H → factor·H: the last layer (weights and bias) and the identity path's gain.
        Every Lipschitz constant of H is multiplied by ``factor``."""
        c = float(factor)
        if not 0.0 < c < math.inf:
            raise ConfigError(f"the output scale must be positive and finite, got {factor!r}")
        last = self.convs[-1]
        with torch.no_grad():
            last.weight.mul_(c)
            if last.bias is not None:
                last.bias.mul_(c)
        self.config = replace(self.config, skip=self.config.skip * c)
        self.clear_spectral_cache()

    def effective_weights(self) -> list[torch.Tensor]:
        """The kernels the forward pass uses (rescaled for "sn", as stored for "lr")."""
        weights = self.raw_weights()
        if self.constraint == "lr":
            return weights
        budget = self.layer_budget
        out = []
        for w, sigma in zip(weights, self.raw_layer_bounds()):
            out.append(w / torch.clamp(sigma / budget, min=1.0))
        return out

    # -- forward ------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_complex() or x.ndim != 4:
            raise ValueError("MolCNN expects a complex (B, D, Y, X) image, "
                             f"got {x.dtype} {tuple(x.shape)}")
        return flip_average(self._network, x, self.config.ensemble)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """The network (with its identity path) on one complex (B, D, Y, X) image."""
        b, d, y, xx = x.shape
        weights = self.effective_weights()
        real_dtype = weights[0].dtype
        r = torch.view_as_real(x).to(real_dtype)                        # (B, D, Y, X, 2)
        if self.config.dims == 2:
            h = r.permute(0, 1, 4, 2, 3).reshape(b * d, 2, y, xx)       # (B·D, 2, Y, X)
            conv = nnf.conv2d
        else:
            h = r.permute(0, 4, 1, 2, 3)                                # (B, 2, D, Y, X)
            conv = nnf.conv3d
        pad = self.config.kernel // 2
        last = len(self.convs) - 1
        for i, (w, bias) in enumerate(zip(weights, self.biases())):
            h = conv(h, w, bias, padding=pad)
            if i < last:
                h = torch.relu(h)
        if self.config.dims == 2:
            h = h.reshape(b, d, 2, y, xx).permute(0, 1, 3, 4, 2)        # (B, D, Y, X, 2)
        else:
            h = h.permute(0, 2, 3, 4, 1)                                # (B, D, Y, X, 2)
        if self.config.skip > 0:
            h = h + self.config.skip * r                                # H(x) = s·x + N(x)
        return torch.view_as_complex(h.contiguous()).to(x.dtype)        # (B, D, Y, X)

    def extra_repr(self) -> str:
        c = self.config
        return (f"dims={c.dims}, layers={c.layers}, channels={c.channels}, kernel={c.kernel}, "
                f"skip={c.skip}, ensemble={c.ensemble}, constraint={self.constraint!r}, lipschitz_target={self.lipschitz_target}, "
                f"spectral_grid={self.spectral_grid}")
