"""f-distill: f-divergence distribution matching (Xu, Nie, Vahdat 2025); docs/math.md.

DMD (reverse KL, data-free) and DMD2 (reverse KL + GAN) are configurations of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ObjectiveConfig
from ..teachers.base import Denoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase, fake_score_loss, karras_time_sigma

#: h(r) = r^2 f''(r) (up to a positive constant) for r = p_teacher / q_student (f-distill, Table 1)
WEIGHTINGS: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": lambda r: torch.ones_like(r),
    "forward_kl": lambda r: r,
    "js": lambda r: r / (1 + r),
    "squared_hellinger": lambda r: r.sqrt(),
    "jeffreys": lambda r: 1 + r,
    "softened_reverse_kl": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / r,
}

#: the generator f of each divergence D_f(p || q) = E_q[f(p / q)] (for the h(r) = r^2 f''(r) check)
F_OF_R: dict[str, Callable[[Tensor], Tensor]] = {
    "reverse_kl": lambda r: -r.log(),
    "forward_kl": lambda r: r * r.log(),
    "js": lambda r: r * r.log() - (1 + r) * ((1 + r) / 2).log(),
    "squared_hellinger": lambda r: (r.sqrt() - 1) ** 2,
    "jeffreys": lambda r: (r - 1) * r.log(),
    "softened_reverse_kl": lambda r: (r + 1) * ((r + 1) / (2 * r)).log(),
    "neyman": lambda r: (1 - r) ** 2 / r,
}

Divergence = Literal["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "softened_reverse_kl", "neyman"]


def ratio_per_noise_bin(r: Tensor, sigma: Tensor, bins: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``r [B]`` divided by its mean over the samples whose ``sigma [B]`` falls in the same of
    ``bins`` bins equally spaced in log sigma over [sigma_min, sigma_max] (outside: the end bins)."""
    edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), bins + 1, device=r.device, dtype=r.dtype)
    idx = torch.bucketize(sigma.to(r.dtype).log(), edges[1:-1])
    sums = torch.zeros(bins, device=r.device, dtype=r.dtype).index_add_(0, idx, r)
    counts = torch.zeros(bins, device=r.device, dtype=r.dtype).index_add_(0, idx, torch.ones_like(r))
    return r / (sums / counts.clamp(min=1))[idx]


@dataclass
class FDistillConfig(ObjectiveConfig):
    """Hyperparameters of :class:`FDistill`.

    Attributes:
        divergence: which f-divergence; its weighting h(r) multiplies the DMD gradient.
        gan_weight: weight of the generator's GAN term softplus(-D(x_t)) (DMD2: > 0; 0: none).
        critic_ratio: fake-score (and discriminator) updates per generator update (DMD2: 5).
        logit_clip: the discriminator logit log r is clamped to [-logit_clip, logit_clip].
        ratio_min, ratio_max: r is clipped to this range before h(r) (0.1, 20).
        ratio_bins: if > 0, divide r by its mean over the samples of the process's micro-batch
            in the same noise bin (``ratio_bins`` bins equally spaced in log sigma over
            [sigma_min, sigma_max]; a bin holding one sample gives r = 1), before the clip: a
            true ratio p/q has mean 1 under the student's q at every noise level. 0: off.
        normalize_h: divide h(r) by its batch mean.
        tmax, sigma_min, sigma_max, rho: the generator/discriminator noise levels, as in SiD
            (Karras schedule, t ~ U(0, tmax / 1000)).
        p_mean, p_std: log-normal noise levels of the fake-score (EDM) loss.
        disc_channels: width of the discriminator network.
    """

    name: ClassVar[str] = "fdistill"

    divergence: Divergence = "reverse_kl"
    gan_weight: float = 0.0
    critic_ratio: int = 1
    logit_clip: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    ratio_bins: int = 0
    normalize_h: bool = True
    tmax: int = 800
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    disc_channels: int = 32

    def __post_init__(self):
        if self.critic_ratio < 1:
            raise ValueError(f"objective.critic_ratio must be >= 1, got {self.critic_ratio}")
        if self.gan_weight < 0:
            raise ValueError(f"objective.gan_weight must be >= 0, got {self.gan_weight}")
        if not 0 < self.ratio_min < 1 < self.ratio_max:
            raise ValueError(f"objective.ratio_min/ratio_max must satisfy 0 < min < 1 < max, got {self.ratio_min}/{self.ratio_max}")
        if self.ratio_bins < 0:
            raise ValueError(f"objective.ratio_bins must be >= 0 (0: off), got {self.ratio_bins}")
        if self.ratio_bins and self.divergence == "reverse_kl":
            raise ValueError("objective.ratio_bins has no effect with divergence reverse_kl (h = 1); remove it")
        if not 0 < self.tmax <= 1000:
            raise ValueError(f"objective.tmax must be in (0, 1000], got {self.tmax}")

    @property
    def uses_discriminator(self) -> bool:
        return self.divergence != "reverse_kl" or self.gan_weight > 0


class Discriminator(nn.Module):
    """Density-ratio discriminator on noisy samples: logit(x_sigma, sigma, c) ~ log p_teacher / q_student.

    A small standalone network (not a head on the fake score's features, as FastGen/DMD2 use):
    a 3-layer CNN for images ``[C, H, W]`` or an MLP for vectors, on ``x / sqrt(sigma^2 + sd^2)``
    with ``log sigma`` as an extra input, and a projection term for class labels.
    """

    def __init__(self, sample_shape: tuple[int, ...], sigma_data: float, width: int = 32, num_classes: int | None = None):
        super().__init__()
        self.sigma_data = float(sigma_data)
        if len(sample_shape) == 3:
            c = sample_shape[0]
            self.body = nn.Sequential(
                nn.Conv2d(c + 1, width, 3, padding=1), nn.SiLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            feat = 2 * width
        else:
            dim = math.prod(sample_shape)
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(dim + 1, 4 * width), nn.SiLU(), nn.Linear(4 * width, 4 * width), nn.SiLU())
            feat = 4 * width
        self.head = nn.Linear(feat, 1)
        self.class_embed = nn.Embedding(num_classes + 1, feat) if num_classes else None

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **_: object) -> Tensor:
        """``[B]`` logits for ``x`` ``[B, *sample_shape]`` at ``sigma`` ``[B]``."""
        s = append_dims(sigma, x.ndim)
        x_in = x / (s**2 + self.sigma_data**2).sqrt()
        log_sigma = (s.log() / 4).expand(x.shape[0], *([1] * (x.ndim - 1)))
        if x.ndim == 4:
            h = self.body(torch.cat([x_in, log_sigma.expand(-1, 1, *x.shape[2:])], 1))
        else:
            h = self.body(torch.cat([x_in.flatten(1), log_sigma.reshape(-1, 1)], 1))
        logit = self.head(h).squeeze(1)
        if self.class_embed is not None and class_labels is not None:
            logit = logit + (self.class_embed(class_labels) * h).sum(1)
        return logit


class FDistill(Objective):
    """One-step student trained along the f-divergence gradient of distribution matching.

    Networks: ``teacher`` (frozen), ``fake_score`` (critic: a copy of the teacher fit to the
    student's samples), ``discriminator`` (critic, only when the weighting needs r or a GAN term
    is on; trained on real data), ``generator`` (the student).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = FDistillConfig

    def __init__(self, config: FDistillConfig, teacher: Denoiser):
        self.config = config
        self.sigma_data = float(teacher.sigma_data)
        self.num_classes = teacher.num_classes
        self.sample_shape = tuple(teacher.sample_shape)
        self.networks = {"teacher": "frozen", "fake_score": "critic", "generator": "student"}
        if config.uses_discriminator:
            self.networks = {"teacher": "frozen", "fake_score": "critic", "discriminator": "critic", "generator": "student"}
        self.needs_real_data = config.uses_discriminator

    @classmethod
    def build(cls, config: FDistillConfig, teacher: nn.Module) -> "FDistill":
        return cls(config, teacher)

    def make_critic(self, name: str, teacher: Denoiser) -> nn.Module:
        if name == "discriminator":
            return Discriminator(self.sample_shape, self.sigma_data, self.config.disc_channels, self.num_classes)
        return super().make_critic(name, teacher)

    def phases(self) -> list[Phase]:
        r = self.config.critic_ratio
        phases = [Phase("fake_score", "fake_score", repeats=r)]
        if self.config.uses_discriminator:
            phases.append(Phase("discriminator", "discriminator", repeats=r))
        return phases + [Phase("generator", "generator")]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if phase.name == "fake_score":
            return self.fake_score_loss(nets, batch)
        if phase.name == "discriminator":
            return self.discriminator_loss(nets, batch)
        return self.generator_loss(nets, batch)

    def noise_sigma(self, batch: int, like: Tensor) -> Tensor:
        """Generator/discriminator noise levels: the Karras schedule at t ~ U(0, tmax/1000), as in SiD."""
        c = self.config
        return karras_time_sigma(batch, c.tmax, c.sigma_min, c.sigma_max, c.rho, like)

    def fake_score_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """EDM denoising loss of the fake score on generated images (DMD2 Alg. 1, critic update)."""
        return fake_score_loss(nets, batch, self.config.p_mean, self.config.p_std, self.sigma_data)

    def discriminator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """softplus(D(fake_t)) + softplus(-D(real_t)): the logit estimates log p_teacher / q_student."""
        with torch.no_grad():
            x_g = nets["generator"](batch.noise, **batch.cond)
        sigma = self.noise_sigma(x_g.shape[0], x_g)
        fake_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        real_t = batch.real + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        d_fake = nets["discriminator"](fake_t, sigma, **batch.cond)
        d_real = nets["discriminator"](real_t, sigma, **batch.cond)
        loss = (F.softplus(d_fake) + F.softplus(-d_real)).mean()
        acc = ((d_real > 0).float().mean() + (d_fake < 0).float().mean()) / 2
        return loss, {"loss": loss.detach(), "accuracy": acc.detach()}

    def weights(self, logit: Tensor, sigma: Tensor | None = None) -> Tensor:
        """h(r) ``[B]`` with r = exp(clamp(logit)) clipped to [ratio_min, ratio_max] (then, with
        ``ratio_bins``, normalised per noise bin of ``sigma`` ``[B]``), h normalised by its batch mean."""
        c = self.config
        r = logit.clamp(-c.logit_clip, c.logit_clip).exp()
        if c.ratio_bins:
            if sigma is None:
                raise ValueError("objective.ratio_bins needs the noise levels of the batch")
            r = ratio_per_noise_bin(r.float(), sigma.float(), c.ratio_bins, c.sigma_min, c.sigma_max).to(logit.dtype)
        r = r.clamp(c.ratio_min, c.ratio_max)  # after the normalisation, so h(r) stays within its clip
        h = WEIGHTINGS[c.divergence](r)
        return h / h.mean() if c.normalize_h else h

    def generator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 ||x_g - sg(x_g - g)||^2, g = h(r) (x0_fake - x0_real) / mean|x_g - x0_real| (f-distill eq. 9)."""
        x_g = nets["generator"](batch.noise, **batch.cond)
        sigma = self.noise_sigma(x_g.shape[0], x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        logs: dict[str, Tensor] = {}
        with torch.no_grad():
            x0_real = nets["teacher"](x_t, sigma, **batch.cond)
            x0_fake = nets["fake_score"](x_t, sigma, **batch.cond)
            h = torch.ones_like(sigma)
            if self.config.divergence != "reverse_kl":
                h = self.weights(nets["discriminator"](x_t, sigma, **batch.cond), sigma)
                logs["h_max"] = h.max()
            w = h / (mean_chw((x_g - x0_real).abs()) + 1e-6)
            grad = (x0_fake - x0_real) * append_dims(w, x_g.ndim)
        loss = 0.5 * ((x_g - (x_g - grad).detach()) ** 2).mean()
        logs["dm_loss"] = loss.detach()
        if self.config.gan_weight > 0:
            gan = F.softplus(-nets["discriminator"](x_t, sigma, **batch.cond)).mean()
            loss = loss + self.config.gan_weight * gan
            logs["gan_loss"] = gan.detach()
        logs["loss"] = loss.detach()
        return loss, logs
