"""Consistency distillation: the boundary condition, the ODE step, and convergence on a GMM."""

import copy

import pytest
import torch

from distilldiff.config import StudentConfig
from distilldiff.engine import Engine
from distilldiff.objectives import ConsistencyConfig, ConsistencyDistillation
from distilldiff.students import ConsistencyDenoiser

from toy_setup import WEIGHTS, fitted_copy, mode_report, task_for, teacher, train_config


def test_boundary_condition_is_exact():
    f = ConsistencyDenoiser(teacher().double(), boundary_sigma=0.002)
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    assert torch.equal(f(x, 0.002), x)
    # far from the boundary the parameterisation is the wrapped denoiser up to (sigma - s0) / sigma
    torch.testing.assert_close(f(x, 80.0), teacher().double()(x, 80.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_teacher_ode_step_follows_the_exact_flow(solver):
    """The exact GMM teacher's probability-flow ODE maps a component's mean path exactly: for a
    single Gaussian N(m, s^2), x(sigma) = m + (x1 - m) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_1^2)."""
    from distilldiff.teachers import GaussianMixtureDenoiser

    single = GaussianMixtureDenoiser([1.0], [[0.5, -1.0]], [0.7]).double()
    cd = ConsistencyDistillation.build(ConsistencyConfig(solver=solver), single)
    x1 = torch.randn(16, 2, dtype=torch.float64)
    s1, s0 = torch.full((16,), 1.0, dtype=torch.float64), torch.full((16,), 0.98, dtype=torch.float64)
    x0 = cd.ode_step(single, x1, s1, s0, {})
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    exact = m + (x1 - m) * (0.49 + 0.98**2) ** 0.5 / (0.49 + 1.0) ** 0.5
    err = (x0 - exact).abs().max()
    assert err < (1e-3 if solver == "euler" else 1e-5)  # local error O(h^2) vs O(h^3), h = 0.02 (measured 1.2e-4, 1.6e-6)


@pytest.mark.slow  # minutes on 2 cores; the default suite keeps one-step CD on the mixture in 500 updates
# (test_parameterization.py::test_consistency_to_one_step_needs_a_bounded_output) and LCM's in 1, 2 and 4 steps
def test_one_step_consistency_student_reproduces_the_mixture(tmp_path):
    """CD on the 2-D 4-mode mixture with the exact teacher, from an MLP copy of the teacher."""
    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, target_ema=0.95), teacher())
    student = cd.make_student(fitted_copy(), StudentConfig())
    assert student.sigmas == [pytest.approx(80.0)] and student.sampler == "multistep"
    engine = Engine(task_for(cd, student), train_config(max_steps=3000, lr=1e-3, ema_halflife_kimg=20, seed=0), tmp_path)
    _, before_near = mode_report(engine.ema.module(torch.randn(4000, 2)).detach())
    engine.train()
    with torch.no_grad():
        mass, near = mode_report(engine.ema.module(torch.randn(4000, 2)))
    assert before_near < 0.2
    torch.testing.assert_close(mass, torch.tensor(WEIGHTS, dtype=torch.float64), rtol=0, atol=0.05)
    assert near > 0.7  # seeds 0-1 (Heun) gave 0.82-0.83, Euler 0.78; masses within 0.016 of the truth


def test_target_network_is_checkpointed_and_resumed(tmp_path):
    cd = ConsistencyDistillation.build(ConsistencyConfig(target_ema=0.5), teacher())
    cfg = train_config(max_steps=4, checkpoint_every=2, batch_size=32)
    engine = Engine(task_for(cd, cd.make_student(copy.deepcopy(fitted_copy()), StudentConfig())), cfg, tmp_path)
    engine.train()
    saved = {k: v.clone() for k, v in engine.frozen["target"].state_dict().items()}
    resumed = Engine(task_for(cd, cd.make_student(copy.deepcopy(fitted_copy()), StudentConfig())), cfg, tmp_path)
    resumed.load_checkpoint(resumed.run_folder.find_checkpoint("latest"))
    fresh = cd.make_target(cd.make_student(copy.deepcopy(fitted_copy()), StudentConfig())).state_dict()
    for k, v in resumed.frozen["target"].state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    assert any((fresh[k] - saved[k]).abs().max() > 0 for k in saved)  # the target did move


@pytest.mark.parametrize("kwargs, message", [
    ({"num_scales": 1}, "objective.num_scales must be >= 2"),
    ({"target_ema": 1.0}, r"objective.target_ema must be in \[0, 1\)"),
    ({"sample_steps": 18}, r"objective.sample_steps must be in \[1, num_scales - 1\]"),
    ({"w_min": 1.0}, "objective.w_min/w_max must both be set"),
    ({"w_min": 2.0, "w_max": 1.0}, "0 <= w_min < w_max"),
    ({"default_w": 1.0}, "objective.default_w=1.0 needs w_min/w_max"),
    ({"guidance_embed_scale": 10.0}, "objective.guidance_embed_scale applies with w_min/w_max only"),
    ({"sample_sigmas": [80.0, 2.0, 2.0]}, "objective.sample_sigmas must be positive and decrease strictly"),
    ({"sample_sigmas": [80.0, 0.0]}, "objective.sample_sigmas must be positive"),
    ({"sample_sigmas": []}, "objective.sample_sigmas must be positive and decrease strictly"),
    ({"sample_sigmas": [80.0, 0.1], "sample_steps": 4}, r"gives the number of steps itself \(2\); remove objective.sample_steps \(4\)"),
    ({"sample_sigmas": [80.0, 0.1], "schedule": "lcm", "num_scales": 50}, "objective.sample_sigmas applies with schedule: karras only"),
    ({"multistep": "segments", "schedule": "lcm", "num_scales": 50}, "objective.multistep: segments applies with schedule: karras only"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyConfig(**kwargs)
    with pytest.raises(ValueError, match="must satisfy"):
        ConsistencyDistillation.build(ConsistencyConfig(sigma_min=5.0, sigma_max=1.0), teacher())


def test_multistep_sigmas_pick_from_the_training_grid():
    from distilldiff.samplers import multistep_sigmas

    grid = [0.01, 0.1, 1.0, 10.0, 80.0]  # increasing, as the objective stores it
    assert multistep_sigmas(grid, 1) == [80.0]
    assert multistep_sigmas(grid, 2) == [80.0, 1.0]
    assert multistep_sigmas(grid, 4) == [80.0, 10.0, 1.0, 0.1]
    with pytest.raises(ValueError, match="1 to 4 steps on a grid of 5 noise levels, got 5"):
        multistep_sigmas(grid, 5)


def test_sample_sigmas_replace_the_grid_levels_of_the_student():
    """objective.sample_sigmas: the student samples at exactly those levels (their count is its steps); outside
    the grid's range they are a one-line config error."""
    from distilldiff.config import ConfigError

    cfg = ConsistencyConfig(num_scales=18, sample_sigmas=[80.0, 15.0, 2.0, 0.1])
    assert cfg.sample_steps == 4
    cd = ConsistencyDistillation.build(cfg, teacher())
    student = cd.make_student(copy.deepcopy(fitted_copy()), StudentConfig())
    assert student.sigmas == [80.0, 15.0, 2.0, 0.1] and student.sampler == "multistep"
    assert student(torch.randn(16, 2), torch.Generator().manual_seed(0)).shape == (16, 2)
    default = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, sample_steps=4), teacher())
    assert default.make_student(copy.deepcopy(fitted_copy()), StudentConfig()).sigmas[-1] == pytest.approx(float(cd.sigmas[4]))
    low = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, sample_sigmas=[80.0, 0.001]), teacher())
    with pytest.raises(ConfigError, match=r"objective.sample_sigmas: \[0.001\] outside the consistency grid's range"):
        low.make_student(copy.deepcopy(fitted_copy()), StudentConfig())


# --- multistep consistency (objective.multistep: segments; Heek et al. 2024) ---------------------


def test_segments_cut_the_grid_at_the_sample_levels():
    """The sample levels join the Karras grid with 0 below it; each level maps to the lower end of its own
    segment; the student samples by deterministic DDIM at the sample levels, in its own count of steps only."""
    from distilldiff.export import with_levels
    from distilldiff.objectives.consistency import SegmentConsistencyDistillation

    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, sample_sigmas=[80.0, 15.0, 2.0, 0.1], multistep="segments"), teacher())
    assert isinstance(cd, SegmentConsistencyDistillation)
    karras = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18), teacher()).sigmas
    assert cd.sigmas[0] == 0 and len(cd.sigmas) == 18 + 1 + 3  # 80 is the grid's top already
    assert set(karras.tolist()) | {0.0, 15.0, 2.0, 0.1} == set(cd.sigmas.tolist())
    assert cd.boundaries.tolist() == [0.0, 0.1, 2.0, 15.0]
    s = torch.tensor([0.01, 0.1, 0.1001, 2.0, 14.9, 15.0, 15.01, 80.0], dtype=torch.float64)
    assert cd.segment_end(s).tolist() == [0.0, 0.0, 0.1, 0.1, 2.0, 2.0, 15.0, 15.0]
    student = cd.make_student(copy.deepcopy(fitted_copy()), StudentConfig())
    assert student.sigmas == [80.0, 15.0, 2.0, 0.1] and student.sampler == "ddim"
    z = torch.randn(16, 2)
    assert torch.equal(student(z, torch.Generator().manual_seed(0)), student(z, torch.Generator().manual_seed(1)))
    info = cd.student_info()
    assert info == {"consistency_segments": [80.0, 15.0, 2.0, 0.1]}
    with pytest.raises(ValueError, match="samples in 4 step"):
        with_levels(student, info, "run", steps=2)
    default = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, sample_steps=4, multistep="segments"), teacher())
    assert default.tops == [pytest.approx(v) for v in karras.flip(0)[[0, 4, 9, 13]].tolist()]  # the renoise sampler's levels
    assert len(default.sigmas) == 19


def test_a_step_to_zero_is_the_teachers_denoiser():
    """The teacher's ODE step from sigma to 0 (the last segment's end) is Euler, D(x, sigma) itself, beside Heun
    steps of the same batch to levels above 0."""
    from distilldiff.teachers import GaussianMixtureDenoiser

    single = GaussianMixtureDenoiser([1.0], [[0.5, -1.0]], [0.7]).double()
    cd = ConsistencyDistillation.build(ConsistencyConfig(multistep="segments", sample_steps=2), single)
    x = torch.randn(4, 2, dtype=torch.float64)
    s_from = torch.tensor([0.02, 0.02, 1.0, 1.0], dtype=torch.float64)
    s_to = torch.tensor([0.0, 0.0, 0.98, 0.98], dtype=torch.float64)
    out = cd.ode_step(single, x, s_from, s_to, {})
    torch.testing.assert_close(out[:2], single(x[:2], s_from[:2]), rtol=0, atol=1e-12)
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    exact = m + (x[2:] - m) * (0.49 + 0.98**2) ** 0.5 / (0.49 + 1.0) ** 0.5
    assert (out[2:] - exact).abs().max() < 1e-5  # Heun, as test_teacher_ode_step_follows_the_exact_flow


@pytest.mark.parametrize("solver, zero_for_the_teacher", [("euler", True), ("heun", False)])
def test_one_level_per_segment_regresses_on_the_teachers_step(solver, zero_for_the_teacher):
    """With every grid level a sample level, each segment is one teacher step: the target is the denoised estimate
    of the teacher's own step, which for Euler (= DDIM) is the teacher's D. A copy of the teacher has loss 0 there;
    a perturbed copy does not; with Heun the target differs from D by Heun's correction."""
    from distilldiff.objectives.base import Batch, Phase
    from distilldiff.samplers import karras_sigmas

    t = teacher().double()
    levels = karras_sigmas(3, 0.002, 80.0).tolist()
    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=3, sample_sigmas=levels, multistep="segments",
                                                         solver=solver, distance="l2"), t)
    assert cd.boundaries.tolist() == [0.0, *sorted(levels)[:-1]]

    def loss_of(student_net):
        student = cd.make_student(student_net, StudentConfig())
        nets = {"teacher": t, "student": student, "target": cd.make_target(student)}
        torch.manual_seed(0)
        x0 = torch.randn(256, 2, dtype=torch.float64)
        return float(cd.loss(Phase("consistency", "student"), nets, Batch(noise=x0, real=x0))[0].detach())

    same = loss_of(copy.deepcopy(t))
    assert (same < 1e-20) == zero_for_the_teacher, same
    assert loss_of(copy.deepcopy(fitted_copy()).double()) > 1e-4


def test_guidance_conditioning_needs_an_unguided_teacher_with_a_null_class():
    from distilldiff.teachers import CFGDenoiser, GaussianMixtureDenoiser

    from toy_setup import MEANS, STD

    with pytest.raises(ValueError, match="null class"):
        ConsistencyDistillation.build(ConsistencyConfig(w_min=0.0, w_max=2.0), teacher())
    labelled = GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4, component_labels=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="guidance_scale: 0"):
        ConsistencyDistillation.build(ConsistencyConfig(w_min=0.0, w_max=2.0), CFGDenoiser(labelled, 1.0))


# --- LCM's discretisation and parameterisation (schedule: lcm) ---------------------------------


def test_lcm_sampling_timesteps_are_diffusers_lcm_schedulers():
    from diffusers import LCMScheduler

    from distilldiff.samplers import lcm_grid_timesteps, lcm_sample_timesteps

    assert lcm_grid_timesteps(1000, 50)[:3] == [0, 19, 39] and lcm_grid_timesteps(1000, 50)[-1] == 999
    for t_train, n in [(1000, 50), (1000, 18), (1000, 333), (600, 7), (600, 600)]:
        for k in range(1, n + 1):
            s = LCMScheduler(num_train_timesteps=t_train)
            s.set_timesteps(k, original_inference_steps=n)
            assert lcm_sample_timesteps(t_train, n, k) == s.timesteps.tolist(), (t_train, n, k)
    with pytest.raises(ValueError, match="LCM sampling takes 1 to 50 steps"):
        lcm_sample_timesteps(1000, 50, 51)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_parameterisation_is_lcm_schedulers_denoised(prediction_type):
    """f(x, sigma) at a student timestep equals the ``denoised`` of diffusers' LCMScheduler.step on
    the same network output; at t = 0 it is exactly the VP-scaled input."""
    from diffusers import LCMScheduler

    from distilldiff.students import LCMConsistencyDenoiser
    from distilldiff.toy import vp_mlp_denoiser

    torch.manual_seed(0)
    inner = vp_mlp_denoiser(2, prediction_type).double()
    f = LCMConsistencyDenoiser(inner, num_scales=50)
    sched = LCMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type=prediction_type)
    sched.set_timesteps(4, original_inference_steps=50)
    sigmas = f.sample_sigmas(4)
    assert torch.allclose(inner.sigma_to_timestep(torch.tensor(sigmas, dtype=torch.float64)), sched.timesteps.double(), atol=1e-6)
    x = torch.randn(16, 2, dtype=torch.float64) * 2
    for i, (t, s) in enumerate(zip(sched.timesteps, sigmas)):
        x_t = x / (1 + s**2) ** 0.5
        with torch.no_grad():
            out = inner.model(x_t, torch.full((16,), float(t), dtype=torch.float64))
            ours = f(x, torch.full((16,), s, dtype=torch.float64))
        sched._step_index = i
        _, denoised = sched.step(out, t, x_t, generator=torch.Generator().manual_seed(0), return_dict=False)
        torch.testing.assert_close(ours, denoised.double(), rtol=1e-5, atol=1e-5)  # diffusers keeps alphas in float32
    s0 = inner.sigma_min
    assert torch.equal(f(x, torch.full((16,), s0, dtype=torch.float64)), x / (1 + s0**2) ** 0.5)


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "lcm", "sigma_min": 0.01}, "objective.sigma_min: schedule 'lcm' runs on the teacher's own timesteps"),
    ({"schedule": "lcm", "num_scales": 50, "sample_steps": 51}, r"sample_steps must be in \[1, num_scales\] with schedule 'lcm'"),
    ({"timestep_scaling": 5.0}, "objective.timestep_scaling applies with schedule: lcm only"),
])
def test_lcm_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConsistencyConfig(**kwargs)


def test_lcm_schedule_needs_a_discrete_time_teacher():
    with pytest.raises(ValueError, match="schedule: lcm needs a teacher with discrete training timesteps"):
        ConsistencyDistillation.build(ConsistencyConfig(schedule="lcm"), teacher())
