"""Toy networks for the analytic Gaussian-mixture teacher: fast, exact checks of every objective."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .teachers.base import Denoiser


class MLPDenoiser(Denoiser):
    """EDM-preconditioned MLP denoiser for vector data ``[B, dim]`` (Karras et al. 2022, Table 1).

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = log(sigma) / 4``.
    """

    def __init__(self, dim: int, sigma_data: float, hidden: int = 128, depth: int = 3, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.sample_shape = (dim,)
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        layers: list[nn.Module] = [nn.Linear(dim + 16, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("freqs", torch.arange(8, dtype=torch.float32) + 1)

    def denoise(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        sd = self.sigma_data
        s = sigma[:, None]
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        c_noise = s.log() / 4
        emb = torch.cat([(c_noise * self.freqs.to(x)).sin(), (c_noise * self.freqs.to(x)).cos()], dim=1)
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, emb], dim=1))


def fit_denoiser(net: Denoiser, teacher: Denoiser, steps: int = 500, batch: int = 256, lr: float = 3e-3, seed: int = 0) -> Denoiser:
    """Regress ``net`` onto ``teacher`` on noisy teacher samples (an approximate "copy of the teacher").

    The analytic teacher has no weights to copy; this gives trainable networks that start where a
    copy of a real teacher would. sigma is log-uniform over ``[teacher.sigma_min, teacher.sigma_max]``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    lo, hi = math.log(teacher.sigma_min), math.log(teacher.sigma_max)
    for i in range(steps):
        x0, _ = teacher.sample(batch, generator=g, dtype=torch.float32)
        sigma = (torch.rand(batch, generator=g) * (hi - lo) + lo).exp()
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = teacher(x.double(), sigma.double()).float()
        w = 1 / (sigma**2 * net.sigma_data**2 / (sigma**2 + net.sigma_data**2))  # EDM weight
        loss = (w[:, None] * (net(x, sigma) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (i + 1) / steps))
    return net


def scatter_image(points: Tensor, extent: float = 3.0, bins: int = 64) -> Tensor:
    """A 2-D point cloud as a ``[1, 1, bins, bins]`` density image in [-1, 1] (for sample grids)."""
    h = torch.histogramdd(points.detach().float().cpu()[:, :2], bins=[bins, bins], range=[-extent, extent, -extent, extent]).hist
    h = (h / h.max().clamp_min(1)).sqrt()
    return (h.T.flip(0) * 2 - 1)[None, None]


def save_state(module: nn.Module, folder: Path, info: dict) -> None:
    """Write a toy network's weights as safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
