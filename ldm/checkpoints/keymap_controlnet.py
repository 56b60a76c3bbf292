"""ControlNet key map: original (lllyasviel's ``cldm``) layout <-> internal (diffusers) names.

Keys are without the ``control_model.`` prefix that the 1.0 / 1.1 releases put on them
(some files, e.g. SD 2.1 ControlNets, store them without it). The copied U-Net half
(``time_embed``, ``input_blocks``, ``middle_block``) maps as the U-Net's does
(:func:`~ldm.checkpoints.keymap_unet.unet_encoder_table`); the rest, with ``n`` the
number of hint widths (4: 16, 32, 96, 256) and ``S`` the number of skips (12 for SD):

=====================================  =========================================
original                               internal
=====================================  =========================================
input_hint_block.0                     controlnet_cond_embedding.conv_in
input_hint_block.{2(k+1)}              controlnet_cond_embedding.blocks.k  (k < 2(n-1))
input_hint_block.{2(2n-1)}             controlnet_cond_embedding.conv_out
zero_convs.{i}.0                       controlnet_down_blocks.i  (i < S)
middle_block_out.0                     controlnet_mid_block
=====================================  =========================================

The odd ``input_hint_block`` indices are the SiLUs, which hold no weights. This is the
table diffusers' ``convert_controlnet_checkpoint`` (loaders/single_file_utils.py) applies.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Any

from ..config import ControlNetConfig
from .keymap import Mapping, ModuleTable, indices, shape_of
from .keymap_unet import encoder_architecture, unet_encoder_table

CONTROL_PREFIX = "control_model."
_WHAT = "ControlNet"


def skip_count(config: ControlNetConfig) -> int:
    """The zero convs on the down path: conv_in's output, then per level its resnets and,
    but for the last level, its downsampler (as many as the U-Net keeps skips)."""
    levels = len(config.unet.block_out_channels)
    return 1 + levels * config.unet.layers_per_block + levels - 1


def controlnet_table(config: ControlNetConfig) -> ModuleTable:
    """Original module name -> (internal module name, Kind), generated from the config."""
    table = unet_encoder_table(config.unet, "controlnet original->internal")
    hint_blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    table.add("input_hint_block.0", "controlnet_cond_embedding.conv_in")
    for k in range(hint_blocks):
        table.add(f"input_hint_block.{2 * (k + 1)}", f"controlnet_cond_embedding.blocks.{k}")
    table.add(f"input_hint_block.{2 * (hint_blocks + 1)}", "controlnet_cond_embedding.conv_out")
    for i in range(skip_count(config)):
        table.add(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}")
    table.add("middle_block_out.0", "controlnet_mid_block")
    return table


def controlnet_mappings(config: ControlNetConfig) -> tuple[Mapping, Mapping]:
    """The ``(key, tensor) -> [(key, tensor)]`` maps from original to internal names and
    back; each raises :class:`~ldm.checkpoints.keymap.UnmappedKeyError` for an unknown key."""
    table = controlnet_table(config)
    return table.mapping(), table.inverse("controlnet internal->original").mapping()


def controlnet_architecture(shapes: MappingABC[str, Any]) -> dict[str, Any]:
    """What original-layout ControlNet shapes (prefix stripped) determine: the copied
    U-Net half's fields (:func:`~ldm.checkpoints.keymap_unet.encoder_architecture`) as
    ``unet.<field>``, ``conditioning_channels`` and ``conditioning_embedding_out_channels``.
    ValueError naming the first key that is missing."""
    arch = {f"unet.{k}": v for k, v in encoder_architecture(shapes, _WHAT).items()}
    hint = sorted(indices(shapes, "input_hint_block."))
    # conv_in, then per further width a same-width conv and a stride-2 conv to it, then conv_out.
    if not hint or len(hint) % 2 or hint != list(range(0, 2 * len(hint), 2)):
        raise ValueError(f"not a {_WHAT}: its input_hint_block convs are {hint}, expected 0, 2, 4, ... "
                         "(an even number of them)")
    widths = [shape_of(shapes, f"input_hint_block.{i}.weight", _WHAT)[0] for i in hint[:-1:2]]
    arch["conditioning_channels"] = shape_of(shapes, "input_hint_block.0.weight", _WHAT)[1]
    arch["conditioning_embedding_out_channels"] = tuple(widths)
    return arch


def architecture_of(config: ControlNetConfig) -> dict[str, Any]:
    """The derivable part of a config, in the form :func:`controlnet_architecture` returns."""
    from .keymap_unet import attention_depths

    fields = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
              "use_linear_projection", "addition_embed_type", "projection_class_embeddings_input_dim")
    arch: dict[str, Any] = {f"unet.{name}": getattr(config.unet, name) for name in fields}
    arch["unet.transformer_layers_per_block"] = attention_depths(config.unet)
    arch["conditioning_channels"] = config.conditioning_channels
    arch["conditioning_embedding_out_channels"] = tuple(config.conditioning_embedding_out_channels)
    return arch
