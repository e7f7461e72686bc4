"""Teachers behind one denoiser interface ``D(x, sigma, **cond)``."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from .base import Denoiser
from .conditioning import ClassLabels, Conditioning
from .flow import FlowDenoiser, FluxDenoiser, flow_denoiser_from_pipeline, is_flow_text_to_image
from .gmm import GaussianMixtureDenoiser
from .guidance import CFGDenoiser
from .text import EmbeddingCache, LatentDenoiser, TextConditioned, TextEmbeddings, is_text_to_image, read_prompts
from .vp import VPDenoiser, _read_teacher_info, ddim_timesteps, load_pipeline

BUILTIN_TEACHERS = {"mnist": "mnist-teacher", "mnist-t2i": "mnist-t2i-teacher", "mnist-t2i-flow": "mnist-t2i-flow-teacher"}


def builtin_teacher_path(name: str) -> Path:
    """Folder of a teacher shipped inside the package (``builtin:mnist``)."""
    if name not in BUILTIN_TEACHERS:
        raise ValueError(f"unknown builtin teacher {name!r}; available: {', '.join(BUILTIN_TEACHERS)}")
    return Path(str(resources.files("distilldiff") / "assets" / BUILTIN_TEACHERS[name]))


#: one part of a Hugging Face Hub id: letters, digits, '-', '_', '.', not starting or ending with '-' or '.'
_HUB_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"


def looks_like_hub_id(path: str) -> bool:
    """Whether ``path`` has the form of a Hugging Face Hub model id, ``owner/name`` (the hub's rules:
    letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``; at most 96 characters)."""
    return (len(path) <= 96 and re.fullmatch(f"{_HUB_PART}/{_HUB_PART}", path) is not None
            and "--" not in path and ".." not in path)


def resolve_teacher_path(path: str, what: str = "teacher.path") -> str:
    """Map ``builtin:NAME`` to the shipped folder; check that a local-looking path exists.

    Anything that is neither an existing folder nor a hub id (``owner/name``, :func:`looks_like_hub_id`,
    whose ``owner`` is not a local folder) is a one-line ``FileNotFoundError`` naming ``what`` (the
    config key or flag that gave the path) and the path.
    """
    if path.startswith("builtin:"):
        return str(builtin_teacher_path(path.split(":", 1)[1]))
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{what} {path!r} is a file, expected a diffusers pipeline folder")
        return str(p)
    # owner/name is a hub id, unless "owner" is a local folder (runs/nope is a mistyped run, not a repository)
    if not looks_like_hub_id(path) or Path(path.split("/")[0]).is_dir():
        raise FileNotFoundError(f"{what} {path!r}: no such folder (and not a hub id of the form owner/name)")
    return path


def _check_hub_model(repo_id: str, what: str) -> bool:
    """Check that hub model ``repo_id`` can be loaded before diffusers tries: its ``model_index.json``
    is in the local cache, or one request to the hub (no retries) finds it. A model the hub cannot
    give (offline, unreachable, missing, gated) is a one-line ``FileNotFoundError`` saying why.
    Returns whether the hub is in offline mode (``HF_HUB_OFFLINE``), where diffusers must not try it."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    offline = bool(constants.is_offline_mode())
    if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str):
        return offline
    where = f"{what} {repo_id!r}"
    advice = "download it where the hub can be reached, or give a local pipeline folder"
    if offline:
        raise FileNotFoundError(f"{where}: the model is not in the local cache and offline mode is on (HF_HUB_OFFLINE=1); {advice}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "model_index.json"))
    except GatedRepoError:  # before RepositoryNotFoundError, its base
        raise FileNotFoundError(f"{where}: the model is gated on the Hugging Face Hub; accept its terms and log in "
                                "(hf auth login), or give a local pipeline folder") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}: no such folder, and no such model on the Hugging Face Hub "
                                "(or it is private: log in with hf auth login)") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"{where}: not a diffusers pipeline (the hub model has no model_index.json)") from None
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"{where}: the Hugging Face Hub answered with an error ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - no answer at all: DNS, refused connection, proxy, timeout
        raise FileNotFoundError(f"{where}: the Hugging Face Hub could not be reached ({_first_line(e)}) and the model "
                                f"is not in the local cache; {advice}") from None
    return offline


def _first_line(e: BaseException) -> str:
    """The first line of an error's message, without diffusers' pointer to a traceback it does not show."""
    text = str(e).strip()
    text = re.sub(r"\s*Please check out the root cause in the stack ?trace above\.?", "", text, flags=re.IGNORECASE)
    return text.splitlines()[0] if text else type(e).__name__


def load_teacher(path: str, guidance_scale: float = 0.0, *, what: str = "teacher.path", prompts: str | None = None,
                 cache_embeddings: bool = True, **overrides) -> Denoiser:
    """Load a diffusers teacher (folder, hub id or ``builtin:NAME``) as a denoiser.

    Pixel pipelines of the DDPM family become a :class:`VPDenoiser`; Stable Diffusion (1.x/2.x)
    and SDXL pipelines a :class:`~distilldiff.teachers.text.LatentDenoiser` and Stable Diffusion 3
    Flux and SANA pipelines a :class:`~distilldiff.teachers.flow.FlowDenoiser` (:class:`FluxDenoiser`,
    :class:`~distilldiff.teachers.flow.SanaDenoiser`), in their VAE's latent
    space, whose training conditioning is drawn from ``prompts`` (a text file, one per line, or a
    folder of image + caption pairs), their embeddings cached on disk unless ``cache_embeddings``
    is false.

    ``guidance_scale`` > 0 wraps it in :class:`CFGDenoiser`. ``overrides`` (``sigma_data``,
    ``num_classes``, ``null_class``, ``prediction_type``; Flux: ``image_size``, ``embedded_guidance``)
    replace the folder's metadata. ``what``
    names where the path came from in error messages (``teacher.path``, ``--model``). A path that
    is no folder and no hub id, or a hub model that cannot be fetched (offline, unreachable, not
    cached, missing, gated), is a one-line ``FileNotFoundError``.
    """
    resolved = resolve_teacher_path(path, what)
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    if not Path(resolved).exists() and _check_hub_model(resolved, what):
        kwargs["local_files_only"] = True  # offline: diffusers would otherwise warn that it cannot connect
    overrides = {k: kwargs.pop(k) for k in ("sigma_data", "num_classes", "null_class", "prediction_type", "image_size",
                                            "embedded_guidance") if k in kwargs}
    try:
        pipe = load_pipeline(resolved, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"{what} {path!r}: could not load a diffusers pipeline ({_first_line(e)})") from None
    flow = is_flow_text_to_image(pipe)
    if not flow:  # flow pipelines: flow_denoiser_from_pipeline checks these itself
        for key in ("image_size", "embedded_guidance"):
            if key in overrides:
                raise ValueError(f"teacher.{key}: applies to Flux teachers; {path} is a {type(pipe).__name__}; remove the key")
    if flow or is_text_to_image(pipe):
        for key in ("num_classes", "null_class"):
            if key in overrides:
                raise ValueError(f"teacher.{key}: {path} is a text-to-image pipeline, conditioned on prompts, not class labels; remove the key")
        if flow and "prediction_type" in overrides:
            raise ValueError(f"teacher.prediction_type: {path} is a flow-matching pipeline (it predicts velocity); remove the key")
        info = _read_teacher_info(resolved) if Path(resolved).is_dir() else {}
        if flow:  # a folder may say which T5 length its model was trained with (the pipeline call's max_sequence_length)
            overrides.setdefault("image_size", info.get("image_size"))
            teacher = flow_denoiser_from_pipeline(pipe, path, max_sequence_length=info.get("max_sequence_length"), **overrides)
        else:
            teacher = LatentDenoiser.from_pipeline(pipe, path, **overrides)
        default = info.get("prompts")
        if prompts is None and default is not None:  # the folder names its own prompts (e.g. builtin:mnist-t2i's captions)
            prompts = str(Path(resolved) / default)
        if prompts is not None:
            teacher.set_prompts(read_prompts(prompts), EmbeddingCache() if cache_embeddings else None)
    else:
        if prompts is not None:
            raise ValueError(f"teacher.prompts: {path} is not a text-to-image pipeline (it takes no prompts); remove the key")
        teacher = VPDenoiser.from_pipeline(pipe, resolved, **overrides)
    return CFGDenoiser(teacher, guidance_scale) if guidance_scale else teacher


__all__ = [
    "Denoiser",
    "Conditioning",
    "ClassLabels",
    "VPDenoiser",
    "LatentDenoiser",
    "FlowDenoiser",
    "FluxDenoiser",
    "TextConditioned",
    "TextEmbeddings",
    "GaussianMixtureDenoiser",
    "CFGDenoiser",
    "load_teacher",
    "resolve_teacher_path",
    "looks_like_hub_id",
    "builtin_teacher_path",
    "ddim_timesteps",
]
