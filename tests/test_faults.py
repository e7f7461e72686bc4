"""Fault injection: a training process killed at random points (inside checkpoint writes too) resumes
to the bitwise same result as an uninterrupted run; a full disk or a read-only destination is one
line with exit code 2 and leaves the earlier checkpoint loadable; a resumed two-process run equals
an uninterrupted one."""

import contextlib
import errno
import io
import json
import multiprocessing
import os
import random
import time
import types

import fault_worker
import pytest
import torch
from safetensors.torch import load_file

from distilldiff.cli import main
from distilldiff.engine.run_folder import (
    CHECKPOINT_PREFIX,
    STATE_FILE,
    RunFolder,
    checkpoint_problem,
)


def run_cli(*args):
    """``distilldiff ARGS`` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distilldiff:")]


# -- killed at random points --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forkserver():
    """A multiprocessing context whose processes fork from a server that has imported torch and
    distilldiff once (seconds saved per process; no fork of this multi-threaded test process)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(fault_worker.PRELOAD)
    return ctx


def final_state(run, step: int = fault_worker.MAX_STEPS) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of the checkpoint of ``step`` (networks, EMA, optimizers) and of the student
    folder, and the checkpoint's counters but its wall-clock seconds."""
    ckpt = RunFolder(run).checkpoint(step)
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        for index, values in torch.load(f, weights_only=True)["state"].items():
            tensors.update({f"{f.name}:{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    tensors.update({f"student:{k}": v for k, v in load_file(run / "student" / "model.safetensors").items()})
    state = json.loads((ckpt / STATE_FILE).read_text())
    state.pop("train_seconds")
    return tensors, state


def assert_bitwise_equal(a, b):
    (ta, sa), (tb, sb) = a, b
    assert sa == sb and sorted(ta) == sorted(tb)
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different


def wait_for(condition, process, timeout=120.0) -> bool:
    """Poll ``condition`` every millisecond until it holds (True) or ``process`` ended (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if not process.is_alive():
            return False
        assert time.monotonic() < deadline, "the training process hangs"
        time.sleep(0.001)
    return True


def launch(ctx, run, log, **kw):
    """Start :func:`fault_worker.train` in ``run``, resuming its newest checkpoint if it has one."""
    resume = bool(RunFolder(run).complete_checkpoints())
    p = ctx.Process(target=fault_worker.train, args=(str(run), resume, str(log)), kwargs=kw, daemon=True)
    p.start()
    return p


def check_after_kill(run):
    """What a kill must leave: every complete checkpoint loadable, the student of the newest one in place."""
    folder = RunFolder(run)
    complete = folder.complete_checkpoints()
    assert all(checkpoint_problem(c) is None for c in complete), [checkpoint_problem(c) for c in complete]
    if complete:
        assert folder.find_checkpoint("latest") == complete[-1]
        assert load_file(run / "student" / "model.safetensors")  # never missing, never half-written


def kill_and_resume(ctx, run, kills, slow) -> list[str]:
    """Run to the end, killing the process (SIGKILL) once per entry of ``kills`` and resuming with
    ``latest``: ``("delay", s)`` kills ``s`` seconds into training, ``("write", k, s)`` kills ``s``
    seconds after the ``k``-th checkpoint write of that process began. Returns where each kill landed."""
    landed = []
    for i, kill in enumerate(kills):
        started, writes = ctx.Event(), ctx.Value("i", 0)
        p = launch(ctx, run, run.parent / f"log-{i}.txt", started=started, writes=writes, slow=slow)
        if kill[0] == "delay":
            alive = wait_for(started.is_set, p)
            time.sleep(kill[1])
        else:
            alive = wait_for(lambda writes=writes, k=kill[1]: writes.value >= k, p)
            time.sleep(kill[2])
        p.kill()
        p.join()
        if not alive or p.exitcode == 0:
            landed.append("after the end")
            continue
        folder = RunFolder(run)
        steps = [int(c.name[len(CHECKPOINT_PREFIX):]) for c in folder.checkpoints.glob(f"{CHECKPOINT_PREFIX}*")]
        complete = folder.complete_checkpoints()
        newest = folder.checkpoint(max(steps)) if steps else None
        landed.append("inside a checkpoint write" if newest is not None and newest not in complete else "between writes")
        check_after_kill(run)
    for i in range(len(kills), len(kills) + 3):  # resume to the end
        p = launch(ctx, run, run.parent / f"log-{i}.txt")
        p.join(300)
        assert p.exitcode == 0, (run.parent / f"log-{i}.txt").read_text()[-3000:]
        if RunFolder(run).has_finished(fault_worker.MAX_STEPS):
            break
    return landed


def reference_run(ctx, tmp_path):
    p = launch(ctx, tmp_path / "reference", tmp_path / "reference.txt")
    p.join(300)
    assert p.exitcode == 0, (tmp_path / "reference.txt").read_text()[-3000:]
    return final_state(tmp_path / "reference")


def test_killed_training_resumes_bitwise_equal(forkserver, tmp_path):
    """Two kills (SIGKILL): one at a random moment of training, one inside a checkpoint write; each
    resume continues from the newest complete checkpoint; the result is bit for bit the uninterrupted one."""
    rng = random.Random(0)
    slow = 0.15  # every checkpoint write stays open >= 0.3 s: the kill below lands inside one
    kills = [("delay", rng.uniform(0.1, 1.5)), ("write", rng.randint(1, 3), rng.uniform(0.0, 0.1))]
    reference = reference_run(forkserver, tmp_path)
    landed = kill_and_resume(forkserver, tmp_path / "run", kills, slow)
    assert landed[1] == "inside a checkpoint write", landed
    assert_bitwise_equal(final_state(tmp_path / "run"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_killed_training_resumes_bitwise_equal_many_kills(forkserver, tmp_path, seed):
    """Eight kills at random points of training and of checkpoint writes, per seed."""
    rng = random.Random(seed)
    kills = [("delay", rng.uniform(0.0, 2.0)) if rng.random() < 0.5 else ("write", rng.randint(1, 4), rng.uniform(0.0, 0.2))
             for _ in range(8)]
    reference = reference_run(forkserver, tmp_path)
    landed = kill_and_resume(forkserver, tmp_path / "run", kills, slow=0.1)
    assert "inside a checkpoint write" in landed, landed
    assert_bitwise_equal(final_state(tmp_path / "run"), reference)


# -- a full disk, a read-only destination -------------------------------------------------------------

TINY = ["--set", "train.batch_size=2", "--set", "train.num_sample_images=4", "--set", "train.sample_every=100"]


def _full_in_second_checkpoint(monkeypatch, writer: str):
    """Make ``writer`` fail as on a full disk for the files of the second checkpoint; returns the undo.

    ``torch``: ``torch.save`` (accelerate's optimizer and RNG files) raises ``OSError(ENOSPC)`` naming
    the file, as ``open`` does; ``safetensors``: accelerate's safetensors writer (the networks) raises
    what safetensors raises on a full disk, a ``SafetensorError`` that names no file."""
    import accelerate.utils.other
    from safetensors import SafetensorError

    owner, name = (torch, "save") if writer == "torch" else (accelerate.utils.other, "safe_save_file")
    real = getattr(owner, name)

    def disk_full(obj, f, *args, **kwargs):
        if f"{CHECKPOINT_PREFIX}0000002" in str(f):
            if writer == "torch":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(owner, name, disk_full)
    return lambda: monkeypatch.setattr(owner, name, real)


@pytest.mark.parametrize("network, writer", [("toy", "torch"), ("toy", "safetensors"),
                                             pytest.param("mnist", "torch", marks=pytest.mark.slow)])
def test_disk_full_during_a_checkpoint_is_one_line_and_the_earlier_one_resumes(tmp_path, monkeypatch, network, writer):
    """A writer fails with ENOSPC in the second checkpoint: exit code 2, one line naming the
    checkpoint and the one that is intact, no traceback; that one is complete and
    ``--resume latest`` continues from it once there is space again.

    ``toy``: the whole command (config, teacher, objective, engine, run folder) with the toy
    networks in place of the MNIST UNets (seconds); ``mnist``: the shipped config as it is (minutes on 2 cores)."""
    run = tmp_path / "run"
    if network == "toy":
        import importlib

        runner = importlib.import_module("distilldiff.distill")  # the module, not the function distilldiff.distill
        monkeypatch.setattr(runner, "build_distill_task", lambda *args, **kwargs: fault_worker.tiny_task())
    space_again = _full_in_second_checkpoint(monkeypatch, writer)
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY,
                "--set", "train.max_steps=2", "--set", "train.checkpoint_every=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    folder = RunFolder(run)
    assert error_lines(r.stderr) == [(
        f"distilldiff: error: cannot write {folder.checkpoint(2)}: No space left on device "
        f"(earlier checkpoints are intact; --resume latest continues from {CHECKPOINT_PREFIX}0000001)")]
    assert r.stderr.strip().splitlines()[-1] == error_lines(r.stderr)[0]
    assert folder.complete_checkpoints() == [folder.checkpoint(1)] and checkpoint_problem(folder.checkpoint(1)) is None
    if network == "mnist":
        assert json.loads((run / "student" / "distilldiff_student.json").read_text())["step"] == 1
    assert not list(run.glob(".student.*"))  # no partial student folder

    space_again()
    r = run_cli("distill", "--output-dir", str(run), "--resume", "latest")
    assert r.returncode == 0, r.stderr
    assert "at step 1" in r.stdout + r.stderr and json.loads((folder.checkpoint(2) / STATE_FILE).read_text())["step"] == 2


def test_read_only_run_folder_is_one_line_before_training(tmp_path, monkeypatch):
    """config.yaml cannot be written (EROFS): one line naming it, exit code 2, nothing trained."""
    from distilldiff.engine import run_folder

    def read_only(config, path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(run_folder, "dump_yaml", read_only)
    run = tmp_path / "run"
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), *TINY, "--set", "train.max_steps=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert error_lines(r.stderr) == [f"distilldiff: error: cannot write {run / 'config.yaml'}: Read-only file system"]
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


@pytest.mark.parametrize("error, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), errno.EDQUOT),
    (PermissionError(errno.EACCES, "Permission denied"), errno.EACCES),
    (OSError(errno.EIO, "Input/output error"), None),  # other OSErrors stay unexpected
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), None),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),  # safetensors
    (RuntimeError("open file failed because of errno 30 on fopen: Read-only file system"), errno.EROFS),  # torch
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), None),  # torch, disk not full
    (ValueError("bad value"), None),
])
def test_write_failures_are_recognised(tmp_path, error, expected):
    from distilldiff.atomic import WriteError, write_failure, writing

    assert write_failure(error, tmp_path) == expected
    with pytest.raises(WriteError if expected else type(error)) as info, writing(tmp_path / "out", "kept"):
        raise error
    if expected:
        assert str(info.value) == f"cannot write {tmp_path / 'out'}: {os.strerror(expected)} (kept)"


def test_torch_writer_error_on_a_full_file_system_is_a_write_failure(tmp_path, monkeypatch):
    """torch's archive writer says only "unexpected pos" when the disk is full: the file system is asked."""
    from distilldiff.atomic import write_failure

    full = types.SimpleNamespace(f_flag=0, f_bavail=3, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda path: full)
    assert write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), tmp_path) == errno.ENOSPC
    monkeypatch.setattr(os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY, f_bavail=10**9, f_frsize=4096))
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), tmp_path) == errno.EROFS


# -- two processes --------------------------------------------------------------------------------

LAUNCHED_CLI = """
import importlib, sys
sys.path.insert(0, {tests!r})
import fault_worker
# the toy networks in place of the MNIST UNets: everything else is the command line's
importlib.import_module("distilldiff.distill").build_distill_task = lambda *args, **kwargs: fault_worker.tiny_task()
from distilldiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_process_run_resumed_is_bitwise_equal(tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo) of ``distilldiff distill``: a run to step 3,
    then a second launch with ``--resume latest`` to step 6, equals a run to step 6 bit for bit
    (both networks, their optimizers, the EMA and the student folder)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "launched_cli.py"
    script.write_text(LAUNCHED_CLI.format(tests=str(Path(__file__).parent)))

    def launch(run, steps, *args):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        # with --cpu, accelerate 1.15 starts one process unless mpirun is set up; --multi_gpu starts
        # them through torch.distributed.run, and train.cpu=true puts them on the CPU (gloo)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script),
               "distill", "--output-dir", str(run), "--set", f"train.max_steps={steps}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr

    first = ["--config", "configs/mnist/sid.yaml", "--set", "train.cpu=true", "--set", "train.batch_size=8",
             "--set", "train.checkpoint_every=3", "--set", "train.num_sample_images=4", "--set", "train.sample_every=100"]
    launch(tmp_path / "full", 6, *first)
    launch(tmp_path / "part", 3, *first)
    out = launch(tmp_path / "part", 6, "--resume", "latest")
    assert "at step 3" in out
    for run in ("full", "part"):
        assert (RunFolder(tmp_path / run).checkpoint(6) / "random_states_1.pkl").is_file()  # two processes ran
    assert_bitwise_equal(final_state(tmp_path / "part", 6), final_state(tmp_path / "full", 6))
