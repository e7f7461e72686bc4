"""The training engine, split by concern: the loop (:class:`Engine`), what it trains
(:class:`TrainTask`), the student's EMA (:class:`EMA`), the maintenance schedule
(:class:`Schedule`) and the run folder's I/O (:class:`RunFolder`)."""

from .ema import EMA, ema_beta
from .loss_plot import LossHistory, write_loss_plot
from .engine import Engine, NonFiniteError, TrainingInterrupted, TrainState, trainable_parameters
from .run_folder import CHECKPOINT_PREFIX, RunFolder
from .schedule import Due, LogWindow, Schedule
from .task import SampleFn, TrainTask

__all__ = [
    "EMA", "ema_beta", "Engine", "LossHistory", "write_loss_plot", "NonFiniteError", "TrainingInterrupted", "TrainState", "trainable_parameters", "CHECKPOINT_PREFIX", "RunFolder",
    "Due", "LogWindow", "Schedule", "SampleFn", "TrainTask",
]
