"""Image helpers: tensors in [-1, 1] <-> uint8, and sample grids as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def to_uint8(images: Tensor) -> np.ndarray:
    """``[N, C, H, W]`` in [-1, 1] -> ``[N, H, W, C]`` uint8, rounded as EDM/FID code does."""
    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def as_saved(images: Tensor) -> Tensor:
    """Float images ``[N, C, H, W]`` in [-1, 1] as they are once saved or scored by FID: rounded to 8 bits
    as :func:`to_uint8` does, and read back as ``u8 / 127.5 - 1`` (the embedded digits' own conversion,
    which this leaves unchanged). Out-of-range values of a model's output end at -1 or 1."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).floor() / 127.5 - 1


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Write ``[N, C, H, W]`` images in [-1, 1] as one PNG grid (``nrow`` per row, default ~sqrt N)."""
    if images.ndim != 4:
        raise ValueError(f"save_grid expects [N, C, H, W] images, got shape {tuple(images.shape)}")
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path
