"""Samplers in sigma space: noise schedules, DDIM, and multistep (consistency-style) sampling."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .teachers.base import Denoiser


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's ``[num_steps]`` decreasing noise levels (Karras et al. 2022, eq. 5), float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, **cond: Any) -> Tensor:
    """Deterministic DDIM (= Euler in sigma space) from ``sigmas[0]`` down to 0.

    ``noise``: ``[B, *sample_shape]`` standard normal; it is scaled by the denoiser's
    ``prior_scale(sigmas[0])``. Each step is ``x_b = x0 + (sigma_b / sigma_a) (x_a - x0)``;
    the last step returns x0. Returns ``[B, *sample_shape]``.
    """
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    x = noise * denoiser.prior_scale(sigmas[0])
    for i, s in enumerate(sigmas):
        x0 = denoiser(x, s, **cond)
        if i + 1 == len(sigmas):
            return x0
        x = x0 + (sigmas[i + 1] / s) * (x - x0)
    return x


@torch.no_grad()
def multistep_sample(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, **cond: Any) -> Tensor:
    """Consistency-style sampling: denoise, re-noise to the next sigma with fresh noise, repeat."""
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    x = noise * denoiser.prior_scale(sigmas[0])
    for i, s in enumerate(sigmas):
        x0 = denoiser(x, s, **cond)
        if i + 1 == len(sigmas):
            return x0
        fresh = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device="cpu").to(noise.device)
        x = x0 + sigmas[i + 1] * fresh
    return x
