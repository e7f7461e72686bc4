"""Flow-matching latent text-to-image teachers (Stable Diffusion 3 family) behind ``D(x, sigma, **cond)``.

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


class SD3Components(PipelineComponents):
    """A Stable Diffusion 3 pipeline's frozen parts: VAE (scaling and shift factors), CLIP-L and
    CLIP-G with pooled outputs, T5 optional (left out, the pipeline feeds zeros in its place)."""

    TEXT_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
    #: the T5 sequence length of diffusers' ``StableDiffusion3Pipeline.__call__`` by default
    DEFAULT_MAX_SEQUENCE_LENGTH = 256

    def __init__(self, pipe, source: str = "", max_sequence_length: int | None = None):
        super().__init__(pipe, source)
        #: the T5 part's length (zeros without T5) the model was trained with: the pipeline call's ``max_sequence_length``
        self.max_sequence_length = int(max_sequence_length or self.DEFAULT_MAX_SEQUENCE_LENGTH)

    def _encode(self, prompts: list[str], device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        cond, uncond, pooled, pooled_u = self.pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=True,
                                                                 max_sequence_length=self.max_sequence_length)
        return ({"encoder_hidden_states": cond.float().cpu(), "pooled_projections": pooled.float().cpu()},
                {"encoder_hidden_states": uncond[:1].float().cpu(), "pooled_projections": pooled_u[:1].float().cpu()})

    def _fingerprint_extra(self) -> str:
        return f"max_sequence_length={self.max_sequence_length}"


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

    def dynamic_shift_mu(self) -> float:
        """The resolution-dependent shift of the default image size (diffusers' ``calculate_shift``)."""
        cfg = self.scheduler_config
        c, h, w = self.sample_shape
        patch = getattr(self.model.config, "patch_size", 1) or 1
        seq = (h // patch) * (w // patch)
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base_shift, max_shift = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16)
        m = (max_shift - base_shift) / (max_len - base_len)
        return seq * m + base_shift - m * base_len

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return self.denoise_scaled(x / append_dims(1 + sigma, x.ndim), sigma, **cond)

    def denoise_scaled(self, x_t: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        t = self.sigma_to_t(sigma)  # not detached: sCM's JVP differentiates through the time input
        t_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        timestep = t.to(t_dtype) * self.num_train_timesteps  # as the scheduler computes its timesteps (float32)
        model_dtype = getattr(self.model, "dtype", x_t.dtype)
        model_dtype = model_dtype if isinstance(model_dtype, torch.dtype) else x_t.dtype
        out = self.model(hidden_states=x_t.to(model_dtype), timestep=timestep, **self.network_kwargs(cond, model_dtype))
        v = getattr(out, "sample", out).to(x_t.dtype)
        return flow_x0_from_velocity(x_t, v, append_dims(t.to(x_t.dtype), x_t.ndim))

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


def is_flow_text_to_image(pipe) -> bool:
    """Whether a loaded pipeline is a flow-matching text-to-image pipeline this module handles (SD3 family)."""
    return type(pipe).__name__.startswith("StableDiffusion3") and getattr(pipe, "transformer", None) is not None
