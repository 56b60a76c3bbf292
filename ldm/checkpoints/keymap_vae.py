"""VAE key map: original (``ldm.modules.diffusionmodules.model``) layout <-> internal names.

Keys are without the ``first_stage_model.`` prefix. With ``n`` levels and
``L`` = ``layers_per_block``:

====================================  ==============================================
original                              internal
====================================  ==============================================
encoder.down.i.block.j                encoder.down_blocks.i.resnets.j  (j < L)
encoder.down.i.downsample.conv        encoder.down_blocks.i.downsamplers.0.conv  (i < n-1)
{en,de}coder.mid.block_1 / block_2    {en,de}coder.mid_block.resnets.0 / resnets.1
{en,de}coder.mid.attn_1               {en,de}coder.mid_block.attentions.0
{en,de}coder.norm_out                 {en,de}coder.conv_norm_out
decoder.up.{n-1-k}.block.j            decoder.up_blocks.k.resnets.j  (j <= L)
decoder.up.{n-1-k}.upsample.conv      decoder.up_blocks.k.upsamplers.0.conv  (k < n-1)
conv_in, conv_out, quant_conv, ...    same names
====================================  ==============================================

The decoder's ``up`` list is indexed by resolution level in the original and by
execution order internally, hence ``n-1-k``. The mid-block attention's q/k/v and
output projections are 1x1 convs ([C, C, 1, 1]) in the original and linears
([C, C]) internally: reshaped as views both ways.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from typing import Any

from ..config import VAEConfig
from .keymap import Kind, Mapping, ModuleTable, conv1x1_to_linear, indices, params, shape_of

RESNET = Kind(
    "vae resnet",
    {
        **{s: s for s in params("norm1", "conv1", "norm2", "conv2")},
        "nin_shortcut.weight": "conv_shortcut.weight",  # only where in != out channels
        "nin_shortcut.bias": "conv_shortcut.bias",
    },
)

_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
ATTENTION = Kind(
    "vae attention",
    {f"{src}.{p}": f"{dst}.{p}" for src, dst in _ATTN_NAMES.items() for p in ("weight", "bias")},
    {f"{src}.weight": conv1x1_to_linear for src in ("q", "k", "v", "proj_out")},
)


def _mid(table: ModuleTable, coder: str) -> None:
    table.add(f"{coder}.mid.block_1", f"{coder}.mid_block.resnets.0", RESNET)
    table.add(f"{coder}.mid.attn_1", f"{coder}.mid_block.attentions.0", ATTENTION)
    table.add(f"{coder}.mid.block_2", f"{coder}.mid_block.resnets.1", RESNET)


def vae_table(config: VAEConfig) -> ModuleTable:
    """Original module name -> (internal module name, Kind), generated from the config."""
    table = ModuleTable("vae original->internal")
    n = len(config.block_out_channels)
    L = config.layers_per_block
    for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                 "quant_conv", "post_quant_conv"):
        table.add(name, name)
    for i in range(n):
        for j in range(L):
            table.add(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", RESNET)
        if i < n - 1:
            table.add(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    _mid(table, "encoder")
    table.add("encoder.norm_out", "encoder.conv_norm_out")

    _mid(table, "decoder")
    for k in range(n):
        level = n - 1 - k
        for j in range(L + 1):
            table.add(f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", RESNET)
        if k < n - 1:
            table.add(f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    table.add("decoder.norm_out", "decoder.conv_norm_out")
    return table


def vae_original_to_internal(config: VAEConfig) -> Mapping:
    """``(key, tensor) -> [(key, tensor)]`` from original to internal names.

    Raises :class:`~ldm.checkpoints.keymap.UnmappedKeyError` for an unknown key."""
    return vae_table(config).mapping()


def vae_internal_to_original(config: VAEConfig) -> Mapping:
    """The inverse of :func:`vae_original_to_internal` (linears back to 1x1 convs)."""
    return vae_table(config).inverse("vae internal->original").mapping()


def vae_architecture(shapes: MappingABC[str, Any]) -> dict[str, Any]:
    """The VAEConfig fields that original-layout key shapes determine (keys without
    prefix): in/out/latent channels, block_out_channels, layers_per_block. The rest
    (norm groups, scaling factor, sample size) are not in the weights."""
    what = "Stable Diffusion VAE"
    levels = sorted(indices(shapes, "encoder.down."))
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"not a VAE in the original layout: encoder.down levels {levels}")
    return {
        "in_channels": shape_of(shapes, "encoder.conv_in.weight", what)[1],
        "out_channels": shape_of(shapes, "decoder.conv_out.weight", what)[0],
        "latent_channels": shape_of(shapes, "decoder.conv_in.weight", what)[1],
        "block_out_channels": tuple(
            shape_of(shapes, f"encoder.down.{i}.block.0.conv2.weight", what)[0] for i in levels
        ),
        "layers_per_block": len(indices(shapes, "encoder.down.0.block.")),
    }
