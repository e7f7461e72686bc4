"""Every conversion in float64 against the closed form (docs/math.md, section 1)."""

import math

import pytest
import torch

from distilldiff.teachers import VPDenoiser, ddim_timesteps
from distilldiff.teachers.conversions import (
    LogSigmaInterpolator,
    flow_scale_input,
    flow_sigma_from_t,
    flow_t_from_sigma,
    flow_x0_from_velocity,
    vp_alpha_bar_from_sigma,
    vp_output_from_x0,
    vp_scale_input,
    vp_sigma_from_alpha_bar,
    vp_x0_from_output,
)

torch.manual_seed(0)
X0 = torch.randn(6, 1, 4, 4, dtype=torch.float64)
EPS = torch.randn(6, 1, 4, 4, dtype=torch.float64)


def linear_alphas_cumprod(T=1000):
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def test_sigma_alpha_bar_round_trip():
    a = torch.linspace(1e-5, 1 - 1e-6, 101, dtype=torch.float64)
    sigma = vp_sigma_from_alpha_bar(a)
    torch.testing.assert_close(sigma, torch.sqrt((1 - a) / a), rtol=1e-14, atol=0)
    torch.testing.assert_close(vp_alpha_bar_from_sigma(sigma), a, rtol=1e-12, atol=0)


def test_vp_input_scaling_matches_forward_process():
    sigma = torch.tensor([0.01, 0.3, 1.0, 2.5, 10.0, 150.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    a = 1 / (1 + sigma**2)
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * EPS  # DDPM forward process
    torch.testing.assert_close(vp_scale_input(X0 + sigma * EPS, sigma), x_t, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_from_each_prediction_type(prediction_type):
    a = torch.rand(6, 1, 1, 1, dtype=torch.float64) * 0.98 + 0.01
    x_t = a.sqrt() * X0 + (1 - a).sqrt() * EPS
    exact = {"epsilon": EPS, "v_prediction": a.sqrt() * EPS - (1 - a).sqrt() * X0, "sample": X0}[prediction_type]
    torch.testing.assert_close(vp_x0_from_output(x_t, exact, a, prediction_type), X0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vp_output_from_x0(x_t, X0, a, prediction_type), exact, rtol=1e-12, atol=1e-12)


def test_unknown_prediction_type_is_an_error():
    with pytest.raises(ValueError, match="prediction_type 'x'"):
        vp_x0_from_output(X0, X0, torch.tensor(0.5), "x")


class Oracle(torch.nn.Module):
    """A 'network' that knows x0 and returns the exact output for its parameterisation."""

    def __init__(self, x0, alphas_cumprod, prediction_type):
        super().__init__()
        self.x0, self.ac, self.pt = x0, alphas_cumprod, prediction_type
        self.seen_t = None

    def forward(self, x_t, t, **cond):
        self.seen_t = t
        sigma = LogSigmaInterpolator(vp_sigma_from_alpha_bar(self.ac)).sigma(t).reshape(-1, 1, 1, 1)
        return vp_output_from_x0(x_t, self.x0, 1 / (1 + sigma**2), self.pt)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_denoiser_recovers_x0_on_and_between_grid_points(prediction_type):
    ac = linear_alphas_cumprod()
    oracle = Oracle(X0, ac, prediction_type)
    den = VPDenoiser(oracle, ac, prediction_type, (1, 4, 4))
    grid = vp_sigma_from_alpha_bar(ac)
    sigma = torch.cat([grid[[0, 10, 500, 999]], torch.tensor([0.05, 3.3], dtype=torch.float64)])
    out = den(X0 + sigma.reshape(-1, 1, 1, 1) * EPS, sigma)
    torch.testing.assert_close(out, X0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(oracle.seen_t[:4], torch.tensor([0.0, 10.0, 500.0, 999.0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_vp_denoiser_range_and_prior_scale():
    ac = linear_alphas_cumprod()
    den = VPDenoiser(Oracle(X0, ac, "epsilon"), ac, "epsilon", (1, 4, 4))
    assert den.sigma_min == pytest.approx(math.sqrt((1 - ac[0].item()) / ac[0].item()), rel=1e-12)
    assert den.sigma_max == pytest.approx(math.sqrt((1 - ac[-1].item()) / ac[-1].item()), rel=1e-12)
    s = torch.tensor(2.5, dtype=torch.float64)
    # unit-variance noise at the VP model input corresponds to sqrt(1 + s^2) z in sigma space
    assert vp_scale_input(den.prior_scale(s), s).item() == pytest.approx(1.0, rel=1e-14)


def test_log_sigma_interpolator():
    grid = vp_sigma_from_alpha_bar(linear_alphas_cumprod())
    interp = LogSigmaInterpolator(grid)
    t = interp.timestep(grid)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float64), rtol=0, atol=1e-9)
    mid = (grid[10].log() + grid[11].log()).div(2).exp()
    assert interp.timestep(mid).item() == pytest.approx(10.5, abs=1e-9)
    s = torch.exp(torch.linspace(grid[0].log().item(), grid[-1].log().item(), 57, dtype=torch.float64))
    torch.testing.assert_close(interp.sigma(interp.timestep(s)), s, rtol=1e-10, atol=0)
    assert interp.timestep(torch.tensor([1e-6, 1e6], dtype=torch.float64)).tolist() == [0.0, 999.0]
    with pytest.raises(ValueError, match="increase"):
        LogSigmaInterpolator(grid.flip(0))


@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_ddim_timesteps_match_diffusers(spacing, steps):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    sched.set_timesteps(steps)
    ours = ddim_timesteps(1000, steps, spacing, steps_offset=1 if spacing == "leading" else 0)
    assert ours == sched.timesteps.tolist()


def test_flow_matching_conversions():
    t = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x0, eps = X0[:5], EPS[:5]
    sigma = flow_sigma_from_t(t)
    torch.testing.assert_close(sigma, t / (1 - t), rtol=1e-14, atol=0)
    torch.testing.assert_close(flow_t_from_sigma(sigma), t, rtol=1e-12, atol=0)
    x_t = (1 - t) * x0 + t * eps
    torch.testing.assert_close(flow_scale_input(x0 + sigma * eps, sigma), x_t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flow_x0_from_velocity(x_t, eps - x0, t), x0, rtol=1e-12, atol=1e-12)
