"""f-distill: f-divergence distribution matching (Xu, Nie, Vahdat 2025); docs/math.md.

DMD (reverse KL, data-free) and DMD2 (reverse KL + GAN) are configurations of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, ObjectiveConfig, StudentConfig
from ..students import Student, trainable_copy
from ..teachers.base import Denoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase
from .critic import FeatureLayer, HeadKind, ScoreWithHead, check_head_options, critic_loss, gan_generator_loss, global_sum
from .noise import NoiseKind, check_time_range, query_and_fake_noise
from .pairs import TeacherPairs, concat_cond, teacher_pairs

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


def noise_bin(sigma: Tensor, bins: int, sigma_min: float, sigma_max: float) -> Tensor:
    """``[B]`` index of the noise bin of each ``sigma`` ``[B]``: ``bins`` bins equally spaced in
    log sigma over [sigma_min, sigma_max] (outside: the end bins)."""
    edges = torch.linspace(math.log(sigma_min), math.log(sigma_max), bins + 1, device=sigma.device, dtype=torch.float64)
    return torch.bucketize(sigma.double().log(), edges[1:-1])


@dataclass
class FDistillConfig(ObjectiveConfig):
    """Hyperparameters of :class:`FDistill`.

    Attributes:
        divergence: which f-divergence; its weighting h(r) multiplies the DMD gradient.
        gan_weight: weight of the generator's GAN term softplus(-l(x_t)) (DMD2: > 0; 0: none).
        critic_ratio: critic updates (fake score and its discriminator head) per generator update (DMD2: 5).
        disc_weight: weight of the discriminator loss in the critic update (the fake score's
            denoising loss has weight 1; DMD2 uses 1e-2 on ImageNet-64).
        disc_trains_fake_score: whether the discriminator loss also trains the fake score's own
            layers (DMD2, SiDA) or only the head.
        head_lr_scale: the discriminator head's learning rate as a multiple of the fake score's
            (only with a head; the official DMD2 code: 1).
        disc_head: the discriminator head on the fake score's features: ``mean_mlp`` (an MLP on
            the features' spatial mean, SiDA's) or ``conv`` (a patch discriminator on the feature map, as
            DMD2's head is convolutional; :class:`~distilldiff.objectives.critic.ScoreWithHead`).
        disc_features: which features the head reads: ``bottleneck`` (DMD2's and SiDA's choice) or
            ``decoder`` (a UNet's last up block: the full-resolution map, which sees pixel-level
            differences such as background speckle that the bottleneck of a small UNet does not).
        logit_clip: the discriminator logit log r is clamped to [-logit_clip, logit_clip].
        ratio_min, ratio_max: r is clipped to this range before h(r) (0.1, 20).
        ratio_bins: if > 0, divide r by its running mean in its noise bin (``ratio_bins`` bins equally
            spaced in log sigma over the noise range), before the clip: a true ratio p/q has mean 1
            under the student's q at every noise level. 0: off.
        normalize_h: divide h(r) by its running mean.
        norm_decay: per-step decay of the running means of h and of r per bin. They are updated
            once per training step from the whole global batch, so they do not depend on the
            number of processes or accumulation steps.
        noise: the generator phase's (and discriminator's) noise distribution: ``karras``
            (Karras time t ~ U(tmin, tmax)/1000, as SiD), ``timesteps`` (uniform over the teacher's
            training timesteps in [tmin, tmax)/1000 of them, DMD2: 20..980) or ``lognormal``.
        fake_score_noise: the fake score's training distribution: ``generator`` (the same as
            ``noise``, DMD2's practice) or ``lognormal`` (EDM's, as SiD).
        tmin, tmax: range of ``karras`` and ``timesteps``, in thousandths.
        sigma_min, sigma_max, rho: range of ``karras``/``lognormal`` (default: EDM's [0.002, 80]
            within the teacher's trained range) and the Karras rho.
        p_mean, p_std: the ``lognormal`` distribution.
        generator_weighting: per-sample weight of the distribution-matching gradient:
            ``mean_abs`` (1 / mean_CHW |x_g - x0_real|, DMD eq. 8) or ``none``.
        regression_weight: weight of DMD's regression loss (Yin et al. 2024, sec. 3.3; their
            lambda_reg = 0.25 with LPIPS): the mean squared error between the generator's image and
            the teacher's deterministic sample from the same noise, over a fixed set of pairs made
            by the teacher before the first update (:mod:`~distilldiff.objectives.pairs`). 0: off.
        regression_pairs: number of pairs (default 1024; only with ``regression_weight`` > 0).
        regression_steps: teacher sampling steps per pair on its own grid (default 50, as the
            teacher's reference FID; only with ``regression_weight`` > 0).
        regression_share: pairs per update as a share of the batch, in (0, 1] (default 1: as many
            pairs as generated images; 0.25 with batch 32: 8 pairs). Smaller shares cost less per update
            (the loss adds only the generator's pass on the pairs); the share times every micro-batch
            must be a whole number, so the pairs per update do not change with processes or accumulation.
    """

    name: ClassVar[str] = "fdistill"

    divergence: Divergence = "reverse_kl"
    gan_weight: float = 0.0
    critic_ratio: int = 1
    disc_weight: float = 1.0
    disc_trains_fake_score: bool = True
    head_lr_scale: float = 1.0
    disc_head: HeadKind = "mean_mlp"
    disc_features: FeatureLayer = "bottleneck"
    logit_clip: float = 10.0
    ratio_min: float = 0.1
    ratio_max: float = 20.0
    ratio_bins: int = 0
    normalize_h: bool = True
    norm_decay: float = 0.9
    noise: NoiseKind = "karras"
    fake_score_noise: Literal["generator", "lognormal"] = "generator"
    tmin: int = 0
    tmax: int = 800
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    p_mean: float = -1.2
    p_std: float = 1.2
    generator_weighting: Literal["mean_abs", "none"] = "mean_abs"
    regression_weight: float = 0.0
    regression_pairs: int | None = None
    regression_steps: int | None = None
    regression_share: float | None = None

    def __post_init__(self):
        if self.critic_ratio < 1:
            raise ValueError(f"objective.critic_ratio must be >= 1, got {self.critic_ratio}")
        if self.gan_weight < 0:
            raise ValueError(f"objective.gan_weight must be >= 0, got {self.gan_weight}")
        if self.disc_weight <= 0:
            raise ValueError(f"objective.disc_weight must be > 0, got {self.disc_weight}")
        if not 0 < self.ratio_min < 1 < self.ratio_max:
            raise ValueError(f"objective.ratio_min/ratio_max must satisfy 0 < min < 1 < max, got {self.ratio_min}/{self.ratio_max}")
        if self.ratio_bins < 0:
            raise ValueError(f"objective.ratio_bins must be >= 0 (0: off), got {self.ratio_bins}")
        if self.ratio_bins and self.divergence == "reverse_kl":
            raise ValueError("objective.ratio_bins has no effect with divergence reverse_kl (h = 1); remove it")
        if not 0 <= self.norm_decay < 1:
            raise ValueError(f"objective.norm_decay must be in [0, 1), got {self.norm_decay}")
        check_time_range(self.tmin, self.tmax)
        if self.regression_weight < 0:
            raise ValueError(f"objective.regression_weight must be >= 0, got {self.regression_weight}")
        for key in ("regression_pairs", "regression_steps", "regression_share"):
            if getattr(self, key) is not None and self.regression_weight == 0:
                raise ValueError(f"objective.{key} has no effect with regression_weight 0; remove it or set regression_weight > 0")
        for key in ("regression_pairs", "regression_steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"objective.{key} must be >= 1, got {value}")
        if self.regression_share is not None and not 0 < self.regression_share <= 1:
            raise ValueError(f"objective.regression_share must be in (0, 1], got {self.regression_share}")
        check_head_options(self.head_lr_scale, self.disc_head, self.uses_discriminator, "a divergence other than reverse_kl or gan_weight > 0",
                           self.disc_features)

    @property
    def uses_discriminator(self) -> bool:
        return self.divergence != "reverse_kl" or self.gan_weight > 0


class FDistill(Objective):
    """One-step student trained along the f-divergence gradient of distribution matching.

    Networks: ``teacher`` (frozen), ``fake_score`` (critic: a copy of the teacher fit to the
    student's samples; with a discriminator head on its features when the weighting needs the
    density ratio r or a GAN term is on, then trained on real data too), ``generator`` (the student).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = FDistillConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "fake_score": "critic", "generator": "student"}

    def __init__(self, config: FDistillConfig, teacher: Denoiser):
        self.config = config
        self.sigma_data = float(teacher.sigma_data)
        c = config
        #: the generator phase's noise levels and the fake score's, also the discriminator's
        self.query_noise, self.fake_noise = query_and_fake_noise(c, teacher)
        self.needs_real_data = config.uses_discriminator
        self.h_at_one = float(WEIGHTINGS[c.divergence](torch.ones(1, dtype=torch.float64)))
        self._sums: dict[str, Tensor] = {}
        self._pairs: TeacherPairs | None = None  # the regression pairs, made in prepare() (or at the first generator loss)

    @classmethod
    def build(cls, config: FDistillConfig, teacher: nn.Module) -> "FDistill":
        return cls(config, teacher)

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """The one- or few-step generator of :meth:`Objective.make_student`; DMD's regression loss needs the
        deterministic one-step generator (its pairs map noise to one sample)."""
        if student.sigmas is not None and self.config.regression_weight > 0:
            raise ConfigError("objective.regression_weight: DMD's regression pairs need a one-step generator, and student.sigmas "
                              "makes a few-step one (re-noised between steps); remove one of the keys")
        return super().make_student(teacher, student)

    def make_critic(self, name: str, teacher: Denoiser) -> nn.Module:
        """The fake score: a trainable copy of the teacher, with a discriminator head if used."""
        score = trainable_copy(teacher)
        return ScoreWithHead(score, self.config.ratio_bins, self.h_at_one, head_lr_scale=self.config.head_lr_scale,
                             head=self.config.disc_head, features=self.config.disc_features) if self.config.uses_discriminator else score

    def phases(self) -> list[Phase]:
        return [Phase("fake_score", "fake_score", repeats=self.config.critic_ratio), Phase("generator", "generator")]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if phase.name == "fake_score":
            return self.critic_loss(nets, batch)
        return self.generator_loss(nets, batch)

    def critic_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The fake score's denoising loss on generated images (DMD2 Alg. 1, critic update), plus the
        discriminator loss of its head, softplus(l(fake_t)) + softplus(-l(real_t)), when it has one."""
        c = self.config
        return critic_loss(nets, batch, fake_noise=self.fake_noise, disc_noise=self.query_noise if c.uses_discriminator else None,
                           sigma_data=self.sigma_data, disc_weight=c.disc_weight, detach_features=not c.disc_trains_fake_score)

    def weights(self, logit: Tensor, sigma: Tensor, nets: Mapping[str, nn.Module]) -> Tensor:
        """h(r) ``[B]``, r = exp(clamp(logit)) (with ``ratio_bins``: divided by the running mean of r in
        its noise bin), clipped to [ratio_min, ratio_max]; with ``normalize_h``, h divided by its running
        mean. The running means are those of earlier steps; this step's values are accumulated."""
        c, head = self.config, nets["fake_score"]
        r = logit.double().clamp(-c.logit_clip, c.logit_clip).exp()
        if c.ratio_bins:
            b = noise_bin(sigma, c.ratio_bins, self.query_noise.lo, self.query_noise.hi)
            self._accumulate("r_bin", torch.zeros(2, c.ratio_bins, dtype=torch.float64, device=r.device)
                             .index_put_((torch.zeros_like(b), b), r, accumulate=True)
                             .index_put_((torch.ones_like(b), b), torch.ones_like(r), accumulate=True))
            r = r / head.r_bin_mean.to(r.device)[b]
        h = WEIGHTINGS[c.divergence](r.clamp(c.ratio_min, c.ratio_max))  # after the normalisation: h stays within its clip
        if c.normalize_h:
            self._accumulate("h", torch.stack([h.sum(), torch.tensor(float(h.numel()), dtype=h.dtype, device=h.device)]))
            h = h / head.h_mean.to(h.device)
        return h.to(logit.dtype)

    def _accumulate(self, key: str, sums: Tensor) -> None:
        sums = sums.detach()
        if bool(torch.isfinite(sums).all()):
            self._sums[key] = sums if key not in self._sums else self._sums[key] + sums

    def update_targets(self, nets: Mapping[str, nn.Module]) -> None:
        """Move the running means of h and r by this step's global-batch means (all processes, all micro-batches)."""
        sums, self._sums = self._sums, {}
        head, d = nets["fake_score"], self.config.norm_decay
        with torch.no_grad():
            if "h" in sums:
                s, n = global_sum(sums["h"]).tolist()
                if n > 0:
                    head.h_mean.mul_(d).add_((1 - d) * s / n)
            if "r_bin" in sums:
                s, n = global_sum(sums["r_bin"]).to(head.r_bin_mean.device)
                seen = n > 0
                head.r_bin_mean[seen] = d * head.r_bin_mean[seen] + (1 - d) * s[seen] / n[seen]

    def generator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """0.5 ||x_g - sg(x_g - g)||^2, g = h(r) (x0_fake - x0_real) / mean|x_g - x0_real| (f-distill eq. 9),
        plus ``gan_weight`` softplus(-l(x_t)) (DMD2 eq. 6), l the fake score's head at the same x_t, plus
        ``regression_weight`` ||G(z) - y(z)||^2 on teacher pairs (DMD sec. 3.3)."""
        c = self.config
        if c.regression_weight > 0:  # one generator call for both batches (one forward per backward under DDP)
            z, cond, y = self.pairs(nets["teacher"], batch.noise.device).draw(self.pairs_per_batch(batch.noise.shape[0]))
            x_all = nets["generator"](torch.cat([batch.noise, z]), **concat_cond(batch.cond, cond))
            x_g, x_pairs = x_all.split([batch.noise.shape[0], z.shape[0]])
        else:
            x_g = nets["generator"](batch.noise, **batch.cond)
        sigma = self.query_noise.draw(x_g.shape[0], x_g)
        x_t = x_g + append_dims(sigma, x_g.ndim) * torch.randn_like(x_g)
        logs: dict[str, Tensor] = {}
        logit = None
        with torch.set_grad_enabled(c.gan_weight > 0):
            if c.uses_discriminator:
                x0_fake, logit = nets["fake_score"](x_t, sigma, with_logit=True, **batch.cond)
            else:
                x0_fake = nets["fake_score"](x_t, sigma, **batch.cond)
        with torch.no_grad():
            x0_real = nets["teacher"](x_t, sigma, **batch.cond)
            h = torch.ones_like(sigma)
            if c.divergence != "reverse_kl":
                h = self.weights(logit.detach(), sigma, nets)
                logs["h_max"] = h.max()
            w = h
            if c.generator_weighting == "mean_abs":
                w = h / (mean_chw((x_g - x0_real).abs()) + 1e-6)
            grad = (x0_fake.detach() - x0_real) * append_dims(w, x_g.ndim)
        loss = 0.5 * ((x_g - (x_g - grad).detach()) ** 2).mean()
        logs["dm_loss"] = loss.detach()
        if c.gan_weight > 0:
            gan = gan_generator_loss(logit)
            loss = loss + c.gan_weight * gan
            logs["gan_loss"] = gan.detach()
        if c.regression_weight > 0:  # DMD's regression loss (Yin et al. 2024, sec. 3.3): mean ||G(z) - y(z)||^2
            reg = ((x_pairs - y) ** 2).mean()
            loss = loss + c.regression_weight * reg
            logs["reg_loss"] = reg.detach()
        logs["loss"] = loss.detach()
        return loss, logs

    def prepare(self, nets: Mapping[str, nn.Module], device: torch.device, micro_batch: int) -> None:
        """With ``regression_weight`` > 0: the regression pairs, before the first update (after checking
        that ``regression_share`` gives whole pairs per micro-batch)."""
        if self.config.regression_weight > 0:
            self.pairs_per_batch(micro_batch)
            self.pairs(nets["teacher"], device)

    def pairs_per_batch(self, batch: int) -> int:
        """Regression pairs drawn with a (micro-)batch of ``batch`` generated images: ``regression_share * batch``."""
        share = self.config.regression_share or 1.0
        n = share * batch
        if n < 1 or abs(n - round(n)) > 1e-6:
            raise ConfigError(f"objective.regression_share={share} gives {n:g} pairs per micro-batch of {batch} "
                              "(train.batch_size / processes / grad_accum); choose a share that gives a whole number >= 1")
        return round(n)

    def pairs(self, teacher: Denoiser, device: torch.device) -> TeacherPairs:
        """The regression pairs (noise z, the teacher's deterministic sample y(z)), made at the first call."""
        if self._pairs is None:
            c = self.config
            self._pairs = teacher_pairs(teacher, c.regression_pairs or 1024, c.regression_steps or 50, device)
        return self._pairs
