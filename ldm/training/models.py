"""The models a training run builds, from configs or from the states earlier stages handed on."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import CLIPTextConfig

from ..config import TextEncoderConfig, VAEConfig, text_to_transformers
from ..models.text import TextEncoder
from ..models.vae import AutoencoderKL
from ..toy.clip import ToyCLIP


def toy_clip(text: TextEncoderConfig, vision: dict[str, Any], projection_dim: int) -> ToyCLIP:
    """A toy CLIP whose text tower is exactly the ldm ``TextEncoder`` of ``text``
    (``vision``: open_clip ``ModifiedResNet`` arguments of the image tower)."""
    config = CLIPTextConfig(**{**text_to_transformers(text), "projection_dim": projection_dim})
    config._attn_implementation = "sdpa"
    return ToyCLIP(config, vision)


def text_encoder_from_clip(config: TextEncoderConfig, clip_state: dict[str, Tensor]) -> TextEncoder:
    """Our TextEncoder holding CLIP's text tower (same key names, strict load)."""
    encoder = TextEncoder(config)
    state = {k: v for k, v in clip_state.items()
             if k.startswith("text_model.") and not k.endswith("position_ids")}
    encoder.load_state_dict(state, strict=True)
    return encoder


def vae_from_state(config: VAEConfig, state: dict[str, Tensor]) -> AutoencoderKL:
    """An AutoencoderKL holding ``state`` (strict load)."""
    vae = AutoencoderKL(config)
    vae.load_state_dict(state, strict=True)
    return vae
