"""Realistic raw multicoil Cartesian k-space simulated from real anatomy.

The pipeline runs the scanner backwards, and is built so that a reconstruction
cannot succeed merely because the simulation used its own model ("no inverse
crime"):

1. **Object** (:mod:`~molrecon.sim.image`). The magnitude anatomy
   (:mod:`~molrecon.sim.anatomy`, 1 mm or finer) is resampled trilinearly on a
   *fine grid* ``grid_factor`` (default 2) times finer than the reconstruction
   grid, over the *encoded* field of view: the readout covers ``oversampling``
   (default 2) times the reconstruction FOV, as a scanner's oversampled readout
   does, so the object sits in the middle of a wider readout FOV. A 2D slice
   averages several planes across the slice thickness (partial volume, boxcar
   slice profile). The magnitude is optionally warped (gamma, monotone curve)
   and multiplied by a smooth random phase ``exp(i phi(r))`` (constant + linear
   + quadratic terms + a few long wavelength cosines, evaluated in patient
   coordinates): ``m(r)``.
2. **Coils** (:mod:`~molrecon.sim.coils`). Receive sensitivities are
   Biot-Savart fields of straight wire segments parallel to the patient's
   head-foot axis, placed on a cylinder of random radius (115-150 mm), rotation
   and slight off-centring, one ring for up to 8 coils and two rings above
   that. A segment from ``z1`` to ``z2`` at transverse distance ``rho`` has
   field magnitude
   ``[(z2 - z)/sqrt(rho^2 + (z2 - z)^2) - (z1 - z)/sqrt(rho^2 + (z1 - z)^2)] / rho``
   and a transverse phase that turns with the angle around the wire, times a
   random complex gain per coil. The maps are normalised pointwise,
   ``S_c <- S_c / sqrt(sum_c |S_c|^2)``, so ``sum_c |S_c|^2 = 1`` everywhere:
   the receive bias field is left out of the simulation (equivalently, it is
   part of the object), and a SENSE/ESPIRiT reconstruction targets ``m`` itself.
3. **k-space** (:mod:`~molrecon.sim.kspace`). For each coil,
   ``k_c = crop(F(S_c m)) * sqrt(N_crop / N_fine)``: the centred orthonormal
   FFT on the fine grid, cropped to the central (encoded) matrix
   ``Xenc x Y [x Z]``; the factor keeps image intensities the same on both
   grids. The products ``S_c m`` are formed on the fine grid and then truncated
   in k-space, so the data are not "coil maps on the reconstruction grid times
   a discrete image": a reconstruction using the reconstruction-grid maps
   ``maps`` meets a small model mismatch, as with a real object, and never the
   exact operator that made the data.
4. **Noise** (:mod:`~molrecon.sim.kspace`). Correlated complex Gaussian noise
   ``n = sigma L z`` with ``Psi = L L^H`` is added to every k-space sample.
   ``Psi`` has unit mean diagonal, random coil gains (0.7-1.3) and off-diagonal
   correlations that fall with the distance between coils (about 0.1-0.25
   between neighbours). ``sigma = noise * p99(|truth|)``: ``noise`` is the
   inverse of the SNR of bright tissue in the coil-combined image. A noise scan
   of ``C x N`` samples of the same noise is written too. Unsampled entries are
   then zeroed.
5. **Sampling.** :func:`molrecon.physics.masks.make_mask`; the ACS region is
   flagged as calibration data.
6. **Files** (:mod:`~molrecon.sim.dataset`). One scan as ISMRMRD with its truth as
   NIfTI, or a dataset of one anatomy split with its manifest.

What a simulation depends on is a :class:`~molrecon.sim.config.SimulationConfig`.

The **truth** is defined as the image of the fully sampled, noise-free,
coil-combined data on the reconstruction grid::

    truth = crop_x( F^-1( crop(F(m)) * sqrt(N_crop / N_fine) ) )

i.e. the fine object low-pass filtered by exactly the k-space window that was
acquired, with the readout oversampling removed: complex, ``(B, D, Y, X)``, the
same kind, shape and :class:`~molrecon.io.types.Geometry` as a reconstruction
of the file, in the units of an orthonormal-FFT reconstruction of the
un-whitened data (``|truth|`` is about 1 in bright tissue). Because
``sum_c |S_c|^2 = 1``, the SENSE combination ``sum_c conj(S_c) k_c`` and the
root-sum-of-squares of the fully sampled coil images equal it up to the
smoothing of the coil maps by the same window (normalised correlation > 0.99).

Kinds: ``2d`` (one slice, or a stack of ``slices`` with a gap), ``3d`` (one slab,
partitions on D, a (ky, kz) Poisson-disc mask by default) and ``2dt`` (one slice
over ``frames`` with periodic motion: a breathing-like translation along the
phase direction plus a smooth radial contraction of a region, and
time-interleaved masks by default).

Geometry is in the patient frame (LPS, mm) with the centre of the head's
bounding box at the isocentre (0, 0, 0); orientations axial (default, read =
L, phase = P, slice = S, as for a head-first supine axial scan), coronal,
sagittal, each optionally tilted about the readout axis. The voxel ``i`` of an
axis of ``n`` voxels lies at ``(i - n // 2) * voxel`` from ``position``.
"""

from __future__ import annotations

from .anatomy import (
    SPLITS,
    AnatomySource,
    AnatomySubject,
    Split,
    anatomy_available,
    anatomy_extent,
    anatomy_landmarks,
    anatomy_source,
    anatomy_sources,
    anatomy_subjects,
    head_extent,
    load_anatomy,
)
from .config import ORIENTATIONS, AnatomyTransform, Orientation, SimulationConfig
from .dataset import (
    EXAMPLE_MATRIX,
    DatasetEntry,
    DatasetResult,
    dataset_plan,
    simulate_dataset,
    simulate_to_file,
    simulated_example,
)
from .kspace import SimulatedScan, simulate

__all__ = [
    "EXAMPLE_MATRIX", "ORIENTATIONS", "SPLITS", "AnatomySource", "AnatomySubject",
    "AnatomyTransform", "DatasetEntry", "DatasetResult", "Orientation", "SimulatedScan",
    "SimulationConfig", "Split", "anatomy_available", "anatomy_extent", "anatomy_landmarks",
    "anatomy_source",
    "anatomy_sources", "anatomy_subjects", "dataset_plan", "head_extent", "load_anatomy",
    "simulate", "simulate_dataset", "simulate_to_file", "simulated_example",
]
