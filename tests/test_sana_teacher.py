"""SANA teachers (``SanaPipeline``: Gemma-2 text states with an attention mask, a deep-compression
autoencoder, DPM-Solver in flow mode), on a tiny random-weight pipeline built in-process
(tests/tiny_sd.py: a Gemma tokenizer written here); nothing is downloaded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilldiff.distill import distill
from distilldiff.inference import load_sampler
from distilldiff.samplers import sample_loop
from distilldiff.teachers import load_teacher
from distilldiff.teachers.flow import SanaDenoiser
from tiny_sd import PROMPTS, save_pipeline, tiny_run_config, tiny_sana_pipeline

pytestmark = pytest.mark.usefixtures("private_cache")
CALL = {"height": 32, "width": 32, "max_sequence_length": 16, "use_resolution_binning": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sana")
    out = {"sana": save_pipeline(tiny_sana_pipeline(), root / "sana")}
    (out["sana"] / "distilldiff_teacher.json").write_text(json.dumps({"max_sequence_length": 16}))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = root / "prompts.txt"
    return out


def _euler_pipeline(folder: Path):
    """The stock SanaPipeline with the FlowMatchEulerDiscreteScheduler of its DPM-Solver's flow shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(folder), use_safetensors=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    return pipe


def test_sana_denoiser_is_the_closed_form_conversion_and_encodes_as_the_pipeline(folders):
    from diffusers import SanaPipeline

    teacher = load_teacher(str(folders["sana"]), prompts=str(folders["prompts"])).to(torch.float64)
    assert isinstance(teacher, SanaDenoiser) and teacher.sample_shape == (4, 16, 16)
    assert teacher.scheduler_config == {"num_train_timesteps": 1000, "shift": 3.0}
    pipe = SanaPipeline.from_pretrained(str(folders["sana"]), use_safetensors=True)
    import inspect

    chi = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert chi  # pipe(prompt) puts SANA's instruction before every prompt by default; so do we
    e, m, ne, nm = pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=16, complex_human_instruction=chi)
    cond = teacher.prompt_cond(PROMPTS[:2], "cpu")
    torch.testing.assert_close(cond["encoder_hidden_states"], e.float(), rtol=0, atol=0)
    torch.testing.assert_close(cond["encoder_attention_mask"], m, rtol=0, atol=0)
    null = teacher.conditioning.null(1, "cpu")
    torch.testing.assert_close(null["encoder_hidden_states"], ne[:1].float(), rtol=0, atol=0)
    cond = {k: v.double() if v.is_floating_point() else v for k, v in cond.items()}
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.5, 7.0], dtype=torch.float64)
    t = sigma / (1 + sigma)
    x_t = x / (1 + sigma)[:, None, None, None]
    with torch.no_grad():
        v = teacher.model(x_t, timestep=1000 * t, return_dict=False, **cond)[0]
        torch.testing.assert_close(teacher(x, sigma, **cond), x_t - t[:, None, None, None] * v, rtol=1e-12, atol=1e-12)


def test_euler_sampling_with_cfg_equals_the_stock_pipeline(folders):
    """Three Euler steps with CFG at w equal SanaPipeline's guidance_scale = 1 + w with the Euler scheduler
    of its flow shift (latents, before decoding)."""
    w = 1.5
    teacher = load_teacher(str(folders["sana"]), guidance_scale=w)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = teacher.inner.prompt_cond([PROMPTS[0], PROMPTS[2]], "cpu")
    with torch.no_grad():
        ours = sample_loop(teacher, z, teacher.inner.sampling_sigmas(3), **cond)
    theirs = _euler_pipeline(folders["sana"])([PROMPTS[0], PROMPTS[2]], num_inference_steps=3, guidance_scale=1 + w,
                                              latents=z.clone(), output_type="latent", **CALL).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert math.isinf(teacher.inner.sampling_sigmas(3)[0])


PLAIN_DIFFUSERS = r"""
import json, sys, torch
from diffusers import SanaPipeline
folder, prompt, latents, out = sys.argv[1:5]
pipe = SanaPipeline.from_pretrained(folder, use_safetensors=True)
assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
z = torch.load(latents)
images = pipe([prompt] * z.shape[0], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt", height=32,
              width=32, max_sequence_length=16, use_resolution_binning=False).images
torch.save(images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules), "plain diffusers must not import distilldiff"
"""


def test_one_step_sana_student_trains_and_runs_in_plain_diffusers_in_a_fresh_process(folders, tmp_path):
    from distilldiff.export import export_run

    distill(tiny_run_config({"path": str(folders["sana"]), "prompts": str(folders["prompts"]), "guidance_scale": 1.0},
                            {"name": "sid"}, tmp_path))
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == "SanaPipeline" and math.isinf(meta["sigmas"][0]) and meta["max_sequence_length"] == 16
    assert "num_inference_steps=1, guidance_scale=1.0, max_sequence_length=16" in (out / "README.md").read_text()
    prompt, seed, n = PROMPTS[1], 3, 2
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=seed, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 16, 16), generator=torch.Generator().manual_seed(seed))
    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), prompt, str(tmp_path / "z.pt"), str(tmp_path / "theirs.pt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    assert theirs.shape == ours.shape == (n, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_sana_pipeline_with_another_scheduler_is_a_one_line_error(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny_sana_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler()  # no flow sigmas
    folder = save_pipeline(pipe, tmp_path / "sana")
    with pytest.raises(ValueError, match="a SANA pipeline needs a flow-matching scheduler .* got DPMSolverMultistepScheduler"):
        load_teacher(str(folder))
