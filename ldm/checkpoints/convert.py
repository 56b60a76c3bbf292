"""``convert``: rewrite a checkpoint in the original single-file or the diffusers layout.

The source goes through the same path as :func:`load_model` (validation,
detection, strict shape check), so a converted checkpoint is one ldm can load.
Output is always safetensors, written to a temporary sibling and renamed into
place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import ModelConfig
from .detect import METADATA_CONFIG_KEY, PREFIXES
from .diffusers_folder import write_folder
from .files import CheckpointError, atomic_path, check_destination, save_safetensors
from .keymap import add_prefix, apply_mapping
from .loading import LoadedModel, check_prediction_type, keymap_family, load_parts, parse_dtype

logger = logging.getLogger("ldm")

LAYOUTS = ("original", "diffusers")


def internal_states(model: LoadedModel) -> dict[str, dict[str, torch.Tensor]]:
    """The modules' state dicts: already in diffusers key names (convention 2)."""
    return {
        "unet": model.unet.state_dict(),
        "vae": model.vae.state_dict(),
        "text_encoder": model.text_encoder.state_dict(),
    }


def original_state(config: ModelConfig, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One original-layout state dict (``model.diffusion_model.*``, ...) from internal ones."""
    from .keymap_text import text_internal_to_original
    from .keymap_unet import unet_internal_to_original
    from .keymap_vae import vae_internal_to_original

    unet = apply_mapping(states["unet"], unet_internal_to_original(config.unet))
    vae = apply_mapping(states["vae"], vae_internal_to_original(config.vae))
    text = text_internal_to_original(config.text, keymap_family(config))(states["text_encoder"])
    for name, mapped in (("unet", unet), ("vae", vae)):
        if mapped.unmapped:
            raise CheckpointError(f"internal {name} keys without an original name: {list(mapped.unmapped)[:5]}")
    return {
        **add_prefix(unet, PREFIXES["unet"]),
        **add_prefix(vae, PREFIXES["vae"]),
        **add_prefix(text, PREFIXES["text"]),
    }


def original_metadata(config: ModelConfig) -> dict[str, str]:
    """safetensors metadata of original-layout files ldm writes: the full config,
    since heads, sample size and prediction type cannot be read from weights."""
    return {METADATA_CONFIG_KEY: json.dumps(config.to_dict()), "format": "pt"}


def save_model(model: LoadedModel, dst: str | Path, *, layout: Literal["original", "diffusers"],
               dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write a loaded model as an original-layout ``.safetensors`` file or a diffusers folder."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not valid; valid values: {list(LAYOUTS)}")
    dtype = parse_dtype(dtype)
    dst = Path(dst)
    states = internal_states(model)
    if dtype is not None:
        states = {c: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}
                  for c, s in states.items()}
    with atomic_path(dst, overwrite=overwrite) as tmp:
        if layout == "original":
            save_safetensors(original_state(model.config, states), tmp, original_metadata(model.config))
        else:
            tmp.mkdir()
            write_folder(tmp, model.config, states)
    logger.info("wrote %s (%s layout)", dst, layout)
    return dst


def default_layout(dst: str | Path) -> str:
    return "original" if str(dst).endswith(".safetensors") else "diffusers"


def convert(src: str | Path, dst: str | Path, *, layout: Literal["original", "diffusers"] | None = None,
            config: Any = None, prediction_type: str | None = None,
            dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
            overwrite: bool = False) -> Path:
    """Read ``src`` (original-layout file or diffusers folder) and write ``dst``.

    ``layout``: ``original`` (one ``.safetensors`` file, with the config in its
    metadata) or ``diffusers`` (a folder); default from ``dst``'s suffix.
    ``config`` / ``prediction_type`` override detection as in :func:`load_model`.
    ``dtype``: store weights in this dtype (default: as stored in ``src``).
    Refuses to replace an existing ``dst`` unless ``overwrite=True``.
    """
    layout = layout or default_layout(dst)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not valid; valid values: {list(LAYOUTS)}")
    check_prediction_type(prediction_type)
    dtype = parse_dtype(dtype)
    src, dst = Path(src), Path(dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"source and destination are the same path: {src}")
    if layout == "original" and dst.suffix != ".safetensors":
        raise ValueError(f"original-layout output must end in .safetensors, got {dst}")
    check_destination(dst, overwrite)  # fail before the (slow) load
    model = load_parts(src, dtype=None, config=config, prediction_type=prediction_type,
                       allow_pickle=allow_pickle)
    return save_model(model, dst, layout=layout, dtype=dtype, overwrite=overwrite)


def main_convert(args) -> int:
    """CLI entry (``ldm convert SRC DST``): args with src, dst, layout, config,
    prediction_type, dtype, allow_pickle, overwrite."""
    convert(args.src, args.dst, layout=args.layout, config=args.config,
            prediction_type=args.prediction_type, dtype=args.dtype,
            allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"wrote {args.dst} ({args.layout or default_layout(args.dst)} layout)")
    return 0
