"""FID against number of sampling steps: a teacher (DDIM K steps) and students, one table and plot.

Images come either from models sampled here, or from .npz files of uint8 images written by
`tools/gpu_samples.py` (e.g. on a GPU machine that has no Inception weights). Each entry's
result is stored as JSON in --out as soon as it is computed, so an interrupted run resumes
where it stopped; the table (Markdown) and plot (PNG) are rebuilt from all stored results.

    # sample here
    python tools/fid_vs_steps.py --teacher builtin:mnist --steps 1 2 4 8 16 50 \
        --student sid=runs/mnist-sid --num 5000 --out benchmarks/fid-vs-steps
    # or evaluate image sets made elsewhere (name=path.npz; teacher sets as teacher-<K>steps)
    python tools/fid_vs_steps.py --samples work/gpu-samples/*.npz --num 1000 --out benchmarks/fid-vs-steps
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from distilldiff.metrics import InceptionFeatureExtractor, compute_fid, load_reference


def _npz_source(path: Path):
    with np.load(path, allow_pickle=False) as z:
        images = torch.from_numpy(z["images"]).permute(0, 3, 1, 2).contiguous()  # uint8 [N, C, H, W]
        desc = str(z["description"]) if "description" in z.files else path.stem
    return images, desc


def entries(args) -> list[tuple[str, int | None, object, str]]:
    """(name, steps, image source, description) for every set to evaluate."""
    from distilldiff.inference import load_sampler

    out = []
    for p in args.samples or []:
        p = Path(p)
        images, desc = _npz_source(p)
        m = re.fullmatch(r"(.+)-(\d+)steps", p.stem)
        out.append((m.group(1) if m else p.stem, int(m.group(2)) if m else 1, images, desc))
    if args.teacher:
        for k in args.steps:
            s = load_sampler(args.teacher, steps=k)
            out.append(("teacher", k, s.batches(args.num, seed=args.seed, batch_size=args.batch_size), s.description))
    for spec in args.student or []:
        name, path = spec.rsplit("=", 1) if "=" in spec else (Path(spec).name, spec)
        s = load_sampler(path)
        out.append((name, s.num_steps, s.batches(args.num, seed=args.seed, batch_size=args.batch_size), s.description))
    return out


def write_report(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("result-*.json"))]
    if not results:
        return
    results.sort(key=lambda r: (r["name"] != "teacher", r["name"], r["steps"]))
    lines = ["| model | steps (NFE) | FID | N | reference | seconds (FID) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} ({r['description']}) | {r['steps']} | {r['fid']:.2f} | {r['num']} | {r['reference']} | {r['seconds']:.0f} |")
    weights = results[0]["weights"]
    lines += ["", f"Inception weights: {weights}. Machine: {results[0]['machine']}."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot_fid_vs_steps(results, out / "fid_vs_steps.png", f"FID (N={results[0]['num']})")


def plot_fid_vs_steps(results: list[dict], path: Path, ylabel: str) -> None:
    """FID against sampling steps: the teacher's DDIM as a line, each other name's entries as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted(dict.fromkeys(r["name"] for r in results), key=lambda n: n != "teacher"):
        rows = sorted((r for r in results if r["name"] == name), key=lambda r: r["steps"])
        teacher = name == "teacher"
        ax.plot([r["steps"] for r in rows], [r["fid"] for r in rows], "ko-" if teacher else "*--",
                markersize=8 if teacher else 11, label="teacher (DDIM)" if teacher else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps (NFE)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="*", help=".npz files of uint8 images (tools/gpu_samples.py)")
    p.add_argument("--teacher", help="teacher to sample with DDIM (folder, hub id or builtin:mnist)")
    p.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4, 8, 16, 50])
    p.add_argument("--student", nargs="*", help="NAME=DIR of a run or student folder")
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--ref", default="mnist5k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extractor = InceptionFeatureExtractor(device=args.device, batch_size=100)
    ref = load_reference(args.ref, extractor)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    for name, steps, source, desc in entries(args):
        path = out / f"result-{name}-{steps:03d}steps-N{args.num}.json"
        if path.is_file():
            print(f"{path.name}: done before, skipped")
            continue
        r = compute_fid(source, args.num, ref, extractor, batch_size=args.batch_size, model=desc)
        record = {"name": name, "steps": steps, "description": desc, "fid": r.fid, "num": r.num, "reference": args.ref,
                  "weights": r.weights, "seconds": r.seconds, "machine": machine, "date": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(record, indent=2))
        print(f"{name} {steps} steps: FID {r.fid:.3f} (N={r.num}, {r.seconds:.0f}s)")
        write_report(out)
    write_report(out)


if __name__ == "__main__":
    main()
