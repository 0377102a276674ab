"""DICOM output of reconstructed images: the writer and reader are in :mod:`.writer`."""

from __future__ import annotations

from .writer import check_dicom_output, read_dicom_series, write_dicom

__all__ = ["check_dicom_output", "read_dicom_series", "write_dicom"]
