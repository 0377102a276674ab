"""Centred, orthonormal FFTs over trailing spatial axes.

``fftc`` maps image to k-space with the k-space centre (DC) at index ``n // 2``
on every transformed axis, for odd and even sizes alike, and preserves the
2-norm (``norm="ortho"``), so ``ifftc`` is its exact adjoint and inverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kinds import spatial_dims

__all__ = ["fftc", "ifftc", "spatial_dims"]


def fftc(x: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    dims = tuple(dims)
    x = torch.fft.ifftshift(x, dim=dims)
    x = torch.fft.fftn(x, dim=dims, norm="ortho")
    return torch.fft.fftshift(x, dim=dims)


def ifftc(k: torch.Tensor, dims: Sequence[int] = (-2, -1)) -> torch.Tensor:
    dims = tuple(dims)
    k = torch.fft.ifftshift(k, dim=dims)
    k = torch.fft.ifftn(k, dim=dims, norm="ortho")
    return torch.fft.fftshift(k, dim=dims)


