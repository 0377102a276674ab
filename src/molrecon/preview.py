"""PNG previews of reconstructions, oriented as radiological viewers show them.

A preview is a sheet of titled panels: for each reconstruction (one "volume",
e.g. zf, sense, mol, truth) the planes that :func:`preview_panels` picks, drawn
by :func:`render_preview`; :func:`write_preview` does both and writes the PNG.

Orientation
-----------
The voxel → RAS mapping is the NIfTI affine of :func:`molrecon.io.nifti.nifti_affine`
(the same mapping a viewer applies to the file molrecon writes). For a displayed
plane the normal's dominant RAS component names the anatomical plane (R → sagittal,
A → coronal, S → axial); an oblique plane snaps to the nearest one. The plane is
then turned by transposes and flips only (no resampling, so every pixel shown is a
reconstructed voxel) so that, as in radiological viewers (DICOM/PACS, ITK-SNAP and
FSLeyes in radiological mode)::

    axial:    patient's right on the image's left, anterior at the top
    coronal:  patient's right on the image's left, superior at the top
    sagittal: anterior on the left, superior at the top

Edge letters (R/L/A/P/S/I) name the patient direction at each edge; for a snapped
oblique plane they are those of the nearest plane. With ``orientation_known``
False (the header had no usable geometry) the raw array is shown (phase encoding
Y down, readout X across), without letters, and the title says "orientation
unknown".

What is shown
-------------
* 2D (single or multi-slice): the middle slice ("slice k/B" when B > 1).
* 3D: three orthogonal planes through the volume centre, in the order axial,
  coronal, sagittal, each titled with the index it cuts (partition k/D, phase-encoding
  line j/Y, readout sample i/X); planes one voxel thick (a 3D scan stored at one
  readout position) are left out. Voxel sizes are honoured: panels are resized to
  a common mm-per-pixel, so anisotropic voxels do not squash the anatomy.
* 2D+time: see :func:`preview_panels` (middle frame and an x-t profile).

Indices in titles count from 1 ("slice 3/5" is the middle of five).

The window is the 99.5th percentile of each volume's displayed pixels (all panels
of one volume share it, so the planes, or the frame and its profile, compare
directly); with ``shared_window`` every volume uses the first volume's window, so
intensity differences between methods stay visible.
"""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import write_bytes_atomic
from .io.types import ImageVolume

__all__ = ["PLANES", "Orientation", "Panel", "middle_plane", "montage_png", "orientation_for",
           "plane_of", "preview_panels", "render_preview", "volume_orientations",
           "write_preview", "yx_orientation"]

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
#: RAS axis that must run down the screen and the one that must run to the right, per plane;
#: both run towards that axis's negative end (P or I downwards, L or P to the right).
_SCREEN_AXES = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}
#: (top, bottom, left, right) patient directions once oriented.
_EDGE_LETTERS = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"),
                 "sagittal": ("S", "I", "A", "P")}
#: the RAS axis a plane's normal runs along.
_NORMAL_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
_NO_LETTERS = ("", "", "", "")
#: names of the (D, Y, X) axes of a 3D volume, for the index a plane cuts.
_AXIS_NAMES = ("partition", "line", "readout")
_UNKNOWN = "orientation unknown"


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How to turn a raw ``(rows, cols)`` plane for display: transpose first, then flips.

    ``plane`` is "axial" | "coronal" | "sagittal", or None when the orientation is
    unknown (then nothing is changed).
    """

    plane: str | None = None
    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def known(self) -> bool:
        return self.plane is not None

    @property
    def letters(self) -> tuple[str, str, str, str]:
        """(top, bottom, left, right) patient directions of the oriented plane."""
        return _EDGE_LETTERS[self.plane] if self.plane is not None else _NO_LETTERS

    def apply(self, a: np.ndarray) -> np.ndarray:
        """Orient the last two axes of ``a`` (rows, cols); a view, never a resampling."""
        if self.transpose:
            a = np.swapaxes(a, -1, -2)
        if self.flip_rows:
            a = a[..., ::-1, :]
        if self.flip_cols:
            a = a[..., ::-1]
        return a

    def spacing(self, row_mm: float, col_mm: float) -> tuple[float, float]:
        """The (row, col) pixel spacing after :meth:`apply`."""
        return (col_mm, row_mm) if self.transpose else (row_mm, col_mm)


def plane_of(normal_ras: np.ndarray) -> str:
    """The anatomical plane whose normal is closest to ``normal_ras`` (largest |component|)."""
    axis = int(np.argmax(np.abs(np.asarray(normal_ras, dtype=np.float64))))
    return {0: "sagittal", 1: "coronal", 2: "axial"}[axis]


def orientation_for(row_dir: np.ndarray, col_dir: np.ndarray, plane: str | None = None
                    ) -> Orientation:
    """Orientation of a plane whose rows step along ``row_dir`` and columns along
    ``col_dir`` (RAS vectors); ``plane`` defaults to the one nearest its normal."""
    r = np.asarray(row_dir, dtype=np.float64)
    c = np.asarray(col_dir, dtype=np.float64)
    r = r / max(float(np.linalg.norm(r)), 1e-12)
    c = c / max(float(np.linalg.norm(c)), 1e-12)
    if plane is None:
        plane = plane_of(np.cross(r, c))
    down, right = _SCREEN_AXES[plane]
    transpose = abs(c[down]) + abs(r[right]) > abs(r[down]) + abs(c[right])
    if transpose:
        r, c = c, r
    return Orientation(plane, bool(transpose), bool(r[down] > 0), bool(c[right] > 0))


def _item_affine(volume: ImageVolume, item: int) -> np.ndarray | None:
    """The RAS affine of batch item ``item`` (a slice, or a slab of a 3D scan) as a
    one-item volume, or None when the geometry is unknown or degenerate."""
    from .io.nifti import nifti_affine

    geom = volume.geometry
    if not geom.orientation_known:
        return None
    vectors = [np.asarray(v, dtype=np.float64) for v in (geom.read_dir, geom.phase_dir,
                                                          geom.slice_dir)]
    if any(v.shape != (3,) or not np.all(np.isfinite(v)) or np.linalg.norm(v) < 1e-6
           for v in vectors):
        return None
    positions = np.asarray(geom.position, dtype=np.float64).reshape(-1, 3)
    if positions.shape[0] == 0:
        positions = np.zeros((1, 3))
    one = replace(geom, position=positions[min(item, positions.shape[0] - 1)][None])
    shape = (1,) + tuple(int(s) for s in volume.data.shape[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            affine = nifti_affine(one, volume.kind, shape)
        except Exception:  # noqa: BLE001 - a preview never fails the job over geometry
            return None
    return affine if np.all(np.isfinite(affine)) else None


def yx_orientation(volume: ImageVolume) -> Orientation:
    """Orientation of the volume's (Y, X) planes (a slice of 2D / 2D+time, a partition of 3D)."""
    if volume.kind == "3d":
        return volume_orientations(volume)[0]
    affine = _item_affine(volume, volume.data.shape[0] // 2)
    if affine is None:
        return Orientation()
    return orientation_for(affine[:3, 1], affine[:3, 0])


def volume_orientations(volume: ImageVolume) -> list[Orientation]:
    """For a 3D volume, the orientations of the planes normal to its D, Y and X axes.

    The three planes are assigned to axial, coronal and sagittal together (the
    assignment whose normals best match), so an oblique slab still gives three
    different planes.
    """
    affine = _item_affine(volume, volume.data.shape[0] // 2)
    if affine is None:
        return [Orientation(), Orientation(), Orientation()]
    dirs = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]          # steps along D, Y, X
    in_plane = [(1, 2), (0, 2), (0, 1)]                           # (row, col) axes per plane
    normals = []
    for rows, cols in in_plane:
        n = np.cross(dirs[rows], dirs[cols])
        normals.append(n / max(float(np.linalg.norm(n)), 1e-12))
    best = max(itertools.permutations(PLANES),
               key=lambda names: sum(abs(normals[a][_NORMAL_AXIS[p]]) for a, p in enumerate(names)))
    return [orientation_for(dirs[rows], dirs[cols], best[a])
            for a, (rows, cols) in enumerate(in_plane)]


# --------------------------------------------------------------------------- panels


@dataclass(frozen=True)
class Panel:
    """One titled 2D magnitude image, already oriented for display.

    ``pixel_mm`` is the (row, col) spacing on screen (the renderer resizes to a
    common mm per pixel); ``letters`` are the (top, bottom, left, right) edge labels
    ("" for none); ``tick_row`` marks a row at both edges (the line an x-t profile
    is taken along).
    """

    title: str
    image: np.ndarray
    pixel_mm: tuple[float, float] = (1.0, 1.0)
    letters: tuple[str, str, str, str] = _NO_LETTERS
    tick_row: int | None = None

    @property
    def extent_mm(self) -> tuple[float, float]:
        return (self.image.shape[0] * self.pixel_mm[0], self.image.shape[1] * self.pixel_mm[1])


def _title(*parts: str | None) -> str:
    return " · ".join(p for p in parts if p)


def _spacing(volume: ImageVolume) -> tuple[float, float, float]:
    """(D, Y, X) voxel sizes in mm (D only meaningful for 3D)."""
    _, d, y, x = volume.data.shape
    fx, fy, fz = (float(f) if np.isfinite(f) and f > 0 else float(n)
                  for f, n in zip(volume.geometry.fov_mm, (x, y, d)))
    return (fz / d, fy / y, fx / x)


def preview_panels(volume: ImageVolume, title: str) -> list[Panel]:
    """The panels that show ``volume``, each titled ``title · plane · index``.

    2D: the middle slice. 3D: axial, coronal and sagittal planes through the centre.
    2D+time: the middle frame and an x-t profile: the row through the centre of the
    displayed frame (marked by ticks at its edges), one line per frame, frame 1 at
    the top. A profile rather than a montage of a few frames because it shows *every*
    frame at full spatial resolution in one panel, which is where the faults of a
    dynamic reconstruction show (temporal blurring of moving edges, frame-to-frame
    flicker, aliasing that drifts with time); a handful of thumbnails samples the
    time axis too sparsely for that, at several times the space. Multi-slice
    2D+time shows the middle slice.
    """
    mag = np.nan_to_num(np.abs(np.asarray(volume.data))).astype(np.float32)
    if mag.ndim != 4:
        raise ValueError(f"image must be (B, D, Y, X), got shape {mag.shape}")
    n_b, n_d = mag.shape[:2]
    b = n_b // 2
    dz, dy, dx = _spacing(volume)
    if volume.kind == "3d":
        return _panels_3d(volume, mag[b], title, (dz, dy, dx),
                          f"slab {b + 1}/{n_b}" if n_b > 1 else None)
    slice_label = f"slice {b + 1}/{n_b}" if n_b > 1 else None
    orient = yx_orientation(volume)
    unknown = None if orient.known else _UNKNOWN
    row_mm, col_mm = orient.spacing(dy, dx)
    letters = orient.letters
    if volume.kind == "2dt":
        frames = orient.apply(mag[b])                                   # (T, H, W)
        n_t, height = frames.shape[0], frames.shape[1]
        t = n_t // 2
        centre = height // 2
        panels = [Panel(_title(title, orient.plane, f"frame {t + 1}/{n_t}", slice_label, unknown),
                        np.ascontiguousarray(frames[t]), (row_mm, col_mm), letters,
                        tick_row=centre if n_t > 1 else None)]
        if n_t > 1:
            axis = f"{letters[2]}-{letters[3]}" if orient.known else "x"
            span = ""
            if volume.geometry.frame_time_ms:
                span = f" ({(n_t - 1) * volume.geometry.frame_time_ms / 1000.0:.2f} s)"
            panels.append(Panel(
                _title(title, f"{axis} profile vs time", slice_label, unknown),
                np.ascontiguousarray(frames[:, centre, :]),
                # rows are frames: stretched to the frame panel's height
                (height * row_mm / n_t, col_mm),
                ("frame 1", f"frame {n_t}{span}", letters[2], letters[3])))
        return panels
    d = n_d // 2
    part = f"partition {d + 1}/{n_d}" if n_d > 1 else None
    return [Panel(_title(title, orient.plane, slice_label, part, unknown),
                  np.ascontiguousarray(orient.apply(mag[b, d])), (row_mm, col_mm), letters)]


def _panels_3d(volume: ImageVolume, vol: np.ndarray, title: str,
               spacing: tuple[float, float, float], slab: str | None) -> list[Panel]:
    orients = volume_orientations(volume)
    known = orients[0].known
    in_plane = [(1, 2), (0, 2), (0, 1)]
    axes = [0, 1, 2]
    if known:  # axial, coronal, sagittal order
        axes.sort(key=lambda a: PLANES.index(orients[a].plane))  # type: ignore[arg-type]
    shown = [a for a in axes if all(vol.shape[i] > 1 for i in in_plane[a])]
    if not shown:  # a line or a point: show the (Y, X) plane anyway
        shown = [0]
    panels = []
    for a in shown:
        n = vol.shape[a]
        idx = n // 2
        rows, cols = in_plane[a]
        o = orients[a]
        raw = np.take(vol, idx, axis=a)
        panels.append(Panel(
            _title(title, o.plane, f"{_AXIS_NAMES[a]} {idx + 1}/{n}", slab,
                   None if known else _UNKNOWN),
            np.ascontiguousarray(o.apply(raw)), o.spacing(spacing[rows], spacing[cols]),
            o.letters))
    return panels


def middle_plane(image: np.ndarray) -> np.ndarray:
    """The central (Y, X) plane of a (B, D, Y, X) array, unoriented (middle slice, middle
    partition/frame); the (D, Y) plane when the readout has one position. For arrays
    without geometry (benchmarks); previews of ImageVolumes use :func:`preview_panels`."""
    b, d = image.shape[0], image.shape[1]
    if image.shape[-1] == 1 and d > 1:
        return np.abs(image[b // 2, :, :, 0])
    return np.abs(image[b // 2, d // 2])


# --------------------------------------------------------------------------- rendering

_TITLE_PX = 15
_LETTER_PX = 15
_GAP = 6
_PAD = 4
_BACKGROUND = (40, 40, 40)
_TITLE_RGB = (255, 255, 255)
_LETTER_RGB = (255, 214, 0)


class _Font:
    """Pillow's bundled TrueType font at ``size`` px (Pillow ≥ 10.1 with FreeType), else
    its bitmap font scaled up by whole pixels so it stays legible."""

    def __init__(self, size: int) -> None:
        from PIL import ImageFont

        self.scale = 1
        font = None
        try:
            font = ImageFont.load_default(size=size)
        except Exception:  # noqa: BLE001 - old Pillow (no size) or no FreeType
            font = None
        if not isinstance(font, ImageFont.FreeTypeFont):
            font = ImageFont.load_default()
            self.scale = max(1, round(size / 10))
        self.font = font
        self.truetype = self.scale == 1 and isinstance(font, ImageFont.FreeTypeFont)
        self.line_height = self.size("Ag")[1] + 3

    def _clean(self, text: str) -> str:
        return text if self.truetype else text.encode("latin-1", "replace").decode("latin-1")

    def size(self, text: str) -> tuple[int, int]:
        from PIL import Image, ImageDraw

        box = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), self._clean(text) or " ",
                                                              font=self.font)
        return (int(box[2]) * self.scale, int(box[3]) * self.scale)

    def draw(self, img, xy: tuple[int, int], text: str, fill: tuple[int, int, int],
             stroke: bool = False) -> None:
        from PIL import Image, ImageDraw

        text = self._clean(text)
        if self.truetype:
            ImageDraw.Draw(img).text(xy, text, font=self.font, fill=fill,
                                     stroke_width=2 if stroke else 0, stroke_fill=(0, 0, 0))
            return
        w, h = self.size(text)
        mask = Image.new("L", (max(w // self.scale, 1), max(h // self.scale, 1)), 0)
        ImageDraw.Draw(mask).text((0, 0), text, font=self.font, fill=255)
        mask = mask.resize((mask.width * self.scale, mask.height * self.scale),
                           Image.Resampling.NEAREST)
        if stroke:
            for ox, oy in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                img.paste((0, 0, 0), (xy[0] + ox, xy[1] + oy), mask)
        img.paste(fill, xy, mask)


def _wrap(font: _Font, text: str, width: int) -> list[str]:
    """Split a title at its " · " separators into lines that fit ``width`` (a single part
    that is still too wide stays on its own line)."""
    lines: list[str] = []
    for part in text.split(" · "):
        if lines and font.size(lines[-1] + " · " + part)[0] <= width:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return lines or [""]


def _window(images: Sequence[np.ndarray]) -> float:
    values = np.concatenate([np.asarray(im, dtype=np.float64).ravel() for im in images])
    vmax = float(np.percentile(values, 99.5)) if values.size else 0.0
    return vmax if np.isfinite(vmax) and vmax > 0 else 1.0


def _px_per_mm(panels: Sequence[Panel], target: int) -> float:
    """Screen pixels per mm so the largest panel's longer side is about ``target`` pixels;
    an integer zoom of the finest voxels when that is an upscaling (crisp pixels)."""
    extent = max(max(p.extent_mm) for p in panels)
    finest = min(min(p.pixel_mm) for p in panels)
    zoom = target * finest / extent              # screen pixels per finest voxel
    if zoom >= 1.0:
        zoom = float(max(1, math.floor(zoom + 0.5)))
    return zoom / finest


def render_preview(volumes: Sequence[Sequence[Panel]], *, shared_window: bool = False,
                   px_per_mm: float | None = None, panel_px: int | None = None) -> bytes:
    """Draw the panels of several volumes into one PNG (bytes, RGB).

    ``volumes`` holds each volume's panels (from :func:`preview_panels`). When every
    volume has one panel they are laid out in a single row, otherwise one row per
    volume. All panels share one scale (``px_per_mm``; by default the largest panel's
    longer side becomes about ``panel_px`` pixels: 384 for a single row of single
    panels, 256 otherwise). Titles sit above each panel (wrapped if too wide), edge
    letters on the image; text is 15 px (18 px when every panel is at least 400 px wide).
    """
    from PIL import Image

    groups = [list(g) for g in volumes if len(g)]
    if not groups:
        raise ValueError("no panels to draw")
    windows = [_window([p.image for p in g]) for g in groups]
    if shared_window:
        windows = [windows[0]] * len(groups)
    single = all(len(g) == 1 for g in groups)
    items = [(p, w) for g, w in zip(groups, windows) for p in g]
    rows = [items] if single else [[(p, w) for p in g] for g, w in zip(groups, windows)]
    if px_per_mm is None:
        px_per_mm = _px_per_mm([p for p, _ in items], panel_px or (384 if single else 256))
    narrowest = min(p.image.shape[1] * p.pixel_mm[1] * px_per_mm for p, _ in items)
    bump = 3 if narrowest >= 400 else 0           # large panels (2D at 2x) get larger text
    title_font, letter_font = _Font(_TITLE_PX + bump), _Font(_LETTER_PX + bump)

    row_images = []
    for row in rows:
        tiles = []
        for panel, vmax in row:
            plane = np.asarray(panel.image, dtype=np.float64)
            if plane.ndim != 2 or plane.size == 0:
                raise ValueError(f"a panel must be a non-empty 2D image, got shape {plane.shape}")
            pixels = (np.clip(plane / vmax, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            img = Image.fromarray(pixels, mode="L")
            size = (max(1, round(plane.shape[1] * panel.pixel_mm[1] * px_per_mm)),
                    max(1, round(plane.shape[0] * panel.pixel_mm[0] * px_per_mm)))
            integer = size[0] % img.width == 0 and size[1] % img.height == 0
            img = img.resize(size, Image.Resampling.NEAREST if integer
                             else Image.Resampling.BILINEAR).convert("RGB")
            tiles.append((panel, img))
        lines = [_wrap(title_font, p.title, max(img.width, 1)) for p, img in tiles]
        title_h = max(len(ls) for ls in lines) * title_font.line_height + _PAD
        width = sum(img.width for _, img in tiles) + _GAP * (len(tiles) - 1)
        height = title_h + max(img.height for _, img in tiles)
        sheet = Image.new("RGB", (width, height), _BACKGROUND)
        x = 0
        for (panel, img), ls in zip(tiles, lines):
            _letters(img, panel, letter_font)
            sheet.paste(img, (x, title_h))
            for n, line in enumerate(ls):
                title_font.draw(sheet, (x + 2, 2 + n * title_font.line_height), line, _TITLE_RGB)
            x += img.width + _GAP
        row_images.append(sheet)
    out = Image.new("RGB", (max(r.width for r in row_images),
                            sum(r.height for r in row_images) + _GAP * (len(row_images) - 1)),
                    _BACKGROUND)
    y = 0
    for r in row_images:
        out.paste(r, (0, y))
        y += r.height + _GAP
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _letters(img, panel: Panel, font: _Font) -> None:
    """Edge letters (and the profile ticks) drawn onto a resized panel image."""
    from PIL import ImageDraw

    top, bottom, left, right = panel.letters
    w, h = img.size
    m = 3
    if panel.tick_row is not None:
        y = round((panel.tick_row + 0.5) * h / panel.image.shape[0])
        tick = max(4, w // 32)
        draw = ImageDraw.Draw(img)
        draw.line([(0, y), (tick, y)], fill=_LETTER_RGB, width=2)
        draw.line([(w - 1 - tick, y), (w - 1, y)], fill=_LETTER_RGB, width=2)
        m += tick + 2                     # keep the side letters clear of the ticks
    for text, where in ((top, "top"), (bottom, "bottom"), (left, "left"), (right, "right")):
        if not text:
            continue
        tw, th = font.size(text)
        if where == "top":
            xy = ((w - tw) // 2, 3)
        elif where == "bottom":
            xy = ((w - tw) // 2, h - th - 3)
        elif where == "left":
            xy = (m, (h - th) // 2)
        else:
            xy = (w - tw - m, (h - th) // 2)
        font.draw(img, (int(xy[0]), int(xy[1])), text, _LETTER_RGB, stroke=True)


def write_preview(path: str | Path, volumes: Sequence[tuple[str, ImageVolume]], *,
                  force: bool = False, shared_window: bool = False) -> Path:
    """Write the preview of ``(title, ImageVolume)`` pairs as a PNG, atomically."""
    if not volumes:
        raise ValueError("no images to preview")
    data = render_preview([preview_panels(vol, title) for title, vol in volumes],
                          shared_window=shared_window)
    return write_bytes_atomic(path, data, force=force)


def montage_png(panels: Sequence[tuple[str, np.ndarray]], *, shared_window: bool = False,
                scale: int = 2) -> bytes:
    """Titled 2D magnitude arrays without geometry, side by side, as they are stored
    (upscaled by ``scale``), each windowed to its own 99.5th percentile unless
    ``shared_window`` (then the first one's). For benchmark figures."""
    if not panels:
        raise ValueError("no panels to draw")
    return render_preview([[Panel(title, np.abs(np.asarray(plane)))] for title, plane in panels],
                          shared_window=shared_window, px_per_mm=float(scale))
