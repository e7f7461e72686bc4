"""Training a class-conditional diffusers teacher on the embedded MNIST digits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import TeacherTrainConfig
from .data import RandomBatches, mnist5k
from .engine import Engine, TrainTask
from .metrics.background import grid_stats
from .objectives.denoising import DenoisingObjective
from .samplers import ddim_sample
from .teachers.vp import TEACHER_INFO_FILE, VPDenoiser

NUM_CLASSES = 10


def build_unet(model_kwargs: dict) -> nn.Module:
    """A diffusers ``UNet2DModel`` with one extra class embedding for the null label."""
    from diffusers import UNet2DModel

    kwargs = dict(model_kwargs)
    kwargs.setdefault("num_class_embeds", NUM_CLASSES + 1)
    try:
        return UNet2DModel(**kwargs)
    except TypeError as e:
        raise ValueError(f"model: invalid UNet2DModel arguments ({e})") from None


def save_teacher_pipeline(denoiser: VPDenoiser, folder: Path, scheduler_config: dict, info: dict) -> None:
    """Write a standard diffusers ``DDPMPipeline`` folder (safetensors) plus distilldiff metadata."""
    from diffusers import DDPMPipeline, DDPMScheduler

    pipe = DDPMPipeline(unet=denoiser.model, scheduler=DDPMScheduler(**scheduler_config))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    meta = {
        "num_classes": denoiser.num_classes,
        "null_class": denoiser.null_class,
        "sigma_data": denoiser.sigma_data,
        "training": info,
    }
    (Path(folder) / TEACHER_INFO_FILE).write_text(json.dumps(meta, indent=2))


def build_teacher_task(cfg: TeacherTrainConfig) -> TrainTask:
    """Networks, objective, data and callbacks for :class:`~distilldiff.engine.Engine`."""
    from diffusers import DDPMScheduler

    from .config import to_dict

    sched_cfg = to_dict(cfg.scheduler)
    scheduler = DDPMScheduler(**sched_cfg)
    torch.manual_seed(cfg.train.seed)  # the initial weights follow train.seed
    unet = build_unet(cfg.model)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if shape != (1, 28, 28):
        raise ValueError(f"model: dataset mnist5k has images of shape (1, 28, 28), the model makes {shape}")
    denoiser = VPDenoiser(
        unet, scheduler.alphas_cumprod, cfg.scheduler.prediction_type, shape, cfg.sigma_data, NUM_CLASSES, NUM_CLASSES
    )
    objective = DenoisingObjective(cfg.objective, denoiser.schedule.sigmas, cfg.scheduler.prediction_type, denoiser.conditioning)
    images, labels = mnist5k()
    sigmas = denoiser.discrete_sigmas(cfg.sample_steps, "trailing")

    def sample_fn(model: nn.Module, noise: Tensor, cond: dict, generator: torch.Generator | None = None) -> Tensor:
        return ddim_sample(model, noise, sigmas, **cond)

    return TrainTask(
        objective=objective,
        networks={"model": denoiser},
        sample_shape=shape,
        cond_fn=lambda n, dev: {},
        data_fn=RandomBatches(images, labels),
        grid_cond_fn=lambda n, dev: denoiser.conditioning.grid(n, dev),
        sample_fn=sample_fn,
        save_fn=lambda model, folder, info: save_teacher_pipeline(model, folder, sched_cfg, info),
        info={"dataset": cfg.dataset},
        image_stats=grid_stats,
    )


def train_teacher(cfg: TeacherTrainConfig, resume: str | None = None, output_dir: str | None = None) -> Path:
    """Train a teacher; returns the folder of its EMA pipeline (``OUTPUT/student``)."""
    engine = Engine(build_teacher_task(cfg), cfg.train, Path(output_dir or cfg.output_dir))
    return engine.run(cfg, resume)
