"""tools/eval_mnist.py: its variety measure, and that the tool runs end to end on the shipped teacher."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_class_spread_is_zero_for_one_image_per_class_and_grows_with_variety():
    eval_mnist = _tool("eval_mnist")
    labels = torch.arange(40) % 10
    one_per_class = torch.randn(10, 1, 28, 28)[labels]  # every class draws the same image
    assert eval_mnist.class_spread(one_per_class, labels) == 0.0
    varied = one_per_class + 0.1 * torch.randn_like(one_per_class)
    more_varied = one_per_class + 0.3 * torch.randn_like(one_per_class)
    assert 0.0 < eval_mnist.class_spread(varied, labels) < eval_mnist.class_spread(more_varied, labels)


def test_black_below_sets_only_dark_pixels_to_black():
    eval_mnist = _tool("eval_mnist")
    x = torch.tensor([-1.0, -0.9, -0.81, -0.8, -0.5, 0.3, 1.0]).view(1, 1, 1, 7)
    assert eval_mnist.black_below(x, -0.8).flatten().tolist() == pytest.approx([-1.0, -1.0, -1.0, -0.8, -0.5, 0.3, 1.0])


def test_eval_mnist_scores_the_teacher(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, "tools/eval_mnist.py", "--model", "builtin:mnist", "--steps", "2", "--num", "20",
                        "--black-below", "-0.8", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row, cleaned = json.loads(out.read_text())
    assert row["steps"] == 2 and row["num"] == 20 and "black_below" not in row
    assert 0.5 <= row["class_accuracy"] <= 1.0  # the teacher's 2-step DDIM: 0.96 on 5,000 images
    assert 0.0 < row["near_black"] < 1.0 and row["class_spread"] > 0.0 and 0.0 < row["faint"] < 1.0
    # the same images with dark pixels set to black: at least as many near-black pixels, no faint one left below -0.8
    assert cleaned["black_below"] == -0.8 and cleaned["num"] == 20 and cleaned["near_black"] >= row["near_black"]
    assert cleaned["faint"] < row["faint"]
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize("tool", ["eval_mnist.py", "eval_t2i.py", "background_stats.py", "feature_probe.py", "critic_readout.py"])
def test_eval_tool_bad_model_is_one_line(tmp_path, tool):
    r = subprocess.run([sys.executable, f"tools/{tool}", "--model", str(tmp_path / "missing"), "--num", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{tmp_path / 'missing'}" in r.stderr.strip().splitlines()[-1]


def test_posthoc_ema_replays_the_engines_average(tmp_path):
    """tools/posthoc_ema.py, from a checkpoint at every update, rebuilds the engine's own EMA (the run's
    half-life and rampup) far closer than the raw weights are to it; half-life 0 is the newest raw weights."""
    from safetensors.torch import load_file

    from distilldiff.cli import main as cli
    from distilldiff.export import load_student

    run = tmp_path / "run"
    # rampup 0.1: the first update already forgets the initial weights (beta 0.5**10), which no checkpoint holds
    sets = ["train.max_steps=6", "train.batch_size=2", "train.checkpoint_every=1", "train.keep_checkpoints=10",
            "train.sample_every=100", "train.num_sample_images=4", "train.ema_rampup=0.1", "train.lr=0.001"]
    assert cli(["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    last = run / "checkpoints" / "step-0000006"
    engine_ema, raw = load_file(last / "ema.safetensors"), load_file(last / "model_1.safetensors")

    def rebuilt(halflife: str, name: str) -> dict:
        r = subprocess.run([sys.executable, "tools/posthoc_ema.py", str(run), "--halflife-kimg", halflife, "--out", str(tmp_path / name)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return load_student(tmp_path / name)[0].state_dict()

    def dist(a: dict, b: dict) -> float:
        return max(float((a[k].double() - b[k].double()).abs().max()) for k in engine_ema)

    replayed = rebuilt("2", "ema")
    assert dist(raw, engine_ema) > 1e-4  # the average is not the newest weights
    assert dist(replayed, engine_ema) < 0.01 * dist(raw, engine_ema)
    assert dist(rebuilt("0", "raw"), raw) == 0.0

    for out, message in [(tmp_path / "ema", "exists"), (run / "checkpoints" / "averaged", "inside the source run")]:
        r = subprocess.run([sys.executable, "tools/posthoc_ema.py", str(run), "--halflife-kimg", "2", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
        assert out.name != "averaged" or not out.exists()  # nothing written into the run


def test_bench_objectives_splits_the_budget_over_every_stage_of_a_staged_method(tmp_path, monkeypatch):
    """tools/bench_objectives.py train: each engine run of a method gets its share of the budget, progressive
    distillation one share per stage of the configured start/end steps (an override changes the count)."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # its imports of the other tools, as when it runs
    monkeypatch.delitem(sys.modules, "bench_objectives", raising=False)
    bench = importlib.import_module("bench_objectives")
    assert bench.num_stages(bench.CONFIGS / "sid.yaml", []) == 1
    assert bench.num_stages(bench.CONFIGS / "progressive.yaml", []) == 5  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    assert bench.num_stages(bench.CONFIGS / "progressive.yaml", ["objective.start_steps=8"]) == 3
    by_name = {m.name: m for m in bench.METHODS}
    script = bench.method_script(by_name["progressive"], tmp_path, 6.0, [], ["objective.start_steps=8"])
    assert "train.time_budget_min=2'" in script and "objective.start_steps=8" in script
    for m in bench.METHODS:  # every method's command line builds from its shipped configs
        assert bench.method_script(m, tmp_path, 2.0, [], []).count("distilldiff.cli distill") == len(m.stages)


def test_bench_objectives_summary_gives_mean_and_range_over_seeds(tmp_path):
    """tools/bench_objectives.py summary: one row per (method, steps) with mean [min, max] of each seed's entry, the
    teacher's rows as scored, guided entries left out; a folder without results is a one-line error."""
    def result(folder, name, steps, fid, recall, w=None, images=1000):
        folder.mkdir(parents=True, exist_ok=True)
        record = {"name": name, "steps": steps, "guidance_scale": w, "fid": fid, "precision": 0.5, "recall": recall,
                  "class_accuracy": 0.9, "classifier_fd": 2.0, "near_black": 0.8, "num": 5000,
                  "train": None if name == "teacher" else {"images_seen": images}}
        (folder / f"result-{name}-{steps}-{w}.json").write_text(json.dumps(record))

    for seed, (fid, recall) in enumerate([(10.0, 0.2), (20.0, 0.4), (60.0, 0.3)]):
        result(tmp_path / f"s{seed}", "sid", 1, fid, recall, images=1000 + seed)
        result(tmp_path / f"s{seed}", "sid", 1, 999.0, 0.0, w=3.0)  # guided: not in the plain table
    result(tmp_path / "teacher", "teacher", 50, 5.76, 0.78)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_objectives.py"), "summary", "--results",
           *(str(tmp_path / f"s{s}") for s in range(3)), "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "seeds.md").read_text()
    assert "| sid | 1 | 3 | 30.00 [10.00, 60.00] | 0.500 [0.500, 0.500] | 0.300 [0.200, 0.400] |" in table
    assert "| teacher (DDIM) | 50 | - | 5.76 | 0.500 | 0.780 |" in table and "999" not in table
    assert (tmp_path / "out" / "fid_vs_images.png").is_file()
    r = subprocess.run(cmd[:3] + ["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "out2")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == f"no result-*.json in {tmp_path / 'empty'}"


@pytest.mark.slow
def test_bench_gpu_configs_trains_packs_and_resumes(tmp_path):
    """tools/bench_gpu_configs.sh on the CPU with a tiny batch and budget: a GPU config trains, its student and
    checkpoint are packed, a second call with the same runs folder resumes it, and a wall-clock limit on training
    stops a run with SIGTERM that still packs its student (about 2 min)."""
    import tarfile

    env = {**os.environ, "PYTHON": sys.executable, "THREADS": "1", "SCORE": "0", "CHECKPOINTS": "1",
           "SET": "train.batch_size=4 train.time_budget_min=0.02 eval.num=10 eval.metrics=[classifier_fd] train.checkpoint_every=2 "
                  "objective.regression_pairs=8 objective.regression_steps=2"}
    runs, out = tmp_path / "runs", tmp_path / "out"
    for call in (1, 2):
        if call == 2:
            env["BUDGET_MIN"] = "0.04"  # training minutes over both calls
        r = subprocess.run(["bash", "tools/bench_gpu_configs.sh", str(runs), str(out / str(call)), "fdistill"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (runs / "train-fdistill-s0.log").read_text()
    assert "resumed from" in log
    record = [json.loads(line) for line in (runs / "s0" / "fdistill-js" / "eval.jsonl").read_text().splitlines()]
    assert len(record) >= 2 and record[-1]["step"] > record[0]["step"]  # evaluated in both calls
    for part, member in (("students.tar.part-", "s0/fdistill-js/student/"), ("checkpoints-s0.tar.part-", "s0/fdistill-js/checkpoints/step-")):
        parts = sorted((out / "2").glob(part + "*"))
        whole = tmp_path / "whole.tar"
        whole.write_bytes(b"".join(p.read_bytes() for p in parts))
        with tarfile.open(whole) as tar:
            assert any(n.startswith(member) for n in tar.getnames()), tar.getnames()[:5]
    r = subprocess.run(["bash", "tools/bench_gpu_configs.sh", str(runs), str(out / "3"), "nope"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown NAME 'nope'" in r.stderr
    # a wall-clock limit on training: two seeds, far from their budget, are stopped by SIGTERM and still leave their
    # students; only the seed STUDENT_SEEDS names is packed
    env.update(BUDGET_MIN="30", TRAIN_WALL_S="25", CHECKPOINTS="0", SEEDS="0 1", STUDENT_SEEDS="1")
    r = subprocess.run(["bash", "tools/bench_gpu_configs.sh", str(tmp_path / "runs4"), str(out / "4"), "fdistill"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRAIN_WALL_S=25 reached" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    for seed in (0, 1):
        assert "SIGTERM received" in (tmp_path / "runs4" / f"train-fdistill-s{seed}.log").read_text()
        assert (tmp_path / "runs4" / f"s{seed}" / "fdistill-js" / "student" / "distilldiff_student.json").is_file()
    whole.write_bytes(b"".join(p.read_bytes() for p in sorted((out / "4").glob("students.tar.part-*"))))
    with tarfile.open(whole) as tar:
        names = tar.getnames()
    assert "s1/fdistill-js/student/distilldiff_student.json" in names and not any(n.startswith("s0/") for n in names), names[:5]


def test_bench_gpu_configs_bad_wall_limit_is_one_line(tmp_path):
    """A TRAIN_WALL_S that is not whole seconds stops the script before anything runs (``sleep`` would otherwise
    fail at once and the watchdog would stop every run at its start)."""
    r = subprocess.run(["bash", "tools/bench_gpu_configs.sh", str(tmp_path / "runs"), str(tmp_path / "out"), "fdistill"], cwd=ROOT,
                       env={**os.environ, "TRAIN_WALL_S": "7m"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "tools/bench_gpu_configs.sh: TRAIN_WALL_S must be whole seconds, got '7m'"
    assert not (tmp_path / "runs").exists()


def test_bench_gpu_configs_student_seed_not_trained_is_one_line(tmp_path):
    """STUDENT_SEEDS may only name seeds that SEEDS trains; anything else stops the script before anything runs."""
    r = subprocess.run(["bash", "tools/bench_gpu_configs.sh", str(tmp_path / "runs"), str(tmp_path / "out"), "fdistill"], cwd=ROOT,
                       env={**os.environ, "SEEDS": "0 1", "STUDENT_SEEDS": "2"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "tools/bench_gpu_configs.sh: STUDENT_SEEDS names seed '2', which SEEDS ('0 1') does not train"
    assert not (tmp_path / "runs").exists()


def test_background_stats_finds_leaked_input_noise():
    """tools/background_stats.py: a background that is the input noise scaled down correlates with z at 1; an
    independent speckle at 0; the share above the near-black limit counts the speckle that clipping keeps."""
    bg = _tool("background_stats")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 1, 28, 28, generator=g)
    leaked = bg.background_stats(-1 + 0.05 * z, z)
    independent = bg.background_stats(-1 + 0.05 * torch.randn(64, 1, 28, 28, generator=g), z)
    assert leaked["corr_with_z"] > 0.99 and abs(independent["corr_with_z"]) < 0.05
    assert leaked["background_share"] == 1.0 and leaked["std"] == pytest.approx(0.05, rel=0.05)
    # -1 + 0.05 z ends above -1 + 16/255 when z > 1.255: 10.5% of a standard normal
    assert leaked["above_near_black"] == pytest.approx(0.105, abs=0.01)
    clean = bg.background_stats(torch.full((4, 1, 28, 28), -1.0), z[:4])
    assert clean["quartiles"] == [-1.0, -1.0, -1.0] and clean["above_near_black"] == 0.0


def test_feature_probe_separates_what_differs_and_not_what_does_not():
    """tools/feature_probe.py: held-out accuracy near 1 for feature rows from two distributions, near 0.5 for one."""
    probe = _tool("feature_probe")
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 8, generator=g), torch.randn(300, 8, generator=g)
    assert probe.probe_accuracy(a, b + 2.0) > 0.95
    assert 0.4 < probe.probe_accuracy(a, b) < 0.6


def test_feature_probe_standardises_with_the_fitting_rows_only():
    """The probe's held-out rows are standardised with the fitting rows' statistics: a row's logit does not depend on
    the other rows scored with it (standardising the held-out set on its own statistics would make it depend)."""
    probe = _tool("feature_probe")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(100, 4, generator=g), torch.randn(100, 4, generator=g) + 1.0])
    logit = probe.linear_probe(x, torch.cat([torch.ones(100), torch.zeros(100)]))
    rows = torch.randn(10, 4, generator=g)
    with_outlier = logit(torch.cat([rows, torch.full((1, 4), 1e3)]))
    assert torch.equal(logit(rows), with_outlier[:10])
    assert (logit(x[:100]) > 0).double().mean() > 0.6 and (logit(x[100:]) < 0).double().mean() > 0.6


def test_feature_probe_runs_on_the_teacher(tmp_path):
    """The teacher's own 4-step samples against real digits, through both feature layers, written as JSON."""
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "tools/feature_probe.py", "--model", "builtin:mnist", "--steps", "4", "--num", "40",
                        "--sigmas", "0.05,1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["probe"]
    assert [row["sigma"] for row in rows] == [0.05, 1.0]
    assert all(0 <= row[layer] <= 1 for row in rows for layer in ("bottleneck", "decoder"))
    assert not out.with_name(out.name + ".tmp").exists()


def test_critic_readout_gradient_stats_per_pixel_class():
    """tools/critic_readout.py: the pixel classes of 8-bit images and the mean descent / |grad| over each."""
    ro = _tool("critic_readout")
    u8 = torch.tensor([[0, 2, 3, 32, 33, 200]], dtype=torch.uint8)
    masks = ro.pixel_classes(u8)
    assert masks["black"].tolist() == [[True, True, False, False, False, False]]
    assert masks["faint"].tolist() == [[False, False, True, True, False, False]]
    assert masks["stroke"].tolist() == [[False, False, False, False, False, True]]
    stats = ro.gradient_stats(torch.tensor([[1.0, 1.0, 2.0, -4.0, 0.0, 0.5]]), masks)
    assert stats["faint"] == {"mean_descent": 1.0, "mean_abs": 3.0} and stats["black"]["mean_descent"] == -1.0


def test_critic_readout_of_the_teacher_denoising_samples(tmp_path):
    """Without a run: the faint share of the teacher's denoised samples by noise level, as JSON."""
    out = tmp_path / "ro.json"
    r = subprocess.run([sys.executable, "tools/critic_readout.py", "--model", "builtin:mnist", "--steps", "2", "--num", "12",
                        "--sigmas", "0.05,1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert [row["sigma"] for row in data["rows"]] == [0.05, 1.0] and data["run_checkpoint"] is None
    assert all(0 <= row["denoised_faint"] <= 1 and "head_accuracy" not in row for row in data["rows"])
    assert 0 <= data["sample_faint"] <= 1 and not out.with_name(out.name + ".tmp").exists()


@pytest.mark.slow  # two tiny MNIST runs and two tool calls: about a minute on 2 cores
def test_critic_readout_reads_a_runs_discriminator_head(tmp_path):
    """With --run: the head of the run's checkpoint (the decoder head of f-distill, loaded from the fake score's own
    checkpoint file) reads real digits against samples; a run without a head is a one-line error."""
    from distilldiff.cli import main as cli

    sets = ["train.max_steps=2", "train.batch_size=2", "train.checkpoint_every=2", "train.sample_every=100",
            "train.num_sample_images=4", "objective.disc_features=decoder", "objective.disc_head=conv", "objective.head_lr_scale=100"]
    run = tmp_path / "fd"
    assert cli(["distill", "--config", "configs/mnist/fdistill.yaml", "--output-dir", str(run), *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "ro.json"
    r = subprocess.run([sys.executable, "tools/critic_readout.py", "--model", str(run), "--run", str(run), "--checkpoint", "step-0000002",
                        "--num", "10", "--sigmas", "0.01", "--raw", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["raw"] and data["run_checkpoint"].endswith("step-0000002") and 0 <= row["head_accuracy"] <= 1
    assert row["logit_real"] != 0 or row["logit_fake"] != 0  # the head left its zero start: the trained weights were loaded
    assert set(row["gan_gradient"]) == {"black", "faint", "stroke"}

    sid = tmp_path / "sid"
    assert cli(["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(sid), *[a for s in sets[:5] for a in ("--set", s)]]) == 0
    r = subprocess.run([sys.executable, "tools/critic_readout.py", "--model", str(sid), "--run", str(sid), "--num", "10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "objective 'sid' has no fake score with a discriminator head" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr


def _eval_log(folder: Path, rows: list[tuple[int, int, float, float]]) -> None:
    """An eval.jsonl of (step, nimg, train_seconds, fid) rows, as the engine writes it."""
    folder.mkdir(parents=True)
    (folder / "eval.jsonl").write_text("".join(json.dumps({"step": s, "nimg": n, "train_seconds": t, "fid": f}) + "\n" for s, n, t, f in rows))


def test_fid_vs_time_adds_stages_and_plots_against_images_seen(tmp_path):
    """tools/fid_vs_time.py: a staged run is one curve whose minutes and images seen add up over its stages
    (the most steps first); ``--x kimg`` tables and plots against thousands of images seen."""
    fvt = _tool("fid_vs_time")
    run = tmp_path / "pd"
    _eval_log(run / "stage-0004", [(10, 2000, 60.0, 30.0)])
    _eval_log(run / "stage-0008", [(5, 1000, 30.0, 50.0), (10, 2000, 60.0, 40.0)])
    curve = fvt.load_curve(run)
    assert [r["fid"] for r in curve] == [50.0, 40.0, 30.0]
    assert [r["kimg"] for r in curve] == [1.0, 2.0, 4.0] and [r["minutes"] for r in curve] == [0.5, 1.0, 2.0]
    _eval_log(tmp_path / "one", [(100, 51200, 120.0, 80.0), (200, 102400, 250.0, 20.0)])
    r = subprocess.run([sys.executable, "tools/fid_vs_time.py", f"a={tmp_path / 'one'}", str(run), "--x", "kimg",
                        "--hline", "teacher, 50 steps=5.76", "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    table = (tmp_path / "out" / "fid_vs_kimg.md").read_text()
    assert "| a | 2 | 80 at 51.2 | 20 at 102.4 | 20 at 102.4 |" in table and "| pd | 3 | 50 at 1.0 | 30 at 4.0 | 30 at 4.0 |" in table
    assert (tmp_path / "out" / "fid_vs_kimg.png").stat().st_size > 0
    for bad, message in ((["--hline", "teacher"], "--hline 'teacher': expected LABEL=NUMBER"), ([], "no eval.jsonl")):
        r = subprocess.run([sys.executable, "tools/fid_vs_time.py", str(tmp_path / "missing" if not bad else run), *bad,
                            "--out", str(tmp_path / "out2")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1]


def test_fid_vs_time_reads_per_step_count_metrics(tmp_path):
    """eval.steps records METRIC_Ksteps: class accuracy per step count is best at its maximum, as without the suffix."""
    run = tmp_path / "cd"
    run.mkdir()
    rows = [{"step": s, "nimg": 512 * s, "train_seconds": 6.0 * s, "class_accuracy_2steps": a} for s, a in ((1, 0.90), (2, 0.95), (3, 0.93))]
    (run / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = subprocess.run([sys.executable, "tools/fid_vs_time.py", str(run), "--metric", "class_accuracy_2steps", "--out", str(tmp_path / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| cd | 3 | 0.9 at 0.1 | 0.95 at 0.2 | 0.93 at 0.3 |" in (tmp_path / "out" / "class_accuracy_2steps_vs_time.md").read_text()


def test_guidance_response_reads_a_students_guidance_weight_exactly():
    """A student that applies guidance a w + b when given w shows w_eff = a w + b and err = |a w + b - w| rms(g)."""
    from distilldiff.teachers import CFGDenoiser, GaussianMixtureDenoiser

    guidance_response = _tool("guidance_response").guidance_response
    g = torch.Generator().manual_seed(0)
    gmm = GaussianMixtureDenoiser([0.5, 0.3, 0.2], torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) * 2,
                                  [0.3, 0.5, 0.2], component_labels=[0, 1, 1])

    class Affine(torch.nn.Module):
        def __init__(self, a: float, b: float):
            super().__init__()
            self.a, self.b = a, b

        def forward(self, x, sigma, guidance_scale, **cond):
            return CFGDenoiser(gmm, self.a * guidance_scale + self.b)(x, sigma, **cond)

    x0, _ = gmm.sample(64, generator=g)
    cond = {"class_labels": torch.arange(64) % 2}
    sigmas, ws = [0.1, 1.0, 10.0], [0.0, 1.0, 4.0]
    w_eff, err, scale = guidance_response(Affine(0.5, 0.7), gmm, x0, cond, sigmas, ws, torch.Generator().manual_seed(1))
    torch.testing.assert_close(w_eff, torch.tensor([[0.7, 1.2, 2.7]] * 3, dtype=torch.float64))
    torch.testing.assert_close(err[:, 1:] / scale[:, 1:], torch.tensor([[0.2, 0.325]] * 3, dtype=torch.float64))
    assert (scale[:, 0] == 0).all() and (err[:, 0] > 0).all()
    # the teacher itself (guidance ignored) has w_eff = 0 at every w
    w_eff0, _, _ = guidance_response(Affine(0.0, 0.0), gmm, x0, cond, sigmas, ws, torch.Generator().manual_seed(1))
    assert w_eff0.abs().max() < 1e-9


@pytest.mark.parametrize("model, message", [
    ("missing-run", "not a student folder (no distilldiff_student.json)"),
    ("benchmarks/issue11-h200/student-fdistill-js-1step", "this student has no guidance input (w)"),
])
def test_guidance_response_bad_model_is_one_line(tmp_path, model, message):
    """tools/guidance_response.py refuses a folder without a student, and a student without a w input, in one line."""
    path = str(tmp_path / model) if model == "missing-run" else model
    r = subprocess.run([sys.executable, "tools/guidance_response.py", "--model", path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {path}: {message}"], r.stderr


@pytest.mark.parametrize("args, message", [
    (["--sigmas", "80,x"], "--sigmas: expected comma-separated numbers, got 80,x"),
    (["--sigmas", "80,2", "--steps", "2"], "give --steps or --sigmas, not both"),
    (["--sigmas", "80,2"], "builtin:mnist: only multistep consistency students sample at chosen noise levels"),
])
def test_eval_mnist_bad_sigmas_are_one_line(args, message):
    r = subprocess.run([sys.executable, "tools/eval_mnist.py", "--model", "builtin:mnist", "--num", "4", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and message in r.stderr.strip().splitlines()[-1], r.stderr


@pytest.mark.parametrize("extra", [["--steps", "4"], ["--sigmas", "80,2"], ["--w", "1"]])
def test_eval_mnist_real_refuses_model_options(extra):
    """--real scores MNIST-5k digits: options that only a model uses are refused in one line, not ignored."""
    r = subprocess.run([sys.executable, "tools/eval_mnist.py", "--real", "--num", "4", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("--real scores the digits themselves: it takes no --steps, --sigmas or --w")


def test_regression_error_scores_students_on_fresh_pairs(tmp_path):
    """tools/regression_error.py: one row per student, the mean squared gap to the teacher's DDIM samples on fresh
    pairs, which is the same number computed here by hand; a folder that holds no student, or a few-step student, is one
    line and exit 1."""
    from distilldiff.export import load_student
    from distilldiff.objectives.pairs import teacher_pairs
    from distilldiff.teachers import load_teacher

    student = ROOT / "benchmarks" / "main-job-cpu" / "student-fdistill-js-reg025"
    out = tmp_path / "errors.json"
    r = subprocess.run([sys.executable, "tools/regression_error.py", "--num", "6", "--steps", "2", "--seed", "3", "--out", str(out),
                        f"reg={student}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    with torch.no_grad():
        pairs = teacher_pairs(load_teacher("builtin:mnist"), 6, 2, "cpu", seed=3)
        by_hand = ((load_student(student)[0](pairs.noise, **pairs.cond) - pairs.target) ** 2).mean().item()
    assert row["name"] == "reg" and row["mse"] == pytest.approx(by_hand, rel=1e-5)
    r = subprocess.run([sys.executable, "tools/regression_error.py", "--num", "2", "--steps", "1", f"x={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and str(tmp_path) in r.stderr
    four_step = ROOT / "benchmarks" / "few-step" / "student-fdistill-js-4step"
    r = subprocess.run([sys.executable, "tools/regression_error.py", "--num", "2", "--steps", "1", str(four_step)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.strip() == f"{four_step}: a 4-step student; the regression error is defined for one-step students"
