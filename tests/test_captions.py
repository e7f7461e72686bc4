"""Captions of the MNIST-5k digits measured from the images (distilldiff.captions)."""

import re

import pytest
import torch

from distilldiff.captions import (
    CAPTION_ASSETS,
    DIGIT_WORDS,
    attribute_words,
    caption,
    caption_thresholds,
    caption_vocabulary,
    digit_attributes,
    eval_prompts,
    mnist5k_captions,
    prompt_digit,
    write_caption_files,
)
from distilldiff.data import mnist5k

CAPTION_RE = re.compile(
    r"a (?:(thin|thick) )?(?:(left-slanted|right-slanted) )?(?:(small|large) )?handwritten (" + "|".join(DIGIT_WORDS) + r")"
)


def bar(width: int, top: int, bottom: int, shear: float = 0.0) -> torch.Tensor:
    """A ``[1, 28, 28]`` image in [-1, 1]: a bar ``width`` columns wide over rows [top, bottom),
    shifted right by ``shear`` columns per row upward (shear > 0 leans like "/")."""
    img = -torch.ones(1, 28, 28)
    mid = (top + bottom - 1) / 2
    for r in range(top, bottom):
        left = round(14 + shear * (mid - r) - width / 2)
        img[0, r, left : left + width] = 1
    return img


@pytest.fixture(scope="module")
def mnist():
    images, labels = mnist5k()
    attrs = digit_attributes(images)
    return attrs, labels, attribute_words(attrs, labels)


def test_slant_sign_and_size_on_drawn_bars():
    a = digit_attributes(torch.stack([bar(3, 4, 24), bar(3, 4, 24, 0.5), bar(3, 4, 24, -0.5)]))
    upright, right, left = a["slant"].tolist()
    assert abs(upright) < 0.02
    assert right == pytest.approx(0.5, abs=0.05)
    assert left == pytest.approx(-0.5, abs=0.05)
    assert all(v.dtype == torch.float64 and v.shape == (3,) for v in a.values())


def test_thickness_and_height_on_drawn_bars():
    a = digit_attributes(torch.stack([bar(2, 6, 22), bar(4, 6, 22), bar(3, 10, 18), bar(3, 2, 24)]))
    thin, thick, short, tall = a["thickness"].tolist()
    # stroke length = perimeter / 2 = length + width, so thickness = width * length / (length + width)
    assert thin == pytest.approx(32 / 18) and thick == pytest.approx(64 / 20)
    assert a["height"].tolist() == [16, 16, 8, 22]
    assert a["ink"].tolist() == [32, 64, 24, 66]
    assert a["size"][3] > 2 * a["size"][2]
    assert short == pytest.approx(24 / 11) and tall == pytest.approx(66 / 25)


def test_empty_image_and_bad_shape():
    a = digit_attributes(-torch.ones(2, 1, 28, 28))
    assert all(v.tolist() == [0.0, 0.0] for v in a.values())
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        digit_attributes(torch.zeros(28, 28))


def test_words_against_given_thresholds():
    attrs = {
        "thickness": torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
        "slant": torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64),
        "size": torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64),
    }
    thresholds = {"thickness": [[1.5, 2.5]] * 10, "size": [[4.5, 5.5]] * 10, "slant": 0.1}
    words = attribute_words(attrs, torch.tensor([7, 7, 3]), thresholds)
    assert words == [["thin", "right-slanted", "small"], [], ["thick", "left-slanted", "large"]]
    assert caption(7, words[0]) == "a thin right-slanted small handwritten seven"
    assert caption(7, words[1]) == "a handwritten seven"
    # per-class thresholds: the same values are "large" for one class and nothing for another
    per_class = dict(thresholds, size=[[4.5, 5.5]] * 5 + [[6.5, 7.5]] * 5)
    assert attribute_words(attrs, torch.tensor([1, 1, 8]), per_class)[2] == ["thick", "left-slanted", "small"]


def test_mnist5k_shares_are_thirds(mnist):
    attrs, labels, words = mnist
    for k in range(10):
        idx = (labels == k).nonzero().flatten().tolist()
        for word in ("thin", "thick", "small", "large"):
            share = sum(word in words[i] for i in idx) / len(idx)
            assert abs(share - 1 / 3) < 0.05, (k, word, share)
    upright = sum(not any(w.endswith("slanted") for w in ws) for ws in words) / len(words)
    assert abs(upright - 1 / 3) < 0.02
    assert attribute_words(attrs, labels, caption_thresholds(attrs, labels)) == words


def test_mnist5k_captions_name_their_digit(mnist):
    _, labels, words = mnist
    captions = mnist5k_captions()
    assert len(captions) == 5000
    assert captions == [caption(k, w) for k, w in zip(labels.tolist(), words)]
    vocabulary = set(caption_vocabulary())
    for text, k in zip(captions, labels.tolist()):
        assert CAPTION_RE.fullmatch(text), text
        assert prompt_digit(text) == k
        assert set(text.split()) <= vocabulary


def test_prompt_digit():
    assert prompt_digit("A thick handwritten Seven.") == 7
    assert prompt_digit("someone's handwritten two") == 2  # "one" only as a whole word
    for bad in ("a handwritten digit", "a one and a two", "a seven seven"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))) as err:
            prompt_digit(bad)
        assert "\n" not in str(err.value)


def test_vocabulary():
    vocabulary = caption_vocabulary()
    assert vocabulary == sorted(set(vocabulary))
    assert set(vocabulary) == {"a", "handwritten", "thin", "thick", "left-slanted", "right-slanted", "small", "large", *DIGIT_WORDS}


def test_eval_prompts_are_seeded_and_uniform():
    prompts = eval_prompts(1000, seed=0)
    assert prompts == eval_prompts(1000, seed=0) and prompts != eval_prompts(1000, seed=1)
    vocabulary = set(caption_vocabulary())
    groups = [m.groups() for m in map(CAPTION_RE.fullmatch, prompts)]
    assert all(g is not None for g in groups) and all(set(p.split()) <= vocabulary for p in prompts)
    for digit in DIGIT_WORDS:
        assert 60 < sum(g[3] == digit for g in groups) < 140
    for slot, options in enumerate((("thin", "thick"), ("left-slanted", "right-slanted"), ("small", "large"))):
        for option in (*options, None):
            assert 270 < sum(g[slot] == option for g in groups) < 400, (slot, option)


def test_shipped_caption_files_are_current(tmp_path):
    train, evaluation = write_caption_files(tmp_path)
    assert (train.name, evaluation.name) == ("captions-train.txt", "captions-eval.txt")
    for path, lines in ((train, 5000), (evaluation, 1000)):
        text = path.read_bytes()
        assert text.endswith(b"\n") and text.count(b"\n") == lines
        assert (CAPTION_ASSETS / path.name).read_bytes() == text, f"stale {path.name}: rerun write_caption_files"
    assert train.read_text().splitlines() == mnist5k_captions()
