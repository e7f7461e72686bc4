"""Guidance distillation, stage 1 (Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans; CVPR 2023); docs/math.md.

A student that takes the guidance scale ``w`` as an input learns the classifier-free-guided
teacher ``D_c + w (D_c - D_u)`` over ``w ~ U[w_min, w_max]`` in one network evaluation per step
(the guided teacher costs two). Stage 2 is progressive distillation of this student with ``w``
kept as an input (``objective.w_min``/``w_max`` of ``progressive``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from ..config import ObjectiveConfig, StudentConfig
from ..samplers import teacher_grid
from ..students import Student, guidance_conditioned_copy, set_parameterization
from ..teachers.base import Denoiser
from ..teachers.guidance import CFGDenoiser
from ..teachers.vp import VPDenoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase, check_student_keys, edm_sigma, edm_weight
from .guidance_weights import check_guidance_teacher, draw_w, w_cond


#: loss weightings on the squared x0 error (docs/math.md, section 3.6)
WEIGHTINGS = ("output", "snr", "snr_trunc", "edm")


def loss_weight(kind: str, sigma: Tensor, sigma_data: float, prediction_type: str | None = None) -> Tensor:
    """Per-sample weight ``lambda(sigma)`` on ``mean_d (D_student - D_target)^2``.

    ``kind`` (one of :data:`WEIGHTINGS`):

    * ``output``: the squared error of the network's own output, i.e. the loss the teacher was
      trained with: ``1 / sigma^2`` for ``prediction_type`` ``epsilon`` (DDPM's L_simple),
      ``(1 + sigma^2) / sigma^2`` for ``v_prediction``, 1 for ``sample``; EDM's weight for
      denoisers without a ``prediction_type`` (EDM-preconditioned networks, whose raw output it
      weighs by 1);
    * ``snr``: ``1 / sigma^2`` (SNR in sigma space);
    * ``snr_trunc``: ``max(1 / sigma^2, 1)`` (Salimans & Ho 2022, "truncated SNR");
    * ``edm``: ``(sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022).
    """
    if kind == "output":
        kind = {"epsilon": "snr", "v_prediction": "snr_plus_one", "sample": "one"}.get(prediction_type, "edm")
    if kind == "snr":
        return 1 / sigma**2
    if kind == "snr_plus_one":
        return (1 + sigma**2) / sigma**2
    if kind == "one":
        return torch.ones_like(sigma)
    if kind == "snr_trunc":
        return (1 / sigma**2).clamp_min(1.0)
    if kind == "edm":
        return edm_weight(sigma, sigma_data)
    raise ValueError(f"unknown weighting {kind!r}; expected one of {', '.join(WEIGHTINGS)}")


@dataclass
class GuidanceConfig(ObjectiveConfig):
    """Hyperparameters of :class:`GuidanceDistillation`.

    Attributes:
        w_min, w_max: range of the guidance weight w drawn per sample (w = 0: no guidance).
        default_w: the guidance weight the exported pipeline and the sample grids use.
        sample_steps: DDIM steps of the student (the teacher's "trailing" timesteps for VP
            teachers, else a Karras grid over ``[sigma_min, sigma_max]``).
        p_mean, p_std: log-normal training noise levels for non-VP teachers (VP teachers: uniform
            over their training timesteps, "the teacher's own noise levels").
        sigma_min, sigma_max, rho: the Karras sampling grid of non-VP teachers.
        guidance_embed_scale: w is multiplied by this before its sinusoidal embedding (pixel VP
            students; unset: 1, at which every feature is smooth over w in [0, 4]).
        guidance_embed_gain: the w embedding is multiplied by this (pixel VP students; unset: 30): its
            zero-started output layer then learns about this many times faster than the copied
            weights under Adam. ``gain * train.lr`` of about 1e-3 suits a fresh layer. Text-to-image
            students take w through diffusers' own embedding and refuse both keys.
        weighting: loss weight on the squared x0 error (:func:`loss_weight`): ``output`` (the
            network's own output error, the teacher's training loss: 1 / sigma^2 for epsilon
            networks), ``snr``, ``snr_trunc`` or ``edm``.
    """

    name: ClassVar[str] = "guidance"

    w_min: float = 0.0
    w_max: float = 4.0
    default_w: float = 2.0
    sample_steps: int = 16
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    guidance_embed_scale: float | None = None
    guidance_embed_gain: float | None = None
    weighting: str = "output"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting: {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not 0 <= self.w_min < self.w_max:
            raise ValueError(f"objective.w_min/w_max must satisfy 0 <= w_min < w_max, got {self.w_min}/{self.w_max}")
        if not self.w_min <= self.default_w <= self.w_max:
            raise ValueError(f"objective.default_w={self.default_w} is outside [w_min, w_max] = [{self.w_min}, {self.w_max}]")
        if self.sample_steps < 1:
            raise ValueError(f"objective.sample_steps must be >= 1, got {self.sample_steps}")
        if not (self.embed_scale > 0 and self.embed_gain > 0):
            raise ValueError(f"objective.guidance_embed_scale/_gain must be > 0, got {self.embed_scale}/{self.embed_gain}")

    #: the pixel students' embedding scale and gain where the config leaves them unset
    EMBED_DEFAULTS: ClassVar[tuple[float, float]] = (1.0, 30.0)

    @property
    def embed_scale(self) -> float:
        return self.EMBED_DEFAULTS[0] if self.guidance_embed_scale is None else self.guidance_embed_scale

    @property
    def embed_gain(self) -> float:
        return self.EMBED_DEFAULTS[1] if self.guidance_embed_gain is None else self.guidance_embed_gain


class GuidanceDistillation(Objective):
    """Stage 1: ``D_student(x, sigma, c, w) ~ D_teacher(x, sigma, c) + w (D_teacher(x, sigma, c) - D_teacher(x, sigma, null))``.

    Needs real data (noised digits at the teacher's noise levels) and a teacher with a null class.
    Networks: ``teacher`` (frozen, unguided) and ``student`` (w-conditioned copy of the teacher).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = GuidanceConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "student": "student"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: GuidanceConfig, teacher: Denoiser, sample_sigmas: list[float]):
        check_guidance_teacher(teacher, "guidance distillation")
        self.config = config
        self.sample_sigmas = sample_sigmas
        self.vp_sigmas = teacher.schedule.sigmas.clone() if isinstance(teacher, VPDenoiser) else None
        self.sigma_data = float(teacher.sigma_data)
        #: what the student network outputs (a copy of the teacher's): sets the ``output`` weighting
        self.prediction_type = getattr(teacher, "prediction_type", None)

    @classmethod
    def build(cls, config: GuidanceConfig, teacher: nn.Module) -> "GuidanceDistillation":
        return cls(config, teacher, teacher_grid(teacher, config.sample_steps, config.sigma_min, config.sigma_max, config.rho))

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """A ``sample_steps``-step DDIM student; VP teachers get a :class:`GuidedUNet2DModel` copy
        whose output is read as ``student.parameterization`` (unset: the teacher's); the ``output``
        weighting follows that choice."""
        check_student_keys(student, self.name, uses=("parameterization",))
        c = self.config
        den = guidance_conditioned_copy(teacher, c.guidance_embed_scale, c.guidance_embed_gain, c.EMBED_DEFAULTS)
        den = set_parameterization(den, student.parameterization)
        self.prediction_type = getattr(den, "prediction_type", None)
        return Student(den, self.sample_sigmas, "ddim")

    def student_info(self) -> dict:
        return {"default_guidance_scale": self.config.default_w}

    def sample_cond(self, n: int, device) -> dict[str, Tensor]:
        return w_cond(self.config.default_w, n, device)

    def phases(self) -> list[Phase]:
        return [Phase("student", "student")]

    def training_sigma(self, n: int, like: Tensor) -> Tensor:
        if self.vp_sigmas is not None:
            idx = torch.randint(0, len(self.vp_sigmas), (n,), device=like.device)
            return self.vp_sigmas.to(like.device)[idx].to(like.dtype)
        return edm_sigma(n, self.config.p_mean, self.config.p_std, like)

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """lambda(sigma) mean_d (D_student(x_t, sigma, c, w) - D_w(x_t, sigma, c))^2 (Meng et al. 2023, stage one;
        lambda from ``objective.weighting``)."""
        x0, c = batch.real, self.config
        n = x0.shape[0]
        w = draw_w(n, c.w_min, c.w_max, x0)
        sigma = self.training_sigma(n, x0)
        x_t = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
        with torch.no_grad():
            target = CFGDenoiser(nets["teacher"], w)(x_t, sigma, **batch.cond)
        pred = nets["student"](x_t, sigma=sigma, guidance_scale=w, **batch.cond)
        weight = loss_weight(c.weighting, sigma, self.sigma_data, self.prediction_type)
        loss = (weight * mean_chw((pred - target) ** 2)).mean()
        return loss, {"loss": loss.detach()}
