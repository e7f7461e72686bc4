"""FID (or any metric of ``eval:``) against training time or images seen, from run folders' ``eval.jsonl``.

A run trained with ``--set eval.every=N`` (see the ``eval`` section of a distill config) logs
the EMA student's metrics every N steps with the training seconds and images seen so far; this
tool plots them (one curve per run; staged runs such as progressive distillation are one curve
through their stages, each stage's time and images added to the earlier ones) and writes a
Markdown table. ``--x kimg`` puts thousands of images seen on the x axis (``METRIC_vs_kimg.*``);
``--hline LABEL=VALUE`` draws a reference level, such as the teacher's FID.

    python tools/fid_vs_time.py runs/bench/sid runs/bench/dmd runs/bench/progressive --metric fid --out benchmarks/objectives
    python tools/fid_vs_time.py fd-s0=runs/s0/fdistill-js fd-s1=runs/s1/fdistill-js --x kimg --hline "teacher, 50 steps=5.76" --out OUT
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


#: per x axis: its unit in the table, the output files' suffix (METRIC_vs_SUFFIX.md/.png) and the axis label
X_AXES = {"minutes": ("min", "time", "training time (min)"), "kimg": ("kimg", "kimg", "images seen (thousands)")}


def load_curve(run: Path) -> list[dict]:
    """Evaluations of ``run`` in training order, with ``minutes`` of training time and ``kimg``
    (thousands of images seen), both summed over stages."""
    logs = [run / "eval.jsonl"] if (run / "eval.jsonl").is_file() else []
    # stages run from the most steps to the fewest: stage-0008, stage-0004, ...
    logs += [p / "eval.jsonl" for p in sorted(run.glob("stage-*"), key=lambda p: -int(p.name.split("-")[1])) if (p / "eval.jsonl").is_file()]
    if not logs:
        raise FileNotFoundError(f"{run}: no eval.jsonl (train with --set eval.every=N)")
    curve, offset, offset_nimg = [], 0.0, 0
    for log in logs:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for r in rows:
            curve.append({**r, "minutes": (offset + r["train_seconds"]) / 60, "kimg": (offset_nimg + r["nimg"]) / 1000,
                          "stage": log.parent.name if log.parent != run else ""})
        if rows:
            offset += rows[-1]["train_seconds"]
            offset_nimg += rows[-1]["nimg"]
    return curve


def parse_hline(spec: str) -> tuple[str, float]:
    """``LABEL=VALUE`` -> (label, value), with a one-line error for anything else."""
    label, _, value = spec.rpartition("=")
    try:
        return label, float(value)
    except ValueError:
        raise SystemExit(f"--hline {spec!r}: expected LABEL=NUMBER") from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (NAME=DIR to name a curve)")
    p.add_argument("--metric", default="fid")
    p.add_argument("--out", required=True)
    p.add_argument("--x", choices=sorted(X_AXES), default="minutes", help="x axis: training minutes or thousands of images seen")
    p.add_argument("--hline", action="append", default=[], metavar="LABEL=VALUE", help="a reference level (repeatable)")
    p.add_argument("--title", default="")
    args = p.parse_args()
    hlines = [parse_hline(h) for h in args.hline]
    x = args.x
    unit, suffix, x_label = X_AXES[x]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for spec in args.runs:
        name, path = spec.rsplit("=", 1) if "=" in spec else (Path(spec).name, spec)
        try:
            curve = [r for r in load_curve(Path(path)) if args.metric in r]
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        if not curve:
            raise SystemExit(f"{path}: eval.jsonl has no metric {args.metric!r}")
        curves[name] = curve

    kind = re.sub(r"_\d+steps$", "", args.metric)  # eval.steps records METRIC_Ksteps
    lines = [f"| run | evaluations | first ({args.metric} at {unit}) | best ({args.metric} at {unit}) | last ({args.metric} at {unit}) |",
             "|---|---|---|---|---|"]
    for name, c in curves.items():
        best = min(c, key=lambda r: r[args.metric]) if kind != "class_accuracy" else max(c, key=lambda r: r[args.metric])
        fmt = lambda r: f"{r[args.metric]:.3g} at {r[x]:.1f}"  # noqa: E731
        lines.append(f"| {name} | {len(c)} | {fmt(c[0])} | {fmt(best)} | {fmt(c[-1])} |")
    num = next(iter(curves.values()))[0].get("num")
    stem = f"{args.metric}_vs_{suffix}"
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        ax.plot([r[x] for r in c], [r[args.metric] for r in c], ".-", label=name)
    for i, (label, value) in enumerate(hlines):
        ax.axhline(value, color="k", ls=["--", ":", "-."][i % 3], lw=1, label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(args.metric + (f" (N={num})" if num else ""))
    if kind in ("fid", "classifier_fd"):
        ax.set_yscale("log")
    ax.set_title(args.title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
