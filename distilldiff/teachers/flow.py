"""Flow-matching latent text-to-image teachers (Stable Diffusion 3, Flux, SANA) behind ``D(x, sigma, **cond)``.

A rectified-flow model (Liu et al. 2023; Esser et al. 2024, sec. 2) is trained on
``x_t = (1 - t) x0 + t eps`` and predicts the velocity ``v = eps - x0``. In EDM's sigma space
(``x_sigma = x0 + sigma eps``) this is ``sigma = t / (1 - t)``, ``x_t = x_sigma / (1 + sigma)`` and
``D = x_t - t v`` (docs/math.md, "Flow-matching teachers"). Pure noise, ``t = 1``, is ``sigma = inf``:
the network's input there is the noise itself, which :meth:`FlowDenoiser.forward_scaled` takes
directly, so one-step students and samplers start exactly where diffusers'
``FlowMatchEulerDiscreteScheduler`` does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..tensors import append_dims
from .base import Denoiser
from .conversions import flow_x0_from_velocity
from .text import PipelineComponents, TextConditioned


def flow_t_of_sigma(sigma: Tensor) -> Tensor:
    """``t = sigma / (1 + sigma)``, with ``t = 1`` at ``sigma = inf``."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def flow_sigma_of_t(t: Tensor) -> Tensor:
    """``sigma = t / (1 - t)``, with ``sigma = inf`` at ``t = 1``."""
    t = torch.as_tensor(t)
    return torch.where(t >= 1, torch.full_like(t, float("inf")), t / (1 - t))


class SequenceComponents(PipelineComponents):
    """The frozen parts of a pipeline whose prompts are encoded to a fixed token length (T5 in SD3
    and Flux, Gemma in SANA): the pipeline call's ``max_sequence_length``, which changes the
    embeddings and so the model's output."""

    #: the pipeline call's default ``max_sequence_length``
    DEFAULT_MAX_SEQUENCE_LENGTH = 256

    def __init__(self, pipe, source: str = "", max_sequence_length: int | None = None):
        super().__init__(pipe, source)
        #: the T5 part's length (zeros without T5) the model was trained with: the pipeline call's ``max_sequence_length``
        self.max_sequence_length = int(max_sequence_length or self.DEFAULT_MAX_SEQUENCE_LENGTH)

    def _fingerprint_extra(self) -> str:
        return f"max_sequence_length={self.max_sequence_length}"


class SD3Components(SequenceComponents):
    """A Stable Diffusion 3 pipeline's frozen parts: VAE (scaling and shift factors), CLIP-L and
    CLIP-G with pooled outputs, T5 optional (left out, the pipeline feeds zeros in its place)."""

    TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cond, uncond, pooled, pooled_u = self.pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True,
                                                                 max_sequence_length=self.max_sequence_length)
        return ({"encoder_hidden_states": cond.float().cpu(), "pooled_projections": pooled.float().cpu()},
                {"encoder_hidden_states": uncond[:1].float().cpu(), "pooled_projections": pooled_u[:1].float().cpu()})


class FluxComponents(SequenceComponents):
    """A Flux pipeline's frozen parts: VAE (scaling and shift factors), CLIP-L (pooled output only)
    and T5 (the token sequence). The transformer takes any image size; :attr:`image_size` is the
    one the denoiser draws (by default the pipeline's own, 1024 px for FLUX.1).

    The unconditional input of classifier-free guidance is the empty prompt's embedding: what
    ``FluxPipeline`` encodes for ``negative_prompt=""`` ("true CFG", ``true_cfg_scale``)."""

    TEXT_PARTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s

    def __init__(self, pipe, source: str = "", max_sequence_length: int | None = None, image_size: int | None = None):
        super().__init__(pipe, source, max_sequence_length)
        multiple = pipe.vae_scale_factor * 2  # the VAE's downsampling times the 2x2 packing
        size = int(image_size or pipe.default_sample_size * pipe.vae_scale_factor)
        if size < multiple or size % multiple:
            raise ValueError(f"teacher.image_size: {size} must be a positive multiple of {multiple} for {source or 'this Flux pipeline'} "
                             f"(its VAE's scale {pipe.vae_scale_factor} times the 2x2 packing of the latents)")
        self._image_size = (size, size)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        def encode(texts: list[str]) -> dict[str, Tensor]:
            seq, pooled, _ = self.pipe.encode_prompt(texts, device=device, max_sequence_length=self.max_sequence_length)
            return {"encoder_hidden_states": seq.float().cpu(), "pooled_projections": pooled.float().cpu()}

        return encode(prompts), encode([""])

    def _fingerprint_extra(self) -> str:
        return f"{super()._fingerprint_extra()}/flux"


class FlowDenoiser(TextConditioned, Denoiser):
    """A flow-matching transformer (diffusers ``SD3Transformer2DModel``) in its VAE's latent space.

    ``D(x, sigma) = x_t - t v(x_t, 1000 t)`` with ``t = sigma / (1 + sigma)``, ``x_t = x / (1 + sigma)``;
    :meth:`forward_scaled` takes ``x_t`` itself and is defined at ``t = 1`` (``sigma = inf``, which is
    :attr:`sigma_max`). ``cond`` holds ``encoder_hidden_states`` ``[B, L, D]`` and
    ``pooled_projections`` ``[B, P]``. Classifier-free guidance on the velocity (diffusers) equals
    guidance on ``D`` (``D`` is affine in ``v``), so :class:`~distilldiff.teachers.CFGDenoiser` applies.

    Args:
        model: the transformer, called as ``model(hidden_states=x_t, timestep=1000 t, **cond)``.
        components: the pipeline's frozen VAE and text encoders.
        scheduler_config: the ``FlowMatchEulerDiscreteScheduler`` config (its ``shift`` and
            ``num_train_timesteps``); the teacher's sampling grid is that scheduler's.
        sample_shape: ``(C, h, w)`` of one latent.
        sigma_data: the latents' standard deviation (1 after the VAE's scaling).
    """

    sigma_max = float("inf")

    def __init__(self, model: nn.Module, components: PipelineComponents, scheduler_config: dict,
                 sample_shape: tuple[int, ...], sigma_data: float = 1.0):
        super().__init__()
        self.model = model
        self.components = components
        self._conditioning = None
        self.scheduler_config = dict(scheduler_config)
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))
        t_min = float(self.make_scheduler().sigma_min)  # the shifted 1/T: the smallest t the schedule holds
        self.sigma_min = t_min / (1 - t_min)
        self.sigma_data = float(sigma_data)
        self.sample_shape = tuple(sample_shape)

    def feature_module(self) -> nn.Module:
        """Where a discriminator head reads this network's features: the transformer's final norm
        (``norm_out``, the image tokens ``[B, N, D]`` before the output projection; SD3, Flux, SANA)."""
        return self.model.norm_out

    def make_scheduler(self):
        """A fresh ``FlowMatchEulerDiscreteScheduler`` of the teacher's config."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return 1 + sigma

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Flow time of each noise level (``inf`` -> 1)."""
        return flow_t_of_sigma(sigma)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """Decreasing ``[num_steps]`` float64 noise levels of the stock scheduler's ``num_steps``-step
        grid (``set_timesteps``: the shifted schedule; the first is ``inf``, t = 1)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = self.make_scheduler()
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = self.dynamic_shift_mu()
        scheduler.set_timesteps(num_steps, **kwargs)
        return flow_sigma_of_t(scheduler.sigmas[:-1].to(torch.float64))

    #: the pipeline's ``max_shift`` where the scheduler config has none (SD3's ``calculate_shift`` call)
    DEFAULT_MAX_SHIFT = 1.16

    def image_seq_len(self) -> int:
        """Image tokens the transformer sees at the default image size (patches of ``patch_size``)."""
        c, h, w = self.sample_shape
        patch = getattr(self.model.config, "patch_size", 1) or 1
        return (h // patch) * (w // patch)

    def dynamic_shift_mu(self) -> float:
        """The resolution-dependent shift of the default image size (diffusers' ``calculate_shift``)."""
        cfg = self.scheduler_config
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", self.DEFAULT_MAX_SHIFT)
        m = (max_shift - base_shift) / (max_len - base_len)
        return self.image_seq_len() * m + base_shift - m * base_len

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return self.denoise_scaled(x / append_dims(1 + sigma, x.ndim), sigma, **cond)

    def denoise_scaled(self, x_t: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        t = self.sigma_to_t(sigma)  # not detached: sCM's JVP differentiates through the time input
        v = self.velocity(x_t, t, cond).to(x_t.dtype)
        return flow_x0_from_velocity(x_t, v, append_dims(t.to(x_t.dtype), x_t.ndim))

    def _model_dtype(self, like: Tensor) -> torch.dtype:
        dtype = getattr(self.model, "dtype", like.dtype)
        return dtype if isinstance(dtype, torch.dtype) else like.dtype

    def velocity(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        """The network's velocity ``[B, C, h, w]`` at ``x_t`` ``[B, C, h, w]`` and flow time ``t`` ``[B]``
        (SD3: ``model(hidden_states=x_t, timestep=1000 t, **cond)``)."""
        t_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        timestep = t.to(t_dtype) * self.num_train_timesteps  # as the scheduler computes its timesteps (float32)
        dtype = self._model_dtype(x_t)
        out = self.model(hidden_states=x_t.to(dtype), timestep=timestep, **self.network_kwargs(cond, dtype))
        return getattr(out, "sample", out)

    def network_kwargs(self, cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The transformer's keyword arguments: the embeddings cast to its dtype."""
        if "guidance_scale" in cond:
            raise ValueError("a guidance weight was given, but this transformer has no guidance input")
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}

    @classmethod
    def from_pipeline(cls, pipe, source: str | os.PathLike = "", *, sigma_data: float | None = None,
                      max_sequence_length: int | None = None) -> "FlowDenoiser":
        """The denoiser of a loaded ``StableDiffusion3Pipeline``; ``max_sequence_length``: the T5
        length its prompts are encoded with (unset: the pipeline's default, 256)."""
        transformer, scheduler = pipe.transformer, pipe.scheduler
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: a flow-matching pipeline needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        components = SD3Components(pipe, str(source), max_sequence_length)
        s = transformer.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return cls(transformer, components, dict(scheduler.config), (transformer.config.in_channels, h, w),
                   1.0 if sigma_data is None else sigma_data)


class FluxDenoiser(FlowDenoiser):
    """A Flux transformer (diffusers ``FluxTransformer2DModel``, Black Forest Labs 2024) in its VAE's latent space.

    Samples are unpacked latents ``[B, C, h, w]`` (what ``FluxPipeline`` draws its noise in); the
    network sees them packed into 2x2 patches, ``[B, h w / 4, 4 C]``, with the pipeline's position
    ids, and takes the flow time ``t`` itself (``FluxPipeline`` passes ``timestep / 1000``).
    Guidance-distilled models (FLUX.1-dev, ``guidance_embeds``) take a guidance strength as an
    input: :attr:`embedded_guidance`, fixed for the teacher and its students (the pipeline call's
    ``guidance_scale``, 3.5 by default). Classifier-free guidance on top (:class:`CFGDenoiser` with
    w) equals ``FluxPipeline``'s ``true_cfg_scale = 1 + w`` with ``negative_prompt=""``.
    Sampling grids are ``FluxPipeline``'s: ``sigmas = linspace(1, 1/K, K)``, shifted by the
    scheduler's resolution-dependent ``mu``.

    Args:
        model, components, scheduler_config, sample_shape, sigma_data: as :class:`FlowDenoiser`
            (``sample_shape`` is the unpacked ``(C, h, w)``).
        embedded_guidance: the guidance input of a guidance-distilled transformer (None: the
            pipeline's default, :attr:`DEFAULT_EMBEDDED_GUIDANCE`); refused for a transformer without one.
    """

    #: ``FluxPipeline.__call__``'s default ``guidance_scale``
    DEFAULT_EMBEDDED_GUIDANCE = 3.5

    def __init__(self, model: nn.Module, components: PipelineComponents, scheduler_config: dict,
                 sample_shape: tuple[int, ...], sigma_data: float = 1.0, embedded_guidance: float | None = None):
        super().__init__(model, components, scheduler_config, sample_shape, sigma_data)
        takes = bool(getattr(model.config, "guidance_embeds", False))
        if embedded_guidance is not None and not takes:
            raise ValueError("teacher.embedded_guidance: this Flux transformer has no guidance input (guidance_embeds is "
                             "false, as in FLUX.1-schnell); remove the key")
        #: the guidance input of a guidance-distilled transformer (None: it has none)
        self.embedded_guidance = (float(self.DEFAULT_EMBEDDED_GUIDANCE if embedded_guidance is None else embedded_guidance)
                                  if takes else None)
        c, h, w = self.sample_shape
        if h % 2 or w % 2:
            raise ValueError(f"Flux latents must have an even height and width (2x2 packing), got {h}x{w}")

    DEFAULT_MAX_SHIFT = 1.15  # FluxPipeline's calculate_shift call

    def image_seq_len(self) -> int:
        """The packed sequence length (2x2 patches), as ``FluxPipeline`` computes its shift from it."""
        c, h, w = self.sample_shape
        return (h // 2) * (w // 2)

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """``FluxPipeline``'s ``num_steps``-step grid: ``set_timesteps(sigmas=linspace(1, 1/K, K), mu=mu)``."""
        import numpy as np

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=self.dynamic_shift_mu())
        return flow_sigma_of_t(scheduler.sigmas[:-1].to(torch.float64))

    @staticmethod
    def pack(x: Tensor) -> Tensor:
        """``[B, C, h, w]`` -> ``[B, h w / 4, 4 C]`` (``FluxPipeline._pack_latents``)."""
        b, c, h, w = x.shape
        return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)

    @staticmethod
    def unpack(x: Tensor, h: int, w: int) -> Tensor:
        """The inverse of :meth:`pack`: ``[B, h w / 4, 4 C]`` -> ``[B, C, h, w]``."""
        b, n, d = x.shape
        return x.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)

    def fresh_noise(self, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Noise drawn as ``FluxPipeline``'s stochastic scheduler steps draw it, in the packed layout
        ``[B, h w / 4, 4 C]``, then unpacked to ``like``'s ``[B, C, h, w]``."""
        b, c, h, w = like.shape
        packed = torch.randn((b, (h // 2) * (w // 2), 4 * c), generator=generator, dtype=like.dtype, device="cpu")
        return self.unpack(packed, h, w).to(like.device)

    def velocity(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        b, c, h, w = x_t.shape
        dtype = self._model_dtype(x_t)
        kwargs = self.network_kwargs(cond, dtype)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x_t.device, dtype=dtype)  # FluxPipeline._prepare_latent_image_ids
        img_ids[..., 1] += torch.arange(h // 2, device=x_t.device, dtype=dtype)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x_t.device, dtype=dtype)[None, :]
        txt_ids = torch.zeros(kwargs["encoder_hidden_states"].shape[1], 3, device=x_t.device, dtype=dtype)
        guidance = (None if self.embedded_guidance is None
                    else torch.full((b,), self.embedded_guidance, device=x_t.device, dtype=torch.float32))
        t_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        out = self.model(hidden_states=self.pack(x_t.to(dtype)), timestep=t.to(t_dtype), guidance=guidance,
                         img_ids=img_ids.reshape(-1, 3), txt_ids=txt_ids, return_dict=False, **kwargs)[0]
        return self.unpack(out, h, w)

    @classmethod
    def from_pipeline(cls, pipe, source: str | os.PathLike = "", *, sigma_data: float | None = None,
                      max_sequence_length: int | None = None, image_size: int | None = None,
                      embedded_guidance: float | None = None) -> "FluxDenoiser":
        """The denoiser of a loaded ``FluxPipeline``; ``max_sequence_length`` (unset: 512) and
        ``image_size`` (pixels, square; unset: the pipeline's default) as the pipeline call's."""
        transformer, scheduler = pipe.transformer, pipe.scheduler
        if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"{source}: a flow-matching pipeline needs a FlowMatchEulerDiscreteScheduler, got {type(scheduler).__name__}")
        components = FluxComponents(pipe, str(source), max_sequence_length, image_size)
        h = 2 * (components.image_size[0] // (pipe.vae_scale_factor * 2))
        w = 2 * (components.image_size[1] // (pipe.vae_scale_factor * 2))
        return cls(transformer, components, dict(scheduler.config), (transformer.config.in_channels // 4, h, w),
                   1.0 if sigma_data is None else sigma_data, embedded_guidance)


class SanaComponents(SequenceComponents):
    """A SANA pipeline's frozen parts (Xie et al. 2025): the deep-compression autoencoder
    (``AutoencoderDC``, 32x; scaling factor, no shift) and the Gemma-2 text encoder, whose token
    states and attention mask are the conditioning. Prompts are encoded as ``SanaPipeline``
    encodes them by default: behind its "complex human instruction" (the call's default), the
    first token and the last ``max_sequence_length - 1`` kept; the unconditional input is the empty
    negative prompt's, encoded without the instruction."""

    TEXT_PARTS = ("text_encoder", "tokenizer")
    DEFAULT_MAX_SEQUENCE_LENGTH = 300  # SanaPipeline.__call__'s

    def __init__(self, pipe, source: str = "", max_sequence_length: int | None = None):
        import inspect

        super().__init__(pipe, source, max_sequence_length)
        #: the pipeline call's default instruction placed before every prompt
        self.complex_human_instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cond, mask, uncond, mask_u = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=True, negative_prompt="", device=device,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.complex_human_instruction)
        return ({"encoder_hidden_states": cond.float().cpu(), "encoder_attention_mask": mask.cpu()},
                {"encoder_hidden_states": uncond[:1].float().cpu(), "encoder_attention_mask": mask_u[:1].cpu()})

    def _fingerprint_extra(self) -> str:
        return f"{super()._fingerprint_extra()}/sana/" + "\n".join(self.complex_human_instruction or [])


class SanaDenoiser(FlowDenoiser):
    """A SANA transformer (diffusers ``SanaTransformer2DModel``; Xie et al. 2025) in its DC-AE's latent space.

    ``cond`` holds ``encoder_hidden_states`` ``[B, L, D]`` and ``encoder_attention_mask`` ``[B, L]``;
    the network takes ``timestep = 1000 t`` times its ``timestep_scale``. SANA's pipelines sample with
    ``DPMSolverMultistepScheduler`` in flow mode (``flow_shift``): the denoiser's grid, sampler and the
    students' exports use the ``FlowMatchEulerDiscreteScheduler`` of the same shift instead (Euler,
    t from 1; ``SanaPipeline`` runs with it). CFG at w equals the pipeline's ``guidance_scale = 1 + w``."""

    def velocity(self, x_t: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        t_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        timestep = t.to(t_dtype) * self.num_train_timesteps * float(getattr(self.model.config, "timestep_scale", 1.0))
        dtype = self._model_dtype(x_t)
        out = self.model(x_t.to(dtype), timestep=timestep, return_dict=False, **self.network_kwargs(cond, dtype))[0]
        if out.shape[1] == 2 * x_t.shape[1]:  # a learned variance: the pipeline keeps the first half
            out = out[:, : x_t.shape[1]]
        return out

    @staticmethod
    def euler_scheduler_config(scheduler) -> dict:
        """The ``FlowMatchEulerDiscreteScheduler`` config equivalent to a SANA pipeline's scheduler."""
        name, cfg = type(scheduler).__name__, scheduler.config
        if name == "FlowMatchEulerDiscreteScheduler":
            return dict(cfg)
        if name == "DPMSolverMultistepScheduler" and cfg.get("use_flow_sigmas") and cfg.get("prediction_type") == "flow_prediction":
            return {"num_train_timesteps": cfg.num_train_timesteps, "shift": float(cfg.flow_shift)}
        raise ValueError(f"a SANA pipeline needs a flow-matching scheduler (FlowMatchEulerDiscreteScheduler, or "
                         f"DPMSolverMultistepScheduler with use_flow_sigmas and flow_prediction), got {name}")

    @classmethod
    def from_pipeline(cls, pipe, source: str | os.PathLike = "", *, sigma_data: float | None = None,
                      max_sequence_length: int | None = None) -> "SanaDenoiser":
        """The denoiser of a loaded ``SanaPipeline``; ``max_sequence_length`` as the pipeline call's (unset: 300)."""
        try:
            config = cls.euler_scheduler_config(pipe.scheduler)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        transformer = pipe.transformer
        s = transformer.config.sample_size
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return cls(transformer, SanaComponents(pipe, str(source), max_sequence_length), config,
                   (transformer.config.in_channels, h, w), 1.0 if sigma_data is None else sigma_data)


def is_sana(pipe) -> bool:
    """Whether a loaded pipeline is a SANA text-to-image pipeline (``SanaPipeline``)."""
    return type(pipe).__name__ == "SanaPipeline" and getattr(pipe, "transformer", None) is not None


def is_flux(pipe) -> bool:
    """Whether a loaded pipeline is a Flux text-to-image pipeline (``FluxPipeline``)."""
    return type(pipe).__name__ == "FluxPipeline" and getattr(pipe, "transformer", None) is not None


def is_flow_text_to_image(pipe) -> bool:
    """Whether a loaded pipeline is a flow-matching text-to-image pipeline this module handles (SD3 family, Flux, SANA)."""
    return is_flux(pipe) or is_sana(pipe) or (type(pipe).__name__.startswith("StableDiffusion3") and getattr(pipe, "transformer", None) is not None)


def flow_denoiser_from_pipeline(pipe, source: str | os.PathLike = "", *, image_size: int | None = None,
                                embedded_guidance: float | None = None, **kwargs) -> FlowDenoiser:
    """:class:`FluxDenoiser`, :class:`SanaDenoiser` or :class:`FlowDenoiser` (SD3) of a loaded flow
    pipeline; ``image_size`` and ``embedded_guidance`` are Flux's (refused, naming the key, for other pipelines)."""
    if is_flux(pipe):
        return FluxDenoiser.from_pipeline(pipe, source, image_size=image_size, embedded_guidance=embedded_guidance, **kwargs)
    for key, value in (("image_size", image_size), ("embedded_guidance", embedded_guidance)):
        if value is not None:
            raise ValueError(f"teacher.{key}: applies to Flux teachers; {source} is a {type(pipe).__name__}; remove the key")
    return (SanaDenoiser if is_sana(pipe) else FlowDenoiser).from_pipeline(pipe, source, **kwargs)
