"""The fast MOL step for inference: a frozen (optionally compiled, optionally bf16) prior and a
compiled data-consistency solve; CUDA graphs on CUDA only.

Off by default (``reconstruct --compile``, ``--precision``): the eager step of
:mod:`molrecon.deq.mol` is the reference, and the fast step must reach the same
fixed point (``tests/deq/test_accel.py``: 1e-5 relative in float32).

What the fast step changes, and why the fixed point stays the same:

* **Frozen prior.** :class:`FrozenPrior` computes the CNN's effective
  (constraint-scaled) weights once per engine instead of at every call, and runs
  the convolutions on real tensors (the complex views stay outside the compiled
  region: inductor generates no code for complex operators). Same weights, same
  function.
* **Data consistency** by a compiled function of plain tensors
  (:func:`molrecon.physics.sense.normal_from_parts`): a new operator of the same
  shape (the next chunk of slices) reuses the compiled code, and the FFTs run
  only along the axes where the mask varies (AᴴA is the same operator, round-off
  aside). The step size αλ and the shift 1/(αλ) are computed once per solve.
* **bf16 prior** (``precision="bf16"``): the convolutions under
  ``torch.autocast(bfloat16)``, output cast back to float32. This does change
  the fixed point slightly; :func:`molrecon.deq.inference.precision_gate`
  measures by how much, and ``precision="auto"`` turns it on only where a
  recorded gate of the model passed (see :func:`resolve_precision`).
* **CUDA graphs**: on CUDA the compiled functions use ``mode="reduce-overhead"``
  (captured once per input shape); their outputs are copied before the solver
  keeps them, since a replay reuses the graph's output buffers. The CPU path
  never asks for it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as nnf

from ..errors import ConfigError
from ..models.cnn import MolCNN, flip_average
from ..physics.sense import normal_from_parts
from ..solvers import conjugate_gradient
from .mol import item_weight, per_item

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
#: Where a model records its bf16 gate: ``metadata[GATE_KEY] = {"passed": bool, ...}``.
GATE_KEY = "bf16_gate"

StepFn = Callable[[torch.Tensor], torch.Tensor]


def resolve_precision(precision: str, device: torch.device, metadata: Mapping[str, Any] | None
                      ) -> str:
    """``fp32`` or ``bf16`` for ``precision`` (``fp32`` | ``bf16`` | ``auto``) on ``device``.

    ``auto`` is bf16 only on CUDA and only when the model's metadata hold a recorded
    accuracy gate that passed (``metadata["bf16_gate"]["passed"] is True``, written
    from :func:`molrecon.deq.inference.precision_gate`); otherwise fp32.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    gate = (metadata or {}).get(GATE_KEY)
    passed = isinstance(gate, Mapping) and gate.get("passed") is True
    return "bf16" if device.type == "cuda" and passed else "fp32"


def _quiet_compile(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """``torch.compile(fn)`` for fixed shapes; CUDA graphs (``reduce-overhead``) on CUDA only.
    Inductor's notice that complex operators fall back to eager, and torch's deprecation
    notices while compiling, are silenced."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    with _compiler_notices_off():
        compiled = torch.compile(fn, dynamic=False, mode=mode)

    def call(*args: Any) -> Any:
        with _compiler_notices_off():
            return compiled(*args)
    return call


@contextlib.contextmanager
def _compiler_notices_off() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support code generation for "
                                "complex operators.*")
        # torch's own deprecation notices from the modules the compiler imports
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        yield


def _conv_stack(h: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                dims: int, pad: int, bf16: bool) -> torch.Tensor:
    """The CNN's convolutions and ReLUs on a real (N, 2, ...) tensor; float32 out."""
    conv = nnf.conv2d if dims == 2 else nnf.conv3d
    ctx = torch.autocast(h.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    last = len(weights) - 1
    with ctx:
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = conv(h, w, b, padding=pad)
            if i < last:
                h = torch.relu(h)
    return h.float()


class FrozenPrior(nn.Module):
    """A :class:`~molrecon.models.cnn.MolCNN` for inference with its effective weights
    computed once (the same function as the model at the time of freezing), optionally
    compiled and/or in bf16. Complex ``(B, D, Y, X)`` in and out, like the model."""

    def __init__(self, model: MolCNN, *, bf16: bool = False, compile: bool = False,
                 device: torch.device | None = None) -> None:
        super().__init__()
        with torch.no_grad():
            self.weights = [w.detach().clone() for w in model.effective_weights()]
            self.biases = [None if b is None else b.detach().clone() for b in model.biases()]
        self.dims = model.config.dims
        self.skip = float(model.config.skip)
        self.ensemble = model.config.ensemble
        self.pad = model.config.kernel // 2
        self.bf16 = bool(bf16)
        dev = self.weights[0].device if device is None else device
        self._stack: Callable[..., torch.Tensor] = (
            _quiet_compile(_conv_stack, dev) if compile else _conv_stack)
        self._copy_out = compile and dev.type == "cuda"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return flip_average(self._network, x, self.ensemble)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        b, d, y, xx = x.shape
        r = torch.view_as_real(x).to(self.weights[0].dtype)              # (B, D, Y, X, 2)
        if self.dims == 2:
            h = r.permute(0, 1, 4, 2, 3).reshape(b * d, 2, y, xx)       # (B·D, 2, Y, X)
        else:
            # Not made contiguous, as in the model: conv3d may take another algorithm for
            # the other memory layout, and the two would differ in the last bits.
            h = r.permute(0, 4, 1, 2, 3)                                # (B, 2, D, Y, X)
        h = self._stack(h, self.weights, self.biases, self.dims, self.pad, self.bf16)
        if self._copy_out:
            h = h.clone()                     # a CUDA-graph replay reuses its output buffer
        if self.dims == 2:
            h = h.reshape(b, d, 2, y, xx).permute(0, 1, 3, 4, 2)        # (B, D, Y, X, 2)
        else:
            h = h.permute(0, 2, 3, 4, 1)                                # (B, D, Y, X, 2)
        if self.skip > 0:
            h = h + self.skip * r.float()                               # H(x) = s·x + N(x)
        return torch.view_as_complex(h.contiguous()).to(x.dtype)        # (B, D, Y, X)


class _Bf16Prior(nn.Module):
    """Any complex prior under bf16 autocast (for priors that are not a MolCNN)."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.prior(x).to(x.dtype)


def fast_prior(prior: nn.Module, *, precision: str, compile: bool, device: torch.device
               ) -> nn.Module:
    """The prior of the fast step: :class:`FrozenPrior` for a MolCNN, else the prior itself
    (under bf16 autocast when asked)."""
    if isinstance(prior, MolCNN):
        return FrozenPrior(prior, bf16=precision == "bf16", compile=compile, device=device)
    return _Bf16Prior(prior) if precision == "bf16" else prior


def _dc_solve(rhs: torch.Tensor, x0: torch.Tensor, shift: torch.Tensor, maps_u: torch.Tensor,
              maps_u_conj: torch.Tensor, mask2_u: torch.Tensor, dims: tuple[int, ...],
              fft_dims: tuple[int, ...], iters: int) -> torch.Tensor:
    """``cg_iters`` warm-started CG iterations on (AᴴA + shift·I) y = rhs (the MOL step's (2))."""
    def normal(v: torch.Tensor) -> torch.Tensor:
        return normal_from_parts(v, maps_u, maps_u_conj, mask2_u, dims, fft_dims)
    return conjugate_gradient(normal, rhs, x0=x0, shift=shift, max_iter=iters).x


class FastDataConsistency:
    """The data-consistency solve of the fast step, compiled once per engine (on first use)."""

    def __init__(self, cg_iters: int, *, compile: bool, device: torch.device) -> None:
        self.cg_iters = int(cg_iters)
        self.compile = bool(compile)
        self.device = device
        self._fn: Callable[..., torch.Tensor] = (
            _quiet_compile(_dc_solve, device) if compile else _dc_solve)

    def __call__(self, rhs: torch.Tensor, x0: torch.Tensor, shift: torch.Tensor,
                 parts: Any) -> torch.Tensor:
        y = self._fn(rhs, x0, shift, parts.maps_u, parts.maps_u_conj, parts.mask2_u,
                     parts.dims, parts.fft_dims, self.cg_iters)
        return y.clone() if self.compile and self.device.type == "cuda" else y


def fast_step(*, prior: nn.Module, alpha: float, lam: torch.Tensor, dc: FastDataConsistency,
              parts: Any, aty: torch.Tensor, support: torch.Tensor | None,
              lam_scale: torch.Tensor | None = None) -> StepFn:
    """T(x) of :class:`~molrecon.deq.mol.MolStep` with the fast prior and solve (the same
    equation; αλ and 1/(αλ) computed once; ``lam_scale`` (B,) multiplies λ per item)."""
    al = item_weight(alpha * lam.detach().to(aty.real.dtype), lam_scale, aty)  # () or (B,)
    shift = 1.0 / al
    al = per_item(al, aty)
    mark = dc.compile and dc.device.type == "cuda"

    def step(x: torch.Tensor) -> torch.Tensor:
        if mark:
            torch.compiler.cudagraph_mark_step_begin()
        z = (1.0 - alpha) * x + alpha * prior(x)                        # (B, D, Y, X)
        if support is not None:
            z = z * support
        return dc(z / al + aty, x, shift, parts)
    return step


__all__ = ["GATE_KEY", "PRECISIONS", "FastDataConsistency", "FrozenPrior", "fast_prior",
           "fast_step", "resolve_precision"]
