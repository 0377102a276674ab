"""Certified upper bounds of the operator norm of zero-padded convolutions (MOL-SN).

The quantity bounded
--------------------
A convolution layer with kernel ``W`` of shape ``(C_out, C_in, k, ..., k)`` (``d``
spatial axes, ``k`` odd) acting on a finite image with zero padding ("same"
output size) is ``P_out · C_W · E_in``: zero-extension of the input to the
infinite grid ℤᵈ, convolution on ℤᵈ, restriction to the image. Extension and
restriction have norm 1, so

    ‖conv_W‖ ≤ ‖C_W‖_{ℓ²(ℤᵈ)} = M := sup_{ω ∈ [0, 2π)ᵈ} ‖K̂(ω)‖₂,
    K̂(ω) = Σ_j W[:, :, j] · exp(−i ω·j)        (a C_out × C_in matrix),

because convolution on ℤᵈ is a Fourier multiplier with the matrix symbol K̂
(Sedghi, Gupta & Long 2019 give the circular case: on an n×n torus the
singular values are those of K̂ at the n² grid frequencies). PyTorch's
cross-correlation has the symbol K̂(−ω), with the same supremum; the bound
holds for every image size, odd or even.

From samples to a certified supremum
------------------------------------
K̂ is sampled on a grid; a sampled maximum is only a *lower* estimate of M.
The correction below turns it into an upper bound.

Let ``N = (k − 1)/2``: with centred tap indices every entry of K̂ is a
trigonometric polynomial of degree ≤ N in each ω_i. Let ω* attain M with unit
singular vectors u, v, phased so that u*K̂(ω*)v = M, and put
p(ω) = Re(u* K̂(ω) v). Then |p| ≤ M everywhere and p(ω*) = M.

* Along one axis, q(t) = p(ω + t·e_i)/M is a real trigonometric polynomial of
  degree ≤ N bounded by 1. The Bernstein–Szegő inequality q'² + N²q² ≤ N²
  makes θ(t) = arccos q(t) N-Lipschitz. Walking from ω* to a grid point g one
  axis at a time therefore gives arccos(p(g)/M) ≤ N‖g − ω*‖₁ (torus ℓ¹
  distance), i.e. p(g) ≥ M cos(N‖g − ω*‖₁) when N‖g − ω*‖₁ ≤ π/2.
* ‖K̂(g)‖₂ ≥ |u*K̂(g)v| ≥ p(g). Hence for any sample set S with ℓ¹ covering
  radius r (every ω within ℓ¹ distance r of S) and N·r < π/2:

      M ≤ max_{g ∈ S} ‖K̂(g)‖₂ / cos(N·r).

The sample set used here is the union of the G-point grid ω = 2πg/G and the
same grid shifted by half a cell in every axis, ω = 2π(g + ½)/G. If aᵢ ∈ [0, π/G]
is the distance of ωᵢ to the nearest point of the first grid along axis i,
the distance to the shifted grid is π/G − aᵢ, so the ℓ¹ distance to S is at
most min(Σaᵢ, Σ(π/G − aᵢ)) ≤ dπ/(2G): r = dπ/(2G). (At equal cost a plain grid
would have a radius 2^(1 − 1/d) times larger.) For 3×3 kernels the factor
1/cos(N r) is 1.0048 in 2D at G = 32 and 1.0196 in 3D at G = 24. Real
kernels have K̂(−ω) = conj K̂(ω) (the same singular values), so half of each
grid is evaluated: 1056 frequencies in 2D at G = 32, 14 400 in 3D at G = 24.

The per-frequency largest singular value is computed by an SVD in float64,
and the result is multiplied by ``1 + ROUNDING_MARGIN`` (1e−10), far above
the backward error of a float64 SVD of 64×64 matrices (~1e−13 relative).

Why a power iteration is not a certificate
------------------------------------------
A power-iteration estimate is a Rayleigh quotient: it is never larger than the
norm it estimates, so dividing a layer by it can leave the layer's norm above
the intended budget, and with one step per training iteration the estimate
also lags behind the weights. Spectral normalisation in the style of Miyato
et al. additionally estimates the norm of the kernel reshaped to a
C_out × (C_in·kᵈ) matrix W_mat, which is a different quantity: since
W_mat W_matᴴ = Σ_j W_j W_jᴴ is the average of K̂(ω)K̂(ω)ᴴ over ω and
K̂(ω) = W_mat (e(ω) ⊗ I) with ‖e(ω)‖ = k^(d/2),

    ‖W_mat‖ ≤ M ≤ k^(d/2) ‖W_mat‖,

so a normalised reshaped kernel may still have a convolution norm up to 3×
(2D) or 5.2× (3D) its budget. Only an upper bound of M, multiplied over the
layers (ReLU is 1-Lipschitz, biases do not change Lipschitz constants),
certifies the network.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

#: Relative safety factor applied to the float64 grid maximum (see module docstring).
ROUNDING_MARGIN = 1e-10

#: Default number of grid points per axis, by number of spatial dimensions.
DEFAULT_GRID: dict[int, int] = {1: 64, 2: 32, 3: 24}

#: Frequencies evaluated per chunk (bounds memory: chunk · C_out · C_in complex128).
_CHUNK = 1024


def _kernel_geometry(weight: torch.Tensor) -> tuple[int, int]:
    """Return (spatial dims d, kernel size k) of a ``(C_out, C_in, k, ..., k)`` kernel."""
    d = weight.ndim - 2
    if d < 1:
        raise ValueError("convolution kernel must have shape (C_out, C_in, k, ...), "
                         f"got {tuple(weight.shape)}")
    sizes = set(weight.shape[2:])
    if len(sizes) != 1:
        raise ValueError("kernel must be the same size along every axis, "
                         f"got {tuple(weight.shape[2:])}")
    k = int(weight.shape[2])
    if k % 2 != 1:
        raise ValueError(f"kernel size must be odd for symmetric zero padding, got {k}")
    return d, k


def default_grid(dims: int) -> int:
    """Grid points per axis used when none is given (see module docstring for the cost)."""
    return DEFAULT_GRID.get(dims, 16)


def grid_correction(dims: int, kernel: int, grid: int) -> float:
    """The factor 1/cos(N·r), N = (kernel − 1)/2, r = dims·π/(2·grid), certifying a grid max.

    Raises ``ValueError`` when the grid is too coarse for the bound (N·r ≥ π/2).
    """
    degree = (kernel - 1) // 2
    radius = dims * math.pi / (2 * grid)
    angle = degree * radius
    if angle >= math.pi / 2:
        raise ValueError(f"grid {grid} too coarse for a {kernel}-tap kernel in {dims}D "
                         f"(need grid > {degree * dims})")
    return 1.0 / math.cos(angle)


def _union_grid(dims: int, grid: int, device: torch.device) -> torch.Tensor:
    """Frequencies (F, d) of the grid and its half-cell shift, halved by conjugate symmetry."""
    two_pi = 2.0 * math.pi
    parts = []
    for offset, last in ((0.0, grid // 2 + 1), (0.5, (grid + 1) // 2)):
        axes = [torch.arange(grid, dtype=torch.float64, device=device) for _ in range(dims - 1)]
        axes.append(torch.arange(last, dtype=torch.float64, device=device))
        mesh = torch.meshgrid(*axes, indexing="ij")
        pts = torch.stack([m.reshape(-1) for m in mesh], dim=1)       # (F_part, d)
        parts.append((pts + offset) * (two_pi / grid))
    return torch.cat(parts, dim=0)                                      # (F, d)


def _tap_offsets(dims: int, kernel: int, device: torch.device) -> torch.Tensor:
    """Centred tap positions j − (k − 1)/2 in the kernel's memory order, shape (k^d, d)."""
    c = (kernel - 1) / 2
    axes = [torch.arange(kernel, dtype=torch.float64, device=device) - c for _ in range(dims)]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=1)


def frequency_response(weight: torch.Tensor, omegas: torch.Tensor) -> torch.Tensor:
    """K̂(ω) = Σ_j W[:, :, j] exp(−i ω·(j − c)) at the given frequencies.

    ``weight`` (C_out, C_in, k, ..., k) real; ``omegas`` (F, d) in radians.
    Returns complex (F, C_out, C_in) in the complex dtype matching ``weight``.
    Differentiable with respect to ``weight``.
    """
    d, k = _kernel_geometry(weight)
    c_out, c_in = weight.shape[:2]
    taps = _tap_offsets(d, k, weight.device)                            # (k^d, d)
    phase = taps @ omegas.to(torch.float64).T                           # (k^d, F)
    cos = torch.cos(phase).to(weight.dtype)
    sin = torch.sin(phase).to(weight.dtype)
    w = weight.reshape(c_out * c_in, -1)                                # (Co·Ci, k^d)
    resp = torch.complex(w @ cos, -(w @ sin))                           # (Co·Ci, F)
    return resp.T.reshape(-1, c_out, c_in)                              # (F, Co, Ci)


def _largest_singular_value(mats: torch.Tensor) -> torch.Tensor:
    """σ_max of a batch (F, m, n) of matrices, shape (F,)."""
    return torch.linalg.svdvals(mats)[..., 0]


def _chunks(omegas: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, omegas.shape[0], _CHUNK):
        yield omegas[start:start + _CHUNK]


@dataclass(frozen=True)
class GridMaximum:
    """Largest sampled singular value of K̂ (float64) and where it is attained."""

    value: float
    omega: tuple[float, ...]
    correction: float

    @property
    def bound(self) -> float:
        """The certified upper bound of the layer's operator norm."""
        return self.value * self.correction * (1.0 + ROUNDING_MARGIN)


@torch.no_grad()
def grid_maximum(weight: torch.Tensor, *, grid: int | None = None) -> GridMaximum:
    """Evaluate ‖K̂(ω)‖₂ on the union grid in float64 and return its maximum and argmax."""
    d, k = _kernel_geometry(weight)
    g = default_grid(d) if grid is None else int(grid)
    corr = grid_correction(d, k, g)
    w64 = weight.detach().to(torch.float64)
    omegas = _union_grid(d, g, weight.device)
    best_val = -1.0
    best_omega: tuple[float, ...] = tuple(0.0 for _ in range(d))
    for chunk in _chunks(omegas):
        sig = _largest_singular_value(frequency_response(w64, chunk))   # (F_chunk,)
        idx = int(torch.argmax(sig))
        val = float(sig[idx])
        if val > best_val:
            best_val = val
            best_omega = tuple(float(v) for v in chunk[idx])
    return GridMaximum(value=best_val, omega=best_omega, correction=corr)


def bound_at(weight: torch.Tensor, gm: GridMaximum) -> torch.Tensor:
    """The certified bound as a tensor whose value is ``gm.bound`` and whose gradient is
    that of ``correction · ‖K̂(ω*)‖₂`` at the grid argmax ω* (the bound's gradient almost
    everywhere). Shape (), dtype of ``weight``."""
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return torch.tensor(gm.bound, dtype=weight.dtype, device=weight.device)
    omega = torch.tensor([gm.omega], dtype=torch.float64, device=weight.device)   # (1, d)
    sigma = _largest_singular_value(frequency_response(weight, omega))[0] * gm.correction
    return sigma + (gm.bound - sigma).detach()


def conv_norm_bound(weight: torch.Tensor, *, grid: int | None = None) -> torch.Tensor:
    """Certified upper bound of the operator norm of the zero-padded convolution with ``weight``.

    Valid for every input size. Differentiable (see :func:`bound_at`). Shape ().
    """
    return bound_at(weight, grid_maximum(weight, grid=grid))


def reshaped_kernel_norm(weight: torch.Tensor) -> float:
    """‖W_mat‖₂ of the kernel reshaped to C_out × (C_in·kᵈ): what Miyato-style spectral
    normalisation estimates. A lower bound of the convolution's frequency-response
    supremum (see module docstring), never an upper bound."""
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    return float(torch.linalg.matrix_norm(w, ord=2))


class HasEffectiveWeights(Protocol):
    def effective_weights(self) -> list[torch.Tensor]: ...


def layer_bounds(model: HasEffectiveWeights, *, grid: int | None = None) -> list[float]:
    """Certified operator-norm bound of every layer as the model applies it."""
    if grid is None:
        grid = getattr(model, "spectral_grid", None)
    with torch.no_grad():
        weights = model.effective_weights()
    return [grid_maximum(w, grid=grid).bound for w in weights]


def certified_bound(model: HasEffectiveWeights, *, grid: int | None = None) -> float:
    """Global Lipschitz certificate of a ReLU convolutional network: ∏ layer bounds.

    ReLU is 1-Lipschitz and biases do not change Lipschitz constants, so the
    product of certified per-layer operator-norm bounds bounds ‖H(x) − H(y)‖/‖x − y‖
    for all x ≠ y of any size. A network with an identity path adds the path's gain
    (its own ``bound_from``).
    """
    bounds = layer_bounds(model, grid=grid)
    bound_from = getattr(model, "bound_from", None)
    return float(bound_from(bounds)) if bound_from is not None else math.prod(bounds)
