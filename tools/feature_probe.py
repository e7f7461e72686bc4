"""Which of a network's features tell a model's samples from real digits: a linear probe per layer and noise level.

A discriminator head on the fake score (DMD2, SiDA, f-distill's density ratio) can only see what the features
it reads show. This tool measures that on the frozen teacher, before any training: ``--num`` real MNIST-5k
digits and ``--num`` samples of ``--model`` are noised at each ``--sigmas`` level, passed through the teacher,
and the per-channel spatial mean and standard deviation of each feature layer (``bottleneck``: the UNet's
mid block; ``decoder``: its last up block, at the image's resolution;
:func:`distilldiff.objectives.critic.feature_module`) go into a logistic regression trained on 60% of the
images and scored on the other 40%. Held-out accuracy 0.5: the layer cannot tell them apart at that level;
1.0: it always can.

    python tools/feature_probe.py --model benchmarks/main-job-cpu/student-fdistill-js
    python tools/feature_probe.py --model builtin:mnist --steps 50      # the teacher's own samples
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from distilldiff.atomic import write_json
from distilldiff.objectives.critic import FEATURE_LAYERS, feature_module


def linear_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> Callable[[torch.Tensor], torch.Tensor]:
    """A logistic regression fitted to rows ``x`` ``[N, D]`` with labels ``y`` ``[N]`` (1 or 0), on features
    standardised with these rows' own mean and standard deviation; returns the logit function of new rows
    ``[M, D] -> [M]``, which standardises them with the same (the fitting rows') statistics, row by row."""
    x, y = x.double(), y.double()
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(xs @ w + b, y) + 1e-3 * w.square().sum()
            loss.backward()
            opt.step()
    w, b = w.detach(), b.detach()
    return lambda rows: ((rows.double() - mean) / std) @ w + b


def probe_accuracy(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression separating feature rows ``real`` ``[N, D]`` from ``fake`` ``[N, D]``:
    fitted (standardisation included) on a random 60% of the rows, scored on the other 40%."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([real, fake]).double()
    y = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).double()
    perm = torch.randperm(len(x), generator=g)
    cut = int(0.6 * len(x))
    train, test = perm[:cut], perm[cut:]
    logit = linear_probe(x[train], y[train], steps)
    return float(((logit(x[test]) > 0).double() == y[test]).double().mean())


def layer_features(teacher, images: torch.Tensor, labels: torch.Tensor, sigma: float, seed: int) -> dict[str, torch.Tensor]:
    """``{layer: [N, 2C]}``: per-channel spatial mean and std of each feature layer of ``teacher`` at ``images + sigma n``."""
    kept: dict[str, torch.Tensor] = {}
    hooks = [feature_module(teacher, layer).register_forward_hook(
        lambda m, a, out, layer=layer: kept.__setitem__(layer, (out[0] if isinstance(out, tuple) else out).float()))
        for layer in FEATURE_LAYERS]
    try:
        g = torch.Generator().manual_seed(seed)
        teacher(images + sigma * torch.randn(images.shape, generator=g), torch.full((len(images),), sigma), class_labels=labels)
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat([v.mean((2, 3)), v.std((2, 3))], 1) for k, v in kept.items()}


def digits_and_samples(model, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(real, real_labels, samples, cond)``: ``n`` MNIST-5k digits (a seed-0 draw) with their labels, and ``n`` raw
    samples of the sampler ``model`` (noise seed 0, classes cycling 0-9) with their conditioning."""
    from distilldiff.data import mnist5k

    real, real_labels = mnist5k()
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:n]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, *model.denoiser.sample_shape, generator=g)
    cond = model.denoiser.conditioning.grid(n, torch.device("cpu"), 0)
    with torch.no_grad():
        fake = model.draw(z, cond, g).float()
    return real[idx], real_labels[idx], fake, cond


def parsed_inputs(p: argparse.ArgumentParser, args: argparse.Namespace):
    """``(sigmas, model, teacher)`` of the options ``--sigmas``, ``--model`` (``--steps``) and ``--teacher``: the noise
    levels, the model's sampler and the teacher's denoiser; a bad value (or ``--num`` outside 10..5000) is a one-line
    ``p.error``."""
    from distilldiff.inference import load_sampler

    try:
        sigmas = [float(v) for v in args.sigmas.split(",")]
    except ValueError:
        p.error(f"--sigmas: expected comma-separated numbers, got {args.sigmas}")
    try:
        model = load_sampler(args.model, steps=args.steps, device="cpu")
        teacher = load_sampler(args.teacher, device="cpu").denoiser
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if not 10 <= args.num <= 5000:
        p.error(f"--num must be in 10..5000 (the MNIST-5k digits), got {args.num}")
    return sigmas, model, teacher


def main() -> None:

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run, student or exported folder, or a teacher (builtin:mnist)")
    p.add_argument("--steps", type=int, default=None, help="teachers: DDIM steps (default 50); students: their own")
    p.add_argument("--teacher", default="builtin:mnist", help="the network whose features are probed (default builtin:mnist)")
    p.add_argument("--sigmas", default="0.01,0.05,0.2,1", help="comma-separated noise levels (default 0.01,0.05,0.2,1)")
    p.add_argument("--num", type=int, default=600, help="images of each kind (default 600)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args()
    sigmas, model, teacher = parsed_inputs(p, args)
    n = args.num
    real, real_labels, fake, cond = digits_and_samples(model, n)
    fake = fake.clamp(-1, 1)
    rows = []
    print(f"{args.model} ({model.description}) against MNIST-5k, features of {args.teacher}, {n} images each")
    print("sigma    " + "  ".join(f"{layer:>10}" for layer in FEATURE_LAYERS))
    for i, sigma in enumerate(sigmas):
        fr = layer_features(teacher, real, real_labels, sigma, seed=1 + i)
        ff = layer_features(teacher, fake, cond["class_labels"], sigma, seed=1001 + i)
        acc = {layer: round(probe_accuracy(fr[layer], ff[layer]), 3) for layer in FEATURE_LAYERS}
        rows.append({"sigma": sigma, **acc})
        print(f"{sigma:<8g} " + "  ".join(f"{acc[layer]:>10.3f}" for layer in FEATURE_LAYERS), flush=True)
    if args.out is not None:
        write_json(args.out, {"model": args.model, "teacher": args.teacher, "num": n, "probe": rows}, indent=1)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
