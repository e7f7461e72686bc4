"""Held-out regression error of one-step students: how far each student's map from noise to image lies from
its teacher's deterministic (DDIM) sample, on pairs it never trained on.

DMD's regression loss (Yin et al. 2024, sec. 3.3) fits ``G(z)`` to the teacher's sample ``y(z)`` on a fixed set of
pairs made with seed 0 (:func:`distilldiff.objectives.pairs.teacher_pairs`). This script makes ``--num`` fresh pairs
with another seed (default 1) and reports, per student, the mean over pairs and pixels of ``(G(z) - y(z))^2`` (the
quantity the loss logs as ``generator/reg_loss`` on its own pairs), with its standard error over pairs.

    python tools/regression_error.py --num 512 --out errors.json \\
        full=benchmarks/main-job-cpu/student-fdistill-js-reg025 none=benchmarks/main-job-cpu/student-fdistill-js-clip
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from distilldiff.atomic import write_json
from distilldiff.export import load_student, student_folder
from distilldiff.objectives.pairs import teacher_pairs
from distilldiff.teachers import load_teacher


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="[NAME=]FOLDER", help="one-step students (student or run folders)")
    p.add_argument("--teacher", default="builtin:mnist")
    p.add_argument("--num", type=int, default=512, help="fresh pairs")
    p.add_argument("--steps", type=int, default=50, help="the teacher's DDIM steps (the loss's default: 50)")
    p.add_argument("--seed", type=int, default=1, help="the pairs' seed (training pairs use 0)")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    students = []
    for spec in args.models:  # every folder checked before the teacher spends time on the pairs
        name, folder = spec.rsplit("=", 1) if "=" in spec else (Path(spec).name, spec)  # as tools/fid_vs_steps.py
        try:
            student = load_student(student_folder(folder))[0]
        except (FileNotFoundError, ValueError) as e:
            sys.exit(str(e))
        if len(student.sigmas) != 1:  # a few-step student re-noises between steps: no deterministic map to compare
            sys.exit(f"{folder}: a {len(student.sigmas)}-step student; the regression error is defined for one-step students")
        students.append((name, folder, student))
    pairs = teacher_pairs(load_teacher(args.teacher), args.num, args.steps, "cpu", seed=args.seed)
    rows = []
    for name, folder, student in students:
        per_pair = ((student(pairs.noise, **pairs.cond) - pairs.target) ** 2).flatten(1).mean(1)
        row = {"name": name, "model": folder, "num": args.num, "steps": args.steps, "seed": args.seed,
               "mse": per_pair.mean().item(), "stderr": (per_pair.std() / args.num ** 0.5).item()}
        rows.append(row)
        print(f"{name}: {row['mse']:.4f} +- {row['stderr']:.4f}", flush=True)
    if args.out:
        write_json(args.out, rows)


if __name__ == "__main__":
    main()
