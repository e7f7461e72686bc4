"""A diffusers pipeline for distilled few-step students, self-contained (torch + diffusers only).

This file is copied next to every exported student that no stock diffusers pipeline covers, so
that plain diffusers can load the folder without distilldiff installed::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("my-student", trust_remote_code=True)
    images = pipe(batch_size=16, class_labels=[0, 1, 2, 3] * 4).images

With distilldiff installed no custom code needs to be trusted: call
``DistillDiffPipeline.from_pretrained("my-student")`` with the class from ``distilldiff.pipelines``.
(diffusers checks the import lines of this file before running it, so it has none beyond
torch and diffusers, not even in this docstring.)

The student is a VP network (a diffusers ``UNet2DModel``, or :class:`GuidedUNet2DModel` for a
guidance-conditioned student) evaluated at its own fixed noise levels ``sigmas`` (EDM's sigma
space, ``x_sigma = x0 + sigma * eps``). Each step feeds the network ``x_sigma / sqrt(1 + sigma^2)``
at the (fractional) training timestep of ``sigma``, turns its output into an x0 estimate, then
either moves deterministically to the next noise level (``sampler="ddim"``) or re-noises the
estimate with fresh noise (``sampler="multistep"``, consistency models). The computation is the
same, operation by operation, as distilldiff's own sampler, so both give the same images for the
same noise.

This module must not import distilldiff.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor, nn

from diffusers import DDPMScheduler, DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

SAMPLERS = ("ddim", "multistep")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class GuidanceEmbedding(TimestepEmbedding):
    """The guidance weight ``w`` as a vector to add to a network's conditioning embedding.

    ``gain * MLP(sinusoidal_features(w * scale))``: the features are diffusers' timestep features
    (frequencies 1 down to 1e-4), the MLP is diffusers' ``TimestepEmbedding`` (linear, SiLU, linear)
    and its last layer starts at zero, so the output is 0 for every ``w`` at first.

    ``scale`` sets how fast the features turn with ``w``: at ``scale = 1`` the fastest feature has a
    period of 2 pi in ``w``, so every feature is smooth over a guidance range like [0, 4] (the target,
    ``D_c + w (D_c - D_u)``, is affine in ``w``). ``gain`` multiplies the output at run time: under
    Adam every weight moves by about the learning rate per step whatever its gradient's size, so the
    zero-started output layer learns ``gain`` times faster than the weights copied from the teacher
    (run-time weight scaling, as in the "equalized learning rate" of Karras et al. 2018).

    Args:
        out_dim: width of the embedding it is added to.
        features: number of sinusoidal features of ``w``.
        scale: ``w`` is multiplied by this before the sinusoidal features.
        gain: the output is multiplied by this.
    """

    def __init__(self, out_dim: int, features: int = 64, scale: float = 1.0, gain: float = 1.0):
        super().__init__(features, out_dim)
        self.proj = Timesteps(features, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.scale = float(scale)
        self.gain = float(gain)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)

    def forward(self, w: Tensor) -> Tensor:
        """``[B]`` guidance weights -> ``[B, out_dim]``."""
        dtype = self.linear_1.weight.dtype
        return self.gain * super().forward(self.proj(w.float() * self.scale).to(dtype))


class GuidedUNet2DModel(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` that also takes the guidance scale ``w`` as an input (guidance distillation).

    ``w`` is embedded like a timestep (:class:`GuidanceEmbedding`: sinusoidal features of
    ``w * guidance_embed_scale``, an MLP whose last layer starts at zero, times
    ``guidance_embed_gain``) and added to the class embedding, which the inner UNet receives through
    ``class_embed_type="identity"``. At initialisation the model therefore equals the
    class-conditional UNet it was built from, for every ``w``.

    The defaults of ``guidance_embed_scale`` (100) and ``guidance_embed_gain`` (1) are those of
    students saved before these options existed, so that their folders load unchanged; new
    students get theirs from the objective (``objective.guidance_embed_scale`` / ``_gain``).

    Args:
        unet_config: config of the inner ``UNet2DModel`` (with ``class_embed_type="identity"``).
        num_class_embeds: size of the class-embedding table (``None``: unconditional).
        guidance_embed_dim: width of the sinusoidal features of ``w``.
        guidance_embed_scale: ``w`` is multiplied by this before the sinusoidal features.
        guidance_embed_gain: the ``w`` embedding is multiplied by this (a learning-rate multiplier
            for the zero-started layer under Adam).
    """

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        num_class_embeds: int | None = None,
        guidance_embed_dim: int = 64,
        guidance_embed_scale: float = 100.0,
        guidance_embed_gain: float = 1.0,
    ):
        super().__init__()
        cfg = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        cfg.update(class_embed_type="identity", num_class_embeds=None)
        self.unet = UNet2DModel(**cfg)
        emb_dim = self.unet.time_embedding.linear_2.out_features
        self.class_embedding = nn.Embedding(num_class_embeds, emb_dim) if num_class_embeds else None
        self.guidance_embedding = GuidanceEmbedding(emb_dim, guidance_embed_dim, guidance_embed_scale, guidance_embed_gain)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, **kwargs: Any) -> "GuidedUNet2DModel":
        """Wrap a trained class-conditional (or unconditional) ``UNet2DModel``, copying its weights."""
        if unet.config.class_embed_type is not None:
            raise ValueError(f"expected a UNet2DModel with an nn.Embedding class table or none, got class_embed_type={unet.config.class_embed_type!r}")
        model = cls(dict(unet.config), num_class_embeds=unet.config.num_class_embeds, **kwargs)
        state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
        model.unet.load_state_dict(state)
        if model.class_embedding is not None:
            model.class_embedding.load_state_dict(unet.class_embedding.state_dict())
        model = model.to(unet.device)
        return model if unet.dtype == torch.float32 else model.to(unet.dtype)

    @property
    def sample_size(self):
        return self.unet.config.sample_size

    def forward(self, sample: Tensor, timestep: Tensor, class_labels: Tensor | None = None, guidance_scale: Tensor | float = 0.0, return_dict: bool = True):
        """``sample`` ``[B, C, H, W]``, ``timestep`` ``[B]``, ``class_labels`` ``[B]``, ``guidance_scale`` scalar or ``[B]``."""
        w = torch.as_tensor(guidance_scale, device=sample.device, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        emb = self.guidance_embedding(w)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels")
            emb = emb + self.class_embedding(class_labels).to(self.dtype)
        return self.unet(sample, timestep, class_labels=emb, return_dict=return_dict)


def log_sigma_timestep(sigma: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Fractional training timestep of each ``sigma``: linear interpolation in log-sigma (float64)."""
    a = alphas_cumprod.to(device=sigma.device, dtype=torch.float64)
    log_sigmas = ((1 - a) / a).sqrt().log()
    log_sigma = sigma.to(torch.float64).log().clamp(log_sigmas[0], log_sigmas[-1])
    hi = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous()).clamp(1, len(log_sigmas) - 1)
    lo = hi - 1
    w = (log_sigma.reshape(-1) - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return (lo + w).reshape(sigma.shape)


class DistillDiffPipeline(DiffusionPipeline):
    """Few-step sampling of a distilled student at its own noise levels.

    Args:
        unet: ``UNet2DModel`` or :class:`GuidedUNet2DModel` (VP parameterisation).
        scheduler: ``DDPMScheduler`` with the teacher's noise schedule (``alphas_cumprod``) and the
            student network's ``prediction_type`` (which may differ from the teacher's).
        sigmas: the student's decreasing noise levels, one per network evaluation.
        sampler: ``"ddim"`` (deterministic) or ``"multistep"`` (re-noise between steps).
        num_classes: number of classes of a class-conditional student, else ``None``.
        guidance_scale: default guidance scale ``w`` of a guidance-conditioned student, else ``None``.
        consistency: ``[sigma_min, sigma_data]`` of a consistency student's boundary-condition
            parameterisation ``f = c_skip x + (c_out / c_out^E) (D - c_skip^E x)``, else ``None``.
        clip_sample: clip every evaluation's x0 estimate to [-1, 1] (as a diffusers scheduler's ``clip_sample``).
    """

    model_cpu_offload_seq = "unet"

    def __init__(
        self,
        unet: nn.Module,
        scheduler: DDPMScheduler,
        sigmas: list | None = None,
        sampler: str = "ddim",
        num_classes: int | None = None,
        guidance_scale: float | None = None,
        consistency: list | None = None,
        clip_sample: bool = False,
    ):
        super().__init__()
        if not sigmas:
            raise ValueError("sigmas: the student's noise levels are required")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {SAMPLERS}, got {sampler!r}")
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler.prediction_type {scheduler.config.prediction_type!r} is not one of {PREDICTION_TYPES}")
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(
            sigmas=[float(s) for s in sigmas], sampler=sampler, num_classes=num_classes,
            guidance_scale=guidance_scale, consistency=None if consistency is None else [float(c) for c in consistency],
            clip_sample=bool(clip_sample),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> "DistillDiffPipeline":
        """Load an exported student folder (or hub id) with this class, running no code from the folder.

        Weights are read from safetensors only. ``torch_dtype`` and ``device`` may be passed.
        """
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            folder = DiffusionPipeline.download(folder, **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")})
        with open(os.path.join(folder, "model_index.json")) as f:
            index = json.load(f)
        unet_cls = {"UNet2DModel": UNet2DModel, "GuidedUNet2DModel": GuidedUNet2DModel}.get(index["unet"][1])
        if unet_cls is None:
            raise ValueError(f"{folder}/model_index.json: unsupported unet class {index['unet'][1]!r}")
        dtype = kwargs.get("torch_dtype")
        unet = unet_cls.from_pretrained(os.path.join(folder, "unet"), use_safetensors=True, **({"torch_dtype": dtype} if dtype else {}))
        scheduler = DDPMScheduler.from_pretrained(os.path.join(folder, "scheduler"))
        keys = ("sigmas", "sampler", "num_classes", "guidance_scale", "consistency", "clip_sample")
        pipe = cls(unet, scheduler, **{k: index[k] for k in keys if k in index})
        return pipe.to(kwargs["device"]) if kwargs.get("device") else pipe

    @property
    def num_steps(self) -> int:
        """The student's number of network evaluations per sample."""
        return len(self.config.sigmas)

    def denoise(self, x: Tensor, sigma: Tensor, cond: dict) -> Tensor:
        """x0 estimate at noise level ``sigma`` (``[B]``) for sigma-space samples ``x`` ``[B, C, H, W]``."""
        s = sigma.reshape(-1, 1, 1, 1)
        x_t = x / (1 + s**2).sqrt()
        t_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        t = log_sigma_timestep(sigma.detach(), self.scheduler.alphas_cumprod).to(t_dtype)
        out = self.unet(x_t, t, **cond)
        out = getattr(out, "sample", out)
        if out.shape[1] == 2 * x.shape[1]:  # learned variance: keep the mean prediction
            out = out[:, : x.shape[1]]
        out = out.to(x.dtype)
        a = 1 / (1 + s**2)
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            x0 = (x_t - (1 - a).sqrt() * out) / a.sqrt()
        elif kind == "v_prediction":
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * out
        else:
            x0 = out
        if self.config.consistency is None:
            return x0
        s0, sd = self.config.consistency  # consistency models' boundary condition f(x, s0) = x
        c_skip = sd**2 / ((s - s0) ** 2 + sd**2)
        c_out = (s - s0) * sd / (s**2 + sd**2).sqrt()
        e_skip = sd**2 / (s**2 + sd**2)
        e_out = s * sd / (s**2 + sd**2).sqrt()
        return c_skip * x + (c_out / e_out) * (x0 - e_skip * x)

    def _conditioning(self, batch_size: int, class_labels, guidance_scale: float | None, device) -> dict:
        cond: dict[str, Any] = {}
        num_classes = self.config.num_classes
        if num_classes is not None:
            if class_labels is None:
                class_labels = torch.arange(batch_size) % num_classes
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if labels.numel() == 1:
                labels = labels.expand(batch_size)
            if labels.numel() != batch_size:
                raise ValueError(f"class_labels has {labels.numel()} entries for batch_size={batch_size}")
            if bool(((labels < 0) | (labels >= num_classes)).any()):
                raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {labels.tolist()}")
            cond["class_labels"] = labels.to(device)
        elif class_labels is not None:
            raise ValueError("class_labels given, but this student is not class-conditional")
        if self.config.guidance_scale is not None:
            w = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
            cond["guidance_scale"] = torch.full((batch_size,), w, device=device)
        elif guidance_scale is not None:
            raise ValueError("guidance_scale given, but this student has no guidance input")
        return cond

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | Tensor | None = None,
        guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Draw ``batch_size`` images.

        Args:
            batch_size: number of images.
            class_labels: one label, or one per image (class-conditional students; default: 0, 1, 2, ...).
            guidance_scale: guidance scale ``w`` of a guidance-conditioned student (default: its own).
            num_inference_steps: must be ``None`` or the student's own step count (``self.num_steps``).
            generator: torch generator(s) for the initial and (multistep) re-noising noise.
            latents: ``[B, C, H, W]`` standard-normal initial noise, instead of drawing it.
            output_type: ``"pil"``, ``"np"`` (``[B, H, W, C]`` in [0, 1]) or ``"pt"`` (``[B, C, H, W]`` in [0, 1]).
        """
        if num_inference_steps not in (None, self.num_steps):
            raise ValueError(f"this student was distilled for {self.num_steps} step(s); got num_inference_steps={num_inference_steps}")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        unet_cfg = self.unet.config if isinstance(self.unet, UNet2DModel) else self.unet.unet.config
        size = unet_cfg.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, unet_cfg.in_channels, *size)
        device, dtype = self._execution_device, self.unet.dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {shape}")
        cond = self._conditioning(batch_size, class_labels, guidance_scale, device)

        sigmas = torch.tensor(self.config.sigmas, dtype=torch.float64).to(device=device, dtype=latents.dtype)
        x = latents.to(device) * (1 + sigmas[0] ** 2).sqrt()
        for i in self.progress_bar(range(len(sigmas))):
            x0 = self.denoise(x, sigmas[i].expand(batch_size), cond)
            if self.config.clip_sample:
                x0 = x0.clamp(-1, 1)
            if i + 1 == len(sigmas):
                x = x0
            elif self.config.sampler == "ddim":
                x = x0 + (sigmas[i + 1] / sigmas[i]) * (x - x0)
            else:
                fresh = randn_tensor(shape, generator=generator, device=device, dtype=x.dtype)
                x = x0 + sigmas[i + 1] * fresh

        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
