"""Reading and writing diffusers folders (``model_index.json``, ``unet/``, ``vae/``, ...).

Internal module keys are diffusers' own (DESIGN.md convention 2), so weights load
with at most the small fix-ups of :func:`diffusers_mappings`. Configs are
translated in :mod:`ldm.foreign_config`. Which subfolder holds which text encoder
and tokenizer is the layout's (:mod:`ldm.checkpoints.layouts`): SDXL base has
``text_encoder/`` + ``tokenizer/`` (CLIP ViT-L) and ``text_encoder_2/`` +
``tokenizer_2/`` (OpenCLIP ViT-bigG, with its projection); the refiner has only the
latter (``model_index.json`` lists ``text_encoder`` as null), which is ldm's ``text``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import ModelConfig, UNetConfig
from ..foreign_config import (
    schedule_from_diffusers, text_from_transformers, text_to_transformers, unet_from_diffusers,
    unet_to_diffusers, vae_from_diffusers, vae_to_diffusers,
)
from ..models.tokenizer import pad_token_from_hf, save_hf_tokenizer
from ..samplers.lcm import ORIGINAL_INFERENCE_STEPS, TIMESTEP_SCALING
from .detect import check_input_channels
from .files import (
    CheckpointError, TensorFile, check_regular_file, merge_tensor_files, open_tensor_file, save_safetensors,
)
from .layouts import TextPart, layout_of, text_parts

logger = logging.getLogger("ldm")

# component folder -> weight file stem (diffusers for unet/vae, transformers for the text encoders)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                "text_encoder_2": "model"}
_PICKLE_NAMES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                 "text_encoder": ("pytorch_model", "model"), "text_encoder_2": ("pytorch_model", "model")}
TEXT_TO_IMAGE_PIPELINE = "StableDiffusionPipeline"
INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
XL_PIPELINE = "StableDiffusionXLPipeline"
XL_IMG2IMG_PIPELINE = "StableDiffusionXLImg2ImgPipeline"  # the refiner's
XL_INPAINT_PIPELINE = "StableDiffusionXLInpaintPipeline"
# A guidance-distilled SD 1.x/2.x model (LCM), as its releases ship it, with LCMScheduler.
LCM_PIPELINE = "LatentConsistencyModelPipeline"
LCM_SCHEDULER = "LCMScheduler"
# Written into configs we save; diffusers reads it to decide on legacy behaviour only.
DIFFUSERS_VERSION = "0.30.0"


# Weight files of a diffusers model folder (unet/, vae/, a ControlNet), in diffusers' order of preference.
MODEL_WEIGHTS = tuple(f"diffusion_pytorch_model{variant}{suffix}" for suffix in (".safetensors", ".bin")
                      for variant in ("", ".fp16"))


def model_weights(folder: Path, what: str) -> Path:
    """The weight file of a diffusers model folder; FileNotFoundError naming ``what`` otherwise."""
    for name in MODEL_WEIGHTS:
        if _present(folder / name):
            return folder / name
    raise FileNotFoundError(f"{folder}: no {what} weights found (looked for {', '.join(MODEL_WEIGHTS)})")


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (_present(path / "model_index.json") or (path / "unet").is_dir())


def is_model_folder(path: Path) -> bool:
    """A complete diffusers model folder (what ``convert`` writes): model_index.json,
    the unet/ and vae/ subfolders and a text encoder's (text_encoder/, or the SDXL
    refiner's text_encoder_2/)."""
    return (path.is_dir() and not path.is_symlink() and (path / "model_index.json").is_file()
            and all((path / c).is_dir() for c in ("unet", "vae"))
            and any((path / c).is_dir() for c in ("text_encoder", "text_encoder_2")))


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


def _translate(fn: Callable, data: dict, path: Path, *args: Any, **kwargs: Any):
    try:
        return fn(data, *args, **kwargs)
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


def _check_index(folder: Path, index: dict[str, Any]) -> None:
    for component in ("unet", "vae"):
        if component in index and _listed(index, component) is None:
            raise CheckpointError(f"{folder}: model_index.json has no {component} ({index[component]!r})")


def _listed(index: dict[str, Any], component: str) -> bool | None:
    """model_index.json's word on a component: True (a class), False (null), None (malformed);
    absent: None as well, see :func:`_declared`."""
    entry = index.get(component)
    if not isinstance(entry, list) or not entry:
        return None
    return entry[-1] is not None


def _declared(folder: Path, index: dict[str, Any], component: str) -> bool:
    """Whether a folder has ``component``: model_index.json's entry when it has one
    (a null entry: no), else whether the subfolder exists."""
    if component in index:
        listed = _listed(index, component)
        if listed is None:
            raise CheckpointError(f"{folder}: model_index.json entry {component} is {index[component]!r}, "
                                  "expected [library, class] or [null, null]")
        return listed
    return _present(folder / component)


def text_family(hidden_act: str) -> str:
    """Family of an SD1/SD2 diffusers folder, from its text encoder: OpenCLIP (SD2) uses
    gelu, OpenAI CLIP (SD1) quick_gelu. It selects the original-layout text key map."""
    return "sd2" if hidden_act == "gelu" else "sd1"


def _sdxl_layout(folder: Path, index: dict[str, Any]) -> str:
    """``sdxl`` (base: text_encoder/ and text_encoder_2/) or ``sdxl-refiner`` (only
    text_encoder_2/) for a folder whose U-Net takes a pooled text embedding."""
    first, second = (_declared(folder, index, c) for c in ("text_encoder", "text_encoder_2"))
    if not (first or second):
        raise CheckpointError(f"{folder}: an SDXL folder (its U-Net takes a pooled text embedding) with no "
                              "text encoder: neither text_encoder/ nor text_encoder_2/")
    layout = "sdxl" if first else "sdxl-refiner"
    for part in text_parts(layout):
        if not (folder / part.folder).is_dir():
            model = "an SDXL base model (it has text_encoder/)" if layout == "sdxl" else "an SDXL refiner"
            raise CheckpointError(
                f"{folder}: is {model} but has no {part.folder}/ folder; SDXL needs its OpenCLIP "
                f"ViT-bigG encoder there (with {part.tokenizer}/). Copy it from the model's release"
            )
    return layout


def _sd_layout(folder: Path, index: dict[str, Any]) -> str:
    if _declared(folder, index, "text_encoder_2"):
        raise CheckpointError(
            f"{folder}: has a second text encoder (text_encoder_2) but its U-Net takes no pooled text "
            "embedding (unet/config.json has no addition_embed_type 'text_time'): the folder mixes "
            "SDXL and SD 1.x/2.x parts"
        )
    if "text_encoder" in index and not _listed(index, "text_encoder"):
        raise CheckpointError(f"{folder}: model_index.json has no text_encoder ({index['text_encoder']!r})")
    text_path = folder / "text_encoder" / "config.json"
    return text_family(str(_read_json(text_path).get("hidden_act", "quick_gelu")))


def _read_text(folder: Path, part: TextPart):
    path = folder / part.folder / "config.json"
    data = _read_json(path)
    tokenizer = folder / part.tokenizer
    default = "zero" if data.get("hidden_act") == "gelu" else "eos"  # OpenCLIP pads with 0
    pad = pad_token_from_hf(tokenizer) if tokenizer.is_dir() else default
    return _translate(text_from_transformers, data, path, pad, hidden_layer=part.hidden_layer)


def _check_aesthetics(folder: Path, index: dict[str, Any], config: ModelConfig) -> None:
    """diffusers' SDXL pipelines build 5 size ids with an aesthetic score when
    ``requires_aesthetics_score`` is set, else 6: it must agree with the U-Net."""
    flag = index.get("requires_aesthetics_score")
    if not isinstance(flag, bool) or config.size_conditioning is None:
        return
    if flag != (config.size_conditioning == "aesthetic"):
        ids = 5 if config.size_conditioning == "aesthetic" else 6
        raise CheckpointError(
            f"{folder}: model_index.json has requires_aesthetics_score={flag} but the U-Net's added "
            f"embedding takes {ids} ids ({config.size_conditioning} conditioning)"
        )


def read_folder_config(folder: Path) -> tuple[ModelConfig, str]:
    """ModelConfig of a diffusers folder and the rule for its prediction type."""
    index_path = folder / "model_index.json"
    index = _read_json(index_path) if _present(index_path) else {}
    _check_index(folder, index)
    unet_path, vae_path = folder / "unet" / "config.json", folder / "vae" / "config.json"
    unet: UNetConfig = _translate(unet_from_diffusers, _read_json(unet_path), unet_path)
    vae = _translate(vae_from_diffusers, _read_json(vae_path), vae_path)
    layout = _sd_layout(folder, index) if unet.addition_embed_type is None else _sdxl_layout(folder, index)
    texts = {part.field: _read_text(folder, part) for part in text_parts(layout)}
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
        config = ModelConfig(family=layout, unet=unet, vae=vae, **texts, **schedule)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder}: inconsistent configs: {exc}") from None
    _check_aesthetics(folder, index, config)
    return config, rule


# --- writing -------------------------------------------------------------------


def _scheduler_class(config: ModelConfig) -> str:
    return LCM_SCHEDULER if pipeline_class(config) == LCM_PIPELINE else "DDIMScheduler"


def scheduler_config(config: ModelConfig) -> dict[str, Any]:
    """A DDIMScheduler config carrying the model's training schedule (what SD2 ships); for a
    guidance-distilled model an LCMScheduler one (LCM's releases), with its origin schedule."""
    lcm = {"original_inference_steps": ORIGINAL_INFERENCE_STEPS, "timestep_scaling": TIMESTEP_SCALING} \
        if _scheduler_class(config) == LCM_SCHEDULER else {}
    return {
        "_class_name": _scheduler_class(config),
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
    } | lcm | ({"timestep_spacing": config.timestep_spacing} if config.timestep_spacing else {})


def pipeline_class(config: ModelConfig) -> str:
    """The diffusers pipeline class a folder of this model names: an inpainting
    U-Net needs the pipeline that feeds it the mask and the masked image, the SDXL
    refiner the one that feeds it an image and an aesthetic score."""
    layout = layout_of(config)
    if layout in ("sd1", "sd2"):
        if config.is_inpainting:
            return INPAINT_PIPELINE
        return LCM_PIPELINE if config.unet.time_cond_proj_dim is not None else TEXT_TO_IMAGE_PIPELINE
    if config.is_inpainting:
        return XL_INPAINT_PIPELINE
    return XL_IMG2IMG_PIPELINE if layout == "sdxl-refiner" else XL_PIPELINE


def _text_class(config: ModelConfig, part: TextPart) -> str:
    return "CLIPTextModelWithProjection" if part.config(config).projection_dim else "CLIPTextModel"


def model_index(scheduler_class: str = "DDIMScheduler", pipeline: str = TEXT_TO_IMAGE_PIPELINE,
                config: ModelConfig | None = None) -> dict[str, Any]:
    """model_index.json of a folder (no safety checker); ``config`` None: an SD 1.x/2.x one.

    SDXL folders list ``text_encoder_2`` / ``tokenizer_2`` (the refiner lists
    ``text_encoder`` / ``tokenizer`` as null) and the flags diffusers' SDXL pipelines
    take: ``force_zeros_for_empty_prompt`` (the base's release: an empty negative
    prompt is all zeros) and ``requires_aesthetics_score`` (the refiner's 5 ids).
    """
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", scheduler_class],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    layout = "sd1" if config is None else layout_of(config)
    if layout in ("sd1", "sd2"):
        return {**index, "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
                "feature_extractor": [None, None], "requires_safety_checker": False}
    assert config is not None
    index.update({"text_encoder": [None, None], "tokenizer": [None, None]})
    for part in text_parts(layout):
        index[part.folder] = ["transformers", _text_class(config, part)]
        index[part.tokenizer] = ["transformers", "CLIPTokenizer"]
    refiner = config.size_conditioning == "aesthetic"
    index["force_zeros_for_empty_prompt"] = not refiner
    if pipeline != XL_PIPELINE:  # the text-to-image pipeline has no such argument
        index["requires_aesthetics_score"] = refiner
    return index


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_folder(folder: Path, config: ModelConfig, states: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write a complete diffusers folder into ``folder`` (a fresh, temporary path).

    ``states``: the internal state dicts by component (unet, vae, text_encoder[, _2]).
    """
    parts = text_parts(layout_of(config))
    folders = folder_of(config)
    unknown = sorted(set(states) - set(folders))
    if unknown:
        raise ValueError(f"components {unknown} have no place in a {layout_of(config)} folder; "
                         f"expected {sorted(folders)}")
    _write_json(folder / "model_index.json",
                model_index(_scheduler_class(config), pipeline=pipeline_class(config), config=config))
    _write_json(folder / "unet" / "config.json",
                {**unet_to_diffusers(config.unet), "_diffusers_version": DIFFUSERS_VERSION})
    _write_json(folder / "vae" / "config.json",
                {**vae_to_diffusers(config.vae), "_diffusers_version": DIFFUSERS_VERSION})
    for part in parts:
        _write_json(folder / part.folder / "config.json", text_to_transformers(part.config(config)))
        save_hf_tokenizer(folder / part.tokenizer, part.config(config).pad_token)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler_config(config))
    for component, state in states.items():
        sub = folders[component]
        save_safetensors(state, folder / sub / f"{WEIGHT_STEMS[sub]}.safetensors")


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

    return {"unet": _same, "vae": _vae_diffusers_to_internal, "text_encoder": text_diffusers_to_internal,
            "text_encoder_2": text_diffusers_to_internal}


def folder_of(config: ModelConfig) -> dict[str, str]:
    """Internal component -> the subfolder of a diffusers folder that holds it."""
    return {"unet": "unet", "vae": "vae", **{p.component: p.folder for p in text_parts(layout_of(config))}}
