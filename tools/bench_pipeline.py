"""Throughput of an exported student pipeline: overhead over the bare network, speed-up over the teacher.

Loads an exported student folder with distilldiff's ``DistillDiffPipeline`` (or diffusers'
``DDIMPipeline``), then times, on the same device and batch size:

1. the bare forward pass of the student's network on a ready batch (the floor);
2. the exported pipeline's ``__call__`` (noise, conditioning, network, conversion, [0, 1] output);
3. the teacher's 50-step DDIM pipeline (diffusers ``DDIMPipeline`` built from the teacher folder;
   for a class-conditional teacher, distilldiff's 50-step DDIM sampler, which makes the same 50
   network calls).

Each figure is the median of ``--repeats`` timed calls after one warm-up call. Prints a Markdown table.

    python tools/bench_pipeline.py --student runs/mnist-sid-export --teacher builtin:mnist --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="exported student folder")
    p.add_argument("--teacher", default="builtin:mnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--teacher-repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    from distilldiff.pipelines import DistillDiffPipeline
    from distilldiff.inference import load_sampler

    folder = Path(args.student)
    index = json.loads((folder / "model_index.json").read_text())
    if index["_class_name"] == "DDIMPipeline":
        from diffusers import DDIMPipeline

        pipe = DDIMPipeline.from_pretrained(str(folder), use_safetensors=True).to(args.device)
        steps = len(json.loads((folder / "distilldiff_student.json").read_text())["sigmas"])
        call = lambda: pipe(batch_size=args.batch, num_inference_steps=steps, output_type="pt")  # noqa: E731
        unet = pipe.unet
    else:
        pipe = DistillDiffPipeline.from_pretrained(str(folder)).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        steps = pipe.num_steps
        call = lambda: pipe(batch_size=args.batch, output_type="pt")  # noqa: E731
        unet = pipe.unet

    cond = {}
    size = pipe.unet.config.sample_size if hasattr(pipe.unet.config, "sample_size") else pipe.unet.unet.config.sample_size
    channels = getattr(pipe.unet.config, "in_channels", None) or pipe.unet.unet.config.in_channels
    x = torch.randn(args.batch, channels, size, size, device=args.device)
    t = torch.full((args.batch,), 500.0, device=args.device)
    if getattr(pipe.config, "num_classes", None) is not None:
        cond["class_labels"] = torch.arange(args.batch, device=args.device) % pipe.config.num_classes
    if getattr(pipe.config, "guidance_scale", None) is not None:
        cond["guidance_scale"] = torch.full((args.batch,), float(pipe.config.guidance_scale), device=args.device)

    with torch.no_grad():
        t_bare = timed(lambda: [unet(x, t, **cond) for _ in range(steps)], args.repeats)
    t_pipe = timed(call, args.repeats)

    teacher = load_sampler(args.teacher, steps=50, device=args.device)
    t_teacher = timed(lambda: teacher.sample(args.batch, batch_size=args.batch), args.teacher_repeats)

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev}; batch {args.batch}; median of {args.repeats} calls (teacher: {args.teacher_repeats})\n")
    print("| what | s per batch | images/s | relative |")
    print("|---|---:|---:|---:|")
    print(f"| bare network forward x{steps} | {t_bare:.4f} | {args.batch / t_bare:.1f} | 1.00 |")
    print(f"| exported pipeline ({type(pipe).__name__}, {steps} step(s)) | {t_pipe:.4f} | {args.batch / t_pipe:.1f} | "
          f"overhead {100 * (t_pipe / t_bare - 1):+.1f}% |")
    print(f"| teacher, 50-step DDIM | {t_teacher:.4f} | {args.batch / t_teacher:.1f} | "
          f"student is {t_teacher / t_pipe:.1f}x faster |")


if __name__ == "__main__":
    main()
