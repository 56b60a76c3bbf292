"""U-Net key map: original (CompVis ``openaimodel``) layout <-> internal (diffusers) names.

Keys are without the ``model.diffusion_model.`` prefix. The table is generated
from the config, as ComfyUI's ``unet_to_diffusers`` does. With ``L`` =
``layers_per_block`` and level ``i`` (0 = full resolution):

=====================================  =========================================
original                               internal
=====================================  =========================================
time_embed.0 / .2                      time_embedding.linear_1 / linear_2
input_blocks.0.0                       conv_in
input_blocks.{1+(L+1)i+j}.0 / .1       down_blocks.i.resnets.j / attentions.j
input_blocks.{(L+1)(i+1)}.0.op         down_blocks.i.downsamplers.0.conv
middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
output_blocks.{(L+1)k+j}.0 / .1        up_blocks.k.resnets.j / attentions.j  (j <= L)
output_blocks.{(L+1)k+L}.{1|2}.conv    up_blocks.k.upsamplers.0.conv  (.2 if the level has attention)
out.0 / out.2                          conv_norm_out / conv_out
label_emb.0.0 / .2                     add_embedding.linear_1 / linear_2  (SDXL)
time_embedding.cond_proj (weight)      time_embedding.cond_proj  (guidance-distilled, LCM)
=====================================  =========================================

Up block ``k`` is the level ``n-1-k`` (lowest resolution first), in both layouts.
Resnet parameters are renamed (``in_layers.0`` -> ``norm1`` ...); transformer
parameters have the same names in both layouts, and no tensor is reshaped:
``proj_in``/``proj_out`` are 1x1 convs in both for SD1, linears in both for SD2/SDXL.
A level's transformers have ``config.depth(level)`` blocks, on the down path and on
its mirror in the up path; the mid block has the last level's (as diffusers builds it).
``label_emb`` is SGM's name for SDXL's pooled-text / size embedding (diffusers'
``addition_embed_type="text_time"``); other class-conditioned U-Nets (SD2 unCLIP, the
x4 upscaler) are not supported: their keys are unmapped and reported.

A guidance-distilled U-Net (LCM; diffusers' ``time_cond_proj_dim``) has one more
tensor, the bias-free projection of its guidance-scale embedding. The original layout
has no name of its own for it (LCM was released as diffusers folders); single files
converted from them keep diffusers' name under the U-Net prefix,
``model.diffusion_model.time_embedding.cond_proj.weight`` (the name stable-diffusion.cpp
lists for such files), so that is the name here, in both directions. Its presence and
its second dimension (the embedding width) make the model guidance-distilled.
"""

from __future__ import annotations

from collections.abc import Mapping as MappingABC
from functools import lru_cache
from typing import Any

from ..config import UNetConfig
from .keymap import Kind, Mapping, ModuleTable, indices, params, same_names, shape_of

# original ResBlock parameter names -> diffusers ResnetBlock2D names
_RESNET_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",  # only where in != out channels
}
RESNET = Kind(
    "resnet",
    {f"{src}.{p}": f"{dst}.{p}" for src, dst in _RESNET_NAMES.items() for p in ("weight", "bias")},
)

_CROSS_ATTN_BLOCKS = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D")
_PLAIN_BLOCKS = ("DownBlock2D", "UpBlock2D")


@lru_cache(maxsize=None)
def transformer_kind(depth: int) -> Kind:
    """SpatialTransformer == diffusers Transformer2DModel: same parameter names."""
    names = params("norm", "proj_in", "proj_out")
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        names += params(*(f"{block}.norm{i}" for i in (1, 2, 3)))
        for attn in ("attn1", "attn2"):
            names += params(*(f"{block}.{attn}.to_{x}" for x in "qkv"), bias=False)
            names += params(f"{block}.{attn}.to_out.0")
        names += params(f"{block}.ff.net.0.proj", f"{block}.ff.net.2")
    return same_names(f"transformer(depth={depth})", names)


def _has_attention(block_type: str, where: str) -> bool:
    if block_type in _CROSS_ATTN_BLOCKS:
        return True
    if block_type in _PLAIN_BLOCKS:
        return False
    raise ValueError(
        f"{where}: block type {block_type!r} has no original-layout key map "
        f"(supported: {_CROSS_ATTN_BLOCKS + _PLAIN_BLOCKS})"
    )


def unet_encoder_table(config: UNetConfig, where: str = "unet encoder original->internal") -> ModuleTable:
    """The U-Net's input half (time embedding(s), input blocks, middle block; what a
    ControlNet copies): original module name -> (internal module name, Kind)."""
    table = ModuleTable(where)
    L = config.layers_per_block
    n_levels = len(config.block_out_channels)
    down_attn = [_has_attention(t, where) for t in config.down_block_types]

    table.add("time_embed.0", "time_embedding.linear_1")
    table.add("time_embed.2", "time_embedding.linear_2")
    if config.addition_embed_type == "text_time":
        table.add("label_emb.0.0", "add_embedding.linear_1")
        table.add("label_emb.0.2", "add_embedding.linear_2")
    table.add("input_blocks.0.0", "conv_in")
    for i in range(n_levels):
        for j in range(L):
            n = 1 + (L + 1) * i + j
            table.add(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", RESNET)
            if down_attn[i]:
                table.add(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", transformer_kind(config.depth(i)))
        if i < n_levels - 1:
            table.add(f"input_blocks.{(L + 1) * (i + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv")

    table.add("middle_block.0", "mid_block.resnets.0", RESNET)
    table.add("middle_block.1", "mid_block.attentions.0", transformer_kind(config.depth(n_levels - 1)))
    table.add("middle_block.2", "mid_block.resnets.1", RESNET)
    return table


# The guidance-embedding projection of a guidance-distilled U-Net: a bias-free linear.
COND_PROJ = "time_embedding.cond_proj"
_WEIGHT_ONLY = same_names("linear without bias", params("", bias=False))


def unet_table(config: UNetConfig) -> ModuleTable:
    """Original module name -> (internal module name, Kind), generated from the config."""
    where = "unet original->internal"
    L = config.layers_per_block
    n_levels = len(config.block_out_channels)
    up_attn = [_has_attention(t, where) for t in config.up_block_types]
    table = unet_encoder_table(config, where)
    if config.time_cond_proj_dim is not None:
        table.add(COND_PROJ, COND_PROJ, _WEIGHT_ONLY)
    for k in range(n_levels):
        for j in range(L + 1):
            n = (L + 1) * k + j
            table.add(f"output_blocks.{n}.0", f"up_blocks.{k}.resnets.{j}", RESNET)
            if up_attn[k]:
                table.add(f"output_blocks.{n}.1", f"up_blocks.{k}.attentions.{j}",
                          transformer_kind(config.depth(n_levels - 1 - k)))
        if k < n_levels - 1:
            # the upsampler follows the last resnet (and its transformer, if any)
            slot = 2 if up_attn[k] else 1
            table.add(f"output_blocks.{(L + 1) * k + L}.{slot}.conv", f"up_blocks.{k}.upsamplers.0.conv")

    table.add("out.0", "conv_norm_out")
    table.add("out.2", "conv_out")
    return table


def unet_original_to_internal(config: UNetConfig) -> Mapping:
    """``(key, tensor) -> [(key, tensor)]`` from original to internal names.

    Raises :class:`~ldm.checkpoints.keymap.UnmappedKeyError` for an unknown key."""
    return unet_table(config).mapping()


def unet_internal_to_original(config: UNetConfig) -> Mapping:
    """The inverse of :func:`unet_original_to_internal`."""
    return unet_table(config).inverse("unet internal->original").mapping()


# --- architecture from shapes ------------------------------------------------


def attention_depths(config: UNetConfig) -> int | tuple[int, ...]:
    """``transformer_layers_per_block`` as the weights can tell it: per level, the depth of
    its transformers, or for a level without attention 1 (a filler, which no weight can
    show), except at the last level, whose value also sets the mid block's depth; one
    number when every level agrees. Two configs with equal values build equal weights."""
    n = len(config.block_out_channels)
    where = "unet config"
    attn = [_has_attention(t, where) for t in config.down_block_types]
    depths = tuple(config.depth(i) if attn[i] or i == n - 1 else 1 for i in range(n))
    return depths[0] if len(set(depths)) == 1 else depths


def _depth(shapes: MappingABC[str, Any], prefix: str) -> int:
    return len(indices(shapes, prefix + "transformer_blocks."))


def _addition_embedding(shapes: MappingABC[str, Any], what: str) -> tuple[str | None, int | None]:
    """SDXL's ``label_emb.0.0`` / ``label_emb.0.2`` (pooled text + size ids -> time embedding):
    ``("text_time", its input width)``; ``(None, None)`` without one."""
    label = sorted(k for k in shapes if k.startswith("label_emb."))
    if not label:
        return None, None
    if "label_emb.0.0.weight" not in shapes:
        raise ValueError(f"class-conditioned U-Net ({label[0]}: e.g. the x4 upscaler) is not supported")
    shape_of(shapes, "label_emb.0.2.weight", what)
    return "text_time", shape_of(shapes, "label_emb.0.0.weight", what)[1]


def unet_architecture(shapes: MappingABC[str, Any]) -> dict[str, Any]:
    """The UNetConfig fields that original-layout key shapes determine (keys without
    prefix; values shapes or tensors): in/out channels, block_out_channels,
    layers_per_block, which levels have attention (the block types),
    cross_attention_dim (``attn2.to_k`` in-features), the transformer depths (as
    :func:`attention_depths` gives them), use_linear_projection (``proj_in`` is 2-D),
    and SDXL's added embedding (its type and input width; None for SD1/SD2), and a
    guidance-distilled U-Net's ``time_cond_proj_dim`` (the width ``time_embedding.cond_proj``
    takes; None without that tensor).

    Heads are not among them (q/k/v are [C, C] whatever the split into heads), nor
    SDXL's ``addition_time_embed_dim`` (only its product with the number of ids is).
    """
    arch = encoder_architecture(shapes)
    L, n_levels = arch["layers_per_block"], len(arch["block_out_channels"])
    up_attn = [f"output_blocks.{(L + 1) * i}.1.proj_in.weight" in shapes for i in range(n_levels)]
    return {
        **arch,
        "out_channels": shape_of(shapes, "out.2.weight", "Stable Diffusion U-Net")[0],
        "up_block_types": tuple(_CROSS_ATTN_BLOCKS[1] if a else _PLAIN_BLOCKS[1] for a in up_attn),
        "time_cond_proj_dim": _guidance_width(shapes),
    }


def _guidance_width(shapes: MappingABC[str, Any]) -> int | None:
    """The guidance embedding width of ``time_embedding.cond_proj.weight`` ([time, width]), or None."""
    key = COND_PROJ + ".weight"
    if key not in shapes:
        return None
    shape = shape_of(shapes, key, "guidance-distilled U-Net")
    if len(shape) != 2:
        raise ValueError(f"{key} must be a 2-d linear weight [time channels, guidance width], got {tuple(shape)}")
    return shape[1]


def encoder_architecture(shapes: MappingABC[str, Any], what: str = "Stable Diffusion U-Net") -> dict[str, Any]:
    """:func:`unet_architecture`'s fields that the input half's keys (``time_embed``,
    ``input_blocks``, ``middle_block``: what a ControlNet copies) determine: all but
    ``out_channels`` and ``up_block_types``. ``what`` names the model in errors."""
    inputs = indices(shapes, "input_blocks.")
    n_inputs = max(inputs, default=-1) + 1
    n_levels = len({i for i in inputs if f"input_blocks.{i}.0.op.weight" in shapes}) + 1
    if n_inputs < 2 or n_inputs % n_levels:
        raise ValueError(f"U-Net has {n_inputs} input blocks, which does not fit {n_levels} levels")
    L = n_inputs // n_levels - 1
    channels, down_attn, depths = [], [], []
    mid = "middle_block.1."
    for i in range(n_levels):
        first = 1 + (L + 1) * i
        channels.append(shape_of(shapes, f"input_blocks.{first}.0.out_layers.3.weight", what)[0])
        down_attn.append(f"input_blocks.{first}.1.proj_in.weight" in shapes)
        if down_attn[i]:
            depths.append(_depth(shapes, f"input_blocks.{first}.1."))
        else:
            depths.append(_depth(shapes, mid) if i == n_levels - 1 else 1)
    added, added_width = _addition_embedding(shapes, what)
    return {
        "in_channels": shape_of(shapes, "input_blocks.0.0.weight", what)[1],
        "block_out_channels": tuple(channels),
        "down_block_types": tuple(_CROSS_ATTN_BLOCKS[0] if a else _PLAIN_BLOCKS[0] for a in down_attn),
        "layers_per_block": L,
        "cross_attention_dim": shape_of(shapes, mid + "transformer_blocks.0.attn2.to_k.weight", what)[1],
        "transformer_layers_per_block": depths[0] if len(set(depths)) == 1 else tuple(depths),
        "use_linear_projection": len(shape_of(shapes, mid + "proj_in.weight", what)) == 2,
        "addition_embed_type": added,
        "projection_class_embeddings_input_dim": added_width,
    }
