"""Reading and writing diffusers folders (``model_index.json``, ``unet/``, ``vae/``, ...).

Internal module keys are diffusers' own (DESIGN.md convention 2), so weights load
with at most the small fix-ups of :func:`diffusers_mappings`. Configs are
translated in :mod:`ldm.foreign_config`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..foreign_config import (
    schedule_from_diffusers, text_from_transformers, text_to_transformers, unet_from_diffusers,
    unet_to_diffusers, vae_from_diffusers, vae_to_diffusers,
)
from ..models.tokenizer import pad_token_from_hf, save_hf_tokenizer
from .detect import check_input_channels
from .files import (
    CheckpointError, TensorFile, check_regular_file, merge_tensor_files, open_tensor_file, save_safetensors,
)

logger = logging.getLogger("ldm")

# component folder -> weight file stem (diffusers for unet/vae, transformers for the text encoder)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_PICKLE_NAMES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                 "text_encoder": ("pytorch_model", "model")}
TEXT_TO_IMAGE_PIPELINE = "StableDiffusionPipeline"
INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
# Written into configs we save; diffusers reads it to decide on legacy behaviour only.
DIFFUSERS_VERSION = "0.30.0"


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (_present(path / "model_index.json") or (path / "unet").is_dir())


def is_model_folder(path: Path) -> bool:
    """A complete diffusers model folder (what ``convert`` writes): model_index.json
    and the unet/, vae/ and text_encoder/ subfolders."""
    return (path.is_dir() and not path.is_symlink() and (path / "model_index.json").is_file()
            and all((path / c).is_dir() for c in WEIGHT_STEMS))


def _present(path: Path) -> bool:
    """Exists as anything (a FIFO or a broken link too): what is there is then
    refused by name when read, never skipped as if absent."""
    return path.exists() or path.is_symlink()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        check_regular_file(path, "config file")
    except FileNotFoundError:
        raise FileNotFoundError(f"diffusers folder is missing {path}") from None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _translate(fn: Callable, data: dict, path: Path, *args: Any):
    try:
        return fn(data, *args)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def find_weights(folder: Path, component: str, *, allow_pickle: bool) -> TensorFile:
    """Open a component's weights: safetensors (plain, sharded, or ``.fp16`` variant);
    pickles (``.bin``) only on opt-in."""
    stem = WEIGHT_STEMS[component]
    sub = folder / component
    for variant in ("", ".fp16"):
        single = sub / f"{stem}{variant}.safetensors"
        if _present(single):
            return open_tensor_file(single)
        index = sub / f"{stem}{variant}.safetensors.index.json"
        if _present(index):
            return _open_sharded(index, allow_pickle)
    pickles = [sub / f"{name}{variant}.bin" for name in _PICKLE_NAMES[component] for variant in ("", ".fp16")]
    for path in pickles:
        if _present(path):
            return open_tensor_file(path, allow_pickle=allow_pickle)
    if not sub.is_dir():
        raise FileNotFoundError(f"diffusers folder {folder} has no {component}/ folder")
    raise FileNotFoundError(
        f"{sub}: no weights found (looked for {stem}.safetensors, {stem}.fp16.safetensors, "
        f"sharded {stem}.safetensors.index.json, {pickles[0].name})"
    )


def _open_sharded(index: Path, allow_pickle: bool) -> TensorFile:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no weight_map")
    names = set(weight_map.values())
    # Shards live next to their index: a name with a folder in it could read any file.
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
    if bad:
        raise CheckpointError(f"{index}: weight_map names {bad[:3]} are not plain file names in {index.parent}")
    shards = [open_tensor_file(index.parent / name, allow_pickle=allow_pickle) for name in sorted(names)]
    return merge_tensor_files(index, shards)


def _refuse_pipeline(folder: Path, index: dict[str, Any]) -> None:
    name = str(index.get("_class_name", ""))
    if "XL" in name or "text_encoder_2" in index:
        raise CheckpointError(f"{folder}: this is an SDXL pipeline ({name or 'text_encoder_2'}); SDXL is not supported yet")
    for component in ("unet", "vae", "text_encoder"):
        entry = index.get(component)
        if component in index and (not isinstance(entry, list) or entry[-1] is None):
            raise CheckpointError(f"{folder}: model_index.json has no {component} ({entry!r})")


def text_family(hidden_act: str) -> str:
    """Family of a diffusers folder, from its text encoder: OpenCLIP (SD2) uses gelu,
    OpenAI CLIP (SD1) quick_gelu. It selects the original-layout text key map."""
    return "sd2" if hidden_act == "gelu" else "sd1"


def read_folder_config(folder: Path) -> tuple[ModelConfig, str]:
    """ModelConfig of a diffusers folder and the rule for its prediction type."""
    index_path = folder / "model_index.json"
    if _present(index_path):
        _refuse_pipeline(folder, _read_json(index_path))
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    text_path = folder / "text_encoder" / "config.json"
    unet = _translate(unet_from_diffusers, _read_json(unet_path), unet_path)
    vae = _translate(vae_from_diffusers, _read_json(vae_path), vae_path)
    text_data = _read_json(text_path)
    family = text_family(str(text_data.get("hidden_act", "quick_gelu")))
    tokenizer = folder / "tokenizer"
    pad = pad_token_from_hf(tokenizer) if tokenizer.is_dir() else ("zero" if family == "sd2" else "eos")
    text = _translate(text_from_transformers, text_data, text_path, pad)
    check_input_channels(unet.in_channels, vae.latent_channels, str(unet_path))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule: dict[str, Any] = {}
    if _present(sched_path):
        schedule = _translate(schedule_from_diffusers, _read_json(sched_path), sched_path)
    if "prediction_type" in schedule:
        rule = "prediction_type in scheduler/scheduler_config.json"
    else:
        rule = "no prediction_type in scheduler config: diffusers' default epsilon"
    try:
        config = ModelConfig(family=family, unet=unet, vae=vae, text=text, **schedule)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: inconsistent configs: {exc}") from None
    return config, rule


# --- writing -------------------------------------------------------------------


def scheduler_config(config: ModelConfig) -> dict[str, Any]:
    """A DDIMScheduler config carrying the model's training schedule (what SD2 ships)."""
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": config.num_train_timesteps,
        "beta_start": config.beta_start,
        "beta_end": config.beta_end,
        "beta_schedule": config.beta_schedule,
        "prediction_type": config.prediction_type,
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
    }


def pipeline_class(config: ModelConfig) -> str:
    """The diffusers pipeline class a folder of this model names: an inpainting
    U-Net needs the pipeline that feeds it the mask and the masked image."""
    return INPAINT_PIPELINE if config.is_inpainting else TEXT_TO_IMAGE_PIPELINE


def model_index(scheduler_class: str = "DDIMScheduler", pipeline: str = TEXT_TO_IMAGE_PIPELINE) -> dict[str, Any]:
    """model_index.json of a text-to-image or inpainting folder (no safety checker)."""
    return {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_folder(folder: Path, config: ModelConfig, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write a complete diffusers folder into ``folder`` (a fresh, temporary path)."""
    _write_json(folder / "model_index.json", model_index(pipeline=pipeline_class(config)))
    _write_json(folder / "unet" / "config.json",
                {**unet_to_diffusers(config.unet), "_diffusers_version": DIFFUSERS_VERSION})
    _write_json(folder / "vae" / "config.json",
                {**vae_to_diffusers(config.vae), "_diffusers_version": DIFFUSERS_VERSION})
    _write_json(folder / "text_encoder" / "config.json", text_to_transformers(config.text))
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(config))
    save_hf_tokenizer(folder / "tokenizer", config.text.pad_token)
    for component, state in states.items():
        save_safetensors(state, folder / component / f"{WEIGHT_STEMS[component]}.safetensors")


# --- key fix-ups -----------------------------------------------------------------

# diffusers < 0.14 named the VAE mid-block attention's parameters differently.
_OLD_VAE_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _vae_diffusers_to_internal(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    head, sep, tail = key.partition(".attentions.0.")
    if sep:
        for old, new in _OLD_VAE_ATTENTION.items():
            if tail.startswith(old):
                return [(head + sep + new + tail[len(old):], tensor)]
    return [(key, tensor)]


def _same(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(key, tensor)]


def diffusers_mappings() -> dict[str, Callable]:
    """Per-component key maps from diffusers folders to internal keys."""
    from .keymap_text import text_diffusers_to_internal

    return {"unet": _same, "vae": _vae_diffusers_to_internal, "text_encoder": text_diffusers_to_internal}
