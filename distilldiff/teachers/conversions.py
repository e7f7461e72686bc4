"""Exact conversions between diffusion parameterisations and EDM's sigma space.

Every objective in distilldiff works in the variance-exploding "sigma space" of EDM:
``x_sigma = x0 + sigma * eps``. These helpers map the other common conventions onto it.
All functions are elementwise, differentiable and dtype-preserving; ``sigma``/``alpha_bar``
broadcast against ``x`` when given with shape ``[B, 1, 1, 1]`` (:func:`distilldiff.tensors.append_dims`).
"""

from __future__ import annotations

import torch
from torch import Tensor


# --- VP / DDPM family: x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alphabar_t -------------------


def vp_sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """sigma = sqrt((1 - a) / a)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def vp_alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """a = 1 / (1 + sigma^2), the inverse of :func:`vp_sigma_from_alpha_bar`."""
    return 1 / (1 + sigma**2)


def vp_scale_input(x_sigma: Tensor, sigma: Tensor) -> Tensor:
    """x_t = x_sigma / sqrt(1 + sigma^2): sigma-space sample -> VP model input."""
    return x_sigma / (1 + sigma**2).sqrt()


def vp_x0_from_epsilon(x_t: Tensor, eps_hat: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps_hat) / alpha_bar.sqrt()


def vp_x0_from_v(x_t: Tensor, v_hat: Tensor, alpha_bar: Tensor) -> Tensor:
    """x0 = sqrt(a) x_t - sqrt(1 - a) v_hat  (v = sqrt(a) eps - sqrt(1 - a) x0)."""
    return alpha_bar.sqrt() * x_t - (1 - alpha_bar).sqrt() * v_hat


def vp_x0_from_output(x_t: Tensor, output: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """Convert a VP model output of the given ``prediction_type`` to an x0 estimate."""
    if prediction_type == "epsilon":
        return vp_x0_from_epsilon(x_t, output, alpha_bar)
    if prediction_type == "v_prediction":
        return vp_x0_from_v(x_t, output, alpha_bar)
    if prediction_type == "sample":
        return output
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'"
    )


def vp_output_from_x0(x_t: Tensor, x0: Tensor, alpha_bar: Tensor, prediction_type: str) -> Tensor:
    """Inverse of :func:`vp_x0_from_output`: the model output that yields ``x0`` at ``x_t``."""
    if prediction_type == "epsilon":
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":
        eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(
        f"unsupported prediction_type {prediction_type!r}; expected 'epsilon', 'v_prediction' or 'sample'"
    )


# --- Rectified flow / flow matching: x_t = (1 - t) x0 + t eps, v = eps - x0 ---------------------


def flow_sigma_from_t(t: Tensor) -> Tensor:
    """sigma = t / (1 - t)."""
    return t / (1 - t)


def flow_t_from_sigma(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def flow_scale_input(x_sigma: Tensor, sigma: Tensor) -> Tensor:
    """x_t = x_sigma / (1 + sigma)."""
    return x_sigma / (1 + sigma)


def flow_x0_from_velocity(x_t: Tensor, v_hat: Tensor, t: Tensor) -> Tensor:
    """x0 = x_t - t v_hat."""
    return x_t - t * v_hat


# --- Discrete timestep grids (k-diffusion's DiscreteSchedule idea) -------------------------------


class LogSigmaInterpolator:
    """Maps continuous sigma to a fractional timestep by interpolating in log-sigma.

    ``sigmas[i]`` is the noise level of integer timestep ``i`` and must increase with ``i``.
    Sigmas outside ``[sigmas[0], sigmas[-1]]`` clamp to the first/last timestep.
    """

    def __init__(self, sigmas: Tensor):
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(f"sigmas must be a 1-D grid with >= 2 entries, got shape {tuple(sigmas.shape)}")
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("sigmas must increase strictly with the timestep")
        self.sigmas = sigmas
        self.log_sigmas = sigmas.log()

    def timestep(self, sigma: Tensor) -> Tensor:
        """Fractional timestep for each ``sigma`` (any shape), same dtype as the grid."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(log_sigmas.dtype).log().clamp(log_sigmas[0], log_sigmas[-1])
        hi = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous()).clamp(1, len(log_sigmas) - 1)
        lo = hi - 1
        w = (log_sigma.reshape(-1) - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
        return (lo + w).reshape(sigma.shape)

    def sigma(self, timestep: Tensor) -> Tensor:
        """Inverse of :meth:`timestep` on the grid's range (linear in log-sigma)."""
        log_sigmas = self.log_sigmas.to(timestep.device)
        t = timestep.to(log_sigmas.dtype).clamp(0, len(log_sigmas) - 1)
        lo = t.floor().long().clamp(max=len(log_sigmas) - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()
