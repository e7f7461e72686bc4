"""When the training loop does what besides training: logging, sample grids, evaluation, checkpoints."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Due:
    """The maintenance tasks to run after a step, in this order."""

    log: bool = False
    sample: bool = False
    evaluate: bool = False
    checkpoint: bool = False


class Schedule:
    """Decides after each training step which maintenance is due, and what is left at the end.

    Logs every ``log_every`` steps and at ``max_steps``; sample grids every ``sample_every``
    steps; evaluations every ``eval_every`` steps (``None``: never) and checkpoints every
    ``checkpoint_every`` steps, both also at the run's last step (``max_steps`` or the time
    budget). Evaluation comes before the checkpoint of the same step, so that a checkpoint's
    ``eval.jsonl`` already holds its own step. At the end, whatever the last step did not do
    (a run resumed at its end, a grid off the ``sample_every`` grid) is due once more.

    Args:
        start_step: the step the run starts (or resumes) at; a resumed run counts it as
            evaluated and checkpointed.
    """

    def __init__(self, max_steps: int, log_every: int, sample_every: int, checkpoint_every: int,
                 eval_every: int | None = None, start_step: int = 0, resumed: bool = False):
        self.max_steps, self.log_every, self.sample_every = max_steps, log_every, sample_every
        self.checkpoint_every, self.eval_every = checkpoint_every, eval_every
        self.last_checkpoint = start_step if resumed else -1
        self.last_eval = start_step if resumed else -1

    def due(self, step: int, last: bool) -> Due:
        """What to do after ``step`` (``last``: no step follows)."""
        return Due(
            log=step % self.log_every == 0 or step == self.max_steps,
            sample=step % self.sample_every == 0,
            evaluate=self.eval_every is not None and (step % self.eval_every == 0 or last),
            checkpoint=step % self.checkpoint_every == 0 or last,
        )

    def at_end(self, step: int) -> Due:
        """What is left after the loop ended at ``step``."""
        return Due(
            sample=step % self.sample_every != 0,
            evaluate=self.eval_every is not None and self.last_eval != step,
            checkpoint=self.last_checkpoint != step,
        )

    def done(self, step: int, due: Due) -> None:
        """Record that ``due`` ran at ``step``."""
        if due.evaluate:
            self.last_eval = step
        if due.checkpoint:
            self.last_checkpoint = step


class LogWindow:
    """Averages the logged values over the steps since the last log line, and the images per second.

    Args:
        peaks: names (the part after ``phase/``) whose largest single value in the window is logged too, as
            ``{phase}/{name}_max``: a window's average flattens a one-update spike, such as the spikes of a
            critic's gradient norm in BENCHMARKS.md section 6.3.8.
    """

    def __init__(self, peaks: tuple[str, ...] = ()):
        self.peaks = frozenset(peaks)
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.maxima: dict[str, float] = {}
        self.steps = 0
        self.start = time.time()

    def add(self, logs: dict[str, float], repeats: int = 1) -> None:
        """Add one phase call's logs; a phase that runs ``repeats`` times per step counts as one."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v / repeats
            if k.rpartition("/")[2] in self.peaks:
                self.maxima[k] = max(self.maxima.get(k, v), v)

    def end_step(self) -> None:
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation) out of the speed."""
        self.start += seconds

    def flush(self, batch_size: int) -> dict[str, float]:
        """The window's averages, the maxima of ``peaks`` and ``img_per_s``; starts a new window."""
        elapsed = max(time.time() - self.start, 1e-9)
        logs = {k: v / self.steps for k, v in self.sums.items()}
        logs.update({f"{k}_max": v for k, v in self.maxima.items()})
        logs["img_per_s"] = self.steps * batch_size / elapsed
        self.reset()
        return logs


def lr_factor(step: int, max_steps: int, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The multiple of the base learning rate for the update at ``step`` (0-based).

    A linear warm-up over the first ``warmup_steps`` updates (update k uses (k + 1) / warmup_steps,
    so the first one is not wasted at lr 0; DMD2's recipe warms up over 500), times the schedule:
    ``constant`` (1) or ``linear`` decay, 1 - step / max_steps (0 at ``max_steps``).
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    decay = max(0.0, 1.0 - step / max_steps) if schedule == "linear" else 1.0
    return warm * decay
