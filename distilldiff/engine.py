"""The one training loop that serves every objective, on accelerate.

An objective declares its networks and phases (:mod:`distilldiff.objectives`); the engine
builds optimizers for the trainable ones, alternates the phases, keeps an EMA of the student,
checkpoints with ``accelerator.save_state``, logs to tensorboard and writes sample grids.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TrainConfig, dump_yaml
from .images import save_grid
from .objectives.base import Batch, Objective, Phase

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf (message names the step, phase and network)."""


class EMA:
    """Exponential moving average of a network with a half-life in images (EDM style).

    ``beta = 0.5 ** (batch / halflife)``; with ``rampup`` the half-life is at most
    ``rampup * images_seen`` so early averages do not drag the untrained start along.
    """

    def __init__(self, module: nn.Module, halflife_kimg: float, rampup: float | None):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.halflife = halflife_kimg * 1000
        self.rampup = rampup

    @torch.no_grad()
    def update(self, module: nn.Module, nimg: int, batch_size: int) -> None:
        halflife = self.halflife
        if self.rampup is not None:
            halflife = min(halflife, nimg * self.rampup)
        beta = 0.5 ** (batch_size / max(halflife, 1e-8))
        for p_ema, p in zip(self.module.parameters(), module.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.module.buffers(), module.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state)


@dataclass
class TrainState:
    """Counters saved with every checkpoint (as JSON)."""

    step: int = 0
    nimg: int = 0
    nonfinite: int = 0
    scaler_skips: int = 0
    train_seconds: float = 0.0


@dataclass
class TrainTask:
    """Everything the engine needs besides the train settings.

    Attributes:
        objective: the objective (its ``networks`` name the keys of ``networks``).
        networks: every network by name; frozen ones are moved to the device and never trained.
        sample_shape: ``(C, H, W)`` of one sample.
        cond_fn: ``(n, device) -> cond`` conditioning for the noise of a phase batch.
        sample_fn: ``(ema_student, noise, cond) -> images in [-1, 1]`` for the sample grids.
        save_fn: ``(ema_student, folder, info)`` writes the student as a loadable folder.
        data_fn: ``(n, device) -> (x [n, C, H, W], cond)`` real data, for objectives that need it.
        grid_cond_fn: ``(n, device) -> cond`` fixed conditioning of the sample grids.
        evaluator: ``(ema_student, device) -> {metric: value}`` run every ``evaluator.every``
            steps and after the last one (see :class:`distilldiff.evaluation.Evaluator`).
    """

    objective: Objective
    networks: dict[str, nn.Module]
    sample_shape: tuple[int, ...]
    cond_fn: Callable[[int, Any], dict]
    sample_fn: Callable[[nn.Module, Tensor, dict], Tensor]
    save_fn: Callable[[nn.Module, Path, dict], None]
    data_fn: Callable[[int, Any], tuple[Tensor, dict]] | None = None
    grid_cond_fn: Callable[[int, Any], dict] | None = None
    info: dict = field(default_factory=dict)
    evaluator: Any = None


class Engine:
    """Trains ``task`` with ``train`` settings into ``output_dir``.

    Run folder layout: ``config.yaml`` (written by the caller), ``checkpoints/step-XXXXXXX/``
    (accelerate state + ``ema.safetensors`` + ``state.json``), ``student/`` (the EMA student as
    a loadable folder), ``samples/step-XXXXXXX.png``, ``logs/`` (tensorboard) and, with an
    evaluator, ``eval.jsonl`` (one line per evaluation: step, images seen, training seconds, metrics).
    """

    def __init__(self, task: TrainTask, train: TrainConfig, output_dir: str | Path):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.task, self.cfg = task, train
        self.output_dir = Path(output_dir)
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            cpu=train.cpu,
            log_with="tensorboard",
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
        )
        acc = self.accelerator
        set_seed(train.seed, device_specific=True)
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
        self.trainable = [n for n, role in obj.networks.items() if role in ("student", "critic")]
        self.frozen = {n: task.networks[n].to(acc.device).eval().requires_grad_(False) for n, r in obj.networks.items() if r in ("frozen", "target")}
        #: networks the objective itself updates (e.g. an EMA target); saved with every checkpoint
        self.targets = [n for n, r in obj.networks.items() if r == "target"]
        models, opts = [], []
        self.base_lr: dict[str, float] = {}
        for name in self.trainable:
            net = task.networks[name].train().requires_grad_(True)
            lr = train.lr if obj.networks[name] == "student" or train.critic_lr is None else train.critic_lr
            opts.append(torch.optim.AdamW(net.parameters(), lr=lr, betas=train.betas, weight_decay=train.weight_decay))
            self.base_lr[name] = lr
            models.append(net)
        prepared = acc.prepare(*models, *opts)
        self.models = dict(zip(self.trainable, prepared[: len(models)]))
        self.optimizers = dict(zip(self.trainable, prepared[len(models) :]))
        self.ema = EMA(acc.unwrap_model(self.models[obj.student]), train.ema_halflife_kimg, train.ema_rampup)
        self.state = TrainState()
        self._grid_noise = None
        self._consecutive_scaler_skips = 0

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def _batch(self) -> Batch:
        n, dev = self.micro_batch, self.device
        noise = torch.randn((n, *self.task.sample_shape), device=dev)
        if self.task.objective.needs_real_data:
            real, cond = self.task.data_fn(n, dev)
            return Batch(noise=noise, cond=cond, real=real)
        return Batch(noise=noise, cond=self.task.cond_fn(n, dev))

    def _nets_for(self, phase: Phase) -> dict[str, nn.Module]:
        """The trained network as prepared (DDP-wrapped, train mode); every other one unwrapped,
        frozen and in eval mode (gradients still flow through its input)."""
        nets = dict(self.frozen)
        for name, model in self.models.items():
            inner = self.accelerator.unwrap_model(model)
            trained = name == phase.trains
            inner.requires_grad_(trained).train(trained)
            nets[name] = model if trained else inner
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
        if cfg.lr_schedule == "linear":  # derived from the checkpointed step: nothing extra to save
            factor = max(0.0, 1.0 - self.state.step / cfg.max_steps)
            for group in opt.param_groups:
                group["lr"] = self.base_lr[phase.trains] * factor
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        norm = acc.clip_grad_norm_(model.parameters(), max_norm)  # None under DeepSpeed
        scaled = acc.scaler is not None  # fp16: the loss scaler skips overflowing steps itself
        if norm is not None and not scaled and self._any(not bool(torch.isfinite(torch.as_tensor(norm)))):
            opt.zero_grad(set_to_none=True)
            self._nonfinite("gradient", phase)
            return {}
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scaled and getattr(opt, "step_was_skipped", False):
            self.state.scaler_skips += 1
            self._consecutive_scaler_skips += 1
            if self._consecutive_scaler_skips > cfg.max_nonfinite:
                raise NonFiniteError(
                    f"non-finite gradient at step {self.state.step + 1}, phase '{phase.name}' (network '{phase.trains}'): "
                    f"the fp16 loss scaler skipped {self._consecutive_scaler_skips} updates in a row (train.max_nonfinite={cfg.max_nonfinite})"
                )
        else:
            self._consecutive_scaler_skips = 0
        if norm is not None:
            logs[f"{phase.name}/grad_norm"] = float(norm)
        return logs

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    def find_checkpoint(self, resume: str) -> Path:
        """``latest`` -> newest checkpoint of this run; otherwise the given path."""
        if resume == "latest":
            found = self.complete_checkpoints()
            if not found:
                raise FileNotFoundError(f"--resume latest: no checkpoint under {self.checkpoint_dir()}")
            return found[-1]
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json)")
        return path

    def complete_checkpoints(self) -> list[Path]:
        """This run's checkpoints that finished writing (a save killed half-way has no state.json)."""
        return sorted(p for p in self.checkpoint_dir().glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.json").is_file())

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        path = self.checkpoint_dir() / f"{CHECKPOINT_PREFIX}{self.state.step:07d}"
        acc.save_state(str(path))
        if acc.is_main_process:
            save_file(self.ema.state_dict(), str(path / "ema.safetensors"))
            if self.targets:
                targets = {f"{n}.{k}": v.detach().contiguous() for n in self.targets for k, v in self.frozen[n].state_dict().items()}
                save_file(targets, str(path / "targets.safetensors"))
            (path / "state.json").write_text(json.dumps(self.state.__dict__, indent=2))
            self.task.save_fn(self.ema.module, self.output_dir / "student", self._info())
            old = self.complete_checkpoints()[: -self.cfg.keep_checkpoints]
            for p in old:
                shutil.rmtree(p)
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
        self.state = TrainState(**json.loads((path / "state.json").read_text()))
        self._drop_evaluations_after(self.state.step)

    def _info(self) -> dict:
        return {**self.task.info, "step": self.state.step, "images_seen": self.state.nimg, "train_seconds": round(self.state.train_seconds, 1)}

    # -- samples and evaluation ------------------------------------------------------------------

    @property
    def eval_log(self) -> Path:
        return self.output_dir / "eval.jsonl"

    def _drop_evaluations_after(self, step: int) -> None:
        """Forget evaluations past the checkpoint a run starts from (they are run again), and a
        last line cut short by a crash."""
        if not self.accelerator.is_main_process or not self.eval_log.is_file():
            return
        lines = [line for line in self.eval_log.read_text().splitlines() if line.strip()]
        kept = []
        for i, line in enumerate(lines):
            try:
                row_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError):
                if i + 1 < len(lines):
                    raise ValueError(f"{self.eval_log}: line {i + 1} is not an evaluation record") from None
                logger.warning("%s: dropping a last line cut short (%r)", self.eval_log, line[:80])
                continue
            if row_step <= step:
                kept.append(line)
        if kept != lines:
            self.eval_log.write_text("".join(line + "\n" for line in kept))

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
            with open(self.eval_log, "a") as f:
                f.write(json.dumps(record) + "\n")
            acc.log({f"eval/{k}": v for k, v in results.items()}, step=self.state.step)
            tqdm.write(f"eval at step {self.state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        acc.wait_for_everyone()
        return results, time.time() - t0

    @torch.no_grad()
    def write_samples(self) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        n = self.cfg.num_sample_images
        if self._grid_noise is None:
            g = torch.Generator().manual_seed(self.cfg.seed)
            self._grid_noise = torch.randn((n, *self.task.sample_shape), generator=g)
        cond_fn = self.task.grid_cond_fn or self.task.cond_fn
        images = self.task.sample_fn(self.ema.module, self._grid_noise.to(self.device), cond_fn(n, self.device))
        path = self.output_dir / "samples" / f"{CHECKPOINT_PREFIX}{self.state.step:07d}.png"
        save_grid(images, path)
        shutil.copyfile(path, path.with_name("latest.png"))
        return path

    # -- the loop --------------------------------------------------------------------------------

    def run(self, config: Any, resume: str | None = None) -> Path:
        """Start a run: check ``resume`` before anything is written, save ``config`` as the run's
        ``config.yaml``, then :meth:`train`."""
        if resume:
            self.find_checkpoint(resume)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(config, self.output_dir / "config.yaml")
        return self.train(resume)

    def train(self, resume: str | None = None) -> Path:
        """Run to ``train.max_steps`` (or the time budget); returns the student folder."""
        acc, cfg, obj = self.accelerator, self.cfg, self.task.objective
        if resume:
            path = self.find_checkpoint(resume)
            self.load_checkpoint(path)
            acc.print(f"resumed from {path} at step {self.state.step}")
        elif self.complete_checkpoints():
            raise FileExistsError(
                f"{self.output_dir} holds checkpoints of an earlier run; pass --resume latest to continue it "
                "or choose another --output-dir"
            )
        else:
            self._drop_evaluations_after(0)  # a crashed run's evaluations before its first checkpoint
        acc.init_trackers("distilldiff")
        phases = obj.phases()
        bar = tqdm(total=cfg.max_steps, initial=self.state.step, disable=not acc.is_local_main_process, desc=obj.name, dynamic_ncols=True)
        window: dict[str, float] = {}
        window_steps, window_start = 0, time.time()
        budget = cfg.time_budget_min * 60 if cfg.time_budget_min is not None else math.inf
        last_saved = self.state.step if resume else -1
        evaluator = self.task.evaluator
        last_eval = self.state.step if resume else -1
        # every process takes the same decision to stop, or DDP would hang at the next collective
        out_of_time = self._any(self.state.train_seconds >= budget)
        try:
            while self.state.step < cfg.max_steps and not out_of_time:
                t0 = time.time()
                for phase in phases:
                    for _ in range(phase.repeats):
                        for k, v in self._run_phase(phase).items():
                            window[k] = window.get(k, 0.0) + v / phase.repeats
                self.state.step += 1
                self.state.nimg += cfg.batch_size
                self.ema.update(acc.unwrap_model(self.models[obj.student]), self.state.nimg, cfg.batch_size)
                if self.targets:
                    obj.update_targets({n: acc.unwrap_model(m) for n, m in self.models.items()} | self.frozen)
                self.state.train_seconds += time.time() - t0
                window_steps += 1
                bar.update(1)
                step = self.state.step
                out_of_time = self._any(self.state.train_seconds >= budget)
                last = out_of_time or step == cfg.max_steps
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    logs = {k: v / window_steps for k, v in window.items()}
                    logs["img_per_s"] = window_steps * cfg.batch_size / elapsed
                    logs["nonfinite_skipped"] = self.state.nonfinite
                    acc.log(logs, step=step)
                    bar.set_postfix({k.split("/")[0] if k.endswith("/loss") else k: f"{v:.4g}" for k, v in logs.items() if k.endswith("/loss") or k == "img_per_s"})
                    window, window_steps, window_start = {}, 0, time.time()
                if step % cfg.sample_every == 0:
                    self.write_samples()
                # evaluate before checkpointing: a checkpoint's eval.jsonl then holds its own step
                if evaluator is not None and (step % evaluator.every == 0 or last):
                    window_start += self.evaluate()[1]  # evaluation time is not training speed
                    last_eval = step
                if step % cfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                    last_saved = step
        finally:
            bar.close()
        if evaluator is not None and last_eval != self.state.step:  # resumed at the end of a run
            self.evaluate()
        if last_saved != self.state.step:
            self.save_checkpoint()
        if self.state.step % cfg.sample_every:
            self.write_samples()
        acc.end_training()
        return self.output_dir / "student"
