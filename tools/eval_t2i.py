"""Score a text-to-image model of digits (the mini teacher or one of its students) on evaluation prompts.

For each number of steps and guidance weight w it draws one image per prompt of
``distilldiff/assets/mnist-t2i/captions-eval.txt`` (the first ``--num``; seed ``--seed``) and reports:
prompt accuracy (the shipped MNIST classifier's accuracy on the digit each prompt names), the
attribute agreement of thickness, slant and size (chance: about 1/3), the classifier Frechet
distance to MNIST-5k (fast, CPU-friendly; not Inception FID), the share of near-black pixels, and the
variety within a prompt (the per-pixel standard deviation of 8 samples of one prompt, averaged over
the first 20 prompts: a student that draws one image per prompt scores 0).
With ``--fid N`` it also reports Inception FID-N against MNIST-5k of images drawn for the first N
*training* captions (``captions-train.txt``: the reference digits' own captions, so a model that
follows its prompts is scored against the distribution those prompts describe; about 15 minutes
per 5,000 images on 2 CPU cores).
Teachers sample with deterministic DDIM ("trailing" timesteps) and classifier-free guidance w
(diffusers' guidance_scale 1 + w); students with their own steps and guidance, or with ``--steps``
(consistency students) and ``--w`` (students with a guidance input) where they take them.

    python tools/eval_t2i.py --model runs/mnist-t2i-teacher/student --steps 1 2 4 50 --w 0 1 2 --num 1000 \
        --out benchmarks/mnist-t2i-teacher/eval.json
    python tools/eval_t2i.py --model distilldiff/assets/mnist-t2i-teacher --steps 50 --w 1 --num 500 --fid 5000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from distilldiff.atomic import write_json
from distilldiff.captions import CAPTION_ASSETS
from distilldiff.inference import load_sampler
from distilldiff.metrics.background import grid_stats
from distilldiff.metrics.classifier import classifier_fd
from distilldiff.samplers import base_denoiser
from distilldiff.metrics.prompts import attribute_agreement, digit_images, prompt_accuracy
from distilldiff.teachers.text import read_prompts

#: variety within a prompt: samples per prompt, and how many of the first prompts
SPREAD_SAMPLES, SPREAD_PROMPTS = 8, 20


def inception_fid(sampler, num: int, seed: int, device: str) -> dict:
    """Inception FID-``num`` against MNIST-5k of images for the first ``num`` training captions."""
    from distilldiff.metrics import InceptionFeatureExtractor, compute_fid

    base_denoiser(sampler.denoiser).set_prompts(read_prompts(str(CAPTION_ASSETS / "captions-train.txt"))[:num])
    t0 = time.time()
    result = compute_fid(sampler.batches(num, seed=seed, batch_size=250), num, "mnist5k", InceptionFeatureExtractor(device=device))
    return {"fid": round(result.fid, 4), "fid_num": num, "fid_prompts": "captions-train.txt", "fid_seconds": round(time.time() - t0, 1)}


def same_prompt_spread(sampler, prompts: list[str], per_prompt: int, seed: int) -> float:
    """Variety within a prompt: the per-pixel standard deviation over ``per_prompt`` samples of one
    prompt, averaged over pixels and ``prompts`` (images in [-1, 1]; 0: every sample alike)."""
    spreads = [sampler.sample(per_prompt, seed=seed + i, prompt=p).std(0).mean() for i, p in enumerate(prompts)]
    return float(torch.stack(spreads).mean())


def open_model(model: str, steps: int | None, w: float | None, device: str, student: bool):
    """The sampler of ``model`` (teachers: w = 0 is no guidance; students: w is their guidance input,
    None their default)."""
    return load_sampler(model, steps=steps, guidance_scale=w if student else (w or None), device=device)


def evaluate(sampler, model: str, w: float | None, prompts: list[str], seed: int, device: str, fid: int = 0) -> dict:
    """Every metric of the module docstring for ``sampler`` (opened by :func:`open_model`)."""
    base_denoiser(sampler.denoiser).set_prompts(prompts)  # grids cycle through the prompts in order: image i shows prompt i
    t0 = time.time()
    images = sampler.sample(len(prompts), seed=seed)
    seconds = time.time() - t0
    spread = same_prompt_spread(sampler, prompts[:SPREAD_PROMPTS], SPREAD_SAMPLES, seed)
    extra = inception_fid(sampler, fid, seed, device) if fid else {}
    return {
        "model": model, "sampler": sampler.description, "steps": sampler.num_steps, "w": w, "num": len(prompts), "seed": seed,
        "prompt_accuracy": prompt_accuracy(images, prompts), **{f"agree_{k}": v for k, v in attribute_agreement(images, prompts).items()},
        "classifier_fd": classifier_fd(digit_images(images)), "near_black": grid_stats(images)["near_black"],
        "same_prompt_spread": round(spread, 4), "sample_seconds": round(seconds, 2), **extra,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a text-to-image teacher folder, or a student / run folder")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="teachers: DDIM steps (default 50); consistency students: sampling steps (default: their own)")
    p.add_argument("--w", type=float, nargs="+", default=None,
                   help="teachers: classifier-free guidance weights (default 0); students with a guidance input: their w "
                        "(default: their own)")
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", default=str(CAPTION_ASSETS / "captions-eval.txt"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--fid", type=int, default=0, metavar="N", help="also Inception FID-N against MNIST-5k (training captions)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    prompts = read_prompts(args.prompts)[: args.num]
    folder = Path(args.model)
    student = (folder / "distilldiff_student.json").is_file() or (folder / "student" / "distilldiff_student.json").is_file()
    args.steps = args.steps or ([None] if student else [50])  # a student samples with its own steps unless told
    args.w = args.w or ([None] if student else [0.0])
    rows = []
    print("| steps | w | prompt acc. | thickness | slant | size | classifier FD | same-prompt spread | near-black | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for w in args.w:
            try:
                sampler = open_model(args.model, steps, w, args.device, student)
            except (FileNotFoundError, ValueError) as e:  # a missing folder, a step count or w the model cannot take
                p.error(str(e))
            r = evaluate(sampler, args.model, w, prompts, args.seed, args.device, args.fid)
            rows.append(r)
            print(f"| {r['steps']} | {'own' if w is None else f'{w:g}'} | {r['prompt_accuracy']:.3f} | {r['agree_thickness']:.3f} | {r['agree_slant']:.3f} | "
                  f"{r['agree_size']:.3f} | {r['classifier_fd']:.2f} | {r['same_prompt_spread']:.4f} | {r['near_black']:.3f} | {r['sample_seconds']:.0f} |"
                  + (f" FID-{r['fid_num']} {r['fid']:.2f}" if "fid" in r else ""), flush=True)
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
