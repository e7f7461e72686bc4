"""Exported students load in plain diffusers (a fresh process that never imports distilldiff)
and sample exactly what distilldiff samples from the same noise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from distilldiff.export import export_run, load_student, save_student, stock_ddim_scheduler
from distilldiff.pipelines import DistillDiffPipeline, GuidedUNet2DModel
from distilldiff.inference import load_sampler
from distilldiff.students import ConsistencyDenoiser, FewStepGenerator, Student
from distilldiff.teachers import VPDenoiser

NUM, SEED = 6, 3


def tiny_denoiser(prediction_type: str = "epsilon", num_classes: int | None = None, seed: int = 0) -> VPDenoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=None if num_classes is None else num_classes + 1,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    den = VPDenoiser(unet, scheduler.alphas_cumprod, prediction_type, (1, 8, 8), num_classes=num_classes,
                     null_class=None if num_classes is None else num_classes)
    den.scheduler_config = dict(scheduler.config)
    return den.eval()


def grid_sigmas(den: VPDenoiser, timesteps: list[int]) -> list[float]:
    return [float(den.schedule.sigmas[t]) for t in timesteps]


def make_students() -> dict[str, tuple[Student, dict]]:
    """The four kinds the issue names: one-step, few-step, class-conditional, guidance-conditioned."""
    one = tiny_denoiser("sample", seed=1)
    few = tiny_denoiser("v_prediction", seed=2)
    cls = tiny_denoiser("epsilon", num_classes=3, seed=3)
    guided = tiny_denoiser("v_prediction", num_classes=3, seed=4)
    guided.model = GuidedUNet2DModel.from_unet(guided.model)
    lcm = tiny_denoiser("v_prediction", num_classes=3, seed=7)
    lcm.model = GuidedUNet2DModel.from_unet(lcm.model)
    with torch.no_grad():  # a trained guidance embedding: make w matter
        guided.model.guidance_embedding.linear_2.weight.normal_(0, 0.5)
        lcm.model.guidance_embedding.linear_2.weight.normal_(0, 0.5)
    return {
        # one step at timestep 599: a DDIMPipeline on the schedule truncated to 600 steps
        "one_step": (Student(one, grid_sigmas(one, [599])), {"objective": "test"}),
        # 4 DDIM steps on the trailing grid of the full schedule: a stock DDIMPipeline
        "few_step": (Student(few, grid_sigmas(few, [999, 749, 499, 249])), {"objective": "test"}),
        # class labels and an off-grid noise level: DistillDiffPipeline
        "class_cond": (Student(cls, [2.5]), {"objective": "test"}),
        # guidance input, 2-step consistency (multistep) sampling: DistillDiffPipeline + custom unet class
        "guided": (Student(guided, [8.0, 0.7], "multistep"), {"objective": "test", "default_guidance_scale": 2.0}),
        # consistency parameterisation, 3-step multistep sampling: DistillDiffPipeline
        "consistency": (Student(ConsistencyDenoiser(tiny_denoiser("v_prediction", seed=6), 0.02), [40.0, 3.0, 0.5], "multistep"),
                        {"objective": "test"}),
        # consistency parameterisation around a guidance-conditioned network (LCM-style)
        "guided_consistency": (Student(ConsistencyDenoiser(lcm, 0.02), [40.0, 1.0], "multistep"),
                               {"objective": "test", "default_guidance_scale": 2.0}),
        # a few-step generator (student.sigmas) whose every x0 is clipped (student.clip_sample): DistillDiffPipeline
        "generator_clip": (FewStepGenerator(tiny_denoiser("epsilon", num_classes=3, seed=8), [2.5, 0.8, 0.2], clip_sample=True),
                           {"objective": "test"}),
    }


PLAIN_DIFFUSERS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from diffusers import DDIMPipeline, DiffusionPipeline
    root, num, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for name in ["one_step", "few_step", "class_cond", "guided", "consistency", "guided_consistency", "generator_clip"]:
        folder = f"{root}/{name}"
        index = json.load(open(folder + "/model_index.json"))
        g = torch.Generator().manual_seed(seed)
        if index["_class_name"] == "DDIMPipeline":
            pipe = DDIMPipeline.from_pretrained(folder, use_safetensors=True)
            steps = len(json.load(open(folder + "/distilldiff_student.json"))["sigmas"])
            out = pipe(batch_size=num, num_inference_steps=steps, eta=0.0, generator=g, output_type="np").images
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
            kwargs = {"guidance_scale": 3.5} if name.startswith("guided") else {}
            out = pipe(batch_size=num, generator=g, output_type="np", **kwargs).images
        np.save(f"{root}/{name}.npy", np.asarray(out))
        print(name, type(pipe).__name__)
    assert not any(m.split(".")[0] == "distilldiff" for m in sys.modules), "distilldiff was imported"
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported")
    students = make_students()
    for name, (student, info) in students.items():
        save_student(student, root / name, info)
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(root), str(NUM), str(SEED)],
                          capture_output=True, text=True, cwd=str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, students, proc.stdout


def test_pipeline_classes(exported):
    root, _, stdout = exported
    classes = dict(line.split() for line in stdout.strip().splitlines())
    assert classes == {"one_step": "DDIMPipeline", "few_step": "DDIMPipeline",
                       "class_cond": "DistillDiffPipeline", "guided": "DistillDiffPipeline",
                       "consistency": "DistillDiffPipeline", "guided_consistency": "DistillDiffPipeline",
                       "generator_clip": "DistillDiffPipeline"}
    for name in classes:
        assert not list((root / name).rglob("*.bin")) and list((root / name / "unet").glob("*.safetensors"))
        assert "```python" in (root / name / "README.md").read_text()


@pytest.mark.parametrize("name", ["one_step", "few_step", "class_cond", "guided", "consistency", "guided_consistency", "generator_clip"])
def test_plain_diffusers_matches_distilldiff(exported, name):
    root, students, _ = exported
    plain = torch.from_numpy(np.load(root / f"{name}.npy")).permute(0, 3, 1, 2)
    kwargs = {"guidance_scale": 3.5} if name.startswith("guided") else {}
    ours = load_sampler(str(root / name), device="cpu", **kwargs).sample(NUM, seed=SEED)
    ours01 = (ours / 2 + 0.5).clamp(0, 1)
    assert (plain - ours01).abs().max() < 1e-5
    # the exported folder samples what the in-memory student samples
    student, _ = students[name]
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn((NUM, *student.sample_shape), generator=g)
    cond = {}
    if student.denoiser.num_classes is not None:
        cond["class_labels"] = torch.arange(NUM) % student.denoiser.num_classes
    if name.startswith("guided"):
        cond["guidance_scale"] = torch.full((NUM,), 3.5)
    with torch.no_grad():
        direct = student(noise, generator=g, **cond)
    assert (direct.clamp(-1, 1) - ours).abs().max() < 1e-5  # sample() gives images, clipped to [-1, 1]
    # not a trivial comparison: most pixels are inside (0, 1), images differ from each other
    assert ((plain > 0) & (plain < 1)).float().mean() > 0.3
    assert (plain[0] - plain[1]).abs().max() > 1e-2


def test_clipped_few_step_generator_exports_its_clip(exported):
    """The pipeline clips every step's x0, as the generator does: without the clip it samples other images."""
    root, students, _ = exported
    student, _ = students["generator_clip"]
    assert json.loads((root / "generator_clip" / "distilldiff_student.json").read_text())["clip_sample"] is True
    assert load_student(root / "generator_clip")[0].clip_sample
    assert "x0 clipped to [-1, 1] | at every step" in (root / "generator_clip" / "README.md").read_text()
    assert "clipped" not in (root / "class_cond" / "README.md").read_text()
    pipe = DistillDiffPipeline.from_pretrained(str(root / "generator_clip"))
    assert pipe.config.clip_sample and pipe.config.sampler == "multistep"
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn((NUM, *student.sample_shape), generator=g)
    cond = {"class_labels": torch.arange(NUM) % 3}
    with torch.no_grad():
        clipped = student(noise, generator=torch.Generator().manual_seed(1), **cond)
        raw = Student(student.denoiser, student.sigmas, "multistep")(noise, generator=torch.Generator().manual_seed(1), **cond)
    assert (clipped - raw.clamp(-1, 1)).abs().max() > 0.1


def test_guidance_scale_reaches_the_network(exported):
    root = exported[0]
    pipe = DistillDiffPipeline.from_pretrained(str(root / "guided"))  # no remote code needed
    a = pipe(batch_size=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(batch_size=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="distilled for 2 step"):
        pipe(batch_size=1, num_inference_steps=50)


def test_guided_unet_starts_as_the_teacher():
    den = tiny_denoiser("epsilon", num_classes=3, seed=5)
    guided = GuidedUNet2DModel.from_unet(den.model).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([10.0, 500.0, 900.0]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        ref = den.model(x, t, class_labels=y).sample
        for w in (0.0, 1.5, 7.0):
            assert torch.allclose(guided(x, t, class_labels=y, guidance_scale=w).sample, ref, atol=1e-6)


def test_stock_ddim_only_where_it_fits():
    den = tiny_denoiser()
    assert stock_ddim_scheduler(Student(den, grid_sigmas(den, [999, 499]))) is not None
    assert stock_ddim_scheduler(Student(den, grid_sigmas(den, [999, 500]))) is None  # not a trailing grid
    assert stock_ddim_scheduler(Student(den, [2.5])) is None  # off the timestep grid
    assert stock_ddim_scheduler(Student(den, grid_sigmas(den, [999, 499]), "multistep")) is None


def _fake_run(tmp_path, student_name="one_step"):
    run = tmp_path / "run"
    student, info = make_students()[student_name]
    save_student(student, run / "student", {**info, "step": 10, "images_seen": 320})
    (run / "checkpoints" / "step-0000010").mkdir(parents=True)
    return run


def test_export_run_and_errors(tmp_path):
    run = _fake_run(tmp_path)
    (run / "fid-mnist5k-100.json").write_text(json.dumps({"fid": 42.5, "num": 100, "reference": "mnist5k", "weights": "w"}))
    out = export_run(run, tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "42.50 (N=100, reference mnist5k" in card and "DDIMPipeline" in card
    student, meta = load_student(out)
    assert meta["fid"]["fid"] == 42.5 and meta["step"] == 10 and student.num_steps == 1

    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run, out)
    export_run(run, out, force=True)

    empty = tmp_path / "empty-run"
    (empty / "logs").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(empty, tmp_path / "out2")

    weights = next((out / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupted"):
        load_student(out)
    weights.unlink()
    (out / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle checkpoints are not read"):
        load_student(out)


def test_cli_export(tmp_path, capsys):
    from distilldiff.cli import main

    run = _fake_run(tmp_path, "class_cond")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "pipeline_distilldiff.py").is_file()
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "exp")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["sample", "--model", str(tmp_path / "exp"), "--num", "4", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


CONSISTENCY_GRID = [0.02, 0.1, 0.5, 1.5, 3.0, 10.0, 40.0]


def _consistency_folder(folder):
    """The tiny 3-step consistency student saved with a training grid and an FID measured at its own levels (42.5)."""
    student, info = make_students()["consistency"]
    save_student(student, folder, {**info, "consistency_grid": CONSISTENCY_GRID})
    (folder / "fid-mnist5k-100.json").write_text(json.dumps({"fid": 42.5, "num": 100, "reference": "mnist5k", "weights": "w"}))


def test_export_with_steps_for_consistency_students_only(tmp_path, capsys):
    """`export --steps K`: a consistency student's pipeline samples in K steps on its training grid (the same noise
    levels as `sample/fid --steps K`); a student distilled for a fixed count refuses another one."""
    from distilldiff.cli import main
    from distilldiff.export import with_steps
    from distilldiff.inference import load_sampler
    from distilldiff.samplers import multistep_sigmas

    grid = CONSISTENCY_GRID
    _consistency_folder(tmp_path / "cm")
    assert main(["export", "--run", str(tmp_path / "cm"), "--out", str(tmp_path / "cm4"), "--steps", "4"]) == 0
    exported, meta = load_student(tmp_path / "cm4")
    assert exported.num_steps == 4 and meta["sigmas"] == pytest.approx(multistep_sigmas(grid, 4))
    assert "fid" not in meta and "42.50" not in (tmp_path / "cm4" / "README.md").read_text()  # measured at 3 steps, not 4
    assert load_student(export_run(tmp_path / "cm", tmp_path / "cm3", steps=3))[1]["fid"]["fid"] == 42.5  # its own count
    assert load_sampler(str(tmp_path / "cm"), steps=4).num_steps == 4
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    resampled = with_steps(*load_student(tmp_path / "cm"), 4, "cm")
    with torch.no_grad():
        torch.testing.assert_close(exported(x, generator=torch.Generator().manual_seed(1)),
                                   resampled(x, generator=torch.Generator().manual_seed(1)))

    assert main(["export", "--run", str(tmp_path / "cm"), "--out", str(tmp_path / "cm0"), "--steps", "0"]) == 2
    assert not (tmp_path / "cm0").exists() and "--steps must be >= 1, got 0" in capsys.readouterr().err
    run = _fake_run(tmp_path, "one_step")
    with pytest.raises(ValueError, match="samples in 1 step"):
        export_run(run, tmp_path / "out", steps=3)
    assert not (tmp_path / "out").exists()


def test_export_at_chosen_noise_levels(tmp_path, capsys):
    """`export --sigmas`: a multistep consistency student's pipeline samples at the given levels (what `sample/fid
    --sigmas` sample), plain diffusers loads it in a fresh process and draws the same images, no FID of its own levels
    is quoted for them; other students, --steps with --sigmas and bad lists are one-line errors that write nothing."""
    from distilldiff.cli import main
    from distilldiff.inference import load_sampler

    _consistency_folder(tmp_path / "cm")
    assert main(["export", "--run", str(tmp_path / "cm"), "--out", str(tmp_path / "lv"), "--sigmas", "30,2,0.1"]) == 0
    exported, meta = load_student(tmp_path / "lv")
    assert meta["sigmas"] == pytest.approx([30.0, 2.0, 0.1]) and exported.sampler == "multistep"
    assert "fid" not in meta and "42.50" not in (tmp_path / "lv" / "README.md").read_text()  # measured at its own levels
    ours = load_sampler(str(tmp_path / "lv"), device="cpu").sample(NUM, seed=SEED)
    torch.testing.assert_close(ours, load_sampler(str(tmp_path / "cm"), device="cpu", sigmas=[30, 2, 0.1]).sample(NUM, seed=SEED))
    assert (ours - load_sampler(str(tmp_path / "cm"), device="cpu").sample(NUM, seed=SEED)).abs().max() > 1e-3
    script = ("import sys, numpy as np, torch\nfrom diffusers import DiffusionPipeline\n"
              "pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "out = pipe(batch_size=int(sys.argv[2]), generator=torch.Generator().manual_seed(int(sys.argv[3])), output_type='np').images\n"
              "np.save(sys.argv[1] + '.npy', np.asarray(out))\n"
              "assert not any(m.split('.')[0] == 'distilldiff' for m in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "lv"), str(NUM), str(SEED)], capture_output=True, text=True,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.from_numpy(np.load(tmp_path / "lv.npy")).permute(0, 3, 1, 2)
    assert (plain - (ours / 2 + 0.5).clamp(0, 1)).abs().max() < 1e-5

    capsys.readouterr()
    for args, message in [(["--sigmas", "30,2,0.1", "--steps", "3"], "give --steps or --sigmas, not both"),
                          (["--sigmas", "30,x"], "--sigmas: expected comma-separated numbers, got 30,x"),
                          (["--sigmas", "2,30"], "student sigmas must decrease strictly")]:
        assert main(["export", "--run", str(tmp_path / "cm"), "--out", str(tmp_path / "bad"), *args]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
    run = _fake_run(tmp_path, "one_step")
    with pytest.raises(ValueError, match="only multistep consistency students sample at chosen noise levels"):
        export_run(run, tmp_path / "out", sigmas=[2.5])
    assert not (tmp_path / "out").exists()


def test_export_of_a_kept_checkpoint(tmp_path, capsys):
    """`export --run RUN/checkpoints/step-N`: the EMA student of update N (picked from eval.jsonl, say), with N and its
    images seen on the model card; the newest checkpoint exports the same student as the run folder; a checkpoint whose
    weights do not fit the run's student, or an incomplete one, is a one-line error and nothing is written."""
    from safetensors.torch import load_file, save_file

    from distilldiff.cli import main

    run = tmp_path / "run"
    assert main(["distill", "--config", "configs/mnist/consistency.yaml", "--output-dir", str(run), "--set", "train.batch_size=2",
                 "--set", "train.num_sample_images=4", "--set", "train.max_steps=2", "--set", "train.checkpoint_every=1",
                 "--set", "train.keep_checkpoints=5", "--set", "train.sample_every=100"]) == 0
    first, newest = run / "checkpoints" / "step-0000001", run / "checkpoints" / "step-0000002"
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "at1")]) == 0
    assert main(["export", "--run", str(newest), "--out", str(tmp_path / "at2")]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "latest")]) == 0

    at1, meta1 = load_student(tmp_path / "at1")
    assert (meta1["step"], meta1["images_seen"]) == (1, 2) and "| training updates | 1 |" in (tmp_path / "at1" / "README.md").read_text()
    ema1 = load_file(str(first / "ema.safetensors"))
    for key, value in at1.state_dict().items():
        torch.testing.assert_close(value, ema1[key], rtol=0, atol=0)
    at2, latest = load_student(tmp_path / "at2")[0], load_student(tmp_path / "latest")[0]
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = {name: s(x, generator=torch.Generator().manual_seed(1), class_labels=torch.tensor([3, 7]))
                  for name, s in [("at1", at1), ("at2", at2), ("latest", latest)]}
    torch.testing.assert_close(images["at2"], images["latest"], rtol=0, atol=0)
    assert not torch.equal(images["at1"], images["at2"])  # one more update of the EMA student

    # sample/fid/eval_mnist read a checkpoint too (load_sampler), and a multistep student samples at chosen levels
    own = load_sampler(str(tmp_path / "at1"), device="cpu")
    for sampler in (load_sampler(str(first), device="cpu"), load_sampler(str(first), device="cpu", sigmas=meta1["sigmas"])):
        torch.testing.assert_close(sampler.sample(4, seed=5), own.sample(4, seed=5), rtol=0, atol=0)
    assert "of update 1" in load_sampler(str(first), device="cpu").description
    two = load_sampler(str(first), device="cpu", sigmas=[meta1["sigmas"][0], 1.0])
    assert two.num_steps == 2 and not torch.equal(two.sample(4, seed=5), own.sample(4, seed=5))
    with pytest.raises(ValueError, match="not both"):
        load_sampler(str(first), steps=2, sigmas=[80.0, 1.0])
    with pytest.raises(ValueError, match="only multistep consistency students"):
        load_sampler("builtin:mnist", sigmas=[80.0, 1.0])
    one_step, info = make_students()["one_step"]
    save_student(one_step, tmp_path / "one", info)
    with pytest.raises(ValueError, match="only multistep consistency students sample at chosen noise levels"):
        load_sampler(str(tmp_path / "one"), sigmas=[1.0])

    capsys.readouterr()
    save_file({"other.weight": torch.zeros(2)}, str(first / "ema.safetensors"))
    assert main(["export", "--run", str(first), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"{first / 'ema.safetensors'}: its weights are not those of the run's student folder" in err and "Traceback" not in err
    (newest / "state.json").unlink()
    assert main(["export", "--run", str(newest), "--out", str(tmp_path / "bad")]) == 2
    assert f"{newest}: not a complete checkpoint (no state.json)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
