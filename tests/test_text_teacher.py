"""The mini text-to-image teacher's training (tiny networks, a few steps) and the prompt metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilldiff.config import TextToImageTeacherConfig, load_config

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mnist" / "t2i_teacher.yaml"

TINY = [
    "vae.block_out_channels=[8,8,8]", "vae.norm_num_groups=4",
    "text_encoder.hidden_size=16", "text_encoder.intermediate_size=16", "text_encoder.num_attention_heads=2",
    "unet.block_out_channels=[16,32]", "unet.norm_num_groups=8", "unet.attention_head_dim=4",
    "vae_train.max_steps=3", "vae_train.batch_size=8", "vae_train.checkpoint_every=3", "vae_train.sample_every=3",
    "vae_train.num_sample_images=8", "vae_train.log_every=1",
    "train.max_steps=3", "train.batch_size=8", "train.checkpoint_every=3", "train.sample_every=3",
    "train.num_sample_images=4", "train.log_every=1", "sample_steps=2",
]


def _cfg(tmp_path: Path, *extra: str) -> TextToImageTeacherConfig:
    return load_config(TextToImageTeacherConfig, CONFIG, [*TINY, f"output_dir={tmp_path / 'teacher'}", *extra])


PLAIN_DIFFUSERS = r"""
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], use_safetensors=True)
out = pipe(["a thick handwritten seven", "a small handwritten two"], num_inference_steps=2, guidance_scale=2.0,
           generator=torch.Generator().manual_seed(0), output_type="pt").images
print(tuple(out.shape), pipe.tokenizer.tokenize("a thick handwritten seven"))
assert not any(m.startswith("distilldiff") for m in sys.modules)
"""


def test_text_to_image_teacher_trains_in_two_runs_and_loads_in_plain_diffusers(tmp_path):
    from distilldiff.teachers import LatentDenoiser, load_teacher
    from distilldiff.text_teacher import train_text_to_image_teacher

    cfg = _cfg(tmp_path)
    folder = train_text_to_image_teacher(cfg)
    out = tmp_path / "teacher"
    assert folder == out / "student"
    for stage in ("vae", "unet"):
        assert (out / stage / "checkpoints" / "step-0000003" / "state.json").is_file()
        assert (out / stage / "samples" / "latest.png").is_file()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    # the latents were scaled to unit variance and the factor travels in the VAE config
    info = json.loads((folder / "distilldiff_teacher.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == pytest.approx(info["training"]["scaling_factor"]) and vae_cfg["scaling_factor"] != 0.18215
    # the UNet was trained, the text encoder was not (its weights are the seeded initialisation)
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(folder)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(2, 1, 32, 32)" in proc.stdout and "['a</w>', 'thick</w>', 'handwritten</w>', 'seven</w>']" in proc.stdout
    teacher = load_teacher(str(folder), prompts=str(Path(__file__).resolve().parents[1] / "distilldiff/assets/mnist-t2i/captions-eval.txt"))
    assert isinstance(teacher, LatentDenoiser) and teacher.sample_shape == (4, 8, 8) and len(teacher.conditioning.prompts) == 1000


def test_text_to_image_teacher_resumes_after_its_autoencoder(tmp_path):
    """A run stopped after the autoencoder's run resumes with the UNet's and ends where an
    uninterrupted run ends (bitwise)."""
    from safetensors.torch import load_file

    from distilldiff.text_teacher import train_text_to_image_teacher

    whole = train_text_to_image_teacher(_cfg(tmp_path), output_dir=tmp_path / "a")
    cfg = _cfg(tmp_path, "train.max_steps=1", "train.checkpoint_every=1", "train.sample_every=1")
    train_text_to_image_teacher(cfg, output_dir=tmp_path / "b")
    with pytest.raises(FileExistsError, match="--resume latest"):
        train_text_to_image_teacher(_cfg(tmp_path), output_dir=tmp_path / "b")
    resumed = train_text_to_image_teacher(_cfg(tmp_path), resume="latest", output_dir=tmp_path / "b")
    a, b = load_file(str(whole / "unet" / "diffusion_pytorch_model.safetensors")), load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_to_image_teacher_config_errors(tmp_path):
    from distilldiff.config import ConfigError
    from distilldiff.text_teacher import build_vae_task

    with pytest.raises(ConfigError, match="image_size: 24 is smaller than the 28x28 digits"):
        _cfg(tmp_path, "image_size=24")
    with pytest.raises(ValueError, match="vae: invalid AutoencoderKL arguments"):
        build_vae_task(_cfg(tmp_path, "vae.nope=1"))
    with pytest.raises(ValueError, match="vae.in_channels: the digits have 1 channel"):
        build_vae_task(_cfg(tmp_path, "vae.in_channels=3"))


def test_prompt_metrics_on_real_digits():
    from distilldiff.captions import mnist5k_captions
    from distilldiff.metrics.prompts import attribute_agreement, digit_images, prompt_accuracy
    from distilldiff.data import padded_digits

    images, _ = padded_digits(32)
    idx = torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:600]
    x, captions = images[idx], [mnist5k_captions()[i] for i in idx.tolist()]
    assert torch.equal(digit_images(x), (images[idx][..., 2:30, 2:30]))
    assert prompt_accuracy(x, captions) > 0.97
    assert attribute_agreement(x, captions) == {"thickness": 1.0, "slant": 1.0, "size": 1.0}
    shuffled = x[torch.randperm(600, generator=torch.Generator().manual_seed(1))]
    assert prompt_accuracy(shuffled, captions) < 0.2
    assert all(0.2 < v < 0.6 for v in attribute_agreement(shuffled, captions).values())
    with pytest.raises(ValueError, match="600 images but 2 prompts"):
        prompt_accuracy(x, captions[:2])


def test_shipped_mini_text_to_image_teacher_follows_its_prompts():
    """builtin:mnist-t2i loads with its own evaluation prompts and draws the digit a prompt names
    (64 prompts, 4 DDIM steps, w = 1: the model card measures 1.000 on 500)."""
    from distilldiff.captions import CAPTION_ASSETS
    from distilldiff.inference import load_sampler
    from distilldiff.metrics.prompts import prompt_accuracy
    from distilldiff.teachers import builtin_teacher_path

    folder = builtin_teacher_path("mnist-t2i")
    assert (folder / "captions-eval.txt").read_text() == (CAPTION_ASSETS / "captions-eval.txt").read_text()
    sampler = load_sampler("builtin:mnist-t2i", steps=4, guidance_scale=1.0, device="cpu")
    prompts = sampler.denoiser.conditioning.prompts
    assert len(prompts) == 1000
    images = sampler.sample(64, seed=0)
    assert images.shape == (64, 1, 32, 32)
    assert prompt_accuracy(images, prompts[:64]) > 0.9


def test_teacher_train_command_reads_a_text_to_image_config(tmp_path):
    """`distilldiff teacher train` takes a config with a unet: section as a text-to-image teacher: its
    own keys are validated (one line, exit 2), not rejected as unknown keys of a pixel teacher."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "distilldiff.cli", "teacher", "train", "--config", str(CONFIG),
                        "--set", "image_size=24", "--output-dir", str(tmp_path / "t")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"distilldiff: error: {CONFIG}: image_size: 24 is smaller than the 28x28 digits"]
    assert not (tmp_path / "t").exists()
