"""Training a diffusion model from data (used to train the shipped MNIST teacher)."""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import DenoisingConfig
from ..teachers.conditioning import Conditioning
from .base import Batch, Objective, Phase, denoising_loss, drop_conditioning

__all__ = ["DenoisingConfig", "DenoisingObjective"]


class DenoisingObjective(Objective):
    """DDPM training of a VP model (Ho et al. 2020), written in sigma space.

    Timesteps are uniform on the scheduler's grid and the loss on x0 is weighted so that it
    equals the loss on the model's own output: epsilon-prediction ``||eps_hat - eps||^2 =
    ||x0_hat - x0||^2 / sigma^2`` (Ho et al. 2020, eq. 14), v-prediction ``(1 + sigma^2) / sigma^2``,
    sample-prediction 1. With ``cond_drop_prob`` the conditioning of that share of the samples is
    replaced by the model's unconditional input (Ho & Salimans 2022, Alg. 1).

    Args:
        config: hyperparameters.
        sigmas: ``[T]`` noise levels of the training timesteps.
        prediction_type: the network's output (``epsilon``, ``v_prediction``, ``sample``).
        conditioning: the model's conditioning (its unconditional input replaces dropped conditions).
    """

    name: ClassVar[str] = "denoising"
    networks: ClassVar[Mapping[str, str]] = {"model": "student"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: DenoisingConfig, sigmas: Tensor, prediction_type: str, conditioning: Conditioning):
        if config.cond_drop_prob > 0 and not conditioning.has_null:
            raise ValueError("objective.cond_drop_prob > 0 needs a model with an unconditional input (a null class label, null_class)")
        self.config = config
        self.sigmas = sigmas.float()
        self.prediction_type = prediction_type
        self.conditioning = conditioning

    def phases(self) -> list[Phase]:
        return [Phase("denoise", "model")]

    def weight(self, sigma: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return 1 / sigma**2
        if self.prediction_type == "v_prediction":
            return (1 + sigma**2) / sigma**2
        return torch.ones_like(sigma)

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        x0 = batch.real
        t = torch.randint(0, len(self.sigmas), (x0.shape[0],))
        sigma = self.sigmas[t].to(x0)
        cond = drop_conditioning(self.conditioning, dict(batch.cond), self.config.cond_drop_prob, x0)
        # per-pixel mean, as diffusers' MSE on the model output
        loss = denoising_loss(nets["model"], x0, sigma, self.weight(sigma), cond) / x0[0].numel()
        return loss, {"loss": loss.detach()}
