"""What a model's background looks like before clipping: the raw output's background pixels.

Draws ``--num`` images (seed 0, classes cycling 0-9) from each model and reports, over the background
pixels (raw output below -0.5): their quartiles, standard deviation, the share above the near-black level
(``NEAR_BLACK_LEVEL`` of 255, -1 + 16/255 = -0.937 in [-1, 1], on the raw value; ``near_black_share`` rounds to
8 bits first, which moves its cut to about -0.933), and
the correlation of each pixel with the input noise z at the same pixel (one-step students: is the speckle
leaked input noise?).

    python tools/background_stats.py --model benchmarks/main-job-cpu/student-fdistill-js
    python tools/background_stats.py --model builtin:mnist --steps 50
"""

from __future__ import annotations

import argparse

import torch

from distilldiff.metrics.background import NEAR_BLACK_LEVEL

#: NEAR_BLACK_LEVEL of 255 in [-1, 1]
NEAR_BLACK_LIMIT = -1 + 2 * NEAR_BLACK_LEVEL / 255


def background_stats(x: torch.Tensor, z: torch.Tensor) -> dict:
    """Statistics of the background pixels (``x < -0.5``) of raw outputs ``x`` and their input noise ``z`` (same shape)."""
    bg = x < -0.5
    xb, zb = x[bg].double(), z[bg].double()
    q = torch.quantile(xb.float(), torch.tensor([0.25, 0.5, 0.75])).tolist()
    return {"background_share": float(bg.double().mean()), "quartiles": [round(v, 4) for v in q], "std": round(float(xb.std()), 4),
            "above_near_black": round(float((xb > NEAR_BLACK_LIMIT).double().mean()), 4),
            "corr_with_z": round(float(torch.corrcoef(torch.stack([xb, zb]))[0, 1]), 4)}


def main() -> None:
    from distilldiff.inference import load_sampler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run, student or exported folder, or a teacher (builtin:mnist)")
    p.add_argument("--steps", type=int, default=None, help="teachers: DDIM steps (default 50); students: their own")
    p.add_argument("--num", type=int, default=200)
    args = p.parse_args()
    try:
        s = load_sampler(args.model, steps=args.steps, device="cpu")
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.num, *s.denoiser.sample_shape, generator=g)
    cond = s.denoiser.conditioning.grid(args.num, torch.device("cpu"), 0)
    print(f"{args.model} ({s.description}): {background_stats(s.draw(z, cond, g).float(), z)}", flush=True)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
