"""Text captions for the embedded MNIST-5k digits, measured from each image.

Each digit gets a caption such as ``"a thick right-slanted small handwritten seven"``: its class
name plus up to three adjectives (thickness, slant, size) that come from measurements of the
image itself (:func:`digit_attributes`) compared with quantiles of the reference set
(:func:`caption_thresholds`). A small text-to-image teacher is trained on these captions, and
generated samples can be measured against the same MNIST-5k thresholds to check that they follow
their prompt.

Size note: MNIST digits were size-normalised to fit a 20x20 box, so the bounding-box ``height``
is 20 pixels for most digits (60% to 98% of each class of MNIST-5k) and its quantiles tie;
"small"/"large" are therefore decided by ``size``, the radius of gyration of the ink, which is
continuous and reflects width as well as height. ``height`` is still measured and returned.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch
from torch import Tensor

DIGIT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

#: The adjective options of each attribute, in caption order: (below the low quantile,
#: above the high quantile). An attribute between the two adds no word.
ATTRIBUTE_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("thickness", "thin", "thick"),
    ("slant", "left-slanted", "right-slanted"),
    ("size", "small", "large"),
)

ARTICLE = "a"
NOUN = "handwritten"

#: Where the shipped caption files of MNIST-5k live (``captions-train.txt``, ``captions-eval.txt``).
CAPTION_ASSETS = Path(__file__).parent / "assets" / "mnist-t2i"

_INK_LEVEL = 0.5  # a pixel is "ink" when (x + 1) / 2 > 0.5
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")


def digit_attributes(images: Tensor) -> dict[str, Tensor]:
    """Per-image measurements of ``[N, 1, H, W]`` images in [-1, 1] (background -1, ink +1).

    With the ink intensity ``p = (x + 1) / 2`` (clamped to [0, 1], for samples that overshoot)
    and the ink mask ``p > 0.5``, every entry is a float64 tensor ``[N]``:

    - ``ink``: total ink mass, ``sum(p)`` over the pixels.
    - ``height``: height in pixels of the bounding box of the ink mask (0 when there is none).
    - ``thickness``: ``ink / stroke_length``, with the stroke length estimated as half the
      perimeter of the ink mask: the number of 4-neighbour pixel pairs (including pairs with
      the background outside the image) that have one ink and one non-ink pixel, divided by 2.
      A bar of length L and width w has perimeter 2(L + w), so thickness ~ w for long strokes;
      loops count their inner and outer outline, which together are about twice the loop's
      length. 0 when there are no ink pixels.
    - ``slant``: the shear of the ink distribution, ``cov(x, y) / var(y)`` with ``p``-weighted
      moments of the pixel coordinates (x = column, to the right; y = -row, upward). Positive
      means leaning right, like "/". 0 when ``var(y)`` is 0.
    - ``size``: the radius of gyration of the ink in pixels, ``sqrt(var(x) + var(y))`` with the
      same ``p``-weighted moments (0 for an empty image).

    Returns:
        ``{"ink", "height", "thickness", "slant", "size"}``, each ``[N]`` float64.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"digit_attributes expects [N, 1, H, W] images, got shape {tuple(images.shape)}")
    p = ((images[:, 0].detach().to("cpu", torch.float64) + 1) / 2).clamp(0, 1)  # [N, H, W]
    n, h, w = p.shape
    mask = p > _INK_LEVEL

    ink = p.sum((1, 2))

    rows = mask.any(2)  # [N, H]
    row_idx = torch.arange(h)
    top = torch.where(rows, row_idx, h).min(1).values
    bottom = torch.where(rows, row_idx, -1).max(1).values
    height = (bottom - top + 1).clamp(min=0).to(torch.float64)

    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1, 1, 1))  # background around the image
    edges = (padded.diff(dim=1) != 0).sum((1, 2)) + (padded.diff(dim=2) != 0).sum((1, 2))
    length = edges.to(torch.float64) / 2
    thickness = torch.where(length > 0, ink / length.clamp(min=1), torch.zeros_like(ink))

    xs = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    ys = -torch.arange(h, dtype=torch.float64).view(1, h, 1)
    mass = ink.clamp(min=1e-12).view(n, 1, 1)
    mx = (p * xs).sum((1, 2), keepdim=True) / mass
    my = (p * ys).sum((1, 2), keepdim=True) / mass
    dx, dy = xs - mx, ys - my
    var_x = (p * dx**2).sum((1, 2)) / mass.view(n)
    var_y = (p * dy**2).sum((1, 2)) / mass.view(n)
    cov_xy = (p * dx * dy).sum((1, 2)) / mass.view(n)
    slant = torch.where(var_y > 1e-12, cov_xy / var_y.clamp(min=1e-12), torch.zeros_like(var_y))
    size = (var_x + var_y).sqrt()
    return {"ink": ink, "height": height, "thickness": thickness, "slant": slant, "size": size}


def caption_thresholds(attrs: dict[str, Tensor], labels: Tensor) -> dict:
    """The quantiles that :func:`attribute_words` compares against, computed on a reference set.

    Args:
        attrs: :func:`digit_attributes` of the reference images (entries ``[N]``).
        labels: ``[N]`` int digit classes 0-9; every class must occur.

    Returns:
        A JSON-serialisable dict of plain floats:

        - ``"thickness"``, ``"size"``: 10 ``[low, high]`` pairs, one per class, the 1/3 and 2/3
          quantiles (linear interpolation, ``torch.quantile``) of that attribute within the class.
        - ``"slant"``: one float t, the 1/3 quantile of ``|slant|`` over all images.
    """
    labels = torch.as_tensor(labels).cpu()
    qs = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    out: dict = {}
    for name in ("thickness", "size"):
        values = attrs[name].to(torch.float64).cpu()
        pairs = []
        for k in range(len(DIGIT_WORDS)):
            vk = values[labels == k]
            if vk.numel() == 0:
                raise ValueError(f"caption_thresholds: no image of class {k} ({DIGIT_WORDS[k]})")
            pairs.append([float(q) for q in torch.quantile(vk, qs)])
        out[name] = pairs
    out["slant"] = float(torch.quantile(attrs["slant"].to(torch.float64).cpu().abs(), 1 / 3))
    return out


def attribute_words(attrs: dict[str, Tensor], labels: Tensor, thresholds: dict | None = None) -> list[list[str]]:
    """Adjectives of each image, in the order thickness, slant, size.

    - thickness: "thin" below its class's low (1/3) quantile, "thick" above the high (2/3) one;
    - slant: "right-slanted" if ``slant > t``, "left-slanted" if ``slant < -t``, with t the
      1/3 quantile of ``|slant|`` over all digits (so about a third are upright);
    - size: "small" below its class's low quantile of ``size``, "large" above the high one;
    - nothing for that attribute otherwise.

    Args:
        attrs: :func:`digit_attributes` (entries ``[N]``).
        labels: ``[N]`` int digit classes, used to pick the per-class quantiles.
        thresholds: :func:`caption_thresholds` of a reference set (e.g. MNIST-5k) to measure
            other images (e.g. generated samples) against; ``None`` computes them from
            ``attrs`` and ``labels``.

    Returns:
        ``N`` lists of 0 to 3 words.
    """
    labels = torch.as_tensor(labels).cpu().long()
    if thresholds is None:
        thresholds = caption_thresholds(attrs, labels)
    words: list[list[str]] = [[] for _ in range(labels.numel())]
    for name, low_word, high_word in ATTRIBUTE_OPTIONS:
        values = attrs[name].to(torch.float64).cpu()
        if name == "slant":
            t = float(thresholds["slant"])
            low, high = torch.full_like(values, -t), torch.full_like(values, t)
        else:
            table = torch.tensor(thresholds[name], dtype=torch.float64)[labels]  # [N, 2]
            low, high = table[:, 0], table[:, 1]
        for i, (v, lo, hi) in enumerate(zip(values.tolist(), low.tolist(), high.tolist())):
            if v < lo:
                words[i].append(low_word)
            elif v > hi:
                words[i].append(high_word)
    return words


def caption(label: int, words: list[str]) -> str:
    """``"a <words...> handwritten <digit>"``, e.g. ``caption(7, ["thick"]) == "a thick handwritten seven"``
    (every adjective and "handwritten" start with a consonant, so the article is always "a")."""
    return " ".join([ARTICLE, *words, NOUN, DIGIT_WORDS[int(label)]])


@functools.lru_cache(maxsize=1)
def mnist5k_captions() -> list[str]:
    """The 5,000 captions of ``distilldiff.data.mnist5k()``, in dataset order, with the
    thresholds computed on the set itself. Cached: do not modify the returned list."""
    from distilldiff.data import mnist5k

    images, labels = mnist5k()
    words = attribute_words(digit_attributes(images), labels)
    return [caption(k, w) for k, w in zip(labels.tolist(), words)]


def prompt_digit(prompt: str) -> int:
    """The digit (0-9) that a caption names: the index of the one ``DIGIT_WORDS`` word in it.

    Words are matched whole and case-insensitively. Raises ``ValueError`` if the prompt
    contains no digit word or more than one (counting repeats).
    """
    found = [w for w in _WORD.findall(prompt.lower()) if w in DIGIT_WORDS]
    if len(found) != 1:
        problem = "no digit word" if not found else f"{len(found)} digit words ({', '.join(found)})"
        raise ValueError(f"prompt {prompt!r} names {problem}; it needs exactly one of {', '.join(DIGIT_WORDS)}")
    return DIGIT_WORDS.index(found[0])


def caption_vocabulary() -> list[str]:
    """Every distinct word a caption can contain (article, adjectives, "handwritten", digit words), sorted."""
    adjectives = [word for _, low, high in ATTRIBUTE_OPTIONS for word in (low, high)]
    return sorted({ARTICLE, NOUN, *adjectives, *DIGIT_WORDS})


def eval_prompts(num: int = 1000, seed: int = 0) -> list[str]:
    """``num`` evaluation prompts: a uniform digit and, for each attribute, a uniform choice among
    its three options (low word, no word, high word).

    Drawn with ``torch.Generator().manual_seed(seed)``: first ``randint(10, (num,))`` for the
    digits, then ``randint(3, (num, 3))`` for thickness, slant and size (0 = low word,
    1 = none, 2 = high word).
    """
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(len(DIGIT_WORDS), (num,), generator=g).tolist()
    choices = torch.randint(3, (num, len(ATTRIBUTE_OPTIONS)), generator=g).tolist()
    prompts = []
    for k, row in zip(digits, choices):
        words = [(low, None, high)[c] for (_, low, high), c in zip(ATTRIBUTE_OPTIONS, row)]
        prompts.append(caption(k, [w for w in words if w is not None]))
    return prompts


def write_caption_files(folder: Path, num_eval: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """Write ``captions-train.txt`` (the 5,000 :func:`mnist5k_captions`, in dataset order) and
    ``captions-eval.txt`` (:func:`eval_prompts` ``(num_eval, seed)``) into ``folder`` (created if
    needed), one caption per line, each file ending with a newline.

    Returns:
        The paths of the train and the eval file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, evaluation = folder / "captions-train.txt", folder / "captions-eval.txt"
    for path, lines in ((train, mnist5k_captions()), (evaluation, eval_prompts(num_eval, seed))):
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(line + "\n" for line in lines))
    return train, evaluation
