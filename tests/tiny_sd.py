"""Tiny random-weight Stable Diffusion pipelines built in-process (as diffusers' own fast tests do).

Nothing is downloaded: the CLIP tokenizer reads a vocabulary and BPE merges written here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distilldiff.text_teacher import write_word_tokenizer

#: the prompts the tiny pipelines' tests train and sample with
PROMPTS = ["a thick seven", "a thin one", "a slanted four", "a small two"]

#: words the tiny tokenizer knows whole (anything else falls back to single characters)
WORDS = ["a", "an", "the", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
         "thick", "thin", "slanted", "upright", "small", "large", "handwritten", "photo", "of", "cat", "dog"]


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_word_tokenizer(tmp / "tokenizer-src", WORDS)))


def _text_encoder(vocab_size: int, hidden: int = 16, projection: int | None = None, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=24,
                         num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=16,
                         projection_dim=projection or hidden, hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         sample_size=16).eval()


def tiny_sd_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0):
    """A random-weight ``StableDiffusionPipeline``: 16x16 RGB images, 4x8x8 latents, 16-d text embeddings."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _tokenizer(tmp)
    text_encoder = _text_encoder(len(tokenizer), seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def tiny_sdxl_pipeline(tmp: Path, prediction_type: str = "epsilon", seed: int = 0, force_zeros: bool = True):
    """A random-weight ``StableDiffusionXLPipeline``: two text encoders (the second with a projection:
    pooled embeddings), added time ids, 16x16 RGB images, 4x8x8 latents."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _tokenizer(tmp)
    enc1 = _text_encoder(len(tokenizer), hidden=16, seed=seed)
    enc2 = _text_encoder(len(tokenizer), hidden=16, projection=8, seed=seed + 3)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=4, attention_head_dim=2, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4,
                                transformer_layers_per_block=1).eval()
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)
    return StableDiffusionXLPipeline(vae=_vae(seed + 2), text_encoder=enc1, text_encoder_2=enc2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=force_zeros)


def save_pipeline(pipe, folder: Path) -> Path:
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_sd3_pipeline(tmp: Path, seed: int = 0, shift: float = 3.0):
    """A random-weight ``StableDiffusion3Pipeline`` without T5 (the pipeline feeds zeros in its place):
    two CLIP text encoders with pooled outputs, an ``SD3Transformer2DModel`` on 4x8x8 latents, a VAE
    with a shift factor, a ``FlowMatchEulerDiscreteScheduler`` with ``shift``; 16x16 RGB images."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = _tokenizer(tmp)
    enc1 = _text_encoder(len(tokenizer), hidden=16, projection=16, seed=seed)
    enc2 = _text_encoder(len(tokenizer), hidden=16, projection=16, seed=seed + 3)
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                        pooled_projection_dim=32, out_channels=4).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        sample_size=16, scaling_factor=1.5, shift_factor=0.1).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), vae=vae,
                                    text_encoder=enc1, tokenizer=tokenizer, text_encoder_2=enc2, tokenizer_2=tokenizer,
                                    text_encoder_3=None, tokenizer_3=None)


def _t5_tokenizer(words=WORDS):
    """A T5 (SentencePiece-style Unigram) tokenizer built in-process: each word of ``words`` one
    piece, anything else single letters; ``</s>`` appended as T5 does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def tiny_flux_pipeline(tmp: Path, seed: int = 0, guidance_embeds: bool = True):
    """A random-weight ``FluxPipeline``: CLIP (pooled output) and a tiny T5 encoder, a
    ``FluxTransformer2DModel`` on 4-channel latents packed 2x2 (16 channels), a VAE with a shift
    factor, the FLUX.1 scheduler (dynamic shift); 16x16 RGB images (pass ``height=width=16``)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _tokenizer(tmp)
    clip = _text_encoder(len(tokenizer), hidden=16, seed=seed)
    t5_tokenizer = _t5_tokenizer()
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                 eos_token_id=1)).eval()
    torch.manual_seed(seed + 1)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                         num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                                         guidance_embeds=guidance_embeds, axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        sample_size=16, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def _gemma_tokenizer(words=WORDS):
    """A Gemma (SentencePiece-style Unigram) tokenizer built in-process: ``<bos>`` first, each word of
    ``words`` one piece, anything else single characters (SANA's long default instruction included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'\"-:;!?()[]/&\n"
    vocab = [("<pad>", 0.0), ("<eos>", 0.0), ("<bos>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in words] + [(c, -5.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                              model_max_length=8192)


def tiny_sana_pipeline(seed: int = 0, dpm_solver: bool = True):
    """A random-weight ``SanaPipeline``: a tiny Gemma-2 text encoder, a ``SanaTransformer2DModel`` on
    4x16x16 latents of a tiny ``AutoencoderDC`` (32x32 RGB images; call with ``height=width=32,
    use_resolution_binning=False``), and SANA's ``DPMSolverMultistepScheduler`` in flow mode (shift 3)
    or, with ``dpm_solver=False``, the ``FlowMatchEulerDiscreteScheduler`` of the same shift."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = _gemma_tokenizer()
    torch.manual_seed(seed)
    encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                                       pad_token_id=0, bos_token_id=2, eos_token_id=1)).eval()
    torch.manual_seed(seed + 1)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                         attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                         cross_attention_dim=8, caption_channels=16, sample_size=16).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
                        encoder_layers_per_block=(1, 1), decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    scheduler = (DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
                 if dpm_solver else FlowMatchEulerDiscreteScheduler(shift=3.0))
    return SanaPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def tiny_run_config(teacher: dict, objective: dict, tmp_path: Path, **extra):
    """A 2-update run of ``objective`` on the ``teacher`` section (batch 2, a checkpoint, a sample grid and
    the exported student at update 2) in ``tmp_path / "run"``; ``extra``: further top-level sections."""
    from distilldiff.config import DistillConfig, load_config

    data = {
        "teacher": teacher,
        "objective": objective,
        "train": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 2, "sample_every": 2, "num_sample_images": 4,
                  "log_every": 1},
        "output_dir": str(tmp_path / "run"),
        **extra,
    }
    return load_config(DistillConfig, data=data)


def renoised_draws(folder: Path, prompt: str, n: int = 2, seeds: tuple[int, ...] = (11, 12)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(z, images)``: an exported multistep student's images in [0, 1] of ``prompt`` from latents ``z``
    (seed 7), one batch per re-noising seed in ``seeds`` (distilldiff's sampler)."""
    from distilldiff.inference import load_sampler

    sampler = load_sampler(str(folder), device="cpu")
    z = torch.randn((n, *sampler.denoiser.sample_shape), generator=torch.Generator().manual_seed(7))
    cond = sampler.denoiser.prompt_cond([prompt] * n, "cpu")
    return z, [(sampler.denoiser.decode(sampler.draw(z, cond, torch.Generator().manual_seed(s))) + 1) / 2 for s in seeds]


def plain_diffusers_images(script: str, folder: Path, prompt: str, steps: int, z: torch.Tensor, tmp_path: Path,
                           extra: dict) -> torch.Tensor:
    """The images that ``script`` (run in a fresh Python process, arguments ``folder prompt steps latents.pt
    out.pt extra-json``) saves for ``folder`` from latents ``z``."""
    import json
    import subprocess
    import sys

    torch.save(z, tmp_path / "z.pt")
    proc = subprocess.run([sys.executable, "-c", script, str(folder), prompt, str(steps), str(tmp_path / "z.pt"),
                           str(tmp_path / "theirs.pt"), json.dumps(extra)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "theirs.pt")
