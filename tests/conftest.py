import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """distilldiff's cache (text embeddings, latents) in the test's own folder: tests that encode prompts
    or images of tiny random pipelines use ``pytestmark = pytest.mark.usefixtures("private_cache")``."""
    monkeypatch.setenv("DISTILLDIFF_CACHE", str(tmp_path / "cache"))
