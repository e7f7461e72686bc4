"""Training a flow-matching model from data (used to train the shipped mini flow teacher)."""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import FlowMatchingConfig
from ..teachers.conditioning import Conditioning
from .base import Batch, Objective, Phase, denoising_loss, drop_conditioning

__all__ = ["FlowMatchingConfig", "FlowMatchingObjective"]


class FlowMatchingObjective(Objective):
    """Rectified-flow training (Liu et al. 2023; Esser et al. 2024, eq. 1 with the logit-normal t of sec. 3.1),
    written in sigma space.

    ``t ~ logit-normal(logit_mean, logit_std)``; since ``sigma = t / (1 - t)`` is ``exp(logit t)``, that is
    ``sigma = exp(N(logit_mean, logit_std^2))``. With ``x_t = (1 - t) x0 + t eps`` and ``D = x_t - t v_hat``,
    the velocity loss is an x0 loss: ``||v_hat - (eps - x0)||^2 = ||D - x0||^2 / t^2``, ``1 / t = (1 + sigma) / sigma``.
    ``cond_drop_prob`` of the captions are replaced by the unconditional input (Ho & Salimans 2022, Alg. 1).

    Args:
        config: hyperparameters.
        conditioning: the model's conditioning (its unconditional input replaces dropped captions).
    """

    name: ClassVar[str] = "flow_matching"
    networks: ClassVar[Mapping[str, str]] = {"model": "student"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: FlowMatchingConfig, conditioning: Conditioning):
        if config.cond_drop_prob > 0 and not conditioning.has_null:
            raise ValueError("objective.cond_drop_prob > 0 needs a model with an unconditional input")
        self.config = config
        self.conditioning = conditioning

    def phases(self) -> list[Phase]:
        return [Phase("flow", "model")]

    def draw_sigma(self, n: int, like: Tensor) -> Tensor:
        """``[n]`` noise levels of logit-normal flow times."""
        z = torch.randn(n, device=like.device, dtype=like.dtype)
        return (self.config.logit_mean + self.config.logit_std * z).exp()

    @staticmethod
    def weight(sigma: Tensor) -> Tensor:
        """``1 / t^2``: the x0 loss's weight that makes it the velocity loss."""
        return ((1 + sigma) / sigma) ** 2

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch.real
        sigma = self.draw_sigma(x0.shape[0], x0)
        cond = drop_conditioning(self.conditioning, dict(batch.cond), self.config.cond_drop_prob, x0)
        # per-element mean, as diffusers' MSE on the velocity
        loss = denoising_loss(nets["model"], x0, sigma, self.weight(sigma), cond) / x0[0].numel()
        return loss, {"loss": loss.detach()}
