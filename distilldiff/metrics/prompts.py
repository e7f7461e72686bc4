"""Does a text-to-image model of digits draw what its prompt says?

Prompt accuracy is the shipped MNIST classifier's accuracy on the digit each prompt names;
attribute agreement is the share of images whose measured thickness, slant or size word
(:mod:`distilldiff.captions`, against the MNIST-5k thresholds) equals the prompt's.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from ..captions import ATTRIBUTE_OPTIONS, attribute_words, caption_thresholds, digit_attributes, prompt_digit
from .classifier import MNISTClassifier, class_accuracy


def digit_images(images: Tensor, size: int = 28) -> Tensor:
    """``[N, 1, size, size]`` grey images from ``[N, C, H, W]`` ones in [-1, 1] (H, W >= size):
    channels averaged, the centre cropped (the mini text-to-image teacher pads 28x28 digits to 32x32)."""
    if images.ndim != 4 or min(images.shape[-2:]) < size:
        raise ValueError(f"expected [N, C, H, W] images with H, W >= {size}, got {tuple(images.shape)}")
    x = images.float().mean(dim=1, keepdim=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def prompt_accuracy(images: Tensor, prompts: Sequence[str], classifier: MNISTClassifier | None = None) -> float:
    """Share of ``images`` (``[N, C, H, W]`` in [-1, 1]) that the classifier reads as the digit their prompt names."""
    labels = torch.tensor([prompt_digit(p) for p in prompts])
    if len(labels) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(labels)} prompts")
    return class_accuracy(digit_images(images), labels, classifier)


@functools.lru_cache(maxsize=1)
def _mnist_thresholds() -> dict:
    from ..data import mnist5k

    images, labels = mnist5k()
    return caption_thresholds(digit_attributes(images), labels)


def attribute_agreement(images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """For each attribute (``thickness``, ``slant``, ``size``): the share of images whose measured
    word (or its absence) equals the prompt's, measured against the MNIST-5k thresholds of the
    prompt's digit. Chance level is about 1/3."""
    labels = torch.tensor([prompt_digit(p) for p in prompts])
    measured = attribute_words(digit_attributes(digit_images(images)), labels, _mnist_thresholds())
    out = {}
    for name, low, high in ATTRIBUTE_OPTIONS:
        asked = [next((w for w in p.split() if w in (low, high)), None) for p in prompts]
        got = [next((w for w in m if w in (low, high)), None) for m in measured]
        out[name] = sum(a == b for a, b in zip(asked, got)) / max(1, len(prompts))
    return out
