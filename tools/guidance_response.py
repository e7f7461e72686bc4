"""How a guidance-conditioned student responds to its input w, noise level by noise level.

Guidance distillation (Meng et al. 2023, stage 1) trains ``D_s(x, sigma, c, w)`` to match the
classifier-free-guided teacher ``D_w = D_c + w g`` with the guidance direction ``g = D_c - D_u``
(``D_c``, ``D_u``: the teacher with the class and with its null class). On real digits noised to
``x = x0 + sigma * n`` this measures, at each of the student's own noise levels and each w:

* ``w_eff``, the student's effective guidance weight: the projection of ``D_s - D_c`` on ``g``,
  ``sum <D_s - D_c, g> / sum |g|^2`` over the batch. A student that has learned w shows
  ``w_eff = w``; one that ignores its input shows the same ``w_eff`` in every column;
* ``err``: ``rms(D_s - D_w)`` per pixel (pixels in [-1, 1]), next to ``rms(w g)`` for scale.

A student whose samples at w = 0 look guided (BENCHMARKS 6, "The guided student responds to w")
shows ``w_eff > 0`` in the w = 0 column; the rows say at which noise levels. CPU: about a minute.

    python tools/guidance_response.py --model runs/mnist-guidance --w 0 1 2 3 4 --num 256
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from distilldiff.data import mnist5k
from distilldiff.export import load_student, student_folder
from distilldiff.teachers import load_teacher
from distilldiff.teachers.base import Denoiser
from distilldiff.tensors import append_dims


@torch.no_grad()
def guidance_response(student: Denoiser, teacher: Denoiser, x0: Tensor, cond: dict[str, Tensor], sigmas: list[float],
                      ws: list[float], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(w_eff, err, scale)``, each ``[len(sigmas), len(ws)]``, for clean ``x0`` ``[B, C, H, W]``.

    One noise draw per sigma, shared by every w. ``w_eff[i, j]`` is the student's guidance weight
    at ``sigmas[i]`` when given ``ws[j]`` (defined above); ``err`` is ``rms(D_s - D_w)`` and
    ``scale`` is ``rms(w g)``.
    """
    null = teacher.conditioning.null(x0.shape[0], x0.device)
    w_eff, err, scale = (torch.zeros(len(sigmas), len(ws), dtype=torch.float64) for _ in range(3))
    for i, s in enumerate(sigmas):
        sigma = torch.full((x0.shape[0],), s, dtype=x0.dtype)
        x = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        d_c = teacher(x, sigma=sigma, **cond).double()
        g = d_c - teacher(x, sigma=sigma, **null).double()
        for j, w in enumerate(ws):
            d_s = student(x, sigma=sigma, guidance_scale=torch.full_like(sigma, w), **cond).double()
            w_eff[i, j] = ((d_s - d_c) * g).sum() / g.pow(2).sum()
            err[i, j] = (d_s - d_c - w * g).pow(2).mean().sqrt()
            scale[i, j] = (w * g).pow(2).mean().sqrt()
    return w_eff, err, scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder or student folder of a guidance-conditioned student")
    p.add_argument("--teacher", default="builtin:mnist", help="the unguided teacher it was distilled from")
    p.add_argument("--w", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 4.0], help="guidance weights to give the student")
    p.add_argument("--num", type=int, default=256, help="real digits (a random subset of MNIST-5k)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    folder = student_folder(args.model)
    try:
        student, meta = load_student(folder)
        teacher = load_teacher(args.teacher, what="--teacher").eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if meta.get("guidance_scale") is None:
        raise SystemExit(f"error: {folder}: this student has no guidance input (w)")
    if teacher.num_classes is None:
        raise SystemExit(f"error: {args.teacher}: a class-conditional teacher is needed")
    den = student.denoiser.eval().requires_grad_(False)
    images, labels = mnist5k()
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))[: args.num]
    x0, cond = images[idx], {"class_labels": labels[idx]}
    sigmas = [float(s) for s in student.sigmas]
    w_eff, err, scale = guidance_response(den, teacher, x0, cond, sigmas, args.w, torch.Generator().manual_seed(args.seed))

    print(f"student {args.model} against {args.teacher}; {args.num} MNIST-5k digits, seed {args.seed}\n")
    head = " | ".join(f"w = {w:g}" for w in args.w)
    print("cells: w_eff (err / scale): the student's effective guidance weight, err = rms(D_s - D_w) and scale = rms(w g) per pixel\n")
    print(f"| sigma | {head} |")
    print("|---|" + "---|" * len(args.w))
    for i, s in enumerate(sigmas):
        cells = " | ".join(f"{w_eff[i, j]:.2f} ({err[i, j]:.3f} / {scale[i, j]:.3f})" for j in range(len(args.w)))
        print(f"| {s:.4g} | {cells} |")


if __name__ == "__main__":
    main()
