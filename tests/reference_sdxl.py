"""Tiny SDXL reference models built with diffusers (the ground truth), random weights.

Two specs with the real models' structure at toy widths:

- ``SDXL_TINY``, like stabilityai/stable-diffusion-xl-base-1.0: a CLIP-L-style
  ``text_encoder`` (CLIPTextModel, quick_gelu, tokenizer padding with the end token)
  and a bigG-style ``text_encoder_2`` (CLIPTextModelWithProjection, gelu, a projection
  narrower than its width so a transposed weight cannot pass, tokenizer padding with
  "!" = id 0); a 3-level U-Net without attention at the first level, uneven transformer
  depths, the ``text_time`` embedding over 6 size ids; the SDXL VAE scaling factor;
  ``force_zeros_for_empty_prompt``.
- ``SDXL_REFINER_TINY``, like stable-diffusion-xl-refiner-1.0: the bigG-style encoder
  alone (as ``text_encoder_2``), a 4-level U-Net, 5 ids (aesthetic score).

The encoders' configs carry the real folders' token ids (bos 0, eos 2, pad 1), so
transformers pools at ``argmax(input_ids)`` as it does for real SDXL files.
Each spec also gives the ldm ModelConfig of the same model (:func:`ldm_config`);
state dicts load into ldm's modules unrenamed (U-Net keys equal diffusers', text
encoder keys equal transformers').
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig
from ldm.foreign_config import vae_from_diffusers
from ldm.models.tokenizer import save_hf_tokenizer
from reference import _VAE, _randomize, load_reference_pipeline

# stabilityai/stable-diffusion-xl-base-1.0's (and the refiner's) scheduler_config.json.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_TOKEN_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as the real configs (pre-#24773)
CLIP_L_TINY = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", **_TOKEN_IDS,
)
BIGG_TINY = dict(
    vocab_size=49408, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=40, **_TOKEN_IDS,
)
_TIME_DIM = 8
SDXL_VAE_TINY = {**_VAE, "scaling_factor": 0.13025, "force_upcast": True}  # as the releases


@dataclass(frozen=True)
class SDXLTinySpec:
    """A tiny SDXL-family model: diffusers / transformers config dicts and the pipeline's
    model_index.json (``text`` None: no first encoder, the refiner)."""

    name: str
    unet: dict
    vae: dict
    text: dict | None
    text_2: dict
    model_index: dict
    scheduler: dict

    @property
    def pipeline(self) -> str:
        return self.model_index["_class_name"]


def _model_index(pipeline: str, first_encoder: bool, **config: Any) -> dict:
    """model_index.json as the real SDXL folders have it (diffusers 0.19)."""
    absent = [None, None]
    return {
        "_class_name": pipeline,
        "_diffusers_version": "0.19.0.dev0",
        **config,
        "add_watermarker": None,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if first_encoder else absent,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if first_encoder else absent,
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _tiny_unet(down_block_types: tuple[str, ...], channels: tuple[int, ...], heads: tuple[int, ...],
               depth: int | tuple[int, ...], context: int, ids: int) -> dict:
    """A tiny SDXL-family UNet2DConditionModel config: the up path mirrors the down path;
    the text_time embedding takes bigG's pooled embedding and ``ids`` size ids."""
    return dict(
        sample_size=8,
        block_out_channels=channels,
        down_block_types=down_block_types,
        up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down_block_types)),
        layers_per_block=2,
        # diffusers' historical name: SDXL's config.json holds the head counts here.
        attention_head_dim=heads,
        transformer_layers_per_block=depth,
        cross_attention_dim=context,
        use_linear_projection=True,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_DIM,
        projection_class_embeddings_input_dim=BIGG_TINY["projection_dim"] + ids * _TIME_DIM,
    )


_ATTN, _PLAIN = "CrossAttnDownBlock2D", "DownBlock2D"

SDXL_TINY = SDXLTinySpec(
    name="sdxl",
    # No attention at the first level, uneven depths (the mid block takes the last's).
    unet=_tiny_unet((_PLAIN, _ATTN, _ATTN), channels=(32, 64, 64), heads=(2, 2, 4), depth=(1, 2, 3),
                    context=CLIP_L_TINY["hidden_size"] + BIGG_TINY["hidden_size"], ids=6),
    vae=SDXL_VAE_TINY,
    text=CLIP_L_TINY,
    text_2=BIGG_TINY,
    model_index=_model_index("StableDiffusionXLPipeline", True, force_zeros_for_empty_prompt=True),
    scheduler=SDXL_SCHEDULER_CONFIG,
)

SDXL_REFINER_TINY = SDXLTinySpec(
    name="sdxl-refiner",
    unet=_tiny_unet((_PLAIN, _ATTN, _ATTN, _PLAIN), channels=(32, 64, 64, 64), heads=(2, 2, 4, 4), depth=2,
                    context=BIGG_TINY["hidden_size"], ids=5),
    vae=SDXL_VAE_TINY,
    text=None,
    text_2=BIGG_TINY,
    model_index=_model_index("StableDiffusionXLImg2ImgPipeline", False, force_zeros_for_empty_prompt=False,
                             requires_aesthetics_score=True),
    scheduler=SDXL_SCHEDULER_CONFIG,
)


# --- the ldm side -------------------------------------------------------------------

_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act")


def ldm_text_config(data: dict, pad_token: str, projection: bool) -> TextEncoderConfig:
    """ldm's config of one of the tiny SDXL encoders (both condition on the penultimate layer)."""
    return TextEncoderConfig(**{k: data[k] for k in _TEXT_FIELDS}, pad_token=pad_token,
                             hidden_layer="penultimate",
                             projection_dim=data["projection_dim"] if projection else None)


def ldm_unet_config(data: dict) -> UNetConfig:
    """ldm's UNetConfig of a tiny diffusers U-Net dict (the fields share diffusers' names,
    but for the head counts, which diffusers' SD configs keep under attention_head_dim)."""
    fields = {k: v for k, v in data.items() if k != "attention_head_dim"}
    return UNetConfig(**fields, num_attention_heads=tuple(data["attention_head_dim"]))


def ldm_config(spec: SDXLTinySpec) -> ModelConfig:
    """The ldm ModelConfig of a tiny spec: the base's two encoders are ``text`` and
    ``text_2``; the refiner's bigG alone is ``text``."""
    bigg = ldm_text_config(spec.text_2, "zero", projection=True)
    if spec.text is None:
        text, text_2 = bigg, None
    else:
        text, text_2 = ldm_text_config(spec.text, "eos", projection=False), bigg
    return ModelConfig(family=spec.name, unet=ldm_unet_config(spec.unet), vae=vae_from_diffusers(spec.vae),
                       text=text, text_2=text_2, timestep_spacing=spec.scheduler.get("timestep_spacing"))


# --- the diffusers side ---------------------------------------------------------------


@dataclass
class SDXLReference:
    """diffusers / transformers modules of a tiny spec, random weights, eval mode."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module | None
    text_encoder_2: torch.nn.Module


def build_sdxl_reference(spec: SDXLTinySpec, seed: int = 0) -> SDXLReference:
    """UNet2DConditionModel, AutoencoderKL, CLIPTextModel (base only) and
    CLIPTextModelWithProjection of ``spec`` with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ref = SDXLReference(
        unet=UNet2DConditionModel(**spec.unet).eval(),
        vae=AutoencoderKL(**spec.vae).eval(),
        text_encoder=None if spec.text is None else CLIPTextModel(CLIPTextConfig(**spec.text)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_2)).eval(),
    )
    for i, module in enumerate((ref.unet, ref.vae, ref.text_encoder, ref.text_encoder_2)):
        if module is not None:
            _randomize(module, seed * 10 + i)
    return ref


def save_sdxl_folder(spec: SDXLTinySpec, path: Path, seed: int = 0) -> Path:
    """Save a tiny SDXL model as a diffusers folder laid out as the real ones: unet/, vae/,
    text_encoder/ (base), text_encoder_2/, tokenizer/ (base, pads with the end token),
    tokenizer_2/ (pads with "!"), scheduler/, model_index.json."""
    ref = build_sdxl_reference(spec, seed)
    path = Path(path)
    ref.unet.save_pretrained(path / "unet")
    ref.vae.save_pretrained(path / "vae")
    if ref.text_encoder is not None:
        ref.text_encoder.save_pretrained(path / "text_encoder")
        save_hf_tokenizer(path / "tokenizer", "eos")
    ref.text_encoder_2.save_pretrained(path / "text_encoder_2")
    save_hf_tokenizer(path / "tokenizer_2", "zero")
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler, indent=2))
    (path / "model_index.json").write_text(json.dumps(spec.model_index, indent=2))
    return path


def load_sdxl_reference_pipeline(path: Path):
    """The diffusers pipeline its model_index.json names (StableDiffusionXLPipeline or
    StableDiffusionXLImg2ImgPipeline) from a folder written above, float32, CPU."""
    pipeline = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
    return load_reference_pipeline(path, pipeline)
