"""Distillation objectives. Each is a small object; ``OBJECTIVES`` maps config names to them."""

from .base import Batch, Objective, Phase
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .fdistill import FDistill, FDistillConfig
from .denoising import DenoisingConfig, DenoisingObjective
from .sid import SiD, SiDConfig

#: config name -> (objective class, its hyperparameter dataclass)
OBJECTIVES = {
    "sid": (SiD, SiDConfig),
    "consistency": (ConsistencyDistillation, ConsistencyConfig),
    "fdistill": (FDistill, FDistillConfig),
}

__all__ = ["Batch", "Objective", "Phase", "SiD", "SiDConfig", "ConsistencyDistillation", "ConsistencyConfig", "FDistill", "FDistillConfig", "DenoisingObjective", "DenoisingConfig", "OBJECTIVES"]
