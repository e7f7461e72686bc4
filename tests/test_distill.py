"""Building a run from a config: reproducible networks, keys that would be ignored (critic settings, real data)."""

import pytest
import torch

from distilldiff.config import ConfigError, DistillConfig, load_config
from distilldiff.distill import build_distill_task


def test_fresh_layers_start_from_the_seed():
    """A guidance-conditioned student has new (randomly initialised) layers: two builds agree bitwise."""
    cfg = load_config(DistillConfig, "configs/mnist/guidance.yaml")
    a, b = (build_distill_task(cfg).networks["student"].state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_distill_task(load_config(DistillConfig, "configs/mnist/guidance.yaml", ["train.seed=1"])).networks["student"].state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)


@pytest.mark.parametrize("config,overrides,key", [
    ("configs/mnist/consistency.yaml", ["train.critic_lr=0.0001"], "critic_lr"),
    ("configs/mnist/t2i_flow_scm_ladd.yaml", ["objective.adv_weight=0"], "critic_lr"),  # sCM without LADD has no discriminator
    ("configs/mnist/consistency.yaml", ["train.critic_grad_clip=1.0"], "critic_grad_clip"),
])
def test_critic_keys_without_a_critic_are_refused(config, overrides, key):
    with pytest.raises(ConfigError, match=f"train.{key}: objective '(consistency|scm)' trains no critic"):
        build_distill_task(load_config(DistillConfig, config, overrides))


def test_real_data_the_objective_does_not_use_is_refused():
    """f-distill reverse KL without a GAN term (DMD) is data-free: a ``data`` key would be silently ignored."""
    dmd = ["objective.divergence=reverse_kl"]
    with pytest.raises(ConfigError, match=r"data: 'mnist5k': objective 'fdistill' as configured trains without real data"):
        build_distill_task(load_config(DistillConfig, "configs/mnist/fdistill.yaml", dmd))
    task = build_distill_task(load_config(DistillConfig, "configs/mnist/fdistill.yaml", [*dmd, "data=null"]))
    assert task.data_fn is None
    assert build_distill_task(load_config(DistillConfig, "configs/mnist/fdistill.yaml")).data_fn is not None  # JS: its head sees real digits


def test_every_shipped_config_of_the_mnist_teacher_builds():
    """Each config for the shipped pixel teacher builds its run (teacher, student, critics, data): no key of it is
    refused, e.g. real data for an objective that trains without it."""
    from pathlib import Path

    import yaml

    files = [f for f in sorted(Path("configs/mnist").rglob("*.yaml"))
             if (yaml.safe_load(f.read_text()).get("teacher") or {}).get("path") == "builtin:mnist"]
    assert any(f.name == "dmd_regression.yaml" for f in files) and len(files) >= 15
    for f in files:
        cfg = load_config(DistillConfig, str(f))
        task = build_distill_task(cfg)  # the engine draws teacher pairs later, before the first update
        assert (task.data_fn is not None) == task.objective.needs_real_data == (cfg.data is not None), f
