"""Score a class-conditional MNIST model (the shipped pixel teacher or one of its students).

For each number of steps (or, with ``--sigmas``, each list of noise levels of a consistency student) it
draws ``--num`` images (seed ``--seed``, classes cycling 0-9) and reports: class accuracy (the shipped
MNIST classifier), the classifier Frechet distance to MNIST-5k (fast, CPU-friendly; not Inception
FID), the share of near-black pixels (MNIST-5k: 0.813; background
speckle lowers it), the share of faint pixels (3 to 32 of 255; MNIST-5k: 0.020; speckle and haze
raise it), and the variety within a class (the per-pixel standard deviation over the
samples of one class, averaged over pixels and classes; a student that draws one image per class
scores 0; MNIST-5k itself: see ``--real``). With ``--fid`` it also reports Inception FID of the same
images against MNIST-5k with precision and recall (k = 3; recall is the share of real digits
covered by the samples' feature manifold, so lost variety shows there). Inception runs at about 6
images/s on 2 CPU cores.

    python tools/eval_mnist.py --model builtin:mnist --steps 1 2 4 50 --num 1000 --fid --out work/teacher.json
    python tools/eval_mnist.py --model runs/mnist-sid --num 1000 --fid
    python tools/eval_mnist.py --real --num 1000        # the same numbers for 1,000 of the MNIST-5k digits
    python tools/eval_mnist.py --model runs/cd/checkpoints/step-0001500 --sigmas 80,2.73 80,21.7,2.73,0.286

``--black-below V`` adds, for every row, a second row of the same images with every pixel below V
(in [-1, 1]; -0.8 is 0.1 of the full scale) set to black: a diagnostic of how much of a score is
background speckle, not a way to sample.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor

from distilldiff.atomic import write_json
from distilldiff.metrics.background import faint_share, near_black_share
from distilldiff.metrics.classifier import class_accuracy, classifier_fd


def class_spread(images: Tensor, labels: Tensor) -> float:
    """Variety within a class: per-pixel std over each class's images ``[n, C, H, W]`` (in [-1, 1]),
    averaged over pixels and over the classes present."""
    spreads = [images[labels == c].std(0).mean() for c in labels.unique() if int((labels == c).sum()) > 1]
    return float(torch.stack(spreads).mean())


def score(images: Tensor, labels: Tensor, fid: bool) -> dict:
    """Every metric of the module docstring for ``images`` ``[N, 1, 28, 28]`` in [-1, 1] with class ``labels``."""
    out = {
        "num": len(images), "class_accuracy": class_accuracy(images, labels), "classifier_fd": classifier_fd(images),
        "near_black": near_black_share(images), "faint": faint_share(images), "class_spread": round(class_spread(images, labels), 4),
    }
    if fid:
        from distilldiff.metrics import InceptionFeatureExtractor, compute_fid

        t0 = time.time()
        r = compute_fid(images, len(images), "mnist5k", InceptionFeatureExtractor(), pr=True)
        out.update(fid=r.fid, precision=r.precision, recall=r.recall, fid_seconds=round(time.time() - t0, 1))
    return out


def black_below(images: Tensor, value: float) -> Tensor:
    """``images`` ``[N, C, H, W]`` in [-1, 1] with every pixel below ``value`` set to -1 (black)."""
    return torch.where(images < value, torch.full_like(images, -1.0), images)


def real_digits(num: int, seed: int) -> tuple[Tensor, Tensor]:
    """``num`` of the MNIST-5k digits (a seeded draw without replacement) and their labels."""
    from distilldiff.data import mnist5k

    images, labels = mnist5k()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
    return images[idx], labels[idx]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="a run folder, student folder, or teacher (builtin:mnist)")
    group.add_argument("--real", action="store_true", help="score MNIST-5k digits instead of a model")
    p.add_argument("--steps", type=int, nargs="+", default=[None],
                   help="teachers: DDIM steps (default 50); consistency students: sampling steps (default: their own)")
    p.add_argument("--sigmas", nargs="+", default=None, metavar="S1,S2,...",
                   help="multistep consistency students: one row per list of decreasing noise levels (instead of --steps)")
    p.add_argument("--w", type=float, default=None, help="teachers: classifier-free guidance; guided students: their input w")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid", action="store_true", help="also Inception FID, precision and recall against MNIST-5k")
    p.add_argument("--black-below", type=float, default=None, metavar="V",
                   help="also score the same images with pixels below V (in [-1, 1]) set to black (a speckle diagnostic)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if args.real and (args.sigmas is not None or args.steps != [None] or args.w is not None):
        p.error("--real scores the digits themselves: it takes no --steps, --sigmas or --w")
    if args.sigmas is not None and args.steps != [None]:
        p.error("give --steps or --sigmas, not both")
    try:
        plans = [(None, [float(v) for v in levels.split(",")]) for levels in args.sigmas] if args.sigmas else [(k, None) for k in args.steps]
    except ValueError:
        p.error(f"--sigmas: expected comma-separated numbers, got {' '.join(args.sigmas)}")
    rows = []
    print("| model | steps | class acc. | classifier FD | near-black | faint | class spread | FID | precision | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps, sigmas in ([(None, None)] if args.real else plans):
        if args.real:
            images, labels = real_digits(args.num, args.seed)
            row = {"model": "MNIST-5k", "steps": None, "seed": args.seed}
        else:
            from distilldiff.inference import load_sampler

            try:
                sampler = load_sampler(args.model, steps=steps, guidance_scale=args.w, device=args.device, sigmas=sigmas)
            except (FileNotFoundError, ValueError) as e:  # a missing folder, a step count the model cannot take
                p.error(str(e))
            t0 = time.time()
            images, labels = sampler.sample(args.num, seed=args.seed), torch.arange(args.num) % 10
            row = {"model": args.model, "sampler": sampler.description, "steps": sampler.num_steps, "sigmas": sigmas, "w": args.w,
                   "seed": args.seed, "sample_seconds": round(time.time() - t0, 2)}
        variants = [(row, images)]
        if args.black_below is not None:
            variants.append(({**row, "black_below": args.black_below}, black_below(images, args.black_below)))
        for row, imgs in variants:
            row.update(score(imgs, labels, args.fid))
            rows.append(row)
            fid = (f"{row['fid']:.2f} | {row['precision']:.3f} | {row['recall']:.3f}") if args.fid else "- | - | -"
            name = row["model"] + (f" (pixels < {row['black_below']:g} set to black)" if "black_below" in row else "")
            steps = row["steps"] if not row.get("sigmas") else f"{row['steps']} (sigma {', '.join(f'{v:g}' for v in row['sigmas'])})"
            print(f"| {name} | {steps} | {row['class_accuracy']:.3f} | {row['classifier_fd']:.2f} | {row['near_black']:.3f} | {row['faint']:.3f} | "
                  f"{row['class_spread']:.4f} | {fid} |", flush=True)
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
