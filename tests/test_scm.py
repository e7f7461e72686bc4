"""sCM (continuous-time consistency distillation in TrigFlow): the tangent, and convergence on a GMM."""

import math

import pytest
import torch

from distilldiff.config import StudentConfig
from distilldiff.engine import Engine
from distilldiff.objectives import SCM, SCMConfig
from distilldiff.objectives.scm import trigflow_F

from toy_setup import WEIGHTS, fitted_copy, mode_report, task_for, teacher, train_config


def test_trigflow_output_of_a_denoiser_is_the_consistency_function():
    """f = cos t x_t - sin t sigma_d F recovers D(x_t / cos t, sigma_d tan t); F is finite at small t."""
    gmm = teacher().double()
    sd = gmm.sigma_data
    x_t = torch.randn(8, 2, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.7, 1.2, 1.5, 1.55, 0.3, 0.9], dtype=torch.float64)
    F = trigflow_F(gmm, x_t, t, sd, {})
    f = t.cos()[:, None] * x_t - t.sin()[:, None] * sd * F
    torch.testing.assert_close(f, gmm(x_t / t.cos()[:, None], sd * t.tan()), rtol=1e-12, atol=1e-12)


def test_tangent_equals_a_finite_difference_along_the_teachers_flow():
    """sCM's JVP: cos t sin t dF/dt along dx_t/dt equals a central difference of F over (x_t + h dx_t/dt, t + h)
    on the exact mixture (float64; the 'student' is the analytic denoiser itself)."""
    gmm = teacher().double()
    scm = SCM.build(SCMConfig(), gmm)
    x0, _ = gmm.sample(16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.linspace(0.05, 1.5, 16, dtype=torch.float64)
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * gmm.sigma_data * torch.randn(16, 2, dtype=torch.float64)
    v = scm.teacher_velocity(gmm, x_t, t, {})
    F, dF = scm.tangent(gmm, x_t, t, v, {})
    h = 1e-6
    Fp = trigflow_F(gmm, x_t + h * v, t + h, gmm.sigma_data, {})
    Fm = trigflow_F(gmm, x_t - h * v, t - h, gmm.sigma_data, {})
    fd = (t.cos() * t.sin())[:, None] * (Fp - Fm) / (2 * h)
    torch.testing.assert_close(F, trigflow_F(gmm, x_t, t, gmm.sigma_data, {}), rtol=0, atol=0)
    torch.testing.assert_close(dF, fd, rtol=1e-6, atol=1e-6)
    # the unnormalised tangent is cos t df/dt, f = cos t x_t - sin t sigma_d F the consistency function
    c = 1e9  # g / (||g|| + c) * c = g to ~1e-9
    g = SCM.build(SCMConfig(tangent_norm_const=c), gmm).tangent_target(F, dF, x_t, t, v, r=1.0) * c
    f = lambda x, tt: tt.cos()[:, None] * x - tt.sin()[:, None] * gmm.sigma_data * trigflow_F(gmm, x, tt, gmm.sigma_data, {})  # noqa: E731
    df_dt = (f(x_t + h * v, t + h) - f(x_t - h * v, t - h)) / (2 * h)
    torch.testing.assert_close(g, t.cos()[:, None] * df_dt, rtol=1e-6, atol=1e-6)
    assert g.abs().max() > 1e-2  # D is not the flow's consistency function: f moves along the flow


def test_tangent_warmup_and_normalisation():
    scm = SCM.build(SCMConfig(tangent_warmup=100), teacher())
    assert scm.warmup(0) == 0 and scm.warmup(50) == 0.5 and scm.warmup(500) == 1.0
    assert SCM.build(SCMConfig(tangent_warmup=0), teacher()).warmup(0) == 1.0
    g = scm.tangent_target(torch.randn(4, 2) * 100, torch.randn(4, 2) * 100, torch.randn(4, 2), torch.full((4,), 0.5),
                           torch.randn(4, 2), r=1.0)
    assert (g.norm(dim=1) < 1).all() and (g.norm(dim=1) > 0.99).all()


@pytest.mark.parametrize("steps,updates", [
    pytest.param(1, 3000, marks=pytest.mark.slow),  # ~2 min; measured (seed 0): masses within 0.036 at 3000 updates, 0.07 at 1500
    (2, 1500),  # measured (seed 0): masses within 0.03 of the truth, 79% of samples near a mode, at 1000 updates
])
def test_scm_student_reproduces_the_mixture(steps, updates, tmp_path):
    """sCD with the exact teacher from an MLP copy: every mode keeps its mass in one and two steps."""
    scm = SCM.build(SCMConfig(sample_steps=steps, tangent_warmup=300), teacher())
    student = scm.make_student(fitted_copy(), StudentConfig())
    assert student.sigmas[0] == 80.0 and len(student.sigmas) == steps
    if steps == 2:
        assert student.sigmas[1] == pytest.approx(teacher().sigma_data * math.tan(1.1)) and student.sampler == "multistep"
    engine = Engine(task_for(scm, student), train_config(max_steps=updates, lr=1e-3, ema_halflife_kimg=20, seed=0), tmp_path)
    _, before_near = mode_report(engine.ema.module(torch.randn(4000, 2), generator=torch.Generator().manual_seed(1)).detach())
    engine.train()
    with torch.no_grad():
        mass, near = mode_report(engine.ema.module(torch.randn(4000, 2), generator=torch.Generator().manual_seed(1)))
    assert before_near < 0.2
    torch.testing.assert_close(mass, torch.tensor(WEIGHTS, dtype=torch.float64), rtol=0, atol=0.05)
    assert near > 0.7


@pytest.mark.parametrize("kwargs,message", [
    ({"sample_steps": 3}, "sample_steps must be 1 or 2"),
    ({"mid_time": 1.6}, "mid_time must be in .0, pi/2."),
    ({"tangent_warmup": -1}, "tangent_warmup must be >= 0"),
    ({"tangent_norm_const": 0.0}, "tangent_norm_const must be > 0"),
    ({"p_std": 0.0}, "p_std must be > 0"),
    ({"adv_weight": -0.1}, "adv_weight must be >= 0"),
    ({"adv_top_prob": 1.5}, "adv_top_prob must be in .0, 1."),
    ({"disc_p_std": 0.0}, "disc_p_std must be > 0"),
    ({"disc_ratio": 0}, "disc_ratio must be >= 1"),
])
def test_scm_config_errors(kwargs, message):
    from distilldiff.config import ConfigError, DistillConfig, load_config

    data = {"teacher": {"path": "builtin:mnist"}, "objective": {"name": "scm", **kwargs}}
    with pytest.raises(ConfigError, match=message):
        load_config(DistillConfig, data=data)


def test_ladd_discriminator_is_a_frozen_teacher_copy_with_a_trained_head(tmp_path):
    """sCM + LADD: a second phase trains only the discriminator's head (the copy of the teacher under it stays
    as it was); the student's loss gains the adversarial term, whose gradient reaches the student through the
    frozen discriminator; against a student that draws one blurred point, the head learns to tell real from fake."""
    from distilldiff.objectives.critic import ScoreWithHead, hinge_generator_loss, noised

    assert "discriminator" not in SCM.build(SCMConfig(), teacher()).networks
    scm = SCM.build(SCMConfig(adv_weight=0.5, tangent_warmup=0), teacher())
    assert scm.networks == {"teacher": "frozen", "student": "student", "discriminator": "critic"}
    assert [(p.name, p.repeats) for p in scm.phases()] == [("scm", 1), ("discriminator", 1)]
    assert SCM.build(SCMConfig(adv_weight=0.5, disc_ratio=3), teacher()).phases()[1].repeats == 3
    student = scm.make_student(fitted_copy(), StudentConfig())
    task = task_for(scm, student)
    disc = task.networks["discriminator"]
    assert isinstance(disc, ScoreWithHead) and not disc.train_backbone
    head_ids = {id(p) for p in list(disc.head.parameters())}
    assert {id(p) for p in disc.trainable_parameters()} == head_ids
    backbone = {k: v.clone() for k, v in disc.denoiser.state_dict().items()}
    head = {k: v.clone() for k, v in disc.head.state_dict().items()}
    engine = Engine(task, train_config(max_steps=60, lr=1e-12, critic_lr=3e-3, seed=0), tmp_path)
    engine.train()
    trained = engine.accelerator.unwrap_model(engine.models["discriminator"])
    assert all(torch.equal(backbone[k], v) for k, v in trained.denoiser.state_dict().items())
    assert any(not torch.equal(head[k], v) for k, v in trained.head.state_dict().items())
    # the (nearly) fixed student (lr 1e-12) predicts near the mixture's mean from sigma = 80: the head separates it from real data
    x0 = teacher().sample(512, generator=torch.Generator().manual_seed(3))[0].float()
    torch.manual_seed(4)
    with torch.no_grad():
        fake = scm.student_prediction(student, x0, {})
        s = scm.disc_levels.draw(512, x0)
        _, l_real = trained(noised(x0, s), s, with_logit=True)
        _, l_fake = trained(noised(fake, s), s, with_logit=True)
    assert float(((l_real > 0).float().mean() + (l_fake < 0).float().mean()) / 2) > 0.6
    assert engine.history.latest()["discriminator/logit_gap"] > 0  # logged: real above fake
    # the generator phase's adversarial term: a gradient to the student through the frozen discriminator
    nets = {"teacher": teacher(), "student": student, "discriminator": trained}
    batch = engine._batch()
    torch.manual_seed(9)
    total, logs = scm.loss(scm.phases()[0], nets, batch)
    torch.manual_seed(9)
    consistency, _ = scm.consistency_loss(nets, batch)  # its draws come first
    torch.testing.assert_close(total.detach(), consistency.detach() + 0.5 * logs["adv_loss"])
    for p in student.trainable_parameters():
        p.requires_grad_(True)
        p.grad = None
    x_fake = scm.student_prediction(student, x0, {})
    _, logit = trained(noised(x_fake, s), s, with_logit=True)
    hinge_generator_loss(logit).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trainable_parameters())
    assert all(p.grad is None for p in trained.denoiser.parameters())


def test_ladd_predictions_start_from_the_first_level_with_adv_top_prob():
    """adv_top_prob = 1: every fake sample is the student's one-step sample of the pure-noise part of the input."""
    scm = SCM.build(SCMConfig(adv_weight=0.5, adv_top_prob=1.0), teacher())
    student = scm.make_student(fitted_copy(), StudentConfig())
    x0 = torch.randn(64, 2)
    torch.manual_seed(0)
    got = scm.student_prediction(student, x0, {})
    torch.manual_seed(0)
    scm.levels.draw(64, x0), torch.rand(64)  # the same draws as student_prediction, before its noise
    n = torch.randn_like(x0)
    want = student.denoiser(x0 + 80.0 * n, torch.full((64,), 80.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
