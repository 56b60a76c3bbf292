"""Text-encoder key maps: original single-file layout <-> internal (= diffusers) keys.

Keys here are those below a text encoder's prefix in an original checkpoint
(``cond_stage_model.``, SDXL's ``conditioner.embedders.N.``; see
:mod:`ldm.checkpoints.layouts`), with that prefix already removed. Internal keys are
:class:`ldm.models.text.TextEncoder`'s (``text_model.embeddings.token_embedding.weight``,
..., and ``text_projection.weight`` for an encoder with a projection).

Key families (the ``family`` argument):

* ``sd1`` (OpenAI CLIP through transformers; SD1, and SDXL's CLIP ViT-L): the layout
  below ``text_model.`` is already CLIPTextModel's; files differ only in the prefix
  (``transformer.text_model.``, or ``transformer.`` in files written by transformers < 4.17).
* ``sd2`` (OpenCLIP text tower, SD2): renamed, the fused attention ``in_proj`` split
  into q/k/v, and the last resblock dropped: SD2 conditions on the penultimate block,
  so our config has ``num_hidden_layers = resblocks - 1`` (as diffusers' SD2
  ``text_encoder`` does). ``text_projection`` is not used (ignored before the map).
* ``openclip`` (OpenCLIP text tower kept whole, SDXL's ViT-bigG): the same renames
  and split, every block kept, and ``text_projection`` (stored ``(width, projection)``,
  applied as ``x @ P``) transposed to and from ``text_projection.weight`` (an
  ``nn.Linear``'s ``(projection, width)``), as diffusers' ``convert_open_clip_checkpoint``.

Every source's ``position_ids`` is dropped: :class:`TextEncoder` computes positions
per call (see the comment there), as are OpenCLIP's ``logit_scale`` and ``attn_mask``
(the contrastive temperature and the causal mask, which the model rebuilds). A key
these maps do not know raises :class:`~ldm.checkpoints.keymap.UnmappedKeyError`, the
rule of every key map (see :mod:`ldm.checkpoints.keymap`): the strict load reports it
as unexpected under its source name, and it is never passed on, where it could
collide with a real name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch

from ..config import TextEncoderConfig
from .keymap import UnmappedKeyError

KeyMap = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]
StateMap = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]

FAMILIES = ("sd1", "sd2", "openclip")

_INTERNAL = "text_model."
# What transformers >= 5 saves below CLIPTextModel when it drops the text_model level.
_TEXT_MODEL_PARTS = ("embeddings.", "encoder.", "final_layer_norm.")
_SD1_PREFIXES = ("transformer.text_model.", "transformer.")
_SD1_OUT = "transformer.text_model."

# OpenCLIP name (below a resblock) -> CLIPEncoderLayer name; in_proj is split separately.
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_TOP = {
    "model.token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "model.positional_embedding": "text_model.embeddings.position_embedding.weight",
    "model.ln_final.weight": "text_model.final_layer_norm.weight",
    "model.ln_final.bias": "text_model.final_layer_norm.bias",
}
# The contrastive loss' temperature, and the causal mask (rebuilt by the model).
_OPENCLIP_DROPPED = ("model.logit_scale", "model.attn_mask")
# Used only for the contrastive score in SD2, never for its conditioning.
_SD2_DROPPED = ("model.text_projection",)
_PROJECTION, _PROJECTION_INTERNAL = "model.text_projection", "text_projection.weight"
_RESBLOCK = re.compile(r"^model\.transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
_COUNT = re.compile(r"(?:^|\.)model\.transformer\.resblocks\.(\d+)\.")
_QKV = ("q_proj", "k_proj", "v_proj")


def _check(config: TextEncoderConfig, family: str) -> None:
    if not isinstance(config, TextEncoderConfig):
        raise TypeError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"unknown text encoder family {family!r}; valid families: {FAMILIES}")


def _is_position_ids(key: str) -> bool:
    return key.endswith("position_ids")


# --- diffusers ---------------------------------------------------------------


def text_diffusers_to_internal(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A diffusers ``text_encoder`` (or SDXL ``text_encoder_2``) key to ours.

    transformers < 5 saved ``text_model.*`` (all published SD folders); transformers
    >= 5 saves CLIPTextModel without that level (``embeddings.*``); both map here.
    CLIPTextModelWithProjection keeps ``text_model.*`` beside ``text_projection.weight``.
    """
    if _is_position_ids(key):
        return []
    if key.startswith(_TEXT_MODEL_PARTS):
        return [(_INTERNAL + key, tensor)]
    if key.startswith(_INTERNAL) or key == _PROJECTION_INTERNAL:
        return [(key, tensor)]
    raise UnmappedKeyError(key, "text_encoder diffusers->internal")


# --- SD1 ---------------------------------------------------------------------


def _sd1_to_internal(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if _is_position_ids(key):
        return []
    for prefix in _SD1_PREFIXES:
        if key.startswith(prefix):
            return [(_INTERNAL + key[len(prefix):], tensor)]
    raise UnmappedKeyError(key, "text sd1 original->internal")


def _sd1_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        if _is_position_ids(key):
            continue
        if not key.startswith(_INTERNAL):
            raise UnmappedKeyError(key, "text sd1 internal->original")
        out[_SD1_OUT + key[len(_INTERNAL):]] = tensor
    return out


# --- OpenCLIP (SD2, SDXL's bigG) ------------------------------------------------


def _where(family: str, direction: str) -> str:
    return f"text {family} {direction}"


def _transposed(tensor: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's ``x @ P`` projection <-> nn.Linear's weight (a copy: a transposed view
    could not be saved). Other shapes pass for the loader to report as mis-shaped."""
    return tensor.t().contiguous() if tensor.ndim == 2 else tensor


def _openclip_block_to_internal(i: int, rest: str, tensor: torch.Tensor, where: str) -> list[tuple[str, torch.Tensor]]:
    layer = f"text_model.encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        if tensor.shape[0] % 3:
            raise ValueError(
                f"model.transformer.resblocks.{i}.{rest}: first dimension {tensor.shape[0]} "
                "is not divisible by 3 (fused q, k, v)"
            )
        kind = "weight" if rest.endswith("weight") else "bias"
        return [
            (f"{layer}self_attn.{name}.{kind}", part)
            for name, part in zip(_QKV, tensor.chunk(3, dim=0))
        ]
    module, _, param = rest.rpartition(".")
    if module in _OPENCLIP_BLOCK:
        return [(f"{layer}{_OPENCLIP_BLOCK[module]}.{param}", tensor)]
    raise UnmappedKeyError(f"model.transformer.resblocks.{i}.{rest}", where)


def _openclip_to_internal_factory(config: TextEncoderConfig, family: str) -> KeyMap:
    # SD2: the original tower has one block more than we run, index num_hidden_layers.
    unused_block = config.num_hidden_layers if family == "sd2" else None
    dropped = _OPENCLIP_DROPPED + (_SD2_DROPPED if family == "sd2" else ())
    where = _where(family, "original->internal")

    def to_internal(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if key in _OPENCLIP_TOP:
            return [(_OPENCLIP_TOP[key], tensor)]
        if key in dropped or _is_position_ids(key):
            return []
        if key == _PROJECTION:
            return [(_PROJECTION_INTERNAL, _transposed(tensor))]
        match = _RESBLOCK.match(key)
        if match is None:
            raise UnmappedKeyError(key, where)
        i, rest = int(match.group(1)), match.group(2)
        if i == unused_block:
            return []
        # Blocks past the last one are mapped anyway: the strict load then reports
        # them as unexpected layers, which says the config has too few layers.
        return _openclip_block_to_internal(i, rest, tensor, where)

    return to_internal


_OPENCLIP_BLOCK_INV = {v: k for k, v in _OPENCLIP_BLOCK.items()}
_OPENCLIP_TOP_INV = {v: k for k, v in _OPENCLIP_TOP.items()}


def _openclip_to_original_factory(config: TextEncoderConfig, family: str) -> StateMap:
    where = _where(family, "internal->original")

    def to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if _is_position_ids(key):
                continue
            if key in _OPENCLIP_TOP_INV:
                out[_OPENCLIP_TOP_INV[key]] = tensor
                continue
            if key == _PROJECTION_INTERNAL and family == "openclip":
                out[_PROJECTION] = _transposed(tensor)
                continue
            match = _LAYER.match(key)
            if match is None:
                raise UnmappedKeyError(key, where)
            i, rest = int(match.group(1)), match.group(2)
            module, _, param = rest.rpartition(".")
            block = f"model.transformer.resblocks.{i}."
            if module.startswith("self_attn.") and module[len("self_attn."):] in _QKV:
                qkv.setdefault((i, param), {})[module[len("self_attn."):]] = tensor
            elif module in _OPENCLIP_BLOCK_INV:
                out[f"{block}{_OPENCLIP_BLOCK_INV[module]}.{param}"] = tensor
            else:
                raise UnmappedKeyError(key, where)
        for (i, param), parts in sorted(qkv.items()):
            missing = [n for n in _QKV if n not in parts]
            if missing:
                raise KeyError(f"text_model.encoder.layers.{i}: missing self_attn {missing} {param}")
            out[f"model.transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat(
                [parts[n] for n in _QKV], dim=0
            )
        if family == "sd2":
            out.update(_zero_resblock(config, _like(state)))
        return out

    return to_original


def _like(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    ref = state.get("text_model.final_layer_norm.weight")
    if ref is None:
        ref = next(iter(state.values()), torch.empty(0))
    return ref


def _zero_resblock(config: TextEncoderConfig, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original tower's last block, which SD2 never runs: all zeros.

    The original model stops at the penultimate block, so these values never
    affect an image; writing the block keeps the file's block count what
    OpenCLIP-layout tools expect (they derive the tower's depth from it).
    """
    d, m = config.hidden_size, config.intermediate_size
    shapes = {
        "ln_1.weight": (d,), "ln_1.bias": (d,),
        "attn.in_proj_weight": (3 * d, d), "attn.in_proj_bias": (3 * d,),
        "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
        "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (m, d), "mlp.c_fc.bias": (m,),
        "mlp.c_proj.weight": (d, m), "mlp.c_proj.bias": (d,),
    }
    block = f"model.transformer.resblocks.{config.num_hidden_layers}."
    return {
        block + name: torch.zeros(shape, dtype=like.dtype, device=like.device)
        for name, shape in shapes.items()
    }


# --- public factories ----------------------------------------------------------


def text_original_to_internal(config: TextEncoderConfig, family: str) -> KeyMap:
    """Per-key map from an original checkpoint's text-encoder keys to ours.

    ``config`` must be the target config: for SD2 the original's block with
    index ``config.num_hidden_layers`` (its last) is dropped.
    """
    _check(config, family)
    if family == "sd1":
        return _sd1_to_internal
    return _openclip_to_internal_factory(config, family)


def text_internal_to_original(config: TextEncoderConfig, family: str) -> StateMap:
    """Whole-state map from our keys to the original layout.

    It takes the whole state dict, not one key, because for OpenCLIP it is not per
    key: q/k/v are fused back into ``in_proj`` (three keys to one) and, for SD2, one
    all-zeros final resblock is appended (see :func:`_zero_resblock`), so that
    internal -> original -> internal is exact. ``logit_scale`` is not written (we
    never had it), nor, for SD2, ``text_projection``; SDXL's is, transposed back.
    """
    _check(config, family)
    if family == "sd1":
        return _sd1_to_original
    return _openclip_to_original_factory(config, family)


def count_openclip_blocks(keys: Iterable[str]) -> int:
    """Resblocks in an OpenCLIP text tower (original layout), 0 if there is none.

    Works with or without the ``cond_stage_model.`` prefix; the vision tower's
    ``model.visual.transformer.resblocks`` are not counted. The count is the
    highest index + 1, so a file with a block missing fails the strict load
    with that block's keys listed rather than loading into a shallower model.
    """
    indices = {int(m.group(1)) for key in keys if (m := _COUNT.search(key))}
    return max(indices) + 1 if indices else 0
