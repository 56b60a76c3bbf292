"""ControlNet files: load, save, convert, and check that one fits a model.

What loads (:func:`load_controlnet`):

- an original single file, as lllyasviel's ControlNet 1.0 / 1.1 releases are: keys under
  ``control_model.`` (:mod:`ldm.checkpoints.keymap_controlnet`), or the same keys without
  the prefix (e.g. SD 2.1 ControlNets). The 1.0 files also bundle the whole SD 1.5 model
  they were trained with (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.*``, the DDPM buffers): that copy is skipped on purpose, with a log
  line; any other key is refused with the rest of the key report;
- a diffusers ``ControlNetModel`` folder: ``config.json`` and
  ``diffusion_pytorch_model.safetensors`` (or ``.fp16.safetensors``; ``.bin`` with
  ``allow_pickle``);
- ``.pth`` / ``.ckpt`` / ``.pt`` / ``.bin`` files only with ``allow_pickle``, read with
  ``torch.load(weights_only=True)``.

The config, in order: the caller's ``config=``; ldm's ``ldm.controlnet_config`` metadata
(written by :func:`save_controlnet`); a folder's ``config.json``; else the shapes: the
context width (768: an SD 1.x ControlNet, 1024: SD 2.x) picks the preset, whose every
derivable field must then match. The shuffle ControlNet's ``global_pool_conditions`` is
in no weight: a folder's config.json says it, and for a file its name does, by ComfyUI's
rule (the stem ends in ``_shuffle`` or ``_shuffle_fp16``). Every decision is logged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..atomicio import atomic_path
from ..config import CONTROLNET_FAMILIES, CONTROLNET_PRESETS, ControlNetConfig, ModelConfig, UNetConfig, with_changes
from ..dtypes import parse_dtype
from ..foreign_config import unet_from_diffusers, unet_to_diffusers
from ..models.controlnet import ControlNetModel
from .convert import _cast, check_destination, check_layout, prepare_output
from .diffusers_folder import DIFFUSERS_VERSION, _present, _read_json, model_weights
from .files import CheckpointError, TensorFile, open_tensor_file, save_safetensors
from .keymap import add_prefix, apply_mapping
from .keymap_controlnet import CONTROL_PREFIX, architecture_of, controlnet_architecture, controlnet_mappings
from .layouts import SD_TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, is_ignored
from .loading import _check_shapes, _load_part, _Part, _Plan, name_some, nonfinite_error

logger = logging.getLogger("ldm")

METADATA_KEY = "ldm.controlnet_config"
CONFIG_CLASS = "ControlNetModel"
WEIGHT_STEM = "diffusion_pytorch_model"
# The bundled base model of the ControlNet 1.0 releases (skipped on purpose).
BUNDLED_PREFIXES = (UNET_PREFIX, VAE_PREFIX, SD_TEXT_PREFIX)
# Context width -> the family of the U-Net a ControlNet was copied from.
WIDTH_FAMILIES = {768: "sd1", 1024: "sd2"}
# ComfyUI's rule for the shuffle ControlNet's global pooling (comfy/controlnet.py).
SHUFFLE_STEMS = ("_shuffle", "_shuffle_fp16")


@dataclass
class LoadedControlNet:
    """A loaded ControlNet: config, model (eval mode), where it came from and in which layout."""

    config: ControlNetConfig
    model: ControlNetModel
    source: str
    layout: Literal["original", "diffusers"]


# --- configs -------------------------------------------------------------------------

# diffusers ControlNetModel config.json keys of ControlNet's own; every other key it has
# is a UNet2DConditionModel key, translated (or refused) by unet_from_diffusers.
_OWN_KEYS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
             "controlnet_conditioning_channel_order")
# UNet2DConditionModel keys a ControlNet config does not have (they describe the up path).
_UP_PATH_KEYS = ("up_block_types", "out_channels", "center_input_sample", "conv_out_kernel",
                 "reverse_transformer_layers_per_block")


def controlnet_family(unet: UNetConfig) -> tuple[str, str]:
    """The family of the U-Net a ControlNet was copied from, and the rule that says so:
    its context width (768: sd1, 1024: sd2), else its projection (conv: sd1, linear: sd2)."""
    width = unet.cross_attention_dim
    if width in WIDTH_FAMILIES:
        return WIDTH_FAMILIES[width], f"context width {width}"
    family = "sd2" if unet.use_linear_projection else "sd1"
    projection = "linear" if unet.use_linear_projection else "conv"
    return family, f"context width {width} is neither 768 nor 1024; {projection} proj_in"


def _mirrored(down_block_types: Any) -> tuple[str, ...]:
    """The up path of the U-Net a ControlNet was copied from (its config has none)."""
    return tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                 for t in reversed(list(down_block_types)))


def controlnet_from_diffusers(data: dict[str, Any]) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ControlNetModel ``config.json`` dict."""
    where = "controlnet config.json"
    if data.get("_class_name", CONFIG_CLASS) != CONFIG_CLASS:
        raise ValueError(f"{where}: _class_name is {data['_class_name']!r}, not {CONFIG_CLASS}")
    up_path = sorted(k for k in _UP_PATH_KEYS if k in data)
    if up_path:
        raise ValueError(f"{where}: has U-Net keys {up_path}; a {CONFIG_CLASS} config has no up path")
    order = data.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"{where}: controlnet_conditioning_channel_order={order!r} is not supported (only 'rgb')")
    unet_keys = {k: v for k, v in data.items() if k not in _OWN_KEYS}
    down = unet_keys.get("down_block_types", UNetConfig.down_block_types)
    unet = unet_from_diffusers({**unet_keys, "up_block_types": list(_mirrored(down))})
    if unet.addition_embed_type is not None:
        raise ValueError(f"{where}: an SDXL ControlNet (addition_embed_type {unet.addition_embed_type!r}); "
                         "SDXL ControlNets are not supported yet")
    if unet.time_cond_proj_dim is not None:
        raise ValueError(f"{where}: time_cond_proj_dim={unet.time_cond_proj_dim!r} (a guidance-embedding ControlNet) "
                         "is not supported (only None)")
    own = {k: data[k] for k in _OWN_KEYS[:3] if data.get(k) is not None}
    if "conditioning_embedding_out_channels" in own:
        own["conditioning_embedding_out_channels"] = tuple(own["conditioning_embedding_out_channels"])
    return ControlNetConfig(unet=unet, family=controlnet_family(unet)[0], **own)


def controlnet_to_diffusers(config: ControlNetConfig) -> dict[str, Any]:
    """The diffusers ControlNetModel ``config.json`` dict for a ControlNetConfig."""
    unet = {k: v for k, v in unet_to_diffusers(config.unet).items()
            if k not in ("up_block_types", "out_channels", "sample_size")}
    return {
        **unet,
        "_class_name": CONFIG_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "conditioning_channels": config.conditioning_channels,
        "conditioning_embedding_out_channels": list(config.conditioning_embedding_out_channels),
        "global_pool_conditions": config.global_pool_conditions,
        "controlnet_conditioning_channel_order": "rgb",
    }


def load_controlnet_config(source: ControlNetConfig | dict | str) -> ControlNetConfig:
    """A ControlNetConfig from itself, a dict (:meth:`ControlNetConfig.to_dict`'s form) or
    a preset name (``sd1``, ``sd2``)."""
    if isinstance(source, ControlNetConfig):
        return source
    if isinstance(source, dict):
        return ControlNetConfig.from_dict(source)
    if isinstance(source, str) and source in CONTROLNET_PRESETS:
        return CONTROLNET_PRESETS[source]
    raise ValueError(f"ControlNet config {source!r:.80} is neither a ControlNetConfig, a dict nor a preset "
                     f"({', '.join(CONTROLNET_PRESETS)})")


def check_controlnet_fits(cn_config: ControlNetConfig, model_config: ModelConfig) -> None:
    """ValueError, naming both families and context widths, unless a ControlNet of
    ``cn_config`` can feed a model of ``model_config``: the same context width, and
    residuals of the shapes of its U-Net's skips (levels, channels, layers per block) on
    its latents (an inpainting model's ControlNet takes the plain latents, as in diffusers),
    the same transformer projections, and for an SD 1.x / 2.x model the same family."""
    if not isinstance(cn_config, ControlNetConfig):
        raise TypeError(f"cn_config must be a ControlNetConfig, got {type(cn_config).__name__}")
    if not isinstance(model_config, ModelConfig):
        raise TypeError(f"model_config must be a ModelConfig, got {type(model_config).__name__}")
    cn, unet = cn_config.unet, model_config.unet
    projection = {False: "conv", True: "linear"}
    family = model_config.family if model_config.family in CONTROLNET_FAMILIES else cn_config.family
    wrong = [f"{name} {mine} vs {theirs}" for name, mine, theirs in (
        ("family", cn_config.family, family),
        ("context width", cn.cross_attention_dim, unet.cross_attention_dim),
        ("proj_in", projection[cn.use_linear_projection], projection[unet.use_linear_projection]),
        ("channels", cn.block_out_channels, unet.block_out_channels),
        ("layers per block", cn.layers_per_block, unet.layers_per_block),
        ("input channels", cn.in_channels, model_config.vae.latent_channels),
        ("added embedding", cn.addition_embed_type, unet.addition_embed_type),
    ) if mine != theirs]
    if wrong:
        raise ValueError(
            f"this ControlNet is for {cn_config.family} models (context width {cn.cross_attention_dim}) and does not "
            f"fit this {model_config.family} model (context width {unet.cross_attention_dim}): ControlNet vs model "
            f"{'; '.join(wrong)}. Use a ControlNet trained for {model_config.family}")


# --- what a path holds ---------------------------------------------------------------


def _folder_class(path: Path) -> str | None:
    if not (path / "config.json").is_file():  # a FIFO would block the read
        return None
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("_class_name") if isinstance(data, dict) else None


def is_controlnet_folder(path: str | Path) -> bool:
    """A diffusers ControlNetModel folder (config.json naming the class), not through a link."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and _folder_class(path) == CONFIG_CLASS


def _is_controlnet_keys(keys: Any) -> bool:
    return any(k.startswith(CONTROL_PREFIX) or k.startswith("controlnet_cond_embedding.")
               or k == "input_hint_block.0.weight" for k in keys)


def is_controlnet(path: str | Path, *, allow_pickle: bool = False) -> bool:
    """Whether ``path`` holds a ControlNet (what ``ldm convert`` checks first). Only the
    header of a safetensors file is read; a pickle is opened only with ``allow_pickle``;
    what cannot be read is not a ControlNet here (the model loader then says why)."""
    path = Path(path)
    if path.is_dir():
        return is_controlnet_folder(path)
    try:
        return _is_controlnet_keys(open_tensor_file(path, allow_pickle=allow_pickle).shapes)
    except (CheckpointError, OSError):
        return False


def _not_a_controlnet(keys: list[str], path: Path) -> CheckpointError:
    if any(k.startswith(UNET_PREFIX) for k in keys):
        what = "a Stable Diffusion checkpoint (model.diffusion_model.*), not a ControlNet; load it as the model"
    elif any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        what = "a LoRA file, not a ControlNet"
    elif any(k.startswith("controlnet_cond_embedding.") for k in keys):
        what = (f"a diffusers ControlNet's weights alone; pass the folder that holds them with its config.json "
                f"({CONFIG_CLASS})")
    else:
        what = f"not a ControlNet (no {CONTROL_PREFIX}* or input_hint_block keys; found {keys[:3]} ...)"
    return CheckpointError(f"{path}: {what}")


def _refuse_variants(keys: list[str], path: Path) -> None:
    """ControlNet kinds ldm does not implement, by their marker keys (ComfyUI's)."""
    if "lora_controlnet" in keys:
        raise CheckpointError(f"{path}: a Control-LoRA (key 'lora_controlnet'); Control-LoRAs are not supported")
    if "difference" in keys:
        raise CheckpointError(f"{path}: a 'difference' ControlNet (deltas against a base model, key 'difference'); "
                              "not supported: use a plain ControlNet file")


# --- planning (headers only) -----------------------------------------------------------


def detect_controlnet(shapes: dict[str, Any], metadata: dict[str, str] | None = None,
                      path: str | Path = "ControlNet") -> tuple[ControlNetConfig, str]:
    """The config of an original-layout ControlNet from its keys (prefix stripped) and
    shapes (or tensors), and the rule that decided it (see the module doc); ``path``
    names the file in errors and, for the shuffle rule, by its name."""
    path = Path(path)
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is not None:
        try:
            return ControlNetConfig.from_dict(json.loads(raw)), f"{METADATA_KEY} metadata in the file"
        except (ValueError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: invalid {METADATA_KEY} metadata: {exc}") from None
    try:
        arch = controlnet_architecture(shapes)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a complete ControlNet: {exc}") from None
    if arch["unet.addition_embed_type"] is not None:
        raise CheckpointError(f"{path}: an SDXL ControlNet (label_emb: pooled text and size ids); "
                              "SDXL ControlNets are not supported yet")
    width = arch["unet.cross_attention_dim"]
    if width not in WIDTH_FAMILIES:
        raise CheckpointError(
            f"{path}: context width {width} fits no ControlNet preset (768: sd1, 1024: sd2) and the file has no "
            f"{METADATA_KEY} metadata; pass config= (a ControlNetConfig or dict) to load it")
    family = WIDTH_FAMILIES[width]
    preset = CONTROLNET_PRESETS[family]
    expected = architecture_of(preset)
    wrong = [f"{k}: weights {v!r}, preset {expected[k]!r}" for k, v in arch.items() if expected[k] != v]
    if wrong:
        raise CheckpointError(f"{path}: context width {width} says {family}, but the weights differ from the {family} "
                              f"ControlNet in {'; '.join(wrong)}; pass config= to load it")
    rule = f"context width {width}"
    if path.stem.lower().endswith(SHUFFLE_STEMS):
        preset = with_changes(preset, global_pool_conditions=True)
        rule += "; the file name ends in _shuffle: global pooling (ComfyUI's rule)"
    return preset, rule


def _plan_file(path: Path, config: Any, allow_pickle: bool) -> _Plan:
    file = open_tensor_file(path, allow_pickle=allow_pickle)
    keys = file.keys()
    _refuse_variants(keys, path)
    if any(k.startswith(CONTROL_PREFIX) for k in keys):
        prefix = CONTROL_PREFIX
    elif "input_hint_block.0.weight" in file.shapes:
        prefix = ""
    else:
        raise _not_a_controlnet(keys, path)
    mine = [k for k in keys if k.startswith(prefix)]
    rest = [k for k in keys if not k.startswith(prefix)]
    ignored = [k for k in rest if k.startswith(BUNDLED_PREFIXES) or is_ignored(k)]
    unknown = [k for k in rest if k not in set(ignored)]
    shapes = {k[len(prefix):]: file.shapes[k] for k in mine}
    chosen = _resolve(lambda: detect_controlnet(shapes, file.metadata, path), config, path)
    part = _Part(file, mine, prefix, controlnet_mappings(chosen)[0])
    return _Plan(chosen, {"controlnet": part}, "original", ignored, unknown)


def _folder_weights(path: Path, allow_pickle: bool) -> TensorFile:
    return open_tensor_file(model_weights(path, "ControlNet"), allow_pickle=allow_pickle)


def _plan_folder(path: Path, config: Any, allow_pickle: bool) -> _Plan:
    config_path = path / "config.json"
    if not _present(config_path):
        kind = "a diffusers model folder" if (path / "model_index.json").is_file() else "a folder"
        raise CheckpointError(f"{path}: {kind} without config.json; expected a ControlNet file or a diffusers "
                              f"{CONFIG_CLASS} folder")
    data = _read_json(config_path)

    def detect() -> tuple[ControlNetConfig, str]:
        try:
            found = controlnet_from_diffusers(data)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{config_path}: {exc}") from None
        return found, f"config.json, {controlnet_family(found.unet)[1]}"

    chosen = _resolve(detect, config, path)
    file = _folder_weights(path, allow_pickle)
    return _Plan(chosen, {"controlnet": _Part(file, file.keys(), "", lambda key, tensor: [(key, tensor)])},
                 "diffusers")


def _resolve(detect: Any, config: Any, path: Path) -> ControlNetConfig:
    """The caller's config if given (detection then only informs the log line), else the
    detected one; logged either way."""
    if config is None:
        chosen, rule = detect()
        logger.info("detected a ControlNet for %s (%s) from %s", chosen.family, rule, path)
        return chosen
    try:
        chosen = load_controlnet_config(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the config given for it is not valid: {exc}") from None
    try:
        found = "detected {0.family}, {1}".format(*detect())
    except CheckpointError as exc:
        found = f"not detected: {exc}"
    logger.info("config override for %s: a ControlNet for %s (%s)", path, chosen.family, found)
    return chosen


def _plan(path: Path, config: Any, allow_pickle: bool) -> _Plan:
    """What to load, from headers and names only; ``_Plan.config`` is the ControlNetConfig."""
    if not _present(path):
        raise FileNotFoundError(f"ControlNet not found: {path}")
    if path.is_dir():
        return _plan_folder(path, config, allow_pickle)
    return _plan_file(path, config, allow_pickle)


# --- loading -----------------------------------------------------------------------------


def _load(path: Path, device: str | torch.device, dtype: torch.dtype | None, allow_pickle: bool,
          config: Any) -> LoadedControlNet:
    plan = _plan(path, config, allow_pickle)
    try:
        with torch.device("meta"):
            model = ControlNetModel(plan.config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot build the ControlNet from its config: {exc}") from None
    _check_shapes(plan, {"controlnet": model}, path, f"{plan.config.family} ControlNet")
    if plan.ignored:
        logger.info("ignored %d keys in %s on purpose (the base model bundled with the ControlNet, DDPM "
                    "buffers): %s", len(plan.ignored), path, name_some(plan.ignored))
    bad = _load_part(model, plan.parts["controlnet"], torch.device(device), dtype)
    if bad:
        raise nonfinite_error(str(path), bad, dtype)
    return LoadedControlNet(plan.config, model, str(path), plan.layout)


def load_controlnet(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str = torch.float32, allow_pickle: bool = False,
                    config: ControlNetConfig | dict | str | None = None) -> LoadedControlNet:
    """Load a ControlNet file or folder (see the module doc) on ``device`` in ``dtype``.

    ``config`` (a ControlNetConfig, its dict, or a preset name) overrides detection.
    FileNotFoundError for a missing path; CheckpointError (a ValueError) naming the path
    for anything else: a file that is no ControlNet (a whole SD checkpoint, a LoRA, ...),
    an SDXL ControlNet, weights that do not fit the config, NaN/inf weights.
    """
    if dtype is None:
        raise ValueError("dtype must be a torch dtype such as torch.float16, not None")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    return _load(Path(path), device, parse_dtype(dtype), allow_pickle, config)


# --- writing -----------------------------------------------------------------------------


def _original_state(loaded: LoadedControlNet, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    mapped = apply_mapping(state, controlnet_mappings(loaded.config)[1])
    if mapped.unmapped:
        raise CheckpointError(f"internal ControlNet keys without an original name: {list(mapped.unmapped)[:5]}")
    return add_prefix(mapped, CONTROL_PREFIX)


def save_controlnet(loaded: LoadedControlNet, dst: str | Path, *,
                    layout: Literal["original", "diffusers"] | None = None,
                    dtype: torch.dtype | str | None = None, overwrite: bool = False) -> Path:
    """Write a loaded ControlNet as an original-layout ``.safetensors`` file (keys under
    ``control_model.``, the config in its metadata) or a diffusers folder; ``layout``
    defaults by ``dst``'s name. ``overwrite`` replaces only a previous output of the
    same layout (:func:`ldm.checkpoints.convert.check_destination`)."""
    if not isinstance(loaded, LoadedControlNet):
        raise TypeError(f"loaded must be a LoadedControlNet, got {type(loaded).__name__}")
    dst, layout, dtype = prepare_output(dst, layout, dtype, overwrite)
    state = _cast({"controlnet": loaded.model.state_dict()}, dtype, dst)["controlnet"]
    with atomic_path(dst, folder=layout == "diffusers") as tmp:
        if layout == "original":
            metadata = {METADATA_KEY: json.dumps(loaded.config.to_dict())}
            save_safetensors(_original_state(loaded, state), tmp, metadata)
        else:
            text = json.dumps(controlnet_to_diffusers(loaded.config), indent=2) + "\n"
            (tmp / "config.json").write_text(text, encoding="utf-8")
            save_safetensors(state, tmp / f"{WEIGHT_STEM}.safetensors")
    logger.info("wrote ControlNet %s (%s layout)", dst, layout)
    return dst


def convert_controlnet(src: str | Path, dst: str | Path, *, layout: Literal["original", "diffusers"] | None = None,
                       config: ControlNetConfig | dict | str | None = None, dtype: torch.dtype | str | None = None,
                       allow_pickle: bool = False, overwrite: bool = False) -> Path:
    """Read the ControlNet ``src`` (file or folder, as :func:`load_controlnet`) and write it
    to ``dst`` (as :func:`save_controlnet`; ``dtype`` None keeps the stored dtypes).
    A ``dst`` that overlaps ``src`` is refused before anything is read."""
    src, dst = Path(src), Path(dst)
    layout = check_layout(dst, layout)
    parse_dtype(dtype)
    check_destination(dst, layout, overwrite, src)  # fail before the (slow) load
    loaded = _load(src, "cpu", None, allow_pickle, config)
    return save_controlnet(loaded, dst, layout=layout, dtype=dtype, overwrite=overwrite)
