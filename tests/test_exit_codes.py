"""Exit codes and tracebacks of the command line: 0 success, 2 an expected error (one line), 130 an
interrupt, 1 a bug (traceback); ``--debug`` / ``DISTILLDIFF_DEBUG=1`` raise instead; paths that are
neither a folder nor a reachable hub model are one line."""

import contextlib
import errno
import io
import os
import socket
import subprocess
import sys
import types

import pytest

from distilldiff import cli
from distilldiff.cli import main


def run_cli(*args):
    """``distilldiff ARGS`` in this process: exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


EXPORT = ["export", "--run", "r", "--out", "o"]


def failing_export(monkeypatch, error: BaseException) -> None:
    """``distilldiff export`` raises ``error``."""

    def export(args):
        raise error

    monkeypatch.setattr(cli, "cmd_export", export)


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)


def test_expected_error_is_one_line_exit_2_and_debug_raises_it(tmp_path, monkeypatch):
    missing = str(tmp_path / "none.yaml")
    r = run_cli("distill", "--config", missing)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and missing in r.stderr
    with pytest.raises(Exception, match="config file not found"):
        run_cli("--debug", "distill", "--config", missing)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(Exception, match="config file not found"):
        run_cli("distill", "--config", missing)
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert run_cli("distill", "--config", missing).returncode == 2


def test_unexpected_error_prints_the_traceback_and_exits_1(monkeypatch):
    failing_export(monkeypatch, RuntimeError("boom\nsecond line"))
    r = run_cli(*EXPORT)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "distilldiff: internal error: RuntimeError: boom (a bug: please report it with the traceback above)")
    with pytest.raises(RuntimeError, match="boom"):
        run_cli("--debug", *EXPORT)


@pytest.mark.parametrize("error, code, line", [
    (OSError(errno.EIO, "Input/output error", "x.bin"), 1, None),  # other OSErrors are unexpected
    (OSError(errno.ENOSPC, "No space left on device", "o/model.safetensors"), 2,
     "distilldiff: error: cannot write o/model.safetensors: No space left on device"),
    (OSError(errno.ENOSPC, "No space left on device"), 2, "distilldiff: error: cannot write o: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "o"), 2, "distilldiff: error: o: Permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "runs/x/checkpoints/step-0000004/optimizer.bin"), 2,
     "distilldiff: error: cannot write runs/x/checkpoints/step-0000004: Read-only file system (no earlier checkpoint)"),
])
def test_os_errors(monkeypatch, error, code, line):
    """Write failures the user can act on are one line naming the path (a checkpoint rather than a
    file in it; the command's destination when the error names none), exit code 2."""
    failing_export(monkeypatch, error)
    r = run_cli(*EXPORT)
    assert r.returncode == code, r.stderr
    if line is not None:
        assert r.stderr.strip() == line


def test_interrupt_exits_130_with_one_line(monkeypatch):
    failing_export(monkeypatch, KeyboardInterrupt())
    r = run_cli(*EXPORT)
    assert r.returncode == 130 and len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("distilldiff:")
    r = run_cli("--debug", *EXPORT)  # --debug: also where it stopped
    assert r.returncode == 130 and "Traceback" in r.stderr


def test_bad_flag_is_exit_2():
    with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()):
        main(["distill", "--no-such-flag"])
    assert info.value.code == 2


# -- teacher paths and hub ids ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["a/b/c", "my run/x", "./nope", "owner--x/y", "nope"])
def test_path_that_is_no_folder_and_no_hub_id(tmp_path, monkeypatch, model):
    monkeypatch.chdir(tmp_path)
    r = run_cli("sample", "--model", model, "--num", "1", "--out", "g.png", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"distilldiff: error: --model {model!r}: no such folder (and not a hub id of the form owner/name)")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return constants


def test_uncached_hub_model_offline_is_one_line(tmp_path, monkeypatch, empty_hub_cache):
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", True)
    r = run_cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(tmp_path / "r"),
                "--set", "teacher.path=distilldiff-tests/not-cached")
    assert r.returncode == 2 and r.stderr.strip() == (
        "distilldiff: error: teacher.path 'distilldiff-tests/not-cached': the model is not in the local cache and "
        "offline mode is on (HF_HUB_OFFLINE=1); download it where the hub can be reached, or give a local pipeline folder")
    assert not (tmp_path / "r").exists()


def test_unreachable_hub_is_one_line(tmp_path, monkeypatch, empty_hub_cache):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(empty_hub_cache, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(empty_hub_cache, "HUGGINGFACE_CO_URL_TEMPLATE", f"http://127.0.0.1:{port}/{{repo_id}}/resolve/{{revision}}/{{filename}}")
    r = run_cli("sample", "--model", "distilldiff-tests/not-cached", "--num", "1", "--out", str(tmp_path / "g.png"), "--device", "cpu")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("distilldiff: error: --model 'distilldiff-tests/not-cached': the Hugging Face Hub could not be reached (")
    assert r.stderr.strip().endswith("and the model is not in the local cache; download it where the hub can be reached, or give a local pipeline folder")


def test_offline_hub_in_a_fresh_process(tmp_path):
    """The real entry point with HF_HUB_OFFLINE=1 in its environment and an empty cache: exactly one
    line on stderr (no warnings of diffusers or huggingface_hub, no pointer to a traceback), exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop(cli.DEBUG_ENV, None)
    r = subprocess.run([sys.executable, "-m", "distilldiff.cli", "sample", "--model", "distilldiff-tests/not-cached",
                        "--num", "1", "--out", str(tmp_path / "g.png"), "--device", "cpu"],
                       capture_output=True, text=True, env=env, check=False)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [(
        "distilldiff: error: --model 'distilldiff-tests/not-cached': the model is not in the local cache and "
        "offline mode is on (HF_HUB_OFFLINE=1); download it where the hub can be reached, or give a local pipeline folder")], r.stderr
