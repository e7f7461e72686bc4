"""Consistency distillation (Song, Dhariwal, Chen, Sutskever; ICML 2023, Alg. 2); docs/math.md."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from ..config import ConfigError, ObjectiveConfig, StudentConfig
from ..samplers import base_denoiser, karras_sigmas, lcm_grid_timesteps, multistep_sigmas, vp_base
from ..students import ConsistencyDenoiser, LCMConsistencyDenoiser, Student, guidance_conditioned_copy, set_parameterization, student_copy
from ..teachers.base import Denoiser
from ..teachers.guidance import CFGDenoiser
from ..tensors import append_dims, mean_chw
from .base import Batch, Objective, Phase, check_student_keys
from .guidance_weights import check_guidance_teacher, check_w_range, draw_w, resolved_default_w, w_cond


@dataclass
class ConsistencyConfig(ObjectiveConfig):
    """Hyperparameters of :class:`ConsistencyDistillation` (defaults: CD on CIFAR-10).

    Attributes:
        schedule: the discretisation and boundary condition. ``karras`` (Song et al. 2023): N
            Karras noise levels and EDM-style scalings with ``f(x, sigma_min) = x``. ``lcm`` (Luo
            et al. 2023, sec. 4.3): the teacher's own training timesteps ``k - 1, 2k - 1, ..., Nk - 1``
            (skipping step ``k = T // N``) above the boundary ``t = 0``, with LCM's scalings
            (:class:`~distilldiff.students.LCMConsistencyDenoiser`); needs a diffusers (VP)
            teacher; the student samples on the timesteps diffusers' ``LCMScheduler`` chooses, so
            a text-to-image student exports as a stock pipeline with that scheduler. ``flow``
            (flow-matching teachers): the teacher's own N-step sampling grid, from t = 1 (sigma =
            inf), above the boundary t = 0, where the flow parameterisation itself gives
            ``f(x, 0) = x`` (no boundary scalings, as sCM): the student is the network, the
            teacher's ODE step is taken in flow time, and a text-to-image student exports as the
            stock pipeline with stochastic Euler steps (:class:`FlowConsistencyDistillation`).
        num_scales: N, the number of noise levels of the discretisation (18 on CIFAR-10; LCM: 50).
        sigma_min, sigma_max, rho: the Karras grid (default: the teacher's range clipped to
            EDM's [0.002, 80]); ``sigma_min`` is also where ``f(x, sigma_min) = x`` holds.
            ``karras`` only.
        timestep_scaling: ``s`` of LCM's boundary scalings (10, as diffusers' LCMScheduler); ``lcm`` only.
        solver: the teacher's ODE step from sigma_{n+1} to sigma_n: ``heun`` or ``euler`` (= DDIM).
        distance: ``l2`` (mean squared error) or ``pseudo_huber`` (sqrt(|a - b|^2 + c^2) - c).
        huber_c: pseudo-Huber c (default 0.00054 sqrt(dim), iCT).
        target_ema: decay mu of the target network (0.95 in CD/LCM; 0 makes it the student itself).
        sample_steps: network evaluations of the multistep sampler the student is exported with.
        sample_sigmas: the multistep sampler's noise levels themselves, decreasing, inside the grid's
            range (``karras`` only; unset: ``sample_steps`` levels of the grid, evenly spaced in index
            from sigma_max, :func:`~distilldiff.samplers.multistep_sigmas`). Their count is the number
            of steps. A lower last level than the grid's leaves less faint background (BENCHMARKS.md 6.3.5).
        multistep: how a student of more than one step is trained and sampled (``karras`` only).
            ``renoise`` (Song et al. 2023, Alg. 1): every level maps to the ODE's end at sigma_min,
            and the sampler re-noises between evaluations. ``segments`` (multistep consistency models,
            Heek, Hoogeboom, Salimans 2024): the sample levels cut the ODE into ``sample_steps``
            segments; a level maps to the lower end of its own segment (0 for the last) through a DDIM
            step with the student's denoised estimate, ``f(x, s) = D(x, s) + (b / s) (x - D(x, s))``, so
            ``f(x, b) = x`` holds by construction and the student samples with deterministic DDIM at
            the sample levels (exported as a stock DDIM pipeline). The sample levels join the grid, and
            the grid gains the level 0 (the teacher's step from sigma_min to 0 is Euler).
        w_min, w_max: guidance-scale conditioning as in LCM (Luo et al. 2023): per sample
            w ~ U[w_min, w_max], the teacher's ODE step uses the guided teacher
            ``D_c + w (D_c - D_u)`` and the student (and target) take w as an input; unset: off.
            Needs an unguided class-conditional teacher with a null class.
        default_w: the w of the sample grids and the exported pipeline (default: the midpoint).
        guidance_embed_scale: w is multiplied by this before its sinusoidal embedding (pixel VP
            students; unset: 100).
        guidance_embed_gain: the w embedding's output gain (pixel VP students; unset: 1); for
            text-to-image students the learning-rate multiplier of their zero-started w input
            (:meth:`~distilldiff.teachers.LatentDenoiser.add_guidance_input`).
    """

    name: ClassVar[str] = "consistency"

    schedule: Literal["karras", "lcm", "flow"] = "karras"
    num_scales: int = 18
    timestep_scaling: float = 10.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = 7.0
    solver: Literal["heun", "euler"] = "heun"
    distance: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: float | None = None
    target_ema: float = 0.95
    sample_steps: int = 1
    sample_sigmas: list[float] | None = None
    multistep: Literal["renoise", "segments"] = "renoise"
    w_min: float | None = None
    w_max: float | None = None
    default_w: float | None = None
    guidance_embed_scale: float | None = None
    guidance_embed_gain: float | None = None

    @property
    def guided(self) -> bool:
        return self.w_min is not None

    def __post_init__(self):
        check_w_range(self.w_min, self.w_max)
        if self.default_w is not None and not (self.guided and self.w_min <= self.default_w <= self.w_max):
            raise ValueError(f"objective.default_w={self.default_w} needs w_min/w_max and must lie in [w_min, w_max]")
        for key in ("guidance_embed_scale", "guidance_embed_gain"):
            if not self.guided and getattr(self, key) is not None:
                raise ValueError(f"objective.{key} applies with w_min/w_max only")
        if self.num_scales < 2:
            raise ValueError(f"objective.num_scales must be >= 2, got {self.num_scales}")
        if not 0 <= self.target_ema < 1:
            raise ValueError(f"objective.target_ema must be in [0, 1), got {self.target_ema}")
        if self.sample_sigmas is not None:
            levels = [float(v) for v in self.sample_sigmas]
            if self.schedule != "karras":
                raise ValueError(f"objective.sample_sigmas applies with schedule: karras only (schedule '{self.schedule}' samples on the teacher's own grid)")
            if not levels or any(v <= 0 for v in levels) or any(b >= a for a, b in zip(levels, levels[1:])):
                raise ValueError(f"objective.sample_sigmas must be positive and decrease strictly, got {self.sample_sigmas}")
            if self.sample_steps not in (1, len(levels)):
                raise ValueError(f"objective.sample_sigmas gives the number of steps itself ({len(levels)}); "
                                 f"remove objective.sample_steps ({self.sample_steps}) or set it to {len(levels)}")
            self.sample_steps = len(levels)
        if self.multistep == "segments" and self.schedule != "karras":
            raise ValueError(f"objective.multistep: segments applies with schedule: karras only (schedule '{self.schedule}' "
                             "re-noises between steps)")
        if self.schedule in ("lcm", "flow"):
            for key in ("sigma_min", "sigma_max"):
                if getattr(self, key) is not None:
                    own = "timesteps" if self.schedule == "lcm" else "sampling grid"
                    raise ValueError(f"objective.{key}: schedule '{self.schedule}' runs on the teacher's own {own}; remove the key")
            if not 1 <= self.sample_steps <= self.num_scales:
                raise ValueError(f"objective.sample_steps must be in [1, num_scales] with schedule '{self.schedule}', "
                                 f"got {self.sample_steps}")
            if self.schedule == "flow" and self.timestep_scaling != 10.0:
                raise ValueError("objective.timestep_scaling applies with schedule: lcm only")
            if self.schedule == "flow" and self.guided:
                raise ValueError("objective.w_min/w_max: a guidance-weight input is not supported with schedule: flow "
                                 "(distil the guided teacher: teacher.guidance_scale)")
        else:
            if self.timestep_scaling != 10.0:
                raise ValueError("objective.timestep_scaling applies with schedule: lcm only")
            if self.sample_sigmas is None and not 1 <= self.sample_steps <= self.num_scales - 1:  # levels picked from the grid
                raise ValueError(f"objective.sample_steps must be in [1, num_scales - 1], got {self.sample_steps}")


def levels_in_grid(levels: list[float], grid: Tensor) -> list[float]:
    """``objective.sample_sigmas`` checked against the increasing ``grid``'s range (one-line error outside it),
    as floats, the top one capped at the grid's top (rounding)."""
    lo, hi = float(grid[0]), float(grid[-1])
    outside = [v for v in levels if not lo <= v <= hi * (1 + 1e-9)]
    if outside:
        raise ConfigError(f"objective.sample_sigmas: {outside} outside the consistency grid's range [{lo:.4g}, {hi:.4g}]")
    return [min(float(v), hi) for v in levels]


class ConsistencyDistillation(Objective):
    """Student ``f_theta`` (a :class:`ConsistencyDenoiser` copy of the teacher) made self-consistent
    along the teacher's probability-flow ODE. Needs real data (the ODE starts from noised data).

    Networks: ``teacher`` (frozen), ``student`` (trained), ``target`` (EMA of the student, frozen).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ConsistencyConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "student": "student", "target": "target"}
    needs_real_data: ClassVar[bool] = True

    def __init__(self, config: ConsistencyConfig, sigmas: Tensor):
        self.config = config
        #: the discretisation, increasing: sigmas[0] = sigma_min (the boundary), ..., sigmas[-1] = sigma_max (float64)
        self.sigmas = sigmas

    @classmethod
    def build(cls, config: ConsistencyConfig, teacher: nn.Module) -> "ConsistencyDistillation":
        if config.guided:
            check_guidance_teacher(teacher, "consistency distillation with w_min/w_max")
        if config.schedule == "flow":
            from ..teachers.flow import FlowDenoiser

            base = base_denoiser(teacher)
            if not isinstance(base, FlowDenoiser):
                raise ConfigError(f"objective.schedule: flow needs a flow-matching teacher; {type(base).__name__} is not one "
                                 "(use schedule: karras)")
            grid = base.sampling_sigmas(config.num_scales).flip(0)  # increasing, ending at inf (t = 1)
            return FlowConsistencyDistillation(config, torch.cat([torch.zeros(1, dtype=grid.dtype), grid]))
        if config.schedule == "lcm":
            base = vp_base(teacher)
            if base is None:
                raise ValueError(f"objective.schedule: lcm needs a teacher with discrete training timesteps (a diffusers "
                                 f"scheduler); {type(teacher).__name__} has none: use schedule: karras")
            timesteps = lcm_grid_timesteps(base.num_train_timesteps, config.num_scales)
            return cls(config, base.schedule.sigmas[torch.tensor(timesteps)])
        lo = config.sigma_min if config.sigma_min is not None else max(0.002, teacher.sigma_min)
        hi = config.sigma_max if config.sigma_max is not None else min(80.0, teacher.sigma_max)
        if not teacher.sigma_min <= lo < hi <= teacher.sigma_max:
            raise ValueError(
                f"objective.sigma_min/sigma_max = {lo:.4g}/{hi:.4g} must satisfy {teacher.sigma_min:.4g} <= sigma_min "
                f"< sigma_max <= {teacher.sigma_max:.4g} (the teacher's range)"
            )
        grid = karras_sigmas(config.num_scales, lo, hi, config.rho).flip(0)
        if config.multistep == "segments":
            return SegmentConsistencyDistillation(config, grid)
        return cls(config, grid)

    @property
    def default_w(self) -> float | None:
        return resolved_default_w(self.config.w_min, self.config.w_max, self.config.default_w)

    def student_network(self, teacher: Denoiser, student: StudentConfig) -> Denoiser:
        """The trained copy of the teacher, its output read as ``student.parameterization``: with a w range, a
        guidance-conditioned copy (whole network, a new w input); else :func:`student_copy` (LoRA allowed)."""
        check_student_keys(student, self.name, uses=("parameterization", "lora_rank", "lora_alpha"))
        c = self.config
        if not c.guided:
            return student_copy(teacher, student)
        if student.lora_rank is not None:
            raise ConfigError("student.lora_rank: a guidance-conditioned consistency student (w_min/w_max) trains its whole "
                              "network (a new w embedding); remove the LoRA keys")
        return set_parameterization(guidance_conditioned_copy(teacher, c.guidance_embed_scale, c.guidance_embed_gain), student.parameterization)

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """A multistep student: the consistency function at ``sample_steps`` grid levels from sigma_max,
        around a copy of the teacher whose output means ``student.parameterization``."""
        c = self.config
        inner = self.student_network(teacher, student)
        if c.schedule == "lcm":  # the timesteps LCMScheduler picks (Luo et al. 2023)
            f = LCMConsistencyDenoiser(inner, c.num_scales, c.timestep_scaling)
            return Student(f, f.sample_sigmas(c.sample_steps), "multistep")
        f = ConsistencyDenoiser(inner, float(self.sigmas[0]))
        if c.sample_sigmas is None:
            return Student(f, multistep_sigmas(self.sigmas.tolist(), c.sample_steps), "multistep")
        return Student(f, levels_in_grid(c.sample_sigmas, self.sigmas), "multistep")

    def student_info(self) -> dict:
        # the whole grid, so that the student can be sampled with any number of steps later
        info = {"consistency_grid": self.sigmas.tolist()}
        if self.config.schedule == "lcm":
            info["lcm"] = {"num_scales": self.config.num_scales, "timestep_scaling": self.config.timestep_scaling}
        return info if self.default_w is None else {**info, "default_guidance_scale": self.default_w}

    def sample_cond(self, n: int, device) -> dict[str, Tensor]:
        return w_cond(self.default_w, n, device)

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
        """One teacher probability-flow step in sigma space: dx/dsigma = (x - D(x, sigma)) / sigma.

        Heun (EDM Alg. 1) where ``s_to > 0``; a step to ``s_to = 0`` is Euler, ``D(x, s_from)`` itself."""
        a, b = append_dims(s_from, x.ndim), append_dims(s_to, x.ndim)
        d = (x - teacher(x, s_from, **cond)) / a
        x_next = x + (b - a) * d
        if self.config.solver == "euler":
            return x_next
        above = s_to > 0  # a step to 0 stays Euler; elsewhere the second evaluation is at s_to itself
        s2 = torch.where(above, s_to, s_from)
        d2 = (x_next - teacher(x_next, s2, **cond)) / append_dims(s2, x.ndim)
        return torch.where(append_dims(above, x.ndim), x + (b - a) * (d + d2) / 2, x_next)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample distance ``[B]``: mean squared error or pseudo-Huber on the flattened sample."""
        if self.config.distance == "l2":
            return mean_chw((a - b) ** 2)
        dim = a[0].numel()
        c = self.config.huber_c if self.config.huber_c is not None else 0.00054 * math.sqrt(dim)
        return ((a - b).flatten(1).pow(2).sum(1) + c**2).sqrt() - c

    def teacher_pair(self, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        """``(x_{n+1}, s_{n+1}, x_hat_n, s_n, cond_f)``: neighbouring levels ``n ~ U{0..N-2}`` of the grid, the real
        batch noised to ``s_{n+1}``, the teacher's ODE step from it to ``s_n`` (with w: on the guided teacher), and
        the student's conditioning (with w: ``guidance_scale``)."""
        x0, c = batch.real, self.config
        sig = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        n = torch.randint(0, len(sig) - 1, (x0.shape[0],), device=x0.device)
        s_hi, s_lo = sig[n + 1], sig[n]
        x_hi = x0 + append_dims(s_hi, x0.ndim) * torch.randn_like(x0)
        teacher, cond = nets["teacher"], dict(batch.cond)
        cond_f = cond
        if c.guided:
            w = draw_w(x0.shape[0], c.w_min, c.w_max, x0)
            teacher, cond_f = CFGDenoiser(teacher, w), {**cond, "guidance_scale": w}
        with torch.no_grad():
            x_lo = self.ode_step(teacher, x_hi, s_hi, s_lo, cond)
        return x_hi, s_hi, x_lo, s_lo, cond_f

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """d(f_theta(x_{n+1}, s_{n+1}), f_theta-(x_hat_n, s_n)), n ~ U{0..N-2} (Song et al. 2023, eq. 7).

        With w (LCM, Luo et al. 2023, eq. 9): f takes w, and x_hat_n is the solver step on the
        guided teacher D_w = D_c + w (D_c - D_u). For the Euler solver this equals eq. 9's
        (1 + w) Phi(c) - w Phi(null); Heun here re-evaluates D_w at the Euler point."""
        x_hi, s_hi, x_lo, s_lo, cond_f = self.teacher_pair(nets, batch)
        with torch.no_grad():
            target = nets["target"](x_lo, s_lo, **cond_f)
        online = nets["student"](x_hi, sigma=s_hi, **cond_f)
        loss = self.distance(online, target).mean()
        return loss, {"loss": loss.detach()}


class FlowConsistencyDistillation(ConsistencyDistillation):
    """Consistency distillation on a flow-matching teacher's own grid (``schedule: flow``).

    The levels are the teacher's ``N``-step sampling grid, from ``t = 1`` (pure noise, ``sigma =
    inf``) down, and the boundary ``t = 0``. Samples are handled in the network's own input
    ``x_t = (1 - t) x0 + t n`` (finite at ``t = 1``); the teacher's probability-flow step is Euler
    (or Heun, where the next level is above 0) on its velocity ``v = (x_t - D) / t`` in flow time.
    The consistency function is the student's own denoiser ``D(x_t, t) = x_t - t v``, which is
    ``x_t`` at ``t = 0``: the boundary condition holds by construction, as in sCM.
    """

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """The network itself at ``sample_steps`` grid levels from ``t = 1``, re-noised between them."""
        check_student_keys(student, self.name, uses=("lora_rank", "lora_alpha"))
        return Student(student_copy(teacher, student), multistep_sigmas(self.sigmas.tolist(), self.config.sample_steps), "multistep")

    def flow_step(self, teacher: nn.Module, x_t: Tensor, s_from: Tensor, s_to: Tensor, cond: dict) -> Tensor:
        """One step of the teacher's flow ODE ``dx_t/dt = v`` from level ``s_from`` to ``s_to`` ``[B]``
        (sigma space; ``inf`` is t = 1), on inputs ``x_t`` ``[B, ...]`` (the network's own scale)."""
        from ..teachers.flow import flow_t_of_sigma

        t_from, t_to = flow_t_of_sigma(s_from), flow_t_of_sigma(s_to)
        a, b = append_dims(t_from, x_t.ndim), append_dims(t_to, x_t.ndim)
        v = (x_t - teacher.forward_scaled(x_t, s_from, **cond)) / a
        x_next = x_t + (b - a) * v
        if self.config.solver == "euler":
            return x_next
        v2 = (x_next - teacher.forward_scaled(x_next, s_to, **cond)) / b.clamp_min(1e-12)
        return torch.where(b > 0, x_t + (b - a) * (v + v2) / 2, x_next)  # Heun above t = 0 (EDM Alg. 1)

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """d(f_theta(x_{t_{n+1}}, t_{n+1}), f_theta-(x_hat_{t_n}, t_n)) (Song et al. 2023, eq. 7) in flow time."""
        from ..teachers.flow import flow_t_of_sigma

        x0 = batch.real
        sig = self.sigmas.to(device=x0.device, dtype=x0.dtype)
        n = torch.randint(0, len(sig) - 1, (x0.shape[0],), device=x0.device)
        s_hi, s_lo = sig[n + 1], sig[n]
        t_hi = append_dims(flow_t_of_sigma(s_hi), x0.ndim)
        x_hi = (1 - t_hi) * x0 + t_hi * torch.randn_like(x0)
        cond = dict(batch.cond)
        with torch.no_grad():
            x_lo = self.flow_step(nets["teacher"], x_hi, s_hi, s_lo, cond)
            target = nets["target"].forward_scaled(x_lo, s_lo, **cond)
        online = nets["student"](x_hi, sigma=s_hi, scaled=True, **cond)
        loss = self.distance(online, target).mean()
        return loss, {"loss": loss.detach()}


class SegmentConsistencyDistillation(ConsistencyDistillation):
    """Multistep consistency distillation (Heek, Hoogeboom, Salimans 2024, "Multistep Consistency Models").

    The student's ``K = sample_steps`` sample levels ``s_K > ... > s_1`` and 0 cut the teacher's ODE into
    ``K`` segments. On segment ``(b, s]`` the consistency function maps a point of the ODE to the ODE's
    value at the segment's lower end ``b`` by one DDIM step with the student's denoised estimate,
    ``f(x, sigma) = D(x, sigma) + (b / sigma) (x - D(x, sigma))``, so ``f(x, b) = x`` holds by
    construction and ``K`` deterministic DDIM steps at the sample levels follow the ODE to 0. The
    training grid is the Karras grid with the sample levels and 0 added; the loss compares the
    student's ``D`` with the denoised estimate that would make its step land on the target
    (``objective.multistep: segments``; docs/math.md section 3.5).

    Networks: as :class:`ConsistencyDistillation`. ``sigmas`` holds 0 first.
    """

    def __init__(self, config: ConsistencyConfig, karras_grid: Tensor):
        tops = (config.sample_sigmas if config.sample_sigmas is not None
                else multistep_sigmas(karras_grid.tolist(), config.sample_steps))
        tops = levels_in_grid(tops, karras_grid)
        levels = sorted(set(karras_grid.tolist()) | set(tops))
        super().__init__(config, torch.tensor([0.0, *levels], dtype=torch.float64))
        #: the sampler's levels, decreasing (one network evaluation each)
        self.tops = tops
        #: the segments' lower ends, increasing: 0, s_1, ..., s_{K-1}
        self.boundaries = torch.tensor([0.0, *sorted(tops)[:-1]], dtype=torch.float64)

    def make_student(self, teacher: Denoiser, student: StudentConfig) -> Student:
        """The copy of the teacher (output as ``student.parameterization``) sampled by DDIM at the sample levels."""
        return Student(self.student_network(teacher, student), self.tops, "ddim")

    def student_info(self) -> dict:
        # no consistency_grid: the student samples at its own levels only (the segments are trained for them)
        info = {"consistency_segments": self.tops}
        return info if self.default_w is None else {**info, "default_guidance_scale": self.default_w}

    def segment_end(self, sigma: Tensor) -> Tensor:
        """The lower end ``b`` of the segment ``(b, s]`` holding each ``sigma > 0`` ``[B]``."""
        ends = self.boundaries.to(device=sigma.device, dtype=sigma.dtype)
        return ends[torch.searchsorted(ends, sigma, right=False) - 1]

    def loss(self, phase: Phase, nets: Mapping[str, nn.Module], batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        """d(D_theta(x_{n+1}, s_{n+1}), x0_target), with x0_target the denoised estimate whose DDIM step from
        (x_{n+1}, s_{n+1}) lands on f_theta-(x_hat_n, s_n) at the segment's end b (Heek et al. 2024)."""
        x_hi, s_hi, x_lo, s_lo, cond_f = self.teacher_pair(nets, batch)
        b = self.segment_end(s_hi)
        bb, hi = append_dims(b, x_hi.ndim), append_dims(s_hi, x_hi.ndim)
        with torch.no_grad():
            at_end = append_dims(s_lo <= b, x_hi.ndim)  # the target is the ODE point itself: f(x, b) = x
            s_eval = torch.where(s_lo > b, s_lo, s_hi)  # the target network is not evaluated at 0 (nor used there)
            d_lo = nets["target"](x_lo, s_eval, **cond_f)
            lo = append_dims(s_eval, x_hi.ndim)
            f_lo = torch.where(at_end, x_lo, d_lo + (bb / lo) * (x_lo - d_lo))
            target = (f_lo - (bb / hi) * x_hi) / (1 - bb / hi)
        online = nets["student"](x_hi, sigma=s_hi, **cond_f)
        loss = self.distance(online, target).mean()
        return loss, {"loss": loss.detach()}
