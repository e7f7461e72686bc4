"""Small tensor helpers shared by teachers, students, samplers and objectives."""

from __future__ import annotations

from torch import Tensor


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """``[B]`` (or a scalar) -> ``[B, 1, ..., 1]`` with ``ndim`` dimensions, to broadcast against a batch of samples."""
    if t.ndim > ndim:
        raise ValueError(f"cannot broadcast a tensor of shape {tuple(t.shape)} to {ndim} dims")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def sum_chw(x: Tensor) -> Tensor:
    """Sum over every non-batch dimension: ``[B, ...] -> [B]``."""
    return x.flatten(1).sum(1)


def mean_chw(x: Tensor) -> Tensor:
    """Mean over every non-batch dimension: ``[B, ...] -> [B]``."""
    return x.flatten(1).mean(1)
