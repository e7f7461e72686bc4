"""A new user's first hour: an instant ``--help``, a reference build that says what it does,
DataLoader workers within the cores, and a loss plot next to the sample grids."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image

import distilldiff
from distilldiff import data
from distilldiff.engine.loss_plot import LossHistory, group_series, write_loss_plot

HEAVY = ("torch", "diffusers", "accelerate", "transformers", "torch_fidelity", "matplotlib")


def _modules_after(code: str) -> set[str]:
    """The top-level modules imported by ``code`` in a fresh interpreter."""
    probe = code + "\nimport sys\nprint('MODULES', ' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("argv", [["--help"], ["distill", "--help"], ["fid", "--help"], ["teacher", "train", "--help"]])
def test_help_imports_nothing_heavy(argv):
    code = f"""
from distilldiff.cli import main
try:
    main({argv!r})
except SystemExit as e:
    assert e.code == 0, e.code
"""
    loaded = _modules_after(code)
    assert "distilldiff" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_import_distilldiff_is_light():
    assert not _modules_after("import distilldiff") & set(HEAVY)


def test_every_public_name_resolves():
    for name in distilldiff.__all__:
        assert getattr(distilldiff, name) is not None, name
    assert set(distilldiff.__all__) <= set(dir(distilldiff))
    namespace: dict = {}
    exec("from distilldiff import *", namespace)
    assert set(distilldiff.__all__) <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        distilldiff.nope  # noqa: B018


def test_distill_is_the_function_even_after_its_submodule_is_imported():
    import distilldiff.distill  # noqa: F401  (binds nothing over the function)
    from distilldiff import distill
    from distilldiff.distill import distill as the_function

    assert distill is the_function and distilldiff.distill is the_function


def test_importing_the_objectives_registers_them():
    code = "import distilldiff.objectives as o\nprint('NAMES', ' '.join(sorted(o.OBJECTIVES)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = next(l for l in out.stdout.splitlines() if l.startswith("NAMES ")).split()[1:]
    assert set(names) == {"sid", "consistency", "fdistill", "progressive", "guidance", "scm"}
    assert set(distilldiff.OBJECTIVES) >= set(names)


# -- the one-time FID reference build -------------------------------------------------------------


class _FakeExtractor:
    """Stands in for the Inception network: 3-d features, 2 images per forward pass."""

    weights_sha1 = "0123456789abcdef0123"
    description = "fake"
    batch_size = 2

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = images.double().flatten(1)
        return torch.stack([x.mean(1), x.std(1), x[:, 0]], 1)


def test_reference_build_announces_itself_once(tmp_path, monkeypatch, capsys):
    from distilldiff.metrics import fid

    monkeypatch.setenv("DISTILLDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "builtin_reference_images", lambda name: torch.rand(7, 1, 8, 8) * 2 - 1)
    monkeypatch.setattr(fid, "ETA_AFTER_SECONDS", 0.0)  # estimate after the first forward pass
    extractor = _FakeExtractor()
    stats = fid.load_reference("mnist5k", extractor)
    err = capsys.readouterr().err
    cached = tmp_path / "cache" / f"ref-mnist5k-inception-{extractor.weights_sha1[:16]}.npz"
    assert cached.is_file() and stats.mu.shape == (3,)
    assert extractor.calls == 4  # 7 images, 2 per pass: the bar advances per pass
    assert err.count("one-time build") == 1 and str(cached) in err
    assert "7 images" in err and "images/s, less than a minute left for the remaining" in err
    assert err.index("one-time build") < err.index("images/s,")

    fid.load_reference("mnist5k", extractor)  # the cached statistics: no announcement
    assert "one-time build" not in capsys.readouterr().err and extractor.calls == 4


def test_features_do_not_depend_on_the_pass_size():
    from distilldiff.metrics import extract_features

    images = torch.rand(9, 1, 8, 8) * 2 - 1
    small, whole = _FakeExtractor(), _FakeExtractor()
    whole.batch_size = 100
    torch.testing.assert_close(extract_features(images, 9, small, batch_size=4), extract_features(images, 9, whole, batch_size=4))


def test_torchscript_weights_load_without_the_deprecation_warning():
    from distilldiff.metrics.inception import _load_torchscript, default_weights_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts = _load_torchscript(default_weights_file())
    assert len(dict(ts.state_dict())) == 376
    assert not [w for w in caught if "torch.jit.load" in str(w.message)]


# -- DataLoader workers ---------------------------------------------------------------------------


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 2), (4, 3), (5, 4), (64, 4)])
def test_dataloader_workers_stay_below_the_cores(monkeypatch, cores, workers):
    monkeypatch.setattr(data, "available_cpus", lambda: cores)
    assert data.dataloader_workers() == workers
    assert data.dataloader_workers(max_workers=1) == min(workers, 1)
    assert data.dataloader_workers() < cores or cores == 1


def test_available_cpus_follows_the_affinity(monkeypatch):
    assert 1 <= data.available_cpus() <= (torch.multiprocessing.cpu_count() or 1)
    if hasattr(data.os, "sched_getaffinity"):
        monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: {0})
        assert data.available_cpus() == 1


def test_a_dataloader_with_those_workers_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = torch.utils.data.DataLoader(torch.arange(8), batch_size=4, num_workers=data.dataloader_workers())
        assert sum(len(b) for b in loader) == 8


# -- loss plot ------------------------------------------------------------------------------------


def _history() -> LossHistory:
    h = LossHistory()
    for step in range(10, 210, 10):
        h.add(step, {
            "critic/loss": 1.0 / step, "critic/w": 0.5, "critic/grad_norm": 10.0 / step, "critic/grad_norm_max": 30.0 / step,
            "generator/loss": -math.log(step), "generator/adv_loss": 0.1, "generator/grad_norm": torch.tensor(2.0),
            "img_per_s": 100.0 + step, "nonfinite_skipped": 0,
        })
    h.add(100, {"eval/class_accuracy": 0.9})
    h.add(200, {"eval/class_accuracy": 0.95, "samples/near_black": 0.8})
    return h


def test_loss_plot_is_a_png_of_useful_size(tmp_path):
    path = write_loss_plot(_history().series, tmp_path / "samples" / "losses.png", title="runs/mnist-sid")
    assert path == tmp_path / "samples" / "losses.png"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 300
    assert path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["losses.png"]  # no temporary left behind


def test_loss_plot_groups():
    groups = group_series(list(_history().series))
    assert groups == {
        "critic: loss": ["critic/loss"],
        "generator: loss": ["generator/adv_loss", "generator/loss"],
        "critic: other": ["critic/w"],
        "gradient norm": ["critic/grad_norm", "critic/grad_norm_max", "generator/grad_norm"],
        "throughput (images/s)": ["img_per_s"],
        "sample grids": ["samples/near_black"],
        "evaluation: class_accuracy": ["eval/class_accuracy"],
        "other": ["nonfinite_skipped"],
    }


def test_loss_history_round_trips_through_json_and_resumes(tmp_path):
    h = _history()
    h.add(210, {"generator/loss": float("nan"), "critic/loss": float("inf")})
    text = json.dumps(h.state_dict(), allow_nan=False)  # strict JSON
    restored = LossHistory()
    restored.load_state_dict(json.loads(text))
    assert restored.series.keys() == h.series.keys()
    for name in h.series:
        assert [s for s, _ in restored.series[name]] == [s for s, _ in h.series[name]]
        assert all(a == b or (math.isnan(a) and math.isnan(b)) for (_, a), (_, b) in zip(restored.series[name], h.series[name]))
    latest = restored.latest()
    assert math.isnan(latest["generator/loss"]) and latest["critic/loss"] == math.inf and latest["img_per_s"] == 300.0
    assert restored.last_step() == 210
    # a resumed run replays the steps after its checkpoint: they replace what was logged before
    restored.add(150, {"img_per_s": 1.0})
    assert restored.series["img_per_s"][-1] == (150, 1.0) and [s for s, _ in restored.series["img_per_s"]][-2] == 140
    with pytest.raises(ValueError, match="version"):
        LossHistory().load_state_dict({"version": 99, "series": {}})


def test_loss_plot_survives_non_finite_and_empty_histories(tmp_path):
    h = LossHistory()
    h.add(1, {"generator/loss": 1.0, "generator/grad_norm": float("inf")})
    h.add(2, {"generator/loss": float("nan"), "generator/grad_norm": float("nan")})
    h.add(3, {"generator/loss": float("-inf"), "generator/grad_norm": 1.0, "nonfinite_skipped": 2})
    for history, name in ((h, "a.png"), ({"only/nan": [(0, float("nan"))]}, "b.png"), ({}, "c.png")):
        path = write_loss_plot(history, tmp_path / name)
        with Image.open(path) as im:
            assert im.format == "PNG"
    assert h.plot(tmp_path / "d.png").is_file()


def test_loss_plot_leaves_no_pyplot_state(tmp_path):
    assert "matplotlib.pyplot" not in sys.modules or not __import__("matplotlib.pyplot").pyplot.get_fignums()
    write_loss_plot(_history(), tmp_path / "x.png")
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
