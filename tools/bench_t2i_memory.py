"""Peak GPU memory and step time of DMD2 on a Stable-Diffusion-1.5-sized UNet: full vs bf16-frozen vs LoRA.

Nothing is downloaded: the pipeline has SD 1.5's architecture (UNet2DConditionModel 860 M
parameters, CLIP ViT-L/14 text encoder, the SD VAE) with random weights, built in-process and
saved to a temporary folder, then loaded the way a hub id is. Each variant is one fresh process
(so peak memory is its own): it builds the distillation task from a config (DMD2 = f-distill,
reverse KL, GAN head on the fake score's features, real data = ``--images`` random images with
captions), runs ``--warmup`` steps, then times ``--steps`` more and reports the peak of
``torch.cuda.max_memory_allocated`` over the whole run. One step = one critic update and one
generator update (``critic_ratio`` 1; DMD2 uses 10 on SD 1.5: its step costs ~5x more critic work).

    python tools/bench_t2i_memory.py --out benchmarks/t2i-memory-h100           # a GPU, SD 1.5 size, 512 px
    python tools/bench_t2i_memory.py --size tiny --device cpu --steps 2         # a smoke run anywhere

Variants (``--variants``):
    full               teacher, student and fake score in float32, all trained in full
    bf16_frozen        the frozen teacher (and VAE, text encoder) in bfloat16
    bf16_lora_critic   + the fake score as a LoRA (``--lora-rank``, 64) on the teacher's own UNet (no GAN head: a
                       LoRA critic is a plain fake score, so this variant is DMD, not DMD2)
    bf16_lora_both     + the student a LoRA of the same rank too (DMD)
    bf16_checkpointing bf16_frozen with activation checkpointing of the trained networks
Mixed precision (``train.mixed_precision: bf16``) is on for every variant on a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # SD 1.5's UNet (diffusers' UNet2DConditionModel defaults with 768-d cross-attention), 64x64 latents at 512 px
    "sd15": {"unet": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                          attention_head_dim=8, sample_size=64, in_channels=4, out_channels=4),
             "text": dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                          max_position_embeddings=77, projection_dim=768),
             "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)},
    "tiny": {"unet": dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, attention_head_dim=2,
                          sample_size=8, in_channels=4, out_channels=4, norm_num_groups=4,
                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
             "text": dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_hidden_layers=2,
                          max_position_embeddings=16, projection_dim=16),
             "vae": dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, norm_num_groups=2,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)},
}

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "house", "tree", "car"]

VARIANTS = {
    "full": {"objective.gan_weight": 0.001},
    "bf16_frozen": {"objective.gan_weight": 0.001, "teacher.dtype": "bfloat16"},
    # DMD (no GAN term) trains without real data: `data` unset
    "bf16_lora_critic": {"teacher.dtype": "bfloat16", "critic.lora_rank": "RANK", "data": None},
    "bf16_lora_both": {"teacher.dtype": "bfloat16", "critic.lora_rank": "RANK", "student.lora_rank": "RANK", "data": None},
    "bf16_checkpointing": {"objective.gan_weight": 0.001, "teacher.dtype": "bfloat16", "train.gradient_checkpointing": True},
}


def build_pipeline(size: str, folder: Path) -> Path:
    """Save a random-weight SD pipeline of ``size`` to ``folder``; returns it."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from distilldiff.text_teacher import write_word_tokenizer

    spec = SIZES[size]
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(str(write_word_tokenizer(folder.parent / "tokenizer-src", WORDS,
                                                                      max_length=spec["text"]["max_position_embeddings"])))
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=len(tokenizer),
                                        hidden_act="quick_gelu", **spec["text"]))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **spec["vae"])
    unet = UNet2DConditionModel(**spec["unet"])
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_images(folder: Path, num: int, size: int) -> Path:
    """``num`` random RGB images with captions (DMD2's real data; only their cost matters here)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(num):
        pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a photo of {WORDS[3 + i % 7]}\n")
    return folder


def run_variant(args) -> dict:
    """One variant in this process: build, warm up, time; the row of the table."""
    from distilldiff.config import DistillConfig, load_config
    from distilldiff.distill import build_distill_task
    from distilldiff.engine import Engine
    from distilldiff.engine.engine import LogWindow

    work = Path(args.work)
    data = {
        "teacher": {"path": str(work / "pipeline"), "prompts": str(work / "images"), "guidance_scale": 0.75},
        "student": {"init_timestep": 999},
        "objective": {"name": "fdistill", "divergence": "reverse_kl", "noise": "timesteps", "tmin": 20, "tmax": 980},
        "data": str(work / "images"),
        "train": {"batch_size": args.batch, "max_steps": args.warmup + args.steps, "log_every": 10**6, "sample_every": 10**6,
                  "checkpoint_every": 10**6, "cpu": args.device == "cpu",
                  "mixed_precision": "bf16" if args.device != "cpu" else "no"},
        "output_dir": str(work / f"run-{args.variant}"),
    }
    variant = {k: args.lora_rank if v == "RANK" else v for k, v in VARIANTS[args.variant].items()}
    overrides = [f"{k}={json.dumps(v)}" for k, v in variant.items()]
    cfg = load_config(DistillConfig, data=data, overrides=overrides)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    task = build_distill_task(cfg)
    engine = Engine(task, cfg.train, work / f"run-{args.variant}")
    engine._start(None)
    window = LogWindow()
    for _ in range(args.warmup):
        engine.train_step(window)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.train_step(window)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    unique = {id(p): p for net in task.networks.values() for p in net.parameters()}
    trained = {id(p) for name in engine.trainable for p in engine.params[name]}
    return {
        "variant": args.variant, "size": args.size, "batch": args.batch, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "step_seconds": round(seconds, 3), "steps_timed": args.steps,
        "params_in_memory": sum(p.numel() for p in unique.values()),
        "params_trained": sum(p.numel() for i, p in unique.items() if i in trained),
        "overrides": variant,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="sd15")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=1, help="images per step (one process)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--lora-rank", type=int, default=64, help="rank of the LoRA variants (DMD2 on SDXL: 64)")
    p.add_argument("--out", default=None, help="folder for results.json and table.md")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_pipeline(args.size, work / "pipeline")
        pixels = SIZES[args.size]["vae"]["sample_size"]
        write_images(work / "images", max(8, args.batch), pixels)
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--size", args.size, "--batch", str(args.batch), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--device", args.device, "--lora-rank", str(args.lora_rank),
                   "--variant", variant, "--work", str(work)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
            if r.returncode != 0 or not lines:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
                rows.append({"variant": variant, "error": tail[0][:300]})
            else:
                rows.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    table = ["| variant | peak GiB | s / step | parameters in memory (M) | trained (M) |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            table.append(f"| {r['variant']} | failed: {r['error']} | | | |")
        else:
            table.append(f"| {r['variant']} | {r['peak_gib']} | {r['step_seconds']} | {r['params_in_memory'] / 1e6:.1f} | "
                         f"{r['params_trained'] / 1e6:.1f} |")
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"command": " ".join(sys.argv), "machine": platform.node(), "torch": torch.__version__}
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        (out / "table.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
