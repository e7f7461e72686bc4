"""Load a run, a student folder or a teacher and draw samples from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .images import save_grid
from .samplers import ddim_sample
from .students import OneStepGenerator
from .teachers import CFGDenoiser, Denoiser, VPDenoiser, load_teacher

STUDENT_INFO_FILE = "distilldiff_student.json"


@dataclass
class Sampler:
    """Draws images in [-1, 1] from a loaded model.

    Attributes:
        denoiser: the underlying (student or teacher) denoiser.
        draw: ``(noise, cond) -> images``.
        description: one line saying what is sampled and how.
    """

    denoiser: Denoiser
    draw: Callable[[Tensor, dict], Tensor]
    description: str
    device: torch.device

    @torch.no_grad()
    def sample(self, num: int, seed: int = 0, class_label: int | None = None, batch_size: int = 256) -> Tensor:
        """``[num, C, H, W]`` samples on the CPU; classes cycle 0, 1, ... unless ``class_label`` is set."""
        return torch.cat(list(self.batches(num, seed, class_label, batch_size)))

    @torch.no_grad()
    def batches(self, num: int, seed: int = 0, class_label: int | None = None, batch_size: int = 256):
        """Yield ``num`` samples in CPU batches of ``batch_size`` (the same images as :meth:`sample`)."""
        g = torch.Generator().manual_seed(seed)
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            noise = torch.randn((n, *self.denoiser.sample_shape), generator=g).to(self.device)
            cond = {}
            if self.denoiser.num_classes is not None:
                labels = torch.arange(start, start + n) % self.denoiser.num_classes if class_label is None else torch.full((n,), class_label)
                cond["class_labels"] = labels.to(self.device)
            elif class_label is not None:
                raise ValueError("--class-label given, but the model is not class-conditional")
            yield self.draw(noise, cond).float().cpu()

    def save_grid(self, num: int, path: str | Path, seed: int = 0, class_label: int | None = None) -> Path:
        """Sample ``num`` images and write them as one PNG grid."""
        return save_grid(self.sample(num, seed, class_label), path)


def _load_student(folder: Path, device: torch.device) -> Sampler:
    from diffusers import DDPMScheduler, UNet2DModel

    meta = json.loads((folder / STUDENT_INFO_FILE).read_text())
    if meta.get("kind") != "one_step":
        raise ValueError(f"{folder / STUDENT_INFO_FILE}: unsupported student kind {meta.get('kind')!r}")
    unet = UNet2DModel.from_pretrained(str(folder / "unet"), use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    size = unet.config.sample_size
    den = VPDenoiser(
        unet, scheduler.alphas_cumprod, meta["prediction_type"], (unet.config.in_channels, size, size),
        meta["sigma_data"], meta["num_classes"], meta["null_class"],
    )
    gen = OneStepGenerator(den, meta["init_sigma"]).to(device).eval()
    return Sampler(den, lambda z, cond: gen(z, **cond), f"one-step {meta.get('objective', '')} student, sigma_init={meta['init_sigma']}", device)


def load_sampler(model: str, steps: int | None = None, guidance_scale: float = 0.0, device: str | None = None) -> Sampler:
    """A :class:`Sampler` for a run folder, a student folder, or a teacher (folder, hub id, ``builtin:NAME``).

    Teachers sample with deterministic DDIM on their own timestep grid (``steps``, default 50),
    optionally with classifier-free guidance weight ``guidance_scale``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(model)
    if (path / "student" / STUDENT_INFO_FILE).is_file():
        path = path / "student"
    if (path / STUDENT_INFO_FILE).is_file():
        if steps not in (None, 1):
            raise ValueError(f"{model}: a one-step student samples in 1 step, got --steps {steps}")
        return _load_student(path, dev)
    if path.is_dir() and (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{model}: run folder has no student yet (it is written at the first checkpoint)")
    teacher = load_teacher(model, guidance_scale).to(dev).eval()
    steps = steps or 50
    inner = teacher.inner if isinstance(teacher, CFGDenoiser) else teacher
    sigmas = inner.discrete_sigmas(steps, "trailing") if isinstance(inner, VPDenoiser) else None
    if sigmas is None:
        raise ValueError(f"{model}: sampling supports DDPM-family teachers")
    desc = f"teacher, {steps}-step DDIM" + (f", guidance w={guidance_scale}" if guidance_scale else "")
    return Sampler(inner, lambda z, cond: ddim_sample(teacher, z, sigmas, **cond), desc, dev)
