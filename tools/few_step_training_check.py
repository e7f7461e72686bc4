"""How a few-step generator is trained decides what it samples: through its chain, or by DMD2's backward simulation.

Trains a ``student.sigmas`` generator (:class:`distilldiff.students.FewStepGenerator`) with f-distill (``--divergence``:
DMD's data-free reverse KL by default, or JS) on the analytic 2-D Gaussian-mixture teacher (four modes, masses
0.4 / 0.3 / 0.2 / 0.1) in two ways, and prints the mode masses of the generator's samples, of each level's x0, and of
the mixture over levels (docs/math.md, section 2.2.1):

- ``chain``: what distilldiff does; the objective's gradient flows through all K evaluations of the sampler;
- ``backward_simulation``: DMD2's recipe (Yin et al. 2024); each training sample gets one level k, its input is made
  by the generator itself without gradients, and the loss applies to that level's x0 alone (implemented here, for
  this comparison only).

    python tools/few_step_training_check.py --steps 1000 --seeds 1
    # docs/math.md section 2.2.1 (about 1.5 min per run on one CPU thread)
    python tools/few_step_training_check.py --steps 3000 --seeds 1,2,3 --divergence js --lr 3e-4 --only chain \
        --out benchmarks/few-step/toy-js-chain.json
    python tools/few_step_training_check.py --steps 3000 --seeds 1,2,3 --divergence js --lr 3e-4 --only backward_simulation \
        --out benchmarks/few-step/toy-js-backward-simulation.json

"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch
from torch import Tensor

from distilldiff.atomic import write_json
from distilldiff.config import TrainConfig
from distilldiff.engine import Engine, TrainTask
from distilldiff.objectives import FDistill, FDistillConfig
from distilldiff.students import FewStepGenerator, trainable_copy
from distilldiff.teachers import GaussianMixtureDenoiser
from distilldiff.toy import MLPDenoiser, fit_denoiser, save_state, scatter_image

WEIGHTS = [0.4, 0.3, 0.2, 0.1]
MEANS = [[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]]
STD = 0.15


class BackwardSimulationGenerator(FewStepGenerator):
    """DMD2's training draw: every call without ``sigma`` and ``generator`` (the objectives' draws) returns the x0 of
    one uniformly drawn level per sample, its input simulated by the generator without gradients."""

    def forward(self, z: Tensor, generator=None, *, sigma=None, scaled=False, **cond) -> Tensor:
        if sigma is not None or generator is not None:
            return super().forward(z, generator, sigma=sigma, scaled=scaled, **cond)
        sig = torch.tensor(self.sigmas, dtype=z.dtype)
        level = torch.randint(len(self.sigmas), (z.shape[0],))
        x = z * self.denoiser.prior_scale(sig[0])
        with torch.no_grad():
            for i in range(len(self.sigmas) - 1):
                rows = (level > i).nonzero().squeeze(1)
                if rows.numel():
                    x0 = self.denoiser(x[rows], sig[i].expand(rows.numel()))
                    x = x.index_copy(0, rows, x0 + sig[i + 1] * torch.randn_like(x0))
        return self.denoiser(x, sig[level])


def masses(teacher: GaussianMixtureDenoiser, x: Tensor) -> list[float]:
    k = teacher.assign_components(x)
    return [round(float(v), 3) for v in torch.bincount(k, minlength=len(WEIGHTS)).double() / len(k)]


def report(teacher: GaussianMixtureDenoiser, gen: FewStepGenerator, n: int = 4000) -> dict:
    """Mode masses of the samples, of each level's x0 along the sampler's chain, and of their mixture."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=g)
    with torch.no_grad():
        x, levels = z * gen.denoiser.prior_scale(torch.tensor(gen.sigmas[0])), []
        for i, s in enumerate(gen.sigmas):
            x0 = gen.denoiser(x, torch.tensor(s))
            levels.append(x0)
            if i + 1 < len(gen.sigmas):
                x = x0 + gen.sigmas[i + 1] * torch.randn(x0.shape, generator=g)
    mix = torch.cat([lv[j::len(levels)] for j, lv in enumerate(levels)])
    return {"samples": masses(teacher, levels[-1]), "levels": [masses(teacher, lv) for lv in levels],
            "mixture_over_levels": masses(teacher, mix)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="training updates per run (batch 256)")
    p.add_argument("--seeds", default="1", help="comma-separated training seeds")
    p.add_argument("--sigmas", default="2.5,0.8,0.2", help="the generator's noise levels")
    p.add_argument("--lr", type=float, default=1e-3, help="the generator's learning rate (the fake score's: 1e-3)")
    p.add_argument("--divergence", default="reverse_kl", choices=["reverse_kl", "js"],
                   help="f-distill's divergence: DMD's data-free reverse KL, or JS (a discriminator head on mixture samples)")
    p.add_argument("--only", default=None, choices=["chain", "backward_simulation"], help="train one way only")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    levels = [float(s) for s in args.sigmas.split(",")]
    teacher = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4).float()
    torch.manual_seed(0)
    copy_of_teacher = fit_denoiser(MLPDenoiser(2, teacher.sigma_data), GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4), steps=400)
    rows = []
    print(f"data masses {WEIGHTS}; levels {levels}; {args.steps} updates", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for how, cls in (("chain", FewStepGenerator), ("backward_simulation", BackwardSimulationGenerator)):
            if args.only not in (None, how):
                continue
            fd = FDistill(FDistillConfig(divergence=args.divergence, p_mean=0.0, tmax=600), teacher)
            gen = cls(trainable_copy(copy.deepcopy(copy_of_teacher)), levels)
            task = TrainTask(objective=fd, sample_shape=(2,), cond_fn=lambda n, dev: {}, save_fn=save_state,
                             data_fn=lambda n, dev: (teacher.sample(n, dtype=torch.float32)[0].to(dev), {}),
                             sample_fn=lambda student, noise, cond, g: scatter_image(student(noise, generator=g)),
                             networks={"teacher": teacher, "fake_score": fd.make_critic("fake_score", copy.deepcopy(copy_of_teacher)),
                                       "generator": gen})
            cfg = TrainConfig(max_steps=args.steps, batch_size=256, lr=args.lr, critic_lr=1e-3, betas=(0.0, 0.999), ema_halflife_kimg=50,
                              ema_rampup=0.5, log_every=10**6, sample_every=10**6, checkpoint_every=10**6, seed=seed, cpu=True)
            with tempfile.TemporaryDirectory() as tmp:
                engine = Engine(task, cfg, tmp)
                engine.train()
                row = {"seed": seed, "training": how, **report(teacher, engine.ema.module)}
            rows.append(row)
            err = max(abs(a - b) for a, b in zip(row["samples"], WEIGHTS))
            print(f"seed {seed} {how:<20} samples {row['samples']} (largest error {err:.3f}) | levels "
                  + " ".join(str(lv) for lv in row["levels"]) + f" | mixture over levels {row['mixture_over_levels']}", flush=True)
    if args.out:
        write_json(args.out, {"weights": WEIGHTS, "sigmas": levels, "steps": args.steps, "lr": args.lr, "divergence": args.divergence, "rows": rows})


if __name__ == "__main__":
    main()
