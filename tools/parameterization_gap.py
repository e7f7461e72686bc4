"""How far a re-parameterised copy of a teacher starts from it: ``student.parameterization`` on MNIST.

For each output parameterisation (``epsilon``, ``v_prediction``, ``sample``) this builds the
student's starting denoiser exactly as the objectives do (``distilldiff.students.reparameterized_copy``:
the teacher's weights, the output re-interpreted) and measures ``start_gap``: the rms, per pixel,
of ``D_student(x, sigma) - D_teacher(x, sigma)`` on real digits noised to ``x = x0 + sigma * n``,
at the noise levels of 1-, 2- and 4-step "trailing" DDIM grids of the teacher's schedule (the
levels a few-step progressive student, and a one-step generator at t = 999, are evaluated at).

For scale it also prints the teacher's own x0 error ``rms(D_teacher(x, sigma) - x0)`` and that of
a guess that ignores the input (the mean digit of the true class). Prints a Markdown table; CPU
takes about a minute for 500 digits.

    python tools/parameterization_gap.py --teacher builtin:mnist --num 500 --seed 0
"""

from __future__ import annotations

import argparse

import torch

from distilldiff.data import mnist5k
from distilldiff.students import reparameterized_copy, start_gap
from distilldiff.teachers import VPDenoiser, ddim_timesteps, load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="builtin:mnist", help="a DDPM-family diffusers teacher")
    p.add_argument("--num", type=int, default=500, help="real digits (a random subset of MNIST-5k)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="trailing DDIM grids whose levels are measured")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    teacher = load_teacher(args.teacher).eval().requires_grad_(False)
    if not isinstance(teacher, VPDenoiser):
        raise SystemExit(f"{args.teacher}: a VP (diffusers) teacher is needed")
    images, labels = mnist5k()
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(images.shape[0], generator=g)[: args.num]
    x0, y = images[idx], labels[idx]
    cond = {"class_labels": y} if teacher.num_classes is not None else {}
    class_means = torch.stack([images[labels == c].mean(0) for c in range(int(labels.max()) + 1)])

    timesteps = sorted({t for k in args.steps for t in ddim_timesteps(teacher.num_train_timesteps, k, "trailing")}, reverse=True)
    sigmas = [float(teacher.schedule.sigmas[t]) for t in timesteps]
    gaps = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        student = reparameterized_copy(teacher, kind).eval()
        gaps[kind] = start_gap(teacher, student, sigmas, x0, cond, generator=torch.Generator().manual_seed(args.seed))
    own = start_gap(_Target(x0), teacher, sigmas, x0, cond, generator=torch.Generator().manual_seed(args.seed))
    guess = float((class_means[y] - x0).pow(2).mean().sqrt())

    print(f"teacher {args.teacher} (prediction_type {teacher.prediction_type}), {args.num} MNIST-5k digits, seed {args.seed}; "
          f"rms per pixel (pixels in [-1, 1])\n")
    print("| timestep | sigma | in grids | gap epsilon | gap v_prediction | gap sample | teacher x0 error | class-mean guess |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (t, s) in enumerate(zip(timesteps, sigmas)):
        grids = ", ".join(str(k) for k in args.steps if t in ddim_timesteps(teacher.num_train_timesteps, k, "trailing"))
        row = " | ".join(f"{float(gaps[k][i]):.3g}" for k in gaps)
        print(f"| {t} | {s:.4g} | {grids} | {row} | {float(own[i]):.3g} | {guess:.3g} |")


class _Target(torch.nn.Module):
    """A "denoiser" that returns the clean batch itself, so ``start_gap(_Target(x0), D, ...)`` is D's x0 error."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma, **cond):
        return self.x0


if __name__ == "__main__":
    main()
