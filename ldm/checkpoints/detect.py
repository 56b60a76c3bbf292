"""Detect what an original-layout (single-file) checkpoint is, from keys and shapes.

Nothing here reads tensor data except the one tensor of the SD2 prediction-type
rule. Key layouts (keys without data):

- ``sd1``: text encoder ``cond_stage_model.transformer.*`` (OpenAI CLIP ViT-L/14,
  hidden 768, quick_gelu, pads with the end token), U-Net proj_in a 1x1 conv.
- ``sd2``: text encoder ``cond_stage_model.model.*`` (OpenCLIP ViT-H/14, hidden
  1024, gelu, pads with 0), U-Net proj_in linear. SD2 conditions on the
  penultimate block, so the internal text encoder has one block fewer than the file.
- inpainting (``sd1-inpaint``, ``sd2-inpaint``, ``toy-inpaint``): the same layouts with
  a first U-Net conv (``input_blocks.0.0.weight``) of 2 * latent + 1 = 9 input channels.
  Other extra inputs (8: InstructPix2Pix, 5: depth) are refused by name.

The config is ldm's ``ldm.config`` metadata when the file has it. Otherwise the
architecture is read from the shapes (see DERIVABLE) and must equal a preset's in
every field; that preset supplies what the weights cannot say (heads, sample size,
scaling factor). A file that fits no preset is refused with its shapes listed.

Prediction type (the model cannot be run correctly without it, and the file does
not say), in order:

1. ``ldm.config`` in the safetensors metadata (written by ldm), if present;
2. ``sd1`` -> ``epsilon`` (no SD1 v-model was ever released);
3. ``sd2`` -> ComfyUI's rule: the std of
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

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text": TEXT_PREFIX}

METADATA_CONFIG_KEY = "ldm.config"

# ComfyUI's v-prediction rule for SD2 (comfy/model_detection.py, "v_pred").
V_RULE_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_RULE_THRESHOLD = 0.09

# Keys that original checkpoints carry but that no ldm module uses. Ignored on
# purpose, never silently loaded:
# - model_ema.*: EMA shadow weights of the training run. In "-ema" / "pruned"
#   releases the EMA weights were already copied into model.diffusion_model.*;
#   in full training checkpoints they are a second copy we do not need.
# - the DDPM schedule buffers (betas, alphas_cumprod, posterior_*, ...): derived
#   from the beta schedule, which ldm rebuilds from ModelConfig.
# - logvar, lvlb_weights: training-loss weights.
# - the OpenCLIP text projection and logit scale: only used for CLIP's
#   image-text contrastive score, not for conditioning.
# - position_ids: the text encoder makes positions 0..L-1 itself (and some merged
#   SD1 files carry corrupted float position ids).
# - first_stage_model.loss.*: the VAE's training loss (LPIPS / discriminator).
IGNORED_PREFIXES = ("model_ema.", "first_stage_model.loss.")
IGNORED_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
    "cond_stage_model.model.attn_mask",
})
_IGNORED_SUFFIXES = ("embeddings.position_ids",)


def is_ignored(key: str) -> bool:
    """True for keys that original checkpoints carry but ldm does not use (see above)."""
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES)


def split_components(keys) -> tuple[dict[str, list[str]], list[str], list[str]]:
    """Group full keys by component; return ``(by_component, ignored, unknown)``."""
    parts: dict[str, list[str]] = {name: [] for name in PREFIXES}
    ignored: list[str] = []
    unknown: list[str] = []
    for key in keys:
        if is_ignored(key):
            ignored.append(key)
            continue
        for name, prefix in PREFIXES.items():
            if key.startswith(prefix):
                parts[name].append(key)
                break
        else:
            unknown.append(key)
    return parts, ignored, unknown


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
    if any(k.startswith("conditioner.embedders") for k in keys):
        raise CheckpointError(f"{where}: this is an SDXL checkpoint (conditioner.embedders.*); SDXL is not supported yet")
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) or ".lora_down." in k or ".lora_A." in k
           for k in keys):
        raise CheckpointError(f"{where}: this is a LoRA file, not a full checkpoint; LoRA is not supported yet")
    if UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        raise CheckpointError(
            f"{where}: the U-Net has a class/image embedding (label_emb: SDXL, SD2 unCLIP or "
            "similar); this variant is not supported"
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
        f"{key_prefixes(keys)}. Expected an SD 1.x/2.x original-layout checkpoint "
        f"({UNET_PREFIX}*, {VAE_PREFIX}*, {TEXT_PREFIX}*).{hint}"
    )


def detect_family(shapes: Mapping[str, tuple], where: str = "checkpoint") -> str:
    """``sd1`` or ``sd2`` from key names; raises CheckpointError naming what was found."""
    _refuse_unsupported(shapes, where)
    has_unet = any(k.startswith(UNET_PREFIX) for k in shapes)
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    text = [k for k in shapes if k.startswith(TEXT_PREFIX) and not is_ignored(k)]
    if not (has_unet and has_vae and text):
        absent = [n for n, ok in (("U-Net", has_unet), ("VAE", has_vae), ("text encoder", bool(text))) if not ok]
        raise _describe_unknown(shapes, where, f"no {', '.join(absent)} weights")
    if any(k.startswith(TEXT_PREFIX + "transformer.") for k in text):
        return "sd1"
    if any(k.startswith(TEXT_PREFIX + "model.") for k in text):
        return "sd2"
    raise _describe_unknown(shapes, where, f"unrecognised text encoder keys {key_prefixes(text, 3)}")


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|resblocks)\.(\d+)\.")


def _count_layers(keys) -> int:
    found = {int(m.group(1)) for k in keys if (m := _LAYER_RE.search(k))}
    return max(found) + 1 if found else 0


def text_architecture(shapes: Mapping[str, tuple], family: str, where: str) -> dict[str, Any]:
    """The TextEncoderConfig fields that stripped ``cond_stage_model.`` shapes determine.

    Heads are not among them (q/k/v are [C, C] whatever the split into heads). For
    the OpenCLIP layout the last block is never run (penultimate-layer conditioning),
    so it is not counted.
    """
    from .keymap_text import count_openclip_blocks

    try:
        if family == "sd1":
            base = "transformer.text_model." if any(k.startswith("transformer.text_model.") for k in shapes) else "transformer."
            vocab, hidden = shapes[base + "embeddings.token_embedding.weight"]
            positions = shapes[base + "embeddings.position_embedding.weight"][0]
            layers = _count_layers(k for k in shapes if k.startswith(base + "encoder.layers."))
            inter = shapes[base + "encoder.layers.0.mlp.fc1.weight"][0]
        else:
            vocab, hidden = shapes["model.token_embedding.weight"]
            positions = shapes["model.positional_embedding"][0]
            layers = count_openclip_blocks(shapes) - 1
            inter = shapes["model.transformer.resblocks.0.mlp.c_fc.weight"][0]
    except KeyError as exc:
        raise CheckpointError(f"{where}: text encoder weights incomplete (no {TEXT_PREFIX}{exc.args[0]})") from None
    except (ValueError, IndexError):
        raise CheckpointError(f"{where}: text encoder embedding weights have unexpected shapes") from None
    return {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "max_position_embeddings": positions}


# --- architecture: what the weights determine, and the presets it matches --------

# Fields of each component config that an original-layout file's keys and shapes
# determine, plus ``layout`` (the text encoder's key layout, which fixes its
# activation and padding by convention). Everything else (heads, sample sizes, the
# VAE scaling factor, norm groups) is not in the weights: it comes from the preset
# whose architecture the weights match, from ldm's metadata, or from the caller.
DERIVABLE = {
    "unet": ("in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
             "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
             "use_linear_projection"),
    "vae": ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block"),
    "text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "max_position_embeddings"),
}
_LAYOUT_NAMES = {"sd1": "sd1 (OpenAI CLIP, cond_stage_model.transformer)",
                 "sd2": "sd2 (OpenCLIP, cond_stage_model.model)"}


def keymap_family(config: ModelConfig) -> str:
    """The text-encoder key layout of a config: ``sd1`` (CLIP) or ``sd2`` (OpenCLIP)."""
    if config.family in ("sd1", "sd2"):
        return config.family
    return "sd2" if config.text.hidden_act == "gelu" else "sd1"


def architecture_of(config: ModelConfig) -> dict[str, Any]:
    """The derivable part of a config, in the form :func:`derive_architecture` returns."""
    arch: dict[str, Any] = {"layout": keymap_family(config)}
    for component, fields in DERIVABLE.items():
        part = getattr(config, component)
        arch.update({f"{component}.{name}": getattr(part, name) for name in fields})
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
        "text": text_architecture(strip(shapes, TEXT_PREFIX), layout, where),
    }
    arch: dict[str, Any] = {"layout": layout}
    for component, fields in parts.items():
        arch.update({f"{component}.{name}": value for name, value in fields.items()})
    return arch


def describe_architecture(arch: Mapping[str, Any]) -> str:
    """One line of what the weights say, for messages."""
    def get(key: str) -> Any:
        value = arch[key]
        return tuple(value) if isinstance(value, (list, tuple)) else value

    attention = tuple("CrossAttn" in t for t in get("unet.down_block_types"))
    return (
        f"U-Net channels {get('unet.block_out_channels')}, attention at levels {attention}, "
        f"{get('unet.layers_per_block')} layers per block, context width {get('unet.cross_attention_dim')}, "
        f"transformer depth {get('unet.transformer_layers_per_block')}, in/out channels "
        f"{get('unet.in_channels')}/{get('unet.out_channels')}, proj_in "
        f"{'linear' if get('unet.use_linear_projection') else 'conv'}; VAE channels "
        f"{get('vae.block_out_channels')}, {get('vae.layers_per_block')} layers per block, latent channels "
        f"{get('vae.latent_channels')}; text encoder {_LAYOUT_NAMES[get('layout')]} width "
        f"{get('text.hidden_size')}, {get('text.num_hidden_layers')} layers, MLP {get('text.intermediate_size')}, "
        f"vocab {get('text.vocab_size')}, {get('text.max_position_embeddings')} positions"
    )


def architecture_differences(found: Mapping[str, Any], config: ModelConfig) -> list[str]:
    """``field: weights X, config Y`` for every derivable field where they differ."""
    expected = architecture_of(config)
    return [f"{key}: weights {found[key]!r}, config {expected[key]!r}"
            for key in found if expected[key] != found[key]]


def match_preset(arch: Mapping[str, Any], prediction_type: str) -> tuple[str, ModelConfig] | None:
    """The preset whose derivable fields all equal ``arch`` (of those, the one with
    ``prediction_type``: sd2 and sd2-v share their weights' shapes); None if none fits."""
    fits = [(name, config) for name, config in PRESETS.items() if architecture_of(config) == dict(arch)]
    for name, config in fits:
        if config.prediction_type == prediction_type:
            return name, config
    if fits:
        name, config = fits[0]
        return name, with_changes(config, prediction_type=prediction_type)
    return None


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
    return Detection(config, f"keys and shapes match the {name} preset; {rule}")
