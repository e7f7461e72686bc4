"""Runs made of several engine runs in a row (progressive distillation's halving stages, the
autoencoder and then the UNet of a latent teacher), each in its own folder of one output folder."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

from ..atomic import replace_folder
from ..config import ConfigError, TrainConfig
from .engine import Engine
from .run_folder import RunFolder
from .task import TrainTask


class StagedRun:
    """One engine run per stage, in ``OUT/<name>``, in order; ``OUT/student`` is the result.

    A fresh run refuses an output folder that holds checkpoints of an earlier one; a resumed run
    (``resume="latest"``, the only form: stage by stage) skips finished stages and resumes the
    unfinished one from its newest complete checkpoint.

    Args:
        out: the output folder.
        names: the stages' folder names.
        resume: ``None`` or ``"latest"``.
        what: the run, for the error message of another ``resume`` value (e.g. "objective 'progressive'").
    """

    def __init__(self, out: str | Path, names: Sequence[str], resume: str | None, what: str):
        self.out = Path(out)
        self.folders = {name: RunFolder(self.out / name) for name in names}
        if resume not in (None, "latest"):
            raise ConfigError(f"{what} trains in {len(names)} stages and resumes with --resume latest (stage by stage)")
        if resume is None and any(any(f.checkpoints.glob("step-*")) for f in self.folders.values()):
            raise FileExistsError(f"{self.out} holds stages of an earlier run; pass --resume latest to continue it or choose another --output-dir")

    def write_config(self, config: Any) -> None:
        RunFolder(self.out).write_config(config)

    def finished(self, name: str, train: TrainConfig) -> bool:
        """Whether stage ``name`` has its final checkpoint."""
        return self.folders[name].has_finished(train.max_steps)

    def run(self, name: str, task: TrainTask, train: TrainConfig, config: Any) -> Engine:
        """Train stage ``name`` (resuming its own checkpoints, if any); returns its engine."""
        folder = self.folders[name]
        engine = Engine(task, train, folder.root)
        engine.run(config, "latest" if folder.complete_checkpoints() else None)
        return engine

    def publish(self, name: str) -> Path:
        """Copy stage ``name``'s student folder to ``OUT/student`` (replaced only once complete)."""
        return replace_folder(self.out / "student", lambda staged: shutil.copytree(self.folders[name].student, staged))
