"""Open a raw-data file of any supported kind, recognised by its contents.

* Siemens twix (``.dat``, VB or VD/VE): recognised from its first bytes
  (:func:`molrecon.io.twix.is_twix`), before the file is tried as HDF5;
* MRD v2 (the yardl stream of mrd-python, binary or NDJSON): recognised from its
  first bytes (:func:`molrecon.io.mrd.is_mrd2`), before the file is tried as HDF5;
* ISMRMRD: an HDF5 group (normally ``/dataset``) holding ``xml`` and ``data``;
* fastMRI: an HDF5 file with a root dataset ``kspace``.

The file name and extension play no part in the decision. Anything else is
reported as an HDF5 file of neither kind, or as not HDF5 at all.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal

import h5py

from ..errors import ConfigError, InputDataError, InputDataWarning
from .fastmri import read_fastmri
from .ismrmrd import read_ismrmrd
from .kspace import hdf5_errors, open_hdf5
from .mrd import is_mrd2, read_mrd2
from .twix import is_twix, read_twix
from .types import RawScan

__all__ = ["detect_format", "read_raw"]

RawFormat = Literal["ismrmrd", "fastmri", "twix", "mrd2"]


def ismrmrd_groups(path: str | os.PathLike[str]) -> list[str]:
    """Names of the groups of an HDF5 file that hold an ISMRMRD dataset (``xml`` and
    ``data``), ``dataset`` first; empty for any other file (twix, MRD v2 and unreadable
    ones too)."""
    p = Path(path)
    if is_twix(p) or is_mrd2(p):
        return []
    with open_hdf5(p) as f, hdf5_errors(p):
        return _all_groups(f)


def _all_groups(f: h5py.File) -> list[str]:
    names = ["dataset"] + sorted(n for n in f if n != "dataset")
    return [n for n in names if isinstance(f.get(n), h5py.Group)
            and "xml" in f[n] and "data" in f[n]]


def _ismrmrd_group(f: h5py.File) -> str | None:
    """Name of the group that holds an ISMRMRD dataset, preferring ``dataset``.

    A ``/dataset`` group with only one of ``xml`` and ``data`` still counts (the
    ISMRMRD reader then says which part is missing), unless the file is a
    fastMRI file.
    """
    names = ["dataset"] + sorted(n for n in f if n != "dataset")
    for name in names:
        node = f.get(name)
        if isinstance(node, h5py.Group) and "xml" in node and "data" in node:
            return name
    node = f.get("dataset")
    if isinstance(node, h5py.Group) and ("xml" in node or "data" in node) \
            and not isinstance(f.get("kspace"), h5py.Dataset):
        return "dataset"
    return None


def image_kind(path: Path) -> str | None:
    """``"NIfTI"``, ``"DICOM"``, ``"PNG"``, ``"JPEG"`` or ``"TIFF"`` when the file's first bytes
    say it is an image of that kind (a gzipped NIfTI too); None otherwise or when unreadable."""
    import gzip

    try:
        with open(path, "rb") as fh:
            head = fh.read(352)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as gz:
                head = gz.read(352)
    except (OSError, EOFError):
        return None
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00", b"n+2\x00", b"ni2\x00"):
        return "NIfTI"
    if head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "NIfTI"
    if head[128:132] == b"DICM":
        return "DICOM"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def detect_format(path: str | os.PathLike[str]) -> tuple[RawFormat, str | None]:
    """``("ismrmrd", group)``, ``("fastmri", None)``, ``("twix", None)`` or ``("mrd2", None)``.

    :class:`InputDataError` for anything else (missing path, a folder, neither
    twix, MRD v2 nor HDF5, HDF5 of neither kind).
    """
    p = Path(path)
    if is_twix(p):
        return "twix", None
    if is_mrd2(p):
        return "mrd2", None
    image = image_kind(p)
    if image is not None:
        raise InputDataError(f"is a {image} image, not raw k-space: molrecon reconstructs "
                             "raw scanner data (ISMRMRD, MRD v2, fastMRI, Siemens twix)", path=p)
    with open_hdf5(p) as f, hdf5_errors(p):
        group = _ismrmrd_group(f)
        if group is not None:
            return "ismrmrd", group
        if isinstance(f.get("kspace"), h5py.Dataset):
            return "fastmri", None
        found = ", ".join(sorted(f.keys())[:8]) or "nothing"
    raise InputDataError(
        "HDF5 file is neither ISMRMRD (a group with 'xml' and 'data', e.g. /dataset) nor "
        f"fastMRI (a /kspace dataset); it holds: {found}", path=p)


def read_raw(path: str | os.PathLike[str], *, prewhiten: bool = True,
             dataset: str | None = None) -> RawScan:
    """Read an ISMRMRD, fastMRI, Siemens twix or MRD v2 file into a :class:`RawScan`.

    ``prewhiten`` applies to ISMRMRD, twix and MRD v2 files with noise acquisitions
    (fastMRI files have none). Any unusable input (missing path, a folder, not
    HDF5, twix nor MRD v2, HDF5 of neither kind, malformed or unsupported content)
    raises :class:`InputDataError` naming the file.

    ``dataset`` names the ISMRMRD group to read in a file that holds several; without
    it the first (``dataset`` if present) is read and an :class:`InputDataWarning`
    lists the others.
    """
    kind, group = detect_format(path)
    if dataset is not None:
        if kind != "ismrmrd":
            raise ConfigError(f"--dataset is for ISMRMRD files; this is a {kind} file",
                              path=path)
        groups = ismrmrd_groups(path)
        if dataset not in groups:
            raise InputDataError(f"holds no ISMRMRD dataset {dataset!r} (it holds: "
                                 f"{', '.join(groups) or 'none'})", path=path)
        group = dataset
    elif kind == "ismrmrd":
        groups = ismrmrd_groups(path)
        if len(groups) > 1:
            warnings.warn(f"{path}: holds {len(groups)} ISMRMRD datasets ({', '.join(groups)}); "
                          f"reading {group!r} (choose one with --dataset)", InputDataWarning,
                          stacklevel=2)
    if kind == "fastmri":
        return read_fastmri(path)
    if kind == "twix":
        return read_twix(path, prewhiten=prewhiten)
    if kind == "mrd2":
        return read_mrd2(path, prewhiten=prewhiten)
    return read_ismrmrd(path, prewhiten=prewhiten, group=group or "dataset")
