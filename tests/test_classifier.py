"""The shipped MNIST classifier: held-out accuracy, classifier FD, input checks, save/load."""

import pytest
import torch

from distilldiff.data import mnist5k
from distilldiff.metrics import MNISTClassifier, class_accuracy, classifier_fd, classifier_features, load_mnist_classifier
from distilldiff.metrics.classifier import SHIPPED_CLASSIFIER, heldout_split
from distilldiff.metrics.statistics import feature_statistics


@pytest.fixture(scope="module")
def heldout():
    images, labels = mnist5k()
    _, idx = heldout_split(len(images))
    return images[idx], labels[idx]


def test_split_is_fixed_and_disjoint():
    train, held = heldout_split()
    assert (len(train), len(held)) == (4000, 1000)
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(5000))
    assert torch.equal(held, heldout_split()[1])


def test_shipped_classifier_accuracy_on_heldout_digits(heldout):
    images, labels = heldout
    assert class_accuracy(images, labels) >= 0.98  # the shipped weights: 0.986
    shuffled = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    assert class_accuracy(images, shuffled) < 0.3


def test_classifier_fd_of_reference_is_zero_and_noise_is_far(heldout):
    feats = classifier_features(heldout[0])
    assert feats.shape == (1000, 128) and feats.dtype == torch.float64
    mu, sigma = feature_statistics(feats)
    scale = float(sigma.trace())
    assert abs(classifier_fd(heldout[0], reference=(mu, sigma))) < 1e-6 * scale
    assert abs(classifier_fd(mnist5k()[0])) < 1e-6 * scale  # the 5,000 reference digits themselves
    fd_real = classifier_fd(heldout[0])
    fd_noise = classifier_fd(torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    assert fd_noise > 10 * fd_real > 0


def test_class_accuracy_rejects_bad_shapes(heldout):
    images, labels = heldout[0][:8], heldout[1][:8]
    with pytest.raises(ValueError, match=r"\(8, 28, 28\)"):
        class_accuracy(images[:, 0], labels)
    with pytest.raises(ValueError, match=r"\(8, 3, 28, 28\)"):
        class_accuracy(images.repeat(1, 3, 1, 1), labels)
    with pytest.raises(ValueError, match=r"\(7,\)"):
        class_accuracy(images, labels[:7])
    with pytest.raises(ValueError, match="unknown reference"):
        classifier_fd(images, reference="cifar10")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MNISTClassifier(channels=(4, 8, 8), feature_dim=16).eval()
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_mnist_classifier(tmp_path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert classifier_features(x, loaded).shape == (5, 16)


def test_missing_classifier_folder(tmp_path):
    missing = tmp_path / "no-such-classifier"
    with pytest.raises(FileNotFoundError, match="no-such-classifier"):
        load_mnist_classifier(missing)


def test_shipped_folder_has_model_card():
    assert (SHIPPED_CLASSIFIER / "README.md").is_file()
    assert (SHIPPED_CLASSIFIER / "diffusion_pytorch_model.safetensors").stat().st_size < 1_000_000


def test_classifier_metrics_see_images_as_saved(heldout):
    """Out-of-range values and sub-8-bit detail of a model's output do not reach the classifier: it scores
    what a saved PNG (and FID) shows. The embedded digits are unchanged by that rounding."""
    from distilldiff.images import as_saved

    images = heldout[0][:200]
    torch.testing.assert_close(as_saved(images), images)
    torch.manual_seed(0)
    below_black = images - 0.5 * torch.rand_like(images) * (images == -1)  # background pushed below -1
    fine = images + 0.003 * torch.randn_like(images)  # detail finer than one grey level (1 / 127.5)
    assert classifier_fd(below_black) == pytest.approx(classifier_fd(images), abs=1e-9)
    torch.testing.assert_close(classifier_features(below_black), classifier_features(images))
    torch.testing.assert_close(classifier_features(fine), classifier_features(as_saved(fine)))
    assert not torch.equal(as_saved(fine), fine)
