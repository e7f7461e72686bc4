"""Flow-matching latent text-to-image teachers (Stable Diffusion 3 family), on tiny random-weight
pipelines built in-process (tests/tiny_sd.py); nothing is downloaded."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilldiff.config import ConfigError, DistillConfig, load_config
from distilldiff.distill import build_distill_task, distill
from distilldiff.inference import load_sampler
from distilldiff.samplers import sample_loop, teacher_grid
from distilldiff.students import OneStepGenerator
from distilldiff.teachers import CFGDenoiser, FlowDenoiser, load_teacher
from distilldiff.teachers.flow import flow_sigma_of_t, flow_t_of_sigma
from tiny_sd import PROMPTS, plain_diffusers_images, renoised_draws, save_pipeline, tiny_run_config, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    out = {"sd3": save_pipeline(tiny_sd3_pipeline(root), root / "sd3")}
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out["prompts"] = root / "prompts.txt"
    return out


def _pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, text_encoder_3=None, tokenizer_3=None)


def test_time_and_sigma_conversions_in_float64():
    t = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.999, 1.0], dtype=torch.float64)
    sigma = flow_sigma_of_t(t)
    torch.testing.assert_close(sigma[:-1], t[:-1] / (1 - t[:-1]), rtol=1e-15, atol=0)
    assert math.isinf(sigma[-1])
    torch.testing.assert_close(flow_t_of_sigma(sigma), t, rtol=1e-15, atol=0)
    # x_t = (1 - t) x0 + t eps is x_sigma = x0 + sigma eps divided by 1 + sigma
    x0, eps = torch.randn(2, 5, dtype=torch.float64)
    for tv in t[:-1]:
        s = tv / (1 - tv)
        torch.testing.assert_close((x0 + s * eps) / (1 + s), (1 - tv) * x0 + tv * eps, rtol=1e-13, atol=1e-13)


def test_flow_denoiser_is_the_closed_form_conversion_of_the_transformer(folders):
    """D(x, sigma) = x_t - t v(x_t, 1000 t) with x_t = x / (1 + sigma), in float64; at sigma = inf,
    forward_scaled(eps) = eps - v(eps, 1000)."""
    teacher = load_teacher(str(folders["sd3"]), prompts=str(folders["prompts"])).to(torch.float64)
    assert isinstance(teacher, FlowDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert math.isinf(teacher.sigma_max) and 0 < teacher.sigma_min < 0.01
    cond = {k: v.double() for k, v in teacher.conditioning.grid(3, "cpu").items()}
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    net = teacher.model
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.05, 0.5, 0.97):
        sigma = t / (1 - t)
        x_t = (1 - t) * x0 + t * eps
        v = net(hidden_states=x_t, timestep=torch.full((3,), 1000 * t, dtype=torch.float64), **cond).sample
        torch.testing.assert_close(teacher(x0 + sigma * eps, sigma, **cond), x_t - t * v, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(teacher.forward_scaled(x_t, sigma, **cond), x_t - t * v, rtol=1e-10, atol=1e-10)
    v1 = net(hidden_states=eps, timestep=torch.full((3,), 1000.0, dtype=torch.float64), **cond).sample
    torch.testing.assert_close(teacher.forward_scaled(eps, float("inf"), **cond), eps - v1, rtol=0, atol=0)


def test_sampling_grid_is_the_schedulers_own(folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    teacher = load_teacher(str(folders["sd3"]))
    for k in (1, 2, 4, 28):
        grid = teacher_grid(teacher, k, 0.002, 80.0)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(k)
        assert math.isinf(grid[0]) and len(grid) == k
        t = flow_t_of_sigma(torch.tensor(grid, dtype=torch.float64))
        assert t.float().tolist() == scheduler.sigmas[:-1].tolist()


def test_euler_sampling_with_cfg_equals_the_stock_pipeline(folders):
    """Three deterministic steps from pure noise with our CFG at w equal the pipeline's
    guidance_scale = 1 + w (latents, before decoding)."""
    w = 2.0
    sampler = load_sampler(str(folders["sd3"]), steps=3, guidance_scale=w, device="cpu")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = sampler.denoiser.prompt_cond([PROMPTS[0]] * 2, "cpu")
    ours = sampler.draw(z, cond, torch.Generator())
    pipe = _pipeline(folders["sd3"])
    theirs = pipe([PROMPTS[0]] * 2, num_inference_steps=3, guidance_scale=1 + w, latents=z.clone(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    unguided = load_sampler(str(folders["sd3"]), steps=3, device="cpu").draw(z, cond, torch.Generator())
    assert (unguided - ours).abs().max() > 1e-3


def test_one_step_generator_starts_from_pure_noise(folders):
    teacher = load_teacher(str(folders["sd3"]), prompts=str(folders["prompts"]))
    gen = OneStepGenerator(teacher, float("inf"))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = teacher.conditioning.grid(2, "cpu")
    with torch.no_grad():
        x = gen(z, **cond)
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, teacher.forward_scaled(z, float("inf"), **cond), rtol=0, atol=0)
        torch.testing.assert_close(sample_loop(CFGDenoiser(teacher, 0.0), z, torch.tensor([float("inf")]), **cond), x)


def _cfg(folders, objective: dict, tmp_path: Path, **extra) -> DistillConfig:
    return tiny_run_config({"path": str(folders["sd3"]), "prompts": str(folders["prompts"]), "guidance_scale": 1.0}, objective, tmp_path, **extra)


@pytest.mark.parametrize("objective", [
    {"name": "sid"},
    {"name": "fdistill", "divergence": "reverse_kl", "noise": "lognormal", "p_mean": 0.0, "p_std": 1.0},
])
def test_one_step_objectives_train_on_a_flow_teacher(folders, objective, tmp_path):
    """A few steps of SiD and DMD (logit-normal t: log-normal sigma with SD3's (0, 1)): a one-step
    student at t = 1, written as a stock StableDiffusion3Pipeline whose transformer moved."""
    student_dir = distill(_cfg(folders, objective, tmp_path))
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == "StableDiffusion3Pipeline" and meta["timesteps"] == [1000.0]
    assert meta["prediction_type"] == "flow" and meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    teacher_net = _pipeline(folders["sd3"]).transformer.state_dict()
    student_net = _pipeline(student_dir).transformer.state_dict()
    assert any(not torch.equal(teacher_net[k], v) for k, v in student_net.items())


def test_dmd2_discriminator_head_reads_the_transformers_token_features(folders, tmp_path):
    """DMD2's GAN term on a flow teacher: the head sits on the fake score's final norm (image tokens, averaged),
    one feature vector per sample, and a short run trains it."""
    from distilldiff.objectives.critic import ScoreWithHead, feature_module

    teacher = load_teacher(str(folders["sd3"]), prompts=str(folders["prompts"]))
    assert feature_module(teacher) is teacher.model.norm_out
    with pytest.raises(ValueError, match="one feature layer for a discriminator head, not a UNet's decoder"):
        feature_module(teacher, "decoder")
    critic = ScoreWithHead(teacher)
    cond = teacher.conditioning.grid(3, "cpu")
    d, logit = critic(torch.randn(3, 4, 8, 8), torch.full((3,), 2.0), with_logit=True, **cond)
    assert d.shape == (3, 4, 8, 8) and logit.shape == (3,)
    assert critic.head[0].in_features == teacher.model.config.num_attention_heads * teacher.model.config.attention_head_dim
    objective = {"name": "fdistill", "divergence": "reverse_kl", "gan_weight": 0.01, "noise": "lognormal", "p_mean": 0.0, "p_std": 1.0}
    student_dir = distill(_cfg(folders, objective, tmp_path, data=str(_captioned(tmp_path))))
    assert json.loads((student_dir / "distilldiff_student.json").read_text())["pipeline"] == "StableDiffusion3Pipeline"


PLAIN_DIFFUSERS = r"""
import json, sys, torch
from diffusers import StableDiffusion3Pipeline
folder, prompt, k, latents, out = sys.argv[1:6]
extra = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
if "seed" in extra:  # the re-noising of stochastic steps: the pipeline draws it from torch's global generator
    torch.manual_seed(extra.pop("seed"))
pipe = StableDiffusion3Pipeline.from_pretrained(folder, use_safetensors=True, text_encoder_3=None, tokenizer_3=None)
z = torch.load(latents)
images = pipe([prompt] * z.shape[0], num_inference_steps=int(k), guidance_scale=1.0, latents=z, output_type="pt", **extra).images
torch.save(images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules), "plain diffusers must not import distilldiff"
"""


def test_flow_student_export_runs_in_plain_diffusers_in_a_fresh_process(folders, tmp_path):
    from distilldiff.export import export_run

    distill(_cfg(folders, {"name": "sid"}, tmp_path))
    out = export_run(tmp_path / "run", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "StableDiffusion3Pipeline" in card and "num_inference_steps=1, guidance_scale=1.0" in card
    assert "text_encoder_3=None, tokenizer_3=None" in card  # the tiny teacher has no T5: diffusers wants that said
    prompt, seed, n = PROMPTS[2], 3, 3
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=seed, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), prompt, "1", str(tmp_path / "z.pt"),
                           str(tmp_path / "theirs.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    assert theirs.shape == ours.shape == (n, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3


def test_progressive_student_of_a_flow_teacher_runs_in_plain_diffusers(folders, tmp_path):
    """Progressive distillation from t = 1 (4 -> 2 steps): the student's levels are every other one of the
    4-step grid, which the stock pipeline runs when given them as sigmas= (as its model card says)."""
    from distilldiff.export import export_run

    distill(_cfg(folders, {"name": "progressive", "start_steps": 4, "end_steps": 2}, tmp_path, data=str(_captioned(tmp_path))))
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert math.isinf(meta["sigmas"][0]) and len(meta["sigmas"]) == 2 and meta["call_sigmas"][0] == 1.0
    assert f"sigmas={meta['call_sigmas']!r}" in (out / "README.md").read_text()
    prompt, seed, n = PROMPTS[1], 4, 2
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=seed, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), prompt, "2", str(tmp_path / "z.pt"),
                           str(tmp_path / "theirs.pt"), json.dumps({"sigmas": meta["call_sigmas"]})],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.testing.assert_close(ours, torch.load(tmp_path / "theirs.pt"), rtol=0, atol=1e-5)


def test_unsupported_flow_settings_are_one_line_errors(folders, tmp_path):
    with pytest.raises(ConfigError, match="no consistency boundary scalings: consistency students of them export with objective.schedule: flow"):
        build_distill_task(_cfg(folders, {"name": "consistency", "sample_steps": 2}, tmp_path, data=str(tmp_path)))
    with pytest.raises(ConfigError, match="schedule: flow needs a flow-matching teacher; VPDenoiser"):
        build_distill_task(load_config(DistillConfig, data={"teacher": {"path": "builtin:mnist"}, "data": "mnist5k",
                                                            "objective": {"name": "consistency", "schedule": "flow"},
                                                            "output_dir": str(tmp_path / "run2")}))
    with pytest.raises(ValueError, match="flow-matching pipeline .it predicts velocity.; remove the key"):
        load_teacher(str(folders["sd3"]), prediction_type="epsilon")
    with pytest.raises(ValueError, match="not defined at sigma = inf"):
        OneStepGenerator(load_teacher("builtin:mnist"), 80.0).denoiser.forward_scaled(torch.zeros(1, 1, 28, 28), float("inf"))


def test_mini_flow_teacher_trains_and_loads_as_a_stock_sd3_pipeline(tmp_path):
    """The flow teacher's config (a smaller transformer, 2 updates): the folder is a StableDiffusion3Pipeline
    that plain diffusers samples, with the config's max_sequence_length, as distilldiff's Euler sampler does."""
    from diffusers import StableDiffusion3Pipeline

    from distilldiff.cli import main

    out = tmp_path / "flow-teacher"
    assert main(["teacher", "train", "--config", "configs/mnist/t2i_flow_teacher.yaml", "--output-dir", str(out),
                 "--set", "transformer.num_layers=1", "--set", "train.max_steps=2", "--set", "train.batch_size=8",
                 "--set", "train.checkpoint_every=2", "--set", "train.sample_every=2", "--set", "train.num_sample_images=4",
                 "--set", "max_sequence_length=8"]) in (0, None)
    info = json.loads((out / "student" / "distilldiff_teacher.json").read_text())
    assert info["max_sequence_length"] == 8
    teacher = load_teacher(str(out / "student"))
    assert isinstance(teacher, FlowDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.components.max_sequence_length == 8
    assert teacher.conditioning.null(1, "cpu")["encoder_hidden_states"].shape[1] == 16 + 8  # CLIP tokens + the T5 part
    pipe = StableDiffusion3Pipeline.from_pretrained(str(out / "student"), use_safetensors=True, text_encoder_3=None, tokenizer_3=None)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = "a thick handwritten seven"
    theirs = pipe([prompt] * 2, num_inference_steps=4, guidance_scale=2.0, latents=z.clone(), output_type="latent",
                  max_sequence_length=8).images
    sampler = load_sampler(str(out / "student"), steps=4, guidance_scale=1.0, device="cpu")
    ours = sampler.draw(z, sampler.denoiser.prompt_cond([prompt] * 2, "cpu"), torch.Generator())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _captioned(tmp_path: Path) -> Path:
    """A folder of 4 RGB images with captions (real data for sCM)."""
    from PIL import Image

    root = tmp_path / "captioned"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(PROMPTS):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(prompt + "\n")
    return root


def test_scm_trains_on_a_flow_teacher_and_exports_its_one_step_student(folders, tmp_path):
    """sCM's JVP runs through the SD3 transformer (time input included); its one-step student starts at
    t = 1 and is the stock pipeline's one Euler step."""
    from distilldiff.objectives.scm import SCM, SCMConfig, trigflow_F

    teacher = load_teacher(str(folders["sd3"]), prompts=str(folders["prompts"])).double()
    scm = SCM.build(SCMConfig(), teacher)
    cond = {k: v.double() for k, v in teacher.conditioning.grid(2, "cpu").items()}
    x_t = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.4, 1.2], dtype=torch.float64)
    v = scm.teacher_velocity(teacher, x_t, t, cond)
    _, dF = scm.tangent(teacher, x_t, t, v, cond)
    # diffusers embeds the timestep in float32 and with frequencies up to 1 per timestep: a central difference
    # is accurate to ~1e-3 only, for a step of ~0.1 timestep (h = 1e-4 in TrigFlow time)
    h = 1e-4
    with torch.no_grad():
        fd = (trigflow_F(teacher, x_t + h * v, t + h, 1.0, cond) - trigflow_F(teacher, x_t - h * v, t - h, 1.0, cond)) / (2 * h)
    fd = (t.cos() * t.sin())[:, None, None, None] * fd
    err = float((dF - fd).abs().max() / fd.abs().max())
    assert err < 1e-2, err
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the same JVP without the time input's tangent is far off
        _, dF_x = torch.func.jvp(lambda x: trigflow_F(teacher, x, t, 1.0, cond), (x_t,), ((t.cos() * t.sin())[:, None, None, None] * v,))
    assert float((dF_x - fd).abs().max() / fd.abs().max()) > 10 * max(err, 1e-3)
    student_dir = distill(_cfg(folders, {"name": "scm", "tangent_warmup": 2}, tmp_path, data=str(_captioned(tmp_path))))
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == "StableDiffusion3Pipeline" and meta["timesteps"] == [1000.0]


def test_two_step_scm_student_runs_in_plain_diffusers_with_stochastic_steps(folders, tmp_path):
    """A 2-step sCM student (t = 1, then re-noised to mid_time) exports as the stock pipeline with a
    FlowMatchEulerDiscreteScheduler taking stochastic steps (x0 = x_t - t v; x_t' = (1 - t') x0 + t' n) at
    the call's sigmas=; the stock pipeline draws the re-noising from torch's global generator, so with
    torch.manual_seed(s) before the call plain diffusers draws our images of re-noising seed s."""
    from distilldiff.export import export_run

    distill(_cfg(folders, {"name": "scm", "sample_steps": 2, "tangent_warmup": 2}, tmp_path, data=str(_captioned(tmp_path))))
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert meta["sampler"] == "multistep" and math.isinf(meta["sigmas"][0]) and len(meta["call_sigmas"]) == 2
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["stochastic_sampling"] is True
    card = (out / "README.md").read_text()
    assert "stochastic FlowMatchEulerDiscreteScheduler step(s)" in card
    assert "import torch\nfrom diffusers import StableDiffusion3Pipeline" in card
    z, (ours, other) = renoised_draws(out, PROMPTS[3])
    assert (ours - other).abs().max() > 1e-3  # the re-noising matters
    theirs = plain_diffusers_images(PLAIN_DIFFUSERS, out, PROMPTS[3], 2, z, tmp_path, {"sigmas": meta["call_sigmas"], "seed": 11})
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_consistency_on_a_flow_teachers_grid(folders, tmp_path):
    """schedule: flow: the teacher's N-step grid from t = 1 above the boundary t = 0; in float64 the teacher's
    Euler step from t = 1 is our sampler's first step, Heun's last step to t = 0 is Euler's, and the consistency
    function is the input itself at t = 0. A 2-step student trains, exports with stochastic steps, and the stock
    pipeline draws its images (re-noising from torch's global generator)."""
    from distilldiff.objectives.consistency import ConsistencyConfig, ConsistencyDistillation, FlowConsistencyDistillation

    teacher = load_teacher(str(folders["sd3"]), prompts=str(folders["prompts"])).double()
    cd = ConsistencyDistillation.build(ConsistencyConfig(schedule="flow", num_scales=4, sample_steps=2), teacher)
    assert isinstance(cd, FlowConsistencyDistillation)
    torch.testing.assert_close(cd.sigmas[1:], teacher.sampling_sigmas(4).flip(0), rtol=0, atol=0)
    assert cd.sigmas[0] == 0 and math.isinf(cd.sigmas[-1])
    cond = {k: v.double() for k, v in teacher.conditioning.grid(2, "cpu").items()}
    n = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    inf, s = torch.full((2,), math.inf, dtype=torch.float64), cd.sigmas[2].expand(2)
    with torch.no_grad():
        euler = ConsistencyDistillation.build(ConsistencyConfig(schedule="flow", num_scales=4, solver="euler"), teacher).flow_step(
            teacher, n, inf, s, cond)
        torch.testing.assert_close(euler, (teacher.forward_scaled(n, inf, **cond) + s[0] * n) / (1 + s[0]), rtol=1e-12, atol=1e-12)
        x = torch.randn_like(n)
        zero = torch.zeros(2, dtype=torch.float64)
        assert cd.config.solver == "heun"  # whose last step, to t = 0, is Euler's: the teacher's x0
        torch.testing.assert_close(cd.flow_step(teacher, x, s, zero, cond), teacher(x * (1 + s[0]), s, **cond), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(teacher.forward_scaled(x, zero, **cond), x, rtol=0, atol=0)
    objective = {"name": "consistency", "schedule": "flow", "num_scales": 4, "sample_steps": 2, "solver": "euler"}
    student_dir = distill(_cfg(folders, objective, tmp_path, data=str(_captioned(tmp_path))))
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["sampler"] == "multistep" and math.isinf(meta["sigmas"][0]) and meta["sigmas"][1] == pytest.approx(float(cd.sigmas[2]))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sampler = load_sampler(str(student_dir), device="cpu")
    cond = sampler.denoiser.prompt_cond([PROMPTS[0]] * 2, "cpu")
    ours = sampler.draw(z, cond, torch.Generator().manual_seed(9))
    torch.manual_seed(9)
    theirs = _pipeline(student_dir)([PROMPTS[0]] * 2, num_inference_steps=2, guidance_scale=1.0, latents=z.clone(),
                                     sigmas=meta["call_sigmas"], output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_shipped_mini_flow_teacher_loads_with_its_prompts_and_t5_length():
    teacher = load_teacher("builtin:mnist-t2i-flow")
    assert isinstance(teacher, FlowDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.components.max_sequence_length == 16 and len(teacher.conditioning.prompts) == 1000
    assert teacher.components.image_size == (32, 32)


@pytest.mark.parametrize("key,value,message", [
    ("shift", 0.0, "shift must be > 0"),
    ("max_sequence_length", 600, r"max_sequence_length must be in \[1, 512\]"),
    ("objective.logit_std", 0.0, "objective.logit_std must be > 0"),
    ("objective.cond_drop_prob", 1.0, r"objective.cond_drop_prob must be in \[0, 1\)"),
])
def test_flow_teacher_config_errors(key, value, message):
    from distilldiff.config import FlowTeacherConfig

    with pytest.raises(ConfigError, match=message):
        load_config(FlowTeacherConfig, "configs/mnist/t2i_flow_teacher.yaml", [f"{key}={value}"])


def test_scm_with_ladd_on_a_flow_teacher(folders, tmp_path):
    """sCM + LADD (SANA-Sprint's recipe) on the SD3 transformer: the discriminator is a frozen copy of the
    teacher with a head on its final norm's tokens; its fake samples include the student's one-step samples
    from t = 1 (adv_top_prob = 1 here); two updates train the head and leave the copy as the teacher."""
    from safetensors.torch import load_file

    student_dir = distill(_cfg(folders, {"name": "scm", "adv_weight": 0.5, "adv_top_prob": 1.0, "tangent_warmup": 2},
                               tmp_path, data=str(_captioned(tmp_path))))
    assert json.loads((student_dir / "distilldiff_student.json").read_text())["timesteps"] == [1000.0]
    checkpoint = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    disc = load_file(checkpoint / "model_1.safetensors")  # the second trained network (accelerate's naming)
    assert float(disc["head.2.weight"].abs().sum()) > 0  # zero-initialised, then trained
    teacher_net = _pipeline(folders["sd3"]).transformer.state_dict()
    frozen = {k[len("denoiser.model."):]: v for k, v in disc.items() if k.startswith("denoiser.model.")}
    assert frozen and all(torch.equal(teacher_net[k], v) for k, v in frozen.items())


def test_scm_with_ladd_refuses_a_lora_critic(folders, tmp_path):
    from distilldiff.config import ConfigError

    with pytest.raises(ConfigError, match="critic.lora_rank: sCM's discriminator trains only a head"):
        distill(_cfg(folders, {"name": "scm", "adv_weight": 0.5}, tmp_path, data=str(_captioned(tmp_path)), critic={"lora_rank": 4}))
