"""The training engine: non-finite handling, EMA, checkpoints and resume (on toy networks)."""

import json
import math
from typing import ClassVar, Mapping

import pytest
import torch
from torch import nn

from distilldiff.engine import EMA, Engine, NonFiniteError, TrainTask
from distilldiff.objectives.base import Objective, Phase
from distilldiff.toy import save_state, scatter_image

from toy_setup import train_config


class Quadratic(Objective):
    """Pulls a linear generator's outputs to zero; returns NaN at chosen calls."""

    name: ClassVar[str] = "quadratic"
    networks: ClassVar[Mapping[str, str]] = {"generator": "student"}

    def __init__(self, nan_at=()):
        self.calls, self.nan_at = 0, set(nan_at)

    def phases(self):
        return [Phase("generator", "generator")]

    def loss(self, phase, nets, batch):
        self.calls += 1
        loss = nets["generator"](batch.noise).pow(2).mean()
        if self.calls in self.nan_at:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}


def task(objective):
    torch.manual_seed(0)
    return TrainTask(
        objective=objective,
        networks={"generator": nn.Linear(2, 2)},
        sample_shape=(2,),
        cond_fn=lambda n, d: {},
        sample_fn=lambda g, z, c, gen: scatter_image(g(z)),
        save_fn=save_state,
    )


def test_nonfinite_loss_stops_with_step_phase_and_network(tmp_path):
    engine = Engine(task(Quadratic(nan_at={3})), train_config(max_steps=10, batch_size=4), tmp_path)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3, phase 'generator' \(network 'generator'\)"):
        engine.train()


def test_nonfinite_loss_skip_counts_and_leaves_weights_untouched(tmp_path):
    engine = Engine(task(Quadratic(nan_at={2, 5})), train_config(max_steps=6, batch_size=4, nonfinite="skip", checkpoint_every=6), tmp_path)
    engine.train()
    assert engine.state.nonfinite == 2
    state = json.loads((tmp_path / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["nonfinite"] == 2 and state["step"] == 6


def test_skip_mode_gives_up_after_max_nonfinite(tmp_path):
    engine = Engine(task(Quadratic(nan_at=range(1, 100))), train_config(max_steps=10, batch_size=4, nonfinite="skip", max_nonfinite=3), tmp_path)
    with pytest.raises(NonFiniteError, match="exceed train.max_nonfinite=3"):
        engine.train()


@pytest.mark.parametrize("tf32", [False, True])
def test_tf32_switch_follows_the_config(tmp_path, tf32):
    """train.tf32 sets both process-wide switches either way (PyTorch's own default lets cuDNN use TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
        Engine(task(Quadratic()), train_config(max_steps=1, batch_size=4, tf32=tf32), tmp_path)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_ema_half_life():
    net = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA(net, halflife_kimg=0.1, rampup=None)  # half-life 100 images
    nn.init.ones_(net.weight)
    ema.update(net, nimg=100, batch_size=100)
    assert ema.module.weight.item() == pytest.approx(0.5)


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    full = Engine(task(Quadratic()), train_config(max_steps=8, batch_size=4, checkpoint_every=4), tmp_path / "full")
    full.train()
    part = Engine(task(Quadratic()), train_config(max_steps=4, batch_size=4, checkpoint_every=4), tmp_path / "part")
    part.train()
    resumed = Engine(task(Quadratic()), train_config(max_steps=8, batch_size=4, checkpoint_every=4), tmp_path / "part")
    resumed.train(resume="latest")
    assert resumed.state.step == 8 and resumed.state.nimg == 32
    for a, b in zip(full.task.networks["generator"].parameters(), resumed.task.networks["generator"].parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(full.ema.module.parameters(), resumed.ema.module.parameters()):
        torch.testing.assert_close(a, b)
    assert (tmp_path / "part" / "samples" / "latest.png").is_file()


class CountingEvaluator:
    """Reports how often it has been called as its metric (a redone evaluation restarts the count)."""

    every = 1
    info = {"num": 3}

    def __init__(self):
        self.calls = 0

    def __call__(self, student, device):
        self.calls += 1
        return {"calls": float(self.calls)}


def test_evaluations_are_logged_and_redone_after_resume(tmp_path):
    """eval.jsonl gets one line per step; resuming from step 2 drops the later lines and redoes them."""
    t = task(Quadratic())
    t.evaluator = CountingEvaluator()
    Engine(t, train_config(max_steps=3, batch_size=4, checkpoint_every=2, keep_checkpoints=5), tmp_path).train()
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[0]["num"] == 3 and rows[0]["nimg"] == 4
    t2 = task(Quadratic())
    t2.evaluator = CountingEvaluator()
    Engine(t2, train_config(max_steps=4, batch_size=4, checkpoint_every=2, keep_checkpoints=5), tmp_path).train(
        resume=str(tmp_path / "checkpoints" / "step-0000002"))
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["calls"] for r in rows] == [1, 2, 1, 2]


def test_final_step_is_evaluated_and_checkpointed_and_stale_rows_dropped(tmp_path):
    """eval.every that does not divide max_steps: the last step is evaluated before its checkpoint;
    a fresh run drops rows a crashed run left before its first checkpoint; a cut last line is dropped."""
    (tmp_path / "eval.jsonl").write_text('{"step": 1, "calls": 9}\n{"step": 2, "cal')
    t = task(Quadratic())
    t.evaluator = CountingEvaluator()
    t.evaluator.every = 2
    Engine(t, train_config(max_steps=3, batch_size=4, checkpoint_every=10, keep_checkpoints=5), tmp_path).train()
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["calls"]) for r in rows] == [(2, 1), (3, 2)]
    assert (tmp_path / "checkpoints" / "step-0000003" / "state.json").is_file()
    # resuming the finished run evaluates nothing again
    t2 = task(Quadratic())
    t2.evaluator = CountingEvaluator()
    Engine(t2, train_config(max_steps=3, batch_size=4, checkpoint_every=10), tmp_path).train(resume="latest")
    assert t2.evaluator.calls == 0


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    Engine(task(Quadratic()), train_config(max_steps=2, batch_size=4), tmp_path).train()
    with pytest.raises(FileExistsError, match="holds checkpoints of an earlier run; pass --resume latest"):
        Engine(task(Quadratic()), train_config(max_steps=4, batch_size=4), tmp_path).train()


def test_latest_skips_a_checkpoint_whose_save_was_interrupted(tmp_path):
    Engine(task(Quadratic()), train_config(max_steps=2, batch_size=4, checkpoint_every=2), tmp_path).train()
    (tmp_path / "checkpoints" / "step-0000009").mkdir()  # killed mid-save: no state.json
    engine = Engine(task(Quadratic()), train_config(max_steps=3, batch_size=4), tmp_path)
    assert engine.run_folder.find_checkpoint("latest").name == "step-0000002"


def test_resume_without_checkpoint_is_an_error(tmp_path):
    engine = Engine(task(Quadratic()), train_config(max_steps=2, batch_size=4), tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint under"):
        engine.train(resume="latest")


def test_batch_size_must_divide(tmp_path):
    with pytest.raises(ValueError, match="batch_size=5 is not divisible"):
        Engine(task(Quadratic()), train_config(batch_size=5, grad_accum=2), tmp_path)


@pytest.mark.parametrize("schedule, warmup, factors", [
    ("constant", 0, [1, 1, 1, 1]), ("linear", 0, [1, 0.75, 0.5, 0.25]),
    ("constant", 2, [0.5, 1, 1, 1]), ("linear", 3, [1 / 3, 0.75 * 2 / 3, 0.5, 0.25]),
])
def test_lr_schedule(tmp_path, schedule, warmup, factors):
    """linear: step k (0-based) updates with lr (1 - k / max_steps); a warm-up of W multiplies it by
    min(1, (k + 1) / W)."""
    seen = []

    class Recording(Quadratic):
        def loss(self, phase, nets, batch):
            seen.append(engine.optimizers["generator"].param_groups[0]["lr"])
            return super().loss(phase, nets, batch)

    engine = Engine(task(Recording()), train_config(max_steps=4, lr=1e-2, lr_schedule=schedule, lr_warmup_steps=warmup), tmp_path)
    engine.train()
    # the loss runs before the schedule sets this step's lr; the first loss still sees the optimiser's base lr
    last = engine.optimizers["generator"].param_groups[0]["lr"]  # the lr of the last update
    assert seen[0] == pytest.approx(1e-2) and last == pytest.approx(1e-2 * factors[-1])
    assert seen[1:] == pytest.approx([1e-2 * f for f in factors[:-1]])


def test_lr_warmup_moves_the_first_update_less(tmp_path):
    """The first update of a warmed-up run is 1/W of the plain run's (plain SGD on the same gradient)."""
    moved = {}
    for warmup in (0, 4):
        engine = Engine(task(Quadratic()), train_config(max_steps=1, lr=1e-2, lr_warmup_steps=warmup), tmp_path / str(warmup))
        before = [p.detach().clone() for p in engine.models["generator"].parameters()]
        engine.train()
        moved[warmup] = sum(float((p.detach() - b).abs().sum()) for p, b in zip(engine.models["generator"].parameters(), before))
    assert moved[0] > 0 and moved[4] == pytest.approx(moved[0] / 4, rel=1e-4)


DDP_SCRIPT = '''
import sys
import torch
sys.path.insert(0, {tests!r})
from distilldiff.engine import Engine
from distilldiff.objectives import FDistill, FDistillConfig, SiD, SiDConfig
from toy_setup import gmm_data, sid_task, teacher, train_config
if sys.argv[2] == "sid":
    task = sid_task(SiD(SiDConfig(), teacher()))
else:  # f-distill JS + GAN: the discriminator head on the DDP-wrapped fake score, running means over both ranks
    task = sid_task(FDistill(FDistillConfig(divergence="js", gan_weight=0.1), teacher()))
    task.data_fn = gmm_data
engine = Engine(task, train_config(max_steps=4, batch_size=16, checkpoint_every=2), sys.argv[1])
assert engine.accelerator.num_processes == 2 and type(engine.models["fake_score"]).__name__ == "DistributedDataParallel"
engine.train()
extra = repr(float(engine.accelerator.unwrap_model(engine.models["fake_score"]).h_mean)) if sys.argv[2] != "sid" else ""
print("rank", engine.accelerator.process_index, "ema", repr(float(sum(p.double().sum() for p in engine.ema.module.parameters()))) + extra)
'''


# sid is slow (14 s): fdistill runs the same phases plus a discriminator head through DDP
@pytest.mark.parametrize("objective", [pytest.param("sid", marks=pytest.mark.slow), "fdistill"])
def test_two_process_ddp_run(tmp_path, objective):
    """SiD / f-distill with both trained networks DDP-wrapped (2 CPU processes, gloo): the network a
    phase does not train is called through its wrapper without gradient sync, and both ranks end with
    one EMA (f-distill: and one running mean of h, from both ranks' samples)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                        str(script), str(tmp_path / "run"), objective], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    emas = sorted(line.split()[-1] for line in r.stdout.splitlines() if line.startswith("rank"))
    assert len(emas) == 2 and emas[0] == emas[1], r.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-0000004" / "state.json").is_file()


@pytest.mark.parametrize("critic_clip,critic_clipped", [(None, True), (math.inf, False), (1e-3, True)])
def test_grad_clip_and_the_critics_own_clip(tmp_path, critic_clip, critic_clipped):
    """``grad_clip`` bounds every network's gradient norm at its update; ``critic_grad_clip`` replaces it for
    the critics (``inf``: only the generator is clipped). Norms are read where the optimiser steps."""
    from distilldiff.objectives import SiD, SiDConfig
    from toy_setup import sid_task, teacher

    cfg = train_config(max_steps=3, batch_size=8, grad_clip=1e-3, critic_grad_clip=critic_clip)
    engine = Engine(sid_task(SiD(SiDConfig(), teacher())), cfg, tmp_path)
    norms: dict[str, list[float]] = {}
    for name, opt in engine.optimizers.items():
        def step(*a, _name=name, _step=opt.step, **kw):
            grads = [p.grad for p in engine.params[_name] if p.grad is not None]
            norms.setdefault(_name, []).append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
            return _step(*a, **kw)
        opt.step = step
    engine.train()
    assert set(norms) == {"generator", "fake_score"} and all(len(v) == 3 for v in norms.values())
    assert max(norms["generator"]) <= 1e-3 * (1 + 1e-4)
    assert (max(norms["fake_score"]) <= 1e-3 * (1 + 1e-4)) == critic_clipped
    assert critic_clipped or min(norms["fake_score"]) > 1e-2  # unclipped: the toy critic's own norms are far larger


def test_the_log_window_keeps_each_gradient_norms_peak(tmp_path):
    """Every log line has ``{phase}/grad_norm`` (the window's mean) and ``{phase}/grad_norm_max`` (its largest single
    update), read from what each update returned; other values are averaged only."""
    from distilldiff.engine import LogWindow
    from distilldiff.objectives import SiD, SiDConfig
    from toy_setup import sid_task, teacher

    window = LogWindow(peaks=("grad_norm",))
    for norm in (1.0, 10.0, 2.0):
        window.add({"critic/grad_norm": norm, "critic/loss": norm}, repeats=2)
        window.add({"critic/grad_norm": 2 * norm, "critic/loss": 0.0}, repeats=2)
        window.end_step()
    logs = window.flush(batch_size=1)
    assert logs["critic/grad_norm"] == pytest.approx((1.5 + 15 + 3) / 3) and logs["critic/grad_norm_max"] == 20.0
    assert "critic/loss_max" not in logs and logs["critic/loss"] == pytest.approx(13 / 6)

    engine = Engine(sid_task(SiD(SiDConfig(), teacher())), train_config(max_steps=4, batch_size=8, log_every=2), tmp_path)
    returned: list[dict[str, float]] = []
    run_phase = engine._run_phase
    engine._run_phase = lambda phase: returned.append(run_phase(phase)) or returned[-1]
    engine.train()
    for name in ("generator", "fake_score"):
        norms = [r[f"{name}/grad_norm"] for r in returned if f"{name}/grad_norm" in r]
        assert len(norms) == 4
        logged = dict(engine.history.state_dict()["series"][f"{name}/grad_norm_max"])
        assert logged == {2: max(norms[:2]), 4: max(norms[2:])}
