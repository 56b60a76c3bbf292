"""Where each component of a model lives: original single-file prefixes and diffusers subfolders.

The U-Net is under ``model.diffusion_model.`` and the VAE under ``first_stage_model.`` in
every original (CompVis / SGM) file. The text encoders differ by model kind; each
kind is one *layout*:

==============  ==============================  ==================  =========================
layout          text encoder: single-file       key map (below the  diffusers folder
                prefix                          prefix)             (weights, tokenizer)
==============  ==============================  ==================  =========================
sd1             cond_stage_model.               sd1: HF CLIP names  text_encoder, tokenizer
sd2             cond_stage_model.               sd2: OpenCLIP       text_encoder, tokenizer
sdxl            conditioner.embedders.0.        sd1: HF CLIP-L      text_encoder, tokenizer
sdxl (text_2)   conditioner.embedders.1.        openclip: bigG      text_encoder_2, tokenizer_2
sdxl-refiner    conditioner.embedders.0.        openclip: bigG      text_encoder_2, tokenizer_2
==============  ==============================  ==================  =========================

(key maps: :mod:`ldm.checkpoints.keymap_text`; ``sd2`` drops OpenCLIP's last block, which
SD2 never runs, ``openclip`` keeps the whole tower and its ``text_projection``.) The SDXL
refiner's one encoder is ldm's ``text`` / ``text_encoder`` but lives where the base keeps
its second one, in both layouts, as SGM and diffusers store it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from ..config import ModelConfig, TextEncoderConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD_TEXT_PREFIX = "cond_stage_model."
SGM_TEXT_PREFIX = "conditioner.embedders."

LAYOUTS = ("sd1", "sd2", "sdxl", "sdxl-refiner")


@dataclass(frozen=True)
class TextPart:
    """One text encoder of a layout."""

    component: str  # LoadedModel attribute and state name: text_encoder, text_encoder_2
    field: str  # ModelConfig field of its config: text, text_2
    prefix: str  # its keys' prefix in an original single file
    keys: str  # the keymap_text family of the keys below that prefix
    folder: str  # diffusers subfolder of its weights and config.json
    tokenizer: str  # diffusers subfolder of its tokenizer
    hidden_layer: Literal["last", "penultimate"]  # what the U-Net is fed (not in any config.json)

    def config(self, model: ModelConfig) -> TextEncoderConfig:
        return getattr(model, self.field)


_CLIP_L = TextPart("text_encoder", "text", SGM_TEXT_PREFIX + "0.", "sd1", "text_encoder", "tokenizer", "penultimate")
_BIGG = TextPart("text_encoder_2", "text_2", SGM_TEXT_PREFIX + "1.", "openclip", "text_encoder_2", "tokenizer_2",
                 "penultimate")
TEXT_PARTS: dict[str, tuple[TextPart, ...]] = {
    "sd1": (TextPart("text_encoder", "text", SD_TEXT_PREFIX, "sd1", "text_encoder", "tokenizer", "last"),),
    "sd2": (TextPart("text_encoder", "text", SD_TEXT_PREFIX, "sd2", "text_encoder", "tokenizer", "last"),),
    "sdxl": (_CLIP_L, _BIGG),
    "sdxl-refiner": (TextPart("text_encoder", "text", SGM_TEXT_PREFIX + "0.", "openclip", "text_encoder_2",
                              "tokenizer_2", "penultimate"),),
}


def check_layout_name(layout: str) -> None:
    if layout not in TEXT_PARTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; valid layouts: {list(LAYOUTS)}")


def text_parts(layout: str) -> tuple[TextPart, ...]:
    """The text encoders of ``layout``, in the order their hidden states are concatenated."""
    check_layout_name(layout)
    return TEXT_PARTS[layout]


def layout_of(config: ModelConfig) -> str:
    """The layout a config's model is stored in.

    Two text encoders: SDXL base. One, with the U-Net's pooled-text ("text_time")
    embedding: the SDXL refiner. Otherwise SD1 or SD2, by family, or for other
    families by the text encoder's activation (OpenCLIP uses gelu, OpenAI CLIP quick_gelu).
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.text_2 is not None:
        return "sdxl"
    if config.unet.addition_embed_type is not None:
        return "sdxl-refiner"
    if config.family in ("sd1", "sd2"):
        return config.family
    return "sd2" if config.text.hidden_act == "gelu" else "sd1"


def prefixes(layout: str) -> dict[str, str]:
    """Component -> its key prefix in an original single file of ``layout``."""
    return {"unet": UNET_PREFIX, "vae": VAE_PREFIX, **{p.component: p.prefix for p in text_parts(layout)}}


# Keys that original checkpoints carry but that no ldm module uses. Ignored on
# purpose, never silently loaded (and logged when a file is loaded):
# - model_ema.*: EMA shadow weights of the training run. In "-ema" / "pruned"
#   releases the EMA weights were already copied into model.diffusion_model.*;
#   in full training checkpoints they are a second copy we do not need.
# - the DDPM schedule buffers (betas, alphas_cumprod, posterior_*, ...; SGM's
#   denoiser.sigmas): derived from the beta schedule, which ldm rebuilds from ModelConfig.
# - logvar, lvlb_weights: training-loss weights.
# - SD2's OpenCLIP text projection: only used for CLIP's image-text contrastive
#   score, not for SD2's conditioning (SDXL's bigG projection is loaded: it makes
#   the pooled embedding).
# - OpenCLIP's logit_scale (the contrastive loss' temperature) and attn_mask (the
#   causal mask, which the text model rebuilds), in SD2 and SDXL files alike; diffusers'
#   single-file converter (convert_open_clip_checkpoint) drops them too.
# - v_pred: an empty marker some SDXL fine-tunes carry; read by the prediction-type rule.
# - position_ids: the text encoder makes positions 0..L-1 itself (and some merged
#   SD1 files carry corrupted float position ids).
# - first_stage_model.loss.*: the VAE's training loss (LPIPS / discriminator).
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
_OPENCLIP_UNUSED = ("logit_scale", "attn_mask")
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "v_pred", "denoiser.sigmas", "denoiser.log_sigmas",
    SD_TEXT_PREFIX + "model.text_projection",
    *(f"{prefix}model.{name}" for prefix in (SD_TEXT_PREFIX, SGM_TEXT_PREFIX + "0.", SGM_TEXT_PREFIX + "1.")
      for name in _OPENCLIP_UNUSED),
})
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def is_ignored(key: str) -> bool:
    """True for keys that original checkpoints carry but ldm does not use (see above)."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def split_components(keys: Iterable[str], layout: str) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Group full keys by component of ``layout``; return ``(by_component, ignored, unknown)``."""
    table = prefixes(layout)
    parts: dict[str, list[str]] = {name: [] for name in table}
    ignored: list[str] = []
    unknown: list[str] = []
    for key in keys:
        if is_ignored(key):
            ignored.append(key)
            continue
        for name, prefix in table.items():
            if key.startswith(prefix):
                parts[name].append(key)
                break
        else:
            unknown.append(key)
    return parts, ignored, unknown
