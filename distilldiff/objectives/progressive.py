"""Progressive distillation (Salimans & Ho, ICLR 2022); docs/math.md.

One :class:`ProgressiveDistillation` object is one stage (a 2K-step teacher -> a K-step
student, ``train.max_steps`` updates); :meth:`ProgressiveDistillation.stages` lists the stages
from ``start_steps`` down to ``end_steps``, and the runner (:func:`distilldiff.distill.distill`)
makes each stage's student the next stage's teacher.
"""

from __future__ import annotations


from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import ObjectiveConfig, StudentConfig
from ..samplers import teacher_grid
from ..students import Student, student_copy
from ..teachers.base import Denoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase, Stage, check_student_keys
from .guidance_weights import check_w_range, draw_w, resolved_default_w, w_cond
from .noise import prior_ratio, scaled_input


@dataclass
class ProgressiveConfig(ObjectiveConfig):
    """Hyperparameters of progressive distillation.

    Attributes:
        start_steps: N, the teacher's number of DDIM steps at the first stage (a power-of-two
            multiple of ``end_steps``); the first student takes N/2.
        end_steps: the last stage's student steps.
        w_min, w_max: for a guidance-conditioned teacher (guidance distillation's stage 2), the
            range of the guidance weight w drawn per sample and passed to teacher and student;
            ``default_w`` (default: the middle of the range) is the exported pipeline's default.
        sigma_min, sigma_max, rho: the Karras grid of N noise levels for non-VP teachers
            (VP/diffusers teachers use DDIM's "trailing" timesteps, which nest from stage to stage).
    """

    name: ClassVar[str] = "progressive"

    start_steps: int = 8
    end_steps: int = 1
    w_min: float | None = None
    w_max: float | None = None
    default_w: float | None = None
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self):
        n, e = self.start_steps, self.end_steps
        if e < 1 or n <= e or n % e or (n // e) & (n // e - 1):
            raise ValueError(f"objective.start_steps must be end_steps times a power of two > 1, got {n} and {e}")
        check_w_range(self.w_min, self.w_max)


def full_grid(config: ProgressiveConfig, teacher: Denoiser) -> list[float]:
    """The first teacher's N decreasing noise levels; every later grid takes every 2^k-th of them
    (a flow teacher's starts at ``inf``, pure noise)."""
    return teacher_grid(teacher, config.start_steps, config.sigma_min, config.sigma_max, config.rho)


def stage_plan(config: ProgressiveConfig) -> list[int]:
    """Student step counts of the stages: N/2, N/4, ..., end_steps."""
    steps, k = [], config.start_steps // 2
    while k >= config.end_steps:
        steps.append(k)
        k //= 2
    return steps


class ProgressiveDistillation(Objective):
    """One stage: the student learns, in one DDIM step, two DDIM steps of the (frozen) teacher.

    Needs real data (the steps start from noised data). Networks: ``teacher`` (frozen: the
    original teacher or the previous stage's student) and ``student``.

    Args:
        config: the run's hyperparameters.
        teacher_sigmas: the teacher's 2K decreasing noise levels at this stage; the student
            uses every other one.
        full_grid: the first teacher's N noise levels, from which :meth:`stages` derives every
            stage (default: ``teacher_sigmas``, i.e. this is the first stage).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ProgressiveConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "student": "student"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: ProgressiveConfig, teacher_sigmas: list[float], full_grid: list[float] | None = None):
        if len(teacher_sigmas) < 2 or len(teacher_sigmas) % 2:
            raise ValueError(f"a stage needs an even number (>= 2) of teacher noise levels, got {len(teacher_sigmas)}")
        self.config = config
        self.teacher_sigmas = torch.tensor(teacher_sigmas, dtype=torch.float64)
        self.full_grid = list(teacher_sigmas) if full_grid is None else list(full_grid)

    @classmethod
    def build(cls, config: ProgressiveConfig, teacher: nn.Module) -> "ProgressiveDistillation":
        """The first stage (N-step teacher)."""
        return cls(config, full_grid(config, teacher))

    def stages(self) -> list[Stage]:
        """One stage per halving, in ``stage-KKKK`` (K = the stage's student steps): the student of
        stage K learns two DDIM steps of a 2K-step teacher on every (N / 2K)-th level of the full grid."""
        n = self.config.start_steps
        return [Stage(f"stage-{k:04d}", ProgressiveDistillation(self.config, self.full_grid[:: n // (2 * k)], self.full_grid))
                for k in stage_plan(self.config)]

    @property
    def student_sigmas(self) -> list[float]:
        return [float(s) for s in self.teacher_sigmas[::2]]

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """A K-step DDIM student whose denoiser starts as a copy of this stage's teacher, its
        network output re-interpreted as ``student.parameterization`` (Salimans & Ho 2022, sec. 4,
        train x- or v-predicting students). A later stage's teacher is the previous stage's
        student, which already carries that parameterization."""
        check_student_keys(student, self.name, uses=("parameterization", "lora_rank", "lora_alpha"))
        return Student(student_copy(teacher, student), self.student_sigmas, "ddim")

    def phases(self) -> list[Phase]:
        return [Phase("student", "student")]

    @property
    def default_w(self) -> float | None:
        return resolved_default_w(self.config.w_min, self.config.w_max, self.config.default_w)

    def student_info(self) -> dict:
        return {} if self.default_w is None else {"default_guidance_scale": self.default_w}

    def sample_cond(self, n: int, device) -> dict[str, Tensor]:
        return w_cond(self.default_w, n, device)

    def target(self, teacher: nn.Module, u: Tensor, s_a: Tensor, s_m: Tensor, s_b: Tensor, cond: dict) -> Tensor:
        """x_target = (z'' - (s_b/s_a) z) / (1 - s_b/s_a), z'' after two teacher DDIM steps s_a -> s_m -> s_b.

        ``u = z / prior_scale(s_a)`` is the noisy sample in units of the pure-noise scale, so that ``s_a``
        may be ``inf`` (a flow teacher's t = 1, where ``u`` is the noise): with ``z / s_a = u q``,
        ``q = prior_scale(s_a) / s_a`` (1 at ``inf``), the first step's ``(z - x1) / s_a`` is ``u q - x1 / s_a``."""
        a, m, b = (append_dims(s, u.ndim) for s in (s_a, s_m, s_b))
        q = append_dims(prior_ratio(teacher, s_a), u.ndim)
        x1 = teacher.forward_scaled(u, s_a, **cond)
        z1 = x1 + m * (u * q - x1 / a)  # DDIM in sigma space: x_b = x0 + (sigma_b / sigma_a)(x_a - x0)
        x2 = teacher(z1, s_m, **cond)
        z2 = x2 + (b / m) * (z1 - x2)
        return (z2 - b * u * q) / (1 - b / a)

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """max(SNR, 1) ||x_hat(z, s_a) - x_target||^2, SNR = 1 / s_a^2 (truncated-SNR weighting)."""
        x0, cond = batch.real, dict(batch.cond)
        if self.config.w_min is not None:  # stage 2 of guidance distillation: keep w as an input
            w = draw_w(x0.shape[0], self.config.w_min, self.config.w_max, x0)
            cond["guidance_scale"] = w
        sig = torch.cat([self.teacher_sigmas, self.teacher_sigmas.new_zeros(1)]).to(device=x0.device, dtype=x0.dtype)
        i = 2 * torch.randint(0, len(self.teacher_sigmas) // 2, (x0.shape[0],), device=x0.device)
        s_a, s_m, s_b = sig[i], sig[i + 1], sig[i + 2]
        teacher, student = nets["teacher"], nets["student"]
        n = torch.randn_like(x0)  # z = x0 + s_a n, given to each network over its own prior scale
        with torch.no_grad():
            target = self.target(teacher, scaled_input(teacher, x0, n, s_a), s_a, s_m, s_b, cond)
        pred = student(scaled_input(getattr(student, "module", student).denoiser, x0, n, s_a), sigma=s_a, scaled=True, **cond)
        weight = (1 / s_a**2).clamp_min(1.0)
        loss = (weight * mean_chw((pred - target) ** 2)).mean()
        return loss, {"loss": loss.detach()}
