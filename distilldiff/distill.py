"""Distillation runs: build the networks an objective needs from the teacher and train them.

This is the runner: it reads a :class:`~distilldiff.config.DistillConfig`, loads the teacher,
lets the objective build its student, critics and targets, and trains each of the objective's
stages on the one :class:`~distilldiff.engine.Engine`. It knows no objective by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, DistillConfig, TeacherConfig, to_dict
from .engine import Engine, TrainTask
from .engine.stages import StagedRun
from .export import STUDENT_INFO_FILE, export_problem, load_student, save_student, student_folder, with_steps
from .objectives import OBJECTIVES, Objective, Stage
from .metrics.background import grid_stats
from .students import LoRAFakeScore, draw_samples
from .teachers import CFGDenoiser, Denoiser, TextConditioned, load_teacher

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunTeacher:
    """The teacher of a run.

    Attributes:
        frozen: the network the objective trains against (classifier-free guided when
            ``teacher.guidance_scale`` > 0).
        base: the unguided network that students and critics are copied from.
    """

    frozen: Denoiser
    base: Denoiser

    @classmethod
    def unguided(cls, denoiser: Denoiser) -> "RunTeacher":
        return cls(denoiser, denoiser)


def build_teacher(cfg: TeacherConfig) -> RunTeacher:
    """The teacher a ``teacher:`` section names, and its guided form.

    A distilldiff student folder (or a run folder with one) is a teacher too: its denoiser, e.g. a
    guidance-distilled student for progressive distillation with ``w`` kept as an input.
    """
    folder = student_folder(cfg.path)
    if (folder / STUDENT_INFO_FILE).is_file():
        for key in ("image_size", "embedded_guidance"):
            if getattr(cfg, key) is not None:
                raise ConfigError(f"teacher.{key}: {cfg.path} is a distilldiff student, which keeps its own; remove the key")
        base = load_student(folder)[0].denoiser
    else:
        base = load_teacher(cfg.path, sigma_data=cfg.sigma_data, num_classes=cfg.num_classes, null_class=cfg.null_class,
                            prompts=cfg.prompts, image_size=cfg.image_size, embedded_guidance=cfg.embedded_guidance)
    return RunTeacher(CFGDenoiser(base, cfg.guidance_scale) if cfg.guidance_scale else base, base)


def build_objective(cfg: DistillConfig, teacher: RunTeacher) -> Objective:
    """The objective of ``cfg.objective``, built against the run's frozen teacher."""
    return OBJECTIVES[cfg.objective.name].build(cfg.objective, teacher.frozen)


def build_data(cfg: DistillConfig, teacher: Denoiser):
    """Real-data batches for objectives that need them (``data: mnist5k``, or for text-to-image
    teachers a folder of image + caption pairs), checked against the teacher."""
    from .data import RandomBatches, mnist5k

    if isinstance(teacher, TextConditioned):
        return text_image_data(cfg, teacher)
    if cfg.data is None:
        raise ConfigError(f"objective '{cfg.objective.name}' needs real data: set 'data: mnist5k'")
    if cfg.data != "mnist5k":
        raise ConfigError(f"data: {cfg.data!r}: pixel teachers take 'mnist5k' (folders of images with captions are for text-to-image teachers)")
    images, labels = mnist5k()
    if tuple(images.shape[1:]) != tuple(teacher.sample_shape):
        raise ConfigError(f"data: {cfg.data} images have shape {tuple(images.shape[1:])}, the teacher's samples {tuple(teacher.sample_shape)}")
    return RandomBatches(images, labels if teacher.num_classes is not None else None)


def text_image_data(cfg: DistillConfig, teacher: TextConditioned):
    """Batches of real latents and their captions' embeddings for a text-to-image teacher.

    ``data`` is a folder of image + caption pairs (resized and centre-cropped to the teacher's
    image size), or ``mnist5k`` for a teacher of digits (the 5,000 digits padded to its image
    size, with the captions of :mod:`distilldiff.captions`). Latents and embeddings are computed
    once and cached (:class:`~distilldiff.teachers.text.LatentCache`, ``EmbeddingCache``), then drawn
    through a DataLoader that accelerate shards over the processes; checkpoints keep the stream's
    position (:class:`~distilldiff.data.ShardedBatches`).
    """
    from .data import ShardedBatches, padded_digits, read_captioned_images
    from .teachers.text import EmbeddingCache, LatentCache, embeddings_of

    if cfg.data is None:
        raise ConfigError(f"objective '{cfg.objective.name}' needs real data: set 'data:' to a folder of image + caption "
                          "pairs (NAME.png + NAME.txt)")
    comps = teacher.components
    channels = comps.pipe.vae.config.in_channels
    if cfg.data == "mnist5k":
        from .captions import mnist5k_captions

        h, w = comps.image_size
        if channels != 1 or h != w or h < 28:
            raise ConfigError(f"data: mnist5k needs a teacher of grey square images of at least 28 pixels; {cfg.teacher.path} "
                              f"makes {channels}x{h}x{w}")
        images, captions = padded_digits(h)[0], mnist5k_captions()
    else:
        images, captions = read_captioned_images(cfg.data, comps.image_size, channels)
    latents = LatentCache().get(comps, images)
    prompts = sorted(set(captions))
    embeds = EmbeddingCache().get(comps, prompts)
    return ShardedBatches(latents, cond=embeddings_of(captions, prompts, embeds))


def lora_critic(cfg: DistillConfig, objective: Objective, base: Denoiser) -> LoRAFakeScore:
    """The fake score as a LoRA adapter on the teacher's own network (``critic.lora_rank``), after
    the checks that it applies: the objective has exactly one critic, and no activation checkpointing."""
    critics = [name for name, role in objective.networks.items() if role == "critic"]
    if len(critics) != 1:
        raise ConfigError(f"critic.lora_rank: objective '{objective.name}' has {len(critics)} critics; a LoRA critic "
                          "replaces exactly one fake score: remove the critic section")
    if cfg.train.gradient_checkpointing:
        raise ConfigError("train.gradient_checkpointing with critic.lora_rank: not supported (the backward pass would "
                          "recompute the LoRA critic's activations with its adapter switched off)")
    try:
        return LoRAFakeScore(base, cfg.critic.lora_rank, cfg.critic.lora_alpha)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolved_config(cfg: DistillConfig) -> dict:
    """The config as written to the run folder: every default filled in."""
    return to_dict(cfg)


def eval_steps_of(student: nn.Module, objective: Objective, steps: list[int] | None):
    """``(student, k) -> student sampling in k steps`` for ``eval.steps`` (``None`` when unset), checked now
    on ``student`` for every count: a student that cannot sample in one of them is a config error."""
    if steps is None:
        return None
    info = objective.student_info()

    def student_with_steps(s: nn.Module, k: int) -> nn.Module:
        return with_steps(s, info, k, "eval.steps")

    for k in steps:
        try:
            student_with_steps(student, k)
        except ValueError as e:
            raise ConfigError(str(e) if str(e).startswith("eval.steps") else f"eval.steps: {e}") from None
    return student_with_steps


def build_distill_task(cfg: DistillConfig, objective: Objective | None = None, teacher: RunTeacher | None = None) -> TrainTask:
    """Teacher, objective and networks for :class:`~distilldiff.engine.Engine`.

    The objective builds its student from the unguided teacher and the ``student`` section,
    and its critics and targets; objectives that need real data get batches of the ``data``
    set. ``objective`` and ``teacher`` replace the ones the config names (a later stage of a
    staged objective: the previous stage's student as the teacher). Networks with freshly
    initialised layers start from ``train.seed``; the frozen teacher is kept in ``teacher.dtype``.
    """
    teacher = teacher if teacher is not None else build_teacher(cfg.teacher)
    objective = objective if objective is not None else build_objective(cfg, teacher)
    for key in ("critic_lr", "critic_grad_clip"):
        if getattr(cfg.train, key) is not None and "critic" not in objective.networks.values():
            raise ConfigError(f"train.{key}: objective '{objective.name}' trains no critic (fake score or discriminator); "
                              "remove the key")
    if cfg.data is not None and not objective.needs_real_data:
        raise ConfigError(f"data: {cfg.data!r}: objective '{objective.name}' as configured trains without real data; "
                          "remove the key (or --set data=null)")
    base = teacher.base
    torch.manual_seed(cfg.train.seed)  # fresh layers (guidance embedding, discriminator) start from the seed
    student = objective.make_student(base, cfg.student)
    problem = export_problem(student)
    if problem is not None:  # every checkpoint writes the student: find out now, not after the first hour
        raise ConfigError(problem)
    critic_source = lora_critic(cfg, objective, base) if cfg.critic.lora_rank is not None else base
    networks: dict[str, nn.Module] = {}
    for name, role in objective.networks.items():
        if role == "frozen":
            networks[name] = teacher.frozen
        elif role == "student":
            networks[name] = student
        elif role == "target":
            networks[name] = objective.make_target(student)
        else:
            networks[name] = objective.make_critic(name, critic_source)
    if cfg.teacher.dtype != "float32":  # after every copy was made: students and critics train in float32
        for name, role in objective.networks.items():
            if role == "frozen":
                networks[name].to(DTYPES[cfg.teacher.dtype])
        for name, role in objective.networks.items():
            if role == "critic":  # a LoRA critic's adapter lives in the teacher's network: back to float32
                networks[name].float()
    data_fn = build_data(cfg, base) if objective.needs_real_data else None

    def grid_cond(n: int, device) -> dict:
        return {**objective.sample_cond(n, device), **base.conditioning.grid(n, device)}

    evaluator = None
    if cfg.eval.every is not None:
        from .evaluation import Evaluator

        evaluator = Evaluator(cfg.eval, base.sample_shape, draw_samples, grid_cond, base.num_classes, seed=cfg.train.seed + 1,
                              with_steps=eval_steps_of(student, objective, cfg.eval.steps))
    return TrainTask(
        objective=objective,
        networks=networks,
        sample_shape=base.sample_shape,
        cond_fn=lambda n, device: base.conditioning.draw(n, device),
        grid_cond_fn=grid_cond,
        sample_fn=draw_samples,
        image_stats=grid_stats if len(base.sample_shape) == 3 else None,
        save_fn=save_student,
        data_fn=data_fn,
        evaluator=evaluator,
        info={"teacher": cfg.teacher.path, "teacher_guidance_scale": cfg.teacher.guidance_scale, "objective": objective.name,
              **({"prompts": cfg.teacher.prompts} if cfg.teacher.prompts else {}), **objective.student_info()},
    )


def distill(cfg: DistillConfig, resume: str | None = None, output_dir: str | Path | None = None) -> Path:
    """Run a distillation; returns the folder of the EMA student (``OUTPUT/student``).

    Example:
        >>> from distilldiff.config import DistillConfig, load_config
        >>> cfg = load_config(DistillConfig, "configs/mnist/sid.yaml", ["train.max_steps=10"])
        >>> student_dir = distill(cfg)  # doctest: +SKIP
    """
    out = Path(output_dir or cfg.output_dir)
    teacher = build_teacher(cfg.teacher)
    stages = build_objective(cfg, teacher).stages()
    if len(stages) == 1 and not stages[0].folder:
        engine = Engine(build_distill_task(cfg, stages[0].objective, teacher), cfg.train, out)
        return engine.run(resolved_config(cfg), resume)
    return distill_stages(cfg, stages, teacher, out, resume)


def distill_stages(cfg: DistillConfig, stages: list[Stage], teacher: RunTeacher, out: Path, resume: str | None) -> Path:
    """A staged objective: one engine run per stage in ``OUT/<stage folder>``, ``train.max_steps``
    updates each (with ``train.lr_schedule``); each stage's EMA student is the next stage's
    frozen teacher. ``OUT/student`` is the last one.

    Resuming skips finished stages (their student is reloaded) and resumes the unfinished one.
    """
    run = StagedRun(out, [stage.folder for stage in stages], resume, f"objective '{cfg.objective.name}'")
    resolved = resolved_config(cfg)
    run.write_config(resolved)
    current = teacher
    for stage in stages:
        if run.finished(stage.folder, cfg.train):
            current = RunTeacher.unguided(load_student(run.folders[stage.folder].student)[0].denoiser)
            continue
        engine = run.run(stage.folder, build_distill_task(cfg, stage.objective, current), cfg.train, resolved)
        current = RunTeacher.unguided(copy.deepcopy(engine.ema.module.denoiser).eval().requires_grad_(False))
    return run.publish(stages[-1].folder)
