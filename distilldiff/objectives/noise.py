"""Noise-level distributions of the score-distillation objectives (SiD, f-distill/DMD/DMD2), and noisy
inputs at those levels that stay finite at ``sigma = inf`` (:func:`scaled_input`).

Every distribution here draws inside the teacher's trained range ``[sigma_lo, sigma_hi]``: a
teacher evaluated outside it is evaluated at a noise level it never saw (a VP teacher below its
smallest discrete sigma runs at timestep 0 with the wrong noise level). :func:`noise_range`
resolves a config's ``sigma_min``/``sigma_max`` against the teacher and refuses values outside.
docs/math.md lists the distributions and which objective uses which by default.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from ..config import ConfigError
from ..tensors import append_dims

#: the noise distributions an objective config can name (``noise``, ``fake_score_noise``)
NoiseKind = Literal["karras", "lognormal", "timesteps"]

#: EDM's noise range (Karras et al. 2022, sec. 5), the default where the teacher allows it
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


def noise_range(teacher, sigma_min: float | None, sigma_max: float | None) -> tuple[float, float]:
    """``(lo, hi)``: the configured range, by default EDM's [0.002, 80] clipped to the teacher's
    ``[teacher.sigma_min, teacher.sigma_max]``; a configured bound outside the teacher's range is an error."""
    t_lo, t_hi = float(teacher.sigma_min), float(teacher.sigma_max)
    lo = max(EDM_SIGMA_MIN, t_lo) if sigma_min is None else float(sigma_min)
    hi = min(EDM_SIGMA_MAX, t_hi) if sigma_max is None else float(sigma_max)
    tol = 1e-6 * t_hi
    if lo < t_lo * (1 - 1e-6) or hi > t_hi + tol or not lo < hi:
        raise ConfigError(
            f"objective.sigma_min/sigma_max = {lo:.4g}/{hi:.4g} must satisfy {t_lo:.4g} <= sigma_min < sigma_max "
            f"<= {t_hi:.4g} (the teacher's trained range); unset, they default to EDM's [0.002, 80] within it"
        )
    return max(lo, t_lo), min(hi, t_hi)


def check_time_range(tmin: int, tmax: int) -> None:
    """One-line error unless ``0 <= tmin < tmax <= 1000`` (thousandths of time or of the timesteps)."""
    if not 0 < tmax <= 1000:
        raise ValueError(f"objective.tmax must be in (0, 1000], got {tmax}")
    if not 0 <= tmin < tmax:
        raise ValueError(f"objective.tmin must be in [0, tmax), got {tmin} (tmax {tmax})")


class NoiseLevels(abc.ABC):
    """A distribution of noise levels ``sigma`` within ``[lo, hi]``."""

    lo: float
    hi: float

    @abc.abstractmethod
    def draw(self, n: int, like: Tensor) -> Tensor:
        """``[n]`` noise levels on ``like``'s device and dtype, all within ``[lo, hi]``."""


@dataclass(frozen=True)
class KarrasTime(NoiseLevels):
    """``sigma = (hi^(1/rho) + (1 - t)(lo^(1/rho) - hi^(1/rho)))^rho``, ``t ~ U(t_min, t_max)``
    (SiD's generator phase, Zhou et al. 2024, sec. 4; t = 0 is ``lo``, t = 1 is ``hi``; t_max = 0.8
    with EDM's range gives sigma in [0.002, 24.4])."""

    lo: float
    hi: float
    rho: float = 7.0
    t_min: float = 0.0
    t_max: float = 0.8

    def draw(self, n: int, like: Tensor) -> Tensor:
        t = self.t_min + torch.rand(n, device=like.device, dtype=like.dtype) * (self.t_max - self.t_min)
        a, b = self.lo ** (1 / self.rho), self.hi ** (1 / self.rho)
        return ((b + (1 - t) * (a - b)) ** self.rho).clamp(self.lo, self.hi)


@dataclass(frozen=True)
class LogNormal(NoiseLevels):
    """``sigma = exp(N(p_mean, p_std^2))`` (EDM's training distribution, Karras et al. 2022, sec. 5),
    clamped to ``[lo, hi]`` (with EDM's defaults and range, 0.2% of the draws are clamped)."""

    lo: float
    hi: float
    p_mean: float = -1.2
    p_std: float = 1.2

    def draw(self, n: int, like: Tensor) -> Tensor:
        z = torch.randn(n, device=like.device, dtype=like.dtype)
        return (z * self.p_std + self.p_mean).exp().clamp(self.lo, self.hi)


@dataclass(frozen=True, eq=False)
class Timesteps(NoiseLevels):
    """Uniform over the teacher's discrete training noise levels ``sigmas[i]``, ``i`` in
    ``[round(t_min T), round(t_max T))`` (DMD2's generator and fake-score distribution, 2%..98%
    of T = 1000 steps; Yin et al. 2024, sec. 4)."""

    sigmas: Tensor
    t_min: float = 0.02
    t_max: float = 0.98

    @property
    def index_range(self) -> tuple[int, int]:
        T = len(self.sigmas)
        return int(round(self.t_min * T)), max(int(round(self.t_max * T)), int(round(self.t_min * T)) + 1)

    @property
    def lo(self) -> float:  # type: ignore[override]
        return float(self.sigmas[self.index_range[0]])

    @property
    def hi(self) -> float:  # type: ignore[override]
        return float(self.sigmas[self.index_range[1] - 1])

    def draw(self, n: int, like: Tensor) -> Tensor:
        i0, i1 = self.index_range
        idx = torch.randint(i0, i1, (n,), device=like.device)
        return self.sigmas.to(device=like.device, dtype=like.dtype)[idx]


def discrete_sigmas(teacher) -> Tensor | None:
    """The increasing discrete training noise levels of a VP teacher (through guidance wrappers), else ``None``."""
    while teacher is not None:
        sigmas = getattr(getattr(teacher, "schedule", None), "sigmas", None)
        if sigmas is not None:
            return sigmas
        teacher = getattr(teacher, "inner", None)
    return None


def make_noise_levels(kind: str, teacher, *, sigma_min: float | None, sigma_max: float | None, rho: float,
                      tmin: int, tmax: int, p_mean: float, p_std: float) -> NoiseLevels:
    """The ``kind`` (``karras``, ``lognormal`` or ``timesteps``) distribution of an objective's config,
    within the teacher's range. ``tmin``/``tmax`` are in thousandths (of the Karras time for
    ``karras``, of the teacher's training timesteps for ``timesteps``)."""
    if kind == "timesteps":
        sigmas = discrete_sigmas(teacher)
        if sigmas is None:
            raise ConfigError(f"objective noise 'timesteps' needs a teacher with discrete training timesteps; "
                              f"{type(teacher).__name__} has none (use 'karras' or 'lognormal')")
        if sigma_min is not None or sigma_max is not None:
            raise ConfigError("objective.sigma_min/sigma_max do not apply to noise 'timesteps' (set tmin/tmax); remove them")
        return Timesteps(torch.as_tensor(sigmas, dtype=torch.float64), tmin / 1000, tmax / 1000)
    lo, hi = noise_range(teacher, sigma_min, sigma_max)
    if kind == "karras":
        return KarrasTime(lo, hi, rho, tmin / 1000, tmax / 1000)
    if kind == "lognormal":
        return LogNormal(lo, hi, p_mean, p_std)
    raise ConfigError(f"unknown noise distribution {kind!r}; expected 'karras', 'lognormal' or 'timesteps'")


class ScoreNoiseConfig(Protocol):
    """The noise fields shared by the configs of SiD and f-distill (see their docstrings)."""

    noise: NoiseKind
    fake_score_noise: Literal["generator", "lognormal"]
    sigma_min: float | None
    sigma_max: float | None
    rho: float
    tmin: int
    tmax: int
    p_mean: float
    p_std: float


def query_and_fake_noise(config: ScoreNoiseConfig, teacher) -> tuple[NoiseLevels, NoiseLevels]:
    """``(query, fake)``: the levels a score-distillation objective queries the teacher and the fake score at
    (``config.noise``), and those its fake score trains at: the same object for ``fake_score_noise: generator``
    (DMD2's practice), EDM's ``lognormal`` otherwise (SiD's official recipe). Both lie in the teacher's range."""
    c = config
    kw = dict(sigma_min=c.sigma_min, sigma_max=c.sigma_max, rho=c.rho, tmin=c.tmin, tmax=c.tmax, p_mean=c.p_mean, p_std=c.p_std)
    query = make_noise_levels(c.noise, teacher, **kw)
    return query, query if c.fake_score_noise == "generator" else make_noise_levels("lognormal", teacher, **kw)


def scaled_input(den: nn.Module, x0: Tensor, n: Tensor, sigma: Tensor) -> Tensor:
    """``(x0 + sigma n) / prior_scale(sigma)`` of denoiser ``den`` (its ``forward_scaled`` input), written
    ``x0 / p + n / q`` with ``q = p / sigma`` so that it is ``n`` at ``sigma = inf``."""
    return x0 / append_dims(den.prior_scale(sigma), x0.ndim) + n / append_dims(prior_ratio(den, sigma), x0.ndim)  # x0 / inf = 0


def prior_ratio(den: nn.Module, sigma: Tensor) -> Tensor:
    """``prior_scale(sigma) / sigma``, 1 at ``sigma = inf`` (its limit for every denoiser here)."""
    ratio = den.prior_scale(sigma) / sigma
    return torch.where(torch.isinf(sigma), torch.ones_like(ratio), ratio)


__all__ = ["NoiseKind", "check_time_range", "EDM_SIGMA_MIN", "EDM_SIGMA_MAX", "NoiseLevels", "KarrasTime", "LogNormal", "Timesteps", "make_noise_levels", "noise_range", "query_and_fake_noise", "ScoreNoiseConfig", "prior_ratio", "scaled_input"]
