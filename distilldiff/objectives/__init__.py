"""Distillation objectives. Each is a small object; ``OBJECTIVES`` maps config names to them."""

from .base import Batch, Objective, Phase
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .denoising import DenoisingConfig, DenoisingObjective
from .sid import SiD, SiDConfig

#: config name -> (objective class, its hyperparameter dataclass)
OBJECTIVES = {
    "sid": (SiD, SiDConfig),
    "consistency": (ConsistencyDistillation, ConsistencyConfig),
}

__all__ = ["Batch", "Objective", "Phase", "SiD", "SiDConfig", "ConsistencyDistillation", "ConsistencyConfig", "DenoisingObjective", "DenoisingConfig", "OBJECTIVES"]
