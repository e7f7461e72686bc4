"""sCM: continuous-time consistency distillation in TrigFlow (Lu & Song, ICLR 2025); docs/math.md section 3.10.

TrigFlow writes a noisy sample as ``x_t = cos(t) x0 + sin(t) z``, ``z ~ N(0, sigma_d^2 I)``,
``t in [0, pi/2]``: in EDM's sigma space that is ``sigma = sigma_d tan(t)`` and ``x_t = cos(t) x_sigma``.
Any denoiser D is a TrigFlow consistency function ``f(x_t, t) = D(x_t / cos t, sigma_d tan t)``
(exactly ``x_t`` at ``t = 0``), and its network output in TrigFlow's parameterisation is
``F = (cos(t) x_t - f) / (sigma_d sin t)`` (Lu & Song 2025, eq. 6 solved for F). So every
teacher converts to TrigFlow without retraining (a flow teacher through sigma = t_flow / (1 - t_flow)).

With ``adv_weight > 0`` the student's loss adds LADD's adversarial term (Sauer et al. 2024), as
SANA-Sprint does (Chen et al. 2025, sec. 3.3): a discriminator made of a frozen copy of the teacher
and a trained head on its features judges the student's predictions against real data, both noised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, ObjectiveConfig, StudentConfig
from ..students import LoRAFakeScore, Student, student_copy, trainable_copy
from ..teachers.base import Denoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase, check_student_keys
from .critic import ScoreWithHead, disc_accuracy, hinge_discriminator_loss, hinge_generator_loss, noised
from .noise import LogNormal, noise_range, scaled_input


@dataclass
class SCMConfig(ObjectiveConfig):
    """Hyperparameters of :class:`SCM` (defaults: Lu & Song 2025, sec. 5 and App. G, distillation).

    Attributes:
        sample_steps: 1 (from pure noise) or 2 (then re-noised to ``mid_time``).
        mid_time: the TrigFlow time of the second step of 2-step sampling (1.1 in the paper).
        p_mean, p_std: training times ``t = arctan(e^tau / sigma_d)``, ``tau ~ N(p_mean, p_std^2)``, i.e.
            EDM's log-normal ``sigma = e^tau`` (sCD: -0.8, 1.6), clipped to the teacher's range or
            ``[sigma_min, sigma_max]``.
        sigma_min, sigma_max: the training range (default: EDM's [0.002, 80] within the teacher's).
        tangent_warmup: updates over which the tangent's second term is ramped in (r = step / warmup;
            Lu & Song: 10,000; SANA-Sprint: 4,000); 0 turns the warm-up off.
        tangent_norm_const: c of the tangent normalisation ``g / (||g|| + c)`` (0.1).
        adaptive_weighting: learn the loss weight ``exp(-u(t))`` with ``+ u(t)`` (Lu & Song 2025,
            eq. 9; EDM2's uncertainty weighting), ``u`` a small network trained with the student.
        adv_weight: weight of LADD's adversarial term in the student's loss (SANA-Sprint: 0.5; 0: sCM
            alone). A discriminator (a frozen copy of the teacher with a trained head on its
            features) then learns in a second phase of every step, with the hinge loss.
        adv_top_prob: share of the adversarial term's student predictions made from the student's first
            noise level (pure noise for flow teachers: its one-step samples); the others denoise real
            data noised at training levels (SANA-Sprint: 0.5).
        disc_p_mean, disc_p_std: the discriminator's noise levels, log-normal sigma as ``p_mean``/``p_std``
            (SANA-Sprint: -0.6, 1.0).
        disc_ratio: discriminator updates per student update (SANA-Sprint: 1).
    """

    name: ClassVar[str] = "scm"

    sample_steps: int = 1
    mid_time: float = 1.1
    p_mean: float = -0.8
    p_std: float = 1.6
    sigma_min: float | None = None
    sigma_max: float | None = None
    tangent_warmup: int = 10000
    tangent_norm_const: float = 0.1
    adaptive_weighting: bool = True
    adv_weight: float = 0.0
    adv_top_prob: float = 0.5
    disc_p_mean: float = -0.6
    disc_p_std: float = 1.0
    disc_ratio: int = 1

    def __post_init__(self):
        if self.sample_steps not in (1, 2):
            raise ValueError(f"objective.sample_steps must be 1 or 2, got {self.sample_steps}")
        if not 0 < self.mid_time < math.pi / 2:
            raise ValueError(f"objective.mid_time must be in (0, pi/2), got {self.mid_time}")
        if self.tangent_warmup < 0:
            raise ValueError(f"objective.tangent_warmup must be >= 0, got {self.tangent_warmup}")
        if not self.tangent_norm_const > 0:
            raise ValueError(f"objective.tangent_norm_const must be > 0, got {self.tangent_norm_const}")
        if not self.p_std > 0:
            raise ValueError(f"objective.p_std must be > 0, got {self.p_std}")
        if self.adv_weight < 0:
            raise ValueError(f"objective.adv_weight must be >= 0, got {self.adv_weight}")
        if not 0 <= self.adv_top_prob <= 1:
            raise ValueError(f"objective.adv_top_prob must be in [0, 1], got {self.adv_top_prob}")
        if not self.disc_p_std > 0:
            raise ValueError(f"objective.disc_p_std must be > 0, got {self.disc_p_std}")
        if self.disc_ratio < 1:
            raise ValueError(f"objective.disc_ratio must be >= 1, got {self.disc_ratio}")


class AdaptiveWeight(nn.Module):
    """``u(sigma)``: a linear layer on fixed Fourier features of ``log(sigma) / 4``, started at 0
    (EDM2's uncertainty weighting, Karras et al. 2024, sec. 3; sCM's ``w_phi(t)``)."""

    def __init__(self, features: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(features, generator=g) * 2 * math.pi)
        self.register_buffer("phases", torch.rand(features, generator=g) * 2 * math.pi)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: Tensor) -> Tensor:
        """``[B]`` log-variances for ``[B]`` noise levels."""
        c = (sigma.log() / 4)[:, None]
        return self.linear(torch.cos(c * self.freqs.to(c) + self.phases.to(c)) * math.sqrt(2)).squeeze(1)


class SCMStudent(Student):
    """A consistency student that carries sCM's adaptive loss weight (trained with it, not exported:
    the exported student is its denoiser and noise levels)."""

    def __init__(self, denoiser: Denoiser, sigmas, sampler: str, weighting: AdaptiveWeight | None):
        super().__init__(denoiser, sigmas, sampler)
        self.weighting = weighting

    def trainable_parameters(self) -> list[nn.Parameter]:
        own = list(self.weighting.parameters()) if self.weighting is not None else []
        return super().trainable_parameters() + own

    def forward(self, z: Tensor, generator: torch.Generator | None = None, *, sigma: Tensor | float | None = None,
                log_weight: bool = False, **cond: Any):
        """As :meth:`Student.forward`; with ``sigma`` and ``log_weight``, ``(D(z, sigma), u(sigma))``."""
        out = super().forward(z, generator, sigma=sigma, **cond)
        if not log_weight:
            return out
        u = self.weighting(Denoiser.expand_sigma(sigma, z)) if self.weighting is not None else torch.zeros(z.shape[0], device=z.device)
        return out, u


def trigflow_F(den: Callable[..., Tensor], x_t: Tensor, t: Tensor, sigma_data: float, cond: Mapping[str, Any]) -> Tensor:
    """TrigFlow's network output of denoiser ``den``: ``F = (cos t x_t - D(x_t / cos t, sigma_d tan t)) / (sigma_d sin t)``."""
    c, s = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
    return (c * x_t - den(x_t / c, sigma_data * t.tan(), **cond)) / (sigma_data * s)


class SCM(Objective):
    """Continuous-time consistency distillation (sCD; Lu & Song 2025, Alg. 1 with eqs. 8-9).

    For real ``x0`` at time ``t``, ``x_t = cos t x0 + sin t z``; the teacher's probability-flow velocity is
    ``dx_t/dt = sigma_d F_teacher(x_t, t)``. With ``F^-`` the student's output without gradient and
    ``dF^-/dt`` its total derivative along that flow (a JVP with tangents ``cos t sin t (dx_t/dt, 1)``), the
    tangent is ``g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d cos t sin t dF^-/dt)``,
    normalised ``g / (||g|| + c)``, and the loss ``exp(-u) mean_d ||F_theta - F^- - g||^2 + u``.
    ``r`` ramps from 0 to 1 over ``tangent_warmup`` updates (tangent warm-up).

    With ``adv_weight`` > 0 (LADD), the student's loss adds ``adv_weight * -mean l(x_hat_s)``, ``x_hat``
    the student's prediction (from its first noise level with probability ``adv_top_prob``, else from real
    data noised at a training level) noised again at ``s`` from the discriminator's levels, and a second
    phase trains the discriminator's head ``l`` with the hinge loss on such predictions and noised real data.

    Networks: ``teacher`` (frozen, guided where configured), ``student``, and with LADD ``discriminator``
    (a critic). Needs real data.
    """

    config_class: ClassVar[type[ObjectiveConfig]] = SCMConfig
    networks: Mapping[str, str] = {"teacher": "frozen", "student": "student"}  # per instance: + discriminator with LADD
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: SCMConfig, sigma_data: float, levels: LogNormal, top_sigma: float,
                 disc_levels: LogNormal | None = None):
        self.config = config
        self.sigma_data = float(sigma_data)
        self.levels = levels
        #: the student's first noise level: the teacher's largest (inf for flow teachers: pure noise, t = pi/2)
        self.top_sigma = float(top_sigma)
        #: the discriminator's noise levels (LADD; ``None`` without it)
        self.disc_levels = disc_levels if config.adv_weight > 0 else None
        if config.adv_weight > 0:
            if disc_levels is None:
                raise ValueError("objective.adv_weight > 0 needs the discriminator's noise levels")
            self.networks = {**SCM.networks, "discriminator": "critic"}

    @classmethod
    def build(cls, config: SCMConfig, teacher: nn.Module) -> "SCM":
        lo, hi = noise_range(teacher, config.sigma_min, config.sigma_max)
        disc = LogNormal(lo, hi, config.disc_p_mean, config.disc_p_std)
        return cls(config, teacher.sigma_data, LogNormal(lo, hi, config.p_mean, config.p_std), teacher.sigma_max, disc)

    @property
    def adversarial(self) -> bool:
        return self.disc_levels is not None

    @property
    def student_sigmas(self) -> list[float]:
        levels = [self.top_sigma]
        if self.config.sample_steps == 2:
            levels.append(self.sigma_data * math.tan(self.config.mid_time))
        return levels

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """The consistency function is the copy's own denoiser (no boundary wrapper: ``D(x, 0) = x``),
        sampled at the teacher's largest level and, for 2 steps, re-noised to ``mid_time``."""
        check_student_keys(student, self.name, uses=("parameterization", "lora_rank", "lora_alpha"))
        weighting = AdaptiveWeight() if self.config.adaptive_weighting else None
        sampler = "ddim" if self.config.sample_steps == 1 else "multistep"  # one step: no re-noising either way
        return SCMStudent(student_copy(teacher, student), self.student_sigmas, sampler, weighting)

    def make_critic(self, name: str, teacher: Denoiser) -> nn.Module:
        """LADD's discriminator: a frozen copy of the (unguided) teacher, a trained head on its features."""
        if isinstance(teacher, LoRAFakeScore):
            raise ConfigError("critic.lora_rank: sCM's discriminator trains only a head on a frozen copy of the teacher "
                              "(no adapter); remove the critic section")
        return ScoreWithHead(trainable_copy(teacher), train_backbone=False)

    def phases(self) -> list[Phase]:
        disc = [Phase("discriminator", "discriminator", repeats=self.config.disc_ratio)] if self.adversarial else []
        return [Phase("scm", "student")] + disc

    def warmup(self, step: int) -> float:
        """``r`` of the tangent warm-up after ``step`` updates."""
        w = self.config.tangent_warmup
        return 1.0 if w == 0 else min(1.0, step / w)

    def teacher_velocity(self, teacher: nn.Module, x_t: Tensor, t: Tensor, cond: Mapping[str, Any]) -> Tensor:
        """``dx_t/dt = sigma_d F_teacher(x_t, t)`` of the (guided) teacher's probability-flow ODE."""
        return self.sigma_data * trigflow_F(teacher, x_t, t, self.sigma_data, cond)

    def tangent(self, den: nn.Module, x_t: Tensor, t: Tensor, dxt_dt: Tensor, cond: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """``(F^-, cos t sin t dF^-/dt)``: the student's TrigFlow output and its scaled total derivative
        along ``dx_t/dt``, one forward-mode pass (``torch.func.jvp``; attention through PyTorch's math
        kernel, the one with forward-mode derivatives)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cs = t.cos() * t.sin()
        fn = lambda x, tt: trigflow_F(den, x, tt, self.sigma_data, cond)  # noqa: E731
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(fn, (x_t, t), (append_dims(cs, x_t.ndim) * dxt_dt, cs))

    def tangent_target(self, F_minus: Tensor, dF: Tensor, x_t: Tensor, t: Tensor, dxt_dt: Tensor, r: float) -> Tensor:
        """The normalised tangent ``g / (||g|| + c)`` (Lu & Song 2025, eq. 8 and sec. 4.2)."""
        c, s = append_dims(t.cos(), x_t.ndim), append_dims(t.sin(), x_t.ndim)
        sd = self.sigma_data
        g = -c**2 * (sd * F_minus - dxt_dt) - r * (c * s * x_t + sd * dF)
        norm = g.flatten(1).norm(dim=1)
        return g / append_dims(norm + self.config.tangent_norm_const, g.ndim)

    def student_prediction(self, student: nn.Module, x0: Tensor, cond: Mapping[str, Any]) -> Tensor:
        """LADD's fake samples: the student's ``D(x0 + sigma n, sigma)`` ``[B, *shape]`` at training levels, each
        replaced by the first level (pure noise for flow teachers) with probability ``adv_top_prob``."""
        sigma = self.levels.draw(x0.shape[0], x0)
        top = torch.rand(x0.shape[0], device=x0.device) < self.config.adv_top_prob
        sigma = torch.where(top, torch.full_like(sigma, self.top_sigma), sigma)
        den = getattr(student, "module", student).denoiser
        return student(scaled_input(den, x0, torch.randn_like(x0), sigma), sigma=sigma, scaled=True, **cond)

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        if phase.name == "discriminator":
            return self.discriminator_loss(nets, batch)
        loss, logs = self.consistency_loss(nets, batch)
        if self.adversarial:
            x_fake = self.student_prediction(nets["student"], batch.real, batch.cond)
            s = self.disc_levels.draw(x_fake.shape[0], x_fake)
            _, logit = nets["discriminator"](noised(x_fake, s), s, with_logit=True, **batch.cond)
            adv = hinge_generator_loss(logit)
            loss = loss + self.config.adv_weight * adv
            logs = {**logs, "loss": loss.detach(), "adv_loss": adv.detach()}
        return loss, logs

    def discriminator_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """LADD's discriminator update: the hinge loss on the student's predictions and on real data, both
        noised at the same levels from the discriminator's distribution (no gradient to the student)."""
        x0, cond = batch.real, batch.cond
        with torch.no_grad():
            x_fake = self.student_prediction(nets["student"], x0, cond)
        s = self.disc_levels.draw(x0.shape[0], x0)
        disc = nets["discriminator"]
        _, logit_fake = disc(noised(x_fake, s), s, with_logit=True, **cond)
        _, logit_real = disc(noised(x0, s), s, with_logit=True, **cond)
        loss = hinge_discriminator_loss(logit_real, logit_fake)
        accuracy = disc_accuracy(logit_real, logit_fake)
        gap = logit_real.mean() - logit_fake.mean()  # what the hinge loss separates (it ignores a common shift)
        return loss, {"loss": loss.detach(), "disc_accuracy": accuracy.detach(), "logit_gap": gap.detach()}

    def consistency_loss(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """The sCD loss of the docstring above (Lu & Song 2025, Alg. 1)."""
        x0, cond = batch.real, dict(batch.cond)
        sigma = self.levels.draw(x0.shape[0], x0)
        t = torch.atan(sigma / self.sigma_data)
        c, s = append_dims(t.cos(), x0.ndim), append_dims(t.sin(), x0.ndim)
        x_sigma = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        x_t = c * x_sigma
        student = nets["student"]
        den = getattr(student, "module", student).denoiser
        with torch.no_grad():
            dxt_dt = self.teacher_velocity(nets["teacher"], x_t, t, cond)
        F_minus, dF = self.tangent(den, x_t, t, dxt_dt, cond)
        g = self.tangent_target(F_minus, dF, x_t, t, dxt_dt, self.warmup(batch.step))
        d, u = student(x_t / c, sigma=sigma, log_weight=True, **cond)  # D_theta at (x_t / cos t, sigma_d tan t)
        F = (c * x_t - d) / (self.sigma_data * s)
        err = mean_chw((F - F_minus - g) ** 2)
        loss = (torch.exp(-u) * err + u).mean()
        return loss, {"loss": loss.detach(), "unweighted": err.mean().detach()}
