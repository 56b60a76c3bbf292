"""``convert``: rewrite a checkpoint in the original single-file or the diffusers layout.

The source goes through the same path as :func:`load_model` (validation,
detection, strict shape check, finite weights), so a converted checkpoint is one
ldm can load. Output is always safetensors, written through
:func:`ldm.atomicio.atomic_path`, so a crash never leaves a half-written checkpoint
under the final name; what a killed run left is removed by the next one.

Convert only ever replaces its own kind of output: a destination that is, or is
inside, or contains the source is refused, and ``overwrite`` replaces only a
safetensors checkpoint (original layout) or a diffusers model folder.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

from ..atomicio import atomic_path, remove_temp_siblings
from ..config import ModelConfig
from .detect import METADATA_CONFIG_KEY
from .diffusers_folder import is_model_folder, write_folder
from .files import SAFETENSORS_SUFFIX, CheckpointError, read_safetensors_header, save_safetensors
from .keymap import UnmappedKeyError, add_prefix, apply_mapping
from .layouts import UNET_PREFIX, VAE_PREFIX, layout_of, text_parts
from .loading import LoadedModel, check_prediction_type, is_finite, load_parts, nonfinite_error, parse_dtype

logger = logging.getLogger("ldm")

LAYOUTS = ("original", "diffusers")


def internal_states(model: LoadedModel) -> dict[str, dict[str, torch.Tensor]]:
    """The modules' state dicts: already in diffusers key names (convention 2)."""
    return {name: module.state_dict() for name, module in model.modules().items()}


def original_state(config: ModelConfig, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One original-layout state dict (``model.diffusion_model.*``, ...) from internal ones
    (``states`` by component: unet, vae, text_encoder[, text_encoder_2])."""
    from .keymap_text import text_internal_to_original
    from .keymap_unet import unet_internal_to_original
    from .keymap_vae import vae_internal_to_original

    parts = text_parts(layout_of(config))
    expected = {"unet", "vae", *(part.component for part in parts)}
    if set(states) != expected:
        raise ValueError(f"states for a {layout_of(config)} model must be {sorted(expected)}, got {sorted(states)}")
    unet = apply_mapping(states["unet"], unet_internal_to_original(config.unet))
    vae = apply_mapping(states["vae"], vae_internal_to_original(config.vae))
    for name, mapped in (("unet", unet), ("vae", vae)):
        if mapped.unmapped:
            raise CheckpointError(f"internal {name} keys without an original name: {list(mapped.unmapped)[:5]}")
    out = {**add_prefix(unet, UNET_PREFIX), **add_prefix(vae, VAE_PREFIX)}
    for part in parts:
        try:
            text = text_internal_to_original(part.config(config), part.keys)(states[part.component])
        except UnmappedKeyError as exc:
            raise CheckpointError(f"internal {part.component} key without an original name: {exc}") from None
        out.update(add_prefix(text, part.prefix))
    return out


def original_metadata(config: ModelConfig) -> dict[str, str]:
    """safetensors metadata of original-layout files ldm writes: the full config,
    since heads, sample size and prediction type cannot be read from weights."""
    return {METADATA_CONFIG_KEY: json.dumps(config.to_dict()), "format": "pt"}


def check_layout(dst: Path, layout: str | None) -> str:
    """The layout to write: ``layout``, or by ``dst``'s name; a ``.safetensors`` name is
    always one file (original layout), any other name a diffusers folder."""
    is_file_name = dst.suffix == SAFETENSORS_SUFFIX
    layout = layout or ("original" if is_file_name else "diffusers")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not valid; valid values: {list(LAYOUTS)}")
    if layout == "original" and not is_file_name:
        raise ValueError(f"{dst}: original-layout output is one file and its name must end in .safetensors")
    if layout == "diffusers" and is_file_name:
        raise ValueError(f"{dst}: diffusers-layout output is a folder; its name must not end in .safetensors")
    return layout


def _overlap(src: Path, dst: Path) -> bool:
    a, b = src.resolve(), dst.resolve()
    if a == b or a in b.parents or b in a.parents:
        return True
    return dst.exists() and src.exists() and os.path.samefile(src, dst)


def _replaceable(dst: Path, layout: str) -> str | None:
    """None if ``dst`` is a previous convert output of ``layout`` (or an empty folder for
    a folder layout), else why it may not be replaced."""
    if layout == "diffusers":
        from .controlnet_file import is_controlnet_folder  # it imports this module

        if is_model_folder(dst) or is_controlnet_folder(dst) or (dst.is_dir() and not any(dst.iterdir())):
            return None
        return ("it is not a diffusers model folder (model_index.json, unet/, vae/, text_encoder/ or "
                "text_encoder_2/) nor a ControlNet folder (config.json of a ControlNetModel)")
    if dst.is_dir():
        return "it is a folder"
    try:
        read_safetensors_header(dst)
    except (CheckpointError, OSError):
        return "it is not a safetensors checkpoint"
    return None


def check_destination(dst: Path, layout: str, overwrite: bool, src: Path | None = None) -> None:
    """Refuse, before anything is read, a destination convert must not touch."""
    if src is not None and _overlap(src, dst):
        raise ValueError(f"{dst}: is, contains or lies inside the source {src}; choose a destination apart from it")
    if dst.is_symlink():
        raise FileExistsError(f"{dst}: is a symbolic link; convert does not replace links, choose another name")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"destination folder does not exist: {dst.parent}")
    if not dst.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    reason = _replaceable(dst, layout)
    if reason:
        raise FileExistsError(
            f"{dst}: not replaced even with --overwrite: {reason}, so it is not a previous convert "
            "output. Remove it yourself or choose another name"
        )


def _cast(states: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype | None,
          dst: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Cast floating weights to ``dtype``; refuse weights the cast makes infinite."""
    if dtype is None:
        return states  # as loaded, and loading refused non-finite weights
    out = {c: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}
           for c, s in states.items()}
    bad = [f"{c}.{k}" for c, s in out.items() for k, v in s.items() if not is_finite(v)]
    if bad:
        raise nonfinite_error(str(dst), bad, dtype)
    return out


def prepare_output(dst: str | Path, layout: str | None, dtype: torch.dtype | str | None,
                   overwrite: bool) -> tuple[Path, str, torch.dtype | None]:
    """``(dst, layout, dtype)`` for a save: the layout checked against (or chosen by) the
    name, the destination checked (:func:`check_destination`), and the temporary files a
    killed save left next to it removed."""
    dst = Path(dst)
    layout = check_layout(dst, layout)
    dtype = parse_dtype(dtype)
    check_destination(dst, layout, overwrite)
    for left in remove_temp_siblings(dst):
        logger.info("removed %s, left by an interrupted convert", left)
    return dst, layout, dtype


def save_model(model: LoadedModel, dst: str | Path, *, layout: Literal["original", "diffusers"] | None = None,
               dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write a loaded model as an original-layout ``.safetensors`` file or a diffusers folder.

    ``overwrite`` replaces only a previous output of the same layout (see module doc).
    """
    dst, layout, dtype = prepare_output(dst, layout, dtype, overwrite)
    states = _cast(internal_states(model), dtype, dst)
    with atomic_path(dst, folder=layout == "diffusers") as tmp:
        if layout == "original":
            save_safetensors(original_state(model.config, states), tmp, original_metadata(model.config))
        else:
            write_folder(tmp, model.config, states)
    logger.info("wrote %s (%s layout)", dst, layout)
    return dst


def convert(src: str | Path, dst: str | Path, *, layout: Literal["original", "diffusers"] | None = None,
            config: Any = None, prediction_type: str | None = None,
            dtype: torch.dtype | str | None = None, allow_pickle: bool = False,
            overwrite: bool = False) -> Path:
    """Read ``src`` (original-layout file or diffusers folder) and write ``dst``.

    ``layout``: ``original`` (one ``.safetensors`` file, with the config in its
    metadata) or ``diffusers`` (a folder); default from ``dst``'s name, which must
    end in ``.safetensors`` exactly for the original layout.
    ``config`` / ``prediction_type`` override detection as in :func:`load_model`.
    ``dtype``: store weights in this dtype (default: as stored in ``src``).
    Refuses a ``dst`` that overlaps ``src``, and an existing ``dst`` unless
    ``overwrite=True`` and it is a previous convert output.
    """
    src, dst = Path(src), Path(dst)
    layout = check_layout(dst, layout)
    check_prediction_type(prediction_type)
    dtype = parse_dtype(dtype)
    check_destination(dst, layout, overwrite, src)  # fail before the (slow) load
    model = load_parts(src, dtype=None, config=config, prediction_type=prediction_type,
                       allow_pickle=allow_pickle, check_memory=False)
    return save_model(model, dst, layout=layout, dtype=dtype, overwrite=overwrite)
