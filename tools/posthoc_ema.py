"""Re-average a finished run's student after training: an EMA of another half-life, or the raw weights.

The engine keeps one EMA of the student (``train.ema_halflife_kimg``, ``train.ema_rampup``). This tool
replays the same recursion (:func:`distilldiff.engine.ema_beta`, EDM's half-life in images, Karras et
al. 2022, App. F.3) over the raw student weights stored in the run's kept checkpoints, with any
half-life, and writes the result as a student folder that ``distilldiff sample``/``fid``/``export``
and ``tools/eval_mnist.py`` read. It is the simple form of the post-hoc EMA of Karras et al. 2024
("Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3), which reconstructs
averages from stored snapshots; ours assumes the weights constant between two kept checkpoints, so
it is exact only for a checkpoint at every update and needs snapshots several times denser than the
half-life (train with ``train.checkpoint_every`` small and ``train.keep_checkpoints`` large).
The average starts at the oldest kept checkpoint. ``--halflife-kimg 0`` gives the raw weights of
the newest checkpoint.

    distilldiff distill --config configs/mnist/sid.yaml --set train.checkpoint_every=20 --set train.keep_checkpoints=31 --output-dir runs/snap
    python tools/posthoc_ema.py runs/snap --halflife-kimg 8 --out runs/snap-ema8
    python tools/posthoc_ema.py runs/snap --halflife-kimg 0 --out runs/snap-raw
    python tools/eval_mnist.py --model runs/snap-ema8 --num 1000

Runs whose checkpoints hold the student's raw weights in one model file with the EMA's keys are
supported (one-stage objectives, full students; not LoRA students or progressive stages).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from distilldiff.atomic import replace_folder
from distilldiff.engine import RunFolder, ema_beta
from distilldiff.export import STUDENT_INFO_FILE, check_destination, load_student, run_info, save_student


def raw_weights_file(checkpoint: Path) -> Path:
    """The checkpoint's model file that holds the student's raw weights: the one with ``ema.safetensors``'s keys."""
    with safe_open(checkpoint / "ema.safetensors", "pt") as f:
        ema_keys = set(f.keys())
    for path in sorted(checkpoint.glob("model*.safetensors")):
        with safe_open(path, "pt") as f:
            if set(f.keys()) == ema_keys:
                return path
    raise ValueError(f"{checkpoint}: no model file holds the student's raw weights (the keys of ema.safetensors)")


def snapshots(run: Path) -> list[tuple[int, int, Path]]:
    """``(step, images seen, raw weights file)`` of every complete checkpoint of ``run``, oldest first."""
    folder = RunFolder(run)
    out = []
    for ckpt in folder.complete_checkpoints():
        state = folder.read_state(ckpt)
        out.append((int(state["step"]), int(state["nimg"]), raw_weights_file(ckpt)))
    if not out:
        raise FileNotFoundError(f"{run}: no complete checkpoint (checkpoints/step-*)")
    return out


def replay_ema(snaps: list[tuple[int, int, Path]], halflife_kimg: float, rampup: float | None) -> dict[str, Tensor]:
    """The EMA after the newest snapshot, in float64, started at the oldest one; between two snapshots the
    weights are taken as those of the later one, so ``k`` updates at once decay the average by the product
    of their betas."""
    def load(path: Path) -> dict[str, Tensor]:
        return {k: v.double() if v.is_floating_point() else v for k, v in load_file(path).items()}

    avg = load(snaps[0][2])
    for (step0, nimg0, _), (step, nimg, path) in zip(snaps, snaps[1:]):
        if step <= step0 or nimg <= nimg0:
            raise ValueError(f"{path.parent}: checkpoints out of order (step {step0} then {step})")
        batch = (nimg - nimg0) / (step - step0)
        keep = math.prod(ema_beta(nimg0 + i * batch, batch, halflife_kimg, rampup) for i in range(1, step - step0 + 1))
        for key, value in load(path).items():
            if avg[key].is_floating_point():
                avg[key].mul_(keep).add_(value, alpha=1 - keep)
            else:
                avg[key] = value
    return avg


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder with checkpoints/ and student/")
    p.add_argument("--halflife-kimg", type=float, required=True, help="the EMA half-life in thousands of images (0: raw weights)")
    p.add_argument("--rampup", type=float, default=None,
                   help="cap the half-life at RAMPUP x images seen, as train.ema_rampup (default: the run's own)")
    p.add_argument("--out", required=True, help="the new student folder (must not exist)")
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    if args.halflife_kimg < 0:
        p.error(f"--halflife-kimg must be >= 0, got {args.halflife_kimg}")
    if out.exists():
        p.error(f"{out}: exists (choose another --out; nothing is overwritten)")
    if not (run / "student" / STUDENT_INFO_FILE).is_file():
        p.error(f"{run}: not a run folder with a student (no student/{STUDENT_INFO_FILE})")
    rampup = args.rampup
    try:
        check_destination(out, run, run / "student")
        if rampup is None:
            from distilldiff.config import DistillConfig, load_config

            rampup = load_config(DistillConfig, str(RunFolder(run).config_file), []).train.ema_rampup
        snaps = snapshots(run)
        average = replay_ema(snaps, args.halflife_kimg, rampup)
        student, meta = load_student(run / "student")
        state = student.state_dict()
        if set(state) != set(average):
            raise ValueError(f"{snaps[-1][2]}: its keys are not the student folder's (LoRA or staged students are not supported)")
        student.load_state_dict({k: v.to(state[k].dtype) for k, v in average.items()})
    except (FileNotFoundError, ValueError) as e:  # ValueError includes a bad config.yaml (ConfigError)
        p.error(str(e))
    info = run_info(meta)
    info.update(step=snaps[-1][0], images_seen=snaps[-1][1],
                posthoc_ema={"halflife_kimg": args.halflife_kimg, "rampup": rampup, "run": str(run),
                             "checkpoints": len(snaps), "first_step": snaps[0][0], "last_step": snaps[-1][0]})
    replace_folder(out, lambda folder: save_student(student, folder, info))
    print(f"{out}: EMA of half-life {args.halflife_kimg:g} kimg (rampup {rampup}) over {len(snaps)} checkpoints, "
          f"steps {snaps[0][0]}-{snaps[-1][0]}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
