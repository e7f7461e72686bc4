"""Distillation objectives. Each is a small object registered under its config name.

Adding an objective takes one file (its config dataclass, a subclass of
:class:`~distilldiff.config.ObjectiveConfig` with a ``name``, and its :class:`Objective`
subclass with ``config_class``) and one call of :func:`register`; configs then accept
``objective: {name: ...}`` with its keys validated at load time.
"""

from __future__ import annotations

from .base import Batch, Objective, Phase, Stage
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .denoising import DenoisingConfig, DenoisingObjective
from .fdistill import FDistill, FDistillConfig
from .guidance import GuidanceConfig, GuidanceDistillation
from .progressive import ProgressiveConfig, ProgressiveDistillation
from .scm import SCM, SCMConfig
from .sid import SiD, SiDConfig

#: config name -> objective class (its hyperparameters: ``OBJECTIVES[name].config_class``)
OBJECTIVES: dict[str, type[Objective]] = {}


def register(objective: type[Objective]) -> type[Objective]:
    """Make ``objective`` available as ``objective.name`` in distill configs (usable as a decorator)."""
    name = objective.name
    if not name or getattr(objective, "config_class", None) is None or objective.config_class.name != name:
        raise ValueError(f"{objective.__name__}: an objective needs a config_class whose name it shares (got {name!r})")
    if OBJECTIVES.get(name, objective) is not objective:
        raise ValueError(f"objective name {name!r} is already registered by {OBJECTIVES[name].__name__}")
    OBJECTIVES[name] = objective
    return objective


for _objective in (SiD, ConsistencyDistillation, FDistill, ProgressiveDistillation, GuidanceDistillation, SCM):
    register(_objective)

__all__ = [
    "Batch", "Objective", "Phase", "Stage", "OBJECTIVES", "register",
    "SiD", "SiDConfig", "ConsistencyDistillation", "ConsistencyConfig", "FDistill", "FDistillConfig",
    "ProgressiveDistillation", "ProgressiveConfig", "GuidanceDistillation", "GuidanceConfig", "SCM", "SCMConfig",
    "DenoisingObjective", "DenoisingConfig",
]
