"""The shape of the library: typed objective configs, a new objective in one file, the staging
protocol, teacher-owned conditioning, declared trainable parameters, frozen-network dtype, the
maintenance schedule, and imports that point one way."""

import ast
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Mapping

import pytest
import torch

from distilldiff.config import ConfigError, DistillConfig, ObjectiveConfig, StudentConfig, load_config, to_dict
from distilldiff.distill import RunTeacher, build_distill_task, distill
from distilldiff.engine import Engine, Schedule
from distilldiff.objectives import OBJECTIVES, Objective, Phase, Stage, register
from distilldiff.students import OneStepGenerator, Student, draw_samples
from distilldiff.teachers import CFGDenoiser, ClassLabels, Conditioning, Denoiser, GaussianMixtureDenoiser

from toy_setup import fitted_copy, task_for, teacher, train_config

PACKAGE = Path(__file__).resolve().parents[1] / "distilldiff"


# --- typed objective configs ------------------------------------------------------------------


def test_objective_section_is_typed_and_validated_at_load_time():
    cfg = load_config(DistillConfig, "configs/mnist/sid.yaml")
    assert type(cfg.objective).__name__ == "SiDConfig" and cfg.objective.alpha == 1.2 and cfg.objective.p_mean == -1.2
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, "configs/mnist/sid.yaml", ["objective.alhpa=3"])
    assert str(e.value).startswith("configs/mnist/sid.yaml: unknown key 'objective.alhpa'") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"configs/mnist/sid.yaml: objective: objective.tmax must be in \(0, 1000\]"):
        load_config(DistillConfig, "configs/mnist/sid.yaml", ["objective.tmax=0"])
    with pytest.raises(ConfigError, match="configs/mnist/sid.yaml: objective.name: unknown objective 'nope'"):
        load_config(DistillConfig, "configs/mnist/sid.yaml", ["objective.name=nope"])
    with pytest.raises(ConfigError, match="objective.critic_ratio: expected an integer"):
        load_config(DistillConfig, "configs/mnist/dmd2.yaml", ["objective.critic_ratio=fast"])


@pytest.mark.parametrize("config", ["sid", "dmd", "dmd2", "fdistill", "consistency", "lcm", "progressive", "guidance", "guidance_stage2"])
def test_resolved_config_round_trips(config):
    """The config a run writes (every default filled in, the objective's name first) loads back to the same config."""
    cfg = load_config(DistillConfig, f"configs/mnist/{config}.yaml")
    data = to_dict(cfg)
    assert list(data["objective"])[0] == "name" and data["objective"]["name"] == cfg.objective.name
    assert load_config(DistillConfig, data=data) == cfg


def test_student_defaults_have_one_source():
    assert StudentConfig().resolved_init_sigma == StudentConfig.DEFAULT_INIT_SIGMA
    assert StudentConfig(init_sigma=1.0).resolved_init_sigma == 1.0 and StudentConfig(init_sigma=1.0).set_keys() == ["init_sigma"]
    hits = [p.name for p in PACKAGE.rglob("*.py") if "2.5" in p.read_text() and p.parent.name != "metrics"]
    assert hits == ["config.py"], hits


def test_clip_sample_clips_the_one_step_generators_samples_only():
    """student.clip_sample: x_g in [-1, 1] with gradient 0 outside the range, D(x, sigma) unclipped; a latent
    teacher and a multistep objective refuse the key in one line; it counts as set only when on."""
    from distilldiff.objectives import ConsistencyConfig, ConsistencyDistillation

    from toy_setup import fitted_copy, teacher

    assert StudentConfig().set_keys() == [] and StudentConfig(clip_sample=True).set_keys() == ["clip_sample"]
    g = OneStepGenerator.from_teacher(fitted_copy(), 2.5, StudentConfig(clip_sample=True))
    raw = OneStepGenerator.from_teacher(fitted_copy(), 2.5, StudentConfig())
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    x, r = g(z), raw(z)
    assert r.abs().max() > 1.2 and x.abs().max() <= 1 and torch.equal(x, r.clamp(-1, 1))
    (grad,) = torch.autograd.grad(x.sum(), g.denoiser.trainable_parameters()[-1])
    (grad_inside,) = torch.autograd.grad(torch.where(r.abs() <= 1, r, 0).sum(), raw.denoiser.trainable_parameters()[-1])
    torch.testing.assert_close(grad, grad_inside)  # only the pixels inside the range pass a gradient
    torch.testing.assert_close(g(z, sigma=2.5), raw(z, sigma=2.5))

    class Latent(GaussianMixtureDenoiser):
        def decode(self, x):
            return x

    with pytest.raises(ConfigError, match="student.clip_sample: the samples of Latent are latents"):
        OneStepGenerator.from_teacher(Latent([1.0], [[0.0, 0.0]], [1.0]), 2.5, StudentConfig(clip_sample=True))
    cd = ConsistencyDistillation.build(ConsistencyConfig(), teacher())
    with pytest.raises(ConfigError, match="student.clip_sample: objective 'consistency'"):
        cd.make_student(fitted_copy(), StudentConfig(clip_sample=True))
    assert load_config(DistillConfig, "configs/mnist/dmd_regression.yaml").student.clip_sample  # the main job's
    assert load_config(DistillConfig, "configs/mnist/fdistill.yaml").student.clip_sample  # the main job's before
    with pytest.raises(ConfigError, match="critic.clip_sample"):  # a student key only
        load_config(DistillConfig, "configs/mnist/fdistill.yaml", overrides=["critic.clip_sample=true"])


# --- a new objective needs its own file and its registration only ------------------------------


@dataclass
class PullConfig(ObjectiveConfig):
    """A toy objective: the one-step student regresses onto the teacher's denoised pure noise."""

    name: ClassVar[str] = "pull_to_teacher"
    weight: float = 1.0
    num_stages: int = 1

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"objective.weight must be > 0, got {self.weight}")


class PullToTeacher(Objective):
    config_class = PullConfig
    networks: ClassVar[Mapping[str, str]] = {"teacher": "frozen", "generator": "student"}

    def __init__(self, config: PullConfig, stage: int = 0):
        self.config, self.stage = config, stage

    def stages(self):
        if self.config.num_stages == 1:
            return super().stages()
        return [Stage(f"part-{i}", PullToTeacher(self.config, i)) for i in range(self.config.num_stages)]

    def phases(self):
        return [Phase("generator", "generator")]

    def loss(self, phase, nets, batch):
        x_g = nets["generator"](batch.noise, **batch.cond)
        with torch.no_grad():
            target = nets["teacher"](x_g + 0.5 * torch.randn_like(x_g), 0.5, **batch.cond)
        loss = self.config.weight * ((x_g - target) ** 2).mean()
        return loss, {"loss": loss.detach()}


@pytest.fixture
def registered():
    register(PullToTeacher)
    yield
    OBJECTIVES.pop("pull_to_teacher")


def test_new_objective_runs_through_config_registry_runner_and_stages(tmp_path, registered):
    """A new objective (this file only: its config, its class, one register call) gets typed config
    validation, the shared student and runner, a staged run with each stage's student teaching the next."""
    assert PullToTeacher.name == "pull_to_teacher"
    base = {"teacher": {"path": "builtin:mnist"}, "objective": {"name": "pull_to_teacher", "num_stages": 2},
            "train": {"max_steps": 1, "batch_size": 2, "num_sample_images": 4, "cpu": True}}
    with pytest.raises(ConfigError, match="unknown key 'objective.wieght'"):
        load_config(DistillConfig, data={**base, "objective": {"name": "pull_to_teacher", "wieght": 2.0}})
    with pytest.raises(ConfigError, match="objective.weight must be > 0"):
        load_config(DistillConfig, data={**base, "objective": {"name": "pull_to_teacher", "weight": -1.0}})
    cfg = load_config(DistillConfig, data=base)
    student = distill(cfg, output_dir=tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").glob("part-*")) == ["part-0", "part-1"]
    meta = json.loads((student / "distilldiff_student.json").read_text())
    assert meta["objective"] == "pull_to_teacher" and meta["sigmas"] == [StudentConfig.DEFAULT_INIT_SIGMA]
    saved = load_config(DistillConfig, tmp_path / "run" / "config.yaml")
    assert saved.objective == PullConfig(num_stages=2)
    with pytest.raises(ConfigError, match="resumes with --resume latest"):
        distill(cfg, resume=str(tmp_path / "run" / "part-0" / "checkpoints" / "step-0000001"), output_dir=tmp_path / "run")


def test_registration_checks_the_name():
    class Nameless(PullToTeacher):
        name = "other_name"

    with pytest.raises(ValueError, match="config_class whose name it shares"):
        register(Nameless)


# --- the teacher owns its conditioning ---------------------------------------------------------


class EmbeddingDenoiser(Denoiser):
    """D(x, sigma, emb) = emb (a stand-in for a text-conditioned model), with zeros as the unconditional input."""

    class Embedding(Conditioning):
        keys = ("emb",)

        @property
        def has_null(self):
            return True

        def draw(self, n, device, generator=None):
            return {"emb": torch.randn(n, 3, generator=generator).to(device)}

        def null(self, n, device):
            return {"emb": torch.zeros(n, 3, device=device)}

    sigma_min, sigma_max, sigma_data, sample_shape = 0.002, 80.0, 0.5, (3,)

    @property
    def conditioning(self):
        return self.Embedding()

    def denoise(self, x, sigma, emb=None, **_):
        return emb + 0 * x


def test_guidance_works_on_any_conditioning_the_teacher_declares():
    den = EmbeddingDenoiser()
    x, emb = torch.randn(4, 3), torch.randn(4, 3)
    for w in (0.0, 2.0):
        torch.testing.assert_close(CFGDenoiser(den, w)(x, 1.0, emb=emb), (1 + w) * emb)
    torch.testing.assert_close(CFGDenoiser(den, 2.0)(x, 1.0), torch.zeros(4, 3))  # no conditioning: unconditional
    with pytest.raises(ValueError, match="unconditional input"):
        CFGDenoiser(GaussianMixtureDenoiser([1.0], [[0.0, 0.0]], [1.0]), 1.0)


def test_class_labels_conditioning():
    c = ClassLabels(10, null_class=10)
    assert c.grid(12, "cpu", start=5)["class_labels"].tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6]
    drawn = c.draw(1000, "cpu", torch.Generator().manual_seed(0))["class_labels"]
    assert drawn.min() == 0 and drawn.max() == 9
    mask = torch.tensor([True, False, True])
    out = c.null_where({"class_labels": torch.tensor([1, 2, 3])}, mask)
    assert out["class_labels"].tolist() == [10, 2, 10]
    with pytest.raises(ValueError, match="outside 0..9"):
        c.of(10, 2, "cpu")
    assert not ClassLabels(10).has_null and not Conditioning().has_null
    assert GaussianMixtureDenoiser([0.5, 0.5], [[0.0], [1.0]], [1.0, 1.0], component_labels=[0, 1]).conditioning.null_class == 2


# --- declared trainable parameters and frozen dtype --------------------------------------------


def test_engine_trains_only_declared_parameters(tmp_path):
    from distilldiff.objectives import SiD, SiDConfig

    den = copy.deepcopy(fitted_copy())
    last = den.net[-1]
    den.trainable_parameters = lambda: list(last.parameters())  # noqa: E731  (as an adapter declares its own)
    student = OneStepGenerator(den, 2.5)
    before = {k: v.clone() for k, v in den.state_dict().items()}
    engine = Engine(task_for(SiD(SiDConfig(), teacher()), student), train_config(max_steps=3, batch_size=8), tmp_path)
    engine.train()
    assert engine.params["generator"] == list(last.parameters())
    changed = {k for k, v in den.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"net.6.weight", "net.6.bias"}, changed
    assert not any(p.requires_grad for n, p in den.named_parameters() if not n.startswith("net.6"))


def test_frozen_teacher_in_bfloat16(tmp_path):
    cfg = load_config(DistillConfig, "configs/mnist/sid.yaml", ["teacher.dtype=bfloat16"])
    task = build_distill_task(cfg)
    nets = task.networks
    assert {p.dtype for p in nets["teacher"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in nets["generator"].parameters()} == {p.dtype for p in nets["fake_score"].parameters()} == {torch.float32}
    x, sigma, labels = torch.randn(2, 1, 28, 28), torch.tensor([0.5, 3.0]), torch.tensor([1, 7])
    with torch.no_grad():
        ref = nets["fake_score"](x, sigma, class_labels=labels)  # still equal to the float32 teacher
        out = nets["teacher"](x, sigma, class_labels=labels)
    assert out.dtype == torch.float32 and float((out - ref).norm() / ref.norm()) < 0.05


# --- the engine's pieces ----------------------------------------------------------------------


def test_schedule():
    s = Schedule(max_steps=10, log_every=4, sample_every=5, checkpoint_every=3, eval_every=2)
    assert s.due(4, last=False).log and not s.due(5, last=False).log and s.due(10, last=True).log
    assert s.due(5, last=False).sample and not s.due(6, last=False).sample
    due = s.due(7, last=True)  # the time budget ran out at step 7
    assert due.evaluate and due.checkpoint and not due.sample
    s.done(7, due)
    end = s.at_end(7)
    assert end.sample and not end.evaluate and not end.checkpoint
    resumed = Schedule(10, 4, 5, 3, None, start_step=10, resumed=True)
    assert resumed.at_end(10) == type(end)(sample=False, evaluate=False, checkpoint=False)


def test_sample_grids_do_not_touch_the_training_rng(tmp_path):
    """A multistep student's grid re-noises with its own generator: the training stream is independent of sample_every."""
    student = Student(copy.deepcopy(fitted_copy()), [2.0, 0.5], "multistep")
    task = task_for(PullToTeacher(PullConfig()), student)
    task.sample_fn = lambda s, z, c, gen: draw_samples(s, z, c, gen)[:, :1, None, None].expand(-1, 1, 4, 4).clamp(-1, 1)
    engine = Engine(task, train_config(max_steps=1, batch_size=4), tmp_path)
    state = torch.get_rng_state()
    engine.write_samples()
    assert torch.equal(state, torch.get_rng_state())
    first = (tmp_path / "samples" / "latest.png").read_bytes()
    engine.write_samples()
    assert (tmp_path / "samples" / "latest.png").read_bytes() == first  # the same noise every time


def test_run_teacher_keeps_the_unguided_base():
    t = GaussianMixtureDenoiser([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [0.3, 0.3], component_labels=[0, 1])
    cfg = load_config(DistillConfig, data={"teacher": {"path": "x", "guidance_scale": 1.0}, "objective": {"name": "sid"},
                                           "train": {"cpu": True}})
    run = RunTeacher(CFGDenoiser(t, 1.0), t)
    task = build_distill_task(cfg, teacher=run)
    assert task.networks["teacher"] is run.frozen and isinstance(task.networks["fake_score"], GaussianMixtureDenoiser)


# --- imports point one way ---------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by ``path`` (relative imports resolved), anywhere in the file."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("distilldiff")}


@pytest.mark.parametrize("layer, forbidden", [
    ("objectives", ["distilldiff.engine", "distilldiff.distill", "distilldiff.inference", "distilldiff.evaluation", "distilldiff.cli", "distilldiff.export"]),
    ("samplers.py", ["distilldiff.objectives", "distilldiff.students", "distilldiff.engine", "distilldiff.distill"]),
    ("students.py", ["distilldiff.objectives", "distilldiff.engine", "distilldiff.distill", "distilldiff.export"]),
    ("teachers", ["distilldiff.objectives", "distilldiff.students", "distilldiff.engine", "distilldiff.distill", "distilldiff.samplers"]),
    ("engine", ["distilldiff.distill", "distilldiff.inference", "distilldiff.export", "distilldiff.cli",
                "distilldiff.objectives.sid", "distilldiff.objectives.fdistill", "distilldiff.objectives.consistency",
                "distilldiff.objectives.progressive", "distilldiff.objectives.guidance"]),
    ("distill.py", ["distilldiff.objectives.sid", "distilldiff.objectives.fdistill", "distilldiff.objectives.consistency",
                    "distilldiff.objectives.progressive", "distilldiff.objectives.guidance"]),
])
def test_imports_point_one_way(layer, forbidden):
    root = PACKAGE / layer
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    bad = [(f.name, m) for f in files for m in _imports(f) if any(m == x or m.startswith(x + ".") for x in forbidden)]
    assert not bad, bad


def test_config_module_stays_light():
    """Loading a config imports neither torch nor any network code (the objectives register lazily)."""
    assert {m for m in _imports(PACKAGE / "config.py")} <= {"distilldiff.objectives", "distilldiff.objectives.OBJECTIVES"}
    tree = ast.parse((PACKAGE / "config.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any((isinstance(n, ast.Import) and any(a.name == "torch" for a in n.names)) or getattr(n, "module", "") == "torch" for n in top)


def test_readme_python_api_runs(tmp_path, monkeypatch):
    """The README's Python API block, as written (2 updates instead of 50, a small batch)."""
    root = PACKAGE.parent
    block = (root / "README.md").read_text().split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '["train.max_steps=50"]' in block
    code = block.replace('["train.max_steps=50"]', '["train.max_steps=2", "train.batch_size=4", "train.num_sample_images=4"]')
    code = code.replace('"configs/', f'"{root}/configs/')
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (16, 1, 28, 28) and scope["x"].shape == (16, 1, 28, 28)
    assert scope["student"].num_steps == 1 and (tmp_path / "runs" / "api-demo-export" / "model_index.json").is_file()


def test_every_shipped_config_loads():
    """Every config under configs/ parses with its defaults filled in, as the command it is for reads
    it (the GPU configs cannot run here, but a renamed key must not rot them)."""
    import yaml
    from pathlib import Path

    from distilldiff.config import FlowTeacherConfig, TeacherTrainConfig, TextToImageTeacherConfig

    files = sorted(Path("configs").rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        data = yaml.safe_load(f.read_text())
        if "dataset" in data:  # distilldiff teacher train (the CLI's dispatch on 'transformer:' and 'unet:')
            kind = FlowTeacherConfig if "transformer" in data else TextToImageTeacherConfig if "unet" in data else TeacherTrainConfig
            load_config(kind, str(f))
        else:
            assert load_config(DistillConfig, str(f)).objective.name == data["objective"]["name"], f
