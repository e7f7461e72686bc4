"""The analytic Gaussian-mixture denoiser against a numerical score, and the CFG wrapper."""

import pytest
import torch

from distilldiff.teachers import CFGDenoiser, GaussianMixtureDenoiser


def make_gmm(shape=(2,), labels=None):
    g = torch.Generator().manual_seed(0)
    means = torch.randn((3, *shape), generator=g, dtype=torch.float64) * 2
    return GaussianMixtureDenoiser([0.5, 0.3, 0.2], means, [0.3, 0.5, 0.2], component_labels=labels)


@pytest.mark.parametrize("shape", [(2,), (1, 3, 3)])
@pytest.mark.parametrize("sigma", [0.05, 0.7, 4.0])
def test_denoiser_equals_tweedie_with_autograd_score(shape, sigma):
    gmm = make_gmm(shape)
    x = torch.randn((5, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    x.requires_grad_(True)
    score = torch.autograd.grad(gmm.log_prob(x, sigma).sum(), x)[0]
    torch.testing.assert_close(gmm(x.detach(), sigma), x.detach() + sigma**2 * score, rtol=1e-10, atol=1e-10)


def test_denoiser_score_against_finite_differences():
    gmm = make_gmm()
    x = torch.tensor([[0.3, -0.2], [1.5, 2.0]], dtype=torch.float64)
    sigma, h = 0.8, 1e-5
    fd = torch.zeros_like(x)
    for i in range(2):
        e = torch.zeros_like(x)
        e[:, i] = h
        fd[:, i] = (gmm.log_prob(x + e, sigma) - gmm.log_prob(x - e, sigma)) / (2 * h)
    torch.testing.assert_close(gmm.score(x, sigma), fd, rtol=1e-6, atol=1e-8)


def test_denoiser_limits():
    gmm = make_gmm()
    x = torch.randn(4, 2, dtype=torch.float64)
    # huge noise: the posterior mean is the mixture mean
    mean = (gmm.weights[:, None] * gmm.means).sum(0)
    torch.testing.assert_close(gmm(x, 1e5), mean.expand(4, 2), rtol=0, atol=1e-6)


def test_samples_have_mixture_statistics():
    gmm = make_gmm()
    x, k = gmm.sample(40000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(k, minlength=3).double() / len(k)
    torch.testing.assert_close(freq, gmm.weights, rtol=0, atol=0.01)
    assert (gmm.assign_components(gmm.means) == torch.arange(3)).all()


def test_class_conditional_restricts_components_and_null_means_all():
    gmm = make_gmm(labels=[0, 1, 1])
    assert gmm.num_classes == 2 and gmm.null_class == 2
    x = torch.randn(3, 2, dtype=torch.float64)
    only0 = GaussianMixtureDenoiser([1.0], gmm.means[:1], gmm.stds[:1])
    torch.testing.assert_close(gmm(x, 0.5, class_labels=torch.zeros(3, dtype=torch.long)), only0(x, 0.5))
    torch.testing.assert_close(gmm(x, 0.5, class_labels=torch.full((3,), 2)), gmm(x, 0.5))


def test_cfg_wrapper_formula_and_zero_guidance():
    gmm = make_gmm(labels=[0, 1, 1])
    x = torch.randn(4, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    d_c = gmm(x, 0.7, class_labels=labels)
    d_u = gmm(x, 0.7, class_labels=torch.full((4,), gmm.null_class))
    for w in (0.0, 1.5):
        torch.testing.assert_close(CFGDenoiser(gmm, w)(x, 0.7, class_labels=labels), d_c + w * (d_c - d_u))
    per_sample = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    out = CFGDenoiser(gmm, per_sample)(x, 0.7, class_labels=labels)
    torch.testing.assert_close(out, d_c + per_sample[:, None] * (d_c - d_u))


def test_cfg_needs_null_class():
    with pytest.raises(ValueError, match="null class"):
        CFGDenoiser(make_gmm(), 1.0)
