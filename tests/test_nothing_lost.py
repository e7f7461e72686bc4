"""A user's runs, checkpoints and exports are never destroyed or overwritten (defects found by fault injection)."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from distilldiff.atomic import replace_folder, write_json
from distilldiff.cli import main
from distilldiff.engine import Engine
from distilldiff.objectives import SiD, SiDConfig

from toy_setup import sid_task, teacher, train_config

TINY = ["--set", "train.batch_size=2", "--set", "train.num_sample_images=4", "--set", "train.max_steps=1"]


def cli(*args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs/a`` and ``runs/b``: two finished one-update SiD runs side by side."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        assert cli("distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(root / name), *TINY)[0] == 0
    return root


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dest", ["{root}", "{root}/a/checkpoints", "{root}/a/student", "{root}/b", "{root}/b/student",
                                  "{root}/a/checkpoints/new"])
def test_export_refuses_destinations_in_or_around_runs(runs, dest):
    before = snapshot(runs)
    code, err = cli("export", "--run", str(runs / "a"), "--out", dest.format(root=runs), "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and ("run" in err), err
    assert snapshot(runs) == before  # nothing deleted, nothing written


def test_export_force_replaces_only_a_previous_export_and_only_when_complete(runs, tmp_path, monkeypatch):
    out = tmp_path / "export"
    assert cli("export", "--run", str(runs / "a"), "--out", str(out))[0] == 0
    first = snapshot(out)
    assert cli("export", "--run", str(runs / "a"), "--out", str(out))[0] == 2  # not empty, no --force
    import distilldiff.export as export

    def broken(student, folder, info):  # a save that dies half-way
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_student", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_run(runs / "a", out, force=True)
    assert snapshot(out) == first and [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial folder left
    monkeypatch.undo()
    assert cli("export", "--run", str(runs / "a"), "--out", str(out), "--force")[0] == 0
    assert json.loads((out / "distilldiff_student.json").read_text())["objective"] == "sid"


def test_distill_into_an_existing_run_changes_nothing(runs):
    before = snapshot(runs / "a")
    code, err = cli("distill", "--config", "configs/mnist/dmd.yaml", "--output-dir", str(runs / "a"), *TINY)
    assert code == 2 and "holds checkpoints of an earlier run" in err
    assert snapshot(runs / "a") == before  # config.yaml included


def test_student_folder_is_replaced_atomically(tmp_path):
    """A save of the student folder that dies half-way leaves the previous student complete and the
    checkpoint incomplete (no state.json), so that resume falls back to the previous one."""
    calls = []

    def save(student, folder, info):
        calls.append(info["step"])
        folder.mkdir(parents=True)
        (folder / "weights.txt").write_text(str(info["step"]))
        if info["step"] == 4:
            raise OSError("killed")

    task = sid_task(SiD(SiDConfig(), teacher()))
    task.save_fn = save
    engine = Engine(task, train_config(max_steps=4, batch_size=8, checkpoint_every=2, keep_checkpoints=5), tmp_path)
    with pytest.raises(OSError, match="killed"):
        engine.train()
    assert calls == [2, 4] and (tmp_path / "student" / "weights.txt").read_text() == "2"
    assert [p.name for p in engine.run_folder.complete_checkpoints()] == ["step-0000002"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_replace_folder(tmp_path):
    dest = tmp_path / "out"
    replace_folder(dest, lambda d: (d.mkdir(), (d / "x").write_text("1")))
    replace_folder(dest, lambda d: (d.mkdir(), (d / "y").write_text("2")))
    assert sorted(p.name for p in dest.iterdir()) == ["y"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError, match="nothing was written"):
        replace_folder(dest, lambda d: None)
    assert (dest / "y").read_text() == "2"


def test_write_json_replaces_the_file_whole(tmp_path, monkeypatch):
    """The tools' --out files: a complete file or the previous one, never half of one, and no temporary left."""
    out = write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert json.loads(out.read_text()) == {"x": 1} and sorted(p.name for p in out.parent.iterdir()) == ["b.json"]
    real_write = Path.write_text

    def half_then_full_disk(self, text, *a, **k):
        real_write(self, text[: len(text) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError):
        write_json(out, {"x": 2, "y": [1, 2, 3]})
    assert json.loads(out.read_text()) == {"x": 1} and sorted(p.name for p in out.parent.iterdir()) == ["b.json"]


def _three_checkpoints(tmp_path):
    task = sid_task(SiD(SiDConfig(), teacher()))
    Engine(task, train_config(max_steps=3, batch_size=8, checkpoint_every=1, keep_checkpoints=5), tmp_path).train()
    return tmp_path / "checkpoints"


@pytest.mark.parametrize("damage, named", [
    (lambda c: (c / "ema.safetensors").write_bytes((c / "ema.safetensors").read_bytes()[:100]), "ema.safetensors"),
    (lambda c: (c / "optimizer.bin").write_bytes((c / "optimizer.bin").read_bytes()[:50]), "optimizer.bin"),
    (lambda c: (c / "model_1.safetensors").write_bytes(b""), "model_1.safetensors"),
    (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl"),
    (lambda c: (c / "state.json").write_text('{"step": 3, "nim'), "state.json"),
])
def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, caplog, damage, named):
    ckpts = _three_checkpoints(tmp_path)
    damage(ckpts / "step-0000003")
    engine = Engine(sid_task(SiD(SiDConfig(), teacher())), train_config(max_steps=4, batch_size=8), tmp_path)
    with caplog.at_level("WARNING"):
        assert engine.run_folder.find_checkpoint("latest").name == "step-0000002"
    assert named in caplog.text and "skipping checkpoint" in caplog.text
    with pytest.raises(ValueError, match=f"--resume .*step-0000003: .*{named}"):
        engine.run_folder.find_checkpoint(str(ckpts / "step-0000003"))
    engine.train(resume="latest")
    assert engine.state.step == 4


def test_state_json_is_written_atomically(tmp_path):
    from distilldiff.engine import RunFolder

    RunFolder.write_state(tmp_path, {"step": 7})
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 7} and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_replace_folder_without_an_atomic_swap_recovers_after_a_kill(tmp_path, monkeypatch):
    """Where the system cannot swap two folders in one step, a kill between moving the old folder
    aside and renaming the new one in leaves ``.NAME.old-*``: the next write of NAME puts it back
    first (and clears partial ``.NAME.tmp-*`` folders), so a reader never finds NAME missing for long."""
    from distilldiff import atomic

    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    dest = tmp_path / "student"
    replace_folder(dest, lambda d: (d.mkdir(), (d / "w").write_text("1")))
    replace_folder(dest, lambda d: (d.mkdir(), (d / "w").write_text("2")))
    assert (dest / "w").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["student"]
    # the state a kill between the two renames leaves: dest moved aside, the new folder staged
    (tmp_path / ".student.old-x").mkdir()
    dest.rename(tmp_path / ".student.old-x" / "student")
    (tmp_path / ".student.tmp-y" / "student").mkdir(parents=True)
    atomic.recover_folder(dest)
    assert (dest / "w").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_replace_folder_swaps_in_one_step_where_it_can(tmp_path):
    from distilldiff import atomic

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").touch()
    if not atomic._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    assert [p.name for p in b.iterdir()] == ["x"] and not any(a.iterdir())


def test_rotation_never_leaves_a_checkpoint_that_looks_complete(tmp_path):
    """Rotation deletes state.json first (a deletion killed half-way leaves an incomplete folder,
    never a damaged 'complete' one) and clears incomplete folders older than the newest complete one."""
    from distilldiff.engine import RunFolder

    folder = RunFolder(tmp_path)
    for step in (1, 2, 3, 4):
        folder.checkpoint(step).mkdir(parents=True)
        if step != 2:  # step 2: a save (or a deletion) that was killed
            RunFolder.write_state(folder.checkpoint(step), {"step": step})
    folder.checkpoint(5).mkdir()  # a save in progress, newer than the newest complete one: kept
    folder.rotate(2)
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["step-0000003", "step-0000004", "step-0000005"]


def test_a_rewritten_checkpoint_is_incomplete_until_its_new_state_json(tmp_path):
    """Resuming from an older checkpoint rewrites newer step folders: begin_checkpoint drops the old
    state.json first, so that a save killed half-way is not taken for a complete checkpoint."""
    from distilldiff.engine import RunFolder

    folder = RunFolder(tmp_path)
    folder.checkpoint(3).mkdir(parents=True)
    RunFolder.write_state(folder.checkpoint(3), {"step": 3})
    assert folder.begin_checkpoint(3) == folder.checkpoint(3) and folder.complete_checkpoints() == []
    assert folder.begin_checkpoint(4) == folder.checkpoint(4)  # nothing there: nothing to do


def test_state_json_on_a_full_disk_is_a_write_error_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from distilldiff.atomic import WriteError
    from distilldiff.engine import RunFolder

    folder = RunFolder(tmp_path)
    for step in (1, 2):
        folder.checkpoint(step).mkdir(parents=True)
    RunFolder.write_state(folder.checkpoint(1), {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("distilldiff.engine.run_folder.os.replace", full)
    with pytest.raises(WriteError) as info:
        RunFolder.write_state(folder.checkpoint(2), {"step": 2})
    assert str(info.value) == (f"cannot write {folder.checkpoint(2)}: No space left on device "
                               "(earlier checkpoints are intact; --resume latest continues from step-0000001)")
    assert list(folder.checkpoint(2).iterdir()) == [] and folder.complete_checkpoints() == [folder.checkpoint(1)]


def test_export_onto_a_full_disk_is_one_line_and_keeps_the_previous_export(runs, tmp_path, monkeypatch):
    """safetensors reports a full disk as ``SafetensorError(... (os error 28))``: one line naming the
    destination, exit code 2; the previous export is unchanged and no partial folder is left."""
    from safetensors import SafetensorError

    from distilldiff import export

    out = tmp_path / "export"
    assert cli("export", "--run", str(runs / "a"), "--out", str(out))[0] == 0
    first = snapshot(out)

    def full(student, folder, info):
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(export, "save_student", full)
    code, err = cli("export", "--run", str(runs / "a"), "--out", str(out), "--force")
    assert code == 2 and err.strip() == f"distilldiff: error: cannot write {out}: No space left on device (the previous folder is unchanged)"
    assert snapshot(out) == first and [p.name for p in tmp_path.iterdir()] == ["export"]
