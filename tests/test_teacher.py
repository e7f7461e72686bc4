"""The shipped MNIST teacher: plain diffusers loads it, and our DDIM equals diffusers' DDIM."""

import subprocess
import sys

import pytest
import torch

from distilldiff.samplers import ddim_sample
from distilldiff.teachers import VPDenoiser, builtin_teacher_path, load_teacher


def test_plain_diffusers_loads_the_shipped_teacher():
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(str(builtin_teacher_path("mnist")), use_safetensors=True)
    assert pipe.unet.config.num_class_embeds == 11 and pipe.unet.config.sample_size == 28
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_loaded_teacher_metadata():
    t = load_teacher("builtin:mnist")
    assert isinstance(t, VPDenoiser)
    assert (t.num_classes, t.null_class, t.sample_shape) == (10, 10, (1, 28, 28))
    assert t.sigma_min == pytest.approx(0.01, rel=0.01) and t.sigma_max == pytest.approx(157.4, rel=0.01)


@torch.no_grad()
def test_ddim_in_sigma_space_equals_diffusers_ddim_scheduler():
    from diffusers import DDIMScheduler

    teacher = load_teacher("builtin:mnist").eval()
    unet = teacher.model
    sched = DDIMScheduler.from_config(teacher.scheduler_config, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 28, 28, generator=g)
    labels = torch.tensor([0, 3, 7, 9])
    x = z.clone()
    for t in sched.timesteps:
        eps = unet(x, t, class_labels=labels).sample
        x = sched.step(eps, t, x).prev_sample
    ours = ddim_sample(teacher, z, teacher.discrete_sigmas(4, "trailing"), class_labels=labels)
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_teacher_train_cli_writes_a_loadable_pipeline(tmp_path):
    out = tmp_path / "teacher"
    cmd = [
        sys.executable, "-m", "distilldiff.cli", "teacher", "train", "--config", "configs/mnist/teacher.yaml",
        "--output-dir", str(out),
        "--set", "model.block_out_channels=[8, 8, 8]", "--set", "model.norm_num_groups=4",
        "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "sample_steps=2",
        "--set", "train.num_sample_images=4",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    t = VPDenoiser.from_pretrained(out / "student")
    assert t.num_classes == 10 and t.null_class == 10
    assert (out / "samples" / "latest.png").is_file() and (out / "checkpoints" / "step-0000002").is_dir()


def test_missing_pipeline_folder_contents_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="could not load a diffusers pipeline"):
        load_teacher(str(tmp_path))
