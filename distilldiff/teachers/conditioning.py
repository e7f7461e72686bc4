"""What a denoiser is conditioned on: drawn for training, fixed for grids, and its unconditional input.

Conditioning travels as keyword arguments of ``D(x, sigma, **cond)``. A denoiser declares its
:class:`Conditioning` (:attr:`distilldiff.teachers.Denoiser.conditioning`); everything that needs
conditioning for a batch (the training engine, sample grids, evaluation, classifier-free
guidance, label dropout when training a teacher) asks that object instead of assuming class
labels, so that text embeddings, pooled embeddings and added conditions fit in the same place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class Conditioning:
    """Unconditional models: no keyword arguments (the base of every conditioning).

    Attributes:
        keys: the keyword arguments this conditioning consists of.
    """

    keys: tuple[str, ...] = ()

    @property
    def has_null(self) -> bool:
        """Whether the model has an unconditional input (needed by classifier-free guidance)."""
        return False

    def draw(self, n: int, device: torch.device | str, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Random conditioning for ``n`` training samples (drawn on the CPU with ``generator``)."""
        return {}

    def grid(self, n: int, device: torch.device | str, start: int = 0) -> dict[str, Any]:
        """Fixed conditioning of samples ``start .. start + n - 1`` of a grid or an evaluation set
        (the same at every call, spread over the conditioning's range)."""
        return {}

    def null(self, n: int, device: torch.device | str) -> dict[str, Any]:
        """The unconditional input for ``n`` samples."""
        raise ValueError("this model has no unconditional input (classifier-free guidance needs one, e.g. a null class label)")

    def null_where(self, cond: dict[str, Any], mask: Tensor) -> dict[str, Any]:
        """``cond`` with the samples where ``mask`` ``[B]`` is true replaced by the unconditional input."""
        raise ValueError("this model has no unconditional input")

    def split(self, cond: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(this conditioning's keys, every other keyword argument)`` of ``cond``."""
        own = {k: v for k, v in cond.items() if k in self.keys}
        return own, {k: v for k, v in cond.items() if k not in self.keys}

    def expand(self, cond: dict[str, Any], n: int, device: torch.device | str) -> dict[str, Any]:
        """``cond`` on ``device`` with every entry given for one sample (or as a scalar) repeated to ``n`` rows."""
        return dict(cond)


class ClassLabels(Conditioning):
    """Class labels ``class_labels`` ``[B]`` in ``0 .. num_classes - 1``, optionally with a null label.

    Args:
        num_classes: number of classes.
        null_class: the label meaning "no class" (classifier-free guidance), or ``None``.
    """

    keys = ("class_labels",)

    def __init__(self, num_classes: int, null_class: int | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.null_class = None if null_class is None else int(null_class)

    def __repr__(self) -> str:
        return f"ClassLabels(num_classes={self.num_classes}, null_class={self.null_class})"

    @property
    def has_null(self) -> bool:
        return self.null_class is not None

    def draw(self, n, device, generator=None):
        """Uniform labels."""
        labels = torch.randint(0, self.num_classes, (n,), device="cpu", generator=generator)
        return {"class_labels": labels.to(device)}

    def grid(self, n, device, start=0):
        """Labels cycling ``0, 1, ..., num_classes - 1``."""
        return {"class_labels": torch.arange(start, start + n, device=device) % self.num_classes}

    def of(self, label: int, n: int, device) -> dict[str, Tensor]:
        """``n`` samples of class ``label``."""
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class label {label} is outside 0..{self.num_classes - 1}")
        return {"class_labels": torch.full((n,), label, device=device)}

    def null(self, n, device):
        if self.null_class is None:
            return super().null(n, device)
        return {"class_labels": torch.full((n,), self.null_class, device=device)}

    def null_where(self, cond, mask):
        if self.null_class is None:
            return super().null_where(cond, mask)
        return {**cond, "class_labels": torch.where(mask, self.null_class, cond["class_labels"])}

    def expand(self, cond, n, device):
        labels = cond.get("class_labels")
        if labels is None:
            return dict(cond)
        return {**cond, "class_labels": torch.as_tensor(labels, device=device).reshape(-1).expand(n)}


def class_conditioning(num_classes: int | None, null_class: int | None) -> Conditioning:
    """:class:`ClassLabels` for a class-conditional model, else the unconditional :class:`Conditioning`."""
    return Conditioning() if num_classes is None else ClassLabels(num_classes, null_class)
