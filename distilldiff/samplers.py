"""Samplers in sigma space: noise schedules, DDIM, and multistep (consistency-style) sampling."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .teachers.base import Denoiser

SAMPLERS = ("ddim", "multistep")


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's ``[num_steps]`` decreasing noise levels (Karras et al. 2022, eq. 5), float64."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    i = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    return (sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def base_denoiser(teacher: Denoiser) -> Denoiser:
    """The innermost denoiser of ``teacher``, looking through wrappers (classifier-free guidance,
    consistency parameterisations) that hold theirs as ``inner``."""
    base = teacher
    while isinstance(getattr(base, "inner", None), Denoiser):
        base = base.inner
    return base


def vp_base(teacher: Denoiser):
    """The discrete-time (diffusers VP) denoiser inside ``teacher``, looking through wrappers such
    as classifier-free guidance; ``None`` if there is none."""
    from .teachers.vp import VPDenoiser

    base = teacher
    while not isinstance(base, VPDenoiser) and isinstance(getattr(base, "inner", None), Denoiser):
        base = base.inner
    return base if isinstance(base, VPDenoiser) else None


def teacher_grid(teacher: Denoiser, num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """A few-step student's decreasing noise levels on ``teacher``'s own terms.

    Teachers with a diffusers scheduler sample on its grid (``sampling_sigmas``), also behind a
    wrapper (classifier-free guidance): VP teachers on DDIM's "trailing" timesteps, which a stock
    ``DDIMScheduler`` reproduces and which nest when the step count halves; flow teachers on the
    ``FlowMatchEulerDiscreteScheduler``'s shifted grid, from t = 1. Others: the Karras grid over
    ``[sigma_min, sigma_max]`` clipped to the teacher's range.
    """
    base = base_denoiser(teacher)
    if hasattr(base, "sampling_sigmas"):
        return [float(s) for s in base.sampling_sigmas(num_steps)]
    lo, hi = max(sigma_min, teacher.sigma_min), min(sigma_max, teacher.sigma_max)
    return [float(s) for s in karras_sigmas(num_steps, lo, hi, rho)]


def multistep_sigmas(grid: Sequence[float], steps: int) -> list[float]:
    """Noise levels of ``steps``-step consistency sampling (Song et al. 2023, Alg. 1): ``steps``
    levels of the increasing training ``grid`` [N], evenly spaced in index from ``grid[N-1]``
    (sigma_max) down, excluding ``grid[0]``."""
    n = len(grid)
    if not 1 <= steps <= n - 1:
        raise ValueError(f"consistency sampling takes 1 to {n - 1} steps on a grid of {n} noise levels, got {steps}")
    idx = torch.linspace(n - 1, 0, steps + 1).round().long()[:-1]
    return [float(grid[i]) for i in idx]


def lcm_grid_timesteps(num_train_timesteps: int, num_scales: int) -> list[int]:
    """The increasing training timesteps of latent consistency distillation (Luo et al. 2023, sec. 4.3,
    skipping-step k = T // N): ``[0, k - 1, 2k - 1, ..., N k - 1]``, the boundary t = 0 first."""
    if not 1 <= num_scales <= num_train_timesteps:
        raise ValueError(f"num_scales must be in [1, {num_train_timesteps}] (the teacher's timesteps), got {num_scales}")
    k = num_train_timesteps // num_scales
    return [0] + [j * k - 1 for j in range(1, num_scales + 1)]


def lcm_sample_timesteps(num_train_timesteps: int, num_scales: int, steps: int) -> list[int]:
    """Decreasing timesteps of ``steps``-step LCM sampling: ``steps`` of the ``num_scales`` skip-step
    timesteps, from the last one down, evenly spaced in index, as diffusers'
    ``LCMScheduler.set_timesteps(steps, original_inference_steps=num_scales)`` chooses them (the
    indices are the floors of numpy's float64 ``linspace``, rounding included, so that the two agree)."""
    import numpy as np

    if not 1 <= steps <= num_scales:
        raise ValueError(f"LCM sampling takes 1 to {num_scales} steps (objective.num_scales), got {steps}")
    origin = lcm_grid_timesteps(num_train_timesteps, num_scales)[1:][::-1]
    return [origin[int(i)] for i in np.floor(np.linspace(0, num_scales, num=steps, endpoint=False))]


def sample_loop(
    denoiser: Denoiser, noise: Tensor, sigmas: Tensor, sampler: str = "ddim", generator: torch.Generator | None = None,
    clip: bool = False, **cond: Any
) -> Tensor:
    """Run ``len(sigmas)`` denoiser evaluations from standard-normal ``noise`` ``[B, *sample_shape]``.

    The noise is scaled by ``denoiser.prior_scale(sigmas[0])``; a first level of ``inf`` (pure
    noise, t = 1 of a flow teacher) is evaluated as ``denoiser.forward_scaled(noise, inf)``. Between evaluations,
    ``"ddim"`` moves deterministically, ``x_b = x0 + (sigma_b / sigma_a) (x_a - x0)`` (DDIM =
    Euler in sigma space), and ``"multistep"`` re-noises, ``x_b = x0 + sigma_b * n`` with fresh
    ``n`` from ``generator`` (consistency sampling; :meth:`~distilldiff.teachers.Denoiser.fresh_noise`). With ``clip``,
    every evaluation's x0 is clipped to the images' range [-1, 1] (diffusers' ``clip_sample``). The last evaluation's x0
    is returned.
    Gradients flow (students train through this); wrap in ``torch.no_grad()`` to sample.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sigmas = sigmas.to(device=noise.device, dtype=noise.dtype)
    pure = bool(torch.isinf(sigmas[0]))  # flow teachers start at t = 1: x / prior_scale is the noise itself
    x = None if pure else noise * denoiser.prior_scale(sigmas[0])
    for i, s in enumerate(sigmas):
        x0 = denoiser.forward_scaled(noise, s, **cond) if pure and i == 0 else denoiser(x, s, **cond)
        if clip:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(sigmas):
            return x0
        if sampler == "ddim":  # from sigma = inf, (x - x0) / sigma is the noise (its limit)
            x = x0 + sigmas[i + 1] * noise if pure and i == 0 else x0 + (sigmas[i + 1] / s) * (x - x0)
        else:
            x = x0 + sigmas[i + 1] * denoiser.fresh_noise(noise, generator)
    return x


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, **cond: Any) -> Tensor:
    """Deterministic DDIM from ``sigmas[0]`` down to 0 (see :func:`sample_loop`). ``[B, *sample_shape]``."""
    return sample_loop(denoiser, noise, sigmas, "ddim", **cond)


@torch.no_grad()
def multistep_sample(denoiser: Denoiser, noise: Tensor, sigmas: Tensor, generator: torch.Generator | None = None, **cond: Any) -> Tensor:
    """Consistency-style sampling: denoise, re-noise to the next sigma with fresh noise, repeat."""
    return sample_loop(denoiser, noise, sigmas, "multistep", generator, **cond)
