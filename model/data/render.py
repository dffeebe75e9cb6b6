"""Drawing slices and label overlays for people to look at (previews, result thumbnails)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# BraTS convention colours: TC red, ED green, ET yellow (index = BraTS label).
SEG_PALETTE = np.zeros((5, 3), np.uint8)
SEG_PALETTE[[1, 2, 4]] = [(230, 40, 40), (40, 200, 60), (250, 220, 30)]
# Normal anatomy: left/right cerebrum, cerebellum, lateral ventricle (index = label 0..6).
ANATOMY_PALETTE = np.array(
    [(0, 0, 0), (220, 90, 90), (90, 110, 230), (230, 190, 60), (60, 200, 200),
     (230, 60, 230), (60, 230, 90)], np.uint8)


def grey_rgb(slice2d: np.ndarray) -> np.ndarray:
    """A [0, 1] slice as (H, W, 3) uint8."""
    g = np.rint(np.clip(slice2d, 0, 1) * 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


def overlay(slice2d: np.ndarray, labels: np.ndarray, palette: np.ndarray,
            alpha: float = 0.45) -> np.ndarray:
    """Blend label colours over a grey slice where ``labels > 0``; returns (H, W, 3) uint8."""
    base = grey_rgb(slice2d).astype(np.float32)
    colour = palette[labels].astype(np.float32)
    mask = (labels > 0)[..., None]
    return np.where(mask, (1 - alpha) * base + alpha * colour, base).astype(np.uint8)


def grid(tiles: list[list[np.ndarray]], titles: list[str] | None = None,
         row_labels: list[str] | None = None, pad: int = 4) -> Image.Image:
    """Tile (H, W, 3) arrays row by row, with optional column titles and row labels."""
    h, w = tiles[0][0].shape[:2]
    top = 14 if titles else 0
    left = 0
    ncol = max(len(r) for r in tiles)
    canvas = Image.new("RGB", (left + ncol * (w + pad) + pad, top + len(tiles) * (h + pad) + pad))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles or []):
        draw.text((left + pad + c * (w + pad) + 2, 1), title, fill=(255, 255, 255))
    for r, row in enumerate(tiles):
        y = top + pad + r * (h + pad)
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (left + pad + c * (w + pad), y))
        if row_labels:
            draw.text((left + pad + 2, y + 2), row_labels[r], fill=(255, 255, 0))
    return canvas
