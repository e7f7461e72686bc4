"""Shared toy problem: a 2-D Gaussian mixture teacher and MLP students fitted to it."""

import copy
import functools
import types

import torch

from distilldiff.config import TrainConfig
from distilldiff.engine import TrainTask
from distilldiff.students import OneStepGenerator
from distilldiff.teachers import GaussianMixtureDenoiser
from distilldiff.toy import MLPDenoiser, fit_denoiser, save_state, scatter_image

WEIGHTS = [0.4, 0.3, 0.2, 0.1]
MEANS = [[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]]
STD = 0.15


def teacher() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4).float()


@functools.lru_cache(maxsize=1)
def fitted_copy() -> MLPDenoiser:
    """An MLP denoiser regressed onto the teacher: the toy's 'copy of the teacher'."""
    torch.manual_seed(0)
    t = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4)
    return fit_denoiser(MLPDenoiser(2, t.sigma_data), t, steps=400)


def edm_teacher(sigma_data: float):
    """A stand-in teacher with EDM's noise range [0.002, 80] for objectives built against one (no network)."""
    return types.SimpleNamespace(sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data)


def sid_task(objective, init_sigma=2.5) -> TrainTask:
    """SiD's networks: the exact teacher, a fake score and a one-step generator, both copies of the fitted MLP."""
    return task_for(objective, OneStepGenerator(copy.deepcopy(fitted_copy()), init_sigma))


def train_config(**kw) -> TrainConfig:
    base = dict(batch_size=256, lr=1e-3, critic_lr=3e-3, betas=(0.0, 0.999), ema_halflife_kimg=5, ema_rampup=0.5,
                log_every=50, sample_every=10**6, checkpoint_every=10**6, num_sample_images=2000, cpu=True)
    base.update(kw)
    return TrainConfig(**base)


def mode_report(samples: torch.Tensor):
    """Per-mode mass (nearest mean) and the fraction of samples within 4 std of their mode."""
    t = teacher()
    k = t.assign_components(samples)
    mass = torch.bincount(k, minlength=len(WEIGHTS)).double() / len(k)
    near = ((samples.double() - t.means.double()[k]).norm(dim=1) < 4 * STD).double().mean()
    return mass, float(near)


def gmm_data(n: int, device):
    """Real-data batches of the toy mixture (for objectives that need data)."""
    x, _ = teacher().sample(n, dtype=torch.float32)
    return x.to(device), {}


def task_for(objective, student, critics: dict | None = None) -> TrainTask:
    """A toy task for any objective: frozen exact teacher, the given student, targets/critics built
    the way distilldiff builds them (copies), GMM samples as real data."""
    networks = {}
    for name, role in objective.networks.items():
        if role == "frozen":
            networks[name] = teacher()
        elif role == "student":
            networks[name] = student
        elif role == "target":
            networks[name] = objective.make_target(student)
        else:
            networks[name] = (critics or {}).get(name) or objective.make_critic(name, copy.deepcopy(fitted_copy()))
    return TrainTask(
        objective=objective,
        networks=networks,
        sample_shape=(2,),
        cond_fn=lambda n, device: {},
        sample_fn=lambda student, noise, cond, generator: scatter_image(student(noise)),
        save_fn=save_state,
        data_fn=gmm_data,
    )
