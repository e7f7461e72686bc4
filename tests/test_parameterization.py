"""Student output parameterisation (``student.parameterization``): a copy of an epsilon teacher may
output v or x0 instead. On a VP noise range (sigma up to ~157) this decides whether a one-step
student can be distilled at all: an epsilon output's errors are multiplied by sigma in x0."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from distilldiff.config import PARAMETERIZATIONS, ConfigError, DistillConfig, StudentConfig, TeacherConfig, load_config
from distilldiff.objectives import ConsistencyConfig, ConsistencyDistillation, ProgressiveConfig, ProgressiveDistillation
from distilldiff.objectives.base import Batch
from distilldiff.objectives.progressive import full_grid, stage_plan
from distilldiff.students import ConsistencyDenoiser, OneStepGenerator, Student, reparameterized_copy, start_gap
from distilldiff.teachers import GaussianMixtureDenoiser, VPDenoiser
from distilldiff.teachers.conversions import vp_scale_input, vp_x0_from_output
from distilldiff.teachers.vp import PREDICTION_TYPES
from distilldiff.toy import MLPDenoiser, fit_denoiser, vp_mlp_denoiser

from toy_setup import MEANS, STD, WEIGHTS


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny MLPs gain nothing from intra-op threads, and lose much on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the toy problem: a 4-mode mixture seen through a VP network's noise range ----------------


@functools.lru_cache(maxsize=1)
def fitted_vp_copy() -> VPDenoiser:
    """An epsilon-predicting VP MLP (DDPM linear betas, sigma 0.01..157) regressed onto the exact
    mixture: the toy's "copy of an epsilon teacher"."""
    torch.manual_seed(0)
    net = vp_mlp_denoiser(2, "epsilon")
    net.sigma_data = exact_teacher().sigma_data
    return fit_denoiser(net, exact_teacher().double(), steps=1000).eval().requires_grad_(False)


def exact_teacher() -> GaussianMixtureDenoiser:
    """The exact mixture, on the VP network's noise range (so grids reach sigma ~ 157)."""
    vp = vp_mlp_denoiser(2)
    return GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4, sigma_min=vp.sigma_min, sigma_max=vp.sigma_max).float()


def mode_check(samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(mass [K], off)``: the share of on-mode samples at each mode (nearest mean, within 3
    component std) and the share of samples on no mode."""
    t = exact_teacher().double()
    k = t.assign_components(samples)
    on = (samples.double() - t.means[k]).norm(dim=1) < 3 * STD
    mass = torch.bincount(k[on], minlength=len(WEIGHTS)).double() / on.sum().clamp_min(1)
    return mass, float(1 - on.double().mean())


def keeps_modes(samples: torch.Tensor) -> bool:
    """Most samples on a mode, and every mode with its mixture weight (within 0.08)."""
    mass, off = mode_check(samples)
    return off < 0.45 and float((mass - torch.tensor(WEIGHTS, dtype=torch.float64)).abs().max()) < 0.08


def train(objective, nets: dict, steps: int, lr: float = 1e-3, batch: int = 256, decay: bool = True) -> None:
    """The objective's loss in a plain Adam loop on exact mixture samples (``decay``: lr linearly to 0)."""
    (phase,) = objective.phases()
    student = nets["student"]
    opt = torch.optim.Adam(student.trainable_parameters(), lr=lr)
    t = exact_teacher()
    for i in range(steps):
        x0, _ = t.sample(batch, dtype=torch.float32)
        loss, _ = objective.loss(phase, nets, Batch(noise=x0, real=x0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        objective.update_targets(nets)
        for group in opt.param_groups:
            group["lr"] = lr * (1 - (i + 1) / steps) if decay else lr
    student.eval().requires_grad_(False)


def one_step_samples(student: Student, n: int = 4000) -> torch.Tensor:
    with torch.no_grad():
        return student(torch.randn(n, 2, generator=torch.Generator().manual_seed(1)))


# --- config ----------------------------------------------------------------------------------


def test_config_key_and_one_line_errors():
    assert PARAMETERIZATIONS == PREDICTION_TYPES  # config.py stays torch-free, so it keeps its own copy
    assert StudentConfig().parameterization is None and StudentConfig(parameterization="sample").set_keys() == ["parameterization"]
    with pytest.raises(ConfigError) as e:
        StudentConfig(parameterization="x0")
    assert str(e.value).startswith("student.parameterization: 'x0' is not one of epsilon, v_prediction, sample")
    data = {"teacher": {"path": "builtin:mnist"}, "objective": {"name": "progressive"}}
    for bad in ("x0", 1):
        with pytest.raises(ConfigError, match="student.parameterization") as e:
            load_config(DistillConfig, data={**data, "student": {"parameterization": bad}})
        assert "\n" not in str(e.value)
    assert load_config(DistillConfig, data={**data, "student": {"parameterization": "v_prediction"}}).student.parameterization == "v_prediction"


def test_objectives_accept_the_key():
    net = fitted_vp_copy()
    cfg = StudentConfig(parameterization="v_prediction")
    pd = ProgressiveDistillation.build(ProgressiveConfig(start_steps=4), net)
    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=4), net)
    assert pd.make_student(net, cfg).denoiser.prediction_type == "v_prediction"
    f = cd.make_student(net, cfg).denoiser
    assert isinstance(f, ConsistencyDenoiser) and f.inner.prediction_type == "v_prediction"
    assert cd.make_target(cd.make_student(net, cfg)).inner.prediction_type == "v_prediction"
    assert OneStepGenerator.from_teacher(net, 1.0, StudentConfig(parameterization="sample")).denoiser.prediction_type == "sample"
    assert net.prediction_type == "epsilon"  # the teacher is untouched


# --- the re-interpreted copy and how far it starts from the teacher ----------------------------


def test_copy_reinterprets_the_same_network_output():
    """Same weights, same network output; only its conversion to x0 changes (float64, exact)."""
    net = copy.deepcopy(fitted_vp_copy()).double()
    x, sigma = torch.randn(64, 2, dtype=torch.float64) * 3, torch.rand(64, dtype=torch.float64) * 20 + 0.05
    x_t = vp_scale_input(x, sigma[:, None])
    out = net.model(x_t, net.sigma_to_timestep(sigma))
    for kind in PARAMETERIZATIONS:
        student = reparameterized_copy(net, kind)
        assert all(p.requires_grad for p in student.parameters())
        expected = vp_x0_from_output(x_t, out, 1 / (1 + sigma[:, None] ** 2), kind)
        torch.testing.assert_close(student(x, sigma), expected, rtol=0, atol=1e-12)
        assert student(x, sigma).shape == (64, 2) and student.sample_shape == (2,)
    # docs/math.md 2.6: how the re-read copies differ from the teacher, in terms of its eps_hat
    s, d_eps = sigma[:, None], net(x, sigma)
    r = (1 + s**2).sqrt()
    torch.testing.assert_close(reparameterized_copy(net, "v_prediction")(x, sigma) - d_eps,
                               s * (r - 1) / r * out - s**2 / (1 + s**2) * x, rtol=0, atol=1e-10)
    torch.testing.assert_close(reparameterized_copy(net, "sample")(x, sigma) - d_eps, (1 + s) * out - x, rtol=0, atol=1e-10)


def test_start_gap():
    """Unchanged copy: no gap. v: a gap that vanishes at small sigma (v ~ epsilon there).
    sample: a gap everywhere (epsilon read as x0)."""
    net = fitted_vp_copy()
    x0, _ = exact_teacher().sample(512, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    sigmas = [157.0, 10.0, 1.0, 0.05]
    for kind in (None, "epsilon"):
        gap = start_gap(net, reparameterized_copy(net, kind), sigmas, x0, generator=torch.Generator().manual_seed(0))
        assert gap.shape == (4,) and torch.equal(gap, torch.zeros(4, dtype=torch.float64))
    v = start_gap(net, reparameterized_copy(net, "v_prediction"), sigmas, x0, generator=torch.Generator().manual_seed(0))
    x = start_gap(net, reparameterized_copy(net, "sample"), sigmas, x0, generator=torch.Generator().manual_seed(0))
    assert (v > 0).all() and (x > 0).all()
    assert v[-1] < 0.05 * v[0] and v[-1] < 0.1  # sigma = 0.05: v - eps = O(sigma)
    assert x[-1] > 0.5  # an epsilon estimate (unit scale) read as x0


@pytest.mark.parametrize("den", [MLPDenoiser(2, 1.0), GaussianMixtureDenoiser(WEIGHTS, MEANS, [STD] * 4)], ids=["edm_mlp", "gmm"])
def test_non_vp_denoisers_have_no_output_to_reinterpret(den):
    assert isinstance(reparameterized_copy(den, None), type(den))
    with pytest.raises(ValueError, match=r"student.parameterization='v_prediction' applies to VP .* leave student.parameterization unset"):
        reparameterized_copy(den, "v_prediction")
    with pytest.raises(ValueError, match="student.parameterization"):
        ProgressiveDistillation.build(ProgressiveConfig(), den).make_student(den, StudentConfig(parameterization="sample"))


# --- distillation to one step on a VP noise range ---------------------------------------------


@pytest.mark.parametrize("parameterization, keeps", [("epsilon", False), ("v_prediction", True), ("sample", True)])
def test_progressive_to_one_step_needs_a_bounded_output(parameterization, keeps):
    """PD 8 -> 4 -> 2 -> 1 trailing steps (sigma_max ~157) from an epsilon copy of the teacher.

    A one-step epsilon student's x0 is ``sqrt(1 + s^2) x_t - s eps_hat`` at s ~157: it would have to
    get eps right to ~1e-3 to land inside a mode. Measured (seeds 0-2): epsilon leaves 0.92-0.94
    of the samples on no mode and loses the lightest modes; re-interpreted as v or x0 the same copy
    keeps the modes (v 0.29-0.30 on no mode, sample 0.31; masses within 0.06 of the weights)."""
    cfg = ProgressiveConfig(start_steps=8, end_steps=1)
    net = fitted_vp_copy()
    grid = full_grid(cfg, net)  # the VP network's "trailing" DDIM timesteps: 999, 874, ...
    assert grid[0] > 150
    torch.manual_seed(0)
    teacher, base = exact_teacher(), net
    for k, steps in zip(stage_plan(cfg), (200, 150, 150)):
        pd = ProgressiveDistillation(cfg, grid[:: cfg.start_steps // (2 * k)])
        student = pd.make_student(base, StudentConfig(parameterization=parameterization))
        assert student.denoiser.prediction_type == parameterization  # also in later stages (the previous student's)
        train(pd, {"teacher": teacher, "student": student}, steps, lr=3e-3)
        teacher = base = student.denoiser
    assert student.num_steps == 1
    samples = one_step_samples(student)
    mass, off = mode_check(samples)
    assert keeps_modes(samples) == keeps, (parameterization, mass.tolist(), off)
    if not keeps:
        assert off > 0.6


@pytest.mark.parametrize("parameterization, keeps", [
    ("epsilon", False), ("v_prediction", True), pytest.param("sample", True, marks=pytest.mark.slow),  # PD covers sample
])
def test_consistency_to_one_step_needs_a_bounded_output(parameterization, keeps):
    """One-step CD (18 Karras levels up to sigma 80, Heun, exact teacher) from the epsilon copy.

    Measured at 500 updates (seeds 0-2): epsilon 0.91-0.96 on no mode; v 0.28-0.33, sample
    0.32-0.37, masses within 0.07 (at 1000 updates: epsilon 0.91-0.95, v 0.23, sample 0.19)."""
    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18), exact_teacher())
    student = cd.make_student(fitted_vp_copy(), StudentConfig(parameterization=parameterization))
    assert student.sigmas == [pytest.approx(80.0)]
    torch.manual_seed(0)
    train(cd, {"teacher": exact_teacher(), "student": student, "target": cd.make_target(student)}, steps=500, lr=2e-3, decay=False)
    samples = one_step_samples(student)
    mass, off = mode_check(samples)
    assert keeps_modes(samples) == keeps, (parameterization, mass.tolist(), off)
    if not keeps:
        assert off > 0.6


@pytest.mark.parametrize("parameterization, most_off", [("epsilon", 0.4), ("v_prediction", 0.2)])
def test_segment_consistency_keeps_the_modes_in_four_steps(parameterization, most_off):
    """Multistep consistency (``multistep: segments``, Heek et al. 2024) in 4 segments of the 18 Karras levels up to
    sigma 80, Heun, exact teacher, from the epsilon copy: the fresh student (the copy's own 4-step DDIM) loses the
    modes' weights; trained, its 4 DDIM steps keep them. Measured at 500 updates (seeds 0-2): epsilon 0.28-0.32 on
    no mode, v 0.14-0.15, masses within 0.04 (Song et al.'s re-noising CD of the same copies in 4 steps, seed 0:
    0.40 / 0.20)."""
    cd = ConsistencyDistillation.build(ConsistencyConfig(num_scales=18, sample_steps=4, multistep="segments"), exact_teacher())
    student = cd.make_student(fitted_vp_copy(), StudentConfig(parameterization=parameterization))
    assert student.num_steps == 4 and student.sampler == "ddim"
    assert not keeps_modes(one_step_samples(student))
    torch.manual_seed(0)
    train(cd, {"teacher": exact_teacher(), "student": student, "target": cd.make_target(student)}, steps=500, lr=2e-3, decay=False)
    samples = one_step_samples(student)
    mass, off = mode_check(samples)
    assert keeps_modes(samples) and off < most_off, (parameterization, mass.tolist(), off)


class ExactEpsilon(torch.nn.Module):
    """The exact mixture as an epsilon network ``model(x_t, t)`` on the VP schedule ``alphas_cumprod``:
    ``eps = (x - D(x, sigma)) / sigma`` at the (fractional) timestep's sigma, ``x = x_t sqrt(1 + sigma^2)``."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        from distilldiff.teachers.conversions import LogSigmaInterpolator, vp_sigma_from_alpha_bar

        self.mixture = exact_teacher()
        self.schedule = LogSigmaInterpolator(vp_sigma_from_alpha_bar(alphas_cumprod))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = self.schedule.sigma(t).to(x_t.dtype)
        x = x_t * (1 + s[:, None] ** 2).sqrt()
        return (x - self.mixture(x, s)) / s[:, None]


def test_lcm_consistency_keeps_the_modes_in_one_two_and_four_steps():
    """CD with LCM's discretisation (schedule: lcm: the teacher's timesteps 0, 19, ..., 999, DDIM
    solver, LCM's boundary scalings) against the exact mixture as a discrete-time VP teacher,
    from the epsilon copy re-read as v (the bounded output a one-step student at sigma ~157 needs).
    Measured at 2000 updates (seeds 0-2): 1, 2 and 4 LCMScheduler steps all keep the modes, 0.22
    / 0.20-0.22 / 0.15-0.17 of the samples on no mode, masses within 0.04 of the weights (at 500
    updates 2 and 4 steps already do; one step does not yet: consistency spreads from the boundary up)."""
    from distilldiff.toy import linear_alphas_cumprod

    ac = linear_alphas_cumprod()
    teacher = VPDenoiser(ExactEpsilon(ac), ac, "epsilon", (2,), exact_teacher().sigma_data).float()
    x, s = torch.randn(8, 2, dtype=torch.float64) * 3, torch.rand(8, dtype=torch.float64) * 20 + 0.05
    torch.testing.assert_close(teacher.double()(x, s), exact_teacher().double()(x, s), rtol=0, atol=1e-12)
    teacher.float()
    cd = ConsistencyDistillation.build(ConsistencyConfig(schedule="lcm", num_scales=50, solver="euler"), teacher)
    student = cd.make_student(fitted_vp_copy(), StudentConfig(parameterization="v_prediction"))
    assert student.num_steps == 1 and student.sigmas[0] == teacher.sigma_max
    torch.manual_seed(0)
    train(cd, {"teacher": teacher, "student": student, "target": cd.make_target(student)}, steps=2000, lr=2e-3, decay=False)
    for k in (1, 2, 4):
        few = Student(student.denoiser, student.denoiser.sample_sigmas(k), "multistep")
        with torch.no_grad():
            samples = few(torch.randn(4000, 2, generator=torch.Generator().manual_seed(1)), generator=torch.Generator().manual_seed(2))
        mass, off = mode_check(samples)
        assert keeps_modes(samples), (k, mass.tolist(), off)


# --- student folders and export ---------------------------------------------------------------


def test_exported_v_student_of_an_epsilon_teacher_loads_back(tmp_path):
    """A v-prediction copy of an epsilon teacher is written with prediction_type v_prediction in its
    scheduler and student file, and samples the same from its folder (ours and plain diffusers)."""
    from diffusers import DDIMPipeline

    from distilldiff.export import load_student, save_student
    from distilldiff.distill import build_teacher
    from distilldiff.pipelines import DistillDiffPipeline

    from test_export import grid_sigmas, tiny_denoiser

    teacher = tiny_denoiser("epsilon", seed=11)
    den = reparameterized_copy(teacher, "v_prediction")
    assert den.scheduler_config["prediction_type"] == "v_prediction" and teacher.scheduler_config["prediction_type"] == "epsilon"
    students = {
        "ddim": Student(den, grid_sigmas(den, [999, 499])),  # on the trailing grid: a stock DDIMPipeline
        "one_step": Student(den, [2.0]),  # off the grid: DistillDiffPipeline
        "consistency": Student(ConsistencyDenoiser(den, 0.02), [80.0, 1.0], "multistep"),
    }
    for name, student in students.items():
        folder = save_student(student, tmp_path / name, {"objective": "test"})
        meta = json.loads((folder / "distilldiff_student.json").read_text())
        assert meta["prediction_type"] == "v_prediction" and "v_prediction" in (folder / "README.md").read_text()
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
        loaded, _ = load_student(folder)
        inner = loaded.denoiser.inner if name == "consistency" else loaded.denoiser
        assert inner.prediction_type == "v_prediction" and inner.scheduler_config["prediction_type"] == "v_prediction"
        z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ours = student(z, generator=torch.Generator().manual_seed(5))
            back = loaded(z, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(back, ours, rtol=0, atol=1e-5)
        assert (ours - teacher_samples(teacher, student, z)).abs().max() > 1e-2  # not the teacher's output
        pipe_cls = DDIMPipeline if name == "ddim" else DistillDiffPipeline
        pipe = pipe_cls.from_pretrained(str(folder), use_safetensors=True) if name == "ddim" else pipe_cls.from_pretrained(str(folder))
        kwargs = {"num_inference_steps": 2, "eta": 0.0} if name == "ddim" else {}
        g = torch.Generator().manual_seed(3)
        plain = pipe(batch_size=4, generator=g, output_type="np", **kwargs).images
        g = torch.Generator().manual_seed(3)
        noise = torch.randn(4, 1, 8, 8, generator=g)
        with torch.no_grad():
            direct = (student(noise, generator=g) / 2 + 0.5).clamp(0, 1)
        assert abs(torch.from_numpy(plain).permute(0, 3, 1, 2) - direct).max() < 1e-5
    # a student folder is a teacher too (the next progressive stage): its own output type comes back
    base = build_teacher(TeacherConfig(path=str(tmp_path / "ddim"))).base
    assert base.prediction_type == "v_prediction"
    x0 = torch.randn(4, 1, 8, 8)
    assert torch.equal(start_gap(base, reparameterized_copy(base, "v_prediction"), [100.0, 1.0], x0), torch.zeros(2, dtype=torch.float64))


def teacher_samples(teacher: VPDenoiser, student: Student, z: torch.Tensor) -> torch.Tensor:
    """What the same student would sample with the teacher's own output type."""
    den = student.denoiser
    swapped = ConsistencyDenoiser(teacher, den.boundary_sigma) if isinstance(den, ConsistencyDenoiser) else teacher
    with torch.no_grad():
        return Student(swapped, student.sigmas, student.sampler)(z, generator=torch.Generator().manual_seed(5))


def test_progressive_stages_keep_the_parameterization(tmp_path):
    """builtin:mnist (epsilon), PD 4 -> 2 -> 1 with a v student, one update per stage: each stage's
    student folder records v_prediction, and a resumed run reloads the finished stages with it."""
    from distilldiff.distill import distill

    cfg = load_config(DistillConfig, "configs/mnist/progressive.yaml", [
        "objective.start_steps=4", "student.parameterization=v_prediction", "train.max_steps=1", "train.batch_size=2",
        "train.num_sample_images=4", "train.log_every=1",
    ])
    out = distill(cfg, output_dir=tmp_path / "run")
    for folder in ("stage-0002/student", "stage-0001/student", "student"):
        meta = json.loads((tmp_path / "run" / folder / "distilldiff_student.json").read_text())
        sched = json.loads((tmp_path / "run" / folder / "scheduler" / "scheduler_config.json").read_text())
        assert meta["prediction_type"] == sched["prediction_type"] == "v_prediction", folder
    assert build_teacher_prediction_type(out) == "v_prediction"
    distill(cfg, resume="latest", output_dir=tmp_path / "run")  # finished stages are reloaded as teachers
    assert build_teacher_prediction_type(out) == "v_prediction"


def build_teacher_prediction_type(folder) -> str:
    from distilldiff.distill import build_teacher

    return build_teacher(TeacherConfig(path=str(folder))).base.prediction_type
