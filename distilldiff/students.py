"""Students: few-step generators built from a copy of the teacher.

A student is a denoiser evaluated at fixed noise levels (:class:`Student`); one-step generators
(SiD, f-distill) are the one-level case (:class:`OneStepGenerator`), consistency students wrap
their denoiser in the consistency parameterisation (:class:`ConsistencyDenoiser`), and students
that take the guidance weight as an input get a copy of the teacher with an extra input
(:func:`guidance_conditioned_copy`), and a copy may re-interpret what its network outputs
(:func:`reparameterized_copy`, measured by :func:`start_gap`). docs/math.md describes each.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .samplers import SAMPLERS, base_denoiser, sample_loop
from .teachers.base import Denoiser
from .teachers.conditioning import Conditioning
from .tensors import append_dims


class Student(nn.Module):
    """A denoiser evaluated at fixed noise levels: ``x = sample_loop(D_student, z, sigmas, sampler)``.

    Every distilled student is one of these: a one-step generator (one sigma), a few-step DDIM
    student (progressive distillation), or a multistep consistency student. The folder format and
    the exported diffusers pipeline (:mod:`distilldiff.export`) are derived from these fields.

    Args:
        denoiser: the student's denoiser (usually a deep copy of the teacher; trained in place).
        sigmas: decreasing noise levels, one per network evaluation.
        sampler: ``"ddim"`` (deterministic) or ``"multistep"`` (re-noise between evaluations).
        clip_sample: clip the x0 of every evaluation to the images' range [-1, 1] (diffusers' ``clip_sample``;
            ``student.clip_sample``).
    """

    def __init__(self, denoiser: Denoiser, sigmas: Sequence[float], sampler: str = "ddim", clip_sample: bool = False):
        super().__init__()
        sigmas = [float(s) for s in sigmas]
        if not sigmas:
            raise ValueError("a student needs at least one noise level")
        if sampler not in SAMPLERS:
            raise ValueError(f"student sampler must be one of {SAMPLERS}, got {sampler!r}")
        if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"student sigmas must decrease strictly, got {sigmas}")
        for s in sigmas:
            if not denoiser.sigma_min <= s <= denoiser.sigma_max:
                raise ValueError(
                    f"student noise level {s} is outside the teacher's noise range "
                    f"[{denoiser.sigma_min:.4g}, {denoiser.sigma_max:.4g}]"
                )
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.sampler = sampler
        self.clip_sample = bool(clip_sample)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.denoiser.sample_shape

    @property
    def num_steps(self) -> int:
        return len(self.sigmas)

    @property
    def conditioning(self) -> Conditioning:
        return self.denoiser.conditioning

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters training updates: the denoiser's own choice (all, or an adapter's)."""
        return self.denoiser.trainable_parameters()

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        """Parameters the denoiser trains at a multiple of the learning rate."""
        return self.denoiser.learning_rate_scales()

    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] of the student's samples (latent students decode with the teacher's VAE)."""
        return self.denoiser.decode(x)

    def forward(self, z: Tensor, generator: torch.Generator | None = None, *, sigma: Tensor | float | None = None,
                scaled: bool = False, **cond: Any) -> Tensor:
        """Map standard-normal ``z`` ``[B, *sample_shape]`` to samples of the same shape.

        With ``sigma`` given, ``z`` is instead a noisy sample at that noise level and the call
        returns the student denoiser's ``D(z, sigma)`` (with ``scaled``, ``z`` is given over
        ``prior_scale(sigma)``: :meth:`~distilldiff.teachers.Denoiser.forward_scaled`, defined at
        ``sigma = inf`` for flow teachers): objectives that train the denoiser directly
        (consistency, progressive) call it this way so that the call goes through the (possibly
        DDP-wrapped) student module.
        """
        if sigma is not None:
            return self.denoiser.forward_scaled(z, sigma, **cond) if scaled else self.denoiser(z, sigma, **cond)
        sigmas = torch.tensor(self.sigmas, dtype=torch.float64)
        return sample_loop(self.denoiser, z, sigmas, self.sampler, generator, clip=self.clip_sample, **cond)


def draw_samples(student: nn.Module, noise: Tensor, cond: dict, generator: torch.Generator | None = None) -> Tensor:
    """Images of ``student`` from ``noise`` ``[B, *sample_shape]`` with conditioning ``cond``;
    ``generator`` (CPU) draws the re-noising of multistep students. The sampling function of
    sample grids and evaluations (:class:`distilldiff.engine.TrainTask`); latent students'
    samples are decoded to pixels."""
    samples = student(noise, generator=generator, **cond)
    decode = getattr(student, "decode", None)
    return decode(samples) if decode is not None else samples


class OneStepGenerator(Student):
    """``x_g = G(z, c) = D_student(prior_scale(s_init) * z, s_init, c)``, ``z ~ N(0, I)``.

    ``prior_scale`` is ``sigma`` for EDM-style denoisers and ``sqrt(1 + sigma^2)`` for VP ones,
    so a VP student sees unit-variance noise at the timestep of ``init_sigma``, exactly what a
    diffusers scheduler would feed it.

    Args:
        denoiser: the student's denoiser (usually a deep copy of the teacher; trained in place).
        init_sigma: the fixed noise level the generator is evaluated at (``student.init_sigma``).
        clip_sample: return ``x_g`` clipped to the images' range [-1, 1] (``student.clip_sample``), the
            samples as they are saved and scored, so that the objective matches those; its gradient is 0
            where the output is outside the range.
    """

    def __init__(self, denoiser: Denoiser, init_sigma: float, clip_sample: bool = False):
        if not denoiser.sigma_min <= init_sigma <= denoiser.sigma_max:
            raise ValueError(
                f"student.init_sigma={init_sigma} is outside the teacher's noise range "
                f"[{denoiser.sigma_min:.4g}, {denoiser.sigma_max:.4g}]"
            )
        super().__init__(denoiser, [init_sigma], "ddim", clip_sample)

    @property
    def init_sigma(self) -> float:
        return self.sigmas[0]

    @classmethod
    def from_teacher(cls, teacher: Denoiser, init_sigma: float, student=None) -> "OneStepGenerator":
        """A generator whose denoiser is the trainable copy of ``teacher`` that the ``student``
        section asks for (:func:`student_copy`; ``None``: a plain copy)."""
        clip = student is not None and student.clip_sample
        if clip:
            _require_pixels(teacher, "student.clip_sample", "the samples of {} are latents, not images in [-1, 1]")
        return cls(student_copy(teacher, student) if student is not None else trainable_copy(teacher), init_sigma, clip)


class FewStepGenerator(Student):
    """A generator of ``K`` evaluations, trained by a generator objective (SiD, f-distill) like a one-step one.

    Its sample is the re-noising sampler's (``"multistep"``, as DMD2's multi-step generator, Yin et al.
    2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): ``x0_k = G(x_k, sigma_k)``,
    ``x_{k+1} = x0_k + sigma_{k+1} n_k`` with fresh ``n_k``, from ``x_0 = prior_scale(sigma_0) z``; the last
    ``x0`` is the sample ``[B, *sample_shape]``. The objective trains the whole chain: its gradient flows
    through all ``K`` evaluations (the student is called like any generator), so distribution matching
    applies to the distribution the sampler draws from, and the critic is fit to the same samples.
    A training draw costs ``K`` evaluations with gradients. (DMD2 instead trains each sample at one
    level reached without gradients, "backward simulation"; that matches only the mixture over levels
    of the ``x0_k`` to the data; on a Gaussian mixture its samples missed a mode of 30% mass on two of three
    seeds, docs/math.md, section 2.2.1.)

    Args:
        denoiser: the student's denoiser (a copy of the teacher; trained in place).
        sigmas: ``K >= 2`` decreasing noise levels (``student.sigmas``).
        clip_sample: clip every evaluation's x0 to [-1, 1] (``student.clip_sample``), in training and sampling.
    """

    def __init__(self, denoiser: Denoiser, sigmas: Sequence[float], clip_sample: bool = False):
        if len(sigmas) < 2:
            raise ValueError(f"a few-step generator needs two or more noise levels, got {list(sigmas)}")
        super().__init__(denoiser, sigmas, "multistep", clip_sample)

    @classmethod
    def from_teacher(cls, teacher: Denoiser, student) -> "FewStepGenerator":
        """A generator at ``student.sigmas`` whose denoiser is the trainable copy of ``teacher`` that the
        ``student`` section asks for (:func:`student_copy`). Pixel teachers only, so far: their students export
        as :class:`~distilldiff.pipelines.DistillDiffPipeline`, which runs the re-noising sampler; latent and flow
        students export as stock text-to-image pipelines, whose schedulers distilldiff does not set up for it."""
        _require_pixels(teacher, "student.sigmas", "few-step generators are built for pixel teachers; {} is not one "
                        "(set student.init_sigma or init_timestep for a one-step generator)")
        return cls(student_copy(teacher, student), student.sigmas, student.clip_sample)


def _require_pixels(teacher: Denoiser, key: str, why: str) -> None:
    """One-line :class:`~distilldiff.config.ConfigError` naming ``key`` unless ``teacher`` samples images
    (its ``decode`` is the identity); ``why`` is formatted with the teacher's class name."""
    if type(base_denoiser(teacher)).decode is not Denoiser.decode:
        from .config import ConfigError

        raise ConfigError(f"{key}: {why.format(type(base_denoiser(teacher)).__name__)}; remove the key")


def init_noise_level(teacher: Denoiser, student) -> float:
    """The noise level of a one-step generator of ``teacher`` for the ``student`` section (a
    :class:`~distilldiff.config.StudentConfig`): ``init_sigma``; or the noise level of training
    timestep ``init_timestep`` (DDPM-family teachers); or, with neither set, the teacher's
    ``default_init_timestep`` where it has one (text-to-image teachers, whose exported students
    must sit on a timestep), or ``inf`` for teachers defined on pure noise (flow-matching
    teachers: t = 1, where their stock scheduler starts), else ``StudentConfig.DEFAULT_INIT_SIGMA``."""
    from .config import ConfigError

    t = student.init_timestep
    if t is None and student.init_sigma is None:
        if teacher.sigma_max == float("inf"):
            return float("inf")
        t = getattr(teacher, "default_init_timestep", None)
    if t is None:
        return student.resolved_init_sigma
    if not hasattr(teacher, "timestep_to_sigma"):
        raise ConfigError(f"student.init_timestep: the teacher {type(teacher).__name__} has no training timesteps; use student.init_sigma")
    if not 0 <= t < teacher.num_train_timesteps:
        raise ConfigError(f"student.init_timestep: {t} is outside the teacher's timesteps 0..{teacher.num_train_timesteps - 1}")
    return float(teacher.timestep_to_sigma(torch.tensor(float(t), dtype=torch.float64)))


def trainable_copy(teacher: Denoiser) -> Denoiser:
    """A deep copy of ``teacher`` whose trainable parameters require gradients (a student or critic's start)."""
    return _with_gradients(copy.deepcopy(teacher))


def reparameterized_copy(teacher: Denoiser, parameterization: str | None) -> Denoiser:
    """A trainable copy of ``teacher`` whose network output means ``parameterization``.

    ``parameterization`` is ``None`` (keep the teacher's: the copy equals the teacher) or one of
    ``"epsilon"``, ``"v_prediction"``, ``"sample"``. The weights are copied unchanged; only the
    conversion of the network's output to x0 changes (:func:`set_parameterization`), so unless
    the value is the teacher's own, the copy starts away from the teacher (:func:`start_gap`).
    """
    return set_parameterization(trainable_copy(teacher), parameterization)


#: the layers a LoRA student adapts: the attention projections (diffusers' LoRA training scripts)
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


def student_copy(teacher: Denoiser, student) -> Denoiser:
    """The trainable copy of ``teacher`` that the ``student`` section (a
    :class:`~distilldiff.config.StudentConfig`) asks for: output re-read as ``parameterization``
    (:func:`reparameterized_copy`), and with ``lora_rank`` set, a LoRA adapter as the only
    trainable weights (:func:`add_lora`)."""
    den = reparameterized_copy(teacher, student.parameterization)
    if student.lora_rank is not None:
        add_lora(den, student.lora_rank, student.lora_alpha)
    return den


def add_lora(den: Denoiser, rank: int, alpha: float | None = None) -> Denoiser:
    """Give ``den``'s network a LoRA adapter (Hu et al. 2022, eq. 3: ``W + (alpha / r) B A``) on
    :data:`LORA_TARGET_MODULES` through peft (diffusers' ``add_adapter``), freeze every other
    weight, and make the adapter its trainable parameters (in place; returns ``den``). B starts at
    zero (peft's initialisation), so the copy starts equal to the teacher. A network that already
    has an adapter (a later stage of progressive distillation, whose teacher is the previous
    stage's LoRA student) keeps training that one, so the adapter stays relative to the original
    teacher's weights."""
    from peft import LoraConfig

    model = getattr(den, "model", None)
    if model is None or not hasattr(model, "add_adapter"):
        raise ValueError(f"student.lora_rank: the student's network ({type(model or den).__name__}) has no adapter support; "
                         "LoRA students need a diffusers network with peft adapters, e.g. UNet2DConditionModel")
    model.requires_grad_(False)
    if not getattr(model, "peft_config", None):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                                     target_modules=list(LORA_TARGET_MODULES)))
    for p in den.trainable_parameters():
        p.requires_grad_(True)
    return den


class LoRAFakeScore(Denoiser):
    """A fake score that is a LoRA adapter on the frozen teacher's own network (``critic.lora_rank``).

    One copy of the teacher's weights serves teacher and critic: peft injects an adapter named
    :attr:`ADAPTER` into the teacher's network and leaves it switched off, so the teacher (and its
    classifier-free guidance wrapper) computes exactly what it did before; this denoiser switches
    it on for its own calls, ``D_fake(x, sigma) = D_teacher with W + (alpha / r) B A``. B starts at
    zero, so the critic starts equal to the teacher, as a full copy would.

    The teacher is held outside the module tree: the critic's parameters, state dict (checkpoints)
    and device moves are the adapter's alone. A copy of this view is the view itself (an
    objective's "trainable copy of the teacher" for its fake score becomes this adapter).
    Activation checkpointing is not supported: a recomputation during the backward pass would run
    with the adapter off.

    Args:
        teacher: the frozen teacher's (unguided) denoiser; its network needs diffusers' adapter
            support (``add_adapter``, ``enable_adapters``).
        rank, alpha: the LoRA rank and alpha (default: the rank).
    """

    ADAPTER = "fake_score"
    _supports_gradient_checkpointing = False

    def __init__(self, teacher: Denoiser, rank: int, alpha: float | None = None):
        from peft import LoraConfig

        super().__init__()
        net = getattr(teacher, "model", None)
        if net is None or not hasattr(net, "add_adapter") or not hasattr(net, "enable_adapters"):
            raise ValueError(f"critic.lora_rank: the teacher's network ({type(net or teacher).__name__}) has no adapter support; "
                             "LoRA critics need a diffusers network with peft adapters, e.g. UNet2DConditionModel")
        if getattr(net, "peft_config", None):
            raise ValueError("critic.lora_rank: the teacher's network already carries a LoRA adapter")
        object.__setattr__(self, "teacher", teacher)  # not a submodule: its weights are the teacher's, not the critic's
        for attr in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, attr, getattr(teacher, attr))
        net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                                   target_modules=list(LORA_TARGET_MODULES)), adapter_name=self.ADAPTER)
        self.lora = nn.ParameterDict({n.replace(".", "__"): p for n, p in net.named_parameters() if "lora_" in n})
        self._switch_adapter(False)
        for p in self.lora.values():
            p.requires_grad_(True)

    def __deepcopy__(self, memo) -> "LoRAFakeScore":
        return self

    def feature_module(self) -> nn.Module:
        """No features for a discriminator head: a hook on the shared network would also fire in the teacher's calls."""
        from .config import ConfigError

        raise ConfigError("critic.lora_rank: a LoRA critic is a plain fake score; a discriminator head (SiDA, DMD2's GAN) "
                          "needs a full critic: remove critic.lora_rank or the head")

    @property
    def conditioning(self) -> Conditioning:
        return self.teacher.conditioning

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return self.teacher.prior_scale(sigma)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.lora.values())

    def _switch_adapter(self, on: bool) -> None:
        """Switch the adapter on or off, keeping its parameters' ``requires_grad`` (peft's switches
        also set it, which would stop the gradient of a call made with the adapter on)."""
        wanted = [p.requires_grad for p in self.lora.values()]
        net = self.teacher.model
        net.enable_adapters() if on else net.disable_adapters()
        for p, g in zip(self.lora.values(), wanted):
            p.requires_grad_(g)

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        self._switch_adapter(True)
        try:
            return self.teacher(x, sigma, **cond)
        finally:
            self._switch_adapter(False)


def set_parameterization(den: Denoiser, parameterization: str | None) -> Denoiser:
    """Make ``den``'s network output mean ``parameterization`` (in place; returns ``den``).

    For a :class:`~distilldiff.teachers.VPDenoiser` this sets its ``prediction_type`` (and the
    ``prediction_type`` of the scheduler config it was loaded with, which export writes); a
    :class:`ConsistencyDenoiser` passes it to the denoiser it wraps. ``None`` changes nothing.
    Other denoisers (EDM-preconditioned networks such as ``toy.MLPDenoiser``, whose output is
    already bounded, or analytic teachers) have no output to re-interpret: ``ValueError``.
    """
    from .teachers.vp import PREDICTION_TYPES, VPDenoiser

    if parameterization is None:
        return den
    if parameterization not in PREDICTION_TYPES:
        raise ValueError(f"student.parameterization: {parameterization!r} is not one of {', '.join(PREDICTION_TYPES)}")
    target = den.inner if isinstance(den, ConsistencyDenoiser) else den
    if not isinstance(target, VPDenoiser):
        raise ValueError(
            f"student.parameterization={parameterization!r} applies to VP (diffusers) networks, whose output can be "
            f"re-interpreted; {type(target).__name__} has no prediction_type: leave student.parameterization unset"
        )
    target.prediction_type = parameterization
    if target.scheduler_config is not None:
        target.scheduler_config = {**target.scheduler_config, "prediction_type": parameterization}
    return den


@torch.no_grad()
def start_gap(
    teacher: Denoiser, student: Denoiser, sigmas: Sequence[float] | Tensor, x0: Tensor,
    cond: dict[str, Any] | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """How far a student denoiser starts from its teacher: rms of ``D_student - D_teacher`` per noise level.

    Both denoisers see the same noisy samples ``x = x0 + sigma * n`` (``n ~ N(0, I)`` drawn from
    ``generator`` on the CPU, one draw per level), with conditioning ``cond``.

    Args:
        teacher, student: denoisers with the same sample shape (e.g. the teacher and
            ``reparameterized_copy(teacher, ...)``).
        sigmas: ``[S]`` noise levels.
        x0: ``[B, *sample_shape]`` clean samples (real data, or samples of the teacher).
        cond: conditioning keyword arguments, each with a leading ``[B]`` dimension.

    Returns:
        ``[S]`` float64: ``sqrt(mean_{B, d} (D_student(x, sigma) - D_teacher(x, sigma))^2)``
        for each sigma (an rms per sample element, e.g. per pixel). 0 when the student is an
        unchanged copy.
    """
    cond = cond or {}
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    gaps = []
    for s in sigmas.tolist():
        n = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x = x0 + s * n
        diff = student(x, s, **cond).to(torch.float64) - teacher(x, s, **cond).to(torch.float64)
        gaps.append(diff.pow(2).mean().sqrt())
    return torch.stack(gaps) if gaps else torch.zeros(0, dtype=torch.float64)


def _with_gradients(den: Denoiser) -> Denoiser:
    for p in den.trainable_parameters():
        p.requires_grad_(True)
    return den


def guidance_conditioned_copy(teacher: Denoiser, guidance_embed_scale: float | None = None, guidance_embed_gain: float | None = None,
                              defaults: tuple[float, float] = (100.0, 1.0)) -> Denoiser:
    """A trainable copy of ``teacher`` that takes ``guidance_scale=w`` as an input (Meng et al. 2023, sec. 4.1).

    VP teachers get a zero-initialised w input, so the copy equals the teacher at every w at first
    (:meth:`VPDenoiser.add_guidance_input`: a :class:`~distilldiff.pipelines.GuidedUNet2DModel`
    for pixel networks, diffusers' ``time_cond_proj_dim`` for text-to-image UNets); other
    denoisers must already have a guidance input (``guidance = True``). ``guidance_embed_scale`` /
    ``_gain`` configure the pixel networks' embedding (unset: ``defaults``, the objective's own);
    text-to-image students refuse them (diffusers' embedding is fixed).
    """
    from .teachers.vp import VPDenoiser

    den = copy.deepcopy(teacher)
    if isinstance(den, VPDenoiser):
        den.add_guidance_input(guidance_embed_scale, guidance_embed_gain, defaults)
    elif not getattr(den, "guidance", False):
        raise ValueError(f"a guidance-conditioned student needs a network with a guidance input; {type(den).__name__} has none")
    return _with_gradients(den)


class ConsistencyDenoiser(Denoiser):
    """Consistency-model parameterisation on top of any denoiser (Song et al. 2023, sec. 3 and App. C; EDM's D).

    With EDM's ``D = c_skip^E x + c_out^E F``, the raw output is ``F = (D - c_skip^E x) / c_out^E``
    and ``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F`` with
    ``c_skip = sd^2 / ((sigma - s_min)^2 + sd^2)``, ``c_out = (sigma - s_min) sd / sqrt(sigma^2 + sd^2)``,
    so that ``f(x, s_min) = x`` exactly and ``f ~ D`` for ``sigma >> s_min``.

    Args:
        inner: the wrapped denoiser (a copy of the teacher).
        boundary_sigma: ``s_min``, where the boundary condition holds.
    """

    def __init__(self, inner: Denoiser, boundary_sigma: float):
        super().__init__()
        if not boundary_sigma > 0:
            raise ValueError(f"boundary_sigma must be > 0, got {boundary_sigma}")
        self.inner = inner
        self.boundary_sigma = float(boundary_sigma)
        for attr in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, attr, getattr(inner, attr))
        self.sigma_min = max(self.sigma_min, self.boundary_sigma)

    @property
    def conditioning(self) -> Conditioning:
        return self.inner.conditioning

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.inner.trainable_parameters()

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        return self.inner.learning_rate_scales()

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return self.inner.prior_scale(sigma)

    def decode(self, x: Tensor) -> Tensor:
        return self.inner.decode(x)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_skip^E, c_out^E)`` for ``sigma`` of any shape."""
        sd, s0 = self.sigma_data, self.boundary_sigma
        c_skip = sd**2 / ((sigma - s0) ** 2 + sd**2)
        c_out = (sigma - s0) * sd / (sigma**2 + sd**2).sqrt()
        e_skip = sd**2 / (sigma**2 + sd**2)
        e_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, e_skip, e_out

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        c_skip, c_out, e_skip, e_out = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        d = self.inner(x, sigma, **cond)
        return c_skip * x + (c_out / e_out) * (d - e_skip * x)


class LCMConsistencyDenoiser(ConsistencyDenoiser):
    """Latent consistency models' parameterisation on a discrete-time (VP) denoiser (Luo et al. 2023,
    eq. 6 with the boundary scalings of their code, which diffusers' ``LCMScheduler`` applies):

    ``f(x, sigma) = c_skip(t) x_t + c_out(t) D(x, sigma)``, with ``x_t = x / sqrt(1 + sigma^2)`` the
    VP-scaled input, ``t`` the training timestep of ``sigma``, ``c_skip = sd^2 / ((s t)^2 + sd^2)``
    and ``c_out = s t / sqrt((s t)^2 + sd^2)``, ``sd = 0.5``, ``s = timestep_scaling``. So
    ``f(x, sigma(0)) = x_t`` and ``f ~ D`` a few timesteps above 0. A multistep student of this
    denoiser on LCM's timesteps is what a stock ``LCMScheduler`` samples.

    Args:
        inner: the wrapped denoiser (a copy of the teacher) with discrete ``sigma_to_timestep``.
        num_scales: N of the skip-step timesteps it is trained on (``LCMScheduler``'s
            ``original_inference_steps``; :func:`~distilldiff.samplers.lcm_grid_timesteps`).
        timestep_scaling: ``s`` (10 in LCM and diffusers).
    """

    #: sigma_data of LCM's boundary scalings (fixed in LCM's code and diffusers' LCMScheduler)
    BOUNDARY_SIGMA_DATA = 0.5

    def __init__(self, inner: Denoiser, num_scales: int, timestep_scaling: float = 10.0):
        if not hasattr(inner, "sigma_to_timestep"):
            raise ValueError(f"LCM's parameterisation needs a discrete-time (diffusers VP) denoiser, got {type(inner).__name__}")
        super().__init__(inner, inner.sigma_min)
        self.num_scales = int(num_scales)
        self.timestep_scaling = float(timestep_scaling)

    def sample_sigmas(self, steps: int) -> list[float]:
        """Decreasing noise levels of ``steps``-step sampling: the timesteps ``LCMScheduler`` picks."""
        from .samplers import lcm_sample_timesteps

        timesteps = lcm_sample_timesteps(self.inner.num_train_timesteps, self.num_scales, steps)
        return self.inner.schedule.sigmas[torch.tensor(timesteps)].tolist()  # exact at integer timesteps

    def lcm_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)`` at the timesteps of ``sigma`` (any shape)."""
        t = self.inner.sigma_to_timestep(sigma) * self.timestep_scaling
        sd = self.BOUNDARY_SIGMA_DATA
        return sd**2 / (t**2 + sd**2), t / (t**2 + sd**2).sqrt()

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        c_skip, c_out = (append_dims(c.to(x.dtype), x.ndim) for c in self.lcm_scalings(sigma.to(torch.float64)))
        x_t = x / append_dims(self.inner.prior_scale(sigma), x.ndim)
        return c_skip * x_t + c_out * self.inner(x, sigma, **cond)
