"""Distillation objectives. Each is a small object; ``OBJECTIVES`` maps config names to them."""

from .base import Batch, Objective, Phase
from .denoising import DenoisingConfig, DenoisingObjective
from .sid import SiD, SiDConfig

#: config name -> (objective class, its hyperparameter dataclass)
OBJECTIVES = {"sid": (SiD, SiDConfig)}

__all__ = ["Batch", "Objective", "Phase", "SiD", "SiDConfig", "DenoisingObjective", "DenoisingConfig", "OBJECTIVES"]
