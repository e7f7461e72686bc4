"""What an objective is: the networks it needs, its training phases, one loss per phase, its stages.

Objectives never import the training engine, the runner or the samplers' callers; the engine
and the runner (:mod:`distilldiff.distill`) import them. An objective registers itself with
:func:`distilldiff.objectives.register`; nothing else has to change to add one.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, ObjectiveConfig, StudentConfig
from ..students import FewStepGenerator, OneStepGenerator, Student, init_noise_level, trainable_copy
from ..teachers.base import Denoiser
from ..tensors import append_dims, sum_chw


@dataclass(frozen=True)
class Phase:
    """One optimisation phase: ``trains`` is the only network whose parameters it updates.

    ``repeats`` is how many times the phase runs per training step (a critic:generator ratio
    of 5:1 is ``Phase("fake_score", "fake_score", repeats=5)`` before the generator phase).
    """

    name: str
    trains: str
    repeats: int = 1


@dataclass
class Batch:
    """Inputs of one phase step, drawn fresh by the engine for every call.

    Attributes:
        noise: ``[B, *sample_shape]`` standard normal noise for the generator.
        cond: conditioning keyword arguments for the networks (e.g. ``class_labels [B]``).
        real: ``[B, *sample_shape]`` real data, for objectives with ``needs_real_data``.
        step: the training updates finished before this one (restored on resume), for
            objectives whose loss follows a schedule (e.g. sCM's tangent warm-up).
    """

    noise: Tensor
    cond: dict[str, Any] = field(default_factory=dict)
    real: Tensor | None = None
    step: int = 0


@dataclass
class Stage:
    """One engine run of a distillation.

    Attributes:
        folder: sub-folder of the run folder it trains in (``""``: the run folder itself).
        objective: the objective of this stage.
    """

    folder: str
    objective: "Objective"


class Objective(abc.ABC):
    """Base class of all objectives.

    Class attributes:
        config_class: the objective's hyperparameters (an :class:`~distilldiff.config.ObjectiveConfig`
            subclass; its ``name`` is the objective's name in configs).
        name: registry name used in configs (``objective.name``); taken from ``config_class``.
        networks: role of every network the objective uses: ``"student"`` (the trained result,
            whose EMA is kept), ``"critic"`` (trained helper, e.g. a fake score), ``"frozen"``
            (the teacher) or ``"target"`` (a frozen copy of the student that the objective moves
            itself in :meth:`update_targets`, e.g. consistency distillation's EMA target). An objective
            whose config adds a network (sCM's LADD discriminator) sets its own ``networks`` in ``__init__``.
        needs_real_data: whether batches must carry real data.
    """

    config_class: ClassVar[type[ObjectiveConfig]]
    name: ClassVar[str]
    networks: Mapping[str, str]
    needs_real_data: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__ and "name" not in cls.__dict__:
            cls.name = cls.config_class.name

    @classmethod
    def build(cls, config: Any, teacher: Denoiser) -> "Objective":
        """Construct from the objective's config and the frozen teacher it trains against (which
        may be classifier-free guided: :class:`~distilldiff.teachers.CFGDenoiser`)."""
        return cls(config)

    @property
    def student(self) -> str:
        return next(k for k, role in self.networks.items() if role == "student")

    def stages(self) -> list[Stage]:
        """The engine runs of this distillation, in order; each stage's EMA student is the next
        stage's frozen teacher. Default: one run, in the run folder itself."""
        return [Stage("", self)]

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """The trained student, built from the (unguided) teacher and the ``student`` section.

        Default: a one-step generator at ``student.init_sigma`` whose denoiser is a copy of the
        teacher with its output read as ``student.parameterization`` (SiD, f-distill), or with
        ``student.sigmas`` a few-step generator at those levels, trained through all its steps.
        Objectives that build other students override this and reject the keys of ``student`` they
        do not use (:func:`check_student_keys`)."""
        if student.sigmas is not None:
            return FewStepGenerator.from_teacher(teacher, student)
        return OneStepGenerator.from_teacher(teacher, init_noise_level(teacher, student), student)

    def make_critic(self, name: str, teacher: Denoiser) -> nn.Module:
        """A ``"critic"`` network; default: a trainable copy of the teacher (a fake score).

        A critic may define ``trainable_parameters()``; otherwise all its parameters train."""
        return trainable_copy(teacher)

    def make_target(self, student: Student) -> nn.Module:
        """A ``"target"`` network (objectives that declare one must override this)."""
        raise NotImplementedError(f"objective '{self.name}' declares a target network but does not build it")

    def student_info(self) -> dict:
        """Extra fields written with the student (e.g. ``default_guidance_scale``)."""
        return {}

    def sample_cond(self, n: int, device) -> dict[str, Tensor]:
        """Extra student inputs for sample grids and evaluations (e.g. its guidance scale)."""
        return {}

    def prepare(self, nets: Mapping[str, nn.Module], device: torch.device, micro_batch: int) -> None:
        """Called once by the engine before the first training step of every run or resume, with all
        networks (unwrapped) on ``device`` and the per-process micro-batch size: objectives that
        precompute something from the teacher (DMD's regression pairs) do it here, and may reject
        options that do not fit the micro-batch. Its time is not training time. Default: nothing."""

    def update_targets(self, nets: Mapping[str, nn.Module]) -> None:
        """Called after every training step (all its phases and micro-batches, on every process) with
        all networks (unwrapped): moves ``"target"`` ones and any running statistics an objective keeps."""

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The phases of one training step, in order."""

    @abc.abstractmethod
    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss of ``phase`` and a dict of detached scalars to log."""


def check_student_keys(student: StudentConfig, objective: str, uses: Iterable[str] = ()) -> None:
    """One-line error for a key of the ``student`` section that ``objective`` would ignore."""
    for key in student.set_keys():
        if key not in uses:
            raise ConfigError(f"student.{key}: objective '{objective}' sets its own noise levels and does not use it; remove the key")


def drop_conditioning(conditioning, cond: dict[str, Any], prob: float, like: Tensor) -> dict[str, Any]:
    """``cond`` with each sample's conditioning replaced, with probability ``prob``, by the model's
    unconditional input (Ho & Salimans 2022, Alg. 1: so a model being trained also learns ``D_u`` for
    classifier-free guidance); unchanged at ``prob`` 0 or without conditioning. ``like``: ``[B, ...]``."""
    if not prob > 0 or not conditioning.split(cond)[0]:
        return cond
    drop = torch.rand(like.shape[0], device=like.device) < prob
    return conditioning.null_where(cond, drop)


def edm_sigma(batch: int, p_mean: float, p_std: float, like: Tensor) -> Tensor:
    """EDM training noise levels ``sigma = exp(N(P_mean, P_std^2))`` (Karras et al. 2022, sec. 5)."""
    return (torch.randn(batch, device=like.device, dtype=like.dtype) * p_std + p_mean).exp()


def edm_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022, eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(denoiser: nn.Module, x0: Tensor, sigma: Tensor, weight: Tensor, cond: Mapping[str, Any]) -> Tensor:
    """``mean_B weight * sum_CHW ||D(x0 + sigma n, sigma) - x0||^2`` (denoising score matching)."""
    noisy = x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)
    return (weight * sum_chw((denoiser(noisy, sigma, **cond) - x0) ** 2)).mean()
