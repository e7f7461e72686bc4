"""DMD's regression dataset: noise and the teacher's deterministic sample from it.

DMD (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", sec. 3.3)
adds to distribution matching a regression of the one-step generator onto the teacher's
deterministic ODE sample from the same noise, ``||G(z) - y(z)||``, over a fixed set of pairs
``(z, y)`` computed once before training. The pairs tie the student to the teacher's noise-to-image
map at large scale, which keeps modes the mode-seeking reverse KL would drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..samplers import ddim_sample, teacher_grid
from ..teachers.base import Denoiser


@dataclass
class TeacherPairs:
    """``P`` regression pairs, on the device they were made on.

    Attributes:
        noise: ``[P, *sample_shape]`` standard-normal generator inputs.
        cond: the conditioning of each pair, every entry ``[P, ...]`` (e.g. ``class_labels [P]``).
        target: ``[P, *sample_shape]`` the teacher's deterministic sample from ``noise`` with ``cond``.
    """

    noise: Tensor
    cond: dict[str, Tensor]
    target: Tensor

    def __len__(self) -> int:
        return self.noise.shape[0]

    def draw(self, n: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``n`` pairs drawn uniformly with replacement (global RNG): ``(noise, cond, target)``."""
        idx = torch.randint(len(self), (n,), device=self.noise.device)
        return self.noise[idx], {k: v[idx] for k, v in self.cond.items()}, self.target[idx]


@torch.no_grad()
def teacher_pairs(teacher: Denoiser, num: int, steps: int, device: torch.device | str, seed: int = 0,
                  batch_size: int = 250) -> TeacherPairs:
    """``num`` pairs of ``teacher``'s ``steps``-step DDIM on its own grid (:func:`~distilldiff.samplers.teacher_grid`;
    for the DDPM family DDIM's trailing timesteps, for flow teachers their Euler steps), from noise and
    conditioning drawn on the CPU with a generator seeded by ``seed``: the same pairs on every
    process and on every resume. A progress bar shows the ``num * steps`` teacher evaluations."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(num, *teacher.sample_shape, generator=g)
    cond = teacher.conditioning.draw(num, "cpu", generator=g)
    for key, value in cond.items():
        if not (isinstance(value, Tensor) and value.shape[:1] == (num,)):
            raise ValueError(f"regression pairs need per-sample conditioning tensors; '{key}' is {type(value).__name__}")
    sigmas = torch.tensor(teacher_grid(teacher, steps, float(teacher.sigma_min), float(teacher.sigma_max)), dtype=torch.float64)
    noise, cond = noise.to(device), {k: v.to(device) for k, v in cond.items()}
    targets = []
    for i in tqdm(range(0, num, batch_size), desc=f"teacher pairs ({num}, {steps}-step DDIM)", unit="batch"):
        chunk = {k: v[i:i + batch_size] for k, v in cond.items()}
        targets.append(ddim_sample(teacher, noise[i:i + batch_size], sigmas, **chunk).float())
    return TeacherPairs(noise, cond, torch.cat(targets))


def concat_cond(first: dict[str, Tensor], second: dict[str, Tensor]) -> dict[str, Tensor]:
    """Conditioning of two batches stacked along the batch dimension; both must have the same keys."""
    if set(first) != set(second):
        raise ValueError(f"cannot stack conditioning with keys {sorted(first)} and {sorted(second)}")
    return {k: torch.cat([first[k], second[k].to(first[k].device)]) for k in first}
