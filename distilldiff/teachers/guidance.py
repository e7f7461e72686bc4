"""Classifier-free guidance as a wrapper that is itself a denoiser."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Denoiser


class CFGDenoiser(Denoiser):
    """``D_w(x) = D(x, cond) + w (D(x, cond) - D(x, uncond))`` (w = 0: no guidance).

    diffusers/LCM write ``guidance_scale = 1 + w``. The unconditional branch replaces
    ``class_labels`` with the wrapped model's ``null_class``; both branches run as one batch.

    Args:
        denoiser: a class-conditional denoiser with ``null_class`` set.
        scale: guidance weight ``w`` (float, or a ``[B]`` tensor for per-sample guidance).
    """

    def __init__(self, denoiser: Denoiser, scale: float | Tensor):
        super().__init__()
        if denoiser.null_class is None:
            raise ValueError(
                "classifier-free guidance needs a teacher with a null class label (null_class); "
                "this teacher has none"
            )
        self.inner = denoiser
        self.scale = scale
        for name in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, name, getattr(denoiser, name))

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return self.inner.prior_scale(sigma)

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        if class_labels is None:  # unconditional request: guidance has nothing to amplify
            return self.inner(x, sigma, class_labels=torch.full((x.shape[0],), self.null_class, device=x.device), **cond)
        class_labels = torch.as_tensor(class_labels, device=x.device).reshape(-1).expand(x.shape[0])
        null = torch.full_like(class_labels, self.null_class)
        batched = lambda v: torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == x.shape[0]  # noqa: E731
        other = {k: torch.cat([v, v]) if batched(v) else v for k, v in cond.items()}
        both = self.inner(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([class_labels, null]), **other
        )
        d_cond, d_uncond = both.chunk(2)
        w = torch.as_tensor(self.scale, device=x.device, dtype=x.dtype)
        w = w.reshape(-1, *([1] * (x.ndim - 1))) if w.ndim else w
        return d_cond + w * (d_cond - d_uncond)
