"""SIGINT/SIGTERM during training: finish the step, write a checkpoint, say how to resume; a second
signal stops at once without damaging the complete checkpoints. Also the start-up line, the end
summary and the training flags of the CLI."""

import os
import signal

import pytest
import torch

from distilldiff.cli import main
from distilldiff.engine import Engine, TrainingInterrupted
from distilldiff.engine.run_folder import RunFolder

from test_cli import TINY, run_cli
from test_engine import Quadratic, task
from toy_setup import train_config


class SignalAt(Quadratic):
    """Sends ``signals`` to this process from inside the loss of training step ``step``
    (a real signal, delivered while the step is running)."""

    def __init__(self, step: int, signals: tuple[int, ...]):
        super().__init__()
        self.step, self.signals = step, signals

    def loss(self, phase, nets, batch):
        out = super().loss(phase, nets, batch)
        if self.calls == self.step:
            for s in self.signals:
                os.kill(os.getpid(), s)
        return out


def same_weights(a: Engine, b: Engine) -> bool:
    nets = zip(a.task.networks["generator"].parameters(), b.task.networks["generator"].parameters())
    emas = zip(a.ema.module.parameters(), b.ema.module.parameters())
    return all(torch.equal(x, y) for x, y in [*nets, *emas])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, sig):
    cfg = dict(max_steps=8, batch_size=4, checkpoint_every=100, sample_every=100, log_every=1)
    full = Engine(task(Quadratic()), train_config(**cfg), tmp_path / "full")
    full.train()

    stopped = Engine(task(SignalAt(3, (sig,))), train_config(**cfg), tmp_path / "part")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        stopped.train()
    assert info.value.step == 3 and info.value.signal_name == signal.Signals(sig).name
    assert info.value.checkpoint == tmp_path / "part" / "checkpoints" / "step-0000003"
    assert RunFolder(tmp_path / "part").complete_checkpoints() == [info.value.checkpoint]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored

    resumed = Engine(task(Quadratic()), train_config(**cfg), tmp_path / "part")
    resumed.train(resume="latest")
    assert resumed.state.step == 8 and same_weights(full, resumed)
    # the loss history travels with the checkpoint: the resumed run's curve is the uninterrupted one
    assert resumed.history.series["generator/loss"] == full.history.series["generator/loss"]
    assert [s for s, _ in full.history.series["generator/loss"]] == list(range(1, 9))
    assert (tmp_path / "part" / "samples" / "losses.png").is_file()


def test_second_signal_stops_at_once_and_keeps_complete_checkpoints(tmp_path):
    cfg = train_config(max_steps=8, batch_size=4, checkpoint_every=2, sample_every=100)
    engine = Engine(task(SignalAt(3, (signal.SIGINT, signal.SIGINT))), cfg, tmp_path)
    with pytest.raises(KeyboardInterrupt) as info:
        engine.train()
    assert not isinstance(info.value, TrainingInterrupted)  # no checkpoint of step 3
    folder = RunFolder(tmp_path)
    assert [p.name for p in folder.complete_checkpoints()] == ["step-0000002"]
    assert folder.find_checkpoint("latest").name == "step-0000002"
    Engine(task(Quadratic()), cfg, tmp_path).train(resume="latest")


def test_cli_interrupt_is_one_line_with_the_resume_command(tmp_path, monkeypatch):
    """``distilldiff distill`` stopped by SIGINT in its second step: exit 130, one line naming the
    checkpoint and the command that resumes it; resuming finishes the run."""
    real_step = Engine.train_step

    def step_then_signal(self, window):
        real_step(self, window)
        if self.state.step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Engine, "train_step", step_then_signal)
    run = tmp_path / "run"
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY,
                "--set", "train.max_steps=3", "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100")
    assert r.returncode == 130
    last = r.stderr.strip().splitlines()[-1]
    assert f"checkpoint written to {run / 'checkpoints' / 'step-0000002'}" in last, r.stderr
    assert f"resume with: distilldiff distill --output-dir {run} --resume latest" in last
    monkeypatch.setattr(Engine, "train_step", real_step)
    r = run_cli("distill", "--output-dir", str(run), "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "at step 2" in r.stdout


def test_startup_line_end_summary_and_training_flags(tmp_path):
    run, threads = tmp_path / "run", torch.get_num_threads()
    try:
        r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY,
                    "--set", "train.max_steps=2", "--set", "train.sample_every=100", "--set", "train.checkpoint_every=100",
                    "--device", "cpu", "--threads", "1", "--time-budget", "30")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"sid: cpu (float32, 1 thread, 1 process) -> {run} | 2 steps, batch 2, time budget 30 min" in out
    assert "done: step 2 (2 this run)" in out and "4 images seen" in out
    assert "final losses: fake_score " in out and ", generator " in out
    assert f"samples:  {run / 'samples' / 'latest.png'}" in out and (run / "samples" / "latest.png").is_file()
    assert "samples at step 2: near_black " in out and ", faint " in out  # background tracked with every grid
    assert (run / "samples" / "losses.png").is_file()
    assert f"distilldiff export --run {run} --out {run}-export" in out
    assert f"tensorboard --logdir {run / 'logs'}" in out
    config = (run / "config.yaml").read_text()
    assert "time_budget_min: 30" in config and "cpu: true" in config


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--time-budget", "0"], "--time-budget must be > 0 minutes, got 0.0"),
    (["--time-budget", "-5"], "--time-budget must be > 0 minutes, got -5.0"),
])
def test_training_flags_are_validated(tmp_path, capsys, args, message):
    assert main(["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_device_cuda_without_gpu_is_a_one_line_error(tmp_path, capsys):
    assert main(["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device cuda: no CUDA device is available" in err and len(err.splitlines()) == 1
