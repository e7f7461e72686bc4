"""diffusers pipelines for exported students (see :mod:`distilldiff.export`)."""

from .pipeline_distilldiff import DistillDiffPipeline, GuidedUNet2DModel

__all__ = ["DistillDiffPipeline", "GuidedUNet2DModel"]
