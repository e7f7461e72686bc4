"""The CLI on the shipped teacher: a short SiD run, resume, sampling, and one-line config errors."""

import contextlib
import io
import json
import subprocess
import sys
import types

from pathlib import Path

import pytest
import torch
from PIL import Image

from distilldiff.cli import main

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--set", "train.batch_size=2", "--set", "train.num_sample_images=4", "--set", "train.log_every=1"]


def run_subprocess(*args):
    """The real entry point, in a fresh process (``python -m distilldiff.cli``)."""
    return subprocess.run([sys.executable, "-m", "distilldiff.cli", *args], capture_output=True, text=True)


def run_cli(*args):
    """``distilldiff ARGS`` in this process (the same ``main`` as the entry point, without the ~10 s
    start-up of a fresh interpreter): exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.mark.slow  # 37 s; covered by faster tests: CLI resume (test_interrupts), the entry point in a fresh process (test_exit_codes), sampling (below)
def test_distill_checkpoint_resume_and_sample(tmp_path):
    run = tmp_path / "run"
    r = run_subprocess("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY,
                "--set", "train.max_steps=2", "--set", "train.checkpoint_every=2", "--set", "train.sample_every=2")
    assert r.returncode == 0, r.stderr
    assert (run / "checkpoints" / "step-0000002" / "state.json").is_file()
    assert (run / "samples" / "step-0000002.png").is_file()
    assert "samples at step 2: near_black " in r.stdout + r.stderr and ", faint " in r.stdout + r.stderr  # background tracked with every grid
    assert (run / "config.yaml").is_file() and (run / "student" / "distilldiff_student.json").is_file()

    r = run_subprocess("distill", "--output-dir", str(run), "--resume", "latest", "--set", "train.max_steps=3")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout + r.stderr and "at step 2" in r.stdout + r.stderr
    state = json.loads((run / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state["step"] == 3 and state["nimg"] == 6
    meta = json.loads((run / "student" / "distilldiff_student.json").read_text())
    assert meta["objective"] == "sid" and meta["step"] == 3 and meta["sigmas"] == [2.5]

    out = tmp_path / "grid.png"
    r = run_subprocess("sample", "--model", str(run), "--num", "4", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert Image.open(out).size == (2 + 2 * 30, 2 + 2 * 30)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lr_rate=1"], "unknown key 'train.lr_rate'"),
        (["train.lr=fast"], "train.lr: expected a number, got 'fast'"),
        (["train.max_steps=1.5"], "train.max_steps: expected an integer, got 1.5"),
        (["train.mixed_precision=fp8"], "train.mixed_precision: 'fp8' is not one of 'no', 'fp16', 'bf16'"),
        (["teacher.path=/no/such/teacher"], "teacher.path '/no/such/teacher': no such folder"),
        (["objective.name=nope"], "objective.name: unknown objective 'nope'"),
        (["objective.alpah=1.0"], "unknown key 'objective.alpah'"),
        (["objective.sigma_min=0.002"], "objective.sigma_min/sigma_max = 0.002/80 must satisfy 0.01"),
        (["objective.noise=timesteps", "objective.sigma_max=10"], "objective.sigma_min/sigma_max do not apply to noise 'timesteps'"),
        (["student.init_sigma=500"], "student.init_sigma=500.0 is outside the teacher's noise range"),
        (["train.num_sample_images=0"], "train.num_sample_images must be >= 1, got 0"),
        (["train.grad_clip=0"], "train.grad_clip must be > 0, got 0.0"),
        (["train.critic_grad_clip=-1"], "train.critic_grad_clip must be > 0, got -1.0"),
        (["train.lr=.nan"], "train.lr must be > 0, got nan"),
        (["train.lr_warmup_steps=-1"], "train.lr_warmup_steps must be >= 0, got -1"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, capsys, overrides, message):
    args = ["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r")]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_config_file_and_key(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective: {name: sid}\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "missing required key 'teacher'" in capsys.readouterr().err
    cfg.write_text("teacher: {path: builtin:mnist\n")
    assert main(["distill", "--config", str(cfg)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_yaml_1_1_spellings_are_accepted():
    from distilldiff.config import DistillConfig, load_config

    cfg = load_config(DistillConfig, "configs/mnist/sid.yaml", ["train.lr=1e-5", "train.mixed_precision=no"])
    assert cfg.train.lr == 1e-5 and cfg.train.mixed_precision == "no"
    assert load_config(DistillConfig, "configs/mnist/sid.yaml").train.mixed_precision is None  # accelerate decides


def test_missing_config_flag_is_a_one_line_error(capsys):
    assert main(["distill"]) == 2
    assert capsys.readouterr().err.strip() == "distilldiff: error: --config is required (or --resume with --output-dir of an existing run)"


def test_resume_without_checkpoint_exits_nonzero(tmp_path):
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path), "--resume", "latest")
    assert r.returncode == 2
    assert "no checkpoint under" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "config.yaml").exists()  # a bad --resume writes nothing


@pytest.mark.parametrize("config", ["consistency", "lcm", "dmd", "dmd2", "fdistill", "fdistill_4step", "progressive", "guidance"])
def test_every_objective_config_runs_and_exports(tmp_path, config):
    """Two updates of each shipped objective config on the shipped teacher, then export and sample."""
    run = tmp_path / "run"
    r = run_cli("distill", "--config", f"configs/mnist/{config}.yaml", "--output-dir", str(run), *TINY, "--set", "train.max_steps=2")
    assert r.returncode == 0, r.stderr
    meta = json.loads((run / "student" / "distilldiff_student.json").read_text())
    assert meta["objective"] == {"dmd": "fdistill", "dmd2": "fdistill", "fdistill_4step": "fdistill", "lcm": "consistency"}.get(config, config)
    assert meta["step"] == 2
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "export"))
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", "--model", str(tmp_path / "export"), "--num", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    if config in ("consistency", "lcm"):  # a consistency student samples with any number of steps (and w, for LCM)
        w = ["--guidance-scale", "3"] if config == "lcm" else []
        r = run_cli("sample", "--model", str(run), "--steps", "4", *w, "--num", "4", "--out", str(tmp_path / "g4.png"), "--device", "cpu")
        assert r.returncode == 0, r.stderr


def test_periodic_evaluation_writes_eval_log(tmp_path):
    """eval.every=1 with the classifier metrics: one eval.jsonl line per step, in tensorboard too."""
    run = tmp_path / "run"
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY, "--set", "train.max_steps=2",
                "--set", "eval.every=1", "--set", "eval.metrics=[classifier_fd,class_accuracy]", "--set", "eval.num=20")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and all(row["num"] == 20 for row in rows)
    assert all(0 <= row["class_accuracy"] <= 1 and row["classifier_fd"] > 0 for row in rows)
    assert rows[1]["train_seconds"] >= rows[0]["train_seconds"] > 0
    assert any((run / "logs").rglob("events.out.tfevents.*"))


def test_evaluation_at_several_step_counts(tmp_path):
    """eval.steps=[1,2] on a consistency student: every metric once per step count, from different samples."""
    run = tmp_path / "run"
    r = run_cli("distill", "--config", "configs/mnist/consistency.yaml", "--output-dir", str(run), *TINY, "--set", "train.max_steps=1",
                "--set", "eval.every=1", "--set", "eval.metrics=[classifier_fd,near_black,faint]", "--set", "eval.num=20",
                "--set", "eval.steps=[1,2]")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert {"classifier_fd_1steps", "classifier_fd_2steps", "near_black_1steps", "near_black_2steps", "faint_2steps"} <= set(row)
    assert "classifier_fd" not in row and row["classifier_fd_1steps"] != row["classifier_fd_2steps"]


def test_eval_steps_the_student_cannot_take_are_one_line_errors(tmp_path):
    for config, steps, message in [("sid", "[2]", "eval.steps: this student samples in 1 step(s), got steps=2"),
                                   ("consistency", "[1,18]", "eval.steps: consistency sampling takes 1 to 17 steps")]:
        out = tmp_path / config
        r = run_cli("distill", "--config", f"configs/mnist/{config}.yaml", "--output-dir", str(out), "--set", "eval.every=1",
                    "--set", f"eval.steps={steps}")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()  # nothing written


def test_eval_config_errors(tmp_path):
    base = ("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r"), "--set", "eval.every=1")
    r = run_cli(*base, "--set", "eval.metrics=[fid, lpips]")
    assert r.returncode == 2 and "eval.metrics: ['lpips'] not among fid, classifier_fd, class_accuracy" in r.stderr
    r = run_cli(*base, "--set", "eval.metrics=[fid]", "--set", f"eval.ref={tmp_path / 'missing.npz'}")
    assert r.returncode == 2 and "eval.ref:" in r.stderr and "missing.npz is neither a built-in reference" in r.stderr
    assert not (tmp_path / "r").exists()  # nothing written
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    r = run_cli(*base, "--set", "eval.metrics=[fid]", "--set", f"eval.ref={bad}")
    assert r.returncode == 2 and "is not a reference .npz with mu and sigma" in r.stderr


@pytest.mark.parametrize("data, message", [
    ({"num": 500}, "eval.num is set but eval.every is not"),
    ({"every": 10, "ref": "x.npz"}, "eval.ref applies to the fid metric only"),
    ({"steps": [1, 2]}, "eval.steps is set but eval.every is not"),
    ({"every": 10, "steps": [0, 2]}, r"eval.steps must be distinct step counts >= 1"),
    ({"every": 10, "steps": [2, 2]}, r"eval.steps must be distinct step counts >= 1"),
    ({"every": 10, "metrics": ["fid"], "ref": "mnist5k"}, None),
])
def test_eval_keys_are_never_silently_ignored(data, message):
    from distilldiff.config import ConfigError, EvalConfig, from_dict

    if message is None:
        from_dict(EvalConfig, data, "eval")
    else:
        with pytest.raises(ConfigError, match=message):
            from_dict(EvalConfig, data, "eval")


def test_progressive_stages_resume(tmp_path):
    """4 -> 2 -> 1 steps, one update per stage; a resumed run skips the finished stages."""
    run = tmp_path / "run"
    args = ("distill", "--config", "configs/mnist/progressive.yaml", "--output-dir", str(run), *TINY,
            "--set", "train.max_steps=1", "--set", "objective.start_steps=4")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in run.glob("stage-*")) == ["stage-0001", "stage-0002"]
    meta = json.loads((run / "student" / "distilldiff_student.json").read_text())
    assert len(meta["sigmas"]) == 1 and meta["sampler"] == "ddim"
    assert len(json.loads((run / "stage-0002" / "student" / "distilldiff_student.json").read_text())["sigmas"]) == 2
    r = run_cli(*args)
    assert r.returncode == 2 and "--resume latest" in r.stderr
    r = run_cli(*args, "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "resumed" not in r.stdout + r.stderr  # both stages were complete: nothing retrained


def test_guidance_distillation_two_stages(tmp_path):
    """Stage 1 (w-conditioned 16-step student with a v-prediction output), then stage 2 (progressive
    16 -> 8 keeping w and the output) from its folder."""
    stage1 = tmp_path / "stage1"
    r = run_cli("distill", "--config", "configs/mnist/guidance.yaml", "--output-dir", str(stage1), *TINY, "--set", "train.max_steps=1",
                "--set", "student.parameterization=v_prediction")
    assert r.returncode == 0, r.stderr
    meta = json.loads((stage1 / "student" / "distilldiff_student.json").read_text())
    assert meta["guidance_scale"] == 2.0 and len(meta["sigmas"]) == 16 and meta["prediction_type"] == "v_prediction"
    r = run_cli("distill", "--config", "configs/mnist/guidance_stage2.yaml", "--output-dir", str(tmp_path / "stage2"), *TINY,
                "--set", "train.max_steps=1", "--set", f"teacher.path={stage1}", "--set", "objective.end_steps=8")
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "stage2" / "student" / "distilldiff_student.json").read_text())
    assert meta["guidance_scale"] == 2.0 and len(meta["sigmas"]) == 8 and meta["objective"] == "progressive"
    assert meta["prediction_type"] == "v_prediction"
    for w in ("0.5", "3.0"):
        r = run_cli("sample", "--model", str(tmp_path / "stage2"), "--num", "4", "--guidance-scale", w,
                    "--out", str(tmp_path / f"w{w}.png"), "--device", "cpu")
        assert r.returncode == 0, r.stderr


def test_init_sigma_is_an_error_for_objectives_with_their_own_noise_levels(tmp_path, capsys):
    args = ["distill", "--config", "configs/mnist/consistency.yaml", "--output-dir", str(tmp_path / "r"), "--set", "student.init_sigma=2.5"]
    assert main(args) == 2
    assert "student.init_sigma: objective 'consistency' sets its own noise levels" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "--num must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--out", "bad/"], "--out bad/: expected an image file name ending in .png"),
    (["--class-label", "99"], "class label 99 is outside 0..9"),
    (["--model", "runs/nope"], "'runs/nope': no such folder"),
    (["--sigmas", "80,a"], "--sigmas: expected comma-separated numbers, got 80,a"),
    (["--sigmas", "80,1"], "give --steps or --sigmas, not both"),
])
def test_sample_arguments_are_one_line_errors(tmp_path, monkeypatch, args, message):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # runs/ exists here: runs/nope is a mistyped folder, not a hub repository
    base = {"--model": "builtin:mnist", "--num": "2", "--steps": "1", "--out": "g.png", "--device": "cpu"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = run_cli("sample", *[x for kv in base.items() for x in kv])
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_sample_and_fid_at_chosen_noise_levels(tmp_path):
    """--sigmas: a multistep consistency student samples at the levels given; other models refuse them in one line."""
    student = ROOT / "benchmarks" / "issue11-h200" / "student-consistency-4step"
    grids = {}
    for levels in ("80,21.7,2.73,0.286", "80,15,2,0.1"):
        out = tmp_path / f"{levels}.png"
        r = run_cli("sample", "--model", str(student), "--sigmas", levels, "--num", "4", "--out", str(out), "--device", "cpu")
        assert r.returncode == 0, r.stderr
        grids[levels] = torch.tensor(list(Image.open(out).getdata()), dtype=torch.float64)
    assert (grids["80,21.7,2.73,0.286"] - grids["80,15,2,0.1"]).abs().max() > 0
    r = run_cli("sample", "--model", "builtin:mnist", "--sigmas", "80,1", "--out", str(tmp_path / "t.png"), "--device", "cpu")
    assert r.returncode == 2 and "only multistep consistency students sample at chosen noise levels" in r.stderr
    r = run_cli("fid", "--images", str(tmp_path), "--sigmas", "80,1")
    assert r.returncode == 2 and "an --images folder takes neither" in r.stderr
    r = run_cli("fid", "--model", str(student), "--sigmas", "80,a", "--weights", str(tmp_path / "no-such-weights.pt"))
    assert r.returncode == 2 and "--sigmas: expected comma-separated numbers, got 80,a" in r.stderr  # before the weights load


def test_nonfinite_loss_is_a_one_line_error(tmp_path):
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r"), *TINY,
                "--set", "train.max_steps=4", "--set", "train.lr=1e30")
    assert r.returncode == 2 and "non-finite" in r.stderr and "set train.nonfinite=skip" in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("distilldiff: error")]) == 1
    assert "Traceback" not in r.stderr
