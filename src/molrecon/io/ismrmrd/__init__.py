"""ISMRMRD raw data (HDF5 ``/dataset/xml`` + ``/dataset/data``): bulk reader and writer.

Reading is done in bulk: all acquisition headers come from one h5py read of the
``head`` member of the compound table, and the samples are read in blocks of
consecutive rows (about 64 MiB each) and scattered into the k-space array with
vectorised indexing. No per-acquisition Python object is created, so tens of
thousands of acquisitions load in seconds.

The stages, one module each:

* :mod:`.header`: the XML header -> :class:`HeaderFields` (matrix sizes, fields
  of view, encoding limits, scanner and sequence facts);
* :mod:`.layout`: acquisition flags, skipped acquisition classes, the
  acquisition header's numpy type, size limits;
* :mod:`.plan`: acquisition headers -> :class:`AcquisitionPlan` (kind, k-space
  shape, the grid position of every used line), before any sample is read;
* :mod:`.assemble`: samples -> k-space (readout placement, oversampling
  removal, prewhitening, averaging), then mask, calibration region and
  geometry -> :class:`~molrecon.io.types.RawScan`;
* :mod:`.reader`: :func:`read_ismrmrd`, the HDF5 side of reading;
* :mod:`.writer`: :func:`write_ismrmrd`.

The twix and MRD v2 readers convert their headers to ISMRMRD acquisition
headers and :class:`HeaderFields` and go through the same planner and
assembler. The numpy k-space helpers that every raw-data reader shares
(readout oversampling removal, calibration region, noise covariance and
prewhitening, size and memory checks) are in :mod:`molrecon.io.kspace`.

How acquisitions become ``RawScan.kspace`` (shape ``(B, C, D, Y, X)``)
----------------------------------------------------------------------
Acquisition classes (flags are 1-based bit numbers, flag ``n`` is ``1 << (n-1)``):

* noise (``ACQ_IS_NOISE_MEASUREMENT``, 19): used only to estimate the coil noise
  covariance, never placed in k-space;
* skipped: navigators (23), phase correction (24), HP feedback (26), dummy scans
  (27), RT feedback (28), surface-coil correction (29), phase stabilisation (30, 31);
* everything else is image data, including calibration lines. Lines flagged
  ``ACQ_IS_PARALLEL_CALIBRATION`` (20, ACS only) are real measurements of the
  same object: they are placed in ``kspace`` and count as sampled in ``mask``,
  unless an imaging line exists at the same k-space position (then the imaging
  line wins and the ACS line is not used). Lines with either calibration flag
  (20 or ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``, 21) mark ``calib``.
  Without any calibration flag, ``calib`` is the largest fully sampled block
  around the k-space centre (:func:`find_calibration_region`).
* reversed readouts (``ACQ_IS_REVERSE``, 22; EPI) are rejected: they need a
  phase correction molrecon does not do.

Kinds: encoded matrix z > 1 gives ``"3d"`` (``kspace_encode_step_2`` -> D).
Otherwise frames in ``idx.phase`` (cine), or else several ``idx.repetition``
values, give ``"2dt"`` with frames -> D; else ``"2d"``. ``idx.slice`` -> B, for
every kind. Only the first contrast and the first set are used (with a
warning), and likewise the first repetition/phase where they are not the frame
axis. Slices and frames are numbered compactly in index order; the slices of a
multi-slice scan are then ordered by their position along the slice direction,
so that B runs along ``+slice_dir`` with a constant step (what NIfTI needs).

Lines that land on the same ``(b, d, y)`` position (``idx.average``, repeated
ACS lines) are averaged: summed and divided by their count. ``mask`` is True
exactly where at least one line landed.

Readout (``X``): the samples of a line, after dropping ``discard_pre`` /
``discard_post``, are placed on the encoded grid of ``encodedSpace.x`` points so
that ``center_sample`` lands on index ``x_enc // 2``; the rest is zero-filled
(asymmetric echoes). A ``center_sample`` of 0 on a full-length line is read as
"not set" and the line taken as symmetric. The readout oversampling is then
removed: centred inverse FFT along the readout, crop the central
``X = x_enc · FOV_recon,x / FOV_enc,x`` points (the recon matrix x whenever the
header is self-consistent), centred forward FFT. All FFTs are orthonormal, so
the cropped image equals the centre of the oversampled one and white noise
keeps its per-sample variance.

Phase and partition encoding (``Y``, ``D`` for 3D): a line with index ``k`` goes
to grid index ``N // 2 + (k - center)`` where ``center`` comes from the header's
``encodingLimits`` (``N // 2`` if absent, or if it is 0 while the maximum is not:
a limit left unfilled) and ``N`` is the *encoded* matrix size.
Indices outside the header's limits are an error. If the encoded matrix is too
small to hold the lines around their centre (some converters count only the
acquired lines of a partial-Fourier scan), the grid is enlarged just enough,
keeping the encoded field of view, with a warning. The reconstruction covers
the encoded field of view in y and z: phase/slice oversampling is kept (not
cropped to ``reconSpace``), and ``Geometry`` describes that grid exactly.

Noise: the covariance ``Ψ = (1/N) Σ n nᴴ`` (C×C, complex128) over all noise
samples, scaled by ``dwell_noise / dwell_data`` when the two dwell times
(``sample_time_us``) differ (noise variance grows with the bandwidth). With
``prewhiten=True`` every line is multiplied by ``L⁻¹`` where ``Ψ = L Lᴴ``
(Cholesky), so coil noise becomes white with unit variance per sample (on
lines averaged n times the variance is 1/n).

Ground truth: a ``phantom`` dataset beside ``data`` (as written by Debian's
``ismrmrd_generate_cartesian_shepp_logan``) is returned as
``RawScan.ground_truth`` ``(B, D, Y, X)`` when its shape fits; its intensity
scale is the producer's, not the k-space's.

Header: parsed with ``ismrmrd.xsd.CreateFromDocument``. Headers written against
a newer schema (elements this ismrmrd-python does not know) fail there with an
xsdata ``ParserError``; molrecon then parses again with unknown elements
ignored (the same xsdata classes, ``fail_on_unknown_properties=False``) and
records a warning. Malformed XML or a header without the required elements is
an :class:`~molrecon.errors.InputDataError`, and so are matrix sizes and
encoding limits outside the schema's ``unsignedShort`` range (0..65535). XML
entities are never expanded beyond expat's amplification limit nor fetched
from outside. A field of view that is not finite or beyond ``MAX_FOV_MM``
counts as missing.

Hostile or damaged files
------------------------
Every size is checked before the allocation it implies: at most
``MAX_ACQUISITIONS`` rows in the table, at most ``MAX_KSPACE_ELEMENTS`` k-space
values, and neither more than the memory available now
(:class:`~molrecon.errors.ResourceError`). Failures of the HDF5 library on a
file that opened (damaged B-trees, heaps or type descriptions) become an
:class:`~molrecon.errors.InputDataError`. Acquisition headers written with
other field widths are converted to ISMRMRD's layout; a missing field is an
error. Samples that are finite in the file but overflow float32 in the readout
FFT or the whitening are refused. Slice positions that are not finite (or
beyond ``MAX_FOV_MM``) are replaced by the origin, and direction vectors that
are not finite or not an orthonormal frame count as unknown orientation, each
with a :class:`~molrecon.errors.GeometryWarning`.
"""

from __future__ import annotations

from ..kspace import (
    MAX_KSPACE_ELEMENTS,
    find_calibration_region,
    noise_covariance,
    open_hdf5,
    partial_fourier_fraction,
    remove_readout_oversampling,
)
from .assemble import assemble_kspace, assemble_scan
from .header import EncodingLimit, HeaderFields, header_fields, parse_ismrmrd_header
from .layout import (
    ACQ_FIRST_IN_SLICE,
    ACQ_IS_NOISE_MEASUREMENT,
    ACQ_IS_PARALLEL_CALIBRATION,
    ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    ACQ_IS_REVERSE,
    ACQ_LAST_IN_MEASUREMENT,
    ACQ_LAST_IN_SLICE,
    MAX_ACQUISITIONS,
    MAX_FOV_MM,
    SKIPPED_FLAGS,
    flag_bit,
    head_dtype,
)
from .plan import AcquisitionPlan, plan_acquisitions
from .reader import read_ismrmrd
from .writer import write_ismrmrd

__all__ = [
    "ACQ_FIRST_IN_SLICE",
    "ACQ_IS_NOISE_MEASUREMENT",
    "ACQ_IS_PARALLEL_CALIBRATION",
    "ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING",
    "ACQ_IS_REVERSE",
    "ACQ_LAST_IN_MEASUREMENT",
    "ACQ_LAST_IN_SLICE",
    "MAX_ACQUISITIONS",
    "MAX_FOV_MM",
    "MAX_KSPACE_ELEMENTS",
    "SKIPPED_FLAGS",
    "AcquisitionPlan",
    "EncodingLimit",
    "HeaderFields",
    "assemble_kspace",
    "assemble_scan",
    "find_calibration_region",
    "flag_bit",
    "head_dtype",
    "header_fields",
    "noise_covariance",
    "open_hdf5",
    "parse_ismrmrd_header",
    "partial_fourier_fraction",
    "plan_acquisitions",
    "read_ismrmrd",
    "remove_readout_oversampling",
    "write_ismrmrd",
]
