"""Inference: load a run, a student folder or a teacher and draw images from it (the ``sample``
and ``fid`` commands). The sampling algorithms themselves live in :mod:`distilldiff.samplers`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from .export import STUDENT_INFO_FILE, load_checkpoint_ema, load_student, split_checkpoint, student_folder, with_levels
from .images import save_grid
from .samplers import base_denoiser, ddim_sample
from .teachers import CFGDenoiser, ClassLabels, Denoiser, TextConditioned, VPDenoiser, load_teacher


@dataclass
class Sampler:
    """Draws images in [-1, 1] from a loaded model.

    Attributes:
        denoiser: the underlying (student or teacher) denoiser.
        draw: ``(noise, cond, generator) -> images``.
        description: one line saying what is sampled and how.
        extra_cond: scalar conditioning passed to every call (``guidance_scale`` of a guided student).
        num_steps: network evaluations per sample (teachers: DDIM steps).
    """

    denoiser: Denoiser
    draw: Callable[[Tensor, dict, torch.Generator], Tensor]
    description: str
    device: torch.device
    extra_cond: dict = field(default_factory=dict)
    num_steps: int | None = None

    @torch.no_grad()
    def sample(self, num: int, seed: int = 0, class_label: int | None = None, batch_size: int = 256, prompt: str | None = None) -> Tensor:
        """``[num, C, H, W]`` images in [-1, 1] on the CPU; classes (prompts) cycle through the
        model's set unless ``class_label`` (``prompt``) is given."""
        return torch.cat(list(self.batches(num, seed, class_label, batch_size, prompt)))

    @torch.no_grad()
    def batches(self, num: int, seed: int = 0, class_label: int | None = None, batch_size: int = 256, prompt: str | None = None):
        """Yield ``num`` images in CPU batches of ``batch_size`` (the same images as :meth:`sample`).

        One CPU generator seeded with ``seed`` draws each batch's initial noise and then any noise
        the sampler needs (multistep students), in the order an exported pipeline draws them.
        Latent samples are decoded to pixels; every image is clipped to [-1, 1].
        """
        g = torch.Generator().manual_seed(seed)
        conditioning = self.denoiser.conditioning
        if class_label is not None and not isinstance(conditioning, ClassLabels):
            raise ValueError("--class-label given, but the model is not class-conditional")
        latent = base_denoiser(self.denoiser)  # through wrappers (consistency parameterisations)
        if prompt is not None and not isinstance(latent, TextConditioned):
            raise ValueError("--prompt given, but the model is not a text-to-image model")
        prompt_cond = latent.prompt_cond([prompt], self.device) if prompt is not None else None
        for start in range(0, num, batch_size):
            n = min(batch_size, num - start)
            noise = torch.randn((n, *self.denoiser.sample_shape), generator=g).to(self.device)
            if prompt_cond is not None:
                cond = conditioning.expand(prompt_cond, n, self.device)
            elif class_label is not None:
                cond = conditioning.of(class_label, n, self.device)
            else:
                cond = conditioning.grid(n, self.device, start)
            for key, value in self.extra_cond.items():
                cond[key] = torch.full((n,), value, device=self.device)
            # clipped to the images' range, as they are saved and scored (a raw output may leave it)
            yield self.denoiser.decode(self.draw(noise, cond, g)).float().clamp(-1, 1).cpu()

    def save_grid(self, num: int, path: str | Path, seed: int = 0, class_label: int | None = None, prompt: str | None = None) -> Path:
        """Sample ``num`` images and write them as one PNG grid."""
        return save_grid(self.sample(num, seed, class_label, prompt=prompt), path)


def _load_student(folder: Path, device: torch.device, guidance_scale: float | None, steps: int | None,
                  checkpoint: Path | None = None, sigmas: Sequence[float] | None = None) -> Sampler:
    student, meta = load_student(folder)
    if checkpoint is not None:
        load_checkpoint_ema(student, meta, checkpoint)
    student = with_levels(student, meta, folder, steps, sigmas).to(device)
    extra = {}
    if meta.get("guidance_scale") is not None:
        extra["guidance_scale"] = meta["guidance_scale"] if guidance_scale is None else float(guidance_scale)
    elif guidance_scale:
        raise ValueError(f"{folder}: --guidance-scale given, but this student has no guidance input")
    desc = f"{student.num_steps}-step {meta.get('objective', '')} student ({student.sampler})"
    if checkpoint is not None:
        desc += f" of update {meta['step']}"
    if extra:
        desc += f", w={extra['guidance_scale']}"
    return Sampler(student.denoiser, lambda z, cond, g: student(z, generator=g, **cond), desc, device, extra, student.num_steps)


def load_sampler(model: str, steps: int | None = None, guidance_scale: float | None = None, device: str | None = None,
                 sigmas: Sequence[float] | None = None) -> Sampler:
    """A :class:`Sampler` for a run folder, one of its checkpoints (``RUN/checkpoints/step-N``: the EMA student of
    update N), a student or exported folder, or a teacher (folder, hub id, ``builtin:NAME``).

    Students sample with their own steps (``steps`` must be ``None`` or that count; consistency
    students take any ``steps`` from 1 to their grid size - 1);
    multistep consistency students also sample at any decreasing ``sigmas`` inside their noise range
    (instead of ``steps``);
    guidance-conditioned students take ``guidance_scale`` as their input ``w`` (default: their own).
    Teachers sample deterministically on their scheduler's grid (``steps``, default 50; DDIM for
    the DDPM family, which for flow-matching teachers is the Euler step of their scheduler),
    optionally with classifier-free guidance weight ``guidance_scale``.
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run, checkpoint = split_checkpoint(model)
    path = student_folder(run)
    if sigmas is not None and steps is not None:
        raise ValueError("give the number of steps or the noise levels (sigmas), not both")
    if (path / STUDENT_INFO_FILE).is_file():
        return _load_student(path, dev, guidance_scale, steps, checkpoint, sigmas)
    if sigmas is not None:
        raise ValueError(f"{model}: only multistep consistency students sample at chosen noise levels")
    if checkpoint is not None:
        raise FileNotFoundError(f"{model}: its run {run} has no student folder to read the checkpoint's weights into")
    if path.is_dir() and (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{model}: run folder has no student yet (it is written at the first checkpoint)")
    base = load_teacher(model, what="--model").to(dev).eval()
    teacher = CFGDenoiser(base, guidance_scale) if guidance_scale else base
    steps = steps or 50
    if not hasattr(base, "sampling_sigmas"):
        raise ValueError(f"{model}: sampling supports teachers with a diffusers scheduler (DDPM family, flow matching)")
    sigmas = base.sampling_sigmas(steps)
    method = "DDIM" if isinstance(base, VPDenoiser) else "Euler (flow matching)"
    desc = f"teacher, {steps}-step {method}" + (f", guidance w={guidance_scale}" if guidance_scale else "")
    return Sampler(base, lambda z, cond, g: ddim_sample(teacher, z, sigmas, **cond), desc, dev, num_steps=steps)
