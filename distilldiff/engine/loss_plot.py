"""Training curves: the logged scalars of a run, kept in a :class:`LossHistory` and drawn as one PNG.

:class:`LossHistory` collects the dicts the engine logs (``{phase}/loss``, ``{phase}/grad_norm``,
``{phase}/grad_norm_max``, ``img_per_s``, ``eval/...``, ``samples/...``) as ``{name: [(step, value), ...]}``; it is plain JSON
(:meth:`LossHistory.state_dict`), so it can be saved with a checkpoint and restored on resume.
:func:`write_loss_plot` draws it with matplotlib's Agg canvas (no pyplot, no global state, no
display needed), one panel per group of comparable curves, and writes the PNG atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LossHistory", "group_series", "write_loss_plot"]

#: format version of :meth:`LossHistory.state_dict`
STATE_VERSION = 1


def _to_float(value: Any) -> float:
    """A logged value (float, int, 0-d tensor or numpy scalar) as a Python float."""
    return float(value.item() if hasattr(value, "item") else value)


def _encode(value: float) -> float | str:
    """Strict JSON has no NaN/Infinity: non-finite values are stored as ``"nan"``, ``"inf"``, ``"-inf"``."""
    return value if math.isfinite(value) else str(value)


class LossHistory:
    """Every logged scalar of a run: ``{name: [(step, value), ...]}`` with increasing steps.

    Args:
        series: an initial history (copied), e.g. from :meth:`state_dict`'s ``"series"``.
    """

    def __init__(self, series: Mapping[str, Sequence[tuple[int, float]]] | None = None):
        self.series: dict[str, list[tuple[int, float]]] = {}
        for name, points in (series or {}).items():
            self.series[name] = [(int(s), _to_float(v)) for s, v in points]

    def add(self, step: int, logs: Mapping[str, Any]) -> None:
        """Record the values of ``logs`` (floats, ints or 0-d tensors) at ``step``.

        A step at or before the last recorded step of a name (a resumed run replaying the steps
        after its checkpoint) replaces the points from that step on, so steps stay increasing.
        Non-finite values are kept (and drawn as gaps).
        """
        step = int(step)
        for name, value in logs.items():
            points = self.series.setdefault(name, [])
            while points and points[-1][0] >= step:
                points.pop()
            points.append((step, _to_float(value)))

    def latest(self) -> dict[str, float]:
        """The most recent value of every name (``{}`` before anything was logged)."""
        return {name: points[-1][1] for name, points in self.series.items() if points}

    def last_step(self) -> int | None:
        """The largest step recorded, or None."""
        steps = [points[-1][0] for points in self.series.values() if points]
        return max(steps) if steps else None

    def state_dict(self) -> dict[str, Any]:
        """Strict-JSON state (``json.dumps(..., allow_nan=False)`` works): version and series."""
        return {
            "version": STATE_VERSION,
            "series": {name: [[s, _encode(v)] for s, v in points] for name, points in self.series.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with one from :meth:`state_dict` (e.g. read from a checkpoint)."""
        version = state.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"loss history: unsupported state version {version!r} (expected {STATE_VERSION})")
        self.series = {name: [(int(s), float(v)) for s, v in points] for name, points in state["series"].items()}

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """:func:`write_loss_plot` of this history."""
        return write_loss_plot(self.series, path, title=title)

    def __len__(self) -> int:
        return len(self.series)

    def __repr__(self) -> str:
        return f"LossHistory({len(self.series)} series, last step {self.last_step()})"


def group_series(names: Sequence[str]) -> dict[str, list[str]]:
    """Panel title -> the names drawn in it, in a stable order.

    One panel per training phase for its losses (``{phase}/loss`` and ``{phase}/*loss``, which share
    a scale within a phase but not across phases), one per phase for its other scalars (e.g. SiD's
    ``critic/w``, DMD2's ``critic/disc_accuracy``), all gradient norms together, ``img_per_s``,
    the sample statistics (``samples/*``), one panel per evaluation metric (``eval/*``, each on
    its own scale), and the rest.
    """
    groups: dict[str, list[str]] = {}
    order: list[tuple[int, str]] = []

    def put(key: tuple[int, str], name: str) -> None:
        if key[1] not in groups:
            groups[key[1]] = []
            order.append(key)
        groups[key[1]].append(name)

    for name in sorted(names):
        head, _, tail = name.partition("/")
        if name == "img_per_s":
            put((3, "throughput (images/s)"), name)
        elif tail and head == "eval":
            put((5, f"evaluation: {tail}"), name)
        elif tail and head == "samples":
            put((4, "sample grids"), name)
        elif tail in ("grad_norm", "grad_norm_max"):
            put((2, "gradient norm"), name)
        elif tail and tail.endswith("loss"):
            put((0, f"{head}: loss"), name)
        elif tail:
            put((1, f"{head}: other"), name)
        else:
            put((6, "other"), name)
    return {title: groups[title] for _, title in sorted(order)}


def _draw(ax, title: str, names: list[str], history: Mapping[str, Sequence[tuple[int, float]]]) -> None:
    drawn_positive = True
    spans: list[float] = []
    for name in names:
        points = history[name]
        steps = [int(s) for s, _ in points]
        values = [_to_float(v) for _, v in points]
        finite = [v for v in values if math.isfinite(v)]
        bad = len(values) - len(finite)
        label = name if not bad else f"{name} ({bad} non-finite)"
        ys = [v if math.isfinite(v) else math.nan for v in values]
        marker = "o" if len(points) <= 20 else None
        ax.plot(steps, ys, label=label, linewidth=1.2, marker=marker, markersize=3)
        if finite:
            drawn_positive &= min(finite) > 0
            spans += finite
    if title == "gradient norm" and spans and drawn_positive and max(spans) / min(spans) > 100:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(names) > 1 or names[0].split("/")[-1] not in title:
        ax.legend(fontsize=7, loc="best")


def write_loss_plot(history: Mapping[str, Sequence[tuple[int, float]]] | LossHistory, path: str | Path, title: str | None = None) -> Path:
    """Draw every logged scalar curve (step on x) into the PNG ``path`` and return ``path``.

    Panels are grouped by :func:`group_series`; ``nonfinite_skipped`` is left out while it is 0
    throughout. Non-finite values are drawn as gaps and counted in the legend. The figure is
    drawn on matplotlib's Agg canvas (pyplot is never imported, so no global figure state is
    touched) and written to a temporary sibling that is renamed onto ``path``: a reader never
    sees a half-written file.

    Args:
        history: ``{name: [(step, value), ...]}`` or a :class:`LossHistory`.
        path: the PNG to write; its folder is created.
        title: a title over the whole figure (e.g. the run folder).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = history.series if isinstance(history, LossHistory) else history
    series = {k: v for k, v in series.items() if len(v) and not (k == "nonfinite_skipped" and not any(_to_float(x) for _, x in v))}
    groups = group_series(list(series))
    n = max(1, len(groups))
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.0 * nrows + (0.4 if title else 0.0)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if not groups:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no scalars logged yet", ha="center", va="center")
    for i, (group, names) in enumerate(groups.items()):
        _draw(fig.add_subplot(nrows, ncols, i + 1), group, names, series)
    if title:
        fig.suptitle(title, fontsize=11)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
