"""Classifier-free guidance as a wrapper that is itself a denoiser."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..tensors import append_dims
from .base import Denoiser
from .conditioning import Conditioning


class CFGDenoiser(Denoiser):
    """``D_w(x) = D(x, cond) + w (D(x, cond) - D(x, uncond))`` (w = 0: no guidance; Ho & Salimans 2022, eq. 6).

    diffusers/LCM write ``guidance_scale = 1 + w``. The unconditional branch takes the wrapped
    model's own unconditional input (:meth:`Conditioning.null`, e.g. its null class label); both
    branches run as one batch. A call without conditioning is answered unconditionally.

    Args:
        denoiser: a conditional denoiser with an unconditional input; also a distributed wrapper of
            one (its attributes are read from the wrapped ``module``; calls go through the wrapper).
        scale: guidance weight ``w`` (float, or a ``[B]`` tensor for per-sample guidance).
    """

    def __init__(self, denoiser: Denoiser, scale: float | Tensor):
        super().__init__()
        self.inner = denoiser
        self.scale = scale
        denoiser = getattr(denoiser, "module", denoiser)  # DistributedDataParallel
        if not denoiser.conditioning.has_null:
            raise ValueError(
                "classifier-free guidance needs a teacher with an unconditional input (e.g. a null class label, "
                "null_class); this teacher has none"
            )
        for name in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, name, getattr(denoiser, name))

    @property
    def conditioning(self) -> Conditioning:
        return getattr(self.inner, "module", self.inner).conditioning

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return getattr(self.inner, "module", self.inner).prior_scale(sigma)

    def decode(self, x: Tensor) -> Tensor:
        return getattr(self.inner, "module", self.inner).decode(x)

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return self._guided(self.inner, x, sigma, cond)

    def denoise_scaled(self, x_scaled: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Guidance of the wrapped denoiser's own :meth:`~Denoiser.forward_scaled` (finite at sigma = inf where it is)."""
        return self._guided(getattr(self.inner, "module", self.inner).forward_scaled, x_scaled, sigma, cond)

    def _guided(self, call, x: Tensor, sigma: Tensor, cond: dict[str, Any]) -> Tensor:
        n, conditioning = x.shape[0], self.conditioning
        own, other = conditioning.split(cond)
        if not own:  # unconditional request: guidance has nothing to amplify
            return call(x, sigma, **conditioning.null(n, x.device), **other)
        own, null = conditioning.expand(own, n, x.device), conditioning.null(n, x.device)
        both = {k: torch.cat([own[k], null[k]]) for k in own}
        batched = lambda v: torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == n  # noqa: E731
        other = {k: torch.cat([v, v]) if batched(v) else v for k, v in other.items()}
        d_cond, d_uncond = call(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **other).chunk(2)
        w = torch.as_tensor(self.scale, device=x.device, dtype=x.dtype)
        return d_cond + append_dims(w, x.ndim) * (d_cond - d_uncond)
