"""Latent text-to-image teachers of the Stable Diffusion family behind ``D(x, sigma, **cond)``.

A :class:`LatentDenoiser` is a :class:`~distilldiff.teachers.VPDenoiser` whose samples are VAE
latents (Rombach et al. 2022, sec. 3) and whose network is a diffusers ``UNet2DConditionModel``
conditioned on text embeddings (SD 1.x/2.x) or on text embeddings, pooled embeddings and added
time ids (SDXL, Podell et al. 2023, sec. 2.2). Everything else of the pipeline (VAE, text
encoders, tokenizers) sits in :class:`PipelineComponents`: frozen, shared by every copy of the
denoiser (a student or critic copies only the UNet), never part of a checkpoint.

Prompts are encoded by the pipeline's own ``encode_prompt`` (the same embeddings diffusers
computes for ``pipe(prompt)``, including the unconditional input of classifier-free guidance:
the empty prompt's embedding, or zeros where an SDXL pipeline says
``force_zeros_for_empty_prompt``), once, and cached on disk (:class:`EmbeddingCache`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .conditioning import Conditioning
from .vp import VPDenoiser

#: SiD-LSG's one-step generator timestep for Stable Diffusion (Zhou et al. 2024b), near the EDM default noise level
DEFAULT_INIT_TIMESTEP = 625


def embeddings_of(wanted: Sequence[str], prompts: Sequence[str], embeds: dict[str, Tensor]) -> dict[str, Tensor]:
    """The rows of ``embeds`` (``{key: [P, ...]}``, one row per entry of ``prompts``) for each
    prompt of ``wanted`` (each must be among ``prompts``): ``{key: [len(wanted), ...]}``."""
    index = {p: i for i, p in enumerate(prompts)}
    rows = torch.tensor([index[p] for p in wanted], dtype=torch.long)
    return {k: v[rows] for k, v in embeds.items()}


class TextEmbeddings(Conditioning):
    """Text conditioning drawn from a fixed set of prompts whose embeddings were computed once.

    Args:
        prompts: the ``P`` prompts.
        embeds: the keyword arguments of the denoiser for each prompt, each ``[P, ...]``:
            ``encoder_hidden_states`` ``[P, L, D]`` and, for SDXL, ``text_embeds`` ``[P, D2]`` and
            ``time_ids`` ``[P, 6]``.
        null: the unconditional input, each entry ``[1, ...]`` (the empty prompt's embedding,
            or zeros).
    """

    def __init__(self, prompts: Sequence[str], embeds: dict[str, Tensor], null: dict[str, Tensor]):
        if sorted(embeds) != sorted(null):
            raise ValueError(f"embeds and null have different keys: {sorted(embeds)} vs {sorted(null)}")
        for k, v in embeds.items():
            if v.shape[0] != len(prompts):
                raise ValueError(f"embeds[{k!r}] has {v.shape[0]} rows for {len(prompts)} prompts")
        self.prompts = list(prompts)
        self.embeds = embeds
        self.null_embeds = null
        self.keys = tuple(embeds)

    def __repr__(self) -> str:
        return f"TextEmbeddings({len(self.prompts)} prompts, keys={self.keys})"

    @property
    def has_null(self) -> bool:
        return True

    def _rows(self, idx: Tensor, device) -> dict[str, Tensor]:
        if not self.prompts:
            raise ValueError("no prompts to draw from: give prompts (teacher.prompts in a config: a text file, one per line; "
                             "--prompt for sample)")
        return {k: v[idx].to(device) for k, v in self.embeds.items()}

    def draw(self, n, device, generator=None):
        """Prompts drawn uniformly."""
        return self._rows(torch.randint(0, max(1, len(self.prompts)), (n,), generator=generator), device)

    def grid(self, n, device, start=0):
        """Prompts cycling through the set in order."""
        return self._rows(torch.arange(start, start + n) % max(1, len(self.prompts)), device)

    def indices(self, n: int, start: int = 0) -> list[int]:
        """Which prompt each sample of :meth:`grid` shows."""
        return [(start + i) % len(self.prompts) for i in range(n)] if self.prompts else []

    def null(self, n, device):
        return {k: v.to(device).expand(n, *v.shape[1:]) for k, v in self.null_embeds.items()}

    def null_where(self, cond, mask):
        out = dict(cond)
        for k, v in self.null_embeds.items():
            m = mask.reshape(-1, *([1] * (v.ndim - 1)))
            out[k] = torch.where(m, v.to(cond[k].device, cond[k].dtype), cond[k])
        return out

    def expand(self, cond, n, device):
        out = dict(cond)
        for k in self.keys:
            if k in cond:
                v = torch.as_tensor(cond[k], device=device)
                out[k] = v.expand(n, *v.shape[1:]) if v.shape[0] == 1 else v
        return out


class PipelineComponents:
    """The frozen parts of a Stable Diffusion pipeline besides its UNet: VAE, text encoder(s), tokenizer(s).

    Shared, not copied: ``copy.deepcopy`` of a denoiser that holds this object returns the same
    object, and it is no ``nn.Module`` attribute of the denoiser (not trained, not moved with it,
    not in its ``state_dict``). Its networks move to the device of the tensors they are given.

    Args:
        pipe: the loaded ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.
        source: where the pipeline came from (a folder or hub id), for messages.
    """

    #: the pipeline's text encoders and tokenizers (attribute names), in the order ``encode_prompt`` uses them
    TEXT_PARTS: tuple[str, ...] = ("text_encoder", "tokenizer")

    def __init__(self, pipe, source: str = ""):
        self.pipe = pipe
        self.source = str(source)
        cfg = pipe.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.get("shift_factor", None) or 0.0)
        self.vae_scale = 2 ** (len(cfg.get("block_out_channels") or cfg.get("encoder_block_out_channels")) - 1)
        for m in self.networks():
            m.requires_grad_(False).eval()

    def __deepcopy__(self, memo):
        return self

    @staticmethod
    def of(pipe, source: str = "") -> "PipelineComponents":
        """The components of a Stable Diffusion 1.x/2.x or SDXL pipeline (:class:`SDXLComponents`)."""
        xl = getattr(pipe, "text_encoder_2", None) is not None or type(pipe).__name__.startswith("StableDiffusionXL")
        return (SDXLComponents if xl else PipelineComponents)(pipe, source)

    @property
    def network(self) -> nn.Module:
        """The pipeline's denoising network (``unet``, or ``transformer`` for flow pipelines)."""
        return getattr(self.pipe, "unet", None) or self.pipe.transformer

    def networks(self) -> list[nn.Module]:
        names = ("vae", *(n for n in self.TEXT_PARTS if n.startswith("text_encoder")))
        return [m for m in (getattr(self.pipe, n, None) for n in names) if isinstance(m, nn.Module)]

    def _on(self, device) -> None:
        for m in self.networks():
            m.to(device)

    @property
    def pipeline_class(self) -> str:
        return type(self.pipe).__name__

    def pipeline(self, **replace: Any):
        """A pipeline of the same class sharing every component and setting, with ``replace`` (e.g.
        ``unet=``, ``scheduler=``) swapped in; no safety checker is required (none is loaded)."""
        import inspect

        cls = type(self.pipe)
        params = inspect.signature(cls.__init__).parameters
        parts = {name: getattr(self.pipe, name, None) for name in self.pipe.components if name in params}
        parts.update(replace)
        settings = {k: v for k, v in self.pipe.config.items() if k in params and k not in parts and not k.startswith("_")}
        if "requires_safety_checker" in params and parts.get("safety_checker") is None:
            settings["requires_safety_checker"] = False
        return cls(**parts, **settings)

    def save(self, folder, **replace: Any) -> None:
        """``pipeline(**replace).save_pretrained(folder)`` in safetensors, without diffusers' warning
        for each component the pipeline lacks (SD3's T5: absent by design here)."""
        import logging

        log = logging.getLogger("diffusers.pipelines.pipeline_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            self.pipeline(**replace).save_pretrained(str(folder), safe_serialization=True)
        finally:
            log.setLevel(level)

    # -- prompts ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, Tensor]:
        """The denoiser's conditioning for each prompt, ``{key: [P, ...]}`` on the CPU, as the
        pipeline's own ``encode_prompt`` computes it for ``pipe(prompt)``."""
        self._on(device)
        parts = [self._encode(list(prompts[i:i + batch_size]), device)[0] for i in range(0, len(prompts), batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    @torch.no_grad()
    def null_embedding(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """The unconditional input ``{key: [1, ...]}`` of classifier-free guidance (diffusers' own)."""
        self._on(device)
        return self._encode([""], device)[1]

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(conditional, unconditional)`` network inputs of ``prompts``, ``{key: [P, ...]}`` and ``{key: [1, ...]}``."""
        cond, uncond = self.pipe.encode_prompt(prompts, device, 1, True)
        return {"encoder_hidden_states": cond.float().cpu()}, {"encoder_hidden_states": uncond[:1].float().cpu()}

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of the pipeline's default output."""
        s = self.network.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return h * self.vae_scale, w * self.vae_scale

    def fingerprint(self) -> str:
        """A hash of the text encoders' class, config and weights and of the tokenizers' vocabularies:
        it changes whenever the embedding of some prompt could."""
        h = hashlib.sha256()
        h.update(self.pipeline_class.encode())
        for name in self.TEXT_PARTS:
            part = getattr(self.pipe, name, None)
            if part is None:
                continue
            h.update(name.encode())
            if isinstance(part, nn.Module):
                _hash_module(h, part)
            else:
                h.update(type(part).__name__.encode())
                h.update(json.dumps(sorted(part.get_vocab().items())).encode())
                h.update(str(getattr(part, "model_max_length", "")).encode())
        h.update(self._fingerprint_extra().encode())
        return h.hexdigest()

    def _fingerprint_extra(self) -> str:
        """Anything besides the text encoders that enters the cached conditioning (SDXL: the image size of its time ids)."""
        return ""

    # -- pixels ----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` in [-1, 1] of latents ``[B, C, h, w]``: ``vae.decode(z / scaling + shift)``."""
        vae = self.pipe.vae
        vae.to(latents.device)
        z = latents.to(vae.dtype) / self.scaling_factor + self.shift_factor
        return vae.decode(z).sample.float().clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents of images in [-1, 1]: ``(mean of vae.encode(x) - shift) * scaling`` (the
        posterior's mean: deterministic, so it can be cached; its spread is tiny next to the
        noise that diffusion adds)."""
        vae = self.pipe.vae
        vae.to(images.device)
        out = vae.encode(images.to(vae.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent  # AutoencoderDC is deterministic
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def vae_fingerprint(self) -> str:
        """A hash of the autoencoder's class, config and weights and of the latent scaling."""
        h = hashlib.sha256()
        _hash_module(h, self.pipe.vae)
        h.update(f"{self.scaling_factor}/{self.shift_factor}".encode())
        return h.hexdigest()


class SDXLComponents(PipelineComponents):
    """An SDXL pipeline's components (Podell et al. 2023, sec. 2.2): two text encoders, pooled
    embeddings and added time ids, which the UNet takes as ``added_cond_kwargs``."""

    TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        pipe = self.pipe
        cond, uncond, pooled, pooled_u = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                            do_classifier_free_guidance=True)
        size = self.image_size
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else int(pooled.shape[-1])
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=torch.float32, text_encoder_projection_dim=proj)
        n = cond.shape[0]
        return ({"encoder_hidden_states": cond.float().cpu(), "text_embeds": pooled.float().cpu(), "time_ids": time_ids.repeat(n, 1)},
                {"encoder_hidden_states": uncond[:1].float().cpu(), "text_embeds": pooled_u[:1].float().cpu(), "time_ids": time_ids})

    def _fingerprint_extra(self) -> str:
        return json.dumps(self.image_size)  # the time ids


def _hash_module(h, module: nn.Module) -> None:
    """Feed a network's class, config and weights to hash ``h``."""
    h.update(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        h.update((config.to_json_string(use_diff=False) if hasattr(config, "to_json_string")
                  else json.dumps(dict(config), sort_keys=True, default=str)).encode())
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


class TextConditioned:
    """What every latent text-to-image denoiser shares (a mixin of :class:`LatentDenoiser` and
    :class:`~distilldiff.teachers.flow.FlowDenoiser`): the pipeline's frozen :attr:`components`, the
    prompts its training conditioning is drawn from (:meth:`set_prompts`), and decoding to pixels.
    Subclasses set ``self.components`` and ``self._conditioning = None`` in their constructor."""

    components: PipelineComponents
    _conditioning: "TextEmbeddings | None"

    @property
    def conditioning(self) -> TextEmbeddings:
        if self._conditioning is None:  # the unconditional input only: enough for guidance and prompts given at sampling
            null = self.components.null_embedding()
            self._conditioning = TextEmbeddings([], {k: v[:0] for k, v in null.items()}, null)
        return self._conditioning

    def set_prompts(self, prompts: Sequence[str], cache: "EmbeddingCache | None" = None):
        """Draw training and grid conditioning from ``prompts`` (encoded once; through ``cache`` if given)."""
        embeds = cache.get(self.components, prompts) if cache is not None else self.components.encode_prompts(prompts)
        self._conditioning = TextEmbeddings(prompts, embeds, self.components.null_embedding())
        return self

    def prompt_cond(self, prompts: Sequence[str], device) -> dict[str, Tensor]:
        """Conditioning for the given prompts (encoded now, not cached)."""
        return {k: v.to(device) for k, v in self.components.encode_prompts(prompts).items()}

    def decode(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] of latent samples."""
        return self.components.decode(latents)


class LatentDenoiser(TextConditioned, VPDenoiser):
    """A Stable-Diffusion-family UNet in its VAE's latent space as ``D(z, sigma, **cond)``.

    ``cond`` holds ``encoder_hidden_states`` (and ``text_embeds``, ``time_ids`` for SDXL, passed
    to the UNet as ``added_cond_kwargs``). Samples are latents (``sample_shape`` ``(C, h, w)``);
    :attr:`components` decodes them to pixels. The conditioning the training engine draws is
    :attr:`conditioning`, a :class:`TextEmbeddings` set by :meth:`set_prompts`.

    Args:
        model: the ``UNet2DConditionModel``.
        components: the pipeline's frozen VAE and text encoders.
        alphas_cumprod, prediction_type, sample_shape, sigma_data: as :class:`VPDenoiser`.
    """

    ADDED_KEYS = ("text_embeds", "time_ids")
    #: width of the guidance-weight embedding of a w-conditioned student (LCM's ``time_cond_proj_dim``)
    GUIDANCE_EMBEDDING_DIM = 256

    @property
    def default_init_timestep(self) -> int:
        """A one-step student's timestep when none is configured: SiD-LSG's 625 (clipped to the schedule)."""
        return min(DEFAULT_INIT_TIMESTEP, self.num_train_timesteps - 1)

    def __init__(self, model: nn.Module, components: PipelineComponents, alphas_cumprod: Tensor, prediction_type: str,
                 sample_shape: tuple[int, ...], sigma_data: float = 1.0):
        super().__init__(model, alphas_cumprod, prediction_type, sample_shape, sigma_data)
        self.components = components
        self._conditioning: TextEmbeddings | None = None

    @property
    def takes_guidance_scale(self) -> bool:
        """Whether the UNet takes the guidance weight ``w`` as an input (``time_cond_proj_dim``, as LCM)."""
        return getattr(self.model.config, "time_cond_proj_dim", None) is not None

    def add_guidance_input(self, guidance_embed_scale: float | None = None, guidance_embed_gain: float | None = None,
                           defaults: tuple[float, float] | None = None) -> None:
        """Give the UNet a guidance-weight input the way LCM does (Luo et al. 2023, sec. 4.2) and stock
        diffusers pipelines feed it: ``time_cond_proj_dim`` = :attr:`GUIDANCE_EMBEDDING_DIM`, the
        pipeline's ``get_guidance_scale_embedding(w)`` projected by ``time_embedding.cond_proj``,
        here initialised to zero so that the network equals the teacher at every ``w`` at first.
        ``pipe(..., guidance_scale=g)`` then feeds ``w = g - 1``, our convention. The embedding is
        diffusers' (``1000 w``), so ``guidance_embed_scale`` is refused; ``guidance_embed_gain`` (unset:
        ``defaults[1]``) becomes the learning-rate multiplier of ``cond_proj`` (:meth:`learning_rate_scales`):
        under Adam a weight moves about ``lr`` per step whatever its gradient, so a multiplier does for
        the zero-started layer what the pixel students' output gain does (docs/math.md, "A guidance-scale input"),
        and a stock UNet has no place for a gain."""
        from diffusers import UNet2DConditionModel

        if guidance_embed_scale is not None:
            raise ValueError("objective.guidance_embed_scale: a text-to-image student takes w through diffusers' guidance "
                             "embedding (time_cond_proj_dim, 1000 w); remove the key")
        gain = guidance_embed_gain if guidance_embed_gain is not None else (defaults[1] if defaults else 1.0)
        if not gain > 0:
            raise ValueError(f"objective.guidance_embed_gain must be > 0, got {gain}")
        old = self.model
        if not isinstance(old, UNet2DConditionModel) or getattr(old, "peft_config", None):
            raise ValueError(f"a guidance-weight input needs a plain UNet2DConditionModel, got {type(old).__name__}"
                             + (" with a LoRA adapter" if getattr(old, "peft_config", None) else ""))
        new = UNet2DConditionModel.from_config({**old.config, "time_cond_proj_dim": self.GUIDANCE_EMBEDDING_DIM})
        missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
        if set(missing) != {"time_embedding.cond_proj.weight"} or unexpected:
            raise RuntimeError(f"unexpected weights when adding the guidance input: missing {missing}, unexpected {unexpected}")
        nn.init.zeros_(new.time_embedding.cond_proj.weight)
        p = next(old.parameters())
        self.model = new.to(device=p.device, dtype=p.dtype).train(old.training)
        self.guidance_lr_scale = float(gain)

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        """The guidance input's ``cond_proj`` at ``guidance_embed_gain`` times the learning rate (a w-conditioned student)."""
        scale = getattr(self, "guidance_lr_scale", 1.0)
        if not self.takes_guidance_scale or scale == 1.0:
            return {}
        return {self.model.time_embedding.cond_proj.weight: scale}

    def network_kwargs(self, cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        cond = dict(cond)
        w = cond.pop("guidance_scale", None)
        out = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        added = {k: out.pop(k) for k in self.ADDED_KEYS if k in out}
        if added:
            out["added_cond_kwargs"] = added
        if w is not None:
            if not self.takes_guidance_scale:
                raise ValueError("a guidance weight was given, but this UNet has no guidance input (time_cond_proj_dim)")
            # the stock pipelines' embedding of w, computed as they do (float32 on the CPU), then moved
            emb = self.components.pipe.get_guidance_scale_embedding(w.detach().float().cpu().reshape(-1),
                                                                   embedding_dim=self.model.config.time_cond_proj_dim)
            out["timestep_cond"] = emb.to(device=w.device, dtype=dtype)
        return out

    @classmethod
    def from_pipeline(cls, pipe, source: str = "", *, sigma_data: float | None = None,
                      prediction_type: str | None = None) -> "LatentDenoiser":
        """The denoiser of a loaded ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``."""
        unet, scheduler = pipe.unet, pipe.scheduler
        if not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(f"{source}: the pipeline's scheduler {type(scheduler).__name__} is not of the DDPM family (no alphas_cumprod)")
        components = PipelineComponents.of(pipe, source)
        s = unet.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        den = cls(unet, components, scheduler.alphas_cumprod,
                  prediction_type or scheduler.config.get("prediction_type", "epsilon"),
                  (unet.config.in_channels, h, w), 1.0 if sigma_data is None else sigma_data)
        den.scheduler_config = dict(scheduler.config)
        return den


def is_text_to_image(pipe) -> bool:
    """Whether a loaded diffusers pipeline is a latent text-to-image pipeline this module handles."""
    return all(getattr(pipe, n, None) is not None for n in ("unet", "vae", "text_encoder", "tokenizer"))


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a text file (one per line; blank lines skipped), from a folder of image +
    caption pairs (every ``*.txt`` caption file, in name order), or ``mnist5k``: the captions of
    the 5,000 embedded digits (:func:`distilldiff.captions.mnist5k_captions`, each distinct one
    once). One-line errors name the path."""
    if str(path) == "mnist5k":
        from ..captions import mnist5k_captions

        return sorted(set(mnist5k_captions()))
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(p.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: the folder has no caption files (*.txt)")
        prompts = [f.read_text(encoding="utf-8").strip() for f in files]
    elif p.is_file():
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"{path}: no such prompt file or caption folder")
    if not prompts:
        raise ValueError(f"{path}: no prompts in it")
    return prompts


class KeyedTensorStore:
    """Tensor rows stored by key in one safetensors file (``KEY/NAME`` entries).

    :meth:`get` returns the rows of the keys asked for, computing (and storing) only those the
    file lacks; the file is rewritten to a temporary sibling and renamed, so an interrupted write
    leaves the previous file intact.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = metadata or {}

    def get(self, keys: Sequence[str], compute: Callable[[list[int]], dict[str, Tensor]]) -> tuple[dict[str, Tensor], int]:
        """``({name: [len(keys), ...]}, number of rows computed)``; ``compute(positions)`` returns
        ``{name: [len(positions), ...]}`` for the rows at those positions of ``keys``."""
        from safetensors.torch import load_file, save_file

        stored = load_file(str(self.path)) if self.path.is_file() else {}
        have = {k.split("/", 1)[0] for k in stored}
        missing, seen = [], set()
        for i, key in enumerate(keys):
            if key not in have and key not in seen:
                missing.append(i)
                seen.add(key)
        if missing:
            new = compute(missing)
            for j, i in enumerate(missing):
                for name, v in new.items():
                    stored[f"{keys[i]}/{name}"] = v[j].contiguous()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            save_file(stored, str(tmp), metadata=self.metadata)
            os.replace(tmp, self.path)
        if not keys:
            return {}, 0
        names = sorted(k.split("/", 1)[1] for k in stored if k.startswith(keys[0] + "/"))
        return {n: torch.stack([stored[f"{key}/{n}"] for key in keys]) for n in names}, len(missing)


def _default_cache(name: str) -> Path:
    from ..metrics.inception import cache_dir

    return cache_dir() / name


class EmbeddingCache:
    """Text embeddings stored once per (text encoder, prompt) as safetensors.

    One file per encoder (:meth:`PipelineComponents.fingerprint`: its weights, config and
    tokenizer), one entry per prompt (the prompt's SHA-256): a changed encoder reads another
    file, a changed prompt another entry (:class:`KeyedTensorStore`).

    Args:
        folder: where the files live (default ``$DISTILLDIFF_CACHE/text-embeddings``, i.e.
            ``~/.cache/distilldiff/text-embeddings``).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else _default_cache("text-embeddings")
        #: prompts encoded (not read from the cache) by the last :meth:`get`
        self.last_encoded = 0

    def path(self, components: PipelineComponents) -> Path:
        return self.folder / f"{components.fingerprint()[:32]}.safetensors"

    @staticmethod
    def key(prompt: str) -> str:
        return hashlib.sha256(prompt.encode("utf-8")).hexdigest()

    def get(self, components: PipelineComponents, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{key: [P, ...]}`` for ``prompts``, encoding only those not cached yet."""
        store = KeyedTensorStore(self.path(components), {"encoder": components.fingerprint(), "source": components.source})
        rows, self.last_encoded = store.get([self.key(p) for p in prompts],
                                            lambda idx: components.encode_prompts([prompts[i] for i in idx]))
        return rows


class LatentCache:
    """VAE latents of images stored once per (autoencoder, image) as safetensors: one file per
    autoencoder (:meth:`PipelineComponents.vae_fingerprint`), one entry per image (the SHA-256
    of its pixels).

    Args:
        folder: where the files live (default ``$DISTILLDIFF_CACHE/latents``).
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder is not None else _default_cache("latents")
        #: images encoded (not read from the cache) by the last :meth:`get`
        self.last_encoded = 0

    def get(self, components: PipelineComponents, images: Tensor, batch_size: int = 256) -> Tensor:
        """Scaled latents ``[N, C, h, w]`` of ``images`` ``[N, C, H, W]`` in [-1, 1] (:meth:`PipelineComponents.encode`)."""
        fingerprint = components.vae_fingerprint()
        store = KeyedTensorStore(self.folder / f"{fingerprint[:32]}.safetensors", {"vae": fingerprint, "source": components.source})
        images = images.float().contiguous()
        keys = [hashlib.sha256(x.numpy().tobytes()).hexdigest() for x in images]

        def encode(idx: list[int]) -> dict[str, Tensor]:
            x = images[idx]
            return {"latents": torch.cat([components.encode(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)])}

        rows, self.last_encoded = store.get(keys, encode)
        return rows["latents"]
