"""Open a raw-data file of either supported kind, recognised by its contents.

* ISMRMRD: an HDF5 group (normally ``/dataset``) holding ``xml`` and ``data``;
* fastMRI: an HDF5 file with a root dataset ``kspace``.

The file name and extension play no part in the decision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import h5py

from ..errors import InputDataError
from .fastmri import read_fastmri
from .ismrmrd import hdf5_errors, open_hdf5, read_ismrmrd
from .types import RawScan

__all__ = ["detect_format", "read_raw"]

RawFormat = Literal["ismrmrd", "fastmri"]


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


def detect_format(path: str | os.PathLike[str]) -> tuple[RawFormat, str | None]:
    """``("ismrmrd", group)`` or ``("fastmri", None)``; :class:`InputDataError` otherwise."""
    p = Path(path)
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


def read_raw(path: str | os.PathLike[str], *, prewhiten: bool = True) -> RawScan:
    """Read an ISMRMRD or fastMRI file into a :class:`RawScan`.

    ``prewhiten`` applies to ISMRMRD files with noise acquisitions (fastMRI files
    have none). Any unusable input (missing path, a folder, not HDF5, HDF5 of
    neither kind, malformed content) raises :class:`InputDataError` naming the file.
    """
    kind, group = detect_format(path)
    if kind == "fastmri":
        return read_fastmri(path)
    return read_ismrmrd(path, prewhiten=prewhiten, group=group or "dataset")
