"""Background statistics of generated images: how much of the background is clean.

Distilled students of dark-background data (MNIST) often leave low-level noise in the
background that the teacher's many-step samples do not have; it costs FID and shows in grids
as grey speckle. :func:`near_black_share` measures it: on the embedded MNIST-5k digits, 81.3%
of pixels are near-black (at most 8 of 255).
"""

from __future__ import annotations

from torch import Tensor

#: default level, in 8-bit grey values: a pixel at or below it counts as near-black
NEAR_BLACK_LEVEL = 8


def near_black_share(images: Tensor, level: int = NEAR_BLACK_LEVEL) -> float:
    """Share of pixels of ``images`` ``[N, C, H, W]`` (in [-1, 1]) at or below ``level`` of 255 once
    rounded to 8 bits as for FID (``(x * 127.5 + 128).clamp(0, 255)`` floored)."""
    u8 = (images.detach().float() * 127.5 + 128).clamp(0, 255).floor()
    return float((u8 <= level).double().mean())


def grid_stats(images: Tensor) -> dict[str, float]:
    """Statistics logged with every sample grid of a training run (:class:`~distilldiff.engine.TrainTask`)."""
    return {"near_black": near_black_share(images)}
