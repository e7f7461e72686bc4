"""Building a run from a config: reproducible networks."""

import torch

from distilldiff.config import DistillConfig, load_config
from distilldiff.distill import build_distill_task


def test_fresh_layers_start_from_the_seed():
    """A guidance-conditioned student has new (randomly initialised) layers: two builds agree bitwise."""
    cfg = load_config(DistillConfig, "configs/mnist/guidance.yaml")
    a, b = (build_distill_task(cfg).networks["student"].state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_distill_task(load_config(DistillConfig, "configs/mnist/guidance.yaml", ["train.seed=1"])).networks["student"].state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)
