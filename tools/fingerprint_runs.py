"""Fingerprint short fixed-seed runs of every shipped config, to prove a refactor changed no behaviour.

``record`` runs each config in ``configs/mnist/`` for a few updates on the CPU (its own seed,
a tiny batch, through the command line exactly as a user would) and writes a SHA-256 of every
tensor the final checkpoint holds: the trained networks, their optimizer states, the EMA
student, target networks and the exported student folder. ``compare`` diffs two such files.

    python tools/fingerprint_runs.py record --out work/fp-before.json
    # ... change the code ...
    python tools/fingerprint_runs.py record --out work/fp-after.json
    python tools/fingerprint_runs.py compare work/fp-before.json work/fp-after.json

Runs go to ``--work`` (default ``work/fingerprint``, git-ignored); about 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

#: config -> extra overrides (guidance stage 2 distils the stage-1 run made just before it)
CONFIGS = {
    "teacher": [],
    "sid": [], "dmd": [], "dmd2": [], "fdistill": [],
    "consistency": [], "lcm": [], "progressive": [],
    "guidance": [], "guidance_stage2": ["teacher.path={work}/guidance"],
}
TINY = ["train.batch_size=2", "train.num_sample_images=4", "train.max_steps=3", "train.checkpoint_every=100"]


def _digest(t) -> str:
    import torch

    t = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256(str(t.dtype).encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _tensors(obj, prefix: str, out: dict) -> None:
    import torch

    if torch.is_tensor(obj):
        out[prefix] = _digest(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _tensors(v, f"{prefix}.{k}", out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _tensors(v, f"{prefix}[{i}]", out)


def fingerprint(run: Path) -> dict[str, str]:
    """Digests of every tensor in the run's newest checkpoint(s) and its student folder."""
    import torch
    from safetensors.torch import load_file

    out: dict[str, str] = {}
    ckpts = sorted(run.glob("checkpoints/step-*")) + sorted(run.glob("stage-*/checkpoints/step-*"))
    by_stage: dict[Path, Path] = {}
    for c in ckpts:  # newest checkpoint of every stage
        by_stage[c.parent.parent] = max(c, by_stage.get(c.parent.parent, c))
    folders = list(by_stage.values()) + [run / "student"]
    for folder in folders:
        for f in sorted(folder.rglob("*")):
            rel = str(f.relative_to(run))
            if f.suffix == ".safetensors":
                _tensors(load_file(str(f)), rel, out)
            elif f.suffix == ".bin" and "optimizer" in f.name:
                _tensors(torch.load(str(f), map_location="cpu", weights_only=True)["state"], rel, out)
    return out


def record(args) -> None:
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    result = {}
    for name, extra in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        cmd = ["teacher", "train"] if name == "teacher" else ["distill"]
        sets = [s.format(work=work) for s in TINY + extra]
        argv = [sys.executable, "-m", "distilldiff.cli", *cmd, "--config", f"configs/mnist/{name}.yaml", "--output-dir", str(work / name)]
        for s in sets:
            argv += ["--set", s]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name}: exit {r.returncode}\n{r.stderr[-2000:]}")
        result[name] = fingerprint(work / name)
        print(f"{name}: {len(result[name])} tensors", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))


def compare(args) -> None:
    a, b = json.loads(Path(args.a).read_text()), json.loads(Path(args.b).read_text())
    bad = 0
    for name in sorted(set(a) | set(b)):
        fa, fb = a.get(name, {}), b.get(name, {})
        diff = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))
        print(f"{name}: {len(fa)} / {len(fb)} tensors, {'identical' if not diff else f'{len(diff)} differ'}")
        for k in diff[:10]:
            print(f"    {k}: {fa.get(k)} -> {fb.get(k)}")
        bad += bool(diff)
    sys.exit(1 if bad else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", required=True)
    r.add_argument("--work", default="work/fingerprint")
    r.add_argument("--only", nargs="*", help="config names (default: all)")
    r.set_defaults(func=record)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.set_defaults(func=compare)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
