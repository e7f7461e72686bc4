"""Training a small Stable-Diffusion-3-style flow-matching teacher on the captioned MNIST digits.

The result is a standard ``StableDiffusion3Pipeline`` folder (the base pipeline's ``AutoencoderKL``,
its CLIP text encoder as both of SD3's CLIP encoders, no T5, an ``SD3Transformer2DModel`` trained
here, a ``FlowMatchEulerDiscreteScheduler``) that plain diffusers loads with
``StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)``. The
transformer is trained by the one training engine with
:class:`~distilldiff.objectives.flow_matching.FlowMatchingObjective`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import FlowTeacherConfig, to_dict
from .data import padded_digits
from .engine import TrainTask
from .engine.stages import StagedRun
from .objectives.flow_matching import FlowMatchingObjective
from .teachers.vp import TEACHER_INFO_FILE
from .text_teacher import captioned_digits_task


def clip_with_projection(text_encoder: nn.Module, seed: int) -> nn.Module:
    """A ``CLIPTextModelWithProjection`` holding ``text_encoder``'s weights and a random projection
    (seeded; square: the projection keeps the hidden size), frozen. SD3 reads its CLIP encoders'
    hidden states and their projected pooled outputs."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(**{**text_encoder.config.to_dict(), "projection_dim": text_encoder.config.hidden_size})
    torch.manual_seed(seed)
    out = CLIPTextModelWithProjection(cfg)
    out.text_model.load_state_dict(getattr(text_encoder, "text_model", text_encoder).state_dict())  # strict: all but the projection
    return out.eval().requires_grad_(False)


def build_flow_pipeline(cfg: FlowTeacherConfig):
    """A ``StableDiffusion3Pipeline`` of ``cfg.base``'s VAE and text encoder (twice, see
    :func:`clip_with_projection`), no T5, and a fresh transformer (initialised from ``train.seed``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from .teachers import resolve_teacher_path
    from .teachers.vp import load_pipeline

    base = load_pipeline(resolve_teacher_path(cfg.base, "base"))
    if getattr(base, "text_encoder", None) is None or getattr(base, "vae", None) is None:
        raise ValueError(f"base: {cfg.base} has no text encoder and VAE to reuse (expected a Stable Diffusion pipeline)")
    hidden = base.text_encoder.config.hidden_size
    enc1, enc2 = clip_with_projection(base.text_encoder, cfg.train.seed), clip_with_projection(base.text_encoder, cfg.train.seed + 1)
    vae = base.vae
    latent = base.unet.config.sample_size if getattr(base, "unet", None) is not None else None
    latent = latent or vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(cfg.train.seed)
    kwargs = {"sample_size": latent, "in_channels": vae.config.latent_channels, "out_channels": vae.config.latent_channels,
              "joint_attention_dim": 2 * hidden, "pooled_projection_dim": 2 * hidden, "pos_embed_max_size": latent,
              **cfg.transformer}
    try:
        transformer = SD3Transformer2DModel(**kwargs)
    except TypeError as e:
        raise ValueError(f"transformer: invalid SD3Transformer2DModel arguments ({e})") from None
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift), vae=vae,
                                    text_encoder=enc1, tokenizer=base.tokenizer, text_encoder_2=enc2, tokenizer_2=base.tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def save_flow_teacher(denoiser, folder: Path, info: dict) -> None:
    """Write the teacher (``denoiser``: the :class:`~distilldiff.teachers.FlowDenoiser` being trained,
    whose transformer may be the EMA copy) as a ``StableDiffusion3Pipeline`` folder with its T5 length."""
    denoiser.components.save(folder, transformer=denoiser.model)
    meta = {"sigma_data": denoiser.sigma_data, "max_sequence_length": denoiser.components.max_sequence_length, "training": info}
    (Path(folder) / TEACHER_INFO_FILE).write_text(json.dumps(meta, indent=2))


def build_flow_task(cfg: FlowTeacherConfig) -> TrainTask:
    """The transformer's run on the latents of the base pipeline's autoencoder."""
    from .teachers.flow import FlowDenoiser
    from .teachers.text import LatentCache

    pipe = build_flow_pipeline(cfg)
    teacher = FlowDenoiser.from_pipeline(pipe, "mnist5k", max_sequence_length=cfg.max_sequence_length)
    h, w = teacher.components.image_size
    if pipe.vae.config.in_channels != 1 or h != w or h < 28:
        raise ValueError(f"base: {cfg.base} makes {pipe.vae.config.in_channels}x{h}x{w} images; the digits need grey square ones of >= 28 pixels")
    images, _ = padded_digits(h)
    latents = LatentCache().get(teacher.components, images)
    return captioned_digits_task(teacher, lambda t: FlowMatchingObjective(cfg.objective, t.conditioning), latents,
                                 cfg.sample_steps, save_flow_teacher,
                                 {"dataset": f"{cfg.dataset} with distilldiff.captions", "base": cfg.base})


def train_flow_teacher(cfg: FlowTeacherConfig, resume: str | None = None, output_dir: str | Path | None = None) -> Path:
    """Train the transformer (``OUT/transformer``); returns ``OUT/student``, the
    ``StableDiffusion3Pipeline`` folder. ``resume="latest"`` continues an interrupted run."""
    run = StagedRun(Path(output_dir or cfg.output_dir), ["transformer"], resume, "the flow-matching teacher")
    resolved = to_dict(cfg)
    run.write_config(resolved)
    run.run("transformer", build_flow_task(cfg), cfg.train, resolved)
    return run.publish("transformer")
