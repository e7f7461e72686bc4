"""Exponential moving average of the student (EDM's half-life in images)."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import Tensor, nn


def ema_beta(nimg: int, batch_size: int, halflife_kimg: float, rampup: float | None) -> float:
    """The decay of one EMA update after ``nimg`` images, ``batch_size`` of them new (Karras et al. 2022,
    App. F.3): ``0.5 ** (batch / halflife)``, the half-life capped at ``rampup * nimg`` when ``rampup`` is set.
    A half-life of 0 gives 0: the average is the newest weights."""
    halflife = halflife_kimg * 1000
    if rampup is not None:
        halflife = min(halflife, nimg * rampup)
    return 0.5 ** (batch_size / max(halflife, 1e-8))


class EMA:
    """Exponential moving average of a network with a half-life in images (Karras et al. 2022, App. F.3).

    ``beta = 0.5 ** (batch / halflife)``; with ``rampup`` the half-life is at most
    ``rampup * images_seen`` so early averages do not drag the untrained start along.

    Build it from the full (gathered) network before it is prepared for distributed training:
    the average is a plain, unsharded copy on every process.
    """

    def __init__(self, module: nn.Module, halflife_kimg: float, rampup: float | None):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.halflife_kimg = halflife_kimg
        self.rampup = rampup

    def beta(self, nimg: int, batch_size: int) -> float:
        """The decay of one update after ``nimg`` images, ``batch_size`` of them new."""
        return ema_beta(nimg, batch_size, self.halflife_kimg, self.rampup)

    @torch.no_grad()
    def update(self, module: nn.Module, nimg: int, batch_size: int) -> None:
        """Move the average towards ``module`` (the unwrapped student, same architecture)."""
        beta = self.beta(nimg, batch_size)
        for p_ema, p in zip(self.module.parameters(), module.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state)
