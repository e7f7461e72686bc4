"""Analytic isotropic Gaussian-mixture teacher with the exact denoiser (for exact tests)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..tensors import append_dims
from .base import Denoiser


class GaussianMixtureDenoiser(Denoiser):
    """Exact denoiser of an isotropic Gaussian mixture ``sum_k pi_k N(mu_k, s_k^2 I)``.

    At noise level sigma each component becomes ``N(mu_k, (s_k^2 + sigma^2) I)`` and
    ``D(x, sigma) = sum_k r_k(x) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k))`` with posterior
    responsibilities ``r_k``. This equals ``x + sigma^2 grad log p_sigma(x)`` exactly.

    Args:
        weights: ``[K]`` mixture weights (normalised here).
        means: ``[K, *sample_shape]`` component means; any sample shape, images included.
        stds: ``[K]`` isotropic component standard deviations (> 0).
        component_labels: optional ``[K]`` class label of each component. When given, the
            model is class-conditional: ``class_labels`` restricts the mixture to the
            components of that class, and ``null_class`` (= number of classes) means all.
        sigma_min, sigma_max: noise range reported to objectives.
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        means: Sequence | Tensor,
        stds: Sequence[float] | Tensor,
        component_labels: Sequence[int] | Tensor | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float64)
        means = torch.as_tensor(means, dtype=torch.float64)
        stds = torch.as_tensor(stds, dtype=torch.float64)
        k = weights.shape[0]
        if weights.ndim != 1 or means.shape[0] != k or stds.shape != (k,):
            raise ValueError(
                f"GaussianMixtureDenoiser: weights [K], means [K, ...], stds [K] must agree on K; got "
                f"{tuple(weights.shape)}, {tuple(means.shape)}, {tuple(stds.shape)}"
            )
        if (weights <= 0).any() or (stds <= 0).any():
            raise ValueError("GaussianMixtureDenoiser: weights and stds must be positive")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        if component_labels is not None:
            labels = torch.as_tensor(component_labels, dtype=torch.long)
            if labels.shape != (k,):
                raise ValueError(f"component_labels must have shape ({k},), got {tuple(labels.shape)}")
            self.register_buffer("component_labels", labels)
            self.num_classes = int(labels.max()) + 1
            self.null_class = self.num_classes
        else:
            self.component_labels = None
        self.sample_shape = tuple(means.shape[1:])
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        dim = means[0].numel()
        flat = means.reshape(k, dim)
        mean = (self.weights[:, None] * flat).sum(0)
        second = (self.weights[:, None] * (flat**2 + stds[:, None] ** 2)).sum(0)
        self.sigma_data = float((second - mean**2).mean().sqrt())

    def _log_weights(self, class_labels: Tensor | None, batch: int, device) -> Tensor:
        """``[B, K]`` log mixture weights, restricted to each sample's class if conditional."""
        logw = self.weights.log().to(device)[None].expand(batch, -1)
        if class_labels is None or self.component_labels is None:
            return logw
        class_labels = torch.as_tensor(class_labels, device=device).reshape(-1).expand(batch)
        keep = (self.component_labels.to(device)[None] == class_labels[:, None]) | (class_labels[:, None] == self.null_class)
        return logw.masked_fill(~keep, -math.inf)

    def log_prob(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        """``[B]`` log density of the mixture convolved with ``N(0, sigma^2 I)`` at ``x``."""
        sigma = self.expand_sigma(sigma, x)
        return torch.logsumexp(self._log_joint(x, sigma, class_labels), dim=1)

    def _log_joint(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
        b, dim = x.shape[0], x[0].numel()
        flat = x.reshape(b, 1, dim)
        mu = self.means.to(x).reshape(1, -1, dim)
        var = self.stds.to(x)[None] ** 2 + sigma[:, None] ** 2  # [B, K]
        sq = ((flat - mu) ** 2).sum(-1)
        log_norm = -0.5 * dim * (2 * math.pi * var).log()
        return self._log_weights(class_labels, b, x.device).to(x) + log_norm - 0.5 * sq / var

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        b, dim = x.shape[0], x[0].numel()
        resp = torch.softmax(self._log_joint(x, sigma, class_labels), dim=1)  # [B, K]
        var0 = self.stds.to(x)[None] ** 2
        shrink = var0 / (var0 + sigma[:, None] ** 2)  # [B, K]
        mu = self.means.to(x).reshape(1, -1, dim)
        post = mu + shrink[..., None] * (x.reshape(b, 1, dim) - mu)  # E[x0 | x, k]
        return (resp[..., None] * post).sum(1).reshape(x.shape)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, class_labels: Tensor | None = None, dtype=torch.float64
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` exact samples. Returns ``(x [n, *sample_shape], component index [n])``."""
        logw = self._log_weights(class_labels, n, "cpu")
        k = torch.multinomial(logw.exp(), 1, generator=generator).squeeze(1)
        noise = torch.randn((n, *self.sample_shape), generator=generator, dtype=torch.float64)
        x = self.means.cpu()[k] + append_dims(self.stds.cpu()[k], 1 + len(self.sample_shape)) * noise
        return x.to(dtype), k

    def assign_components(self, x: Tensor) -> Tensor:
        """Index of the nearest component mean for each sample (``[B]``), for mode-coverage checks."""
        dim = x[0].numel()
        d = torch.cdist(x.reshape(x.shape[0], dim).to(self.means), self.means.reshape(-1, dim))
        return d.argmin(1)
