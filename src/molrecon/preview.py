"""PNG previews: a montage of reconstructions side by side (same slice, same window)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io.atomic import write_bytes_atomic


def middle_plane(image: np.ndarray) -> np.ndarray:
    """The central (Y, X) plane of a (B, D, Y, X) image (middle slice, middle partition/frame);
    the (D, Y) plane when the readout has one position (a 3D scan transformed along it)."""
    b, d = image.shape[0], image.shape[1]
    if image.shape[-1] == 1 and d > 1:
        return np.abs(image[b // 2, :, :, 0])
    return np.abs(image[b // 2, d // 2])


def _to_uint8(plane: np.ndarray, vmax: float) -> np.ndarray:
    if vmax <= 0:
        vmax = 1.0
    return (np.clip(plane / vmax, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def montage_png(panels: Sequence[tuple[str, np.ndarray]], *, shared_window: bool = False,
                scale: int = 2) -> bytes:
    """Render titled 2D magnitude panels into one PNG (bytes).

    Each panel is windowed to its own 99.5th percentile unless ``shared_window``
    (then to the first panel's, so intensity differences stay visible). Images
    are shown with the phase-encoding axis (Y) vertical and readout (X)
    horizontal, upscaled by ``scale`` for viewing.
    """
    from PIL import Image, ImageDraw

    if not panels:
        raise ValueError("no panels to draw")
    first_vmax = float(np.percentile(np.abs(panels[0][1]), 99.5))
    tiles = []
    for title, plane in panels:
        plane = np.abs(np.asarray(plane, dtype=np.float64))
        vmax = first_vmax if shared_window else float(np.percentile(plane, 99.5))
        img = Image.fromarray(_to_uint8(plane, vmax), mode="L")
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        canvas = Image.new("L", (img.width, img.height + 18), color=0)
        canvas.paste(img, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), title, fill=255)
        tiles.append(canvas)
    width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
    height = max(t.height for t in tiles)
    sheet = Image.new("L", (width, height), color=40)
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + 4
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def write_preview(path: str | Path, panels: Sequence[tuple[str, np.ndarray]], *,
                  force: bool = False, shared_window: bool = False) -> Path:
    """Write a PNG montage atomically."""
    data = montage_png(panels, shared_window=shared_window)
    return write_bytes_atomic(path, data, force=force)
