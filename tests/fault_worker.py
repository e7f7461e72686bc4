"""The training process that tests/test_faults.py kills: a tiny SiD distillation of the 2-D Gaussian
mixture (untrained MLPs, no fitting), run in a process forked from a forkserver that has already
imported torch and distilldiff (a fresh interpreter would spend most of the test importing)."""

from __future__ import annotations

import os
import time

MAX_STEPS = 8
#: seconds each checkpoint write is held open (after accelerate's state, before state.json): a window
#: in which the test can kill the process inside a checkpoint write
SLOW_WRITE = 0.08

PRELOAD = ["torch", "accelerate", "safetensors.torch", "distilldiff.engine", "distilldiff.objectives", "distilldiff.toy", "fault_worker"]


def tiny_task():
    """SiD on the toy mixture with untrained MLP networks, the same at every call."""
    import torch
    from toy_setup import task_for, teacher

    from distilldiff.objectives import SiD, SiDConfig
    from distilldiff.students import OneStepGenerator
    from distilldiff.toy import MLPDenoiser

    torch.manual_seed(0)
    objective = SiD(SiDConfig(), teacher())
    sigma_data = teacher().sigma_data
    generator = OneStepGenerator(MLPDenoiser(2, sigma_data, hidden=32, depth=2), 2.5)
    critic = objective.make_critic("fake_score", MLPDenoiser(2, sigma_data, hidden=32, depth=2))
    return task_for(objective, generator, {"fake_score": critic})


def tiny_config(max_steps: int = MAX_STEPS, **kw):
    from toy_setup import train_config

    base = {"max_steps": max_steps, "batch_size": 8, "checkpoint_every": 1, "keep_checkpoints": 2, "num_sample_images": 16,
            "log_every": 1}
    base.update(kw)
    return train_config(**base)


def train(folder: str, resume: bool, log: str, started=None, writes=None, slow: float = 0.0) -> None:
    """Train :func:`tiny_task` into ``folder`` up to :data:`MAX_STEPS`, from its newest checkpoint if
    ``resume``. Sets the event ``started`` just before training and counts the checkpoint writes
    begun in the shared integer ``writes``; ``slow`` seconds are spent inside every checkpoint write
    (after accelerate's files, and again before ``state.json``), so that a kill can land there."""
    import torch
    from accelerate import Accelerator

    from distilldiff.engine import Engine, RunFolder

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    save_state, write_state = Accelerator.save_state, RunFolder.write_state

    def observed_save_state(self, *args, **kwargs):
        if writes is not None:
            with writes.get_lock():
                writes.value += 1
        out = save_state(self, *args, **kwargs)
        time.sleep(slow)
        return out

    def slow_write_state(checkpoint, state):
        time.sleep(slow)
        write_state(checkpoint, state)

    Accelerator.save_state = observed_save_state
    RunFolder.write_state = staticmethod(slow_write_state)
    engine = Engine(tiny_task(), tiny_config(), folder)
    if started is not None:
        started.set()
    engine.train(resume="latest" if resume else None)
