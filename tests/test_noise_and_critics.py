"""Noise levels of SiD and f-distill stay in the teacher's range and follow their recipes; the
discriminator head on the fake score's features trains what it is configured to train."""

import copy

import pytest
import torch

from distilldiff.config import ConfigError
from distilldiff.objectives import Batch, FDistill, FDistillConfig, SiD, SiDConfig
from distilldiff.objectives.critic import ScoreWithHead, critic_loss, feature_module
from distilldiff.objectives.noise import KarrasTime, LogNormal, Timesteps, make_noise_levels, noise_range
from distilldiff.students import OneStepGenerator
from distilldiff.teachers import GaussianMixtureDenoiser
from distilldiff.teachers.base import Denoiser

from toy_setup import MEANS, STD, WEIGHTS, fitted_copy, gmm_data

LO, HI = 0.05, 20.0  # a teacher trained on a narrower range than EDM's [0.002, 80]


def narrow_teacher() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4, sigma_min=LO, sigma_max=HI).float()


class Recording(Denoiser):
    """Passes calls through to ``inner`` and records every noise level it is called at."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []
        for attr in ("sigma_min", "sigma_max", "sigma_data", "sample_shape", "num_classes", "null_class"):
            setattr(self, attr, getattr(inner, attr))

    def forward(self, x, sigma, **kw):
        self.seen.append(self.expand_sigma(sigma, x).detach().double())
        return self.inner(x, sigma, **kw)

    def __getattr__(self, name):  # buffers of the wrapped critic (h_mean, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def sigmas(self) -> torch.Tensor:
        out = torch.cat(self.seen)
        self.seen.clear()
        return out


def run_phases(objective, teacher, n=4096):
    """Every phase's loss once on a batch of ``n``; the noise levels each network was called at."""
    fake = Recording(objective.make_critic("fake_score", copy.deepcopy(fitted_copy())))
    real = Recording(teacher)
    gen = OneStepGenerator(copy.deepcopy(fitted_copy()), 2.5)
    nets = {"teacher": real, "fake_score": fake, "generator": gen}
    seen = {}
    for phase in objective.phases():
        x, _ = gmm_data(n, "cpu")
        objective.loss(phase, nets, Batch(noise=torch.randn(n, 2), real=x))
        seen[phase.name] = {"teacher": real.sigmas() if real.seen else None, "fake_score": fake.sigmas()}
    return seen


@pytest.mark.parametrize("objective", [
    SiD.build(SiDConfig(), narrow_teacher()),
    SiD.build(SiDConfig(noise="lognormal", fake_score_noise="generator", adv_weight=0.1), narrow_teacher()),
    FDistill.build(FDistillConfig(), narrow_teacher()),
    FDistill.build(FDistillConfig(divergence="js", gan_weight=0.1, tmax=1000), narrow_teacher()),
], ids=["sid", "sid-lognormal-sida", "dmd", "fdistill-js-gan"])
def test_noise_levels_never_leave_the_teacher_range(objective):
    torch.manual_seed(0)
    for phase, calls in run_phases(objective, narrow_teacher()).items():
        for net, sigma in calls.items():
            if sigma is not None:
                assert LO * (1 - 1e-6) <= float(sigma.min()) and float(sigma.max()) <= HI * (1 + 1e-6), (phase, net)


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).sort().values
    cdf = lambda s: torch.searchsorted(s.sort().values, grid, right=True).double() / len(s)  # noqa: E731
    return float((cdf(a) - cdf(b)).abs().max())


def test_fdistill_trains_the_fake_score_where_it_queries_it_and_sid_keeps_its_recipe():
    """f-distill/DMD (DMD2's practice): the critic's denoising noise levels have the generator
    phase's distribution. SiD (official): log-normal for the critic, Karras time for the generator."""
    torch.manual_seed(0)
    teacher = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4).float()
    seen = run_phases(FDistill.build(FDistillConfig(), teacher), teacher, n=20000)
    assert ks_distance(seen["fake_score"]["fake_score"], seen["generator"]["fake_score"]) < 0.025  # 1% level: 0.016
    seen = run_phases(SiD.build(SiDConfig(), teacher), teacher, n=20000)
    critic, query = seen["fake_score"]["fake_score"], seen["generator"]["fake_score"]
    assert ks_distance(critic, query) > 0.2
    assert float((critic > 5).double().mean()) < 0.02 and float((query > 5).double().mean()) > 0.2  # DESIGN: 1% vs 27%


def test_noise_distributions():
    like = torch.zeros(1, dtype=torch.float64)
    torch.manual_seed(0)
    k = KarrasTime(0.002, 80.0, 7.0, 0.0, 0.8).draw(100000, like)
    top = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert float(k.min()) >= 0.002 and float(k.max()) <= top + 1e-9 and top == pytest.approx(24.4, abs=0.1)
    ln = LogNormal(0.01, 80.0, -1.2, 1.2).draw(100000, like)
    assert float(ln.min()) == 0.01 and float(ln.log().median()) == pytest.approx(-1.2, abs=0.02)
    sig = torch.linspace(0.01, 157, 1000, dtype=torch.float64)
    t = Timesteps(sig, 0.02, 0.98)
    assert t.index_range == (20, 980) and t.lo == float(sig[20]) and t.hi == float(sig[979])
    d = t.draw(100000, like)
    assert float(d.min()) == float(sig[20]) and float(d.max()) == float(sig[979])


def test_noise_range_defaults_and_errors():
    vp_like = narrow_teacher()
    assert noise_range(vp_like, None, None) == (LO, HI)  # EDM's range clipped to the teacher's
    assert noise_range(GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4), None, None) == (0.002, 80.0)
    with pytest.raises(ConfigError, match=r"objective.sigma_min/sigma_max = 0.002/20 must satisfy 0.05 <= sigma_min"):
        noise_range(vp_like, 0.002, None)
    with pytest.raises(ConfigError, match="needs a teacher with discrete training timesteps"):
        make_noise_levels("timesteps", vp_like, sigma_min=None, sigma_max=None, rho=7, tmin=20, tmax=980, p_mean=0, p_std=1)
    with pytest.raises(ConfigError, match="objective.sigma_min"):
        SiD.build(SiDConfig(sigma_max=100.0), vp_like)


def tiny_unet_denoiser():
    from diffusers import DDPMScheduler, UNet2DModel

    from distilldiff.teachers.vp import VPDenoiser

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4)
    return VPDenoiser(unet, DDPMScheduler(num_train_timesteps=1000).alphas_cumprod, "epsilon", (1, 8, 8), num_classes=3, null_class=3)


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_head_reads_the_fake_scores_features(kind):
    """One evaluation gives D and the logit; the logit starts at 0 (r = 1); D is the fake score's."""
    den = tiny_unet_denoiser() if kind == "unet" else copy.deepcopy(fitted_copy())
    critic = ScoreWithHead(copy.deepcopy(den))
    shape = den.sample_shape
    x, sigma = torch.randn(5, *shape), torch.rand(5) + 0.1
    cond = {"class_labels": torch.tensor([0, 1, 2, 3, 0])} if kind == "unet" else {}
    d, logit = critic(x, sigma, with_logit=True, **cond)
    assert logit.shape == (5,) and bool((logit == 0).all())
    torch.testing.assert_close(d, den(x, sigma, **cond))
    torch.testing.assert_close(critic(x, sigma, **cond), d)
    assert len(critic.trainable_parameters()) == len(list(den.parameters())) + len(list(critic.head.parameters())) + (kind == "unet")


def test_conv_head_is_a_patch_discriminator_on_the_feature_map():
    """disc_head=conv: logits on the bottleneck map itself (not its mean), averaged; starts at 0; D unchanged;
    refused on MLP features and without a discriminator."""
    den = tiny_unet_denoiser()
    critic = ScoreWithHead(copy.deepcopy(den), head="conv")
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.5), torch.tensor([0, 1, 2, 0])
    d, logit = critic(x, sigma, with_logit=True, class_labels=labels)
    assert logit.shape == (4,) and bool((logit == 0).all())
    torch.testing.assert_close(d, den(x, sigma, class_labels=labels))
    with torch.no_grad():
        critic.head[-1].weight.normal_()
    maps = []
    hook = critic.head[0].register_forward_hook(lambda m, i, o: maps.append(i[0]))
    _, trained = critic(x, sigma, with_logit=True, class_labels=labels)
    hook.remove()
    assert maps[0].ndim == 4 and maps[0].shape[-2:] != (1, 1)  # the head read a feature map, not its mean
    assert bool((trained != 0).all())
    with pytest.raises(ValueError, match="conv discriminator head needs feature maps"):
        ScoreWithHead(copy.deepcopy(fitted_copy()), head="conv")
    with pytest.raises(ValueError, match="disc_head needs a discriminator head"):
        FDistillConfig(disc_head="conv")  # DMD: no head
    sida = SiD.build(SiDConfig(adv_weight=0.01, disc_head="conv"), narrow_teacher())
    assert sida.make_critic("fake_score", tiny_unet_denoiser()).head_kind == "conv"


def test_decoder_features_are_the_unets_full_resolution_map():
    """disc_features=decoder: the head reads the last up block's map (the image's resolution, where the bottleneck
    is coarser); starts at 0 with D unchanged; refused where there is no decoder and without a discriminator."""
    den = tiny_unet_denoiser()
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.full((4,), 0.05), torch.tensor([0, 1, 2, 0])
    sizes = {}
    for features in ("bottleneck", "decoder"):
        critic = ScoreWithHead(copy.deepcopy(den), head="conv", features=features)
        assert feature_module(critic.denoiser, features) is (den_model(critic).up_blocks[-1] if features == "decoder"
                                                             else den_model(critic).mid_block)
        d, logit = critic(x, sigma, with_logit=True, class_labels=labels)
        assert bool((logit == 0).all())
        torch.testing.assert_close(d, den(x, sigma, class_labels=labels))
        maps = []
        hook = critic.head[0].register_forward_hook(lambda m, i, o: maps.append(i[0]))
        critic(x, sigma, with_logit=True, class_labels=labels)
        hook.remove()
        sizes[features] = tuple(maps[0].shape[-2:])
    assert sizes == {"bottleneck": (4, 4), "decoder": (8, 8)}
    with pytest.raises(ValueError, match="no decoder features"):
        ScoreWithHead(copy.deepcopy(fitted_copy()), features="decoder")  # an MLP
    with pytest.raises(ValueError, match="disc_features needs a discriminator head"):
        FDistillConfig(disc_features="decoder")  # DMD: no head
    with pytest.raises(ValueError, match="disc_features: 'pixels' is not one of bottleneck, decoder"):
        FDistillConfig(divergence="js", disc_features="pixels")
    with pytest.raises(ValueError, match="disc_features needs a discriminator head"):
        SiDConfig(disc_features="decoder")  # plain SiD
    fd = FDistill.build(FDistillConfig(divergence="js", disc_features="decoder"), narrow_teacher())
    assert fd.make_critic("fake_score", tiny_unet_denoiser()).features == "decoder"
    sida = SiD.build(SiDConfig(adv_weight=0.01, disc_features="decoder"), narrow_teacher())
    assert sida.make_critic("fake_score", tiny_unet_denoiser()).features == "decoder"


def den_model(critic):
    return critic.denoiser.model


@pytest.mark.parametrize("trains_fake_score", [True, False])
def test_discriminator_loss_trains_the_head_and_the_fake_score_as_configured(trains_fake_score):
    torch.manual_seed(0)
    critic = ScoreWithHead(copy.deepcopy(fitted_copy()))
    with torch.no_grad():  # a non-zero head, so that gradients reach the features
        critic.head[-1].weight.normal_()
    gen = OneStepGenerator(copy.deepcopy(fitted_copy()), 2.5)
    noise = KarrasTime(0.002, 80.0)
    x, _ = gmm_data(64, "cpu")
    batch = Batch(noise=torch.randn(64, 2), real=x)
    nets = {"fake_score": critic, "generator": gen}
    params = list(critic.head.parameters()) + list(critic.denoiser.parameters())
    n_head = len(list(critic.head.parameters()))

    def grads(disc_noise):
        torch.manual_seed(1)  # the same draws for the denoising part in both calls
        loss, logs = critic_loss(nets, batch, fake_noise=noise, disc_noise=disc_noise, sigma_data=critic.sigma_data,
                                 disc_weight=1.0, detach_features=not trains_fake_score)
        g = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if gi is None else gi for p, gi in zip(params, g)], logs

    g_all, logs = grads(noise)
    g_denoise, _ = grads(None)
    assert {"denoise_loss", "disc_loss", "disc_accuracy"} <= set(logs)
    disc = [a - b for a, b in zip(g_all, g_denoise)]  # the discriminator term's gradient
    assert all(float(g.abs().sum()) > 0 for g in disc[:n_head]) and all(float(g.abs().sum()) == 0 for g in g_denoise[:n_head])
    assert any(float(g.abs().sum()) > 1e-8 for g in disc[n_head:]) == trains_fake_score
    assert not any(p.grad is not None for p in gen.parameters())  # no gradient reaches the generator


@pytest.mark.parametrize("objective", [SiD.build(SiDConfig(adv_weight=0.01, head_lr_scale=20.0), narrow_teacher()),
                                       FDistill.build(FDistillConfig(gan_weight=0.01, head_lr_scale=20.0), narrow_teacher())],
                         ids=["sida", "dmd2"])
def test_head_learns_at_its_own_multiple_of_the_learning_rate(objective):
    """head_lr_scale puts the discriminator head (and only it) in its own optimiser group at that multiple of lr."""
    from distilldiff.engine.engine import param_groups

    critic = objective.make_critic("fake_score", copy.deepcopy(fitted_copy()))
    groups = param_groups(critic, critic.trainable_parameters(), 1e-4)
    by_scale = {g["lr_scale"]: (g["lr"], {id(p) for p in g["params"]}) for g in groups}
    assert set(by_scale) == {1.0, 20.0}
    assert by_scale[20.0] == (pytest.approx(2e-3), {id(p) for p in critic.head_parameters()})
    assert by_scale[1.0] == (pytest.approx(1e-4), {id(p) for p in critic.denoiser.parameters()})
    default = SiD.build(SiDConfig(adv_weight=0.01), narrow_teacher()).make_critic("fake_score", fitted_copy())
    assert param_groups(default, default.trainable_parameters(), 1e-4) == default.trainable_parameters()  # one group


def test_head_lr_scale_needs_a_head_and_a_positive_value():
    with pytest.raises(ValueError, match="head_lr_scale needs a discriminator head"):
        SiDConfig(head_lr_scale=10.0)  # plain SiD has no head
    with pytest.raises(ValueError, match="head_lr_scale needs a discriminator head"):
        FDistillConfig(head_lr_scale=10.0)  # DMD (reverse KL, no GAN term) has none either
    with pytest.raises(ValueError, match="head_lr_scale must be > 0"):
        SiDConfig(adv_weight=0.01, head_lr_scale=0.0)


def test_sida_and_dmd2_need_real_data_and_plain_sid_does_not():
    t = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4)
    assert not SiD.build(SiDConfig(), t).needs_real_data
    sida = SiD.build(SiDConfig(adv_weight=0.01), t)
    assert sida.needs_real_data and isinstance(sida.make_critic("fake_score", fitted_copy()), ScoreWithHead)
    assert not isinstance(SiD.build(SiDConfig(), t).make_critic("fake_score", fitted_copy()), ScoreWithHead)
    assert FDistill.build(FDistillConfig(gan_weight=0.01), t).needs_real_data


def test_sida_generator_term_is_on_sids_scale():
    """SiDA's generator loss is SiD's plus adv_weight * mean_B[CHW softplus(-l(x_t)) / w] at the same x_t: the
    authors' code counts the GAN loss once per element and divides it by SiD's per-sample normaliser w."""
    import torch.nn.functional as F

    t = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4).float()
    sida = SiD.build(SiDConfig(adv_weight=0.01), t)
    critic = sida.make_critic("fake_score", copy.deepcopy(fitted_copy()))
    torch.manual_seed(0)
    for p in critic.head.parameters():  # a head whose logits differ between samples (it starts at 0)
        p.data.normal_(0.0, 0.5)
    gen = OneStepGenerator(copy.deepcopy(fitted_copy()), 2.5)
    nets = {"teacher": t, "fake_score": critic, "generator": gen}
    batch = Batch(noise=torch.randn(256, 2), real=gmm_data(256, "cpu")[0])
    torch.manual_seed(1)
    total, logs = sida.generator_loss(nets, batch)
    torch.manual_seed(1)  # replay the draws: the noise levels, then the noise
    x_g = gen(batch.noise)
    sigma = sida.generator_sigma(256, x_g)
    x_t = x_g + sigma[:, None] * torch.randn_like(x_g)
    y_real = t(x_t, sigma)
    y_fake, logit = critic(x_t, sigma, with_logit=True)
    sid_loss, _ = sida.generator_loss_from(x_g, y_real, y_fake)
    w = (x_g - y_real).abs().mean(1)
    adv = (2 * F.softplus(-logit) / w).mean()  # C*H*W = 2 elements per sample here
    assert logit.std() > 0.1 and adv > 0.01 * abs(sid_loss)  # the term is not negligible in this check
    torch.testing.assert_close(total, sid_loss + 0.01 * adv)
    torch.testing.assert_close(logs["adv_loss"], F.softplus(-logit).mean())  # logged unscaled


def test_near_black_share_measures_background_noise():
    from distilldiff.data import mnist5k
    from distilldiff.metrics.background import near_black_share

    x, _ = mnist5k()
    clean = near_black_share(x)
    assert clean == pytest.approx(0.8134, abs=1e-4)
    torch.manual_seed(0)
    assert near_black_share(x + 0.05 * torch.randn_like(x)) < clean - 0.05  # speckle of ~6/255 rms
    assert near_black_share(torch.full((1, 1, 2, 2), -1.0)) == 1.0 and near_black_share(torch.zeros(1, 1, 2, 2)) == 0.0


def test_faint_share_counts_the_band_of_faint_grey():
    from distilldiff.data import mnist5k
    from distilldiff.metrics.background import faint_share, near_black_share, to_uint8

    # 8-bit values 0, 2, 3, 8, 9, 32, 33, 255: the band [3, 32] holds four of the eight, ends included
    levels = torch.tensor([0, 2, 3, 8, 9, 32, 33, 255], dtype=torch.float64)
    x = ((levels + 0.5 - 128) / 127.5).view(1, 1, 1, 8)
    assert to_uint8(x).flatten().tolist() == levels.tolist()
    assert faint_share(x) == 0.5 and faint_share(x, band=(0, 2)) == 0.25 and faint_share(x, band=(33, 255)) == 0.25
    with pytest.raises(ValueError, match="faint band"):
        faint_share(x, band=(40, 3))
    real, _ = mnist5k()
    clean = faint_share(real)
    assert 0.01 < clean < 0.03  # MNIST-5k: 0.020
    # a speckle that near-black cannot see: every black pixel lifted to 5/255 stays near-black, turns faint
    lifted = torch.where(real <= -1 + 1e-6, torch.full_like(real, -1 + 5.5 / 127.5), real)
    assert near_black_share(lifted) == near_black_share(real)
    assert faint_share(lifted) > clean + 0.7
