"""SiD: Score identity Distillation (Zhou, Zheng, Wang, Yin, Huang; ICML 2024); docs/math.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from ..config import ObjectiveConfig
from ..students import trainable_copy
from ..teachers.base import Denoiser
from ..teachers.guidance import CFGDenoiser
from ..tensors import append_dims, mean_chw, sum_chw
from .base import Batch, Objective, Phase
from .critic import FeatureLayer, HeadKind, ScoreWithHead, check_head_options, critic_loss, gan_generator_loss
from .noise import NoiseKind, check_time_range, query_and_fake_noise


@dataclass
class SiDConfig(ObjectiveConfig):
    """Hyperparameters of :class:`SiD` (defaults: the official code on CIFAR-10).

    Attributes:
        alpha: weight of the score-difference term in the generator loss (1.2; 0.5-1.0 for new domains).
        noise: the generator phase's noise distribution: ``karras`` (official: Karras time
            t ~ U(tmin, tmax)/1000), ``timesteps`` (uniform over the teacher's training timesteps
            in [tmin, tmax)/1000 of them) or ``lognormal``.
        tmin, tmax: range of ``karras``/``timesteps`` in thousandths (0, 800 -> sigma in [0.002, 24.4]).
        sigma_min, sigma_max, rho: range of ``karras``/``lognormal`` (default: EDM's [0.002, 80]
            within the teacher's trained range) and the Karras rho.
        fake_score_noise: the fake score's training distribution: ``lognormal`` (official, EDM's
            P_mean/P_std) or ``generator`` (the same as ``noise``).
        p_mean, p_std: the ``lognormal`` distribution.
        generator_weighting: per-sample normaliser of the generator loss: ``mean_abs`` (official,
            1 / mean_CHW |x_g - y_real|) or ``none``.
        loss_scale: multiplier of the generator loss (100 in the official code).
        critic_ratio: fake-score updates per generator update.
        adv_weight: SiDA (Zhou et al. 2025): weight of the generator's adversarial term
            ``mean_B[CHW softplus(-l(x_t)) / w]``, l a discriminator head on the fake score's features
            trained on real and generated data in the critic update, w the generator loss's
            per-sample normaliser (the official code puts the GAN loss on the scale of SiD's
            per-pixel sum this way; its CIFAR-10 run uses 0.01 with ``loss_scale`` 100);
            0 (default): plain, data-free SiD.
        disc_weight: weight of the discriminator loss in the critic update (SiDA only).
        disc_trains_fake_score: whether that loss also trains the fake score's own layers (SiDA: yes).
        head_lr_scale: the discriminator head's learning rate as a multiple of the fake score's
            (SiDA only; the official code: 1, over far more updates than a short run makes).
        disc_head: the discriminator head on the fake score's features: ``mean_mlp`` (an MLP on
            the features' spatial mean, SiDA's) or ``conv`` (a patch discriminator on the feature map, as
            DMD2's head is convolutional; :class:`~distilldiff.objectives.critic.ScoreWithHead`).
        disc_features: which features the head reads: ``bottleneck`` (DMD2's and SiDA's choice) or
            ``decoder`` (a UNet's last up block: the full-resolution map, which sees pixel-level
            differences such as background speckle that the bottleneck of a small UNet does not).
        fake_guidance_train, fake_guidance_eval: SiD-LSG's guidance of the fake score (Zhou et al.
            2025, "Guided Score identity Distillation"; long and short guidance): the fake score is
            trained, and read in the generator loss, through classifier-free guidance at these
            weights w, ``f_w = f_c + w (f_c - f_u)``; diffusers' scales ``kappa_1 = 1 + fake_guidance_train``
            and ``kappa_2 = kappa_3 = 1 + fake_guidance_eval``, the teacher's ``kappa_4 = 1 +
            teacher.guidance_scale``. 0 (default): plain SiD. Needs a teacher with an unconditional
            input; not with SiDA's head.
    """

    name: ClassVar[str] = "sid"

    alpha: float = 1.2
    noise: NoiseKind = "karras"
    tmin: int = 0
    tmax: int = 800
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    fake_score_noise: Literal["lognormal", "generator"] = "lognormal"
    p_mean: float = -1.2
    p_std: float = 1.2
    generator_weighting: Literal["mean_abs", "none"] = "mean_abs"
    loss_scale: float = 100.0
    critic_ratio: int = 1
    adv_weight: float = 0.0
    disc_weight: float = 1.0
    disc_trains_fake_score: bool = True
    head_lr_scale: float = 1.0
    disc_head: HeadKind = "mean_mlp"
    disc_features: FeatureLayer = "bottleneck"
    fake_guidance_train: float = 0.0
    fake_guidance_eval: float = 0.0

    def __post_init__(self):
        check_time_range(self.tmin, self.tmax)
        if self.critic_ratio < 1:
            raise ValueError(f"objective.critic_ratio must be >= 1, got {self.critic_ratio}")
        if self.adv_weight < 0:
            raise ValueError(f"objective.adv_weight must be >= 0 (0: plain SiD), got {self.adv_weight}")
        if self.disc_weight <= 0:
            raise ValueError(f"objective.disc_weight must be > 0, got {self.disc_weight}")
        check_head_options(self.head_lr_scale, self.disc_head, self.adversarial, "adv_weight > 0 (SiDA)", self.disc_features)
        for key in ("fake_guidance_train", "fake_guidance_eval"):
            if getattr(self, key) < 0:
                raise ValueError(f"objective.{key} must be >= 0 (0: an unguided fake score), got {getattr(self, key)}")
        if self.fake_guided and self.adversarial:
            raise ValueError("objective.fake_guidance_train / fake_guidance_eval (SiD-LSG) with adv_weight (SiDA): not supported "
                             "(the guided fake score has no discriminator head)")

    @property
    def adversarial(self) -> bool:
        return self.adv_weight > 0

    @property
    def fake_guided(self) -> bool:
        return self.fake_guidance_train > 0 or self.fake_guidance_eval > 0


class SiD(Objective):
    """Data-free one-step distillation with the score-identity generator loss (SiDA with ``adv_weight``).

    Networks: ``teacher`` (frozen f_phi), ``fake_score`` (f_psi, a copy of the teacher trained on
    generated images; SiDA: with a discriminator head on its features, trained on real data too),
    ``generator`` (G, the one-step student).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = SiDConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "fake_score": "critic", "generator": "student"}

    def __init__(self, config: SiDConfig, teacher: Denoiser):
        self.config = config
        self.sigma_data = float(teacher.sigma_data)
        c = config
        #: the generator phase's noise levels and the fake score's (SiDA: also the discriminator's)
        self.query_noise, self.fake_noise = query_and_fake_noise(c, teacher)
        self.needs_real_data = c.adversarial

    @classmethod
    def build(cls, config: SiDConfig, teacher: nn.Module) -> "SiD":
        if config.fake_guided and not teacher.conditioning.has_null:
            raise ValueError("objective.fake_guidance_train / fake_guidance_eval guide the fake score, which needs a conditional "
                             "teacher with an unconditional input (a null class or an empty prompt)")
        return cls(config, teacher)

    @staticmethod
    def guided(fake_score, w: float):
        """The fake score read through classifier-free guidance at ``w`` (itself for w = 0; SiD-LSG)."""
        return CFGDenoiser(fake_score, w) if w else fake_score

    def make_critic(self, name: str, teacher: Denoiser) -> nn.Module:
        score = trainable_copy(teacher)
        return ScoreWithHead(score, head_lr_scale=self.config.head_lr_scale, head=self.config.disc_head,
                             features=self.config.disc_features) if self.config.adversarial else score

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", "fake_score", repeats=self.config.critic_ratio), Phase("generator", "generator")]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if phase.name == "fake_score":
            return self.fake_score_loss(nets, batch)
        return self.generator_loss(nets, batch)

    def fake_score_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """EDM denoising loss of f_psi on generated images (SiD Alg. 1, fake-score update); SiDA adds
        its head's discriminator loss on real and generated images."""
        c = self.config
        if c.fake_guidance_train:  # SiD-LSG's kappa_1: the guided output is what learns to denoise x_g
            nets = {**nets, "fake_score": self.guided(nets["fake_score"], c.fake_guidance_train)}
        return critic_loss(nets, batch, fake_noise=self.fake_noise, disc_noise=self.query_noise if c.adversarial else None,
                           sigma_data=self.sigma_data, disc_weight=c.disc_weight, detach_features=not c.disc_trains_fake_score)

    def generator_sigma(self, batch: int, like: Tensor) -> Tensor:
        """Generator-phase noise levels (official: the Karras schedule at t ~ U(0, tmax/1000))."""
        return self.query_noise.draw(batch, like)

    def generator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """SiD generator loss (Zhou et al. 2024, eq. 21 with the official normaliser w); SiDA adds
        ``adv_weight`` softplus(-l(x_t)) from the fake score's head at the same x_t."""
        x_g = nets["generator"](batch.noise, **batch.cond)
        sigma = self.generator_sigma(x_g.shape[0], x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        y_real = nets["teacher"](x_t, sigma, **batch.cond)
        if not self.config.adversarial:
            y_fake = self.guided(nets["fake_score"], self.config.fake_guidance_eval)(x_t, sigma, **batch.cond)
            return self.generator_loss_from(x_g, y_real, y_fake)
        y_fake, logit = nets["fake_score"](x_t, sigma, with_logit=True, **batch.cond)
        loss, logs = self.generator_loss_from(x_g, y_real, y_fake)
        adv = self.adversarial_loss(logit, x_g, y_real)
        loss = loss + self.config.adv_weight * adv
        return loss, {**logs, "adv_loss": gan_generator_loss(logit.detach()), "loss": loss.detach()}

    def normaliser(self, x_g: Tensor, y_real: Tensor) -> Tensor:
        """Per-sample w ``[B]`` of the generator loss: mean_CHW |x_g - y_real| (no gradient), or 1."""
        with torch.no_grad():
            w = mean_chw((x_g - y_real).abs()).clamp_min(1e-5)
        return torch.ones_like(w) if self.config.generator_weighting == "none" else w

    def adversarial_loss(self, logit: Tensor, x_g: Tensor, y_real: Tensor) -> Tensor:
        """SiDA's generator term on SiD's scale, ``mean_B[CHW softplus(-l(x_t)) / w]`` (``logit`` ``[B]``):
        the non-saturating GAN loss counted once per element and divided by the same w as SiD's loss."""
        per_sample = gan_generator_loss(logit, reduce=False) * x_g[0].numel() / self.normaliser(x_g, y_real)
        return per_sample.mean()

    def generator_loss_from(self, x_g: Tensor, y_real: Tensor, y_fake: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss given the generated images and both scores' denoised estimates at x_t."""
        w = self.normaliser(x_g, y_real)
        per_sample = sum_chw((y_real - y_fake) * ((y_real - x_g) - self.config.alpha * (y_real - y_fake))) / w
        loss = per_sample.mean() * self.config.loss_scale
        return loss, {"loss": loss.detach(), "w": w.mean()}
