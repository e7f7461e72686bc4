"""Background statistics of generated images: how much of the background is clean.

Distilled students of dark-background data (MNIST) often leave low-level noise in the
background that the teacher's many-step samples do not have; it costs FID and shows in grids
as grey speckle. :func:`near_black_share` measures it: on the embedded MNIST-5k digits, 81.3%
of pixels are near-black (at most 8 of 255). :func:`faint_share` is the finer measure: the share
of faint pixels (3 to 32 of 255), neither black nor stroke. MNIST-5k has 2.0%; the shipped teacher
has 4.4% at 50 DDIM steps and 16.7% at 4 (1,000 images each). A student can match the teacher's
near-black share and still carry three times its faint pixels (BENCHMARKS.md section 2).
"""

from __future__ import annotations

from torch import Tensor

#: default level, in 8-bit grey values: a pixel at or below it counts as near-black
NEAR_BLACK_LEVEL = 8

#: default band of faint pixels, in 8-bit grey values (both ends included): above the teacher's own
#: background jitter (0 to 2 of 255 at 50 steps), below the cut at which cleaning a student's
#: background (setting pixels below -0.8, 25 of 255, to black) brought its FID to the teacher's
FAINT_BAND = (3, 32)


def to_uint8(images: Tensor) -> Tensor:
    """``images`` in [-1, 1] rounded to 8-bit grey values as for FID (``(x * 127.5 + 128).clamp(0, 255)`` floored)."""
    return (images.detach().float() * 127.5 + 128).clamp(0, 255).floor()


def near_black_share(images: Tensor, level: int = NEAR_BLACK_LEVEL) -> float:
    """Share of pixels of ``images`` ``[N, C, H, W]`` (in [-1, 1]) at or below ``level`` of 255 once
    rounded to 8 bits as for FID (:func:`to_uint8`)."""
    return float((to_uint8(images) <= level).double().mean())


def faint_share(images: Tensor, band: tuple[int, int] = FAINT_BAND) -> float:
    """Share of pixels of ``images`` ``[N, C, H, W]`` (in [-1, 1]) whose 8-bit value (:func:`to_uint8`)
    lies in ``band`` (both ends included): faint grey, the background speckle or haze of a student."""
    lo, hi = band
    if not 0 <= lo <= hi <= 255:
        raise ValueError(f"faint band must satisfy 0 <= low <= high <= 255, got {band}")
    u8 = to_uint8(images)
    return float(((u8 >= lo) & (u8 <= hi)).double().mean())


def grid_stats(images: Tensor) -> dict[str, float]:
    """Statistics logged with every sample grid of a training run (:class:`~distilldiff.engine.TrainTask`)."""
    return {"near_black": near_black_share(images), "faint": faint_share(images)}
