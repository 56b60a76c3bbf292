"""The models a training run builds, from configs or from the states earlier stages handed on."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import CLIPTextConfig

from ..config import ModelConfig, TextEncoderConfig, VAEConfig, inpainting_variant, text_to_transformers
from ..models.text import TextEncoder
from ..models.unet import UNet
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


CONV_IN = "conv_in.weight"


def inpainting_unet(config: ModelConfig, state: dict[str, Tensor]) -> UNet:
    """The inpainting U-Net of ``config`` (``inpainting_variant``) started from the
    4-channel U-Net weights ``state``, as SD's inpainting model was made from SD: the first
    conv's new input channels (mask, masked-image latents) start at zero, so the model
    begins as the text-to-image one and learns to read them."""
    unet = UNet(inpainting_variant(config).unet)
    weight = state[CONV_IN]
    extra = unet.config.in_channels - weight.shape[1]
    if extra <= 0:
        raise ValueError(f"{CONV_IN} already has {weight.shape[1]} input channels; expected "
                         f"{config.unet.in_channels} (a text-to-image U-Net)")
    zeros = torch.zeros(weight.shape[0], extra, *weight.shape[2:], dtype=weight.dtype)
    unet.load_state_dict({**state, CONV_IN: torch.cat([weight, zeros], dim=1)}, strict=True)
    return unet
