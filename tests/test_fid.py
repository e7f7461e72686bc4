"""FID module: closed forms, agreement with torch-fidelity, reference files, KID, P/R, errors."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from distilldiff.metrics import (
    InceptionFeatureExtractor,
    ReferenceStats,
    compute_fid,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
    resolve_weights,
)
from distilldiff.data import mnist5k


@pytest.fixture(scope="module")
def extractor(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTILLDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield InceptionFeatureExtractor(device="cpu", batch_size=32)
    mp.undo()


def write_pngs(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eigenvalue_trace_matches_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 30
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = A @ A.T / d + 0.1 * np.eye(d), B @ B.T / d + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_set_with_itself_is_zero(extractor):
    x = mnist5k()[0][:16]
    ref = ReferenceStats.from_features(extractor(x))
    result = compute_fid(x, 16, ref, extractor, kid=True, pr=True)
    assert abs(result.fid) < 1e-3
    assert "default_1.pt" in result.weights
    assert (result.precision, result.recall) == (1.0, 1.0)
    # 16 < subset_size: every KID subset is the whole set, where the unbiased MMD^2 of a set with itself
    # is (2/m) (mean off-diagonal kernel - mean diagonal kernel): slightly negative, and the same each time
    m, k = 16, (ref.features @ ref.features.T / ref.features.shape[1] + 1) ** 3
    expected = 2 / m * ((k.sum() - np.trace(k)) / (m * (m - 1)) - np.trace(k) / m)
    assert -0.1 < expected < 0 and result.kid[0] == pytest.approx(expected, rel=1e-6) and result.kid[1] < 1e-12


def test_fid_equals_torch_fidelity_calculate_metrics(extractor, tmp_path):
    import torch_fidelity

    images = mnist5k()[0]
    d1 = write_pngs(tmp_path / "a", images[:32])
    d2 = write_pngs(tmp_path / "b", images[2500:2532])
    weights = tmp_path / "mapped.pth"
    torch.save(resolve_weights().state_dict, weights)  # torch-fidelity reads a .pth of the same weights
    theirs = torch_fidelity.calculate_metrics(
        input1=str(d1), input2=str(d2), fid=True, cuda=False, cache=False, verbose=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights),
        save_cpu_ram=True,  # its only DataLoader knob: 0 workers instead of min(4, 2 * cpu_count()), more than 2 cores have
    )["frechet_inception_distance"]
    ref = ReferenceStats.from_features(extractor(torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(d2.iterdir())])[:, None]))
    ours = compute_fid(d1, 32, ref, extractor).fid
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_reference_npz_round_trip_and_edm_format(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8))
    stats = ReferenceStats.from_features(feats, "x")
    loaded = ReferenceStats.load(stats.save(tmp_path / "ref.npz"))
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_allclose(loaded.features, feats, rtol=1e-6)
    np.savez(tmp_path / "edm.npz", mu=stats.mu, sigma=stats.sigma)  # EDM's published format
    edm = ReferenceStats.load(tmp_path / "edm.npz")
    assert edm.features is None and edm.mu.dtype == np.float64
    np.savez(tmp_path / "bad.npz", mean=stats.mu)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['mu', 'sigma'\]"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same, _ = kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 and shifted > 0.3
    ident, _ = kernel_inception_distance(a, a, num_subsets=20, subset_size=200)
    assert abs(ident) < 0.05
    small_shift, _ = kernel_inception_distance(a, b + 0.5, num_subsets=20, subset_size=200)
    assert same < small_shift < shifted  # grows with the mean shift


def _poly_kernel(u, v):
    return (sum(ui * vi for ui, vi in zip(u, v)) / len(u) + 1) ** 3


def _unbiased_mmd2(x, y):
    """Binkowski et al. 2018 written out pair by pair: within-set sums skip i == j, the cross sum does not."""
    m = len(x)
    kxx = sum(_poly_kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    kyy = sum(_poly_kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = sum(_poly_kernel(x[i], y[j]) for i in range(m) for j in range(m))
    return kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / m**2


def test_kid_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 3)), rng.normal(0.5, 1.0, size=(7, 3))
    # subsets of min(subset_size, 6, 7) = 6: all of x and 6 of y's 7 rows, so the subsets matter for y only
    expected = _unbiased_mmd2(x, y[:6])
    mean, std = kernel_inception_distance(x, y[:6], num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(expected, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    # smaller subsets: drawn without replacement by np.random.RandomState(seed), x's then y's per subset
    rs = np.random.RandomState(5)
    vals = []
    for _ in range(4):
        i, j = rs.choice(6, 4, replace=False), rs.choice(7, 4, replace=False)
        vals.append(_unbiased_mmd2(x[i], y[j]))
    mean, std = kernel_inception_distance(x, y, num_subsets=4, subset_size=4, seed=5)
    assert mean == pytest.approx(np.mean(vals), rel=1e-12) and std == pytest.approx(np.std(vals), rel=1e-9)
    assert kernel_inception_distance(x.astype(np.float32), y, 4, 4, 5) == kernel_inception_distance(x.astype(np.float32).astype(np.float64), y, 4, 4, 5)
    assert kernel_inception_distance(x, y, 4, 4, seed=6) != (mean, std)


def test_kid_and_precision_recall_errors_and_no_output(capsys):
    with pytest.raises(ValueError, match="KID needs at least 2 samples per set, got 1 and 5"):
        kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"KID needs two \[N, D\] feature sets of the same D, got shapes \(4, 3\) and \(4, 2\)"):
        kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="precision/recall with k=3 needs more than 3 samples per set, got 3 and 10"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"precision/recall needs two \[N, D\] feature sets"):
        precision_recall(np.zeros(10), np.zeros((10, 1)))
    rng = np.random.default_rng(0)
    kernel_inception_distance(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)), num_subsets=5, subset_size=10)
    precision_recall(rng.normal(size=(20, 4)), rng.normal(size=(20, 4)))
    assert capsys.readouterr() == ("", "")  # torch-fidelity's progress and result lines stay off


def test_precision_recall_identical_and_disjoint():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 4))
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    p, r = precision_recall(a, a[:, :] * 0.05)  # collapsed fakes: precise, but poor recall
    assert p > 0.9 and r < 0.3
    p, r = precision_recall(a * 0.05, a)  # and the other way round: fakes spread wider than the reals
    assert p < 0.3 and r > 0.9


def test_precision_recall_of_a_worked_1d_example():
    real = np.array([0.0, 1, 3, 7, 20, 30])[:, None]
    fake = np.array([-1.0, 2.5, 6, 12, -5])[:, None]
    # k=1 radii: real 0->1 1->1 3->2 7->4 20->10 30->10; fake -5->4 -1->3.5 2.5->3.5 6->3.5 12->6.
    # fakes in a real ball: -1 (on the edge of [-1, 1]), 2.5, 6, 12, not -5: 4/5.
    # reals in a fake ball: 0, 1, 3, 7, not 20 (12 +- 6) or 30: 4/6.
    assert precision_recall(real, fake, k=1) == (4 / 5, 4 / 6)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # where compute_fid's extractor runs
    assert all(precision_recall(real, fake, k=1, device=d) == (4 / 5, 4 / 6) for d in devices)


def test_precision_recall_equals_a_brute_force_count():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(12, 2)), rng.normal(0.7, 1.3, size=(10, 2))

    def radii(s, k):  # distance to the k-th nearest *other* point of the same set
        return [sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)[k - 1] for i in range(len(s))]

    def share_inside(points, centres, rad):
        return sum(any(np.linalg.norm(p - c) <= r for c, r in zip(centres, rad)) for p in points) / len(points)

    seen = set()
    for k in (1, 3, 5):
        expected = share_inside(fake, real, radii(real, k)), share_inside(real, fake, radii(fake, k))
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
        seen.add(expected)
    assert len(seen) == 3 and 0 < min(min(e) for e in seen) < max(max(e) for e in seen)  # k matters, not all 0 or 1


def test_statistics_need_two_samples():
    with pytest.raises(ValueError, match=r"need \[N >= 2, D\]"):
        feature_statistics(np.zeros((1, 3)))


def test_errors_empty_folder_mixed_sizes_too_many_missing_weights(extractor, tmp_path):
    ref = ReferenceStats(np.zeros(2048), np.eye(2048))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        compute_fid(tmp_path / "empty", 10, ref, extractor)
    mixed = write_pngs(tmp_path / "mixed", mnist5k()[0][:3])
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(mixed / "99999.png")
    with pytest.raises(ValueError, match="99999.png: image of size 32x32x1, expected 28x28x1"):
        compute_fid(mixed, 4, ref, extractor)
    with pytest.raises(ValueError, match="--num 10 is larger than the 4 images available"):
        compute_fid(mixed, 10, ref, extractor)
    with pytest.raises(FileNotFoundError, match="Inception weights: .*nope.pt not found"):
        InceptionFeatureExtractor(tmp_path / "nope.pt")


def test_cli_fid_ref_and_fid_of_a_teacher(extractor, tmp_path, capsys):
    """Runs while the module fixture's DISTILLDIFF_CACHE (with the mapped weights) is set."""
    import json

    from distilldiff.cli import main

    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", "--dataset", "mnist5k", "--num", "12", "--features", "--out", str(ref), "--device", "cpu"]) == 0
    out = tmp_path / "fid.json"
    args = ["fid", "--model", "builtin:mnist", "--steps", "1", "--num", "12", "--ref", str(ref), "--kid", "--pr", "--json", str(out), "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert f"FID {result['fid']:.4f}" in printed and result["num"] == 12 and result["extra"] == {"steps": 1}
    assert result["fid"] > 0 and result["kid"] is not None and 0 <= result["precision"] <= 1
    assert "1-step DDIM" in result["model"] and "default_1.pt" in result["weights"]
    assert main(["fid", "--model", "builtin:mnist", "--images", str(tmp_path), "--ref", str(ref)]) == 2
    assert "exactly one of --model DIR and --images DIR" in capsys.readouterr().err



def test_features_are_computed_without_tf32():
    """TF32 convolutions (PyTorch's cuDNN default) moved GPU FID by 0.14%: the extractor's network
    runs with fp32 precision, and the caller's settings come back afterwards."""
    from distilldiff.metrics.inception import InceptionFeatureExtractor

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return (torch.zeros(len(x), 2048),)

    ex = InceptionFeatureExtractor.__new__(InceptionFeatureExtractor)
    ex.model, ex.device, ex.batch_size = Probe(), torch.device("cpu"), 2
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        assert ex(torch.zeros(3, 1, 8, 8)).shape == (3, 2048)
        assert seen == [("ieee", "ieee")] * 2
        assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_cli_fid_of_a_checkpoint_writes_no_record_into_it(extractor, tmp_path, capsys):
    """`fid --model RUN/checkpoints/step-N` scores that update's EMA student and leaves the checkpoint as it was (a
    resumed run may write that step again); the run folder itself still gets its record."""
    from distilldiff.cli import main

    run, ref = tmp_path / "run", tmp_path / "ref.npz"
    assert main(["distill", "--config", "configs/mnist/sid.yaml", "--output-dir", str(run), "--set", "train.batch_size=2",
                 "--set", "train.num_sample_images=4", "--set", "train.max_steps=1", "--set", "train.sample_every=100"]) == 0
    assert main(["fid-ref", "--dataset", "mnist5k", "--num", "12", "--features", "--out", str(ref), "--device", "cpu"]) == 0
    checkpoint = run / "checkpoints" / "step-0000001"
    before = sorted(p.name for p in checkpoint.iterdir())
    capsys.readouterr()
    assert main(["fid", "--model", str(checkpoint), "--num", "12", "--ref", str(ref), "--device", "cpu"]) == 0
    assert "written to" not in capsys.readouterr().out
    assert sorted(p.name for p in checkpoint.iterdir()) == before and not list(run.glob("fid-*.json"))
    assert main(["fid", "--model", str(run), "--num", "12", "--ref", str(ref), "--device", "cpu"]) == 0
    assert (run / "fid-ref-12.json").is_file()
