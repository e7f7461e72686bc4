"""Teachers behind one denoiser interface ``D(x, sigma, **cond)``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .base import Denoiser
from .conditioning import ClassLabels, Conditioning
from .gmm import GaussianMixtureDenoiser
from .guidance import CFGDenoiser
from .vp import VPDenoiser, ddim_timesteps

BUILTIN_TEACHERS = {"mnist": "mnist-teacher"}


def builtin_teacher_path(name: str) -> Path:
    """Folder of a teacher shipped inside the package (``builtin:mnist``)."""
    if name not in BUILTIN_TEACHERS:
        raise ValueError(f"unknown builtin teacher {name!r}; available: {', '.join(BUILTIN_TEACHERS)}")
    return Path(str(resources.files("distilldiff") / "assets" / BUILTIN_TEACHERS[name]))


def resolve_teacher_path(path: str) -> str:
    """Map ``builtin:NAME`` to the shipped folder; check that a local-looking path exists.

    Anything that is neither an existing folder nor a plausible hub id (``org/name``) is an error.
    """
    if path.startswith("builtin:"):
        return str(builtin_teacher_path(path.split(":", 1)[1]))
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"teacher.path {path!r} is a file, expected a diffusers pipeline folder")
        return str(p)
    # org/name is a hub id, unless "org" is a local folder (runs/nope is a mistyped run, not a repository)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~")) and not Path(path.split("/")[0]).is_dir()
    if not looks_like_hub_id:
        raise FileNotFoundError(f"teacher.path {path!r}: no such folder (and not a hub id of the form org/name)")
    return path


def load_teacher(path: str, guidance_scale: float = 0.0, **overrides) -> Denoiser:
    """Load a diffusers teacher (folder, hub id or ``builtin:NAME``) as a denoiser.

    ``guidance_scale`` > 0 wraps it in :class:`CFGDenoiser`. ``overrides`` (``sigma_data``,
    ``num_classes``, ``null_class``, ``prediction_type``) replace the folder's metadata.
    """
    resolved = resolve_teacher_path(path)
    try:
        teacher = VPDenoiser.from_pretrained(resolved, **{k: v for k, v in overrides.items() if v is not None})
    except (OSError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FileNotFoundError(f"teacher.path {path!r}: could not load a diffusers pipeline ({first})") from None
    return CFGDenoiser(teacher, guidance_scale) if guidance_scale else teacher


__all__ = [
    "Denoiser",
    "Conditioning",
    "ClassLabels",
    "VPDenoiser",
    "GaussianMixtureDenoiser",
    "CFGDenoiser",
    "load_teacher",
    "resolve_teacher_path",
    "builtin_teacher_path",
    "ddim_timesteps",
]
