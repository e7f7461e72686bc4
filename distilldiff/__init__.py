"""distilldiff: distil a frozen many-step diffusion teacher into a one- or few-step student.

Public API::

    from distilldiff import load_teacher, load_config, DistillConfig, distill, load_sampler

The names below are imported lazily (PEP 562): ``import distilldiff`` (and ``distilldiff --help``)
loads neither torch, diffusers nor accelerate; the first use of a name imports its submodule.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule (relative to this package) that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(["ConfigError", "DistillConfig", "ObjectiveConfig", "StudentConfig", "TeacherTrainConfig", "TrainConfig", "load_config"], ".config"),
    **dict.fromkeys(["build_distill_task", "distill"], ".distill"),
    **dict.fromkeys(["Engine", "NonFiniteError", "TrainTask"], ".engine"),
    **dict.fromkeys(["export_run", "load_student", "save_student"], ".export"),
    **dict.fromkeys(["Sampler", "load_sampler"], ".inference"),
    # importing .objectives registers the built-in objectives in OBJECTIVES
    **dict.fromkeys(["OBJECTIVES", "Batch", "Objective", "Phase", "SiD", "SiDConfig", "Stage", "register"], ".objectives"),
    **dict.fromkeys(["ddim_sample", "karras_sigmas", "multistep_sample"], ".samplers"),
    **dict.fromkeys(["FewStepGenerator", "OneStepGenerator", "Student"], ".students"),
    **dict.fromkeys(["train_teacher"], ".teacher_training"),
    **dict.fromkeys(["CFGDenoiser", "ClassLabels", "Conditioning", "Denoiser", "GaussianMixtureDenoiser", "VPDenoiser", "load_teacher"], ".teachers"),
}

__all__ = [
    "ConfigError", "DistillConfig", "ObjectiveConfig", "StudentConfig", "TeacherTrainConfig", "TrainConfig", "load_config",
    "build_distill_task", "distill", "Engine", "NonFiniteError", "TrainTask",
    "OBJECTIVES", "Batch", "Objective", "Phase", "SiD", "SiDConfig", "Stage", "register",
    "ddim_sample", "karras_sigmas", "multistep_sample", "Sampler", "load_sampler",
    "FewStepGenerator", "OneStepGenerator", "Student", "train_teacher", "export_run", "load_student", "save_student",
    "CFGDenoiser", "ClassLabels", "Conditioning", "Denoiser", "GaussianMixtureDenoiser", "VPDenoiser", "load_teacher",
]

if TYPE_CHECKING:  # type checkers and IDEs see the eager imports; at run time they are lazy
    from .config import ConfigError, DistillConfig, ObjectiveConfig, StudentConfig, TeacherTrainConfig, TrainConfig, load_config
    from .distill import build_distill_task, distill
    from .engine import Engine, NonFiniteError, TrainTask
    from .export import export_run, load_student, save_student
    from .inference import Sampler, load_sampler
    from .objectives import OBJECTIVES, Batch, Objective, Phase, SiD, SiDConfig, Stage, register
    from .samplers import ddim_sample, karras_sigmas, multistep_sample
    from .students import FewStepGenerator, OneStepGenerator, Student
    from .teacher_training import train_teacher
    from .teachers import CFGDenoiser, ClassLabels, Conditioning, Denoiser, GaussianMixtureDenoiser, VPDenoiser, load_teacher


def __getattr__(name: str) -> Any:
    """Import the submodule that defines the public ``name`` on first use and cache the value."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    """Module attributes plus every lazily imported public name."""
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """``distilldiff.distill`` is the function :func:`distill`, as it was with eager imports.

    The import system binds a submodule on its package once loaded (``import distilldiff.distill``
    sets ``distilldiff.distill`` to the module), which would shadow the lazily imported function of
    the same name; that one binding is dropped (the module stays in ``sys.modules``).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
