"""Detect what an original-layout (single-file) checkpoint is, from keys and shapes.

Nothing here reads tensor data except the one tensor of the SD2 prediction-type
rule. Layouts (see :mod:`ldm.checkpoints.layouts`), from key names:

- ``sd1``: text encoder ``cond_stage_model.transformer.*`` (OpenAI CLIP ViT-L/14,
  hidden 768, quick_gelu, pads with the end token), U-Net proj_in a 1x1 conv.
- ``sd2``: text encoder ``cond_stage_model.model.*`` (OpenCLIP ViT-H/14, hidden
  1024, gelu, pads with 0), U-Net proj_in linear. SD2 conditions on the
  penultimate block, so the internal text encoder has one block fewer than the file.
- ``sdxl``: SGM's ``conditioner.embedders.0.transformer.*`` (CLIP ViT-L) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, every block and its
  projection), a U-Net with ``label_emb`` (pooled text + size ids; context 2048,
  ``label_emb.0.0`` input 2816 for SDXL 1.0).
- ``sdxl-refiner``: ``conditioner.embedders.0.model.*`` (bigG) alone (context 1280,
  ``label_emb.0.0`` input 2560: an aesthetic score in place of the target size).
- inpainting (``sd1-inpaint``, ``sd2-inpaint``, ``sdxl-inpaint``, ``toy-inpaint``): the
  same layouts with a first U-Net conv (``input_blocks.0.0.weight``) of 2 * latent + 1 =
  9 input channels. Other extra inputs (8: InstructPix2Pix, 5: depth) are refused by name.

The config is ldm's ``ldm.config`` metadata when the file has it. Otherwise the
architecture is read from the shapes (see DERIVABLE) and must equal a preset's in
every field; that preset supplies what the weights cannot say (heads, sample size,
scaling factor). A file that fits no preset is refused with its shapes listed.

Prediction type (the model cannot be run correctly without it, and the file does
not say), in order:

1. ``ldm.config`` in the safetensors metadata (written by ldm), if present;
2. ``sd1`` -> ``epsilon`` (no SD1 v-model was ever released);
3. ``sdxl`` / ``sdxl-refiner`` -> ``v_prediction`` if the file has a ``v_pred`` key (the
   empty marker v-prediction SDXL fine-tunes carry; ComfyUI's rule), else ``epsilon``
   (SDXL 1.0 base and refiner);
4. ``sd2`` -> ComfyUI's rule: the std of
   ``model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias``
   is > 0.09 for the 768-v models and below for the 512 eps base model.

Every decision is returned with the rule that made it, for the log line, and
every decision can be overridden by the caller.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from ..config import PRESETS, ModelConfig, with_changes
from .files import CheckpointError
from .layouts import (
    SD_TEXT_PREFIX, SGM_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, TextPart, is_ignored, layout_of, text_parts,
)

METADATA_CONFIG_KEY = "ldm.config"

# ComfyUI's v-prediction rule for SD2 (comfy/model_detection.py, "v_pred").
V_RULE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_RULE_THRESHOLD = 0.09
# ComfyUI's rule for SDXL (comfy/supported_models.py, SDXL.model_type): a marker key.
SDXL_V_MARKER = "v_pred"
# A marker of a zero-terminal-SNR noise schedule (ComfyUI: "ztsnr"), which ldm lacks.
ZTSNR_MARKER = "ztsnr"


def strip(shapes: Mapping[str, tuple], prefix: str) -> dict[str, tuple]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix) and not is_ignored(k)}


@dataclass(frozen=True)
class Detection:
    config: ModelConfig
    rule: str  # how family and prediction type were decided, for the log line


def key_prefixes(keys, n: int = 6) -> list[str]:
    """The first few distinct two-level key prefixes, to describe an unknown file."""
    seen: list[str] = []
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        if prefix not in seen:
            seen.append(prefix)
        if len(seen) >= n:
            break
    return seen


def _refuse_unsupported(shapes: Mapping[str, tuple], where: str) -> None:
    """Known model kinds ldm does not implement: say which, not 'unknown'."""
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        raise CheckpointError(f"{where}: this is a LoRA file, not a full checkpoint; LoRA is not supported yet")
    sgm = any(k.startswith(SGM_TEXT_PREFIX) for k in keys)
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes and not sgm:
        raise CheckpointError(
            f"{where}: the U-Net has a class/image embedding (label_emb) but the text encoder is SD's "
            "(cond_stage_model): SD2 unCLIP or similar; this variant is not supported"
        )
    if ZTSNR_MARKER in shapes:
        raise CheckpointError(
            f"{where}: the file marks a zero-terminal-SNR noise schedule (key {ZTSNR_MARKER!r}), "
            "which ldm does not implement"
        )
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    latent = shapes.get(VAE_PREFIX + "decoder.conv_in.weight", (0, 4))[1]
    if conv_in is not None and len(conv_in) == 4:
        check_input_channels(conv_in[1], latent, where)


def check_input_channels(unet_in: int, latent: int, where: str) -> None:
    """Text-to-image U-Nets take the latents; inpainting ones (2 * latent + 1) also the
    mask and the masked image's latents. Other extra inputs are variants ldm cannot feed."""
    if unet_in in (latent, 2 * latent + 1):
        return
    kinds = {2 * latent: "an InstructPix2Pix model", latent + 1: "a depth-conditioned model"}
    raise CheckpointError(
        f"{where}: the U-Net takes {unet_in} input channels, the VAE makes {latent} "
        f"({kinds.get(unet_in, 'a variant with extra conditioning inputs')}); "
        f"only text-to-image ({latent} channels) and inpainting ({2 * latent + 1} channels) models are supported"
    )


def _describe_unknown(shapes: Mapping[str, tuple], where: str, missing: str) -> CheckpointError:
    keys = list(shapes)
    hint = ""
    if any(k.startswith(("down_blocks.", "conv_in.", "text_model.", "encoder.down_blocks.")) for k in keys):
        hint = (" It looks like a single diffusers component (unet/vae/text_encoder weights); "
                "pass the whole diffusers folder instead.")
    elif any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        hint = " It looks like a standalone VAE file, not a full model."
    return CheckpointError(
        f"{where}: unknown model family: {missing}. Found {len(keys)} tensors, key prefixes "
        f"{key_prefixes(keys)}. Expected an SD 1.x/2.x or SDXL original-layout checkpoint "
        f"({UNET_PREFIX}*, {VAE_PREFIX}*, and {SD_TEXT_PREFIX}* or {SGM_TEXT_PREFIX}*).{hint}"
    )


def _text_heads(keys: list[str], n: int) -> list[str]:
    """The distinct key heads of ``n`` dotted parts, e.g. ``conditioner.embedders.0.model``."""
    return sorted({".".join(k.split(".")[:n]) for k in keys})


def _sgm_layout(text: list[str], shapes: Mapping[str, tuple], where: str) -> str:
    heads = _text_heads(text, 4)
    for layout in ("sdxl", "sdxl-refiner"):
        expected = sorted(p.prefix + ("transformer" if p.keys == "sd1" else "model") for p in text_parts(layout))
        if heads == expected:
            return layout
    raise _describe_unknown(
        shapes, where, f"SDXL-style text encoders {heads}; ldm knows SDXL base "
        f"({SGM_TEXT_PREFIX}0.transformer + {SGM_TEXT_PREFIX}1.model) and the refiner ({SGM_TEXT_PREFIX}0.model)")


def detect_family(shapes: Mapping[str, tuple], where: str = "checkpoint") -> str:
    """The file's layout (``sd1``, ``sd2``, ``sdxl`` or ``sdxl-refiner``) from key names;
    raises CheckpointError naming what was found."""
    _refuse_unsupported(shapes, where)
    has_unet = any(k.startswith(UNET_PREFIX) for k in shapes)
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    sd_text = [k for k in shapes if k.startswith(SD_TEXT_PREFIX) and not is_ignored(k)]
    sgm_text = [k for k in shapes if k.startswith(SGM_TEXT_PREFIX) and not is_ignored(k)]
    if sd_text and sgm_text:
        raise CheckpointError(
            f"{where}: holds text encoders of two layouts, SD's ({SD_TEXT_PREFIX}*) and SDXL's "
            f"({SGM_TEXT_PREFIX}*); a file of one model has one. It is a broken merge or not a model checkpoint"
        )
    text = sd_text or sgm_text
    if not (has_unet and has_vae and text):
        absent = [n for n, ok in (("U-Net", has_unet), ("VAE", has_vae), ("text encoder", bool(text))) if not ok]
        raise _describe_unknown(shapes, where, f"no {', '.join(absent)} weights")
    if sgm_text:
        return _sgm_layout(sgm_text, shapes, where)
    if any(k.startswith(SD_TEXT_PREFIX + "transformer.") for k in text):
        return "sd1"
    if any(k.startswith(SD_TEXT_PREFIX + "model.") for k in text):
        return "sd2"
    raise _describe_unknown(shapes, where, f"unrecognised text encoder keys {key_prefixes(text, 3)}")


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|resblocks)\.(\d+)\.")


def _count_layers(keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := _LAYER_RE.search(k))}
    return max(found) + 1 if found else 0


_OPENCLIP_FIXED_BLOCKS = {"sd2": 1, "openclip": 0}  # blocks in the file that the model does not run


def text_architecture(shapes: Mapping[str, tuple], part: TextPart, where: str) -> dict[str, Any]:
    """The TextEncoderConfig fields that one text encoder's shapes (``part.prefix``
    stripped) determine.

    Heads are not among them (q/k/v are [C, C] whatever the split into heads). For
    SD2's OpenCLIP layout the last block is never run (penultimate-layer conditioning),
    so it is not counted. ``projection_dim`` is the width of SDXL bigG's
    ``text_projection``; None for the layouts that do not load one.
    """
    from .keymap_text import count_openclip_blocks

    projection = None
    try:
        if part.keys == "sd1":
            base = "transformer.text_model." if any(k.startswith("transformer.text_model.") for k in shapes) else "transformer."
            vocab, hidden = shapes[base + "embeddings.token_embedding.weight"]
            positions = shapes[base + "embeddings.position_embedding.weight"][0]
            layers = _count_layers(k for k in shapes if k.startswith(base + "encoder.layers."))
            inter = shapes[base + "encoder.layers.0.mlp.fc1.weight"][0]
        else:
            vocab, hidden = shapes["model.token_embedding.weight"]
            positions = shapes["model.positional_embedding"][0]
            layers = count_openclip_blocks(shapes) - _OPENCLIP_FIXED_BLOCKS[part.keys]
            inter = shapes["model.transformer.resblocks.0.mlp.c_fc.weight"][0]
            if part.keys == "openclip":
                projection = shapes["model.text_projection"][1]
    except KeyError as exc:
        raise CheckpointError(f"{where}: text encoder weights incomplete (no {part.prefix}{exc.args[0]})") from None
    except (ValueError, IndexError):
        raise CheckpointError(f"{where}: text encoder embedding or projection weights have unexpected shapes") from None
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "max_position_embeddings": positions, "projection_dim": projection}


# --- architecture: what the weights determine, and the presets it matches --------

# Fields of each component config that an original-layout file's keys and shapes
# determine, plus ``layout`` (the text encoders' key layout, which fixes their
# activation, padding and conditioning layer by convention). Everything else (heads,
# sample sizes, the VAE scaling factor, norm groups, SDXL's addition_time_embed_dim) is
# not in the weights: it comes from the preset whose architecture the weights match,
# from ldm's metadata, or from the caller. ``text_2`` fields are None without a second
# text encoder; ``unet.transformer_layers_per_block`` is compared as
# :func:`~ldm.checkpoints.keymap_unet.attention_depths` gives it.
GUIDANCE_FIELD = "unet.time_cond_proj_dim"
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "max_position_embeddings", "projection_dim")
DERIVABLE = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
             "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
             "use_linear_projection", "addition_embed_type", "projection_class_embeddings_input_dim",
             "time_cond_proj_dim"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block"),
    "text": _TEXT_FIELDS,
    "text_2": _TEXT_FIELDS,
}
_LAYOUT_NAMES = {"sd1": "sd1 (OpenAI CLIP, cond_stage_model.transformer)",
                 "sd2": "sd2 (OpenCLIP, cond_stage_model.model)",
                 "sdxl": "sdxl (CLIP ViT-L conditioner.embedders.0.transformer, OpenCLIP bigG .1.model)",
                 "sdxl-refiner": "sdxl-refiner (OpenCLIP bigG, conditioner.embedders.0.model)"}


def architecture_of(config: ModelConfig) -> dict[str, Any]:
    """The derivable part of a config, in the form :func:`derive_architecture` returns."""
    from .keymap_unet import attention_depths

    arch: dict[str, Any] = {"layout": layout_of(config)}
    for component, fields in DERIVABLE.items():
        part = getattr(config, component)
        arch.update({f"{component}.{name}": getattr(part, name) if part is not None else None for name in fields})
    arch["unet.transformer_layers_per_block"] = attention_depths(config.unet)
    return arch


def derive_architecture(shapes: Mapping[str, tuple], where: str = "checkpoint") -> dict[str, Any]:
    """What an original-layout file's keys and shapes say about its model.

    Raises CheckpointError for unknown or unsupported files, ValueError (without the
    path) when a component's keys are incomplete.
    """
    from .keymap_unet import unet_architecture
    from .keymap_vae import vae_architecture

    layout = detect_family(shapes, where)
    parts = {
        "unet": unet_architecture(strip(shapes, UNET_PREFIX)),
        "vae": vae_architecture(strip(shapes, VAE_PREFIX)),
        "text_2": dict.fromkeys(_TEXT_FIELDS),
    }
    for part in text_parts(layout):
        parts[part.field] = text_architecture(strip(shapes, part.prefix), part, where)
    arch: dict[str, Any] = {"layout": layout}
    for component, fields in parts.items():
        arch.update({f"{component}.{name}": value for name, value in fields.items()})
    return arch


def _describe_text(get: Callable[[str], Any], field: str) -> str:
    projection = get(f"{field}.projection_dim")
    return (f"width {get(f'{field}.hidden_size')}, {get(f'{field}.num_hidden_layers')} layers, MLP "
            f"{get(f'{field}.intermediate_size')}, vocab {get(f'{field}.vocab_size')}, "
            f"{get(f'{field}.max_position_embeddings')} positions"
            + (f", projection {projection}" if projection else ""))


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """One line of what the weights say, for messages."""
    def get(key: str) -> Any:
        value = arch[key]
        return tuple(value) if isinstance(value, (list, tuple)) else value

    attention = tuple("CrossAttn" in t for t in get("unet.down_block_types"))
    added = get("unet.projection_class_embeddings_input_dim")
    text = f"text encoder {_LAYOUT_NAMES[get('layout')]} {_describe_text(get, 'text')}"
    if get("text_2.hidden_size") is not None:
        text += f"; second text encoder {_describe_text(get, 'text_2')}"
    return (
        f"U-Net channels {get('unet.block_out_channels')}, attention at levels {attention}, "
        f"{get('unet.layers_per_block')} layers per block, context width {get('unet.cross_attention_dim')}, "
        f"transformer depth {get('unet.transformer_layers_per_block')}, in/out channels "
        f"{get('unet.in_channels')}/{get('unet.out_channels')}, proj_in "
        f"{'linear' if get('unet.use_linear_projection') else 'conv'}"
        + (f", added embedding input {added}" if added else "")
        + (f", guidance embedding width {arch[GUIDANCE_FIELD]}" if arch.get(GUIDANCE_FIELD) else "")
        + f"; VAE channels {get('vae.block_out_channels')}, {get('vae.layers_per_block')} layers per block, "
        f"latent channels {get('vae.latent_channels')}; {text}"
    )


def architecture_differences(found: Mapping[str, Any], config: ModelConfig) -> list[str]:
    """``field: weights X, config Y`` for every derivable field where they differ."""
    expected = architecture_of(config)
    return [f"{key}: weights {found[key]!r}, config {expected[key]!r}"
            for key in found if expected[key] != found[key]]


def match_preset(arch: Mapping[str, Any], prediction_type: str) -> tuple[str, ModelConfig] | None:
    """The preset whose derivable fields all equal ``arch`` (of those, the one with
    ``prediction_type``: sd2 and sd2-v share their weights' shapes); None if none fits.
    A guidance-distilled U-Net (LCM) matches its base model's preset, with the guidance
    embedding width the weights show."""
    guidance = arch.get(GUIDANCE_FIELD)
    plain = {**arch, GUIDANCE_FIELD: None}
    fits = [(name, config) for name, config in PRESETS.items() if architecture_of(config) == plain]
    fits.sort(key=lambda fit: fit[1].prediction_type != prediction_type)
    if not fits:
        return None
    name, config = fits[0]
    if guidance is not None:
        config = with_changes(config, unet=with_changes(config.unet, time_cond_proj_dim=guidance))
    return name, with_changes(config, prediction_type=prediction_type)


def config_from_metadata(metadata: Mapping[str, str], where: str) -> ModelConfig | None:
    """The ModelConfig that ldm stored in a file's safetensors metadata, if any."""
    raw = metadata.get(METADATA_CONFIG_KEY)
    if raw is None:
        return None
    try:
        return ModelConfig.from_dict(json.loads(raw))
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{where}: invalid {METADATA_CONFIG_KEY} metadata: {exc}") from None


def v_prediction_rule(get_tensor: Callable[[str], torch.Tensor]) -> tuple[str, str]:
    """SD2's prediction type by ComfyUI's rule; returns ``(prediction_type, rule)``."""
    std = float(get_tensor(V_RULE_KEY).float().std())
    pred = "v_prediction" if std > V_RULE_THRESHOLD else "epsilon"
    cmp = ">" if std > V_RULE_THRESHOLD else "<="
    return pred, f"std of output_blocks.11 norm1.bias {std:.3f} {cmp} {V_RULE_THRESHOLD}"


def _prediction_type(layout: str, shapes: Mapping[str, tuple],
                     get_tensor: Callable[[str], torch.Tensor] | None) -> tuple[str, str]:
    if layout == "sd1":
        return "epsilon", "sd1 text encoder (cond_stage_model.transformer), SD1 is always epsilon"
    if layout in ("sdxl", "sdxl-refiner"):
        if SDXL_V_MARKER in shapes:
            return "v_prediction", f"{layout} text encoders (conditioner.embedders), {SDXL_V_MARKER!r} marker key"
        return "epsilon", f"{layout} text encoders (conditioner.embedders), no {SDXL_V_MARKER!r} marker key"
    if get_tensor is None or V_RULE_KEY not in shapes:
        return "epsilon", "sd2 text encoder (cond_stage_model.model), v-rule not applied"
    pred, rule = v_prediction_rule(get_tensor)
    return pred, f"sd2 text encoder (cond_stage_model.model), {rule}"


def detect_config(shapes: Mapping[str, tuple], *, metadata: Mapping[str, str] | None = None,
                  get_tensor: Callable[[str], torch.Tensor] | None = None,
                  where: str = "checkpoint") -> Detection:
    """ModelConfig of an original-layout checkpoint: ldm's metadata if the file has it,
    else the preset whose architecture the keys and shapes match exactly.

    ``get_tensor`` reads one tensor for the SD2 prediction-type rule; without it
    (shape-only detection) SD2 models are assumed epsilon and the rule says so.
    A file whose shapes fit no preset is refused with what they are, never guessed.
    """
    detect_family(shapes, where)
    stored = config_from_metadata(metadata or {}, where)
    if stored is not None:
        return Detection(stored, f"ldm.config metadata in the file, {stored.family}")
    arch = derive_architecture(shapes, where)  # ValueError: caller adds the path
    pred, rule = _prediction_type(arch["layout"], shapes, get_tensor)
    found = match_preset(arch, pred)
    if found is None:
        raise CheckpointError(
            f"{where}: the weights fit no known model family ({', '.join(PRESETS)}) and the file has "
            f"no {METADATA_CONFIG_KEY} metadata; they have {describe_architecture(arch)}. Pass config= "
            "(--config: a preset name or YAML file) with this model's heads, sample size and "
            "scaling factor to load it"
        )
    name, config = found
    distilled = config.unet.time_cond_proj_dim
    if distilled is not None:
        rule += (f"; guidance-distilled U-Net (LCM): time_embedding.cond_proj takes a {distilled}-wide guidance "
                 "embedding")
    return Detection(config, f"keys and shapes match the {name} preset; {rule}")
