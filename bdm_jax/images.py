"""Image helpers: [-1,1] floats to uint8, grids, PNG and .npz writing (atomic)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float NHWC -> uint8 NHWC (rounded, clipped)."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N,H,W,C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_png(image: np.ndarray, path: str, upscale: int = 1) -> None:
    """Save one uint8 HWC image (C = 1 or 3); nearest-neighbour upscaling keeps tiny digits visible."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


def save_grid(images_uint8: np.ndarray, path: str, ncols: int | None = None) -> None:
    h = images_uint8.shape[1]
    save_png(make_grid(images_uint8, ncols), path, upscale=max(1, 128 // max(h, 1) // 2))


def save_npz(images_uint8: np.ndarray, path: str, **extra: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, images=images_uint8, **extra)
    os.replace(tmp, path)
