"""What the teacher's score and a run's discriminator head see of a model's faint background, by noise level.

``--num`` samples of ``--model`` (noise seed 0, classes cycling 0-9) and as many MNIST-5k digits are noised at each
``--sigmas`` level (fixed noise) and measured three ways (BENCHMARKS.md section 2, "A discriminator that sees the
speckle"):

- ``denoised_faint``: the faint share (:func:`distilldiff.metrics.background.faint_share`) of the teacher's
  ``D(x + sigma n, sigma)`` on the samples (``sample_faint`` before). Where it stays at ``sample_faint`` the
  teacher's score does not see the faint pixels at that level, so neither does the distribution-matching gradient.
- with ``--run`` (an f-distill or SiD(A) run whose fake score has a discriminator head; its newest checkpoint,
  or ``--checkpoint``): ``head_accuracy``, the head's accuracy on digits (logit > 0) and samples (logit < 0), with
  the mean logits;
- and ``gan_gradient``: the gradient of the generator's GAN loss ``softplus(-logit)`` of each sample with respect
  to its pixels, the mean of the descent direction ``-grad`` and of ``|grad|`` on faint, black and stroke pixels
  (a negative mean on faint pixels: the head pushes them darker).

    python tools/critic_readout.py --model benchmarks/main-job-cpu/student-fdistill-js
    python tools/critic_readout.py --model RUN --run RUN --sigmas 0.01,0.03,0.1,0.3,1 --out RUN/critic-readout.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from distilldiff.atomic import write_json

#: pixel classes of 8-bit images: black < 3 <= faint <= 32; stroke > 128 (faint_share's limits)
FAINT, STROKE = (3, 32), 128


def pixel_classes(u8: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks of the black, faint and stroke pixels of 8-bit images ``u8``."""
    return {"black": u8 < FAINT[0], "faint": (u8 >= FAINT[0]) & (u8 <= FAINT[1]), "stroke": u8 > STROKE}


def gradient_stats(grad: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Mean of ``-grad`` (the descent direction) and of ``|grad|`` over each mask's pixels."""
    return {k: {"mean_descent": float(-grad[m].mean()) if m.any() else float("nan"),
                "mean_abs": float(grad[m].abs().mean()) if m.any() else float("nan")} for k, m in masks.items()}


def run_critic(run: Path, checkpoint: str):
    """The fake score (with its discriminator head) of ``run``'s checkpoint, rebuilt from its config and loaded
    from the checkpoint's model file of that network (accelerate numbers them in the objective's order)."""
    from safetensors.torch import load_file

    from distilldiff.config import DistillConfig, load_config
    from distilldiff.distill import build_distill_task
    from distilldiff.engine.run_folder import RunFolder

    folder = RunFolder(run)
    if not folder.config_file.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no {folder.config_file.name})")
    named = folder.checkpoints / checkpoint  # a name under the run's checkpoints, or a path
    path = folder.find_checkpoint(str(named) if checkpoint != "latest" and named.is_dir() else checkpoint)
    cfg = load_config(DistillConfig, folder.config_file)
    task = build_distill_task(cfg)
    obj = task.objective
    trained = [n for n, role in obj.networks.items() if role in ("student", "critic")]
    if "fake_score" not in trained or not hasattr(task.networks["fake_score"], "head"):
        raise ValueError(f"{run}: objective '{obj.name}' has no fake score with a discriminator head")
    i = trained.index("fake_score")
    critic = task.networks["fake_score"]
    critic.load_state_dict(load_file(str(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors"))))
    return critic.eval().requires_grad_(False), path


def main() -> None:
    from feature_probe import digits_and_samples, parsed_inputs  # tools/, on the path when run as a script
    from distilldiff.metrics.background import faint_share, to_uint8

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run, student or exported folder, or a teacher (builtin:mnist)")
    p.add_argument("--steps", type=int, default=None, help="teachers: DDIM steps (default 50); students: their own")
    p.add_argument("--teacher", default="builtin:mnist", help="the teacher whose denoiser is applied (default builtin:mnist)")
    p.add_argument("--run", type=Path, default=None, help="a run with a discriminator head: also its head's read-out")
    p.add_argument("--checkpoint", default="latest", help="with --run: 'latest' (default) or a checkpoint name or path")
    p.add_argument("--sigmas", default="0.005,0.01,0.02,0.05,0.1,0.2,0.5,1", help="comma-separated noise levels")
    p.add_argument("--num", type=int, default=300, help="images of each kind (default 300)")
    p.add_argument("--raw", action="store_true", help="the samples as the network outputs them, as the critic sees them in "
                   "training (default: clipped to [-1, 1], as images are saved and scored)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args()
    sigmas, model, teacher = parsed_inputs(p, args)
    try:
        critic, ckpt = run_critic(args.run, args.checkpoint) if args.run is not None else (None, None)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    n = args.num
    real, real_labels, fake, cond = digits_and_samples(model, n)  # the probe's digits and samples
    fake = fake if args.raw else fake.clamp(-1, 1)
    masks = pixel_classes(to_uint8(fake))
    rows = []
    print(f"{args.model} ({model.description}{', raw' if args.raw else ''}): sample_faint {faint_share(fake):.4f}; teacher {args.teacher}"
          + (f"; head of {ckpt}" if ckpt else ""))
    for i, sigma in enumerate(sigmas):
        s = torch.full((n,), sigma)
        noisy_fake = fake + sigma * torch.randn(fake.shape, generator=torch.Generator().manual_seed(1001 + i))
        noisy_real = real + sigma * torch.randn(real.shape, generator=torch.Generator().manual_seed(1 + i))
        with torch.no_grad():
            row = {"sigma": sigma, "denoised_faint": round(faint_share(teacher(noisy_fake, s, **cond).float()), 4)}
        if critic is not None:
            with torch.no_grad():
                _, logit_real = critic(noisy_real, s, with_logit=True, class_labels=real_labels)
            x = fake.clone().requires_grad_(True)
            with torch.enable_grad():
                _, logit_fake = critic(x + (noisy_fake - fake), s, with_logit=True, **cond)
                F.softplus(-logit_fake).sum().backward()  # per-sample loss: each image's own gradient
            acc = ((logit_real > 0).float().mean() + (logit_fake < 0).float().mean()) / 2
            row.update(head_accuracy=round(float(acc), 4), logit_real=round(float(logit_real.mean()), 4),
                       logit_fake=round(float(logit_fake.detach().mean()), 4), gan_gradient=gradient_stats(x.grad, masks))
        rows.append(row)
        line = f"sigma {sigma:<6g} denoised faint {row['denoised_faint']:.4f}"
        if critic is not None:
            gf = row["gan_gradient"]["faint"]
            line += (f"  head accuracy {row['head_accuracy']:.3f} (logit real {row['logit_real']:+.2f}, fake {row['logit_fake']:+.2f})"
                     f"  faint-pixel descent {gf['mean_descent']:+.3g} |grad| {gf['mean_abs']:.3g}")
        print(line, flush=True)
    if args.out is not None:
        write_json(args.out, {"model": args.model, "teacher": args.teacher, "raw": args.raw, "run_checkpoint": str(ckpt) if ckpt else None,
                              "num": n, "sample_faint": round(faint_share(fake), 4), "rows": rows}, indent=1)


if __name__ == "__main__":
    main()
