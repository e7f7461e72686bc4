"""The guidance weight w as a training input: its optional range, default, draws, and teacher checks.

Shared by the objectives whose students take w as an input (guidance distillation, progressive
distillation of such a student, consistency distillation with LCM-style conditioning).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..teachers.base import Denoiser
from ..teachers.guidance import CFGDenoiser


def check_w_range(w_min: float | None, w_max: float | None) -> None:
    """An optional range of guidance weights: both unset, or both set with 0 <= w_min < w_max."""
    if (w_min is None) != (w_max is None) or (w_min is not None and not 0 <= w_min < w_max):
        raise ValueError(f"objective.w_min/w_max must both be set with 0 <= w_min < w_max (or both unset), got {w_min}/{w_max}")


def resolved_default_w(w_min: float | None, w_max: float | None, default_w: float | None) -> float | None:
    """The w of sample grids and exported pipelines: ``default_w``, else the range's midpoint (None: no range)."""
    if w_min is None:
        return None
    return default_w if default_w is not None else (w_min + w_max) / 2


def draw_w(n: int, w_min: float, w_max: float, like: Tensor) -> Tensor:
    """``[n]`` guidance weights w ~ U[w_min, w_max], on ``like``'s device and dtype."""
    return torch.rand(n, device=like.device, dtype=like.dtype) * (w_max - w_min) + w_min


def w_cond(w: float | None, n: int, device) -> dict[str, Tensor]:
    """``{"guidance_scale": [n] filled with w}`` (no entry for ``None``): the grids' extra student input."""
    return {} if w is None else {"guidance_scale": torch.full((n,), w, device=device)}


def check_guidance_teacher(teacher: Denoiser, what: str) -> None:
    """A teacher that ``what`` can guide itself: unguided, with an unconditional input."""
    if isinstance(teacher, CFGDenoiser):
        raise ValueError(f"{what} applies guidance itself: set teacher.guidance_scale: 0")
    if not teacher.conditioning.has_null:
        raise ValueError(f"{what} needs a conditional teacher with an unconditional input (a null class, null_class)")
