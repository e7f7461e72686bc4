"""Stable-Diffusion-family latent text-to-image teachers, on tiny random-weight pipelines built in-process.

Nothing is downloaded: the pipelines, their CLIP tokenizer vocabulary and their weights are made
here (tests/tiny_sd.py), saved to a folder and loaded through the same diffusers
``from_pretrained`` code a hub id goes through.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distilldiff.config import ConfigError, DistillConfig, load_config
from distilldiff.distill import build_distill_task, distill
from distilldiff.inference import load_sampler
from distilldiff.teachers import CFGDenoiser, LatentDenoiser, load_teacher
from distilldiff.teachers.text import EmbeddingCache, read_prompts
from tiny_sd import PROMPTS, save_pipeline, tiny_run_config, tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("private_cache")
KINDS = ["sd", "sdxl"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny SD and SDXL pipelines (epsilon), an SD one with v-prediction, and a prompt file."""
    root = tmp_path_factory.mktemp("t2i")
    out = {
        "sd": save_pipeline(tiny_sd_pipeline(root), root / "sd"),
        "sd-v": save_pipeline(tiny_sd_pipeline(root, "v_prediction", seed=5), root / "sd-v"),
        "sdxl": save_pipeline(tiny_sdxl_pipeline(root), root / "sdxl"),
    }
    (root / "prompts.txt").write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    out["prompts"] = root / "prompts.txt"
    return out


def _pipeline(folder: Path):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder), use_safetensors=True)


@pytest.mark.parametrize("kind", ["sd", "sd-v", "sdxl"])
def test_latent_denoiser_is_the_closed_form_conversion_of_the_unet(folders, kind):
    """At a training timestep, D(x, sigma) is the scheduler's x0 of the UNet's output (float64)."""
    teacher = load_teacher(str(folders[kind]), prompts=str(folders["prompts"])).to(torch.float64)
    assert isinstance(teacher, LatentDenoiser) and teacher.sample_shape == (4, 8, 8)
    assert teacher.prediction_type == ("v_prediction" if kind == "sd-v" else "epsilon")
    cond = {k: v.double() for k, v in teacher.conditioning.grid(3, "cpu").items()}
    t = torch.tensor([999, 625, 20])
    a = teacher.alphas_cumprod[t]
    sigma = ((1 - a) / a).sqrt()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    x_t = x * a.sqrt().reshape(-1, 1, 1, 1)
    kwargs = teacher.network_kwargs(cond, torch.float64)
    out = teacher.model(x_t, t.double(), **kwargs).sample
    ab = a.reshape(-1, 1, 1, 1)
    if kind == "sd-v":
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * out
    else:
        x0 = (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    torch.testing.assert_close(teacher(x, sigma, **cond), x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_embeddings_and_unconditional_input_are_diffusers_own(folders, kind):
    teacher = load_teacher(str(folders[kind]), prompts=str(folders["prompts"]))
    pipe = _pipeline(folders[kind])
    c = teacher.conditioning
    assert c.prompts == PROMPTS
    if kind == "sd":
        emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        torch.testing.assert_close(c.embeds["encoder_hidden_states"], emb, rtol=0, atol=0)
        torch.testing.assert_close(c.null(1, "cpu")["encoder_hidden_states"], neg[:1], rtol=0, atol=0)
        assert neg.abs().max() > 0  # SD 1/2: the empty prompt's embedding
    else:
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        torch.testing.assert_close(c.embeds["encoder_hidden_states"], emb, rtol=0, atol=0)
        torch.testing.assert_close(c.embeds["text_embeds"], pooled, rtol=0, atol=0)
        null = c.null(2, "cpu")
        assert null["encoder_hidden_states"].abs().max() == 0 and null["text_embeds"].abs().max() == 0  # force_zeros
        assert c.embeds["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]


@pytest.mark.parametrize("kind", KINDS)
def test_cfg_equals_diffusers_guidance_scale(folders, kind):
    """Our CFG at w equals the pipeline's classifier-free guidance at guidance_scale = 1 + w
    (two DDIM steps from the same latents, compared in latent space, in float64)."""
    from diffusers import DDIMScheduler

    w = 2.5
    sampler = load_sampler(str(folders[kind]), steps=2, guidance_scale=w, device="cpu")
    sampler.denoiser.to(torch.float64).components.pipe.to(torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = sampler.denoiser.prompt_cond([PROMPTS[0]] * 2, "cpu")
    ours = sampler.draw(z, cond, torch.Generator())
    pipe = _pipeline(folders[kind]).to(torch.float64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                                 clip_sample=False)
    theirs = pipe([PROMPTS[0]] * 2, num_inference_steps=2, guidance_scale=1 + w, latents=z.clone(), output_type="latent").images
    # diffusers' scheduler keeps alphas_cumprod in float32: agreement to ~1e-6, where a wrong convention is off by O(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    unguided = load_sampler(str(folders[kind]), steps=2, device="cpu").draw(z, cond, torch.Generator())
    assert (unguided - ours).abs().max() > 1e-3  # guidance changed something


def test_embedding_cache_is_keyed_by_prompt_and_encoder(folders, tmp_path):
    cache = EmbeddingCache(tmp_path / "emb")
    teacher = load_teacher(str(folders["sd"]), cache_embeddings=False)
    comps = teacher.components
    first = cache.get(comps, PROMPTS)
    assert cache.last_encoded == 4
    again = cache.get(comps, PROMPTS)
    assert cache.last_encoded == 0 and torch.equal(first["encoder_hidden_states"], again["encoder_hidden_states"])
    cache.get(comps, PROMPTS + ["a large nine"])
    assert cache.last_encoded == 1  # a new prompt: only it is encoded
    reordered = cache.get(comps, PROMPTS[::-1])
    assert cache.last_encoded == 0 and torch.equal(reordered["encoder_hidden_states"][0], first["encoder_hidden_states"][-1])
    with torch.no_grad():  # a changed encoder: nothing cached applies
        comps.pipe.text_encoder.final_layer_norm.bias.add_(0.5)
    changed = cache.get(comps, PROMPTS)
    assert cache.last_encoded == 4 and not torch.allclose(changed["encoder_hidden_states"], first["encoder_hidden_states"])
    torch.testing.assert_close(changed["encoder_hidden_states"], comps.encode_prompts(PROMPTS)["encoder_hidden_states"])
    assert len(list((tmp_path / "emb").glob("*.safetensors"))) == 2 and not list((tmp_path / "emb").glob(".*tmp"))


def test_read_prompts_from_file_and_caption_folder(tmp_path, folders):
    assert read_prompts(folders["prompts"]) == PROMPTS
    caps = tmp_path / "caps"
    caps.mkdir()
    for i, p in enumerate(PROMPTS):
        (caps / f"{i:03d}.txt").write_text(p + "\n")
        (caps / f"{i:03d}.png").write_bytes(b"")
    assert read_prompts(caps) == PROMPTS
    with pytest.raises(FileNotFoundError, match="nope.txt: no such prompt file"):
        read_prompts(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        read_prompts(tmp_path / "empty.txt")


def _cfg(folders, kind: str, objective: dict, tmp_path: Path, **extra) -> DistillConfig:
    return tiny_run_config({"path": str(folders[kind]), "prompts": str(folders["prompts"]), "guidance_scale": 1.0}, objective, tmp_path, **extra)


OBJECTIVES = {
    "sid": {"name": "sid"},
    "dmd": {"name": "fdistill", "divergence": "reverse_kl", "noise": "timesteps", "tmin": 20, "tmax": 980},
    "fdistill-js": {"name": "fdistill", "divergence": "js"},
    "sid-lsg": {"name": "sid", "alpha": 1.0, "fake_guidance_train": 1.0, "fake_guidance_eval": 1.0},
}


@pytest.mark.parametrize("kind,objective", [("sd", "sid"), ("sd", "dmd"), ("sdxl", "sid"), ("sd", "sid-lsg")])
def test_data_free_objectives_train_on_text_to_image_teachers(folders, kind, objective, tmp_path):
    """A few steps of each data-free objective: finite losses, a trained UNet, decoded RGB grids,
    a student folder that is a stock pipeline of the teacher's class."""
    cfg = _cfg(folders, kind, OBJECTIVES[objective], tmp_path)
    student_dir = distill(cfg)
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == ("StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline")
    assert meta["timesteps"] == [625.0] and meta["prompts"] == str(folders["prompts"])
    index = json.loads((student_dir / "model_index.json").read_text())
    assert index["_class_name"] == meta["pipeline"]
    from PIL import Image

    grid = Image.open(tmp_path / "run" / "samples" / "latest.png")
    assert grid.mode == "RGB"
    teacher_unet = _pipeline(folders[kind]).unet.state_dict()
    student_unet = _pipeline(student_dir).unet.state_dict()
    assert any(not torch.equal(teacher_unet[k], v) for k, v in student_unet.items())


def test_student_default_and_configured_timesteps(folders, tmp_path):
    task = build_distill_task(_cfg(folders, "sd", {"name": "sid"}, tmp_path))
    teacher = task.networks["teacher"]
    student = task.networks["generator"]
    assert float(teacher.inner.sigma_to_timestep(torch.tensor(student.sigmas, dtype=torch.float64))[0]) == pytest.approx(625, abs=1e-9)
    task = build_distill_task(_cfg(folders, "sd", {"name": "sid"}, tmp_path, student={"init_timestep": 999}))
    assert task.networks["generator"].sigmas[0] == pytest.approx(teacher.sigma_max)
    with pytest.raises(ConfigError, match=r"timesteps \[624\.\d+\].*student\.init_timestep"):
        build_distill_task(_cfg(folders, "sd", {"name": "sid"}, tmp_path, student={"init_sigma": 2.5}))
    with pytest.raises(ConfigError, match="init_timestep: 1000 is outside the teacher's timesteps 0..999"):
        build_distill_task(_cfg(folders, "sd", {"name": "sid"}, tmp_path, student={"init_timestep": 1000}))
    with pytest.raises(ConfigError, match="init_sigma and student.init_timestep both set"):
        _cfg(folders, "sd", {"name": "sid"}, tmp_path, student={"init_timestep": 999, "init_sigma": 2.5})


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """A folder of 12 RGB images (20x24, to be resized and cropped to 16x16) with captions."""
    from PIL import Image

    root = tmp_path_factory.mktemp("captioned")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(PROMPTS[i % 4] + "\n")
    return root


REAL_DATA_OBJECTIVES = {
    "progressive": {"name": "progressive", "start_steps": 4},
    "dmd2": {"name": "fdistill", "divergence": "reverse_kl", "gan_weight": 0.01, "noise": "timesteps", "tmin": 20, "tmax": 980},
    "sida": {"name": "sid", "adv_weight": 0.01},
}


@pytest.mark.parametrize("objective", list(REAL_DATA_OBJECTIVES))
def test_real_data_objectives_on_text_to_image_teachers(folders, captioned, objective, tmp_path):
    """Objectives that need real images train on an image + caption folder, encoded to latents once."""
    from distilldiff.teachers.text import LatentCache

    cfg = _cfg(folders, "sd", REAL_DATA_OBJECTIVES[objective], tmp_path, data=str(captioned))
    student_dir = distill(cfg)
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["pipeline"] == "StableDiffusionPipeline" and len(meta["sigmas"]) == 1
    cache = LatentCache()
    teacher = load_teacher(str(folders["sd"]))
    from distilldiff.data import read_captioned_images

    images, captions = read_captioned_images(captioned, (16, 16), 3)
    latents = cache.get(teacher.components, images)
    assert cache.last_encoded == 0 and latents.shape == (12, 4, 8, 8)  # the run cached every image
    torch.testing.assert_close(latents[:2], teacher.components.encode(images[:2]))


def test_captioned_image_folders(captioned, tmp_path):
    from distilldiff.data import read_captioned_images

    images, captions = read_captioned_images(captioned, (16, 16), 3)
    assert images.shape == (12, 3, 16, 16) and images.min() >= -1 and images.max() <= 1 and captions[:2] == PROMPTS[:2]
    grey, _ = read_captioned_images(captioned, (8, 8), 1)
    assert grey.shape == (12, 1, 8, 8)
    (tmp_path / "a.png").write_bytes((captioned / "img00.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="a.png: no caption file a.txt"):
        read_captioned_images(tmp_path, (16, 16), 3)
    with pytest.raises(FileNotFoundError, match="no images"):
        read_captioned_images(_empty(tmp_path), (16, 16), 3)


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir(exist_ok=True)
    return tmp_path / "empty"


def test_unsupported_settings_are_one_line_errors(folders, tmp_path):
    with pytest.raises(ConfigError, match="needs real data: set 'data:' to a folder of image \\+ caption pairs"):
        build_distill_task(_cfg(folders, "sd", {"name": "progressive", "start_steps": 4}, tmp_path))
    with pytest.raises(ConfigError, match="data: mnist5k needs a teacher of grey square images"):
        build_distill_task(_cfg(folders, "sd", {"name": "progressive", "start_steps": 4}, tmp_path, data="mnist5k"))
    with pytest.raises(ConfigError, match="export as stock pipelines with an LCMScheduler: set objective.schedule: lcm"):
        build_distill_task(_cfg(folders, "sd", {"name": "consistency"}, tmp_path, data=str(_empty(tmp_path))))
    with pytest.raises(ConfigError, match="students of pixel teachers use schedule: karras"):
        build_distill_task(load_config(DistillConfig, "configs/mnist/consistency.yaml", ["objective.schedule=lcm"]))
    with pytest.raises(ValueError, match="text-to-image pipeline, conditioned on prompts, not class labels"):
        load_teacher(str(folders["sd"]), num_classes=10)
    with pytest.raises(ValueError, match="teacher.prompts: builtin:mnist is not a text-to-image pipeline"):
        load_teacher("builtin:mnist", prompts=str(folders["prompts"]))
    sampler = load_sampler(str(folders["sd"]), steps=1, device="cpu")
    with pytest.raises(ValueError, match="no prompts to draw from"):
        sampler.sample(2)
    with pytest.raises(ValueError, match="--prompt given, but the model is not a text-to-image model"):
        load_sampler("builtin:mnist", steps=1, device="cpu").sample(2, prompt="a seven")


PLAIN_DIFFUSERS = r"""
import sys, torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
folder, kind, prompt, k, latents, out = sys.argv[1:]
cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
pipe = cls.from_pretrained(folder, use_safetensors=True)
z = torch.load(latents)
images = pipe([prompt] * z.shape[0], num_inference_steps=int(k), guidance_scale=1.0, latents=z, output_type="pt").images
torch.save(images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules), "plain diffusers must not import distilldiff"
"""


@pytest.mark.parametrize("kind", KINDS)
def test_export_runs_in_plain_diffusers_in_a_fresh_process(folders, kind, tmp_path):
    """The exported student, called as its model card says, reproduces distilldiff's sampler within 1e-5."""
    from distilldiff.export import export_run

    cfg = _cfg(folders, kind, OBJECTIVES["sid"], tmp_path, student={"init_timestep": 999 if kind == "sd" else 625})
    distill(cfg)
    out = export_run(tmp_path / "run", tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "num_inference_steps=1, guidance_scale=1.0" in card
    prompt, seed, n = PROMPTS[2], 3, 3
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=seed, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(seed))  # the sampler's noise
    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(out), kind, prompt, "1", str(tmp_path / "z.pt"),
                           str(tmp_path / "theirs.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    assert theirs.shape == ours.shape == (n, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # different noise, different images


def test_prompt_sampling_on_the_command_line(folders, tmp_path):
    from distilldiff.cli import main

    out = tmp_path / "grid.png"
    assert main(["sample", "--model", str(folders["sd"]), "--steps", "2", "--num", "4", "--prompt", "a thin one",
                 "--guidance-scale", "2", "--out", str(out), "--device", "cpu"]) in (None, 0)
    from PIL import Image

    assert Image.open(out).mode == "RGB"


def test_teacher_in_bfloat16_keeps_students_in_float32(folders, tmp_path):
    cfg = _cfg(folders, "sd", OBJECTIVES["sid"], tmp_path)
    cfg.teacher.dtype = "bfloat16"
    task = build_distill_task(cfg)
    assert next(task.networks["teacher"].inner.model.parameters()).dtype == torch.bfloat16
    assert next(task.networks["generator"].denoiser.model.parameters()).dtype == torch.float32
    z = torch.randn(2, 4, 8, 8)
    cond = task.cond_fn(2, "cpu")
    d = task.networks["teacher"](z, torch.full((2,), 2.0), **cond)
    assert d.dtype == torch.float32 and torch.isfinite(d).all()
    assert isinstance(task.networks["teacher"], CFGDenoiser)


PLAIN_DIFFUSERS_LORA = r"""
import sys, torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
teacher, student, prompt, latents, out = sys.argv[1:]
pipe = StableDiffusionPipeline.from_pretrained(teacher, use_safetensors=True)
pipe.load_lora_weights(student + "/lora")
pipe.scheduler = DDIMScheduler.from_pretrained(student, subfolder="scheduler")
z = torch.load(latents)
torch.save(pipe([prompt] * z.shape[0], num_inference_steps=1, guidance_scale=1.0, latents=z, output_type="pt").images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules)
"""


def test_lora_student_trains_only_its_adapter_and_exports_both_ways(folders, tmp_path):
    """student.lora_rank: only the LoRA weights change (the copied base weights stay bitwise the
    teacher's); the export holds the merged UNet and the adapter alone, and plain diffusers gives
    the same images from either (the teacher's pipeline with load_lora_weights)."""
    from distilldiff.engine import Engine
    from distilldiff.export import export_run

    cfg = _cfg(folders, "sd", OBJECTIVES["sid"], tmp_path, student={"lora_rank": 4, "init_timestep": 999})
    task = build_distill_task(cfg)
    unet = task.networks["generator"].denoiser.model
    trainable = {id(p) for p in task.networks["generator"].trainable_parameters()}
    named = dict(unet.named_parameters())
    assert trainable == {id(p) for n, p in named.items() if "lora_" in n} and len(trainable) > 0
    before = {n: p.detach().clone() for n, p in named.items()}
    Engine(task, cfg.train, tmp_path / "run").run(cfg)
    teacher_unet = _pipeline(folders["sd"]).unet.state_dict()
    changed = [n for n, p in unet.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    for n, p in unet.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, teacher_unet[n.replace(".base_layer", "")]), n
    out = export_run(tmp_path / "run", tmp_path / "export")
    meta = json.loads((out / "distilldiff_student.json").read_text())
    assert meta["lora"]["rank"] == 4 and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert "load_lora_weights" in (out / "README.md").read_text()
    prompt, n = PROMPTS[1], 2
    ours = (load_sampler(str(out), device="cpu").sample(n, seed=1, prompt=prompt) + 1) / 2
    z = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.save(z, tmp_path / "z.pt")
    for script, args in ((PLAIN_DIFFUSERS, [str(out), "sd", prompt, "1"]), (PLAIN_DIFFUSERS_LORA, [str(folders["sd"]), str(out), prompt])):
        proc = subprocess.run([sys.executable, "-c", script, *args, str(tmp_path / "z.pt"), str(tmp_path / "theirs.pt")],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        torch.testing.assert_close(torch.load(tmp_path / "theirs.pt"), ours, rtol=0, atol=1e-5)


def test_lora_keys_are_refused_where_they_cannot_apply(folders, tmp_path):
    from distilldiff.config import DistillConfig, load_config

    with pytest.raises(ConfigError, match="lora_alpha is set but student.lora_rank is not"):
        _cfg(folders, "sd", OBJECTIVES["sid"], tmp_path, student={"lora_alpha": 8})
    mnist = load_config(DistillConfig, Path(__file__).resolve().parents[1] / "configs/mnist/sid.yaml", ["student.lora_rank=4"])
    with pytest.raises(ValueError, match="has no adapter support"):
        build_distill_task(mnist)


def test_gradient_checkpointing_gives_the_same_update(folders, tmp_path):
    """train.gradient_checkpointing changes memory, not the math: two SiD steps end with the same weights."""
    from safetensors.torch import load_file

    runs = []
    for flag in (False, True):
        cfg = _cfg(folders, "sd", OBJECTIVES["sid"], tmp_path / str(flag), train={"max_steps": 2, "batch_size": 2,
                   "checkpoint_every": 2, "sample_every": 2, "num_sample_images": 2, "gradient_checkpointing": flag})
        runs.append(load_file(str(distill(cfg) / "unet" / "diffusion_pytorch_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    for k in runs[0]:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-6)
    from distilldiff.engine.engine import enable_gradient_checkpointing

    with pytest.raises(ValueError, match="gradient_checkpointing: the network 'critic' \\(Linear\\) has no sub-network"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "critic")


def test_guidance_input_starts_as_the_teacher_and_takes_diffusers_embedding(folders):
    """A w-conditioned copy (LCM's time_cond_proj_dim) equals the teacher at every w at first, and
    feeds the UNet the stock pipelines' own embedding of w (float64)."""
    from distilldiff.students import guidance_conditioned_copy

    teacher = load_teacher(str(folders["sd"]), prompts=str(folders["prompts"])).to(torch.float64)
    student = guidance_conditioned_copy(teacher)
    assert student.takes_guidance_scale and not teacher.takes_guidance_scale
    assert student.model.config.time_cond_proj_dim == 256
    cond = {k: v.double() for k, v in teacher.conditioning.grid(3, "cpu").items()}
    x, sigma = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    for w in (0.0, 2.5):
        torch.testing.assert_close(student(x, sigma, guidance_scale=torch.full((3,), w), **cond), teacher(x, sigma, **cond),
                                   rtol=0, atol=1e-12)
    w = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    kwargs = student.network_kwargs({**cond, "guidance_scale": w}, torch.float64)
    pipe = _pipeline(folders["sd"])
    torch.testing.assert_close(kwargs["timestep_cond"], pipe.get_guidance_scale_embedding(w.float(), 256).double(), rtol=0, atol=0)
    with torch.no_grad():
        student.model.time_embedding.cond_proj.weight.normal_()
    a, b = (student(x, sigma, guidance_scale=torch.full((3,), v), **cond) for v in (0.0, 2.5))
    assert (a - b).abs().max() > 1e-3  # the weight reaches the output
    with pytest.raises(ValueError, match="no guidance input"):
        teacher(x, sigma, guidance_scale=w, **cond)
    with pytest.raises(ValueError, match="objective.guidance_embed_scale: a text-to-image student takes w"):
        guidance_conditioned_copy(teacher, guidance_embed_scale=10.0)
    assert student.learning_rate_scales() == {}  # unset gain, consistency's default 1: one learning rate


def test_guidance_input_learns_at_its_gain_times_the_learning_rate(folders, captioned, tmp_path):
    """guidance_embed_gain of a text-to-image student multiplies the learning rate of its zero-started
    cond_proj (its own optimiser group, kept through the linear schedule); every other weight keeps lr."""
    from distilldiff.engine import Engine

    objective = {"name": "consistency", "schedule": "lcm", "num_scales": 50, "solver": "euler", "sample_steps": 2,
                 "w_min": 0.0, "w_max": 3.0, "guidance_embed_gain": 30.0}
    cfg = _cfg(folders, "sd", objective, tmp_path, data=str(captioned))
    cfg.teacher.guidance_scale = 0.0
    cfg.train.lr, cfg.train.lr_schedule, cfg.train.max_steps = 1e-4, "linear", 2
    task = build_distill_task(cfg)
    cond_proj = task.networks["student"].denoiser.inner.model.time_embedding.cond_proj.weight
    assert task.networks["student"].learning_rate_scales() == {cond_proj: 30.0}
    engine = Engine(task, cfg.train, tmp_path / "run")
    groups = engine.optimizers["student"].param_groups
    assert sorted((g["lr_scale"], len(g["params"])) for g in groups)[1] == (30.0, 1)
    assert {g["lr_scale"]: g["lr"] for g in groups} == {1.0: pytest.approx(1e-4), 30.0: pytest.approx(3e-3)}
    engine.train()
    assert {g["lr_scale"]: g["lr"] for g in groups} == {1.0: pytest.approx(0.5e-4), 30.0: pytest.approx(1.5e-3)}  # step 2 of 2


LCM_PLAIN_DIFFUSERS = r"""
import json, sys, torch
from diffusers import StableDiffusionPipeline
folder, prompt, calls, out, scheduler = sys.argv[1:]
pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
images = {}
for k, gs, seed in json.loads(calls):
    images[f"{k}-{gs}"] = pipe([prompt] * 3, num_inference_steps=k, guidance_scale=gs, generator=torch.Generator().manual_seed(seed),
                               output_type="pt").images
    assert type(pipe.scheduler).__name__ == scheduler
torch.save(images, out)
assert not any(m.startswith("distilldiff") for m in sys.modules), "plain diffusers must not import distilldiff"
"""


def test_lcm_student_with_a_guidance_input_exports_as_a_stock_lcm_pipeline(folders, captioned, tmp_path):
    """LCM-style consistency distillation (schedule: lcm, w ~ U[0, 3]) of a tiny SD teacher: the
    student folder is a StableDiffusionPipeline with an LCMScheduler; plain diffusers in a fresh
    process, called with num_inference_steps=K and guidance_scale=1 + w, reproduces distilldiff's
    sampler within 1e-5 for several K (chosen at sampling time) and w, re-noising included."""
    from distilldiff.export import load_student, save_student

    objective = {"name": "consistency", "schedule": "lcm", "num_scales": 50, "solver": "euler", "sample_steps": 2,
                 "w_min": 0.0, "w_max": 3.0}
    cfg = _cfg(folders, "sd", objective, tmp_path, data=str(captioned))
    cfg.teacher.guidance_scale = 0.0
    student_dir = distill(cfg)
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["scheduler"] == "LCMScheduler" and meta["timesteps"] == [999.0, 499.0] and meta["guidance_scale"] == 1.5
    assert "num_inference_steps=2, guidance_scale=2.5" in (student_dir / "README.md").read_text()
    student, meta = load_student(student_dir)
    with torch.no_grad():  # a guidance input far from its zero start, so that w visibly matters
        student.denoiser.inner.model.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    out = save_student(student, tmp_path / "perturbed", {"teacher": meta["teacher"], "objective": "consistency",
                                                        "consistency_grid": meta["consistency_grid"], "default_guidance_scale": 1.5})
    calls, prompt = [(2, 2.5, 7), (4, 1.0, 8), (1, 4.0, 9)], PROMPTS[1]
    proc = subprocess.run([sys.executable, "-c", LCM_PLAIN_DIFFUSERS, str(out), prompt, json.dumps(calls), str(tmp_path / "theirs.pt"),
                           "LCMScheduler"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    ours = {}
    for k, gs, seed in calls:
        ours[k] = (load_sampler(str(out), steps=k, guidance_scale=gs - 1, device="cpu").sample(3, seed=seed, prompt=prompt) + 1) / 2
        torch.testing.assert_close(ours[k], theirs[f"{k}-{gs}"], rtol=0, atol=1e-5)
    w_matters = load_sampler(str(out), steps=2, guidance_scale=0.0, device="cpu").sample(3, seed=7, prompt=prompt)
    assert ((w_matters + 1) / 2 - ours[2]).abs().max() > 1e-3


def test_lora_critic_shares_the_teachers_weights(folders, tmp_path):
    """critic.lora_rank: the fake score is a LoRA adapter on the teacher's own UNet. The teacher
    (adapter off) stays bitwise the teacher through training, the critic moves away from it, one
    copy of the UNet serves both, and checkpoints hold the adapter alone and restore it."""
    from safetensors.torch import load_file

    from distilldiff.engine import Engine
    from distilldiff.students import LoRAFakeScore

    cfg = _cfg(folders, "sd", OBJECTIVES["sid"], tmp_path, critic={"lora_rank": 4})
    task = build_distill_task(cfg)
    teacher, critic, student = task.networks["teacher"], task.networks["fake_score"], task.networks["generator"]
    assert isinstance(critic, LoRAFakeScore) and critic.teacher is teacher.inner
    unique = {id(p): p.numel() for net in task.networks.values() for p in net.parameters()}
    unet = sum(p.numel() for p in student.parameters())
    assert sum(unique.values()) < 1.1 * 2 * unet  # teacher + student (+ a small adapter), not three UNets
    x, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 3.0])
    cond = teacher.conditioning.grid(2, "cpu")
    before = {k: v.clone() for k, v in teacher.inner.model.state_dict().items() if "lora_" not in k}
    with torch.no_grad():
        guided, t0 = teacher(x, sigma, **cond), teacher.inner(x, sigma, **cond)
        torch.testing.assert_close(critic(x, sigma, **cond), t0, rtol=0, atol=0)  # B = 0: the critic starts as the teacher
    engine = Engine(task, cfg.train, tmp_path / "run")
    engine.train()
    after = {k: v for k, v in teacher.inner.model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x, sigma, **cond), guided, rtol=0, atol=0)
        torch.testing.assert_close(teacher.inner(x, sigma, **cond), t0, rtol=0, atol=0)
        assert (critic(x, sigma, **cond) - t0).abs().max() > 1e-6
    saved = load_file(str(engine.run_folder.find_checkpoint("latest") / "model.safetensors"))
    assert set(saved) == {f"lora.{k}" for k in critic.lora} and sum(v.numel() for v in saved.values()) < 0.1 * unet
    lora = {k: v.clone() for k, v in critic.lora.items()}
    resumed_task = build_distill_task(cfg)
    resumed = Engine(resumed_task, cfg.train, tmp_path / "run")
    resumed.load_checkpoint(resumed.run_folder.find_checkpoint("latest"))
    for k, v in resumed_task.networks["fake_score"].lora.items():
        torch.testing.assert_close(v, lora[k], rtol=0, atol=0)


def test_lora_critic_with_a_bfloat16_teacher_trains_in_float32(folders, tmp_path):
    cfg = _cfg(folders, "sd", OBJECTIVES["dmd"], tmp_path, critic={"lora_rank": 2, "lora_alpha": 4})
    cfg.teacher.dtype = "bfloat16"
    task = build_distill_task(cfg)
    base = next(p for n, p in task.networks["teacher"].inner.model.named_parameters() if "lora_" not in n)
    assert base.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in task.networks["fake_score"].trainable_parameters())
    from distilldiff.engine import Engine

    Engine(task, cfg.train, tmp_path / "run").train()
    assert all(torch.isfinite(p).all() for p in task.networks["fake_score"].trainable_parameters())


def test_lora_critic_is_refused_where_it_cannot_apply(folders, captioned, tmp_path):
    def error(objective, **extra):
        with pytest.raises(ConfigError) as e:
            build_distill_task(_cfg(folders, "sd", objective, tmp_path, **extra))
        return str(e.value)

    assert "objective 'progressive' has 0 critics" in error(REAL_DATA_OBJECTIVES["progressive"], critic={"lora_rank": 4},
                                                          data=str(captioned))
    assert "a LoRA critic is a plain fake score; a discriminator head (SiDA, DMD2's GAN) needs a full critic" in error(REAL_DATA_OBJECTIVES["sida"], critic={"lora_rank": 4},
                                                                            data=str(captioned))
    assert "train.gradient_checkpointing with critic.lora_rank" in error(
        OBJECTIVES["sid"], critic={"lora_rank": 4},
        train={"max_steps": 1, "batch_size": 2, "gradient_checkpointing": True})
    with pytest.raises(ConfigError, match="critic.lora_rank: the teacher's network \\(UNet2DModel\\) has no adapter support"):
        build_distill_task(load_config(DistillConfig, "configs/mnist/sid.yaml", ["critic.lora_rank=4"]))
    with pytest.raises(ConfigError, match="critic.lora_alpha is set but critic.lora_rank is not"):
        load_config(DistillConfig, "configs/mnist/sid.yaml", ["critic.lora_alpha=4"])


def test_real_data_stream_resumes_where_the_checkpoint_left_it(folders, captioned, tmp_path):
    """Text-to-image real data comes through an accelerate-prepared DataLoader (ShardedBatches); a
    run stopped at step 3 and resumed to 6 ends with the weights of an uninterrupted 6-step run
    (bitwise): same batches, same noise, same target network. 12 images, batch 4: epochs of 3."""
    from distilldiff.data import ShardedBatches
    from distilldiff.engine import Engine

    objective = {"name": "consistency", "schedule": "lcm", "num_scales": 50, "solver": "euler", "sample_steps": 2}
    cfg = _cfg(folders, "sd", objective, tmp_path, data=str(captioned))
    cfg.teacher.guidance_scale = 0.0
    cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.sample_every = 4, 3, 100
    runs = {}
    for name, stops in (("full", [6]), ("resumed", [3, 6])):
        for i, max_steps in enumerate(stops):
            cfg.train.max_steps = max_steps
            task = build_distill_task(cfg)
            assert isinstance(task.data_fn, ShardedBatches)
            engine = Engine(task, cfg.train, tmp_path / name)
            engine.train(resume="latest" if i else None)
        assert engine.task.data_fn.state_dict() == {"batches_drawn": 6}
        runs[name] = engine.task.networks["student"].state_dict()
    assert all(torch.equal(runs["full"][k], runs["resumed"][k]) for k in runs["full"])
    teacher = load_teacher(str(folders["sd"])).model.state_dict()
    prefix = "denoiser.inner.model."
    assert any(not torch.equal(teacher[k[len(prefix):]], v) for k, v in runs["full"].items() if k.startswith(prefix))


def test_memory_benchmark_tool_runs_on_a_tiny_pipeline(tmp_path):
    """tools/bench_t2i_memory.py (SD 1.5 size on a GPU) stays runnable: the tiny size on the CPU,
    two variants, one fresh process each; the LoRA critic trains far fewer parameters."""
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "tools/bench_t2i_memory.py", "--size", "tiny", "--device", "cpu", "--warmup", "1",
                        "--steps", "1", "--lora-rank", "2", "--variants", "full", "bf16_lora_critic", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["variant"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {"full", "bf16_lora_critic"} and not any("error" in row for row in rows.values()), rows
    assert rows["bf16_lora_critic"]["params_trained"] < 0.8 * rows["full"]["params_trained"]
    assert rows["bf16_lora_critic"]["params_in_memory"] < 0.8 * rows["full"]["params_in_memory"]
    assert (out / "table.md").read_text().count("\n") == 4


def test_guidance_distilled_student_exports_with_its_w_input(folders, captioned, tmp_path):
    """Guidance distillation (Meng et al.) of a tiny SD teacher: a 2-step DDIM student with diffusers'
    w input; plain diffusers, called with guidance_scale = 1 + w, reproduces our sampler within 1e-5."""
    from distilldiff.export import load_student, save_student

    cfg = _cfg(folders, "sd", {"name": "guidance", "w_min": 0.0, "w_max": 3.0, "default_w": 1.0, "sample_steps": 2}, tmp_path,
               data=str(captioned))
    cfg.teacher.guidance_scale = 0.0
    student_dir = distill(cfg)
    meta = json.loads((student_dir / "distilldiff_student.json").read_text())
    assert meta["scheduler"] == "DDIMScheduler" and meta["guidance_scale"] == 1.0 and len(meta["sigmas"]) == 2
    student, meta = load_student(student_dir)
    assert student.denoiser.model.config.time_cond_proj_dim == 256
    with torch.no_grad():
        student.denoiser.model.time_embedding.cond_proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    out = save_student(student, tmp_path / "perturbed", {"teacher": meta["teacher"], "objective": "guidance", "default_guidance_scale": 1.0})
    calls, prompt = [(2, 1.0, 4), (2, 3.5, 5)], PROMPTS[0]
    proc = subprocess.run([sys.executable, "-c", LCM_PLAIN_DIFFUSERS, str(out), prompt, json.dumps(calls), str(tmp_path / "theirs.pt"),
                           "DDIMScheduler"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    ours = [(load_sampler(str(out), guidance_scale=gs - 1, device="cpu").sample(3, seed=seed, prompt=prompt) + 1) / 2
            for _, gs, seed in calls]
    for (k, gs, _), mine in zip(calls, ours):
        torch.testing.assert_close(mine, theirs[f"{k}-{gs}"], rtol=0, atol=1e-5)
