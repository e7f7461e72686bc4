"""What the engine trains: the objective, its networks, and how to draw, show and save them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from ..objectives.base import Objective


class SampleFn(Protocol):
    def __call__(self, student: nn.Module, noise: Tensor, cond: dict, generator: torch.Generator | None) -> Tensor:
        """Images ``[B, *sample_shape]`` in [-1, 1] of ``student`` from ``noise`` ``[B, *sample_shape]``;
        ``generator`` (CPU) draws any further noise the sampler needs."""


class Evaluator(Protocol):
    every: int

    def __call__(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """The metrics of ``student`` (see :class:`distilldiff.evaluation.Evaluator`)."""


@dataclass
class TrainTask:
    """Everything the engine needs besides the train settings.

    Attributes:
        objective: the objective (its ``networks`` name the keys of ``networks``).
        networks: every network by name, as built (unprepared, full precision for trained ones);
            frozen ones are moved to the device and never trained.
        sample_shape: ``(C, H, W)`` of one sample.
        cond_fn: ``(n, device) -> cond`` random conditioning for the noise of a phase batch.
        sample_fn: ``(ema_student, noise, cond, generator) -> images in [-1, 1]``, the one sampling
            function of sample grids and evaluations.
        save_fn: ``(ema_student, folder, info)`` writes the student as a loadable folder.
        data_fn: ``(n, device) -> (x [n, C, H, W], cond)`` real data, for objectives that need it.
        grid_cond_fn: ``(n, device) -> cond`` fixed conditioning of the sample grids (default: ``cond_fn``).
        info: written with the student (teacher, objective, ...).
        evaluator: ``(ema_student, device) -> {metric: value}`` run every ``evaluator.every``
            steps and after the last one.
        image_stats: ``images -> {name: value}``, cheap statistics of every sample grid (e.g. the
            share of near-black pixels), logged as ``samples/NAME`` and printed with the grid.
    """

    objective: Objective
    networks: dict[str, nn.Module]
    sample_shape: tuple[int, ...]
    cond_fn: Callable[[int, Any], dict]
    sample_fn: SampleFn
    save_fn: Callable[[nn.Module, Path, dict], None]
    data_fn: Callable[[int, Any], tuple[Tensor, dict]] | None = None
    grid_cond_fn: Callable[[int, Any], dict] | None = None
    info: dict = field(default_factory=dict)
    evaluator: Evaluator | None = None
    image_stats: Callable[[Tensor], dict[str, float]] | None = None
