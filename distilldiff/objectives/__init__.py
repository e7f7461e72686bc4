"""Distillation objectives. Each is a small object; ``OBJECTIVES`` maps config names to them."""

from .base import Batch, Objective, Phase
from .consistency import ConsistencyConfig, ConsistencyDistillation
from .fdistill import FDistill, FDistillConfig
from .guidance import GuidanceConfig, GuidanceDistillation
from .progressive import ProgressiveConfig, ProgressiveDistillation
from .denoising import DenoisingConfig, DenoisingObjective
from .sid import SiD, SiDConfig

#: config name -> (objective class, its hyperparameter dataclass)
OBJECTIVES = {
    "sid": (SiD, SiDConfig),
    "consistency": (ConsistencyDistillation, ConsistencyConfig),
    "fdistill": (FDistill, FDistillConfig),
    "progressive": (ProgressiveDistillation, ProgressiveConfig),
    "guidance": (GuidanceDistillation, GuidanceConfig),
}

__all__ = ["Batch", "Objective", "Phase", "SiD", "SiDConfig", "ConsistencyDistillation", "ConsistencyConfig", "FDistill", "FDistillConfig", "ProgressiveDistillation", "ProgressiveConfig", "GuidanceDistillation", "GuidanceConfig", "DenoisingObjective", "DenoisingConfig", "OBJECTIVES"]
