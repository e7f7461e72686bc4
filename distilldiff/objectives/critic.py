"""The critic of score distillation: a fake score, optionally with a discriminator head on its features.

SiD, DMD and f-distill fit a *fake score* (a copy of the teacher) to the student's samples. The
discriminators of DMD2 (a classifier on the fake score's bottleneck; Yin et al. 2024, sec. 4.3),
SiDA (the fake score's encoder bottleneck; Zhou et al. 2025) and f-distill's density-ratio
estimator (Xu et al. 2025, sec. 4) are heads on that same network's features:
:class:`ScoreWithHead` is the fake score plus such a head, trained in the same critic update
(:func:`critic_loss`). docs/math.md states the losses.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..teachers.base import Denoiser
from ..teachers.conditioning import Conditioning
from ..tensors import append_dims, sum_chw
from .base import Batch, edm_weight
from .noise import NoiseLevels


#: where a discriminator head reads the fake score's features (objectives' ``disc_features``)
FeatureLayer = Literal["bottleneck", "decoder"]
FEATURE_LAYERS: tuple[str, ...] = get_args(FeatureLayer)


def feature_module(den: nn.Module, layer: str = "bottleneck") -> nn.Module:
    """The layer whose output a discriminator head on ``den`` reads.

    ``layer="bottleneck"``: a diffusers UNet's ``mid_block``, the last hidden layer of an MLP
    denoiser, or what ``den.feature_module()`` names (flow transformers: their final norm, whose
    token features the head averages). ``layer="decoder"``: a diffusers UNet's last up block, the
    decoder's full-resolution feature map ``[B, C, H, W]`` just before the output convolution;
    only UNets have it (a ValueError names the network otherwise).
    """
    if layer not in FEATURE_LAYERS:
        raise ValueError(f"feature layer {layer!r} is not one of {', '.join(FEATURE_LAYERS)}")
    own = getattr(den, "feature_module", None)
    if callable(own):
        module = own()  # may raise its own error (a LoRA critic has no features)
        if layer != "bottleneck":
            raise ValueError(f"{type(den).__name__} has one feature layer for a discriminator head, not a UNet's decoder: "
                             f"leave disc_features at bottleneck")
        return module
    model = getattr(den, "model", None)
    if model is not None and getattr(model, "mid_block", None) is not None:
        return model.mid_block if layer == "bottleneck" else model.up_blocks[-1]
    inner = getattr(den, "inner", None)
    net = getattr(den, "net", None)
    if layer == "bottleneck" and isinstance(net, nn.Sequential) and len(net) >= 2:
        return net[-2]
    if isinstance(inner, nn.Module):
        return feature_module(inner, layer)
    if layer == "decoder":
        raise ValueError(f"{type(den).__name__} has no decoder features for a discriminator head (a diffusers UNet's "
                         "last up block): leave disc_features at bottleneck")
    raise ValueError(
        f"{type(den).__name__} has no known feature layer for a discriminator head (a diffusers UNet's "
        "mid_block, an MLP's last hidden layer, or a feature_module() method)"
    )


#: the discriminator heads of :class:`ScoreWithHead` (objectives' ``disc_head``)
HeadKind = Literal["mean_mlp", "conv"]
HEADS: tuple[str, ...] = get_args(HeadKind)


class ScoreWithHead(Denoiser):
    """A fake score ``D_psi(x, sigma, **cond)`` with a discriminator logit on its own features.

    ``forward(x, sigma, with_logit=True)`` returns ``(D [B, *shape], logit [B])`` from one network
    evaluation. The logit comes from the features of ``features`` (:func:`feature_module`: the
    bottleneck, or a UNet's full-resolution decoder map) through ``head`` (output layer
    zero-initialised, so the logit starts at 0, i.e. r = 1): ``mean_mlp``, a small MLP on their
    spatial (or token) mean (SiDA's); ``conv``, for feature maps ``[B, C, H, W]`` only, a 3x3
    convolution, GroupNorm and SiLU, then a 1x1 convolution to one logit per position, averaged over the
    positions (a patch discriminator on the map, like DMD2's convolutional head). Class-conditional
    scores add a class projection term on the mean features. With ``detach_features=True`` the head's
    loss does not reach the fake score's own parameters.

    Buffers ``h_mean`` and ``r_bin_mean`` hold running means that f-distill normalises its
    weights by (checkpointed with the network; updated between steps by the objective).

    Args:
        score: the fake score (a trainable copy of the teacher).
        ratio_bins: size of ``r_bin_mean`` (per-noise-bin means of the density ratio; 0: none).
        h_init: initial value of ``h_mean`` (the weighting at r = 1).
        train_backbone: whether training updates ``score``'s own parameters; ``False`` makes a
            discriminator of frozen features and a trained head (LADD's, on a copy of the teacher).
        head_lr_scale: the head's learning rate as a multiple of the fake score's
            (:meth:`learning_rate_scales`): the zero-started head otherwise moves by about lr per
            update, and at short budgets stays at chance.
        head: ``mean_mlp`` or ``conv`` (see above).
        features: ``bottleneck`` or ``decoder`` (:func:`feature_module`). The bottleneck is what DMD2 and
            SiDA read; on small images it is nearly blind to pixel-level differences such as a speckled
            background, which the decoder's full-resolution map shows (docs/math.md, section 3.0).
    """

    def __init__(self, score: Denoiser, ratio_bins: int = 0, h_init: float = 1.0, train_backbone: bool = True,
                 head_lr_scale: float = 1.0, head: str = "mean_mlp", features: str = "bottleneck"):
        super().__init__()
        if not head_lr_scale > 0:
            raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale}")
        if head not in HEADS:
            raise ValueError(f"discriminator head {head!r} is not one of {', '.join(HEADS)}")
        self.head_kind = head
        self.denoiser = score
        self.train_backbone = train_backbone
        self.head_lr_scale = float(head_lr_scale)
        for attr in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, attr, getattr(score, attr))
        self._features: list[Tensor] = []
        self.features = features
        feature_module(score, features).register_forward_hook(self._keep_features)
        width, ndim = self._feature_shape()
        if head == "conv":
            if ndim != 4:
                raise ValueError(f"the conv discriminator head needs feature maps [B, C, H, W]; {type(score).__name__}'s "
                                 f"features have {ndim} dimensions (use mean_mlp)")
            self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(math.gcd(32, width), width), nn.SiLU(),
                                      nn.Conv2d(width, 1, 1))
        else:
            self.head = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.class_embed = nn.Embedding(self.num_classes + 1, width) if self.num_classes else None
        if self.class_embed is not None:
            nn.init.zeros_(self.class_embed.weight)
        self.register_buffer("h_mean", torch.tensor(float(h_init), dtype=torch.float64))
        self.register_buffer("r_bin_mean", torch.ones(ratio_bins, dtype=torch.float64))

    def _keep_features(self, module: nn.Module, args: Any, output: Any) -> None:
        self._features.append((output[0] if isinstance(output, tuple) else output).float())

    @staticmethod
    def _mean(features: Tensor) -> Tensor:
        """``[B, D]``: the token mean of ``[B, N, D]``, the spatial mean of ``[B, C, H, W]``."""
        if features.ndim == 3:
            return features.mean(dim=1)
        return features.mean(dim=tuple(range(2, features.ndim))) if features.ndim > 3 else features

    @torch.no_grad()
    def _feature_shape(self) -> tuple[int, int]:
        """Width (channels or token dimension) and number of dimensions of the head's features."""
        x = torch.zeros(1, *self.sample_shape)
        conditioning = self.denoiser.conditioning  # any valid conditioning: only the shape is read
        cond = conditioning.null(1, x.device) if conditioning.has_null else conditioning.draw(1, x.device)
        self._features.clear()
        self.denoiser(x, torch.ones(1), **cond)
        features = self._features.pop()
        self._features.clear()
        return (features.shape[-1] if features.ndim == 3 else features.shape[1]), features.ndim

    @property
    def conditioning(self) -> Conditioning:
        return self.denoiser.conditioning

    def prior_scale(self, sigma: Tensor) -> Tensor:
        return self.denoiser.prior_scale(sigma)

    def head_parameters(self) -> list[nn.Parameter]:
        """The discriminator's own parameters (its MLP and class projection)."""
        return list(self.head.parameters()) + (list(self.class_embed.parameters()) if self.class_embed is not None else [])

    def trainable_parameters(self) -> list[nn.Parameter]:
        return (list(self.denoiser.trainable_parameters()) if self.train_backbone else []) + self.head_parameters()

    def learning_rate_scales(self) -> dict[nn.Parameter, float]:
        """The fake score's own multiples, and ``head_lr_scale`` for the head (when not 1)."""
        scales = dict(self.denoiser.learning_rate_scales()) if self.train_backbone else {}
        if self.head_lr_scale != 1.0:
            scales.update({p: self.head_lr_scale for p in self.head_parameters()})
        return scales

    def forward(self, x: Tensor, sigma: Tensor | float, *, with_logit: bool = False, detach_features: bool = False, **cond: Any):
        """``D(x, sigma)``, or ``(D, logit [B])`` with ``with_logit``."""
        self._features.clear()
        d = self.denoiser(x, sigma, **cond)
        if not with_logit:
            self._features.clear()
            return d
        features = self._features.pop()
        self._features.clear()
        if detach_features:
            features = features.detach()
        h = self._mean(features)
        logit = self.head(features).mean(dim=(1, 2, 3)) if self.head_kind == "conv" else self.head(h).squeeze(1)
        labels = cond.get("class_labels")
        if self.class_embed is not None and labels is not None:
            logit = logit + (self.class_embed(labels.long()) * h).sum(1)
        return d, logit.to(x.dtype)


def check_head_options(head_lr_scale: float, disc_head: str, has_discriminator: bool, needs: str,
                       disc_features: str = "bottleneck") -> None:
    """Config check of an objective's head keys: ``head_lr_scale`` positive, ``disc_head`` and ``disc_features``
    known kinds, all left at their defaults (1, ``mean_mlp``, ``bottleneck``) without a head; ``needs`` says
    what turns the head on."""
    if not head_lr_scale > 0:
        raise ValueError(f"objective.head_lr_scale must be > 0, got {head_lr_scale}")
    if disc_head not in HEADS:
        raise ValueError(f"objective.disc_head: {disc_head!r} is not one of {', '.join(HEADS)}")
    if disc_features not in FEATURE_LAYERS:
        raise ValueError(f"objective.disc_features: {disc_features!r} is not one of {', '.join(FEATURE_LAYERS)}")
    for key, value, default in (("head_lr_scale", head_lr_scale, 1.0), ("disc_head", disc_head, HEADS[0]),
                                ("disc_features", disc_features, FEATURE_LAYERS[0])):
        if value != default and not has_discriminator:
            raise ValueError(f"objective.{key} needs a discriminator head ({needs}); remove the key")


def has_head(net: Any) -> bool:
    """Whether a (possibly wrapped) critic carries a discriminator head."""
    inner = getattr(net, "module", net)
    return isinstance(inner, ScoreWithHead) or isinstance(getattr(net, "_inner", None), ScoreWithHead)


def noised(x0: Tensor, sigma: Tensor) -> Tensor:
    """``x0 + sigma n``, ``n ~ N(0, I)``."""
    return x0 + append_dims(sigma, x0.ndim) * torch.randn_like(x0)


def critic_loss(
    nets: Mapping[str, nn.Module], batch: Batch, *, fake_noise: NoiseLevels, disc_noise: NoiseLevels | None,
    sigma_data: float, disc_weight: float = 1.0, detach_features: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic update of SiD/DMD/DMD2/f-distill on the generator's images ``x_g`` (no gradient to G).

    ``mean_B lambda(sigma) sum_CHW ||D_psi(x_g + sigma n, sigma) - x_g||^2`` with sigma from
    ``fake_noise`` (EDM's weighting, Karras et al. 2022, eq. 2 and 8), plus, when the fake score has
    a discriminator head, ``disc_weight * mean_B [softplus(l(fake_t)) + softplus(-l(real_t))]`` with
    fake and real samples noised at sigma from ``disc_noise`` (the generator-phase distribution):
    the logit l then estimates ``log p_teacher / q_student`` at that noise level. When the two
    distributions are the same object, the denoising evaluation's logit is the fake one.
    """
    critic = nets["fake_score"]
    with torch.no_grad():
        x_g = nets["generator"](batch.noise, **batch.cond)
    sigma = fake_noise.draw(x_g.shape[0], x_g)
    x_t = noised(x_g, sigma)
    disc = disc_noise is not None
    if not disc:
        d = critic(x_t, sigma, **batch.cond)
    else:
        d, logit_fake = critic(x_t, sigma, with_logit=True, detach_features=detach_features, **batch.cond)
    denoise = (edm_weight(sigma, sigma_data) * sum_chw((d - x_g) ** 2)).mean()
    logs = {"denoise_loss": denoise.detach()}
    loss = denoise
    if disc:
        if batch.real is None:
            raise ValueError("a discriminator head needs real data in the batch")
        s_d = sigma if disc_noise is fake_noise else disc_noise.draw(x_g.shape[0], x_g)
        if disc_noise is not fake_noise:
            _, logit_fake = critic(noised(x_g, s_d), s_d, with_logit=True, detach_features=detach_features, **batch.cond)
        _, logit_real = critic(noised(batch.real, s_d), s_d, with_logit=True, detach_features=detach_features, **batch.cond)
        disc_loss = (F.softplus(logit_fake) + F.softplus(-logit_real)).mean()
        loss = loss + disc_weight * disc_loss
        logs["disc_loss"] = disc_loss.detach()
        logs["disc_accuracy"] = disc_accuracy(logit_real, logit_fake).detach()
    logs["loss"] = loss.detach()
    return loss, logs


def gan_generator_loss(logit: Tensor, reduce: bool = True) -> Tensor:
    """The non-saturating generator term ``mean_B softplus(-l(x_t))`` of logits ``[B]`` (DMD2 eq. 6,
    SiDA); per sample (``[B]``) with ``reduce=False``."""
    per_sample = F.softplus(-logit)
    return per_sample.mean() if reduce else per_sample


def disc_accuracy(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """The share of real samples with a positive logit and fake ones with a negative one, averaged."""
    return ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2


def hinge_discriminator_loss(logit_real: Tensor, logit_fake: Tensor) -> Tensor:
    """``(mean_B relu(1 - l(real_t)) + mean_B relu(1 + l(fake_t))) / 2``, the hinge loss of LADD's
    discriminator (Sauer et al. 2024, sec. 3; SANA-Sprint, Chen et al. 2025, sec. 3.3)."""
    return (F.relu(1 - logit_real).mean() + F.relu(1 + logit_fake).mean()) / 2


def hinge_generator_loss(logit_fake: Tensor) -> Tensor:
    """The generator's hinge term ``-mean_B l(fake_t)`` (LADD)."""
    return -logit_fake.mean()


def global_sum(values: Tensor) -> Tensor:
    """``values`` summed over all processes (itself when not distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        values = values.clone()
        torch.distributed.all_reduce(values)
    return values
