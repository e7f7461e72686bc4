"""SiD: Score identity Distillation (Zhou, Zheng, Wang, Yin, Huang; ICML 2024); docs/math.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import ObjectiveConfig
from ..tensors import append_dims, mean_chw, sum_chw
from .base import Batch, Objective, Phase, fake_score_loss, karras_time_sigma


@dataclass
class SiDConfig(ObjectiveConfig):
    """Hyperparameters of :class:`SiD` (defaults: the official code on CIFAR-10).

    Attributes:
        alpha: weight of the score-difference term in the generator loss (1.2; 0.5-1.0 for new domains).
        tmax: largest generator-phase time, in thousandths of the Karras schedule (800 -> sigma ~ 24.4).
        sigma_min, sigma_max, rho: the Karras schedule the generator-phase sigma is drawn from.
        p_mean, p_std: log-normal noise distribution of the fake-score (EDM) loss.
        loss_scale: multiplier of the generator loss (100 in the official code).
        critic_ratio: fake-score updates per generator update.
    """

    name: ClassVar[str] = "sid"

    alpha: float = 1.2
    tmax: int = 800
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    loss_scale: float = 100.0
    critic_ratio: int = 1

    def __post_init__(self):
        if not 0 < self.tmax <= 1000:
            raise ValueError(f"objective.tmax must be in (0, 1000], got {self.tmax}")
        if self.critic_ratio < 1:
            raise ValueError(f"objective.critic_ratio must be >= 1, got {self.critic_ratio}")


class SiD(Objective):
    """Data-free one-step distillation with the score-identity generator loss.

    Networks: ``teacher`` (frozen f_phi), ``fake_score`` (f_psi, a copy of the teacher trained on
    generated images), ``generator`` (G, the one-step student).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = SiDConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "fake_score": "critic", "generator": "student"}

    def __init__(self, config: SiDConfig, sigma_data: float):
        self.config = config
        self.sigma_data = float(sigma_data)

    @classmethod
    def build(cls, config: SiDConfig, teacher: nn.Module) -> "SiD":
        return cls(config, teacher.sigma_data)

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", "fake_score", repeats=self.config.critic_ratio), Phase("generator", "generator")]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if phase.name == "fake_score":
            return self.fake_score_loss(nets, batch)
        return self.generator_loss(nets, batch)

    def fake_score_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """EDM denoising loss of f_psi on generated images (SiD Alg. 1, fake-score update)."""
        return fake_score_loss(nets, batch, self.config.p_mean, self.config.p_std, self.sigma_data)

    def generator_sigma(self, batch: int, like: Tensor) -> Tensor:
        """Generator-phase noise levels: the Karras schedule at t ~ U(0, tmax/1000)."""
        c = self.config
        return karras_time_sigma(batch, c.tmax, c.sigma_min, c.sigma_max, c.rho, like)

    def generator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """SiD generator loss (Zhou et al. 2024, eq. 21 with the official normaliser w)."""
        x_g = nets["generator"](batch.noise, **batch.cond)
        sigma = self.generator_sigma(x_g.shape[0], x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        y_real = nets["teacher"](x_t, sigma, **batch.cond)
        y_fake = nets["fake_score"](x_t, sigma, **batch.cond)
        return self.generator_loss_from(x_g, y_real, y_fake)

    def generator_loss_from(self, x_g: Tensor, y_real: Tensor, y_fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss given the generated images and both scores' denoised estimates at x_t."""
        with torch.no_grad():
            w = mean_chw((x_g - y_real).abs()).clamp_min(1e-5)
        per_sample = sum_chw((y_real - y_fake) * ((y_real - x_g) - self.config.alpha * (y_real - y_fake))) / w
        loss = per_sample.mean() * self.config.loss_scale
        return loss, {"loss": loss.detach(), "w": w.mean()}
