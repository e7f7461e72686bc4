"""The one training loop that serves every objective, on accelerate.

An objective declares its networks and phases (:mod:`distilldiff.objectives`); the engine
builds optimizers for the trainable parameters of its student and critics, alternates the
phases, keeps an EMA of the student, and hands logging, sample grids, evaluation and
checkpoints to a :class:`~distilldiff.engine.schedule.Schedule` and the run folder's I/O to a
:class:`~distilldiff.engine.run_folder.RunFolder`.

Sharding (plan for FSDP through accelerate, not enabled yet):

* trained networks (student, critics) go through ``accelerator.prepare`` and are only ever
  called through the prepared module; a network that is not trained in the current phase is
  called through it too, inside ``no_sync`` (:class:`_Untrained`), so FSDP can gather its
  shards and DDP does not wait for gradients that never come;
* the EMA and the objective's target networks are copies of the full student made before
  ``prepare`` (gathered state); under FSDP their updates need the full parameters
  (``FullyShardedDataParallel.summon_full_params``) or ``accelerator.get_state_dict``;
* frozen networks (the teacher) are not prepared; a teacher too large for one device would
  be prepared as well, with its parameters frozen, and called the same way;
* checkpoints go through ``accelerator.save_state`` (sharded state under FSDP) and the EMA,
  targets and student folder are written by the main process from full state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..atomic import replace_folder
from ..config import TrainConfig
from ..images import save_grid
from ..objectives.base import Batch, Phase
from .ema import EMA
from .loss_plot import LossHistory, write_loss_plot
from .run_folder import RunFolder
from .schedule import Due, LogWindow, Schedule, lr_factor
from .task import TrainTask

logger = logging.getLogger(__name__)

#: the logged values up to a checkpoint's step, in the checkpoint (:class:`LossHistory` as JSON)
HISTORY_FILE = "history.json"
#: the position of a DataLoader-backed real-data stream (:class:`~distilldiff.data.ShardedBatches`) in a checkpoint
DATA_STATE_FILE = "data.json"
#: the time estimate is printed after this many steps of a run (the first step is slower: warm-up)
ETA_AFTER_STEPS = 5


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf (message names the step, phase and network)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after finishing its step and writing a checkpoint.

    Attributes:
        signal_name: ``SIGINT`` or ``SIGTERM``.
        step: the step the checkpoint holds.
        checkpoint: the checkpoint folder written (``--resume latest`` continues from it).
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


@dataclass
class TrainState:
    """Counters saved with every checkpoint (as JSON)."""

    step: int = 0
    nimg: int = 0
    nonfinite: int = 0
    scaler_skips: int = 0
    train_seconds: float = 0.0


def enable_gradient_checkpointing(net: nn.Module, name: str) -> None:
    """Turn on activation checkpointing in every sub-network of ``net`` that offers it (diffusers
    models' ``enable_gradient_checkpointing``): less memory, one more forward pass per backward."""
    found = [m for m in net.modules() if callable(getattr(m, "enable_gradient_checkpointing", None))
             and getattr(m, "_supports_gradient_checkpointing", True)]
    if not found:
        raise ValueError(f"train.gradient_checkpointing: the network '{name}' ({type(net).__name__}) has no sub-network that supports it")
    for m in found:
        m.enable_gradient_checkpointing()


def critic_or_shared(role: str, shared, critic_own):
    """A trained network's setting: the critics' own (``train.critic_lr``, ``critic_grad_clip``) where ``role``
    is ``critic`` and that key is set, else the setting every network shares (``lr``, ``grad_clip``)."""
    return critic_own if role == "critic" and critic_own is not None else shared


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters ``net`` declares trainable (``net.trainable_parameters()``), else all of them."""
    declared = getattr(net, "trainable_parameters", None)
    return list(declared()) if callable(declared) else list(net.parameters())


def param_groups(net: nn.Module, params: list[nn.Parameter], lr: float) -> list:
    """The optimiser's parameter groups: ``params`` as one group, unless ``net.learning_rate_scales()``
    names parameters that train at a multiple of ``lr`` (e.g. a zero-started input layer): each such
    multiple is its own group, with ``lr_scale`` kept for the learning-rate schedule."""
    declared = getattr(net, "learning_rate_scales", None)
    scales = declared() if callable(declared) else {}
    if not scales:
        return params
    by_scale: dict[float, list[nn.Parameter]] = {}
    for p in params:
        by_scale.setdefault(float(scales.get(p, 1.0)), []).append(p)
    return [{"params": ps, "lr": lr * k, "lr_scale": k} for k, ps in sorted(by_scale.items())]


class _Untrained:
    """A prepared (distributed) network called in a phase that does not train it: the call goes
    through the wrapper, so sharded parameters are gathered, inside ``no_sync``, so that no
    gradient reduction is expected. Attributes are those of the unwrapped network."""

    def __init__(self, prepared: nn.Module, inner: nn.Module, no_sync):
        self._prepared, self._inner, self._no_sync = prepared, inner, no_sync

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._no_sync(self._prepared):
            return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Engine:
    """Trains ``task`` with ``train`` settings into ``output_dir`` (layout: :class:`RunFolder`)."""

    def __init__(self, task: TrainTask, train: TrainConfig, output_dir: str | Path):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.task, self.cfg = task, train
        self.run_folder = RunFolder(output_dir)
        self.output_dir = self.run_folder.root
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            cpu=train.cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.run_folder.logs)),
        )
        acc = self.accelerator
        set_seed(train.seed, device_specific=True)
        # process-wide switches (PyTorch has no per-module ones); PyTorch's default lets cuDNN use TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = train.tf32
        per_step = acc.num_processes * train.grad_accum
        if train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={train.batch_size} is not divisible by processes x grad_accum = {per_step}"
            )
        self.micro_batch = train.batch_size // per_step
        obj = task.objective
        missing = set(obj.networks) - set(task.networks)
        if missing:
            raise ValueError(f"objective '{obj.name}' needs networks {sorted(missing)} that the task does not build")
        if obj.needs_real_data and task.data_fn is None:
            raise ValueError(f"objective '{obj.name}' needs real data, but the task has none")
        self.phases = obj.phases()
        self.trainable = [n for n, role in obj.networks.items() if role in ("student", "critic")]
        self.frozen = {n: task.networks[n].to(acc.device).eval().requires_grad_(False) for n, r in obj.networks.items() if r in ("frozen", "target")}
        #: networks the objective itself updates (e.g. an EMA target); saved with every checkpoint
        self.targets = [n for n, r in obj.networks.items() if r == "target"]
        #: the EMA of the student, copied from the full network before it is prepared
        self.ema = EMA(task.networks[obj.student], train.ema_halflife_kimg, train.ema_rampup)
        models, opts = [], []
        self.params: dict[str, list[nn.Parameter]] = {}
        self.base_lr: dict[str, float] = {}
        self.max_norm: dict[str, float] = {}
        for name in self.trainable:
            net = task.networks[name].train().requires_grad_(False)
            self.params[name] = trainable_parameters(net)
            for p in self.params[name]:
                p.requires_grad_(True)
            if train.gradient_checkpointing:
                enable_gradient_checkpointing(net, name)
            role = obj.networks[name]
            lr = critic_or_shared(role, train.lr, train.critic_lr)
            opts.append(torch.optim.AdamW(param_groups(net, self.params[name], lr), lr=lr, betas=train.betas,
                                          weight_decay=train.weight_decay))
            self.base_lr[name] = lr
            clip = critic_or_shared(role, train.grad_clip, train.critic_grad_clip)
            self.max_norm[name] = clip if clip is not None else math.inf
            models.append(net)
        prepared = acc.prepare(*models, *opts)
        self.models = dict(zip(self.trainable, prepared[: len(models)]))
        self.optimizers = dict(zip(self.trainable, prepared[len(models) :]))
        self.ema.module.to(acc.device)
        if callable(getattr(task.data_fn, "prepare", None)):  # a DataLoader-backed stream: sharded by accelerate
            task.data_fn.prepare(acc, self.micro_batch, train.seed)
        self.state = TrainState()
        self._grid_noise: Tensor | None = None
        self._consecutive_scaler_skips = 0
        #: the first SIGINT/SIGTERM received during training (``None``: none); read after each step
        self._stop_signal: str | None = None
        #: every logged value of the run (saved with each checkpoint, drawn next to the sample grids)
        self.history = LossHistory()
        #: the most recent logged averages (the end summary's final losses)
        self.last_logs: dict[str, float] = {}

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    # -- one training step -----------------------------------------------------------------------

    def _batch(self) -> Batch:
        n, dev = self.micro_batch, self.device
        noise = torch.randn((n, *self.task.sample_shape), device=dev)
        step = self.state.step  # the number of finished updates: 0 in the first
        if self.task.objective.needs_real_data:
            real, cond = self.task.data_fn(n, dev)
            return Batch(noise=noise, cond=cond, real=real, step=step)
        return Batch(noise=noise, cond=self.task.cond_fn(n, dev), step=step)

    def _nets_for(self, phase: Phase) -> dict[str, Any]:
        """The trained network as prepared, in train mode with gradients on its trainable
        parameters; every other network frozen and in eval mode (gradients still flow through
        its input), distributed ones called through their wrapper (:class:`_Untrained`)."""
        acc = self.accelerator
        nets: dict[str, Any] = dict(self.frozen)
        for name, model in self.models.items():
            inner = acc.unwrap_model(model)
            trained = name == phase.trains
            for p in self.params[name]:
                p.requires_grad_(trained)
            inner.train(trained)
            nets[name] = model if trained or model is inner else _Untrained(model, inner, acc.no_sync)
        return nets

    def _any(self, flag: bool) -> bool:
        t = torch.tensor(float(flag), device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum") > 0)

    def _nonfinite(self, what: str, phase: Phase) -> None:
        msg = f"non-finite {what} at step {self.state.step + 1}, phase '{phase.name}' (network '{phase.trains}')"
        if self.cfg.nonfinite == "stop":
            raise NonFiniteError(msg + "; set train.nonfinite=skip to skip such steps")
        self.state.nonfinite += 1
        logger.warning("%s: step skipped (%d so far)", msg, self.state.nonfinite)
        if self.state.nonfinite > self.cfg.max_nonfinite:
            raise NonFiniteError(f"{msg}; {self.state.nonfinite} skipped steps exceed train.max_nonfinite={self.cfg.max_nonfinite}")

    def _run_phase(self, phase: Phase) -> dict[str, float]:
        """One optimizer update of ``phase.trains`` (over ``grad_accum`` micro-batches); its logs."""
        acc, cfg = self.accelerator, self.cfg
        nets = self._nets_for(phase)
        model, opt = self.models[phase.trains], self.optimizers[phase.trains]
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else acc.no_sync(model)
            with sync:
                with acc.autocast():
                    loss, extra = self.task.objective.loss(phase, nets, self._batch())
                if self._any(not bool(torch.isfinite(loss))):
                    opt.zero_grad(set_to_none=True)
                    self._nonfinite("loss", phase)
                    return {}
                acc.backward(loss / cfg.grad_accum)
            for k, v in extra.items():
                logs[f"{phase.name}/{k}"] = logs.get(f"{phase.name}/{k}", 0.0) + float(v) / cfg.grad_accum
        if cfg.lr_schedule == "linear" or cfg.lr_warmup_steps:  # derived from the checkpointed step: nothing extra to save
            factor = lr_factor(self.state.step, cfg.max_steps, cfg.lr_schedule, cfg.lr_warmup_steps)
            for group in opt.param_groups:
                group["lr"] = self.base_lr[phase.trains] * group.get("lr_scale", 1.0) * factor
        norm = acc.clip_grad_norm_(model.parameters(), self.max_norm[phase.trains])  # None under DeepSpeed
        scaled = acc.scaler is not None  # fp16: the loss scaler skips overflowing steps itself
        if norm is not None and not scaled and self._any(not bool(torch.isfinite(torch.as_tensor(norm)))):
            opt.zero_grad(set_to_none=True)
            self._nonfinite("gradient", phase)
            return {}
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._count_scaler_skip(opt, phase)
        if norm is not None:
            logs[f"{phase.name}/grad_norm"] = float(norm)
        return logs

    def _count_scaler_skip(self, opt, phase: Phase) -> None:
        if self.accelerator.scaler is not None and getattr(opt, "step_was_skipped", False):
            self.state.scaler_skips += 1
            self._consecutive_scaler_skips += 1
            if self._consecutive_scaler_skips > self.cfg.max_nonfinite:
                raise NonFiniteError(
                    f"non-finite gradient at step {self.state.step + 1}, phase '{phase.name}' (network '{phase.trains}'): "
                    f"the fp16 loss scaler skipped {self._consecutive_scaler_skips} updates in a row (train.max_nonfinite={self.cfg.max_nonfinite})"
                )
        else:
            self._consecutive_scaler_skips = 0

    def train_step(self, window: LogWindow) -> None:
        """Every phase of one training step, then the EMA and target updates."""
        acc, cfg, obj = self.accelerator, self.cfg, self.task.objective
        t0 = time.time()
        for phase in self.phases:
            for _ in range(phase.repeats):
                window.add(self._run_phase(phase), phase.repeats)
        self.state.step += 1
        self.state.nimg += cfg.batch_size
        self.ema.update(acc.unwrap_model(self.models[obj.student]), self.state.nimg, cfg.batch_size)
        obj.update_targets({n: acc.unwrap_model(m) for n, m in self.models.items()} | self.frozen)
        self.state.train_seconds += time.time() - t0
        window.end_step()

    # -- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """accelerate state, EMA and targets under ``checkpoints/step-N``, the student folder
        (replaced atomically), then the counters that mark the checkpoint complete; finally the
        oldest checkpoints beyond ``train.keep_checkpoints`` are deleted."""
        acc, folder = self.accelerator, self.run_folder
        # a state.json left by an earlier run (resumed from an older checkpoint) goes first
        path = folder.begin_checkpoint(self.state.step) if acc.is_main_process else folder.checkpoint(self.state.step)
        acc.wait_for_everyone()
        with folder.writing(path):  # a full disk or read-only folder: one line naming the checkpoint
            acc.save_state(str(path))
            if acc.is_main_process:
                save_file(self.ema.state_dict(), str(path / "ema.safetensors"))
                if self.targets:
                    targets = {f"{n}.{k}": v.detach().contiguous() for n in self.targets for k, v in self.frozen[n].state_dict().items()}
                    save_file(targets, str(path / "targets.safetensors"))
                if callable(getattr(self.task.data_fn, "state_dict", None)):  # where the data stream stands
                    (path / DATA_STATE_FILE).write_text(json.dumps(self.task.data_fn.state_dict()))
                replace_folder(folder.student, lambda staged: self.task.save_fn(self.ema.module, staged, self._info()))
                (path / HISTORY_FILE).write_text(json.dumps(self.history.state_dict()))
                folder.write_state(path, self.state.__dict__)
                folder.rotate(self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        self.ema.load_state_dict(load_file(str(path / "ema.safetensors")))
        if self.targets:
            saved = load_file(str(path / "targets.safetensors"))
            for n in self.targets:
                prefix = f"{n}."
                self.frozen[n].load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
        if (path / DATA_STATE_FILE).is_file() and callable(getattr(self.task.data_fn, "load_state_dict", None)):
            self.task.data_fn.load_state_dict(json.loads((path / DATA_STATE_FILE).read_text()))
        self.state = TrainState(**self.run_folder.read_state(path))
        if (path / HISTORY_FILE).is_file():  # checkpoints written before the loss plot have none
            try:
                self.history.load_state_dict(json.loads((path / HISTORY_FILE).read_text()))
            except (ValueError, KeyError, TypeError) as e:  # only the plot needs it: say so and go on
                logger.warning("%s is unreadable (%s): the loss plot restarts at step %d", path / HISTORY_FILE, e, self.state.step)
        if self.accelerator.is_main_process:
            self.run_folder.trim_eval_log(self.state.step)

    def _info(self) -> dict:
        return {**self.task.info, "step": self.state.step, "images_seen": self.state.nimg, "train_seconds": round(self.state.train_seconds, 1)}

    # -- samples and evaluation ------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[dict[str, float], float]:
        """Run the task's evaluator on the EMA student (main process); log to tensorboard and
        append to ``eval.jsonl``. Returns the metrics (empty on other processes) and the seconds taken."""
        acc, results = self.accelerator, {}
        t0 = time.time()
        if acc.is_main_process:
            results = self.task.evaluator(self.ema.module, self.device)
            record = {"step": self.state.step, "nimg": self.state.nimg, "train_seconds": round(self.state.train_seconds, 2),
                      **{k: float(v) for k, v in results.items()}, **getattr(self.task.evaluator, "info", {}),
                      "eval_seconds": round(time.time() - t0, 2)}
            self.run_folder.append_evaluation(record)
            acc.log({f"eval/{k}": v for k, v in results.items()}, step=self.state.step)
            self.history.add(self.state.step, {f"eval/{k}": float(v) for k, v in results.items()})
            tqdm.write(f"eval at step {self.state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        acc.wait_for_everyone()
        return results, time.time() - t0

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        """A grid of the EMA student's samples from fixed noise (``samples/step-N.png`` and ``latest.png``).

        The noise and any further noise the sampler draws come from their own generators seeded
        with ``train.seed``: every grid of a run shows the same inputs, and grids do not touch the
        training RNG."""
        if not self.accelerator.is_main_process:
            return None
        n = self.cfg.num_sample_images
        if self._grid_noise is None:
            g = torch.Generator().manual_seed(self.cfg.seed)
            self._grid_noise = torch.randn((n, *self.task.sample_shape), generator=g)
        cond_fn = self.task.grid_cond_fn or self.task.cond_fn
        renoise = torch.Generator().manual_seed(self.cfg.seed + 1)
        images = self.task.sample_fn(self.ema.module, self._grid_noise.to(self.device), cond_fn(n, self.device), renoise)
        path = self.run_folder.sample_grid(self.state.step)
        with self.run_folder.writing(path):
            save_grid(images, path)
            shutil.copyfile(path, path.with_name("latest.png"))
        if self.task.image_stats is not None:
            stats = self.task.image_stats(images)
            self.accelerator.log({f"samples/{k}": v for k, v in stats.items()}, step=self.state.step)
            self.history.add(self.state.step, {f"samples/{k}": float(v) for k, v in stats.items()})
            tqdm.write(f"samples at step {self.state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        write_loss_plot(self.history, self.run_folder.loss_plot, title=str(self.output_dir))
        return path

    # -- the loop --------------------------------------------------------------------------------

    def run(self, config: Any, resume: str | None = None) -> Path:
        """Start a run: check ``resume`` before anything is written, save ``config`` as the run's
        ``config.yaml``, then :meth:`train`."""
        checkpoint = self._resume_point(resume)
        if self.accelerator.is_main_process:
            self.run_folder.write_config(config)
        return self._train_from(checkpoint)

    def _resume_point(self, resume: str | None) -> Path | None:
        """The checkpoint ``resume`` names (checked once: loading it is the expensive part), or
        ``None`` for a fresh run, which a folder holding an earlier run's checkpoints refuses."""
        if resume:
            return self.run_folder.find_checkpoint(resume)
        if self.run_folder.complete_checkpoints():
            raise FileExistsError(
                f"{self.output_dir} holds checkpoints of an earlier run; pass --resume latest to continue it "
                "or choose another --output-dir"
            )
        return None

    def _start(self, checkpoint: Path | None) -> None:
        acc = self.accelerator
        if checkpoint is not None:
            self.load_checkpoint(checkpoint)
            acc.print(f"resumed from {checkpoint} at step {self.state.step}")
        elif acc.is_main_process:
            self.run_folder.trim_eval_log(0)  # a crashed run's evaluations before its first checkpoint

    def _maintain(self, due: Due, window: LogWindow, bar) -> None:
        """Run the maintenance ``due`` after the current step."""
        step = self.state.step
        if due.log:
            logs = window.flush(self.cfg.batch_size)
            logs["nonfinite_skipped"] = self.state.nonfinite
            self.last_logs = logs
            self.history.add(step, logs)
            self.accelerator.log(logs, step=step)
            bar.set_postfix({k.split("/")[0] if k.endswith("/loss") else k: f"{v:.4g}" for k, v in logs.items() if k.endswith("/loss") or k == "img_per_s"})
        if due.sample:
            t0 = time.time()
            self.write_samples()
            window.exclude(time.time() - t0)  # nor is drawing grids and the loss plot
        if due.evaluate:
            window.exclude(self.evaluate()[1])  # evaluation time is not training speed
        if due.checkpoint:
            self.save_checkpoint()

    def train(self, resume: str | None = None) -> Path:
        """Run to ``train.max_steps`` (or the time budget), from the checkpoint ``resume`` names
        (``latest`` or a path) or from scratch; returns the student folder."""
        return self._train_from(self._resume_point(resume))

    def _train_from(self, checkpoint: Path | None) -> Path:
        acc, cfg = self.accelerator, self.cfg
        self._start(checkpoint)
        acc.init_trackers("distilldiff")
        evaluator = self.task.evaluator
        schedule = Schedule(cfg.max_steps, cfg.log_every, cfg.sample_every, cfg.checkpoint_every,
                            evaluator.every if evaluator is not None else None, self.state.step, resumed=checkpoint is not None)
        window = LogWindow(peaks=("grad_norm",))
        acc.print(self.startup_line())
        if self.state.step < cfg.max_steps:  # e.g. DMD's regression pairs: before the clock of the time estimate starts
            self.task.objective.prepare({n: acc.unwrap_model(m) for n, m in self.models.items()} | self.frozen, acc.device, self.micro_batch)
        start_step, wall0 = self.state.step, time.time()
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not acc.is_local_main_process,
                   desc=self.task.objective.name, dynamic_ncols=True)
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
        # every process takes the same decision to stop, or DDP would hang at the next collective
        out_of_time = self._any(self.state.train_seconds >= budget)
        stopped = False
        with self._stop_on_signals():
            try:
                while self.state.step < cfg.max_steps and not out_of_time:
                    self.train_step(window)
                    bar.update(1)
                    if self.state.step == start_step + ETA_AFTER_STEPS and self.state.step < cfg.max_steps:
                        self._print_estimate(start_step, wall0)
                    out_of_time = self._any(self.state.train_seconds >= budget)
                    stopped = self._any(self._stop_signal is not None)
                    due = schedule.due(self.state.step, last=out_of_time or self.state.step == cfg.max_steps)
                    if stopped:  # finish the step's maintenance, and always checkpoint it
                        due = replace(due, checkpoint=True)
                    self._maintain(due, window, bar)
                    schedule.done(self.state.step, due)
                    if stopped:
                        break
            finally:
                bar.close()
        if stopped:
            acc.end_training()
            raise TrainingInterrupted(self._stop_signal or "SIGINT", self.state.step, self.run_folder.checkpoint(self.state.step))
        self._maintain(schedule.at_end(self.state.step), window, bar)
        if window.steps:
            self.last_logs = window.flush(cfg.batch_size)
        acc.end_training()
        acc.print(self.summary(time.time() - wall0, self.state.step - start_step))
        return self.run_folder.student

    # -- what the user sees ----------------------------------------------------------------------

    def startup_line(self) -> str:
        """One line before the first step: what runs where, and for how long."""
        acc, cfg = self.accelerator, self.cfg
        dtype = {"fp16": "float16 mixed", "bf16": "bfloat16 mixed"}.get(acc.mixed_precision, "float32")
        where = f"{acc.device.type}" + (f":{acc.device.index}" if acc.device.index is not None else "")
        n = torch.get_num_threads()
        threads = f", {n} thread{'s' if n != 1 else ''}" if acc.device.type == "cpu" else ""
        steps = f"steps {self.state.step}->{cfg.max_steps}" if self.state.step else f"{cfg.max_steps} steps"
        budget = f", time budget {cfg.time_budget_min:g} min" if cfg.time_budget_min is not None else ""
        return (f"{self.task.objective.name}: {where} ({dtype}{threads}, {acc.num_processes} process"
                f"{'es' if acc.num_processes > 1 else ''}) -> {self.output_dir} | {steps}, batch {cfg.batch_size}"
                f"{budget}, checkpoint every {cfg.checkpoint_every}, samples every {cfg.sample_every}"
                f" | time estimate after {ETA_AFTER_STEPS} steps")

    def _print_estimate(self, start_step: int, wall0: float) -> None:
        """The expected time left at the speed of this invocation's first steps (maintenance included)."""
        done = self.state.step - start_step
        per_step = (time.time() - wall0) / done
        left = self.cfg.max_steps - self.state.step
        budget = ""
        if self.cfg.time_budget_min is not None:
            budget = f" (time budget: {max(0.0, self.cfg.time_budget_min - self.state.train_seconds / 60):.1f} min left)"
        tqdm.write(f"{per_step:.2f} s/step over the first {done} steps: about {left * per_step / 60:.1f} min for the "
                   f"remaining {left} steps{budget}")

    def summary(self, wall_seconds: float, steps_run: int) -> str:
        """The end-of-run summary: time, images, final losses and where everything is."""
        folder = self.run_folder
        losses = ", ".join(f"{k.split('/')[0]} {v:.4g}" for k, v in self.last_logs.items() if k.endswith("/loss"))
        lines = [
            f"done: step {self.state.step} ({steps_run} this run) in {wall_seconds / 60:.1f} min, "
            f"{self.state.nimg:,} images seen, {self.state.train_seconds / 60:.1f} min of training in total",
            f"  final losses: {losses or 'not logged'}",
            f"  student:  {folder.student}",
            f"  samples:  {folder.root / 'samples' / 'latest.png'} (losses: {folder.loss_plot})",
            f"  logs:     {folder.logs} (tensorboard --logdir {folder.logs})",
        ]
        if self.task.evaluator is not None and folder.eval_log.is_file():
            lines.append(f"  evaluations: {folder.eval_log}")
        return "\n".join(lines)

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """While training, SIGINT and SIGTERM ask the loop to stop after the current step and write a
        checkpoint; a second one stops at once (``KeyboardInterrupt``), which leaves every complete
        checkpoint intact (a checkpoint is complete only once its ``state.json`` is renamed into place)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def ask_to_stop(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            if self.accelerator.is_local_main_process:
                tqdm.write(f"{self._stop_signal} received: finishing step {self.state.step + 1} and writing a checkpoint "
                           "(send it again to stop at once)")

        for s in signals:
            signal.signal(s, ask_to_stop)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
