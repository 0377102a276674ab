"""Receive-coil sensitivities of a simulated scan, and the noise correlation between coils.

Each coil is a straight wire segment parallel to the patient's head-foot axis,
placed on a cylinder of random radius (115-150 mm), rotation and slight
off-centring, one ring for up to 8 coils and two rings above that; around a body
(the torso) on an elliptic cylinder 10-45 mm outside its outline. A segment
from ``z1`` to ``z2`` at transverse distance ``rho`` has field magnitude
``[(z2 - z)/sqrt(rho^2 + (z2 - z)^2) - (z1 - z)/sqrt(rho^2 + (z1 - z)^2)] / rho``
and a transverse phase that turns with the angle around the wire, times a random
complex gain per coil. :func:`_normalised_maps` scales the maps pointwise so that
``sum_c |S_c|^2 = 1``. The noise covariance ``Psi`` has unit mean diagonal,
random coil gains (0.7-1.3) and correlations that fall with the distance
between coils.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .image import Coords


@dataclass(frozen=True)
class _CoilArray:
    """Straight wire segments parallel to the LPS z axis (see the module docstring)."""

    xy: np.ndarray        # (C, 2) transverse positions, mm
    z_ends: np.ndarray    # (C, 2) segment ends along z, mm
    gains: np.ndarray     # (C,) complex
    softening_mm: float = 5.0

    @staticmethod
    def random(n_coils: int, rng: np.random.Generator,
               body: tuple[float, float] | None = None) -> _CoilArray:
        """A random array; around a head by default, or on an ellipse 10-45 mm outside a
        body of transverse semi-axes ``body`` (mm, along LPS x and y), the same draws."""
        rings = 1 if n_coils <= 8 else 2
        per_ring = [n_coils // rings + (1 if r < n_coils % rings else 0) for r in range(rings)]
        radius = rng.uniform(115.0, 150.0)
        centre = np.clip(rng.normal(0.0, 5.0, size=2), -12.0, 12.0)
        z_mid = rng.uniform(-15.0, 15.0)
        rotation = rng.uniform(0.0, 2.0 * math.pi)
        length = 140.0 if rings == 1 else 80.0
        xy, z_ends = [], []
        for r, n in enumerate(per_ring):
            zc = z_mid if rings == 1 else z_mid + (r - 0.5) * 70.0
            for j in range(n):
                angle = rotation + 2.0 * math.pi * (j + 0.5 * r) / n + rng.normal(0.0, 0.05)
                if body is None:
                    xy.append(centre + radius * np.array([math.cos(angle), math.sin(angle)]))
                else:
                    gap = radius - 105.0                                    # 10-45 mm
                    xy.append(centre + np.array([(body[0] + gap) * math.cos(angle),
                                                 (body[1] + gap) * math.sin(angle)]))
                z_ends.append((zc - length / 2.0, zc + length / 2.0))
        gains = rng.uniform(0.8, 1.25, size=n_coils) * np.exp(
            1j * rng.uniform(-math.pi, math.pi, size=n_coils))
        return _CoilArray(np.asarray(xy), np.asarray(z_ends), gains)

    @property
    def n_coils(self) -> int:
        return int(self.xy.shape[0])

    def raw(self, c: int, points: Coords) -> np.ndarray:
        """Unnormalised complex sensitivity of coil ``c`` at LPS ``points``.

        Complex64 for float32 coordinates, complex128 for float64 ones.
        """
        dx = points[0] - float(self.xy[c, 0])
        dy = points[1] - float(self.xy[c, 1])
        rho2 = dx * dx + dy * dy + self.softening_mm ** 2
        a2 = float(self.z_ends[c, 1]) - points[2]
        a1 = float(self.z_ends[c, 0]) - points[2]
        # |B| of the segment over rho, times 100 mm to keep numbers near 1.
        weight = (a2 / np.sqrt(rho2 + a2 * a2) - a1 / np.sqrt(rho2 + a1 * a1)) * (100.0 / rho2)
        out = np.empty(np.shape(weight), dtype=np.result_type(weight.dtype, np.complex64))
        g = complex(self.gains[c]) * 1j
        out.real = (g.real * dx - g.imag * dy) * weight    # g * (dx + i dy) * weight
        out.imag = (g.real * dy + g.imag * dx) * weight
        return out

    def noise_covariance(self, rng: np.random.Generator) -> np.ndarray:
        """Psi (C, C): Gaussian-kernel correlations of the coil positions, random gains/phases."""
        n = self.n_coils
        pos = np.concatenate([self.xy, self.z_ends.mean(axis=1, keepdims=True)], axis=1)
        if n == 1:
            return np.ones((1, 1), dtype=np.complex128)
        d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
        nearest = np.sort(d, axis=1)[:, 1].mean()
        kernel = np.exp(-(d ** 2) / (2.0 * (0.9 * nearest) ** 2))
        mix = rng.uniform(0.25, 0.4)
        corr = (1.0 - mix) * np.eye(n) + mix * kernel
        u = np.exp(1j * rng.uniform(-math.pi, math.pi, size=n))
        corr = corr * np.outer(u, u.conj())
        g = np.sqrt(rng.uniform(0.7, 1.3, size=n))
        psi = corr * np.outer(g, g)
        return psi / np.real(np.trace(psi)) * n


def _normalised_maps(coils: _CoilArray, points: Coords) -> np.ndarray:
    """(C, ...) coil maps with sum_c |S_c|^2 = 1 at every point."""
    raw = np.stack([coils.raw(c, points) for c in range(coils.n_coils)])
    return raw / np.sqrt(np.sum(np.abs(raw) ** 2, axis=0))
