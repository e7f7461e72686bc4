"""Toy networks for the analytic Gaussian-mixture teacher: fast, exact checks of every objective."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .teachers.base import Denoiser
from .teachers.vp import VPDenoiser


class MLPDenoiser(Denoiser):
    """EDM-preconditioned MLP denoiser for vector data ``[B, dim]`` (Karras et al. 2022, Table 1).

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = log(sigma) / 4``.
    """

    def __init__(
        self, dim: int, sigma_data: float, hidden: int = 128, depth: int = 3, sigma_min: float = 0.002, sigma_max: float = 80.0,
        num_classes: int | None = None, guidance: bool = False,
    ):
        super().__init__()
        self.sample_shape = (dim,)
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        self.num_classes = num_classes
        self.null_class = num_classes
        #: class labels (with a null label for classifier-free guidance) enter as a one-hot input
        extra = (num_classes + 1 if num_classes else 0) + (16 if guidance else 0)
        self.guidance = guidance
        layers: list[nn.Module] = [nn.Linear(dim + 16 + extra, hidden), nn.SiLU()]
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
        inputs = [c_in * x, emb]
        if self.num_classes:
            labels = cond.get("class_labels")
            labels = torch.full((x.shape[0],), self.null_class, device=x.device) if labels is None else labels
            inputs.append(nn.functional.one_hot(labels.long(), self.num_classes + 1).to(x))
        if self.guidance:  # the guidance scale w, embedded like the noise level (Meng et al. 2023)
            w = torch.as_tensor(cond.get("guidance_scale", 0.0), device=x.device, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
            inputs += [(w * self.freqs.to(x) / 4).sin(), (w * self.freqs.to(x) / 4).cos()]
        return c_skip * x + c_out * self.net(torch.cat(inputs, dim=1))


class VPMLP(nn.Module):
    """A VP network for vector data: ``model(x_t [B, dim], t [B]) -> [B, dim]``.

    An MLP on ``x_t`` and sinusoidal features of the (fractional) timestep ``t`` (Ho et al. 2020's
    embedding, periods up to 10,000 steps). What its output means (epsilon, v or x0) is decided by
    the :class:`~distilldiff.teachers.VPDenoiser` that wraps it.
    """

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, embed_dim: int = 32):
        super().__init__()
        half = embed_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half))
        layers: list[nn.Module] = [nn.Linear(dim + 2 * half, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: Tensor, t: Tensor, **cond) -> Tensor:
        arg = t.to(x_t.dtype)[:, None] * self.freqs.to(x_t.dtype)
        return self.net(torch.cat([x_t, arg.sin(), arg.cos()], dim=1))


def linear_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """``[T]`` cumulative alpha products of DDPM's linear beta schedule (Ho et al. 2020), float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def vp_mlp_denoiser(
    dim: int, prediction_type: str = "epsilon", sigma_data: float = 0.5, hidden: int = 128, depth: int = 3,
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
) -> VPDenoiser:
    """A :class:`VPMLP` behind :class:`~distilldiff.teachers.VPDenoiser` with DDPM's linear betas.

    With the defaults (1000 steps, betas 1e-4..0.02, the shipped MNIST teacher's schedule) the
    noise range is sigma ~ 0.01..157, so toy tests see the same conditioning as a real VP teacher.
    ``sample_shape`` is ``(dim,)``.
    """
    model = VPMLP(dim, hidden, depth)
    return VPDenoiser(model, linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end), prediction_type, (dim,), sigma_data)


def output_weight(net: Denoiser, sigma: Tensor) -> Tensor:
    """Loss weight on x0 errors that makes the loss the squared error of the network's own output.

    VP networks: ``1 / sigma^2`` (epsilon), ``(1 + sigma^2) / sigma^2`` (v), 1 (sample), as DDPM
    training weighs them; EDM-preconditioned networks: EDM's ``lambda(sigma)``.
    """
    kind = getattr(net, "prediction_type", None)
    if kind == "epsilon":
        return 1 / sigma**2
    if kind == "v_prediction":
        return (1 + sigma**2) / sigma**2
    if kind == "sample":
        return torch.ones_like(sigma)
    return 1 / (sigma**2 * net.sigma_data**2 / (sigma**2 + net.sigma_data**2))


def fit_denoiser(net: Denoiser, teacher: Denoiser, steps: int = 500, batch: int = 256, lr: float = 3e-3, seed: int = 0) -> Denoiser:
    """Regress ``net`` onto ``teacher`` on noisy teacher samples (an approximate "copy of the teacher").

    The analytic teacher has no weights to copy; this gives trainable networks that start where a
    copy of a real teacher would. sigma is log-uniform over ``[teacher.sigma_min, teacher.sigma_max]``
    (give the teacher the network's range, e.g. a VP network's 0.01..157). The squared x0 error is
    weighted by :func:`output_weight` (the error of the network's own output).
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    lo, hi = math.log(teacher.sigma_min), math.log(teacher.sigma_max)
    for i in range(steps):
        cond = {}
        if getattr(net, "num_classes", None):  # class labels, the null label included
            cond["class_labels"] = torch.randint(0, net.num_classes + 1, (batch,), generator=g)
        x0, _ = teacher.sample(batch, generator=g, dtype=torch.float32, **cond)
        sigma = (torch.rand(batch, generator=g) * (hi - lo) + lo).exp()
        x = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
        with torch.no_grad():
            target = teacher(x.double(), sigma.double(), **cond).float()
        w = output_weight(net, sigma)
        loss = (w[:, None] * (net(x, sigma, **cond) - target) ** 2).mean()
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
