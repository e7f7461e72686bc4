"""distilldiff: distil a frozen many-step diffusion teacher into a one- or few-step student.

Public API::

    from distilldiff import load_teacher, load_config, DistillConfig, distill, load_sampler
"""

from .config import ConfigError, DistillConfig, ObjectiveConfig, StudentConfig, TeacherTrainConfig, TrainConfig, load_config
from .distill import build_distill_task, distill
from .engine import Engine, NonFiniteError, TrainTask
from .export import export_run, load_student, save_student
from .inference import Sampler, load_sampler
from .objectives import OBJECTIVES, Batch, Objective, Phase, SiD, SiDConfig, Stage, register
from .samplers import ddim_sample, karras_sigmas, multistep_sample
from .students import OneStepGenerator, Student
from .teacher_training import train_teacher
from .teachers import CFGDenoiser, ClassLabels, Conditioning, Denoiser, GaussianMixtureDenoiser, VPDenoiser, load_teacher

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DistillConfig", "ObjectiveConfig", "StudentConfig", "TeacherTrainConfig", "TrainConfig", "load_config",
    "build_distill_task", "distill", "Engine", "NonFiniteError", "TrainTask",
    "OBJECTIVES", "Batch", "Objective", "Phase", "SiD", "SiDConfig", "Stage", "register",
    "ddim_sample", "karras_sigmas", "multistep_sample", "Sampler", "load_sampler",
    "OneStepGenerator", "Student", "train_teacher", "export_run", "load_student", "save_student",
    "CFGDenoiser", "ClassLabels", "Conditioning", "Denoiser", "GaussianMixtureDenoiser", "VPDenoiser", "load_teacher",
]
