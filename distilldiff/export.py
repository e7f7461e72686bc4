"""Student folders that plain diffusers loads: save, load, and export from a run.

A student folder is a diffusers pipeline folder (``model_index.json``, ``unet/`` and
``scheduler/`` in safetensors/JSON) plus ``distilldiff_student.json`` and a model card:

* a deterministic, unconditional student whose noise levels are a DDIM ``"trailing"`` grid of the
  teacher's schedule (possibly truncated at its first timestep) is saved as a stock
  ``DDIMPipeline``; ``pipe(num_inference_steps=K)`` reproduces it;
* everything else (class labels, guidance input, off-grid noise levels, multistep sampling) is
  saved as :class:`~distilldiff.pipelines.DistillDiffPipeline`, whose source file is copied into
  the folder so that ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` works
  without distilldiff.

The training engine writes this format to ``RUN/student`` at every checkpoint; :func:`export_run`
copies a run's student (or the EMA student of one of its kept checkpoints) to a clean folder with a
model card that records its measured FID.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from .atomic import replace_folder
from .engine.run_folder import STATE_FILE, RunFolder, checkpoint_of
from .students import ConsistencyDenoiser, LCMConsistencyDenoiser, Student
from .teachers.vp import VPDenoiser, ddim_timesteps

STUDENT_INFO_FILE = "distilldiff_student.json"
PIPELINE_MODULE = "pipeline_distilldiff"
FORMAT_VERSION = 2


def _pipeline_source() -> Path:
    from .pipelines import pipeline_distilldiff

    return Path(pipeline_distilldiff.__file__)


def _teacher_scheduler_config(den: VPDenoiser) -> dict:
    """The teacher's scheduler config (its noise schedule) with ``den``'s own ``prediction_type``:
    a student whose output was re-parameterised (``student.parameterization``) is written with its own."""
    from diffusers import DDPMScheduler

    if den.scheduler_config is not None:  # the schedule's keys only (a student folder may hold an LCMScheduler config)
        keys = inspect.signature(DDPMScheduler.__init__).parameters
        cfg = {k: v for k, v in den.scheduler_config.items() if k in keys}
    else:  # an in-process denoiser: recover the betas from alphas_cumprod
        a = den.alphas_cumprod
        betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
        cfg = {"num_train_timesteps": len(a), "trained_betas": betas.tolist()}
    cfg["prediction_type"] = den.prediction_type
    return dict(DDPMScheduler.from_config(cfg).config)


def stock_ddim_scheduler(student: Student, conditional: bool = False):
    """A ``DDIMScheduler`` whose ``num_inference_steps=K`` call lands on the student's timesteps, or ``None``.

    Only deterministic students whose noise levels sit exactly on the teacher's timesteps fit: the
    grid must be DDIM's ``"trailing"`` spacing of the schedule truncated at the student's first
    timestep (``num_train_timesteps = t_0 + 1``). Unless ``conditional`` (a text-to-image
    pipeline, which feeds prompts and the guidance weight itself), the student must also be
    unconditional and take no guidance weight (a stock ``DDIMPipeline``).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    den = student.denoiser
    if student.sampler != "ddim" or (not conditional and (den.num_classes is not None or _is_guided(den))):
        return None
    t = den.sigma_to_timestep(torch.tensor(student.sigmas, dtype=torch.float64))
    ti = t.round()
    if float((t - ti).abs().max()) > 1e-6:
        return None
    t0 = int(ti[0]) + 1
    if ddim_timesteps(t0, len(student.sigmas), "trailing") != [int(v) for v in ti]:
        return None
    cfg = _teacher_scheduler_config(den)
    if t0 < den.num_train_timesteps:
        betas = DDPMScheduler.from_config(cfg).betas[:t0]
        cfg.update(num_train_timesteps=t0, trained_betas=betas.tolist())
    cfg.update(timestep_spacing="trailing", clip_sample=student.clip_sample, thresholding=False, set_alpha_to_one=True, steps_offset=0)
    return DDIMScheduler.from_config(cfg)


def stock_lcm_scheduler(student: Student):
    """An ``LCMScheduler`` whose ``num_inference_steps=K`` call reproduces a multistep student of
    :class:`~distilldiff.students.LCMConsistencyDenoiser` (its timesteps, boundary scalings and
    re-noising), or ``None``: the teacher's noise schedule with ``original_inference_steps`` = the
    student's N and its ``timestep_scaling``."""
    from diffusers import LCMScheduler

    den = student.denoiser
    if not isinstance(den, LCMConsistencyDenoiser) or student.sampler != "multistep":
        return None
    want = den.sample_sigmas(len(student.sigmas))
    if any(abs(a - b) > 1e-9 * b for a, b in zip(student.sigmas, want)):
        return None
    cfg = _teacher_scheduler_config(den.inner)
    cfg.update(original_inference_steps=den.num_scales, timestep_scaling=den.timestep_scaling, clip_sample=False, thresholding=False)
    return LCMScheduler.from_config(cfg)


def flow_call_sigmas(student: Student) -> list[float] | None:
    """What a flow student's stock pipeline must be given as ``sigmas=`` to run on the student's noise
    levels: ``None`` where they are the ``K``-step grid of the teacher's own
    ``FlowMatchEulerDiscreteScheduler`` in its pipeline (``num_inference_steps=K`` alone reproduces
    them), else the scheduler's unshifted values ``v``, whose shift (``set_timesteps(sigmas=v)``) gives
    the student's times ``t``: ``v = t / (s - (s - 1) t)`` undoes the static shift ``s``,
    ``v = 1 / (1 + e^mu (1/t - 1))`` the dynamic (exponential) one of resolution shift ``mu``
    (e.g. a progressive-distillation grid, which takes every other level of a finer one)."""
    den = student.denoiser
    want = den.sampling_sigmas(student.num_steps).tolist()
    if all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(student.sigmas, want)):  # inf only matches inf
        return None
    cfg = den.scheduler_config
    dynamic = bool(cfg.get("use_dynamic_shifting"))
    if (any(cfg.get(k) for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"))
            or (dynamic and cfg.get("time_shift_type", "exponential") != "exponential")):
        raise ValueError(f"student noise levels {student.sigmas} are not the {student.num_steps}-step grid of the teacher's "
                         "FlowMatchEulerDiscreteScheduler, whose configuration (a terminal shift or a sigma schedule) cannot "
                         "be given other levels exactly")
    t = den.sigma_to_t(torch.tensor(student.sigmas, dtype=torch.float64))
    if dynamic:
        v = 1 / (1 + math.exp(den.dynamic_shift_mu()) * (1 / t - 1))
    else:
        shift = float(cfg.get("shift", 1.0))
        v = t / (shift - (shift - 1) * t)
    return [float(x) for x in v]


def _is_guided(den: VPDenoiser) -> bool:
    return den.takes_guidance_scale


def sampling_call(info: dict, path: str = "PATH") -> str:
    """The exact Python call that samples an exported student (for READMEs and model cards)."""
    k = len(info["sigmas"])
    if info["pipeline"] in TEXT_TO_IMAGE_PIPELINES:
        w = info.get("guidance_scale")
        flux = info["pipeline"] == "FluxPipeline"
        length = info.get("max_sequence_length")
        default_length = {"FluxPipeline": 512, "SanaPipeline": 300}.get(info["pipeline"], 256)
        extra = f", max_sequence_length={length}" if length not in (None, default_length) else ""
        if info.get("image_size"):
            extra += f", height={info['image_size']}, width={info['image_size']}"
        if info.get("call_sigmas"):  # a flow student off the scheduler's default grid
            extra += f", sigmas={info['call_sigmas']!r}"
        if flux:  # Flux's guidance_scale is its transformer's guidance input (FLUX.1-dev), not classifier-free guidance
            g = info.get("embedded_guidance")
            call = (f'images = pipe(["a prompt"] * 4, num_inference_steps={k}'
                    + (f", guidance_scale={g:g}" if g is not None else "") + f"{extra}).images"
                    + ("  # guidance_scale: the transformer's guidance input; no true CFG (the student learned the "
                       "teacher's guided output)" if g is not None else ""))
        elif w is not None:  # the student's guidance input: diffusers feeds w = guidance_scale - 1
            call = (f'images = pipe(["a prompt"] * 4, num_inference_steps={k}, guidance_scale={1 + w:g}{extra}).images'
                    f"  # the student's guidance input w = guidance_scale - 1 = {w:g} (any w it was trained on)")
        else:
            call = (f'images = pipe(["a prompt"] * 4, num_inference_steps={k}, guidance_scale=1.0{extra}).images'
                    "  # guidance_scale 1: no classifier-free guidance (the student learned the teacher's guided output)")
        if info.get("sampler") == "multistep" and info.get("prediction_type") == "flow":
            call = ("torch.manual_seed(0)  # the pipeline draws the re-noising of its stochastic steps from torch's global generator\n"
                    + call + f"\n# {k} stochastic FlowMatchEulerDiscreteScheduler step(s) (stochastic_sampling: predict x0, re-noise)")
        elif info.get("sampler") == "multistep":
            call += f"\n# {k} LCMScheduler step(s); pass generator=torch.Generator().manual_seed(...) to fix the re-noising too"
        if info.get("lora") and info.get("teacher"):
            scheduler = info.get("scheduler") or "DDIMScheduler"
            return (
                f"from diffusers import {scheduler}, {info['pipeline']}\n"
                f"# the merged student: {info['pipeline']}.from_pretrained(\"{path}\"); or the teacher with this LoRA:\n"
                f'pipe = {info["pipeline"]}.from_pretrained("{info["teacher"]}", use_safetensors=True)\n'
                f'pipe.load_lora_weights("{path}/{info["lora"]["folder"]}")\n'
                f'pipe.scheduler = {scheduler}.from_pretrained("{path}", subfolder="scheduler")  # the student\'s timestep(s)\n'
                + call
            )
        absent = "".join(f", {n}=None" for n in info.get("absent_components") or [])
        return (("import torch\n" if "torch.manual_seed" in call else "") + f"from diffusers import {info['pipeline']}\n"
                f'pipe = {info["pipeline"]}.from_pretrained("{path}", use_safetensors=True{absent})\n' + call)
    if info["pipeline"] == "DDIMPipeline":
        return (
            "from diffusers import DDIMPipeline\n"
            f'pipe = DDIMPipeline.from_pretrained("{path}", use_safetensors=True)\n'
            f"images = pipe(batch_size=16, num_inference_steps={k}, eta=0.0).images"
        )
    args = ["batch_size=16"]
    if info.get("num_classes") is not None:
        args.append(f"class_labels=[i % {info['num_classes']} for i in range(16)]")
    if info.get("guidance_scale") is not None:
        args.append(f"guidance_scale={info['guidance_scale']}")
    return (
        "from diffusers import DiffusionPipeline\n"
        "# runs pipeline_distilldiff.py from this folder; with distilldiff installed, use\n"
        f"# distilldiff.pipelines.DistillDiffPipeline.from_pretrained(\"{path}\") instead (no remote code)\n"
        f'pipe = DiffusionPipeline.from_pretrained("{path}", trust_remote_code=True)\n'
        f"images = pipe({', '.join(args)}).images  # {k} network evaluation(s)"
    )


#: where a LoRA student's adapter is written inside its folder (``pipe.load_lora_weights(FOLDER / LORA_FOLDER)``)
LORA_FOLDER = "lora"

#: stock text-to-image pipelines a latent student exports as
TEXT_TO_IMAGE_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline",
                           "SanaPipeline")


def export_problem(student: Student) -> str | None:
    """Why ``student`` cannot be written as a student folder (one line), or ``None``.

    Pixel students always can (a stock ``DDIMPipeline`` or :class:`DistillDiffPipeline`), except
    consistency students of LCM's parameterisation (``schedule: lcm``). A latent text-to-image
    student is written as the teacher's own stock pipeline class, whose scheduler must reproduce
    it: a deterministic student on a DDIM "trailing" grid of the teacher's training timesteps
    (:func:`stock_ddim_scheduler`), or a multistep LCM student (:func:`stock_lcm_scheduler`).
    """
    from .teachers.flow import FlowDenoiser
    from .teachers.text import LatentDenoiser

    den = student.denoiser
    base = den.inner if isinstance(den, ConsistencyDenoiser) else den
    if isinstance(base, FlowDenoiser):
        if den is not base:
            return ("students of flow-matching teachers export as stock pipelines with a FlowMatchEulerDiscreteScheduler, "
                    "which has no consistency boundary scalings: consistency students of them export with "
                    "objective.schedule: flow (and objective scm), whose students are the network itself")
        return None
    if not isinstance(base, LatentDenoiser):
        if isinstance(den, LCMConsistencyDenoiser):
            return ("objective.schedule: lcm students export as stock text-to-image pipelines with an LCMScheduler; "
                    "students of pixel teachers use schedule: karras")
        return None
    if isinstance(den, LCMConsistencyDenoiser):
        if stock_lcm_scheduler(student) is None:
            return f"student noise levels {student.sigmas} are not the timesteps LCMScheduler picks for {student.num_steps} step(s)"
        return None
    if isinstance(den, ConsistencyDenoiser) or student.sampler != "ddim":
        return ("consistency (multistep) students of text-to-image teachers export as stock pipelines with an LCMScheduler: "
                "set objective.schedule: lcm")
    if stock_ddim_scheduler(student, conditional=True) is None:
        t = den.sigma_to_timestep(torch.tensor(student.sigmas, dtype=torch.float64)).tolist()
        return (f"student noise levels {[round(x, 4) for x in student.sigmas]} fall at timesteps {[round(x, 3) for x in t]} of the "
                "teacher, not on a DDIM 'trailing' grid of its training timesteps: a text-to-image student exports as a stock "
                "pipeline, which runs on those; set student.init_timestep (e.g. 625 or 999) instead of student.init_sigma")
    return None


def _lora_info(den) -> dict | None:
    cfg = (getattr(getattr(den, "model", None), "peft_config", None) or {}).get("default")
    if cfg is None:
        return None
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "target_modules": sorted(cfg.target_modules), "folder": LORA_FOLDER}


def _save_text_to_image(student: Student, folder: Path, scheduler) -> str:
    """Write a latent student as the teacher's stock pipeline class with the student's UNet and
    ``scheduler``, the one that reproduces it; returns the pipeline class name."""
    den = student.denoiser
    cls = type(den.components.pipe)
    net, name = den.model, "transformer" if getattr(den.components.pipe, "transformer", None) is not None else "unet"
    if getattr(net, "peft_config", None):  # a LoRA student: the adapter on its own, then merged weights for the pipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(net))}
        cls.save_lora_weights(str(folder / LORA_FOLDER), **layers, safe_serialization=True)
        net = copy.deepcopy(net)
        net.fuse_lora()
        net.unload_lora()
    den.components.save(folder, **{name: net}, scheduler=scheduler)
    return cls.__name__


def save_student(student: Student, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``student`` as a diffusers pipeline folder (see the module docstring); returns the folder.

    ``info`` (teacher, objective, step, images seen, ...) goes into ``distilldiff_student.json``
    and the model card. Weights are written as safetensors only.
    """
    from diffusers import DDIMPipeline, DDPMScheduler

    from .pipelines import DistillDiffPipeline
    from .teachers.flow import FlowDenoiser

    problem = export_problem(student)
    if problem is not None:
        raise ValueError(problem)
    den = student.denoiser
    boundary = lcm = None
    lcm_scheduler = stock_lcm_scheduler(student)
    if lcm_scheduler is not None:  # the scheduler applies LCM's boundary scalings
        lcm, den = {"num_scales": den.num_scales, "timestep_scaling": den.timestep_scaling}, den.inner
        student = Student(den, student.sigmas, student.sampler)
    elif isinstance(den, ConsistencyDenoiser):
        boundary, den = [den.boundary_sigma, den.sigma_data], den.inner
        student = Student(den, student.sigmas, student.sampler)  # same network; the pipeline applies the boundary
    if isinstance(den, FlowDenoiser):
        return _save_flow(student, Path(folder), info)
    if not isinstance(den, VPDenoiser):
        raise TypeError(f"save_student supports VP (diffusers) and flow-matching students, got {type(den).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    guidance = (info or {}).get("default_guidance_scale") if _is_guided(den) else None
    if _is_guided(den) and guidance is None:
        guidance = 1.0
    latent = hasattr(den, "components")  # a latent text-to-image student: the teacher's own pipeline class
    ddim = stock_ddim_scheduler(student, conditional=latent) if boundary is None else None
    scheduler_class = None
    if latent:  # steps_offset 1: what SD pipelines expect; "trailing" spacing does not read it
        scheduler = lcm_scheduler or type(ddim).from_config({**ddim.config, "steps_offset": 1})
        pipeline, scheduler_class = _save_text_to_image(student, folder, scheduler), type(scheduler).__name__
    elif ddim is not None:
        DDIMPipeline(unet=den.model, scheduler=ddim).save_pretrained(str(folder), safe_serialization=True)
        pipeline = "DDIMPipeline"
    else:
        scheduler = DDPMScheduler.from_config(_teacher_scheduler_config(den))
        pipe = DistillDiffPipeline(den.model, scheduler, student.sigmas, student.sampler, den.num_classes, guidance, boundary,
                                   student.clip_sample)
        pipe.save_pretrained(str(folder), safe_serialization=True)
        index_path = folder / "model_index.json"
        index = json.loads(index_path.read_text())
        index["_class_name"] = [PIPELINE_MODULE, "DistillDiffPipeline"]
        shutil.copyfile(_pipeline_source(), folder / f"{PIPELINE_MODULE}.py")
        if guidance is not None:  # the network class lives in the same file, loaded as a component
            index["unet"] = [PIPELINE_MODULE, "GuidedUNet2DModel"]
            shutil.copyfile(_pipeline_source(), folder / "unet" / f"{PIPELINE_MODULE}.py")
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        pipeline = "DistillDiffPipeline"
    meta = {
        "format": FORMAT_VERSION,
        "pipeline": pipeline,
        "sampler": student.sampler,
        "sigmas": student.sigmas,
        "clip_sample": student.clip_sample,
        "timesteps": [float(t) for t in den.sigma_to_timestep(torch.tensor(student.sigmas, dtype=torch.float64))],
        "prediction_type": den.prediction_type,
        "sigma_data": den.sigma_data,
        "num_classes": den.num_classes,
        "null_class": den.null_class,
        "guidance_scale": guidance,
        "consistency_boundary": boundary,
        "lcm": lcm,
        "scheduler": scheduler_class,
        "lora": _lora_info(den),
    }
    return _write_student_info(folder, meta, info)


def _save_flow(student: Student, folder: Path, info: dict[str, Any] | None) -> Path:
    """Write a flow-matching student as the teacher's stock pipeline class with the teacher's own
    ``FlowMatchEulerDiscreteScheduler``, whose ``num_inference_steps=K`` grid (or the call's ``sigmas=``,
    :func:`flow_call_sigmas`) is the student's; a multistep (consistency) student's scheduler takes
    stochastic steps (``stochastic_sampling``: predict x0, re-noise to the next level), its sampler's."""
    from .teachers.flow import FluxDenoiser

    den = student.denoiser
    folder.mkdir(parents=True, exist_ok=True)
    scheduler = den.make_scheduler()
    if student.sampler == "multistep":  # its stochastic step: x0 = x_t - t v, then x_t' = (1 - t') x0 + t' n (re-noising)
        scheduler = type(scheduler).from_config({**scheduler.config, "stochastic_sampling": True})
    pipeline = _save_text_to_image(student, folder, scheduler)
    t = den.sigma_to_t(torch.tensor(student.sigmas, dtype=torch.float64))
    meta = {
        "format": FORMAT_VERSION,
        "pipeline": pipeline,
        "sampler": student.sampler,
        "sigmas": student.sigmas,
        "timesteps": [float(v) * den.num_train_timesteps for v in t],
        "prediction_type": "flow",
        "sigma_data": den.sigma_data,
        "num_classes": None,
        "null_class": None,
        "guidance_scale": None,
        "consistency_boundary": None,
        "lcm": None,
        "scheduler": "FlowMatchEulerDiscreteScheduler",
        "lora": _lora_info(den),
        # components the pipeline lacks (SD3 without T5): diffusers loads such a folder only when told so
        "absent_components": [n for n in den.components.pipe.components if getattr(den.components.pipe, n, None) is None
                              and n not in type(den.components.pipe)._optional_components],
        "max_sequence_length": den.components.max_sequence_length,
        "call_sigmas": flow_call_sigmas(student),
        # Flux: the call's height/width and guidance input (the transformer takes any size)
        "image_size": den.components.image_size[0] if isinstance(den, FluxDenoiser) else None,
        "embedded_guidance": getattr(den, "embedded_guidance", None),
    }
    return _write_student_info(folder, meta, info)


def _write_student_info(folder: Path, meta: dict[str, Any], info: dict[str, Any] | None) -> Path:
    """Write ``distilldiff_student.json`` (the student's own fields ``meta``, then the run's ``info``:
    teacher, objective, step, ...) and the model card into ``folder``; returns ``folder``."""
    meta = {**meta, **{k: v for k, v in (info or {}).items() if k != "default_guidance_scale"}}
    (folder / STUDENT_INFO_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(meta, path=folder.name))
    return folder


def run_info(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of a student folder's ``distilldiff_student.json`` (``meta``) that :func:`save_student`
    takes as ``info`` to write the same student again: the run's fields, not those derived from the network."""
    info = {k: v for k, v in meta.items() if k not in _DERIVED_KEYS}
    if meta.get("guidance_scale") is not None:
        info["default_guidance_scale"] = meta["guidance_scale"]
    return info


def student_folder(path: str | Path) -> Path:
    """The student folder ``path`` names: a run folder's ``student/`` when it holds one, else ``path`` itself."""
    path = Path(path)
    return path / "student" if (path / "student" / STUDENT_INFO_FILE).is_file() else path


def load_student(folder: str | Path) -> tuple[Student, dict]:
    """Read a student folder back: ``(student, distilldiff_student.json contents)``; safetensors only."""
    from diffusers import DDPMScheduler, UNet2DModel

    from .pipelines import GuidedUNet2DModel

    folder = Path(folder)
    meta_path = folder / STUDENT_INFO_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder}: not a student folder (no {STUDENT_INFO_FILE})")
    meta = json.loads(meta_path.read_text())
    if "sigmas" not in meta:  # format 1: one-step students only
        if meta.get("kind") != "one_step":
            raise ValueError(f"{meta_path}: unsupported student kind {meta.get('kind')!r}")
        meta.update(sigmas=[meta["init_sigma"]], sampler="ddim", teacher_guidance_scale=meta.pop("guidance_scale", None))
        meta["guidance_scale"] = None
    if meta.get("pipeline") in TEXT_TO_IMAGE_PIPELINES:
        return _load_text_to_image(folder, meta), meta
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    unet_cls = {"UNet2DModel": UNet2DModel, "GuidedUNet2DModel": GuidedUNet2DModel}.get(unet_config.get("_class_name"))
    if unet_cls is None:
        raise ValueError(f"{folder / 'unet' / 'config.json'}: unsupported network class {unet_config.get('_class_name')!r}")
    unet = _load_model(unet_cls, folder / "unet")
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(str(folder / "scheduler")))
    inner_cfg = unet.config if unet_cls is UNet2DModel else unet.unet.config
    size = inner_cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    den = VPDenoiser(
        unet, scheduler.alphas_cumprod, meta["prediction_type"], (inner_cfg.in_channels, h, w),
        meta["sigma_data"], meta["num_classes"], meta["null_class"],
    )
    den.scheduler_config = dict(scheduler.config)
    if meta.get("consistency_boundary"):
        s0, sd = meta["consistency_boundary"]
        den.sigma_data = float(sd)
        den = ConsistencyDenoiser(den, s0)
    return Student(den.eval(), meta["sigmas"], meta["sampler"], bool(meta.get("clip_sample", False))), meta


def _load_text_to_image(folder: Path, meta: dict) -> Student:
    from .teachers.flow import flow_denoiser_from_pipeline
    from .teachers.text import LatentDenoiser, read_prompts
    from .teachers.vp import load_pipeline

    if meta["prediction_type"] == "flow":
        _check_weights(folder / "transformer")
        den = flow_denoiser_from_pipeline(load_pipeline(folder), str(folder), sigma_data=meta["sigma_data"],
                                          max_sequence_length=meta.get("max_sequence_length"),
                                          image_size=meta.get("image_size"), embedded_guidance=meta.get("embedded_guidance"))
    else:
        _check_weights(folder / "unet")
        den = LatentDenoiser.from_pipeline(load_pipeline(folder), str(folder), sigma_data=meta["sigma_data"],
                                           prediction_type=meta["prediction_type"])
    prompts = meta.get("prompts")
    if prompts and Path(prompts).exists():  # the prompts it was trained on draw its grids, where they still exist
        den.set_prompts(read_prompts(prompts))
    if meta.get("lcm"):
        den = LCMConsistencyDenoiser(den, **meta["lcm"])
    return Student(den.eval(), meta["sigmas"], meta["sampler"])


def _load_model(cls, path: Path):
    """``cls.from_pretrained(path)`` from safetensors, with one-line errors for missing or corrupt weights."""
    _check_weights(path)
    return cls.from_pretrained(str(path), use_safetensors=True)


def _check_weights(path: Path) -> None:
    """One-line errors for a model folder without safetensors weights or with unreadable ones."""
    weights = list(path.glob("*.safetensors"))
    if not weights:
        pickled = [p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        extra = f" (found {', '.join(pickled)}: pickle checkpoints are not read; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{path}: no .safetensors weights{extra}")
    from safetensors import SafetensorError, safe_open

    try:
        for w in weights:
            with safe_open(str(w), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
    except (SafetensorError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: corrupted or unreadable safetensors weights ({first})") from None


def model_card(meta: dict, fid: dict | None = None, path: str = "PATH") -> str:
    """Markdown model card: teacher, objective, steps, images seen, FID (if measured), the sampling call."""
    k = len(meta["sigmas"])
    flow = meta.get("prediction_type") == "flow"
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [distilldiff, diffusion-distillation, " + ("text-to-image]" if meta["pipeline"] in TEXT_TO_IMAGE_PIPELINES
                                                          else "unconditional-image-generation]" if meta.get("num_classes") is None
                                                          else "class-conditional-image-generation]"),
        "---",
        "",
        f"# {k}-step student distilled with distilldiff",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{meta.get('teacher', 'unknown')}`"
        + (f" (classifier-free guidance w={meta['teacher_guidance_scale']})" if meta.get("teacher_guidance_scale") else "") + " |",
        f"| objective | {meta.get('objective', 'unknown')} |",
        f"| network evaluations per sample | {k} ({meta['sampler']} sampler) |",
        f"| noise levels (sigma) | {', '.join(f'{s:.4g}' for s in meta['sigmas'])} |",
        f"| network output (`prediction_type`) | {meta['prediction_type']} |",
        f"| training updates | {meta.get('step', 'unknown')} |",
        f"| training images seen | {meta.get('images_seen', 'unknown')} |",
        f"| training wall-clock | {meta['train_seconds']:.0f} s |" if meta.get("train_seconds") is not None else "| training wall-clock | unknown |",
        f"| pipeline class | `{meta['pipeline']}` |",
    ]
    if meta.get("num_classes") is not None:
        lines.append(f"| classes | {meta['num_classes']} (`class_labels`) |")
    if meta.get("clip_sample"):
        lines.append("| x0 clipped to [-1, 1] | at every step (`clip_sample`, in the pipeline's config) |")
    if meta.get("guidance_scale") is not None:
        lines.append(f"| guidance scale input | yes (default w={meta['guidance_scale']}) |")
    if meta.get("lora"):
        lora = meta["lora"]
        lines.append(f"| LoRA | rank {lora['rank']}, alpha {lora['alpha']:g} on {', '.join(lora['target_modules'])}; "
                     f"the adapter alone in `{lora['folder']}/`, merged into `{'transformer' if flow else 'unet'}/` |")
    if fid:
        lines.append(f"| FID | {fid['fid']:.2f} (N={fid['num']}, reference {fid['reference']}, {fid.get('weights', '')}) |")
    else:
        lines.append("| FID | not measured (run `distilldiff fid --model THIS_FOLDER`) |")
    lines += ["", "## Sampling", "", "```python", sampling_call(meta, path), "```", ""]
    if flow:
        lines += [
            "Weights are safetensors. The student network is evaluated at the noise levels above, in EDM's",
            "sigma space (`x = x0 + sigma * eps`; inf is pure noise), fed to the flow network as",
            "`x_t = x / (1 + sigma)` at time `t = sigma / (1 + sigma)` (SD3: timestep 1000 t; Flux: t): the stock",
            "FlowMatchEulerDiscreteScheduler's grid.",
            "",
        ]
    else:
        lines += [
            "Weights are safetensors. The student network is evaluated at the noise levels above, in EDM's",
            "sigma space (`x = x0 + sigma * eps`), fed to the VP network as `x / sqrt(1 + sigma^2)` at the",
            "matching (fractional) training timestep of the teacher's schedule.",
            "",
        ]
    return "\n".join(lines)


def _find_fid(*folders: Path) -> dict | None:
    """The measured FID with the largest N among ``fid-*.json`` files of the given folders."""
    best = None
    for folder in folders:
        for p in sorted(folder.glob("fid-*.json")):
            try:
                r = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if "fid" in r and "num" in r and (best is None or r["num"] > best["num"]):
                best = r
    return best


def with_steps(student: Student, meta: dict, steps: int | None, source: str | Path) -> Student:
    """``student`` sampling in ``steps`` network evaluations (``None``: its own count, unchanged).

    Consistency students (``consistency_grid`` in their ``meta``) take any count from 1 to the grid
    size - 1: the noise levels of :func:`~distilldiff.samplers.multistep_sigmas` on their training grid
    (LCM students: their LCMScheduler's). Other students sample only in their own count; ``source``
    names the student in the error.
    """
    if steps in (None, student.num_steps):
        return student
    if "consistency_grid" not in meta:
        raise ValueError(f"{source}: this student samples in {student.num_steps} step(s), got steps={steps} "
                         "(only consistency students choose their steps at sampling time)")
    from .samplers import multistep_sigmas

    sigmas = (student.denoiser.sample_sigmas(steps) if hasattr(student.denoiser, "sample_sigmas")  # LCM: LCMScheduler's
              else multistep_sigmas(meta["consistency_grid"], steps))
    return Student(student.denoiser, sigmas, student.sampler)


def with_sigmas(student: Student, meta: dict, sigmas: Sequence[float] | None, source: str | Path) -> Student:
    """``student`` sampling at the noise levels ``sigmas`` (``None``: its own, unchanged).

    Only multistep consistency students (not LCM's) take chosen levels: decreasing, inside their noise
    range, one network evaluation each (Song et al. 2023, sec. 4, choose the intermediate levels of
    multistep sampling by search). ``source`` names the student in the error.
    """
    if sigmas is None:
        return student
    if "consistency_grid" not in meta or meta.get("lcm"):
        raise ValueError(f"{source}: only multistep consistency students sample at chosen noise levels "
                         f"(this one samples at its own: {', '.join(f'{s:.4g}' for s in student.sigmas)})")
    return Student(student.denoiser, sigmas, student.sampler)


def with_levels(student: Student, meta: dict, source: str | Path, steps: int | None = None,
                sigmas: Sequence[float] | None = None) -> Student:
    """``student`` sampling in ``steps`` evaluations (:func:`with_steps`) or at the noise levels ``sigmas``
    (:func:`with_sigmas`), at most one of them given; neither: unchanged."""
    if sigmas is not None and steps is not None:
        raise ValueError("give the number of steps or the noise levels (sigmas), not both")
    return with_steps(with_sigmas(student, meta, sigmas, source), meta, steps, source)


def export_run(run: str | Path, out: str | Path, force: bool = False, steps: int | None = None,
               sigmas: Sequence[float] | None = None) -> Path:
    """Export a run's EMA student (the one of its newest checkpoint, or of a given one) to a clean diffusers folder.

    Args:
        run: a run folder (with ``checkpoints/`` and ``student/``), one of its checkpoints
            (``RUN/checkpoints/step-N``: the EMA student of update N, e.g. the best point of ``eval.jsonl``),
            or a student folder.
        out: the destination; must not exist or be empty unless ``force``, and must not be, contain
            or lie inside a run folder (the exported one or any other).
        force: replace a non-empty ``out`` (the old folder stays until the new one is complete).
        steps: network evaluations per sample of the exported pipeline (consistency students: any
            count their grid allows, see :func:`with_steps`; others: only their own); default: the
            student's own.
        sigmas: instead of ``steps``, the exported pipeline's noise levels themselves (multistep
            consistency students only, :func:`with_sigmas`); default: the student's own.

    Returns:
        ``out``. The model card records the FID measured with ``distilldiff fid`` if any (only for
        the student's own noise levels).
    """
    run, out = Path(run), Path(out)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    run, checkpoint = split_checkpoint(run)
    if (run / STUDENT_INFO_FILE).is_file():
        src, fid_folders = run, (run,)
    else:
        ckpts = list(run.glob("checkpoints/step-*")) + list(run.glob("stage-*/checkpoints/step-*"))  # staged: progressive
        if not ckpts or not (run / "student" / STUDENT_INFO_FILE).is_file():
            raise FileNotFoundError(f"{run}: the run has no checkpoint yet (nothing to export)")
        src, fid_folders = run / "student", (run, run / "student") if checkpoint is None else ()
    check_destination(out, run, src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (pass --force to replace it)")
    student, meta = load_student(src)  # the source is read completely before the destination is touched
    if checkpoint is not None:
        load_checkpoint_ema(student, meta, checkpoint)
    own_sigmas = list(student.sigmas)
    student = with_levels(student, meta, src, steps, sigmas)
    info = run_info(meta)
    # a measured FID belongs to the student's own noise levels (fid records do not say theirs, so none is quoted for
    # others) and to the run's newest student: none is quoted for an earlier checkpoint's
    fid = _find_fid(*fid_folders) if list(student.sigmas) == own_sigmas else None

    def write(folder: Path) -> None:
        save_student(student, folder, info)
        meta_out = json.loads((folder / STUDENT_INFO_FILE).read_text())
        if meta.get("lora") and (src / LORA_FOLDER).is_dir():  # the loaded student is merged: carry its adapter over
            shutil.copytree(src / LORA_FOLDER, folder / LORA_FOLDER)
            meta_out["lora"] = meta["lora"]
        if fid is not None:
            meta_out["fid"] = {k: fid.get(k) for k in ("fid", "num", "reference", "weights")}
        (folder / STUDENT_INFO_FILE).write_text(json.dumps(meta_out, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(meta_out, fid, path=folder.name))

    return replace_folder(out, write)  # a replaced export stays in place until the new one is complete


def split_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """``(run, checkpoint)`` for one checkpoint of a run (or of a staged run's stage), ``RUN/checkpoints/step-N``;
    ``(path, None)`` for anything else."""
    path = Path(path)
    return (path.parent.parent, path) if checkpoint_of(path) == path else (path, None)


def load_checkpoint_ema(student: Student, meta: dict, checkpoint: Path) -> None:
    """Put the EMA weights of a run's ``checkpoint`` (``checkpoints/step-N``) into ``student``, read from the
    run's student folder for its structure, and the checkpoint's counters into ``meta`` (``step``,
    ``images_seen``, ``train_seconds``). Students whose EMA is not their whole state (LoRA adapters) are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_file, ema_file = checkpoint / STATE_FILE, checkpoint / "ema.safetensors"
    if not state_file.is_file():
        raise FileNotFoundError(f"{checkpoint}: not a complete checkpoint (no {STATE_FILE})")
    try:
        state = RunFolder.read_state(checkpoint)
        step, nimg = int(state["step"]), int(state["nimg"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{state_file}: unreadable ({type(e).__name__})") from None
    try:
        weights = load_file(str(ema_file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{ema_file}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    own = student.state_dict()
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        raise ValueError(f"{ema_file}: its weights are not those of the run's student folder (a LoRA student, or "
                         "another run's checkpoint); the run folder itself gives its newest student")
    student.load_state_dict(weights)
    meta.update(step=step, images_seen=nimg)
    if state.get("train_seconds") is not None:
        meta["train_seconds"] = round(float(state["train_seconds"]), 1)


def _is_run(folder: Path) -> bool:
    return (folder / "checkpoints").is_dir() or any(folder.glob("stage-*/checkpoints")) or (folder / STUDENT_INFO_FILE).is_file()


def check_destination(out: Path, run: Path, src: Path) -> None:
    """Refuse (:class:`ValueError`) a destination for a student written from run ``run`` (its student folder
    ``src``) that is, contains or lies inside the source, a run or its checkpoints."""
    o = out.resolve()
    for folder in (run.resolve(), src.resolve()):
        if o == folder or folder in o.parents or o in folder.parents:
            raise ValueError(f"{out}: is, contains or lies inside the source run {run}; choose a folder outside it")
    for parent in [o, *o.parents]:
        if parent.is_dir() and (parent / "checkpoints").is_dir():
            raise ValueError(f"{out}: is or lies inside the run folder {parent}; choose a folder outside it")
    if o.is_dir() and any(_is_run(p.parent) for p in o.rglob("config.yaml")):
        raise ValueError(f"{out}: contains a run folder; choose another destination")


_DERIVED_KEYS = {
    "format", "pipeline", "sampler", "sigmas", "timesteps", "prediction_type", "sigma_data",
    "num_classes", "null_class", "guidance_scale", "kind", "init_sigma", "fid", "consistency_boundary", "lora",
    "lcm", "scheduler", "absent_components", "max_sequence_length", "call_sigmas", "image_size", "embedded_guidance",
}
