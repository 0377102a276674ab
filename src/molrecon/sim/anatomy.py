"""Real anatomy to simulate raw data from, and the train / validation / test split of it.

Every source is returned the same way by :func:`load_anatomy`: a float32 volume
scaled to [0, 1] (divided by its 99.9th percentile, then clipped) whose array
axes run along RAS+ (axis 0 towards the patient's Right, axis 1 Anterior,
axis 2 Superior), and its voxel size in mm. Single images (the ``planar``
sources) come back as ``(X, Y, 1)``: the picture's columns along axis 0 and its
rows, top first, running down axis 1 reversed, so the picture sits upright.

Sources
-------
``colin27`` (bundled, always available)
    One healthy adult, T1-weighted with skull, 1 mm (MNI Colin 27 via Debian's
    mricron-data; see ``data/anatomy/NOTICE``).
``colin27_hires`` (Debian ``mricron-data``)
    The same person at 0.5 mm (``ch2better``).
``mni152`` (PyPI ``nilearn``)
    ICBM 2009a symmetric template: an average of 152 adults, 1 mm.
``inia19`` (Debian ``mricron-data``)
    A rhesus macaque brain (skull removed), 0.5 mm: out of distribution on purpose.
``dipy_t1`` (PyPI ``dipy``)
    One coronal T1 slice of an unnamed subject (256 x 256, taken as 1 mm).
``shoulder``, ``abdomen`` (PyPI ``pydicom-data`` + ``pydicom``)
    One MR image each from pydicom's test files: other body parts, other contrast.
``torso`` (generated, always available)
    A procedural chest in a cine-like contrast (:mod:`molrecon.sim.torso`): the
    beating heart of cardiac-like 2D+time scans. Drawn by dataset mode only when
    asked for by name (``on_request``), so brain datasets stay brain.

The split, honestly
-------------------
Only one real human subject ships with molrecon, and offline there are few
more, so the split cannot be "disjoint people" alone. It is defined by source
*and* by disjoint slabs along the head's inferior-superior axis, given as
fractions of the head's extent (0 = lowest voxel of the head, 1 = the vertex):

* **train**: Colin 27 (either resolution) slabs [0.00, 0.50] (neck, cerebellum,
  temporal lobes, basal ganglia) and [0.88, 1.00] (vertex); MNI152, all of it.
* **val**: Colin 27 slab [0.54, 0.66] (lateral ventricles).
* **test**: Colin 27 slab [0.70, 0.84] (centrum semiovale, upper cortex); the
  macaque brain, the dipy slice, the shoulder and the abdomen (all of them).

The procedural torso is split the same way along its own superior axis (the
heart's long axis): apex, liver and the atria above the base for training,
mid-ventricular short-axis levels for validation and test.

Gaps of 0.04 (about 7 mm of Colin 27) separate the slabs, so no slice of one
split overlaps a slice of another (the dataset mode keeps axial slices and
rotates only in-plane, so a slice stays inside its slab). Validation and test
numbers on the Colin 27 slabs therefore measure generalisation to *other
anatomy of the same person*, not to other people; only the test-only sources
measure more than that. Augmentation (left-right flips, in-plane rotations,
intensity warps, and fresh coils, phase, noise and masks per file) makes the
training set varied but does not add subjects.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import ConfigError, InputDataError

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

MRICRON_TEMPLATES = Path("/usr/share/mricron/templates")


@dataclass(frozen=True)
class AnatomySource:
    """One place anatomy can come from."""

    name: str
    description: str
    subject: str          # who it shows; sources of one subject share the slab split
    licence: str
    install_hint: str     # what to install when it is missing ("" = bundled)
    planar: bool = False  # a single image, not a volume
    species: str = "human"
    on_request: bool = False  # dataset mode draws it only when the config names it
    #: For a generated source, the module of ``molrecon.sim`` that makes it: its
    #: ``volume()`` gives ``(data, voxel_mm)``, and it may give ``landmarks()`` (named voxel
    #: indices) and ``BODY_SEMI_AXES_MM`` (the body the receive coils must clear).
    generator: str = ""


@dataclass(frozen=True)
class AnatomySubject:
    """A source assigned to a split, with the slabs of it that belong to that split.

    ``slabs`` are (low, high) fractions of the head's inferior-superior extent.
    """

    source: str
    split: Split
    slabs: tuple[tuple[float, float], ...]
    note: str = ""


_SOURCES: tuple[AnatomySource, ...] = (
    AnatomySource("colin27", "Colin 27 T1 with skull, 1 mm (bundled)", "colin27",
                  "MNI notice (free use with copyright notice); MRIcron BSD-3-clause", ""),
    AnatomySource("colin27_hires", "Colin 27 T1, 0.5 mm (mricron-data ch2better)", "colin27",
                  "MNI notice; MRIcron BSD-3-clause", "apt install mricron-data"),
    AnatomySource("mni152", "ICBM152 2009a symmetric T1 template, 1 mm (nilearn)", "mni152",
                  "MNI notice; nilearn BSD-3-clause", "pip install nilearn"),
    AnatomySource("inia19", "INIA19 rhesus macaque T1 brain, 0.5 mm (mricron-data)", "inia19",
                  "INIA19 authors' terms (read in place, not redistributed)", "apt install mricron-data",
                  species="macaque"),
    AnatomySource("dipy_t1", "one coronal T1 slice (dipy test data)", "dipy_t1",
                  "dipy BSD-3-clause", "pip install dipy", planar=True),
    AnatomySource("shoulder", "shoulder MR image (pydicom-data MR2_UNCR)", "shoulder",
                  "pydicom-data MIT", "pip install pydicom pydicom-data", planar=True),
    AnatomySource("abdomen", "abdomen MR image (pydicom-data MR-SIEMENS-DICOM-WithOverlays)",
                  "abdomen", "pydicom-data MIT", "pip install pydicom pydicom-data",
                  planar=True),
    AnatomySource("torso", "procedural chest with a beating heart, cine-like contrast "
                  "(generated)", "torso", "generated by molrecon", "", on_request=True,
                  generator="torso"),
)
_BY_NAME = {s.name: s for s in _SOURCES}

_COLIN_SLABS: dict[str, tuple[tuple[float, float], ...]] = {
    "train": ((0.00, 0.50), (0.88, 1.00)),
    "val": ((0.54, 0.66),),
    "test": ((0.70, 0.84),),
}
_WHOLE = ((0.0, 1.0),)

_SUBJECTS: tuple[AnatomySubject, ...] = (
    *(AnatomySubject(src, split, _COLIN_SLABS[split],  # type: ignore[arg-type]
                     "Colin 27: one person, split by disjoint axial slabs")
      for split in SPLITS for src in ("colin27", "colin27_hires")),
    AnatomySubject("mni152", "train", _WHOLE, "population average; not Colin 27"),
    AnatomySubject("inia19", "test", _WHOLE, "macaque brain, out of distribution"),
    AnatomySubject("dipy_t1", "test", _WHOLE, "single coronal slice"),
    AnatomySubject("shoulder", "test", _WHOLE, "other body part, out of distribution"),
    AnatomySubject("abdomen", "test", _WHOLE, "other body part, out of distribution"),
    *(AnatomySubject("torso", split, _COLIN_SLABS[split],  # type: ignore[arg-type]
                     "procedural chest: split by disjoint levels along the heart's axis")
      for split in SPLITS),
)


def anatomy_sources() -> tuple[AnatomySource, ...]:
    """Every anatomy source molrecon knows (available or not)."""
    return _SOURCES


def anatomy_source(name: str) -> AnatomySource:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown anatomy {name!r} (choose from "
                          f"{', '.join(_BY_NAME)})") from None


def anatomy_subjects(split: str | None = None, *,
                     available_only: bool = False) -> tuple[AnatomySubject, ...]:
    """The split of the anatomy sources (see the module docstring for the reasoning).

    ``split`` filters to ``train``, ``val`` or ``test``; ``available_only`` drops
    sources that are not installed on this machine.
    """
    if split is not None and split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} (choose train, val or test)")
    chosen = tuple(s for s in _SUBJECTS if split is None or s.split == split)
    if available_only:
        chosen = tuple(s for s in chosen if anatomy_available(s.source))
    return chosen


# --------------------------------------------------------------------------- locating files

def _bundled(filename: str) -> Path:
    return Path(str(resources.files("molrecon") / "data" / "anatomy" / filename))


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root).joinpath(*parts)
        if candidate.is_file():
            return candidate
    return None


def _locate(name: str) -> Path | None:
    if name == "colin27":
        return _bundled("colin27_t1.nii.gz")
    if name == "colin27_hires":
        return MRICRON_TEMPLATES / "ch2better.nii.gz"
    if name == "inia19":
        return MRICRON_TEMPLATES / "inia19-t1-brain.nii.gz"
    if name == "mni152":
        return _package_file("nilearn", "datasets", "data",
                             "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if name == "dipy_t1":
        return _package_file("dipy", "data", "files", "t1_coronal_slice.npy")
    if name == "shoulder":
        return _package_file("data_store", "data", "MR2_UNCR.dcm")
    if name == "abdomen":
        return _package_file("data_store", "data", "MR-SIEMENS-DICOM-WithOverlays.dcm")
    raise ConfigError(f"unknown anatomy {name!r}")


def anatomy_available(name: str) -> bool:
    """Whether ``name`` can be loaded on this machine (file present, reader installed)."""
    src = anatomy_source(name)
    if src.generator:
        return True
    path = _locate(src.name)
    if path is None or not path.is_file():
        return False
    if src.name in ("shoulder", "abdomen"):
        return importlib.util.find_spec("pydicom") is not None
    return True


# --------------------------------------------------------------------------- readers

def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for a damaged file
        raise InputDataError(f"cannot read anatomy volume: {exc}", path=path) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputDataError(f"anatomy must be a 3D volume, got shape {data.shape}", path=path)
    zooms = img.header.get_zooms()[:3]
    return data, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def _plane(picture: np.ndarray, pixel_mm: tuple[float, float],
           thickness_mm: float) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A (rows, cols) picture as an upright (X, Y, 1) RAS-style plane."""
    vol = np.ascontiguousarray(picture.T[:, ::-1, None], dtype=np.float32)   # (X, Y, 1)
    return vol, (float(pixel_mm[1]), float(pixel_mm[0]), float(thickness_mm))


def _read_npy_slice(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    try:
        picture = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"cannot read anatomy slice: {exc}", path=path) from exc
    if picture.ndim != 2:
        raise InputDataError(f"expected one 2D slice, got shape {picture.shape}", path=path)
    return _plane(picture, (1.0, 1.0), 1.0)


def _read_dicom(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    try:
        import pydicom
    except ImportError:
        raise InputDataError("reading this anatomy needs pydicom (pip install pydicom)",
                             path=path) from None
    try:
        ds = pydicom.dcmread(str(path))
        picture = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise InputDataError(f"cannot read DICOM anatomy: {exc}", path=path) from exc
    if picture.ndim != 2:
        raise InputDataError(f"expected a single-frame DICOM image, got {picture.shape}",
                             path=path)
    spacing = getattr(ds, "PixelSpacing", None) or (1.0, 1.0)
    thickness = float(getattr(ds, "SliceThickness", None) or 1.0)
    pixel = (float(spacing[0]), float(spacing[1]))
    # Very fine pictures (the shoulder is 0.2 mm) are block-averaged towards 0.4 mm,
    # the finest grid a simulation samples them on.
    factor = int(max(1.0, np.floor(0.4 / max(min(pixel), 1e-3))))
    if factor > 1:
        r, c = (s // factor * factor for s in picture.shape)
        picture = picture[:r, :c].reshape(r // factor, factor, c // factor, factor).mean(axis=(1, 3))
        pixel = (pixel[0] * factor, pixel[1] * factor)
    return _plane(picture, pixel, thickness)


_READERS: dict[str, Callable[[Path], tuple[np.ndarray, tuple[float, float, float]]]] = {
    "colin27": _read_nifti, "colin27_hires": _read_nifti, "mni152": _read_nifti,
    "inia19": _read_nifti, "dipy_t1": _read_npy_slice, "shoulder": _read_dicom,
    "abdomen": _read_dicom,
}


def _normalise(data: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]: divide by the 99.9th percentile of the positive voxels, clip."""
    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    data = np.clip(data, 0.0, None)
    positive = data[data > 0]
    if positive.size == 0:
        raise InputDataError("anatomy volume is empty (no positive voxels)")
    top = float(np.percentile(positive, 99.9))
    return np.ascontiguousarray(np.clip(data / top, 0.0, 1.0), dtype=np.float32)


def _generator(src: AnatomySource):  # noqa: ANN202 - a module
    """The module of ``molrecon.sim`` that generates ``src``."""
    return importlib.import_module(f"{__package__}.{src.generator}")


@functools.lru_cache(maxsize=4)
def _load_cached(name: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    src = anatomy_source(name)
    if src.generator:
        data, voxel = _generator(src).volume()
        volume = _normalise(data)
        volume.flags.writeable = False
        return volume, voxel
    path = _locate(name)
    if path is None or not path.is_file():
        where = f" (looked for {path})" if path is not None else ""
        raise InputDataError(f"anatomy {name!r} is not installed on this machine{where}; "
                             f"to use it: {src.install_hint}")
    data, voxel = _READERS[name](path)
    try:
        volume = _normalise(data)
    except InputDataError as exc:
        raise InputDataError(exc.message, path=path) from None
    volume.flags.writeable = False
    return volume, voxel


def load_anatomy(name: str = "colin27") -> tuple[np.ndarray, tuple[float, float, float]]:
    """Load anatomy ``name`` as ``(volume, voxel_mm)``.

    ``volume`` is float32 in [0, 1], shape ``(X, Y, Z)`` along RAS+ (``Z = 1`` for the
    planar sources), read-only (it is cached; copy it to modify). ``voxel_mm`` is the
    voxel size along the three axes. Raises :class:`ConfigError` for an unknown name and
    :class:`InputDataError` when the source is not installed or cannot be read.
    """
    return _load_cached(anatomy_source(name).name)


def anatomy_landmarks(name: str) -> dict[str, tuple[float, ...]]:
    """Named points of an anatomy as voxel indices of :func:`load_anatomy` ``(name)``:
    ``heart_axis`` (x, y) for the torso, where its left ventricle contracts; empty otherwise."""
    src = anatomy_source(name)
    landmarks = getattr(_generator(src), "landmarks", None) if src.generator else None
    return dict(landmarks()) if landmarks is not None else {}


def anatomy_body(name: str) -> tuple[float, float] | None:
    """Transverse semi-axes (mm) of a body the receive coils must sit outside (the
    torso); ``None`` for a head, which the default coil cylinder already clears."""
    src = anatomy_source(name)
    return getattr(_generator(src), "BODY_SEMI_AXES_MM", None) if src.generator else None


def head_extent(volume: np.ndarray, *, threshold: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-index bounding box ``(low, high)`` (inclusive) of the voxels above ``threshold``."""
    above = volume > threshold
    lo, hi = np.zeros(3), np.zeros(3)
    for ax in range(3):
        hits = np.flatnonzero(above.any(axis=tuple(a for a in range(3) if a != ax)))
        if hits.size == 0:
            raise InputDataError("anatomy volume has no voxel above the object threshold")
        lo[ax], hi[ax] = float(hits[0]), float(hits[-1])
    return lo, hi


@functools.lru_cache(maxsize=8)
def anatomy_extent(name: str = "colin27") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`head_extent` of :func:`load_anatomy` ``(name)``, cached: ``(low, high)`` indices."""
    lo, hi = head_extent(load_anatomy(name)[0])
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


__all__ = [
    "SPLITS", "AnatomySource", "AnatomySubject", "Split", "anatomy_available",
    "anatomy_body", "anatomy_extent", "anatomy_landmarks", "anatomy_source", "anatomy_sources", "anatomy_subjects", "head_extent",
    "load_anatomy",
]
