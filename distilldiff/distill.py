"""Distillation runs: build the networks an objective needs from the teacher and train them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError, DistillConfig, from_dict
from .engine import Engine, TrainTask
from .objectives import OBJECTIVES
from .students import OneStepGenerator
from .export import save_student
from .teachers import CFGDenoiser, Denoiser, load_teacher


def build_teacher(cfg: DistillConfig) -> Denoiser:
    """The frozen teacher of a run (classifier-free guided if ``teacher.guidance_scale`` > 0)."""
    t = cfg.teacher
    return load_teacher(t.path, t.guidance_scale, sigma_data=t.sigma_data, num_classes=t.num_classes, null_class=t.null_class)


def objective_config(cfg: DistillConfig):
    """``(objective class, its validated hyperparameters)`` for ``objective.name``."""
    raw = dict(cfg.objective)
    name = raw.pop("name", None)
    if name is None:
        raise ConfigError("missing required key 'objective.name'")
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective {name!r} (available: {', '.join(OBJECTIVES)})")
    cls, config_cls = OBJECTIVES[name]
    return cls, from_dict(config_cls, raw, "objective")


def build_data(cfg: DistillConfig, teacher: Denoiser):
    """Real-data batches for objectives that need them (``data: mnist5k``), checked against the teacher."""
    from .data import RandomBatches, mnist5k

    if cfg.data is None:
        raise ConfigError(f"objective '{cfg.objective['name']}' needs real data: set 'data: mnist5k'")
    images, labels = mnist5k()
    if tuple(images.shape[1:]) != tuple(teacher.sample_shape):
        raise ConfigError(f"data: {cfg.data} images have shape {tuple(images.shape[1:])}, the teacher's samples {tuple(teacher.sample_shape)}")
    return RandomBatches(images, labels if teacher.num_classes is not None else None)


def resolved_config(cfg: DistillConfig) -> dict:
    """The config as written to the run folder: every objective default filled in."""
    from .config import to_dict

    _, objective_cfg = objective_config(cfg)
    data = to_dict(cfg)
    data["objective"] = {"name": cfg.objective["name"], **to_dict(objective_cfg)}
    return data


def build_distill_task(cfg: DistillConfig) -> TrainTask:
    """Teacher, objective and student networks for :class:`~distilldiff.engine.Engine`.

    The objective builds its student (a one-step generator at ``student.init_sigma`` unless it
    says otherwise), critics and targets from the (unguided) teacher; objectives that need real
    data get batches of the ``data`` set.
    """
    objective_cls, objective_cfg = objective_config(cfg)  # validate before loading anything
    teacher = build_teacher(cfg)
    objective = objective_cls.build(objective_cfg, teacher)
    base = teacher.inner if isinstance(teacher, CFGDenoiser) else teacher
    student = objective.make_student(base, cfg.student.init_sigma)
    networks: dict[str, nn.Module] = {}
    for name, role in objective.networks.items():
        if role == "frozen":
            networks[name] = teacher
        elif role == "student":
            networks[name] = student
        elif role == "target":
            networks[name] = objective.make_target(student)
        else:
            networks[name] = objective.make_critic(name, base)
    data_fn = build_data(cfg, base) if objective.needs_real_data else None

    def grid_cond(n: int, device) -> dict[str, Tensor]:
        if base.num_classes is None:
            return {}
        return {"class_labels": torch.arange(n, device=device) % base.num_classes}

    return TrainTask(
        objective=objective,
        networks=networks,
        sample_shape=base.sample_shape,
        cond_fn=lambda n, device: base.sample_class_labels(n, device),
        grid_cond_fn=grid_cond,
        sample_fn=lambda gen, noise, cond: gen(noise, **cond),
        save_fn=save_student,
        data_fn=data_fn,
        info={"teacher": cfg.teacher.path, "teacher_guidance_scale": cfg.teacher.guidance_scale, "objective": objective.name},
    )


def distill(cfg: DistillConfig, resume: str | None = None, output_dir: str | Path | None = None) -> Path:
    """Run a distillation; returns the folder of the EMA student (``OUTPUT/student``).

    Example:
        >>> from distilldiff.config import DistillConfig, load_config
        >>> cfg = load_config(DistillConfig, "configs/mnist/sid.yaml", ["train.max_steps=10"])
        >>> student_dir = distill(cfg)  # doctest: +SKIP
    """
    engine = Engine(build_distill_task(cfg), cfg.train, Path(output_dir or cfg.output_dir))
    return engine.run(resolved_config(cfg), resume)
