"""``load_model``: a single-file checkpoint or a diffusers folder -> ready modules.

Order of work, so that every user error is reported before anything large is
allocated: check the path and the file headers, detect (or take) the config,
build the modules on the ``meta`` device, map the *shapes* of every weight and
compare them with the modules (one error listing missing, unexpected and
mis-shaped keys), and only then read each tensor once, convert it to the target
dtype/device, and hand it to ``load_state_dict(strict=True, assign=True)``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Literal

import torch
from torch import nn

from ..config import PREDICTION_TYPES, PRESETS, ModelConfig, load_config, with_changes
from ..dtypes import dtype_name, parse_dtype  # also imported from here by ldm.pipeline
from ..limits import check_native_size
from ..models.tokenizer import Tokenizer
from .detect import architecture_differences, derive_architecture, detect_config, detect_family
from .diffusers_folder import diffusers_mappings, find_weights, folder_of, is_diffusers_folder, read_folder_config
from .files import FLOAT_DTYPES, CheckpointError, ReadBuffer, TensorFile, open_tensor_file
from .keymap import KeyReport, apply_mapping, check_keys
from .layouts import (
    SD_TEXT_PREFIX, SGM_TEXT_PREFIX, UNET_PREFIX, layout_of, prefixes, split_components, text_parts,
)

logger = logging.getLogger("ldm")

# How many offending tensor names an error lists before "... (N in all)".
_LIST_LIMIT = 5
# A loaded model's components, by the names LoadedModel.modules() gives them.
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass
class LoadedModel:
    """Modules, config and tokenizers of one loaded checkpoint.

    ``text_encoder`` / ``tokenizer`` are ``config.text``'s; ``text_encoder_2`` /
    ``tokenizer_2`` ``config.text_2``'s (SDXL base's OpenCLIP ViT-bigG), None for models
    with one text encoder (the SDXL refiner's bigG is ``text_encoder``).
    """

    config: ModelConfig
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Tokenizer
    source: str
    layout: Literal["original", "diffusers"]
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Tokenizer | None = None

    def modules(self) -> dict[str, nn.Module]:
        """The model's modules by component name (unet, vae, text_encoder[, text_encoder_2])."""
        found = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                 "text_encoder_2": self.text_encoder_2}
        return {name: module for name, module in found.items() if module is not None}


@dataclass
class _Part:
    """Where one component's weights come from and how their keys map to ours."""

    file: TensorFile
    keys: list[str]  # source keys in ``file``
    prefix: str  # stripped from each key before ``mapping``
    mapping: Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


@dataclass
class _Plan:
    config: ModelConfig
    parts: dict[str, _Part]
    layout: Literal["original", "diffusers"]
    ignored: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # reported as unexpected


def check_prediction_type(value: str | None) -> None:
    if value is not None and value not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {value!r} is not valid; valid values: {list(PREDICTION_TYPES)}")


def name_some(keys: list[str]) -> str:
    """The first few keys and, when there are more, how many in all."""
    more = f", ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def original_mappings(config: ModelConfig) -> dict[str, Callable]:
    """Per-component key maps from an original single file (prefixes stripped) to ours."""
    from .keymap_text import text_original_to_internal
    from .keymap_unet import unet_original_to_internal
    from .keymap_vae import vae_original_to_internal

    return {
        "unet": unet_original_to_internal(config.unet),
        "vae": vae_original_to_internal(config.vae),
        **{part.component: text_original_to_internal(part.config(config), part.keys)
           for part in text_parts(layout_of(config))},
    }


# --- planning (headers only) ----------------------------------------------------


def _resolve_config(detected: ModelConfig | None, rule: str, config: Any, prediction_type: str | None,
                    path: Path) -> ModelConfig:
    """Apply the caller's overrides to what was detected; log the outcome either way."""
    if config is not None:
        chosen = _load_override(config, path)
        found = f"detected {_describe(detected)}, rule: {rule}" if detected else rule
        logger.info("config override for %s: %s (%s)", path, _describe(chosen), found)
    else:
        assert detected is not None
        chosen = detected
        logger.info("detected %s (%s, rule: %s) from %s", model_kind(chosen), chosen.prediction_type, rule, path)
    if prediction_type is not None:
        logger.info("prediction_type override for %s: %s (was %s)", path, prediction_type, chosen.prediction_type)
        chosen = with_changes(chosen, prediction_type=prediction_type)
    return chosen


def _load_override(config: Any, path: Path) -> ModelConfig:
    try:
        return load_config(config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: the config given for it is not valid: {exc}") from None


def model_kind(config: ModelConfig) -> str:
    """The family, and whether it is an inpainting model, for log lines and messages."""
    return f"{config.family} inpainting" if config.is_inpainting else config.family


def _describe(config: ModelConfig) -> str:
    return f"{model_kind(config)} {config.prediction_type}"


def _detect(file: TensorFile, config: Any, where: str) -> tuple[ModelConfig | None, str]:
    """Detection for the log line; with a config given, a file detection cannot place
    is fine (the architecture and strict shape checks still apply)."""
    try:
        detection = detect_config(file.shapes, metadata=file.metadata, get_tensor=file.get, where=where)
        return detection.config, detection.rule
    except ValueError as exc:  # CheckpointError, or the shape readers' own messages
        if config is not None:
            return None, f"not detected: {exc}"
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(
            f"{where}: cannot infer the model config: {exc}. Pass config= (a preset name, "
            "YAML file, dict or ModelConfig) to load it"
        ) from None


def _check_architecture(shapes: dict[str, tuple[int, ...]], config: ModelConfig, where: str) -> None:
    """Refuse a config (given, stored or detected) that the weights' shapes contradict in a
    field they determine. The strict key check covers most such fields; this also covers
    the ones it cannot see, e.g. an OpenCLIP text tower's depth (its last block is
    dropped by the key map, so a config one layer too deep would load and run it)."""
    try:
        arch = derive_architecture(shapes, where)
    except CheckpointError:
        raise
    except ValueError:
        return  # shapes too incomplete to read: the strict check lists what is missing
    wrong = architecture_differences(arch, config)
    if wrong:
        raise CheckpointError(
            f"{where}: the weights contradict the config in {len(wrong)} field(s): {'; '.join(wrong[:_LIST_LIMIT])}"
            f"{'; ...' if len(wrong) > _LIST_LIMIT else ''}. "
            "Pass a config that matches the weights, or none to detect it"
        )


def _check_model_kind(weights_in: int | None, config: ModelConfig, where: str) -> None:
    """Refuse an inpainting U-Net's weights forced onto a text-to-image config, or the
    reverse, by name (the shape report alone would only point at conv_in)."""
    if weights_in is None or weights_in == config.unet.in_channels:
        return
    latent = config.vae.latent_channels

    def kind(channels: int) -> str:
        names = {latent: "a text-to-image model", 2 * latent + 1: "an inpainting model"}
        return names.get(channels, f"a {channels}-channel model")

    fitting = [name for name, preset in PRESETS.items() if preset.unet.in_channels == weights_in]
    raise CheckpointError(
        f"{where}: the weights are {kind(weights_in)} (U-Net input channels {weights_in}) but "
        f"the config is for {kind(config.unet.in_channels)} ({config.unet.in_channels} input channels); "
        f"pass a config of the weights' kind (presets: {', '.join(fitting) or 'none'}) or none to detect it"
    )


def _file_unet_in_channels(shapes: dict[str, tuple[int, ...]]) -> int | None:
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    return conv_in[1] if conv_in is not None and len(conv_in) == 4 else None


def _plan_file(path: Path, config: Any, prediction_type: str | None, allow_pickle: bool) -> _Plan:
    file = open_tensor_file(path, allow_pickle=allow_pickle)
    shapes = file.shapes
    where = str(path)
    detect_family(shapes, where)  # refuses unknown / unsupported files even with a config given
    detected, rule = _detect(file, config, where)
    chosen = _resolve_config(detected, rule, config, prediction_type, path)
    _check_model_kind(_file_unet_in_channels(shapes), chosen, where)
    _check_architecture(shapes, chosen, where)
    layout = layout_of(chosen)
    mappings = original_mappings(chosen)
    by_part, ignored, unknown = split_components(shapes, layout)
    parts = {c: _Part(file, by_part[c], prefix, mappings[c]) for c, prefix in prefixes(layout).items()}
    return _Plan(chosen, parts, "original", ignored, unknown)


def _plan_folder(path: Path, config: Any, prediction_type: str | None, allow_pickle: bool) -> _Plan:
    detected, rule = read_folder_config(path)
    files = {c: find_weights(path, sub, allow_pickle=allow_pickle) for c, sub in folder_of(detected).items()}
    chosen = _resolve_config(detected, rule, config, prediction_type, path)
    _check_model_kind(detected.unet.in_channels, chosen, str(path))
    _check_folder_layout(detected, chosen, path)
    mappings = diffusers_mappings()
    parts = {c: _Part(files[c], files[c].keys(), "", mappings[c]) for c in files}
    return _Plan(chosen, parts, "diffusers")


def _check_folder_layout(detected: ModelConfig, chosen: ModelConfig, path: Path) -> None:
    """A config given for a folder must have its text encoders (which subfolders are read)."""
    found, wanted = layout_of(detected), layout_of(chosen)
    if found != wanted:
        raise CheckpointError(
            f"{path}: the folder holds a {found} model ({', '.join(folder_of(detected).values())}) but the "
            f"config given is for a {wanted} model; pass a config of the folder's kind or none to detect it"
        )


def plan(path: str | Path, *, config: Any = None, prediction_type: str | None = None,
         allow_pickle: bool = False) -> _Plan:
    check_prediction_type(prediction_type)
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise CheckpointError(
                f"{path}: is a folder but not a diffusers model (no model_index.json or unet/); "
                "expected a diffusers folder or a .safetensors file"
            )
        return _plan_folder(path, config, prediction_type, allow_pickle)
    return _plan_file(path, config, prediction_type, allow_pickle)


# --- building and loading ---------------------------------------------------------


def build_modules(config: ModelConfig) -> dict[str, nn.Module]:
    """The modules (unet, vae, text_encoder[, text_encoder_2]), on the meta device (no
    memory for weights)."""
    from ..models.text import TextEncoder
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL

    with torch.device("meta"):
        modules = {"unet": UNet(config.unet), "vae": AutoencoderKL(config.vae)}
        for part in text_parts(layout_of(config)):
            modules[part.component] = TextEncoder(part.config(config))
    return modules


def _check_shapes(plan_: _Plan, modules: dict[str, nn.Module], source: Path, what: str | None = None) -> None:
    """Map every weight's shape and compare with the modules; one error for all parts.
    Then refuse weights stored as integers or bool (a corrupt or foreign file).
    ``what``: the model the error names (default: the plan's model kind, e.g. "sd1 model")."""
    sections: list[str] = []
    not_float: list[str] = []
    for name, part in plan_.parts.items():
        n = len(part.prefix)
        shapes = {k[n:]: part.file.shapes[k] for k in part.keys}
        try:
            mapped = apply_mapping(shapes, part.mapping)
        except ValueError as exc:
            raise CheckpointError(f"{source}: {name} weights: {exc}") from None
        report = check_keys(mapped, modules[name].state_dict())
        if not report.ok:
            sections.append(report.format(f"{name} ({part.prefix or name + '/'})"))
        skipped = set(mapped.unmapped) | set(mapped.dropped)
        not_float += [f"{part.prefix}{k} ({part.file.dtypes[part.prefix + k]})" for k in shapes
                      if k not in skipped and part.file.dtypes[part.prefix + k] not in FLOAT_DTYPES]
    if plan_.unknown:
        sections.append(KeyReport(unexpected=tuple(plan_.unknown)).format("keys outside every component"))
    if sections:
        raise CheckpointError(
            f"{source}: the weights do not match the {what or model_kind(plan_.config) + ' model'} config "
            f"(wrong config, or an incomplete / modified checkpoint):\n" + "\n".join(sections)
        )
    if not_float:
        raise CheckpointError(
            f"{source}: {len(not_float)} weight(s) stored as integers or bool where floats are "
            f"expected: {name_some(not_float)}; the file is corrupt or not a model checkpoint"
        )


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, *,
             channels_last: bool = False, from_buffer: bool = False) -> torch.Tensor:
    """``tensor`` in the target dtype on ``device``, 4-D weights channels_last if asked, in
    one copy; ``from_buffer``: ``tensor`` is a view of a reused read buffer, always copied."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.preserve_format
    if from_buffer:
        return torch.empty_like(tensor, dtype=target, device=device, memory_format=layout).copy_(tensor)
    out = tensor.to(device=device, dtype=target, memory_format=layout)
    # A split (fused qkv) yields views of one storage; keep each weight in its own.
    if out.numel() and out.untyped_storage().nbytes() != out.numel() * out.element_size():
        out = out.clone()
    return out


def is_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return True
    # One reduction instead of a full boolean mask: any NaN/Inf makes the sum non-finite.
    # A finite tensor whose sum overflows takes the exact check, so nothing is refused wrongly.
    # The sum stays in the tensor's dtype (accumulated in float32 inside): asking for a
    # float32 result made bfloat16 sums 30x slower on the CPU (41 ms against 1.3 ms for a
    # 1280x1280x3x3 weight), 2.3 s of a full-size bfloat16 load.
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_error(where: str, keys: list[str], dtype: torch.dtype | None = None) -> CheckpointError:
    """The error for weights with NaN/inf (as stored, or after a cast to ``dtype``)."""
    cast = f" (or that overflow {dtype_name(dtype)})" if dtype is not None else ""
    return CheckpointError(
        f"{where}: {len(keys)} weight(s) hold NaN or infinite values{cast}: {name_some(keys)}; "
        "they would make black or noise images. Use an intact copy of the checkpoint"
        + (", or a wider dtype" if cast else "")
    )


def _load_part(module: nn.Module, part: _Part, device: torch.device, dtype: torch.dtype | None,
               channels_last: bool = False) -> list[str]:
    """Load one component (its 4-D weights channels_last if asked); return the source keys
    whose values are not finite (checked on each tensor as it is converted, so no second
    pass over the file)."""
    n = len(part.prefix)
    state: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    # A weight converted to another dtype or layout is read into a reused buffer and copied
    # from there into its own memory, not read through the mapping, so the stored copy does
    # not stay resident beside the converted one.
    buffered = {key for key in part.keys if part.file.dtypes[key] in FLOAT_DTYPES and (
        channels_last or (dtype is not None and part.file.dtypes[key] != dtype_name(dtype)))}
    buffer = ReadBuffer(max((part.file.nbytes(key) for key in buffered), default=0))
    for key in part.keys:
        from_buffer = key in buffered
        tensor = part.file.get(key, copy=True, buffer=buffer) if from_buffer else part.file.get(key)
        for new_key, mapped in part.mapping(key[n:], tensor):
            state[new_key] = _convert(mapped, device, dtype, channels_last=channels_last, from_buffer=from_buffer)
            if not is_finite(state[new_key]) and key not in bad:
                bad.append(key)
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    return bad


def _log_ignored(plan_: _Plan, source: Path) -> None:
    if not plan_.ignored:
        return
    groups = Counter("model_ema.*" if k.startswith("model_ema.") else "text encoders"
                     if k.startswith((SD_TEXT_PREFIX, SGM_TEXT_PREFIX)) else "other" for k in plan_.ignored)
    logger.info("ignored %d unused keys in %s on purpose (EMA copies, DDPM schedule buffers, "
                "CLIP projection/logit scale/position ids): %s", len(plan_.ignored), source, dict(groups))


def _check_memory(config: ModelConfig, path: Path, device: torch.device, dtype: torch.dtype | None) -> None:
    """Refuse, before any module is built, a config whose native size cannot run here."""
    dtype_bytes = dtype.itemsize if dtype is not None else 4
    check_native_size(config, str(path), dtype_bytes=dtype_bytes, device=device)


def _check_components(names: Collection[str]) -> frozenset[str]:
    if isinstance(names, str) or not isinstance(names, Collection):
        raise TypeError(f"channels_last must be a collection of component names, got {names!r}")
    unknown = sorted(str(n) for n in names if n not in COMPONENTS)
    if unknown:
        raise ValueError(f"channels_last: unknown component(s) {unknown}; expected some of {list(COMPONENTS)}")
    return frozenset(names)


def load_parts(source: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | str | None = torch.float32, config: Any = None,
               prediction_type: str | None = None, allow_pickle: bool = False,
               check_memory: bool = True, channels_last: Collection[str] = ()) -> LoadedModel:
    """:func:`load_model` with ``dtype=None`` allowed (keep each tensor's stored dtype).

    ``check_memory=False`` (convert: it never generates) skips the native-size check.
    """
    channels_last = _check_components(channels_last)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    path = Path(source)
    plan_ = plan(path, config=config, prediction_type=prediction_type, allow_pickle=allow_pickle)
    if check_memory:
        _check_memory(plan_.config, path, device, dtype)
    try:
        modules = build_modules(plan_.config)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot build the model from its config: {exc}") from None
    _check_shapes(plan_, modules, path)
    _log_ignored(plan_, path)
    bad = [key for name, part in plan_.parts.items()
           for key in _load_part(modules[name], part, device, dtype, name in channels_last)]
    if bad:
        raise nonfinite_error(str(path), bad, dtype)
    text, text_2 = plan_.config.text, plan_.config.text_2
    return LoadedModel(
        config=plan_.config, unet=modules["unet"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        tokenizer=Tokenizer(text.pad_token, text.max_position_embeddings),
        source=str(path), layout=plan_.layout, text_encoder_2=modules.get("text_encoder_2"),
        tokenizer_2=None if text_2 is None else Tokenizer(text_2.pad_token, text_2.max_position_embeddings),
    )


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, config: Any = None,
               prediction_type: str | None = None, allow_pickle: bool = False,
               channels_last: Collection[str] = ()) -> LoadedModel:
    """Load a checkpoint: a ``.safetensors`` file in the original (CompVis / A1111)
    layout, or a diffusers folder.

    ``config`` (preset name, YAML path, dict or ModelConfig) and ``prediction_type``
    override detection; both are logged on the ``ldm`` logger, as is what was
    detected. Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``) are refused unless
    ``allow_pickle=True``, and then read with ``torch.load(weights_only=True)``.
    ``dtype`` is float32 unless given, on every device (training, export and conversion
    want full precision); :meth:`ldm.Pipeline.from_pretrained` instead picks the fast
    inference dtype of the device (:func:`ldm.dtypes.default_dtype`). ``channels_last``
    names components (``"unet"``, ``"vae"``) whose 4-D weights are stored channels_last,
    converted as they are read rather than copied again afterwards (the layout
    :mod:`ldm.layouts` picks for the device and dtype; ``from_pretrained`` passes it).

    Raises FileNotFoundError for a missing path, :class:`CheckpointError` (a
    ValueError) for a corrupt, unknown, unsupported or mismatched checkpoint,
    always naming the path and before any large allocation (and, after loading,
    for weights holding NaN or inf), and :class:`ldm.limits.MemoryLimitError` (a
    ValueError) for a config whose native image size cannot run on ``device``.
    """
    if dtype is None:
        raise ValueError("dtype must be a torch dtype such as torch.float16, not None")
    return load_parts(path, device=device, dtype=dtype, config=config, prediction_type=prediction_type,
                      allow_pickle=allow_pickle, channels_last=channels_last)
