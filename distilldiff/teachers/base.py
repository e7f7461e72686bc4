"""The one denoiser interface every teacher and student sits behind (k-diffusion style)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..tensors import append_dims
from .conditioning import Conditioning, class_conditioning


class Denoiser(nn.Module):
    """A denoiser ``D(x, sigma, **cond) ~= E[x0 | x_sigma]`` in EDM's sigma space.

    ``x_sigma = x0 + sigma * eps``. Subclasses implement :meth:`denoise`; callers use
    ``denoiser(x, sigma, **cond)``.

    Attributes:
        sigma_min: smallest noise level the model was trained on.
        sigma_max: largest noise level the model was trained on.
        sigma_data: standard deviation of the data (EDM's ``sigma_data``).
        sample_shape: shape of one sample without the batch dimension, e.g. ``(1, 28, 28)``.
        num_classes: number of class labels for class-conditional models, else ``None``.
        null_class: label meaning "no class" (used by classifier-free guidance), else ``None``.

    What the model is conditioned on, and how to draw it, is :attr:`conditioning`; which of its
    parameters a trained copy updates is :meth:`trainable_parameters`.
    """

    sigma_min: float
    sigma_max: float
    sigma_data: float
    sample_shape: tuple[int, ...]
    num_classes: int | None = None
    null_class: int | None = None

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        """Denoise ``x`` (``[B, *sample_shape]``) at noise level ``sigma`` (scalar or ``[B]``)."""
        return self.denoise(x, self.expand_sigma(sigma, x), **cond)

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Subclass hook: ``sigma`` arrives as a ``[B]`` tensor in ``x``'s dtype and device."""
        raise NotImplementedError

    @staticmethod
    def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
        """Return ``sigma`` as a ``[B]`` tensor on ``x``'s device and dtype."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        if sigma.ndim == 0:
            return sigma.expand(x.shape[0])
        sigma = sigma.reshape(-1)
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries but x has batch size {x.shape[0]}")
        return sigma

    def fresh_noise(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard-normal noise shaped like ``like`` ``[B, *sample_shape]``, drawn on the CPU from ``generator``
        in the order the model's stock pipeline draws it (the re-noising of multistep sampling): by
        default in this layout, as ``torch.randn(like.shape)``."""
        return torch.randn(like.shape, generator=generator, dtype=like.dtype, device="cpu").to(like.device)

    def prior_scale(self, sigma: Tensor) -> Tensor:
        """Scale s such that ``s * z`` (z ~ N(0, I)) is this model's pure-noise input at ``sigma``.

        EDM-style models use ``s = sigma``. VP models override it with ``sqrt(1 + sigma^2)`` so
        that the network sees exactly unit-variance noise, as a diffusers scheduler feeds it.
        """
        return sigma

    def forward_scaled(self, x_scaled: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        """``D(prior_scale(sigma) * x_scaled, sigma)``: the denoiser on an input given in units of the
        pure-noise scale, the form that stays finite as ``sigma -> inf``.

        At ``sigma = inf`` the noisy sample ``x0 + sigma * eps`` over ``prior_scale(sigma)`` is ``eps``
        itself for every convention here (EDM, VP, flow: ``prior_scale(sigma) / sigma -> 1``), so
        ``forward_scaled(z, inf)`` denoises pure noise ``z``. Denoisers trained there (flow-matching
        teachers at t = 1) override :meth:`denoise_scaled`; the others answer ``sigma = inf`` with a
        one-line ``ValueError``.
        """
        sigma = self.expand_sigma(sigma, x_scaled)
        return self.denoise_scaled(x_scaled, sigma, **cond)

    def denoise_scaled(self, x_scaled: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """Subclass hook of :meth:`forward_scaled` (``sigma`` as a ``[B]`` tensor); by default
        :meth:`forward` on ``prior_scale(sigma) * x_scaled`` for finite ``sigma``."""
        if bool(torch.isinf(sigma).any()):
            raise ValueError(f"{type(self).__name__} is not defined at sigma = inf (pure noise); its noise levels end at "
                             f"sigma_max = {self.sigma_max:.4g}")
        return self(x_scaled * append_dims(self.prior_scale(sigma), x_scaled.ndim), sigma, **cond)

    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] of samples ``x`` (pixel models: ``x`` itself; latent models decode)."""
        return x

    def score(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        """grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
        s = append_dims(self.expand_sigma(sigma, x), x.ndim)
        return (self(x, sigma, **cond) - x) / s**2

    @property
    def conditioning(self) -> Conditioning:
        """The keyword arguments this denoiser takes: class labels (from ``num_classes`` and
        ``null_class``) or none. Denoisers with other conditioning override this."""
        return class_conditioning(self.num_classes, self.null_class)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters a trained copy of this denoiser updates: all of them, or only the LoRA
        adapter's where its network (``self.model``) carries one (``student.lora_rank``). The training
        engine optimises exactly these."""
        model = getattr(self, "model", None)
        if getattr(model, "peft_config", None):
            return [p for n, p in model.named_parameters() if "lora_" in n]
        return list(self.parameters())

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        """Trainable parameters that learn at a multiple of the learning rate (default: none), e.g. a
        zero-started input layer next to copied weights."""
        return {}
