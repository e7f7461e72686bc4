"""Consistency distillation (Song et al. 2023, Alg. 2), DESIGN.md section 3."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..samplers import karras_sigmas
from ..students import ConsistencyDenoiser, Student
from ..teachers.base import Denoiser
from .base import Batch, Objective, Phase, bcast, mean_chw


@dataclass
class ConsistencyConfig:
    """Hyperparameters of :class:`ConsistencyDistillation` (defaults: CD on CIFAR-10).

    Attributes:
        num_scales: N, the number of Karras noise levels of the discretisation (18 on CIFAR-10).
        sigma_min, sigma_max, rho: the Karras grid (default: the teacher's range clipped to
            EDM's [0.002, 80]); ``sigma_min`` is also where ``f(x, sigma_min) = x`` holds.
        solver: the teacher's ODE step from sigma_{n+1} to sigma_n: ``heun`` or ``euler`` (= DDIM).
        distance: ``l2`` (mean squared error) or ``pseudo_huber`` (sqrt(|a - b|^2 + c^2) - c).
        huber_c: pseudo-Huber c (default 0.00054 sqrt(dim), iCT).
        target_ema: decay mu of the target network (0.95 in CD/LCM; 0 makes it the student itself).
        sample_steps: network evaluations of the multistep sampler the student is exported with.
    """

    num_scales: int = 18
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    solver: Literal["heun", "euler"] = "heun"
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float | None = None
    target_ema: float = 0.95
    sample_steps: int = 1

    def __post_init__(self):
        if self.num_scales < 2:
            raise ValueError(f"objective.num_scales must be >= 2, got {self.num_scales}")
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"objective.target_ema must be in [0, 1), got {self.target_ema}")
        if not 1 <= self.sample_steps <= self.num_scales - 1:
            raise ValueError(f"objective.sample_steps must be in [1, num_scales - 1], got {self.sample_steps}")


def multistep_sigmas(grid: Sequence[float], steps: int) -> list[float]:
    """Noise levels of ``steps``-step consistency sampling: ``steps`` levels of the increasing
    training ``grid`` [N], evenly spaced in index from ``grid[N-1]`` (sigma_max) down, excluding ``grid[0]``."""
    n = len(grid)
    if not 1 <= steps <= n - 1:
        raise ValueError(f"consistency sampling takes 1 to {n - 1} steps on a grid of {n} noise levels, got {steps}")
    idx = torch.linspace(n - 1, 0, steps + 1).round().long()[:-1]
    return [float(grid[i]) for i in idx]


class ConsistencyDistillation(Objective):
    """Student ``f_theta`` (a :class:`ConsistencyDenoiser` copy of the teacher) made self-consistent
    along the teacher's probability-flow ODE. Needs real data (the ODE starts from noised data).

    Networks: ``teacher`` (frozen), ``student`` (trained), ``target`` (EMA of the student, frozen).
    """

    name: ClassVar[str] = "consistency"
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "student": "student", "target": "target"}
    needs_real_data: ClassVar[bool] = True
    uses_init_sigma: ClassVar[bool] = False

    def __init__(self, config: ConsistencyConfig, sigmas: Tensor):
        self.config = config
        #: the discretisation, increasing: sigmas[0] = sigma_min, ..., sigmas[N-1] = sigma_max (float64)
        self.sigmas = sigmas

    @classmethod
    def build(cls, config: ConsistencyConfig, teacher: nn.Module) -> "ConsistencyDistillation":
        lo = config.sigma_min if config.sigma_min is not None else max(0.002, teacher.sigma_min)
        hi = config.sigma_max if config.sigma_max is not None else min(80.0, teacher.sigma_max)
        if not teacher.sigma_min <= lo < hi <= teacher.sigma_max:
            raise ValueError(
                f"objective.sigma_min/sigma_max = {lo:.4g}/{hi:.4g} must satisfy {teacher.sigma_min:.4g} <= sigma_min "
                f"< sigma_max <= {teacher.sigma_max:.4g} (the teacher's range)"
            )
        return cls(config, karras_sigmas(config.num_scales, lo, hi, config.rho).flip(0))

    def make_student(self, teacher: Denoiser, init_sigma: float) -> Student:
        """A multistep student: the consistency function at ``sample_steps`` grid levels from sigma_max."""
        f = ConsistencyDenoiser(copy.deepcopy(teacher).requires_grad_(True), float(self.sigmas[0]))
        return Student(f, multistep_sigmas(self.sigmas.tolist(), self.config.sample_steps), "multistep")

    def student_info(self) -> dict:
        # the whole grid, so that the student can be sampled with any number of steps later
        return {"consistency_grid": self.sigmas.tolist()}

    def make_target(self, student: Student) -> nn.Module:
        return copy.deepcopy(student.denoiser)

    def update_targets(self, nets: Mapping[str, nn.Module]) -> None:
        """theta^- <- mu theta^- + (1 - mu) theta (Song et al. 2023, Alg. 2)."""
        mu = self.config.target_ema
        target, online = nets["target"], nets["student"].denoiser
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), online.parameters()):
                p_t.lerp_(p.detach(), 1 - mu)
            for b_t, b in zip(target.buffers(), online.buffers()):
                b_t.copy_(b)

    def phases(self) -> list[Phase]:
        return [Phase("consistency", "student")]

    def ode_step(self, teacher: nn.Module, x: Tensor, s_from: Tensor, s_to: Tensor, cond: dict) -> Tensor:
        """One teacher probability-flow step in sigma space: dx/dsigma = (x - D(x, sigma)) / sigma."""
        a, b = bcast(s_from, x), bcast(s_to, x)
        d = (x - teacher(x, s_from, **cond)) / a
        x_next = x + (b - a) * d
        if self.config.solver == "euler":
            return x_next
        d2 = (x_next - teacher(x_next, s_to, **cond)) / b  # Heun (EDM Alg. 1); s_to >= sigma_min > 0
        return x + (b - a) * (d + d2) / 2

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample distance ``[B]``: mean squared error or pseudo-Huber on the flattened sample."""
        if self.config.distance == "l2":
            return mean_chw((a - b) ** 2)
        dim = a[0].numel()
        c = self.config.huber_c if self.config.huber_c is not None else 0.00054 * math.sqrt(dim)
        return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """d(f_theta(x_{n+1}, s_{n+1}), f_theta-(x_hat_n, s_n)), n ~ U{0..N-2} (Song et al. 2023, eq. 7)."""
        x0 = batch.real
        sig = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        n = torch.randint(0, len(sig) - 1, (x0.shape[0],), device=x0.device)
        s_hi, s_lo = sig[n + 1], sig[n]
        x_hi = x0 + bcast(s_hi, x0) * torch.randn_like(x0)
        with torch.no_grad():
            x_lo = self.ode_step(nets["teacher"], x_hi, s_hi, s_lo, batch.cond)
            target = nets["target"](x_lo, s_lo, **batch.cond)
        online = nets["student"](x_hi, sigma=s_hi, **batch.cond)
        loss = self.distance(online, target).mean()
        return loss, {"loss": loss.detach()}
