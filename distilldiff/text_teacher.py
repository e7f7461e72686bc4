"""Training a small Stable-Diffusion-style text-to-image teacher on the captioned MNIST digits.

The result is a standard ``StableDiffusionPipeline`` folder (``AutoencoderKL``, ``CLIPTextModel``
with a ``CLIPTokenizer`` whose vocabulary this module writes, ``UNet2DConditionModel``,
``DDIMScheduler``) that plain diffusers loads with ``StableDiffusionPipeline.from_pretrained``.
Both networks are trained by the one training engine: the autoencoder with
:class:`~distilldiff.objectives.autoencoder.ReconstructionObjective`, then the UNet on its latents
with :class:`~distilldiff.objectives.denoising.DenoisingObjective`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .config import TextToImageTeacherConfig, to_dict
from .data import RandomBatches, padded_digits
from .engine import TrainTask
from .engine.stages import StagedRun
from .metrics.background import grid_stats
from .objectives.autoencoder import ReconstructionObjective
from .objectives.denoising import DenoisingObjective
from .samplers import ddim_sample
from .teachers.vp import TEACHER_INFO_FILE

#: characters every word-level tokenizer this module writes can fall back to
_CHARS = string.ascii_lowercase + string.digits + ".,!?'-"


def write_word_tokenizer(folder: str | Path, words: Sequence[str], max_length: int = 16) -> Path:
    """Write a CLIP byte-pair tokenizer (``vocab.json``, ``merges.txt`` and its config) to ``folder``.

    Every word of ``words`` (lower case ASCII) becomes one token: the merges build it left to
    right from its characters; any other text falls back to single characters. Returns ``folder``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for tok in list(_CHARS) + [c + "</w>" for c in _CHARS]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in words:
        if not word or any(c not in _CHARS for c in word):
            raise ValueError(f"tokenizer word {word!r}: only lower-case letters, digits and .,!?'- are supported")
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{current} {nxt}"
            if merge not in merges:
                merges.append(merge)
            current += nxt
            vocab.setdefault(current, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length).save_pretrained(str(folder))
    return folder


# -- stage 1: the autoencoder ------------------------------------------------------------------


def build_vae(cfg: TextToImageTeacherConfig) -> nn.Module:
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL(**{"sample_size": cfg.image_size, **cfg.vae})
    except TypeError as e:
        raise ValueError(f"vae: invalid AutoencoderKL arguments ({e})") from None


def build_vae_task(cfg: TextToImageTeacherConfig) -> TrainTask:
    """The autoencoder's run: reconstruction of the padded digits; grids show reconstructions
    (top half: inputs, bottom half: outputs) of fixed digits."""
    torch.manual_seed(cfg.vae_train.seed)
    vae = build_vae(cfg)
    images, _ = padded_digits(cfg.image_size)
    shape = tuple(images.shape[1:])
    if vae.config.in_channels != shape[0]:
        raise ValueError(f"vae.in_channels: the digits have {shape[0]} channel(s), the autoencoder takes {vae.config.in_channels}")
    shown = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:64]]

    def reconstructions(model: nn.Module, noise: Tensor, cond: dict, generator=None) -> Tensor:
        x = shown[: max(1, noise.shape[0] // 2)].to(noise.device)
        return torch.cat([x, model.decode(model.encode(x).latent_dist.mode()).sample.clamp(-1, 1)])

    return TrainTask(
        objective=ReconstructionObjective(cfg.kl_weight),
        networks={"vae": vae},
        sample_shape=shape,
        cond_fn=lambda n, dev: {},
        data_fn=RandomBatches(images),
        sample_fn=reconstructions,
        save_fn=lambda model, folder, info: model.save_pretrained(str(folder), safe_serialization=True),
        info={"dataset": cfg.dataset},
    )


@torch.no_grad()
def encode_digits(vae: nn.Module, images: Tensor, batch_size: int = 500) -> Tensor:
    """The latent means ``E(x)`` of ``images`` (unscaled)."""
    vae.eval()
    return torch.cat([vae.encode(images[i:i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)])


# -- stage 2: the text-conditioned UNet --------------------------------------------------------


def build_pipeline(cfg: TextToImageTeacherConfig, vae: nn.Module, tokenizer_dir: Path, scaling_factor: float):
    """A ``StableDiffusionPipeline`` of the trained ``vae`` (with ``scaling_factor``), a fresh frozen
    text encoder and a fresh UNet (both initialised from ``train.seed``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(cfg.train.seed)
    text_kwargs = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2, **cfg.text_encoder,
                   "vocab_size": len(tokenizer), "max_position_embeddings": cfg.max_tokens}
    try:
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_kwargs))
    except TypeError as e:
        raise ValueError(f"text_encoder: invalid CLIPTextConfig arguments ({e})") from None
    latent_size = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    unet_kwargs = {"sample_size": latent_size, "in_channels": vae.config.latent_channels,
                   "out_channels": vae.config.latent_channels, "cross_attention_dim": text_encoder.config.hidden_size, **cfg.unet}
    try:
        unet = UNet2DConditionModel(**unet_kwargs)
    except TypeError as e:
        raise ValueError(f"unet: invalid UNet2DConditionModel arguments ({e})") from None
    vae = AutoencoderKL.from_config({**vae.config, "scaling_factor": scaling_factor})
    scheduler = DDIMScheduler(**to_dict(cfg.scheduler), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_text_to_image_teacher(denoiser, folder: Path, info: dict) -> None:
    """Write the teacher (``denoiser``: the :class:`~distilldiff.teachers.text.LatentDenoiser` being
    trained, whose UNet may be the EMA copy) as a ``StableDiffusionPipeline`` folder."""
    denoiser.components.save(folder, unet=denoiser.model)
    meta = {"sigma_data": denoiser.sigma_data, "training": info}
    (Path(folder) / TEACHER_INFO_FILE).write_text(json.dumps(meta, indent=2))


def build_unet_task(cfg: TextToImageTeacherConfig, vae_folder: Path, work: Path) -> TrainTask:
    """The UNet's run on the latents of the autoencoder saved in ``vae_folder``; the tokenizer is
    written to ``work``."""
    from diffusers import AutoencoderKL

    from .captions import caption_vocabulary
    from .teachers.text import LatentDenoiser

    vae = AutoencoderKL.from_pretrained(str(vae_folder), use_safetensors=True)
    images, _ = padded_digits(cfg.image_size)
    latents = encode_digits(vae, images)
    scaling = float(1 / latents.std())  # unit-variance latents, as Stable Diffusion's scaling_factor
    pipe = build_pipeline(cfg, vae, write_word_tokenizer(work / "tokenizer", caption_vocabulary(), cfg.max_tokens), scaling)
    pipe.vae.load_state_dict(vae.state_dict())
    teacher = LatentDenoiser.from_pipeline(pipe, "mnist5k")
    return captioned_digits_task(
        teacher, lambda t: DenoisingObjective(cfg.objective, t.schedule.sigmas, t.prediction_type, t.conditioning),
        latents * scaling, cfg.sample_steps, save_text_to_image_teacher,
        {"dataset": f"{cfg.dataset} with distilldiff.captions", "scaling_factor": scaling})


def captioned_digits_task(teacher, make_objective: Callable, latents: Tensor, sample_steps: int, save_fn: Callable,
                          info: dict) -> TrainTask:
    """The run of a latent text-to-image teacher's network (``teacher``: a denoiser with
    :class:`~distilldiff.teachers.text.TextConditioned` prompts) on the latents ``[5000, ...]`` of the
    captioned digits: prompts are the digits' distinct captions, ``make_objective(teacher)`` builds the
    objective once they are set, and sample grids use ``sample_steps`` of the teacher's own sampling grid
    with the captions of digits spread evenly over the (class-sorted) set."""
    from .captions import mnist5k_captions
    from .teachers.text import embeddings_of

    captions = mnist5k_captions()
    teacher.set_prompts(sorted(set(captions)))
    cond = embeddings_of(captions, teacher.conditioning.prompts, teacher.conditioning.embeds)
    sigmas = teacher.sampling_sigmas(sample_steps)

    def sample_fn(model: nn.Module, noise: Tensor, c: dict, generator=None) -> Tensor:
        return model.decode(ddim_sample(model, noise, sigmas, **c))  # for flow teachers, the scheduler's Euler steps

    def grid_cond(n: int, device) -> dict:
        idx = torch.arange(n) * (len(captions) // max(1, n)) % len(captions)
        return {k: v[idx].to(device) for k, v in cond.items()}

    return TrainTask(
        objective=make_objective(teacher),
        networks={"model": teacher},
        sample_shape=teacher.sample_shape,
        cond_fn=lambda n, dev: {},
        data_fn=RandomBatches(latents, cond=cond),
        grid_cond_fn=grid_cond,
        sample_fn=sample_fn,
        save_fn=save_fn,
        info=info,
        image_stats=grid_stats,
    )


def train_text_to_image_teacher(cfg: TextToImageTeacherConfig, resume: str | None = None, output_dir: str | Path | None = None) -> Path:
    """Train the autoencoder (``OUT/vae``), then the UNet (``OUT/unet``); returns ``OUT/student``,
    the ``StableDiffusionPipeline`` folder. ``resume="latest"`` skips a finished autoencoder run
    and resumes the unfinished one; resuming without it refuses a folder that holds a run."""
    run = StagedRun(Path(output_dir or cfg.output_dir), ["vae", "unet"], resume, "the text-to-image teacher")
    resolved = to_dict(cfg)
    run.write_config(resolved)
    if not run.finished("vae", cfg.vae_train):
        run.run("vae", build_vae_task(cfg), cfg.vae_train, resolved)
    run.run("unet", build_unet_task(cfg, run.folders["vae"].student, run.out), cfg.train, resolved)
    return run.publish("unet")
