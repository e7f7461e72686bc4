"""Distillation runs: build the networks an objective needs from the teacher and train them."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import ConfigError, DistillConfig, from_dict
from .engine import Engine, TrainTask
from .objectives import OBJECTIVES
from .export import STUDENT_INFO_FILE, load_student, save_student
from .teachers import CFGDenoiser, Denoiser, load_teacher


def build_teacher(cfg: DistillConfig) -> Denoiser:
    """The frozen teacher of a run (classifier-free guided if ``teacher.guidance_scale`` > 0).

    A distilldiff student folder (or a run folder with one) is a teacher too: its denoiser, e.g. a
    guidance-distilled student for progressive distillation with ``w`` kept as an input.
    """
    t = cfg.teacher
    folder = Path(t.path)
    if (folder / "student" / STUDENT_INFO_FILE).is_file():
        folder = folder / "student"
    if (folder / STUDENT_INFO_FILE).is_file():
        den = load_student(folder)[0].denoiser
        return CFGDenoiser(den, t.guidance_scale) if t.guidance_scale else den
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


def _draw(student: nn.Module, noise: Tensor, cond: dict, generator: torch.Generator | None = None) -> Tensor:
    """Images of ``student`` from ``noise`` (the sample grids' and evaluations' sampler);
    ``generator`` draws the re-noising of multistep students."""
    return student(noise, generator=generator, **cond)


def build_distill_task(cfg: DistillConfig, objective=None, teacher: Denoiser | None = None) -> TrainTask:
    """Teacher, objective and student networks for :class:`~distilldiff.engine.Engine`.

    The objective builds its student (a one-step generator at ``student.init_sigma`` unless it
    says otherwise), critics and targets from the (unguided) teacher; objectives that need real
    data get batches of the ``data`` set. ``objective`` and ``teacher`` replace the ones the
    config names (a stage of progressive distillation: the previous student as the teacher).
    """
    torch.manual_seed(cfg.train.seed)  # networks with fresh layers (guidance embedding, discriminator) start from the seed
    if objective is None or teacher is None:
        objective_cls, objective_cfg = objective_config(cfg)  # validate before loading anything
        teacher = teacher if teacher is not None else build_teacher(cfg)
        objective = objective if objective is not None else objective_cls.build(objective_cfg, teacher)
    base = teacher.inner if isinstance(teacher, CFGDenoiser) else teacher
    if cfg.student.init_sigma is not None and not objective.uses_init_sigma:
        raise ConfigError(f"student.init_sigma: objective '{objective.name}' sets its own noise levels; remove the key")
    student = objective.make_student(base, 2.5 if cfg.student.init_sigma is None else cfg.student.init_sigma)
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
        cond = objective.sample_cond(n, device)
        if base.num_classes is not None:
            cond["class_labels"] = torch.arange(n, device=device) % base.num_classes
        return cond

    evaluator = None
    if cfg.eval.every is not None:
        from .evaluation import Evaluator

        evaluator = Evaluator(cfg.eval, base.sample_shape, _draw, grid_cond,
                              base.num_classes, seed=cfg.train.seed + 1)
    return TrainTask(
        objective=objective,
        networks=networks,
        sample_shape=base.sample_shape,
        cond_fn=lambda n, device: base.sample_class_labels(n, device),
        grid_cond_fn=grid_cond,
        sample_fn=_draw,
        save_fn=save_student,
        data_fn=data_fn,
        evaluator=evaluator,
        info={"teacher": cfg.teacher.path, "teacher_guidance_scale": cfg.teacher.guidance_scale, "objective": objective.name,
              **objective.student_info()},
    )


def distill(cfg: DistillConfig, resume: str | None = None, output_dir: str | Path | None = None) -> Path:
    """Run a distillation; returns the folder of the EMA student (``OUTPUT/student``).

    Example:
        >>> from distilldiff.config import DistillConfig, load_config
        >>> cfg = load_config(DistillConfig, "configs/mnist/sid.yaml", ["train.max_steps=10"])
        >>> student_dir = distill(cfg)  # doctest: +SKIP
    """
    objective_cls, objective_cfg = objective_config(cfg)
    out = Path(output_dir or cfg.output_dir)
    if getattr(objective_cls, "staged", False):
        return distill_stages(cfg, objective_cfg, out, resume)
    engine = Engine(build_distill_task(cfg), cfg.train, out)
    return engine.run(resolved_config(cfg), resume)


def distill_stages(cfg: DistillConfig, pcfg, out: Path, resume: str | None) -> Path:
    """Progressive distillation: one engine run per stage in ``OUT/stage-KKKK`` (K = student steps),
    ``train.max_steps`` updates each (with ``train.lr_schedule``); each stage's EMA student is the
    next stage's frozen teacher. ``OUT/student`` is the last one.

    Resuming skips finished stages (their student is reloaded) and resumes the unfinished one.
    """
    from .config import dump_yaml
    from .objectives.progressive import ProgressiveDistillation, full_grid, stage_plan

    if resume not in (None, "latest"):
        raise ConfigError("progressive distillation resumes with --resume latest (stage by stage)")
    if resume is None and any(out.glob("stage-*/checkpoints/step-*")):
        raise FileExistsError(f"{out} holds stages of an earlier run; pass --resume latest to continue it or choose another --output-dir")
    teacher = build_teacher(cfg)
    grid = full_grid(pcfg, teacher.inner if isinstance(teacher, CFGDenoiser) else teacher)
    train = cfg.train  # max_steps: updates per stage
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config(cfg)
    dump_yaml(resolved, out / "config.yaml")
    current: Denoiser = teacher
    for k in stage_plan(pcfg):
        folder = out / f"stage-{k:04d}"
        stride = pcfg.start_steps // (2 * k)
        objective = ProgressiveDistillation(pcfg, grid[::stride])
        done = folder / "checkpoints" / f"step-{train.max_steps:07d}" / "state.json"
        if done.is_file():
            current = load_student(folder / "student")[0].denoiser
            continue
        engine = Engine(build_distill_task(cfg, objective, current), train, folder)
        has_ckpt = bool(engine.complete_checkpoints())
        engine.run(resolved, "latest" if has_ckpt else None)
        current = copy.deepcopy(engine.ema.module.denoiser).eval().requires_grad_(False)
    final = out / f"stage-{stage_plan(pcfg)[-1]:04d}" / "student"
    if (out / "student").exists():
        shutil.rmtree(out / "student")
    shutil.copytree(final, out / "student")
    return out / "student"
