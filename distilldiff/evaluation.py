"""Periodic evaluation of a student during training (the ``eval:`` section of a distill config).

The engine calls an :class:`Evaluator` every ``eval.every`` steps with the EMA student; the
results are logged to tensorboard and appended to ``OUT/eval.jsonl``, which
``tools/fid_vs_time.py`` turns into FID-against-training-time plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .config import ConfigError, EvalConfig

#: image shape the shipped MNIST classifier takes
MNIST_SHAPE = (1, 28, 28)


class Evaluator:
    """Draws ``config.num`` images from fixed noise with a student and computes ``config.metrics``.

    Args:
        config: the ``eval`` section (metrics, number of images, FID reference, weights).
        sample_shape: ``(C, H, W)`` of one sample.
        sample_fn: ``(student, noise [n, C, H, W], cond, generator) -> images [n, C, H, W]`` in
            [-1, 1]; ``generator`` (CPU) draws any noise the sampler needs after ``noise``.
        cond_fn: ``(n, device) -> cond`` for all ``num`` images at once (class labels cycling
            ``0..C-1``, a guidance scale); every tensor in it has ``n`` rows and is sliced per batch.
        num_classes: classes of a class-conditional student (``None``: unconditional).
        seed: seed of the fixed evaluation noise (the same noise at every evaluation, also for
            multistep students; the training RNG is not touched).
        with_steps: ``(student, k) -> the same student sampling in k steps``; needed for
            ``config.steps``.
    """

    def __init__(
        self,
        config: EvalConfig,
        sample_shape: tuple[int, ...],
        sample_fn: Callable[[nn.Module, Tensor, dict, torch.Generator], Tensor],
        cond_fn: Callable[[int, Any], dict],
        num_classes: int | None,
        seed: int = 0,
        with_steps: Callable[[nn.Module, int], nn.Module] | None = None,
    ):
        if config.every is None:
            raise ValueError("Evaluator needs eval.every (evaluation is off)")
        if config.steps is not None and with_steps is None:
            raise ValueError("Evaluator needs with_steps for eval.steps")
        wants_classifier = [m for m in config.metrics if m in ("classifier_fd", "class_accuracy")]
        if wants_classifier and tuple(sample_shape) != MNIST_SHAPE:
            raise ConfigError(f"eval.metrics: {wants_classifier[0]} needs 1x28x28 (MNIST) samples, this student draws {tuple(sample_shape)}")
        if "class_accuracy" in config.metrics and num_classes != 10:
            raise ConfigError(f"eval.metrics: class_accuracy needs a 10-class conditional student, this one has num_classes={num_classes}")
        if "fid" in config.metrics:
            from .metrics import BUILTIN_REFERENCES

            if config.ref not in BUILTIN_REFERENCES and not Path(config.ref).is_file():
                raise ConfigError(f"eval.ref: {config.ref} is neither a built-in reference ({', '.join(BUILTIN_REFERENCES)}) nor a file")
            if config.weights is not None and not Path(config.weights).is_file():
                raise ConfigError(f"eval.weights: {config.weights} not found")
            if config.ref not in BUILTIN_REFERENCES:  # read it now: a bad file must not stop a run hours in
                from .metrics import ReferenceStats

                try:
                    ReferenceStats.load(config.ref)
                except Exception as e:
                    raise ConfigError(f"eval.ref: {config.ref} is not a reference .npz with mu and sigma ({e})") from None
        self.config, self.every = config, config.every
        #: written with every evaluation's record in eval.jsonl
        self.info = {"num": config.num, **({"ref": config.ref} if "fid" in config.metrics else {})}
        self.sample_shape, self.sample_fn, self.cond_fn = tuple(sample_shape), sample_fn, cond_fn
        self.num_classes, self.seed, self.with_steps = num_classes, seed, with_steps
        self._extractor = None
        self._reference = None
        self._classifier = None

    @torch.no_grad()
    def sample(self, student: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """``num`` images ``[num, C, H, W]`` (CPU, float, in [-1, 1]) and their class labels (or ``None``)."""
        cfg = self.config
        g = torch.Generator().manual_seed(self.seed)
        cond_all = self.cond_fn(cfg.num, device)
        images = []
        for start in range(0, cfg.num, cfg.batch_size):
            n = min(cfg.batch_size, cfg.num - start)
            noise = torch.randn((n, *self.sample_shape), generator=g).to(device)
            cond = {k: v[start : start + n] if torch.is_tensor(v) else v for k, v in cond_all.items()}
            images.append(self.sample_fn(student, noise, cond, g).float().clamp(-1, 1).cpu())
        labels = cond_all.get("class_labels")
        return torch.cat(images), (labels.cpu() if labels is not None else None)

    def __call__(self, student: nn.Module, device: torch.device) -> dict[str, float]:
        """The configured metrics of ``student``'s samples, e.g. ``{"fid": 41.2, "classifier_fd": 3.1}``;
        with ``eval.steps`` once per step count K, as ``{"fid_1steps": ..., "fid_4steps": ...}``."""
        if self.config.steps is None:
            return self.metrics(*self.sample(student, device), device)
        out: dict[str, float] = {}
        for k in self.config.steps:
            results = self.metrics(*self.sample(self.with_steps(student, k), device), device)
            out.update({f"{name}_{k}steps": value for name, value in results.items()})
        return out

    def metrics(self, images: Tensor, labels: Tensor | None, device: torch.device) -> dict[str, float]:
        """The configured metrics of ``images`` ``[n, C, H, W]`` in [-1, 1] drawn for class ``labels`` ``[n]``."""
        from .metrics.background import faint_share, near_black_share
        from .metrics.classifier import class_accuracy, classifier_fd, load_mnist_classifier

        if self._classifier is None and {"classifier_fd", "class_accuracy"} & set(self.config.metrics):
            self._classifier = load_mnist_classifier(device=device)
        out: dict[str, float] = {}
        for metric in self.config.metrics:
            if metric == "fid":
                out["fid"] = self._fid(images, device)
            elif metric == "classifier_fd":
                out["classifier_fd"] = classifier_fd(images, classifier=self._classifier, batch_size=self.config.batch_size)
            elif metric == "class_accuracy":
                out["class_accuracy"] = class_accuracy(images, labels, classifier=self._classifier, batch_size=self.config.batch_size)
            elif metric == "near_black":
                out["near_black"] = near_black_share(images)
            elif metric == "faint":
                out["faint"] = faint_share(images)
        return out

    def _fid(self, images: Tensor, device: torch.device) -> float:
        from .metrics import InceptionFeatureExtractor, compute_fid, load_reference

        if self._extractor is None:
            self._extractor = InceptionFeatureExtractor(self.config.weights, device=device, batch_size=self.config.batch_size)
            self._reference = load_reference(self.config.ref, self._extractor)
        return compute_fid(images, len(images), self._reference, self._extractor, batch_size=self.config.batch_size).fid
