"""The run folder on disk: its layout, checkpoint completeness and rotation, the evaluation log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import fsync_dir, fsync_tree, writing
from ..config import dump_yaml

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "state.json"


def checkpoint_problem(path: Path) -> str | None:
    """What makes checkpoint ``path`` unloadable (naming the file), or ``None``: ``state.json`` must
    parse, the RNG state of process 0 must exist, every safetensors file must read and every
    optimizer/RNG pickle must load (as accelerate loads them, ``weights_only``)."""
    from accelerate.utils import load as accelerate_load
    from safetensors import SafetensorError, safe_open

    try:
        state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(state, dict) or "step" not in state:
            return f"{path / STATE_FILE} has no step"
    except (OSError, json.JSONDecodeError) as e:
        return f"{path / STATE_FILE} is unreadable ({type(e).__name__})"
    if not (path / "random_states_0.pkl").is_file():
        return f"{path / 'random_states_0.pkl'} (the RNG state) is missing"
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    st.get_slice(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            return f"{f} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    for f in sorted(path.glob("*.bin")) + sorted(path.glob("*.pkl")):
        try:
            accelerate_load(str(f), map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is damaged
            return f"{f} is damaged ({type(e).__name__})"
    return None


def checkpoint_of(path: str | Path) -> Path | None:
    """The checkpoint folder (``.../checkpoints/step-N``) that ``path`` is or lies in, else ``None``."""
    for p in (Path(path), *Path(path).parents):
        if p.name.startswith(CHECKPOINT_PREFIX) and p.parent.name == "checkpoints":
            return p
    return None


def failed_checkpoint_note(checkpoint: Path) -> str:
    """What is left after writing ``checkpoint`` failed: the newest complete earlier checkpoint,
    from which ``--resume latest`` continues (the failed one has no ``state.json``)."""
    earlier = [p for p in RunFolder(checkpoint.parent.parent).complete_checkpoints() if p.name < checkpoint.name]
    if not earlier:
        return "no earlier checkpoint"
    return f"earlier checkpoints are intact; --resume latest continues from {earlier[-1].name}"


class RunFolder:
    """Paths and file I/O of one training run (no training logic).

    Layout: ``config.yaml``, ``checkpoints/step-XXXXXXX/`` (accelerate state, ``ema.safetensors``,
    ``targets.safetensors`` and ``state.json``, written last: its presence marks a complete
    checkpoint), ``student/`` (the EMA student as a loadable folder), ``samples/step-XXXXXXX.png``
    and ``latest.png``, ``logs/`` (tensorboard) and ``eval.jsonl`` (one line per evaluation).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def student(self) -> Path:
        return self.root / "student"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def eval_log(self) -> Path:
        return self.root / "eval.jsonl"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"{CHECKPOINT_PREFIX}{step:07d}"

    @property
    def loss_plot(self) -> Path:
        """Every logged value against the step, redrawn with each sample grid."""
        return self.root / "samples" / "losses.png"

    def sample_grid(self, step: int) -> Path:
        return self.root / "samples" / f"{CHECKPOINT_PREFIX}{step:07d}.png"

    def write_config(self, config: Any) -> None:
        """Write ``config.yaml`` through a temporary file and a rename (a kill never leaves half a config)."""
        tmp = self.root / f".{self.config_file.name}.tmp"
        with writing(self.config_file):
            self.root.mkdir(parents=True, exist_ok=True)
            try:
                dump_yaml(config, tmp)
                os.replace(tmp, self.config_file)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    @contextlib.contextmanager
    def writing(self, path: str | Path) -> Iterator[None]:
        """Around a write of ``path`` in this run (a checkpoint, a sample grid): a full disk, a
        read-only or forbidden destination becomes one :class:`~distilldiff.atomic.WriteError` line
        naming ``path``; for a checkpoint, the note says which earlier checkpoint is intact.

        Example (the engine's checkpoint save)::

            with self.run_folder.writing(path):
                accelerator.save_state(str(path))
                ...
        """
        checkpoint = checkpoint_of(path)
        with writing(checkpoint or path, (lambda: failed_checkpoint_note(checkpoint)) if checkpoint else None):
            yield

    def begin_checkpoint(self, step: int) -> Path:
        """The folder of the checkpoint of ``step``, made incomplete before it is (re)written: a
        ``state.json`` left there by an earlier run (resumed from an older checkpoint) is removed
        first, so that a save killed half-way never passes for a complete checkpoint."""
        path = self.checkpoint(step)
        with contextlib.suppress(FileNotFoundError):
            (path / STATE_FILE).unlink()
            fsync_dir(path)
        return path

    # -- checkpoints -----------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """This run's checkpoints that finished writing (a save killed half-way has no state.json), oldest first."""
        return sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file())

    def find_checkpoint(self, resume: str) -> Path:
        """``latest`` -> the newest complete checkpoint of this run that can be loaded (damaged newer
        ones are skipped with a warning naming the file); otherwise the given path, which must be
        loadable (else a one-line error naming the damaged file)."""
        if resume == "latest":
            found = self.complete_checkpoints()
            if not found:
                raise FileNotFoundError(f"--resume latest: no checkpoint under {self.checkpoints}")
            problems = []
            for path in reversed(found):
                problem = checkpoint_problem(path)
                if problem is None:
                    return path
                logger.warning("skipping checkpoint %s: %s", path, problem)
                problems.append(problem)
            raise ValueError(f"--resume latest: every checkpoint under {self.checkpoints} is damaged (newest: {problems[0]})")
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no {STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(f"--resume {resume}: {problem}")
        return path

    def checkpoint_in_progress(self) -> Path | None:
        """The newest checkpoint folder if it has no ``state.json`` and is newer than every complete
        one: the save in progress, or the one a failed or killed save left."""
        folders = sorted(p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
        return folders[-1] if folders and not (folders[-1] / STATE_FILE).is_file() else None

    def has_finished(self, step: int) -> bool:
        """Whether the checkpoint of ``step`` is complete (a staged run's finished stage)."""
        return (self.checkpoint(step) / STATE_FILE).is_file()

    @staticmethod
    def write_state(checkpoint: Path, state: dict) -> None:
        """Write the counters that complete a checkpoint (after everything else in it): the other
        files are flushed to disk first, then ``state.json`` goes through a temporary file and a
        rename, so that it is never half-written nor present before the files it vouches for."""
        tmp = checkpoint / f".{STATE_FILE}.tmp"
        with writing(checkpoint, lambda: failed_checkpoint_note(checkpoint)):
            try:
                fsync_tree(checkpoint)
                with open(tmp, "w") as f:
                    f.write(json.dumps(state, indent=2))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, checkpoint / STATE_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(checkpoint)

    @staticmethod
    def read_state(checkpoint: Path) -> dict:
        return json.loads((checkpoint / STATE_FILE).read_text())

    def rotate(self, keep: int) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older than
        the newest complete one (left by a save or a deletion that was killed). A checkpoint's
        ``state.json`` goes first, so that a deletion killed half-way never leaves a checkpoint
        that looks complete."""
        complete = self.complete_checkpoints()
        if not complete:
            return
        newest = complete[-1].name
        stale = [p for p in self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name < newest and p not in complete]
        for p in complete[:-keep] + stale:
            (p / STATE_FILE).unlink(missing_ok=True)
            shutil.rmtree(p)

    # -- evaluation log --------------------------------------------------------------------------

    def append_evaluation(self, record: dict) -> None:
        with writing(self.eval_log), open(self.eval_log, "a") as f:
            f.write(json.dumps(record) + "\n")

    def trim_eval_log(self, step: int) -> None:
        """Forget evaluations past ``step`` (the checkpoint a run starts from: they are run again),
        and a last line cut short by a crash."""
        if not self.eval_log.is_file():
            return
        lines = [line for line in self.eval_log.read_text().splitlines() if line.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                row_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError):
                if i + 1 < len(lines):
                    raise ValueError(f"{self.eval_log}: line {i + 1} is not an evaluation record") from None
                logger.warning("%s: dropping a last line cut short (%r)", self.eval_log, line[:80])
                continue
            if row_step <= step:
                kept.append(line)
        if kept != lines:
            self.eval_log.write_text("".join(line + "\n" for line in kept))
