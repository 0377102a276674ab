"""DICOM output of reconstructed images, and reading such a series back.

* :mod:`.writer`: :func:`write_dicom`, one MR Image Storage file per 2D plane of
  an :class:`~molrecon.io.types.ImageVolume`, written atomically into a folder
  (planes, geometry, intensities: see its module docstring), and
  :func:`check_dicom_output`, the early check of the output folder;
* :mod:`.reader`: :func:`read_dicom_series`, the NIfTI-ordered magnitude volume
  and its RAS affine rebuilt from a series' tags (for a series written by
  :func:`write_dicom`, the affine of :func:`molrecon.io.nifti.nifti_affine`).
"""

from __future__ import annotations

from .reader import read_dicom_series
from .writer import ANONYMOUS, check_dicom_output, write_dicom  # noqa: F401 - placeholder patient name

__all__ = ["check_dicom_output", "read_dicom_series", "write_dicom"]
