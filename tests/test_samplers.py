"""Samplers on the exact Gaussian-mixture denoiser: DDIM reproduces the mixture."""

import torch

from distilldiff.samplers import ddim_sample, karras_sigmas, multistep_sample
from distilldiff.teachers import GaussianMixtureDenoiser


def gmm():
    return GaussianMixtureDenoiser([0.6, 0.3, 0.1], [[2.0, 0.0], [-2.0, 0.0], [0.0, 2.5]], [0.2, 0.2, 0.2])


def test_karras_sigmas_endpoints_and_order():
    s = karras_sigmas(18, 0.002, 80.0)
    assert s[0].item() == 80.0 and abs(s[-1].item() - 0.002) < 1e-12 and bool((s[1:] < s[:-1]).all())


def test_ddim_with_exact_denoiser_reproduces_the_mixture():
    g = gmm()
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = ddim_sample(g, z, karras_sigmas(64, 0.002, 80.0))
    mass = torch.bincount(g.assign_components(x), minlength=3).double() / len(x)
    torch.testing.assert_close(mass, g.weights, rtol=0, atol=0.03)
    k = g.assign_components(x)
    assert ((x - g.means[k]).norm(dim=1) < 0.8).double().mean() > 0.97


def test_one_step_samplers_agree_and_multistep_renoises():
    g = gmm()
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    one = torch.tensor([2.5], dtype=torch.float64)
    torch.testing.assert_close(ddim_sample(g, z, one), g(2.5 * z, 2.5))
    torch.testing.assert_close(multistep_sample(g, z, one), g(2.5 * z, 2.5))
    gen = torch.Generator().manual_seed(2)
    two = multistep_sample(g, z, torch.tensor([2.5, 0.5], dtype=torch.float64), generator=gen)
    fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(two, g(g(2.5 * z, 2.5) + 0.5 * fresh, 0.5))


def test_teacher_grid_of_a_guided_vp_teacher_is_its_timestep_grid():
    """Classifier-free guidance does not change which grid a VP teacher's students use."""
    from distilldiff.samplers import teacher_grid
    from distilldiff.teachers import CFGDenoiser, load_teacher

    teacher = load_teacher("builtin:mnist")
    plain = teacher_grid(teacher, 4, 0.002, 80.0)
    assert teacher_grid(CFGDenoiser(teacher, 1.0), 4, 0.002, 80.0) == plain == [float(s) for s in teacher.discrete_sigmas(4)]
