"""A small MNIST classifier shipped with distilldiff: class accuracy of class-conditional samples
and a fast Frechet distance on its penultimate features.

A secondary metric for cheap tracking (e.g. during training on CPU); Inception FID
(:func:`distilldiff.metrics.compute_fid`) remains the headline number. The shipped weights are
trained by ``tools/train_mnist_classifier.py`` (see ``distilldiff/assets/mnist-classifier/README.md``).
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor, nn

from ..data import mnist5k
from ..images import as_saved
from .statistics import feature_statistics, frechet_distance

SHIPPED_CLASSIFIER = Path(__file__).parent.parent / "assets" / "mnist-classifier"

#: seed of the fixed train / held-out split of the 5,000 mnist5k digits
SPLIT_SEED = 0
#: the last ``HELDOUT_SIZE`` indices of the seeded permutation are held out
HELDOUT_SIZE = 1000


def heldout_split(n: int = 5000, seed: int = SPLIT_SEED, heldout: int = HELDOUT_SIZE) -> tuple[Tensor, Tensor]:
    """The fixed split of the ``n`` mnist5k digits: ``torch.randperm(n)`` under ``manual_seed(seed)``;
    its first ``n - heldout`` indices train, its last ``heldout`` are held out.

    Returns:
        ``(train_idx [n - heldout], heldout_idx [heldout])``, int64.
    """
    if not 0 < heldout < n:
        raise ValueError(f"held-out size must be in (0, {n}), got {heldout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n - heldout], perm[n - heldout :]


class MNISTClassifier(ModelMixin, ConfigMixin):
    """CNN for ``[N, 1, 28, 28]`` digits in [-1, 1].

    conv3x3(c0) -> maxpool 2 (14x14) -> conv3x3(c1) -> maxpool 2 (7x7) -> conv3x3(c2) -> maxpool 2
    (3x3) -> flatten ``[N, 9 c2]`` -> linear + ReLU -> ``[N, feature_dim]`` features -> dropout ->
    linear -> ``[N, num_classes]`` logits (batch norm and ReLU after each convolution).

    Args:
        channels: widths ``(c0, c1, c2)`` of the three convolutions.
        feature_dim: width ``F`` of the penultimate features (:meth:`features`).
        num_classes: number of output logits.
        dropout: dropout rate before the final linear layer (training only).
    """

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, int, int] = (32, 64, 64),
        feature_dim: int = 128,
        num_classes: int = 10,
        dropout: float = 0.3,
    ):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"channels must have 3 entries, got {tuple(channels)}")
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(9 * c_in, feature_dim), nn.ReLU())  # 28 -> 14 -> 7 -> 3
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features ``[N, feature_dim]`` of images ``[N, 1, 28, 28]`` in [-1, 1]."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, 1, 28, 28]`` in [-1, 1]."""
        return self.head(self.drop(self.features(x)))


def load_mnist_classifier(path: str | Path | None = None, device: str | torch.device | None = None) -> MNISTClassifier:
    """Load a classifier saved with ``save_pretrained`` (default: the shipped one), in eval mode
    with gradients off, on ``device`` (default CPU)."""
    folder = Path(path) if path is not None else SHIPPED_CLASSIFIER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: MNIST classifier folder not found (no config.json); train one with tools/train_mnist_classifier.py")
    model = MNISTClassifier.from_pretrained(str(folder), use_safetensors=True)
    return model.to(device or "cpu").eval().requires_grad_(False)


@functools.lru_cache(maxsize=1)
def _shipped() -> MNISTClassifier:
    return load_mnist_classifier()


def _check_images(images: Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a [N, 1, 28, 28] tensor in [-1, 1], got shape {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0)")


@torch.no_grad()
def _batched(fn, images: Tensor, classifier: MNISTClassifier, batch_size: int) -> Tensor:
    device = next(classifier.parameters()).device
    was_training = classifier.training
    classifier.eval()
    try:
        # the classifier sees what FID and a saved PNG see: 8-bit images, out-of-range values clipped
        return torch.cat([fn(as_saved(images[i : i + batch_size]).to(device)).cpu() for i in range(0, len(images), batch_size)])
    finally:
        classifier.train(was_training)


def classifier_features(images: Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500) -> Tensor:
    """Penultimate features ``[N, F]`` (float64, CPU) of images ``[N, 1, 28, 28]`` in [-1, 1].

    ``classifier`` defaults to the shipped one; it is run in eval mode on its own device.
    """
    _check_images(images)
    classifier = _shipped() if classifier is None else classifier
    return _batched(classifier.features, images, classifier, batch_size).double()


def class_accuracy(images: Tensor, labels: Tensor, classifier: MNISTClassifier | None = None, batch_size: int = 500) -> float:
    """Fraction of images ``[N, 1, 28, 28]`` in [-1, 1] that the classifier assigns to their
    label ``[N]`` (integers 0-9)."""
    _check_images(images)
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape [{images.shape[0]}] to match images {tuple(images.shape)}, got {tuple(labels.shape)}")
    classifier = _shipped() if classifier is None else classifier
    pred = _batched(classifier, images, classifier, batch_size).argmax(1)
    return float((pred == labels.cpu().long()).double().mean())


#: mnist5k feature statistics per classifier (dropped when the classifier is garbage-collected);
#: valid as long as that classifier's weights do not change
_REFERENCE_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _mnist5k_statistics(classifier: MNISTClassifier) -> tuple[np.ndarray, np.ndarray]:
    if classifier not in _REFERENCE_STATS:
        _REFERENCE_STATS[classifier] = feature_statistics(classifier_features(mnist5k()[0], classifier))
    return _REFERENCE_STATS[classifier]


def classifier_fd(
    images: Tensor,
    reference: str | tuple[np.ndarray, np.ndarray] = "mnist5k",
    classifier: MNISTClassifier | None = None,
    batch_size: int = 500,
) -> float:
    """Frechet distance between the classifier features of ``images`` ``[N >= 2, 1, 28, 28]``
    in [-1, 1] and a reference.

    Args:
        reference: ``"mnist5k"`` (the 5,000 embedded digits; their statistics are cached in
            memory per classifier) or ``(mu [F], sigma [F, F])`` of the same classifier's features.
        classifier: defaults to the shipped one.
        batch_size: images per forward pass.
    """
    classifier = _shipped() if classifier is None else classifier
    if isinstance(reference, str):
        if reference != "mnist5k":
            raise ValueError(f"unknown reference {reference!r}: use 'mnist5k' or a (mu, sigma) tuple")
        mu_ref, sigma_ref = _mnist5k_statistics(classifier)
    elif isinstance(reference, tuple) and len(reference) == 2:
        mu_ref, sigma_ref = reference
    else:
        raise ValueError(f"reference must be 'mnist5k' or a (mu, sigma) tuple, got {type(reference).__name__}")
    mu, sigma = feature_statistics(classifier_features(images, classifier, batch_size))
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
