"""Tiny reference models built with diffusers (the ground truth), random weights.

Shared by the parity tests: an SD1-style model (eps, conv proj_in, CLIP
quick_gelu, pad with EOS) and an SD2-v-style one (v-prediction, linear proj_in,
per-level heads, gelu, pad with 0), each saved as a diffusers folder whose
scheduler_config.json omits keys the way real SD folders do.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# Where and in what dtype the parity tests run ldm and diffusers: the CPU in float32, unless
# LDM_TEST_DEVICE / LDM_TEST_DTYPE say otherwise (scripts/gpu_check.sh runs them on CUDA in
# float32 and float16). Only the parity modules and their fixtures read these.
TEST_DEVICE = os.environ.get("LDM_TEST_DEVICE", "cpu")
TEST_DTYPE = getattr(torch, os.environ.get("LDM_TEST_DTYPE", "float32"))
# Max abs difference on [0, 1] pixels between ldm and diffusers: float32 agrees to rounding;
# float16 rounds differently in every layer (fused kernels, other summation orders).
# On the CPU in float16 (a check of this script's settings) the 6-step tests differed by up to 0.039.
PIXEL_TOLERANCE = 1e-3 if TEST_DTYPE == torch.float32 else 5e-2

# A real SD1.5 scheduler_config.json: written by diffusers 0.6, so it has no
# timestep_spacing etc.; every scheduler swapped in then uses its own defaults.
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# A real SD2 (768-v) scheduler_config.json.
SD2V_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@dataclass(frozen=True)
class TinySpec:
    name: str
    unet: dict
    vae: dict
    text: dict
    scheduler: dict
    pad_token: str


_VAE = dict(
    block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=64,
)

SD1_TINY = TinySpec(
    name="sd1",
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=8,
    ),
    vae=_VAE,
    text=dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ),
    scheduler=SD1_SCHEDULER_CONFIG,
    pad_token="eos",
)

SD2V_TINY = TinySpec(
    name="sd2v",
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    ),
    vae=_VAE,
    text=dict(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    ),
    scheduler=SD2V_SCHEDULER_CONFIG,
    pad_token="zero",
)


def inpaint_spec(spec: TinySpec) -> TinySpec:
    """The same tiny model with a 9-channel inpainting U-Net (latents, mask, masked-image
    latents), as sd-v1-5-inpainting / sd-2-inpainting are to SD1 / SD2."""
    channels = 2 * spec.vae["latent_channels"] + 1
    return replace(spec, name=f"{spec.name}-inpaint", unet={**spec.unet, "in_channels": channels})


def is_inpaint_spec(spec: TinySpec) -> bool:
    return spec.unet.get("in_channels", 4) == 2 * spec.vae["latent_channels"] + 1


SD1_INPAINT_TINY = inpaint_spec(SD1_TINY)
SD2V_INPAINT_TINY = inpaint_spec(SD2V_TINY)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights of a realistic scale: default inits leave some layers at zero
    (e.g. diffusers' conv_out), which would hide bugs in parity tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def build_reference(spec: TinySpec, seed: int = 0):
    """diffusers UNet, VAE and transformers CLIPTextModel with random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**spec.unet).eval()
    vae = AutoencoderKL(**spec.vae).eval()
    text = CLIPTextModel(CLIPTextConfig(**spec.text)).eval()
    for i, m in enumerate((unet, vae, text)):
        _randomize(m, seed * 10 + i)
    return unet, vae, text


def write_pipeline_files(
    path: Path, scheduler_config: dict, pad_token: str, pipeline: str = "StableDiffusionPipeline"
) -> None:
    """tokenizer/, scheduler/scheduler_config.json and model_index.json of a diffusers folder."""
    from ldm.checkpoints.diffusers_folder import model_index
    from ldm.models.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(path / "tokenizer", pad_token)
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2))
    index = model_index(scheduler_config["_class_name"], pipeline)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def save_diffusers_folder(spec: TinySpec, path: Path, seed: int = 0) -> Path:
    """Save a tiny reference model as a diffusers folder (model_index.json, unet/, ...);
    a 9-channel spec's model_index.json names StableDiffusionInpaintPipeline."""
    unet, vae, text = build_reference(spec, seed)
    path = Path(path)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    text.save_pretrained(path / "text_encoder")
    write_pipeline_files(path, spec.scheduler, spec.pad_token, _pipeline_name(spec))
    return path


def save_inpaint_folder(spec: TinySpec, path: Path, seed: int = 0) -> Path:
    """Save a tiny 9-channel model as a diffusers StableDiffusionInpaintPipeline folder."""
    if not is_inpaint_spec(spec):
        raise ValueError(f"{spec.name} is not an inpainting spec; use inpaint_spec({spec.name})")
    return save_diffusers_folder(spec, path, seed)


def _pipeline_name(spec: TinySpec) -> str:
    return "StableDiffusionInpaintPipeline" if is_inpaint_spec(spec) else "StableDiffusionPipeline"


def load_reference_pipeline(path: Path, pipeline: str = "StableDiffusionPipeline"):
    """A diffusers pipeline (StableDiffusionPipeline by default, or e.g.
    StableDiffusionInpaintPipeline) from a folder written above, in TEST_DTYPE on TEST_DEVICE
    (float32 on the CPU unless the environment says otherwise)."""
    import diffusers

    pipe = getattr(diffusers, pipeline).from_pretrained(
        path, safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=TEST_DTYPE
    ).to(TEST_DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe
