"""Inception throughput and value: distilldiff's FID module against torch-fidelity's own pipeline.

Both compute FID between two folders of N MNIST PNGs with the same weights, on the same device;
the script prints images/s of each (features of 2N images) and both FID values.

    python tools/bench_inception.py --num 200 --device cpu
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from distilldiff.data import mnist5k
from distilldiff.metrics import InceptionFeatureExtractor, ReferenceStats, compute_fid, extract_features, resolve_weights


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    arr = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import torch_fidelity

    images = mnist5k()[0]
    with tempfile.TemporaryDirectory() as tmp:
        a = write_pngs(Path(tmp) / "a", images[: args.num])
        b = write_pngs(Path(tmp) / "b", images[2500 : 2500 + args.num])
        weights = Path(tmp) / "inception.pth"
        torch.save(resolve_weights().state_dict, weights)

        resolve_weights()  # map and cache the weights once, outside both timings
        t0 = time.time()  # both timings include building the network and loading its weights
        extractor = InceptionFeatureExtractor(device=args.device, batch_size=args.batch_size)
        ref = ReferenceStats.from_features(extract_features(b, args.num, extractor, args.batch_size, desc="ours ref"))
        ours = compute_fid(a, args.num, ref, extractor, batch_size=args.batch_size).fid
        t_ours = time.time() - t0

        t0 = time.time()
        theirs = torch_fidelity.calculate_metrics(
            input1=str(a), input2=str(b), fid=True, cuda=args.device.startswith("cuda"), cache=False, verbose=False,
            batch_size=args.batch_size, feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        )["frechet_inception_distance"]
        t_theirs = time.time() - t0
    n = 2 * args.num
    print(f"| pipeline | images/s | FID (N={args.num}) |")
    print("|---|---|---|")
    print(f"| distilldiff.metrics | {n / t_ours:.2f} | {ours:.4f} |")
    print(f"| torch-fidelity calculate_metrics | {n / t_theirs:.2f} | {theirs:.4f} |")
    print(f"\ndevice {args.device}, torch threads {torch.get_num_threads()}, relative FID difference {abs(ours - theirs) / abs(theirs):.2e}")


if __name__ == "__main__":
    main()
