"""Draw N samples from teachers (DDIM K steps) and students and save them as uint8 .npz files.

Used to generate image sets on a GPU machine that has no Inception weights; FID is then
computed anywhere with `python tools/fid_of_samples.py`.

    python tools/gpu_samples.py --model builtin:mnist --steps 1 2 4 8 16 50 --num 5000 --out DIR
    python tools/gpu_samples.py --model runs/mnist-sid --num 5000 --out DIR --name sid
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from distilldiff.images import to_uint8
from distilldiff.inference import load_sampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--steps", type=int, nargs="*", default=[None])
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--name", default="teacher")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for steps in args.steps:
        sampler = load_sampler(args.model, steps=steps)
        t0 = time.time()
        images = sampler.sample(args.num, seed=args.seed, batch_size=args.batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.time() - t0
        name = f"{args.name}-{steps}steps" if steps else args.name
        np.savez_compressed(out / f"{name}.npz", images=to_uint8(images), seconds=secs, description=sampler.description)
        print(f"{name}: {args.num} images in {secs:.1f}s ({sampler.description})")


if __name__ == "__main__":
    main()
