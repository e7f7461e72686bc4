"""Flux teachers (``FluxPipeline``: packed latents, a guidance input, dynamic shift), on tiny
random-weight pipelines built in-process (tests/tiny_sd.py: CLIP, a tiny T5 and its tokenizer);
nothing is downloaded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilldiff.config import ConfigError, DistillConfig, load_config
from distilldiff.distill import distill
from distilldiff.inference import load_sampler
from distilldiff.teachers import FluxDenoiser, load_teacher
from tiny_sd import (PROMPTS, plain_diffusers_images, renoised_draws, save_pipeline, tiny_flux_pipeline, tiny_run_config,
                     tiny_sd3_pipeline)

pytestmark = pytest.mark.usefixtures("private_cache")
#: the tiny pipelines draw 16x16 images (4x8x8 latents, 16 packed tokens of 16 channels); prompts to 16 T5 tokens
INFO = {"image_size": 16, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    out = {"dev": save_pipeline(tiny_flux_pipeline(root), root / "dev"),
           "schnell": save_pipeline(tiny_flux_pipeline(root, seed=5, guidance_embeds=False), root / "schnell")}
    for name in ("dev", "schnell"):
        (out[name] / "distilldiff_teacher.json").write_text(json.dumps(INFO))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = root / "prompts.txt"
    return out


def _stock(folder: Path, prompts: list[str], z: torch.Tensor, **call) -> torch.Tensor:
    """Latents ``[B, C, h, w]`` of the stock ``FluxPipeline`` started from ``z`` (packed as it packs its noise)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(folder), use_safetensors=True)
    out = pipe(prompts, height=16, width=16, max_sequence_length=16, latents=FluxDenoiser.pack(z), output_type="latent",
               **call).images
    return FluxDenoiser.unpack(out, 8, 8)


def test_packing_is_the_pipelines_and_inverts():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6, dtype=torch.float64)
    packed = FluxDenoiser.pack(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6), rtol=0, atol=0)
    torch.testing.assert_close(FluxDenoiser.unpack(packed, 8, 6), x, rtol=0, atol=0)


def test_flux_denoiser_is_the_closed_form_conversion_of_the_transformer(folders):
    """In float64: D = x_t - t v(pack(x_t), t, guidance) with t = sigma / (1 + sigma), x_t = x / (1 + sigma)."""
    teacher = load_teacher(str(folders["dev"]), prompts=str(folders["prompts"])).to(torch.float64)
    assert isinstance(teacher, FluxDenoiser) and teacher.sample_shape == (4, 8, 8) and teacher.embedded_guidance == 3.5
    cond = {k: v.double() for k, v in teacher.conditioning.grid(2, "cpu").items()}
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 7.0], dtype=torch.float64)
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma)[:, None, None, None]
    img_ids = torch.zeros(4, 4, 3, dtype=torch.float64)
    img_ids[..., 1] += torch.arange(4.0)[:, None]
    img_ids[..., 2] += torch.arange(4.0)[None, :]
    v = teacher.model(hidden_states=FluxDenoiser.pack(x_t), timestep=t, guidance=torch.full((2,), 3.5),
                      img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(16, 3, dtype=torch.float64), return_dict=False,
                      **cond)[0]
    want = x_t - t[:, None, None, None] * FluxDenoiser.unpack(v, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, sigma, **cond), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,call", [("dev", {}), ("dev", {"embedded_guidance": 2.0}), ("schnell", {})])
def test_euler_sampling_equals_the_stock_flux_pipeline(folders, name, call):
    """Three Euler steps from pure noise on FluxPipeline's grid (linspace(1, 1/K, K), dynamically shifted) with
    the guidance input equal the stock pipeline's latents (guidance_scale = the guidance input)."""
    teacher = load_teacher(str(folders[name]), **call)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.prompt_cond([PROMPTS[0], PROMPTS[3]], "cpu")
    with torch.no_grad():
        from distilldiff.samplers import sample_loop

        ours = sample_loop(teacher, z, teacher.sampling_sigmas(3), **cond)
    stock = {"guidance_scale": call.get("embedded_guidance", 3.5)} if name == "dev" else {}
    theirs = _stock(folders[name], [PROMPTS[0], PROMPTS[3]], z, num_inference_steps=3, **stock)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert math.isinf(teacher.sampling_sigmas(3)[0])


def test_cfg_equals_the_pipelines_true_cfg_with_an_empty_negative_prompt(folders):
    w = 2.0
    sampler = load_sampler(str(folders["dev"]), steps=2, guidance_scale=w, device="cpu")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = sampler.denoiser.prompt_cond([PROMPTS[1]] * 2, "cpu")
    ours = sampler.draw(z, cond, torch.Generator())
    theirs = _stock(folders["dev"], [PROMPTS[1]] * 2, z, num_inference_steps=2, true_cfg_scale=1 + w, negative_prompt="")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    unguided = load_sampler(str(folders["dev"]), steps=2, device="cpu").draw(z, cond, torch.Generator())
    assert (unguided - ours).abs().max() > 1e-3


def test_flux_settings_are_checked(folders):
    with pytest.raises(ValueError, match="teacher.embedded_guidance: this Flux transformer has no guidance input"):
        load_teacher(str(folders["schnell"]), embedded_guidance=3.5)
    with pytest.raises(ValueError, match="teacher.image_size: 18 must be a positive multiple of 4"):
        load_teacher(str(folders["dev"]), image_size=18)
    assert load_teacher(str(folders["dev"]), image_size=32).sample_shape == (4, 16, 16)


def test_flux_only_keys_are_refused_for_other_teachers(tmp_path):
    sd3 = save_pipeline(tiny_sd3_pipeline(tmp_path), tmp_path / "sd3")
    for key, value in (("image_size", 16), ("embedded_guidance", 3.5)):
        with pytest.raises(ValueError, match=f"teacher.{key}: applies to Flux teachers; .* StableDiffusion3Pipeline"):
            load_teacher(str(sd3), **{key: value})
        with pytest.raises(ValueError, match=f"teacher.{key}: applies to Flux teachers"):
            load_teacher("builtin:mnist", **{key: value})


def _cfg(folders, objective: dict, tmp_path: Path, **extra) -> DistillConfig:
    return tiny_run_config({"path": str(folders["dev"]), "prompts": str(folders["prompts"]), "embedded_guidance": 2.5}, objective, tmp_path, **extra)


def test_sid_trains_a_one_step_flux_student(folders, tmp_path):
    student_dir = distill(_cfg(folders, {"name": "sid"}, tmp_path))
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == "FluxPipeline" and math.isinf(meta["sigmas"][0]) and meta["call_sigmas"] is None
    assert meta["embedded_guidance"] == 2.5 and meta["image_size"] == 16 and meta["max_sequence_length"] == 16
    card = (student_dir / "README.md").read_text()
    assert "num_inference_steps=1, guidance_scale=2.5, max_sequence_length=16, height=16, width=16" in card
    student = load_sampler(str(student_dir), device="cpu")
    assert student.num_steps == 1 and student.denoiser.embedded_guidance == 2.5


PLAIN_DIFFUSERS = r"""
import json, sys, torch
from diffusers import FluxPipeline
folder, prompt, k, latents, out, extra = sys.argv[1:7]
extra = json.loads(extra)
pipe = FluxPipeline.from_pretrained(folder, use_safetensors=True)
if "seed" in extra:  # the re-noising of stochastic steps: the pipeline draws it from torch's global generator
    torch.manual_seed(extra.pop("seed"))
z = torch.load(latents)
b, c, h, w = z.shape
packed = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
images = pipe([prompt] * b, num_inference_steps=int(k), height=16, width=16, max_sequence_length=16, latents=packed,
              output_type="pt", **extra).images
torch.save(images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules), "plain diffusers must not import distilldiff"
"""


def test_progressive_flux_student_runs_in_plain_diffusers_in_a_fresh_process(folders, tmp_path):
    """Progressive distillation 4 -> 2 steps from t = 1: every other level of the 4-step grid, which is
    FluxPipeline's own 2-step grid (its unshifted levels k/K nest when K halves), run by the stock pipeline
    with the guidance input the student was trained at."""
    from distilldiff.export import export_run
    from test_flow_teacher import _captioned

    distill(_cfg(folders, {"name": "progressive", "start_steps": 4, "end_steps": 2}, tmp_path, data=str(_captioned(tmp_path))))
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert len(meta["sigmas"]) == 2 and meta["call_sigmas"] is None and meta["pipeline"] == "FluxPipeline"
    prompt, seed, n = PROMPTS[2], 4, 2
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=seed, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    torch.save(z, tmp_path / "z.pt")
    extra = {"guidance_scale": 2.5}
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), prompt, "2", str(tmp_path / "z.pt"),
                           str(tmp_path / "theirs.pt"), json.dumps(extra)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    assert theirs.shape == ours.shape == (n, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_two_step_flux_student_runs_in_plain_diffusers_with_stochastic_steps(folders, tmp_path):
    """A 2-step sCM student of a Flux teacher (t = 1, then re-noised): the stock FluxPipeline with a stochastic
    FlowMatchEulerDiscreteScheduler draws the re-noising from torch's global generator in its packed layout,
    which the Flux denoiser's fresh_noise reproduces: torch.manual_seed(s) before the call gives our seed s."""
    from distilldiff.export import export_run
    from test_flow_teacher import _captioned

    distill(_cfg(folders, {"name": "scm", "sample_steps": 2, "tangent_warmup": 2}, tmp_path, data=str(_captioned(tmp_path))))
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert meta["sampler"] == "multistep" and meta["pipeline"] == "FluxPipeline" and len(meta["call_sigmas"]) == 2
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] is True
    assert "torch.manual_seed(0)" in (out / "README.md").read_text()
    z, (ours, other) = renoised_draws(out, PROMPTS[1])
    assert (ours - other).abs().max() > 1e-3  # the re-noising matters
    theirs = plain_diffusers_images(PLAIN_DIFFUSERS, out, PROMPTS[1], 2, z, tmp_path,
                                    {"guidance_scale": 2.5, "sigmas": meta["call_sigmas"], "seed": 11})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the packed draw matters: noise drawn in the unpacked layout gives other images
    g = torch.Generator().manual_seed(11)
    unpacked = torch.randn((2, 4, 8, 8), generator=g)
    packed = FluxDenoiser.unpack(torch.randn((2, 16, 16), generator=torch.Generator().manual_seed(11)), 8, 8)
    assert not torch.equal(unpacked, packed)
    torch.testing.assert_close(load_teacher(str(folders["dev"])).fresh_noise(z, torch.Generator().manual_seed(11)), packed, rtol=0, atol=0)


def test_off_grid_flux_students_get_the_sigmas_that_the_dynamic_shift_maps_to_their_levels(folders):
    """A student on levels that are no K-step grid of FluxPipeline: the call's sigmas= are the unshifted
    values v whose dynamic shift (mu of the image size) gives the student's times exactly."""
    import numpy as np

    from distilldiff.export import flow_call_sigmas
    from distilldiff.students import Student

    teacher = load_teacher(str(folders["dev"]))
    t = torch.tensor([1.0, 0.9, 0.3], dtype=torch.float64)
    student = Student(teacher, (t / (1 - t)).tolist(), "ddim")
    v = flow_call_sigmas(student)
    assert v is not None and v[0] == 1.0
    scheduler = teacher.make_scheduler()
    scheduler.set_timesteps(sigmas=np.array(v), mu=teacher.dynamic_shift_mu())
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), t, rtol=1e-6, atol=1e-7)  # the scheduler keeps float32
    assert flow_call_sigmas(Student(teacher, teacher.sampling_sigmas(3).tolist(), "ddim")) is None


def test_flux_keys_are_refused_for_a_student_teacher(folders, tmp_path):
    from distilldiff.distill import build_teacher

    student_dir = distill(_cfg(folders, {"name": "sid"}, tmp_path))
    cfg = load_config(DistillConfig, data={"teacher": {"path": str(student_dir), "image_size": 16}, "objective": {"name": "sid"},
                                           "output_dir": str(tmp_path / "run2")})
    with pytest.raises(ConfigError, match="teacher.image_size: .* is a distilldiff student, which keeps its own"):
        build_teacher(cfg.teacher)
