"""Adapter for diffusers pixel models of the DDPM family (epsilon / v / sample prediction)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..tensors import append_dims
from .base import Denoiser
from .conversions import LogSigmaInterpolator, vp_scale_input, vp_sigma_from_alpha_bar, vp_x0_from_output

TEACHER_INFO_FILE = "distilldiff_teacher.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class VPDenoiser(Denoiser):
    """Wraps a VP network ``model(x_t, t, **cond)`` (e.g. a diffusers ``UNet2DModel``) as ``D(x, sigma)``.

    Conversion (Karras et al. 2022, Table 1, VP column; docs/math.md): ``a = 1 / (1 + sigma^2)``,
    ``x_t = x_sigma / sqrt(1 + sigma^2)``, the timestep is interpolated in log-sigma between the
    scheduler's discrete steps (as k-diffusion's ``DiscreteSchedule``), and the model output is
    turned into x0 according to ``prediction_type``. A network kept in another dtype than the
    sample (a frozen teacher in bfloat16) receives its input in its own dtype; the x0 estimate
    comes back in the sample's dtype.

    Args:
        model: network called as ``model(x_t [B, C, H, W], t [B], **cond)``; its return value may be a
            tensor or an object with ``.sample`` (diffusers). Learned-variance outputs with twice the
            input channels are split and the variance half dropped.
        alphas_cumprod: ``[T]`` cumulative alpha products of the training scheduler.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        sample_shape: ``(C, H, W)`` of one sample.
        sigma_data: data standard deviation used by EDM-style losses.
        num_classes, null_class: class-conditioning metadata (``null_class`` enables CFG).
    """

    def __init__(
        self,
        model: nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: str,
        sample_shape: tuple[int, ...],
        sigma_data: float = 0.5,
        num_classes: int | None = None,
        null_class: int | None = None,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
        self.model = model
        self.prediction_type = prediction_type
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        self.schedule = LogSigmaInterpolator(vp_sigma_from_alpha_bar(alphas_cumprod))
        self.num_train_timesteps = alphas_cumprod.shape[0]
        self.sigma_min = float(self.schedule.sigmas[0])
        self.sigma_max = float(self.schedule.sigmas[-1])
        self.sigma_data = float(sigma_data)
        self.sample_shape = tuple(sample_shape)
        self.num_classes = num_classes
        self.null_class = null_class
        #: config of the scheduler the model was loaded with (written next to exported students)
        self.scheduler_config: dict | None = None

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return (1 + sigma**2).sqrt()

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """Fractional training timestep of each noise level (integer on the scheduler's grid)."""
        return self.schedule.timestep(sigma)

    def timestep_to_sigma(self, timestep: Tensor) -> Tensor:
        """Noise level of a (possibly fractional) training timestep."""
        return self.schedule.sigma(torch.as_tensor(timestep, dtype=torch.float64))

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        s = append_dims(sigma, x.ndim)
        x_t = vp_scale_input(x, s)
        t_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # 999 stays 999
        t = self.sigma_to_timestep(sigma).to(t_dtype)  # not detached: sCM's JVP differentiates through the timestep
        model_dtype = getattr(self.model, "dtype", x_t.dtype)
        model_dtype = model_dtype if isinstance(model_dtype, torch.dtype) else x_t.dtype
        out = self.model(x_t.to(model_dtype), t, **self.network_kwargs(cond, model_dtype))
        out = getattr(out, "sample", out)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean prediction
            out = out[:, : x.shape[1]]
        alpha_bar = 1 / (1 + s**2)
        return vp_x0_from_output(x_t, out.to(x.dtype), alpha_bar, self.prediction_type)

    @property
    def takes_guidance_scale(self) -> bool:
        """Whether the network takes the guidance weight ``w`` (``cond["guidance_scale"]``) as an input."""
        from ..pipelines import GuidedUNet2DModel

        return isinstance(self.model, GuidedUNet2DModel)

    def add_guidance_input(self, guidance_embed_scale: float | None = None, guidance_embed_gain: float | None = None,
                           defaults: tuple[float, float] = (100.0, 1.0)) -> None:
        """Replace the network by a :class:`~distilldiff.pipelines.GuidedUNet2DModel` around it (a
        zero-initialised embedding of ``w`` added to the class embedding: same outputs at every w at
        first), with the given embedding scale and gain (unset: ``defaults``)."""
        from ..pipelines import GuidedUNet2DModel

        scale = defaults[0] if guidance_embed_scale is None else guidance_embed_scale
        gain = defaults[1] if guidance_embed_gain is None else guidance_embed_gain
        self.model = GuidedUNet2DModel.from_unet(self.model, guidance_embed_scale=scale, guidance_embed_gain=gain)

    def network_kwargs(self, cond: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
        """The network's keyword arguments for conditioning ``cond`` (here: ``cond`` itself); ``dtype``
        is the network's. Text-conditioned subclasses cast embeddings and group added conditions."""
        return cond

    def sampling_sigmas(self, num_steps: int) -> Tensor:
        """The decreasing noise levels of ``num_steps``-step sampling: DDIM's "trailing" timesteps."""
        return self.discrete_sigmas(num_steps, "trailing")

    def discrete_sigmas(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> Tensor:
        """Decreasing ``[num_steps]`` noise levels of diffusers' DDIM timestep spacing.

        ``spacing`` is ``"trailing"`` (starts at the last training step), ``"leading"`` or
        ``"linspace"``, computed as diffusers' ``DDIMScheduler.set_timesteps`` does.
        """
        ts = ddim_timesteps(self.num_train_timesteps, num_steps, spacing, steps_offset)
        return self.schedule.sigmas[torch.as_tensor(ts)]

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        sigma_data: float | None = None,
        num_classes: int | None = None,
        null_class: int | None = None,
        prediction_type: str | None = None,
        **load_kwargs: Any,
    ) -> "VPDenoiser":
        """Load a diffusers pixel pipeline folder or hub id (UNet + DDPM-family scheduler).

        Local folders and hub ids go through the same ``diffusers`` ``from_pretrained`` code. An
        optional ``distilldiff_teacher.json`` next to ``model_index.json`` supplies
        ``sigma_data``, ``num_classes`` and ``null_class``; keyword arguments override it.
        Only safetensors weights are read.
        """
        pipe = load_pipeline(path, **load_kwargs)
        return cls.from_pipeline(pipe, path, sigma_data=sigma_data, num_classes=num_classes, null_class=null_class,
                                 prediction_type=prediction_type)

    @classmethod
    def from_pipeline(
        cls,
        pipe,
        path: str | os.PathLike,
        *,
        sigma_data: float | None = None,
        num_classes: int | None = None,
        null_class: int | None = None,
        prediction_type: str | None = None,
    ) -> "VPDenoiser":
        """The denoiser of a loaded pixel pipeline ``pipe`` (loaded from ``path``); see :meth:`from_pretrained`."""
        unet = getattr(pipe, "unet", None)
        scheduler = getattr(pipe, "scheduler", None)
        if unet is None or scheduler is None or not hasattr(scheduler, "alphas_cumprod"):
            raise ValueError(
                f"{path}: expected a pixel pipeline with a 'unet' and a DDPM-family 'scheduler' "
                f"(alphas_cumprod); got {type(pipe).__name__}"
            )
        info = _read_teacher_info(path)
        cfg = unet.config
        if prediction_type is None:
            prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if num_classes is None:
            num_classes = info.get("num_classes", cfg.get("num_class_embeds"))
        if null_class is None:
            null_class = info.get("null_class")
        if sigma_data is None:
            sigma_data = info.get("sigma_data", 0.5)
        sample_size = cfg.sample_size
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        denoiser = cls(
            unet,
            scheduler.alphas_cumprod,
            prediction_type,
            (cfg.in_channels, h, w),
            sigma_data=sigma_data,
            num_classes=num_classes,
            null_class=null_class,
        )
        denoiser.scheduler_config = dict(scheduler.config)
        return denoiser


def load_pipeline(path: str | os.PathLike, **load_kwargs: Any):
    """``DiffusionPipeline.from_pretrained(path)`` from safetensors, without progress bars (small pipelines load in no time)."""
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    bars = [m for m in (diffusers_logging, transformers_logging) if m.is_progress_bar_enabled()]
    for m in bars:
        m.disable_progress_bar()
    try:
        index = DiffusionPipeline.load_config(str(path), local_files_only=load_kwargs.get("local_files_only", False))
        # components saved as absent ([null, null], e.g. an SD3 pipeline without its T5 encoder) load as None,
        # which diffusers requires to be said explicitly for components it does not list as optional
        absent = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v == [None, None]}
        return DiffusionPipeline.from_pretrained(str(path), use_safetensors=True, **{**absent, **load_kwargs})
    finally:
        for m in bars:
            m.enable_progress_bar()


def _read_teacher_info(path: str | os.PathLike) -> dict:
    local = Path(path) / TEACHER_INFO_FILE
    if local.is_file():
        return json.loads(local.read_text())
    if not Path(path).exists():  # hub id: the file is optional
        try:
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(str(path), TEACHER_INFO_FILE)).read_text())
        except Exception:
            return {}
    return {}


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    """Decreasing integer timesteps, as diffusers' ``DDIMScheduler.set_timesteps`` spaces them."""
    import numpy as np

    T = num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, num_steps) * (T // num_steps)).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected 'trailing', 'leading' or 'linspace'")
    return [int(t) for t in ts]
