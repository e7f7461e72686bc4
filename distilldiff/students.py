"""Students: one-step generators built from a copy of the teacher (DESIGN.md section 2)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .teachers.base import Denoiser


class OneStepGenerator(nn.Module):
    """``x_g = G(z, c) = D_student(prior_scale(s_init) * z, s_init, c)``, ``z ~ N(0, I)``.

    ``prior_scale`` is ``sigma`` for EDM-style denoisers and ``sqrt(1 + sigma^2)`` for VP ones,
    so a VP student sees unit-variance noise at the timestep of ``init_sigma``, exactly what a
    diffusers scheduler would feed it.

    Args:
        denoiser: the student's denoiser (usually a deep copy of the teacher; trained in place).
        init_sigma: the fixed noise level the generator is evaluated at (SiD: 2.5).
    """

    def __init__(self, denoiser: Denoiser, init_sigma: float):
        super().__init__()
        if not denoiser.sigma_min <= init_sigma <= denoiser.sigma_max:
            raise ValueError(
                f"student.init_sigma={init_sigma} is outside the teacher's noise range "
                f"[{denoiser.sigma_min:.4g}, {denoiser.sigma_max:.4g}]"
            )
        self.denoiser = denoiser
        self.init_sigma = float(init_sigma)

    @classmethod
    def from_teacher(cls, teacher: Denoiser, init_sigma: float) -> "OneStepGenerator":
        """A generator whose denoiser is a trainable deep copy of ``teacher``."""
        student = copy.deepcopy(teacher).requires_grad_(True)
        return cls(student, init_sigma)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape

    def forward(self, z: Tensor, **cond: Any) -> Tensor:
        """Map noise ``z`` ``[B, *sample_shape]`` to samples of the same shape."""
        sigma = torch.full((z.shape[0],), self.init_sigma, device=z.device, dtype=z.dtype)
        return self.denoiser(z * self.denoiser.prior_scale(sigma[0]), sigma, **cond)
