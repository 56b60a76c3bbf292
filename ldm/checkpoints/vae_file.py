"""A VAE on its own, used in place of a model's (AUTOMATIC1111's ``--vae`` / ``sd_vae``,
diffusers' ``vae=``).

What loads, each checked whole against the model's VAE before any weight changes:

- a diffusers ``AutoencoderKL`` folder: ``config.json`` and ``diffusion_pytorch_model``
  ``.safetensors`` (or ``.fp16.safetensors``; ``.bin`` with ``allow_pickle``), such as
  madebyollin/sdxl-vae-fp16-fix, whose ``force_upcast: false`` lets a float16 pipeline
  decode in float16 (a whole model's folder or file is refused: pass its ``vae/``);
- one ``.safetensors`` file in diffusers' key names (``encoder.down_blocks.0.resnets.0...``),
- or in the original layout, as the web UI's VAE files are (``encoder.down.0.block.0...``,
  ``quant_conv``), with or without ``first_stage_model.``; the training leftovers the web
  UI skips (``loss.*``, ``model_ema.decay`` / ``model_ema.num_updates``) are skipped with
  a log line;
- ``.pt`` / ``.ckpt`` / ``.bin`` files only with ``allow_pickle`` (``weights_only=True``).

The weights' architecture (channels, levels, layers per block; a folder's norm groups)
must be the model's, else one error names both. Anything else the file holds is
reported with the missing and mis-shaped keys, and NaN/inf weights are refused, as
whole checkpoints are (:mod:`ldm.checkpoints.loading`). The model's ``scaling_factor``
is kept: it belongs to the latent space the U-Net was trained in (a folder whose
config says another is logged). ``force_upcast`` is the caller's, else the folder's
``config.json``, else the model's (a single file says nothing about it).

``VAE`` / ``VAE hash`` in an image's parameters are the web UI's: the file's name with
its extension and the first 10 hex digits of its SHA-256 (a folder: its name and
:func:`ldm.modelref.model_hash`'s folder hash).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ModelConfig, VAEConfig, with_changes
from ..foreign_config import vae_from_diffusers
from ..modelref import ModelRef, _candidates, find_model, model_hash
from .diffusers_folder import _present, _read_json, _translate, diffusers_mappings, model_weights
from .files import CheckpointError, TensorFile, open_tensor_file
from .keymap_vae import vae_architecture, vae_original_to_internal
from .layouts import UNET_PREFIX, VAE_PREFIX
from .loading import _check_shapes, _load_part, _Part, _Plan, model_kind, name_some, nonfinite_error

logger = logging.getLogger("ldm")

# Keys of VAE training the web UI drops (modules/sd_vae.py: ``k[0:4] != "loss"``, vae_ignore_keys).
IGNORED_KEYS = ("model_ema.decay", "model_ema.num_updates")
LOSS_PREFIX = "loss."
# Key prefixes that tell the two layouts apart (below ``first_stage_model.``).
_ORIGINAL_MARKS = ("encoder.down.", "decoder.up.", "encoder.mid.", "decoder.mid.")
_DIFFUSERS_MARKS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")
# The VAEConfig fields compared with the model's: what changes the computation. The
# scaling factor and force_upcast are settings of the pipeline; sample_size is unused.
_ARCHITECTURE = ("in_channels", "out_channels", "latent_channels", "block_out_channels", "layers_per_block",
                 "norm_num_groups")


@dataclass(frozen=True)
class VAESource:
    """A VAE file or folder opened and read as far as its headers and names (no weight
    read yet): what :func:`load_vae` needs besides the model's config."""

    path: Path  # as given
    file: TensorFile
    layout: Literal["diffusers", "original"]
    prefix: str  # stripped from each VAE key: "first_stage_model." or ""
    keys: list[str]  # the VAE's keys in ``file``
    ignored: list[str]  # training leftovers, skipped
    unknown: list[str]  # keys outside the VAE (reported as unexpected)
    architecture: dict[str, Any]  # what the weights' shapes say (see keymap_vae.vae_architecture)
    folder_config: VAEConfig | None = None  # a diffusers folder's config.json


def open_vae(path: str | Path, *, allow_pickle: bool = False) -> VAESource:
    """Open a VAE (see the module docstring) and check what needs no model: the path,
    the file's header, that its keys are a VAE's in one layout, and the folder's config.

    FileNotFoundError for a missing path or weight file; CheckpointError (a ValueError)
    naming the path for anything else."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"vae must be a path (str or Path), got {type(path).__name__}")
    path = Path(path)
    if not _present(path):
        raise FileNotFoundError(f"VAE not found: {path}")
    folder_config = None
    if path.is_dir():
        if (path / "model_index.json").is_file() or (path / "unet").is_dir():
            raise CheckpointError(f"{path}: a whole diffusers model folder, not a VAE; pass its vae/ folder")
        folder_config = _read_folder_config(path / "config.json")
        file = open_tensor_file(_folder_weights(path), allow_pickle=allow_pickle)
    else:
        file = open_tensor_file(path, allow_pickle=allow_pickle)
    ignored = [k for k in file.keys() if k.startswith(LOSS_PREFIX) or k in IGNORED_KEYS]
    rest = [k for k in file.keys() if not (k.startswith(LOSS_PREFIX) or k in IGNORED_KEYS)]
    prefix = VAE_PREFIX if any(k.startswith(VAE_PREFIX) for k in rest) else ""
    keys = [k for k in rest if k.startswith(prefix)]
    unknown = [k for k in rest if not k.startswith(prefix)]
    if prefix and any(k.startswith(UNET_PREFIX) for k in unknown):
        raise CheckpointError(f"{path}: a whole checkpoint (U-Net, text encoder and VAE), not a VAE file; load it as "
                              "the model, or pass a VAE file")
    shapes = {k[len(prefix):]: file.shapes[k] for k in keys}
    layout = _layout(shapes, path)
    try:
        architecture = vae_architecture(shapes if layout == "original" else _original_names(shapes))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a complete VAE ({layout} key names): {exc}") from None
    return VAESource(path, file, layout, prefix, keys, ignored, unknown, architecture, folder_config)


def load_vae(source: VAESource | str | Path, config: ModelConfig, *, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, force_upcast: bool | None = None,
             allow_pickle: bool = False) -> tuple[nn.Module, VAEConfig]:
    """The VAE of ``source`` (a :class:`VAESource` or a path for :func:`open_vae`) built for
    the model ``config``, on ``device`` in ``dtype``, and the VAEConfig to run it with
    (the model's, with ``force_upcast`` resolved as the module docstring says).

    CheckpointError naming the path: another architecture (both named), keys that do
    not fit the model's VAE, integer weights, NaN/inf weights."""
    from ..models.vae import AutoencoderKL

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if force_upcast is not None and not isinstance(force_upcast, bool):
        raise TypeError(f"force_upcast must be True, False or None, got {force_upcast!r}")
    if not isinstance(source, VAESource):
        source = open_vae(source, allow_pickle=allow_pickle)
    chosen = _resolve_config(source, config, force_upcast)
    mapping = vae_original_to_internal(chosen) if source.layout == "original" else diffusers_mappings()["vae"]
    plan = _Plan(with_changes(config, vae=chosen), {"vae": _Part(source.file, source.keys, source.prefix, mapping)},
                 source.layout, source.ignored, source.unknown)
    with torch.device("meta"):
        module = AutoencoderKL(chosen)
    _check_shapes(plan, {"vae": module}, source.path)
    if source.ignored:
        logger.info("ignored %d VAE training key(s) in %s, as the web UI does: %s", len(source.ignored), source.path,
                    name_some(source.ignored))
    bad = _load_part(module, plan.parts["vae"], torch.device(device), dtype)
    if bad:
        raise nonfinite_error(str(source.path), bad, dtype)
    logger.info("VAE from %s (%s key names) in place of the model's; force_upcast %s", source.path, source.layout,
                chosen.force_upcast)
    return module, chosen


def vae_ref(path: str | Path) -> ModelRef:
    """The VAE's ``VAE`` / ``VAE hash`` as the web UI writes them: the file's name with its
    extension (a folder's name) and :func:`ldm.modelref.model_hash`."""
    path = Path(path)
    return ModelRef(path, path.name, model_hash(path))


def find_vae(name: str | None, hash: str | None, dirs: list[Path] | None = None) -> Path:
    """The VAE an image names (``VAE: name``, ``VAE hash: hash``): by name first, else by
    hash, in :func:`ldm.modelref.search_dirs` and their ``VAE/`` subfolders (the web UI's
    models/VAE). FileNotFoundError says where it looked and to pass ``--vae``."""
    return find_model(name, hash, dirs, what="VAE", flag="--vae", listing=_vae_candidates, name_of=_file_name)


# --- helpers -----------------------------------------------------------------------


def _read_folder_config(path: Path) -> VAEConfig:
    data = _read_json(path)
    kind = data.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise CheckpointError(f"{path}: the folder holds a {kind}, not an AutoencoderKL (the Stable Diffusion VAE "
                              "that ldm's models use)")
    return _translate(vae_from_diffusers, data, path)


def _folder_weights(folder: Path) -> Path:
    return model_weights(folder, "VAE")


def _layout(shapes: dict[str, tuple[int, ...]], path: Path) -> Literal["diffusers", "original"]:
    """Which key names the VAE's keys use; refuses a mix and a file with neither."""
    original = any(k.startswith(_ORIGINAL_MARKS) for k in shapes)
    diffusers = any(k.startswith(_DIFFUSERS_MARKS) for k in shapes)
    if original != diffusers:
        return "original" if original else "diffusers"
    if original:
        raise CheckpointError(f"{path}: mixes the VAE's original key names (encoder.down.0.block.0...) with "
                              "diffusers' (encoder.down_blocks.0.resnets.0...); the file is corrupt or badly merged")
    some = name_some(sorted(shapes)) if shapes else "no tensors"
    raise CheckpointError(f"{path}: not a VAE file (keys: {some}); expected an AutoencoderKL's encoder.* / "
                          "decoder.* weights, in diffusers' or the original key names")


def _original_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Diffusers-named encoder keys under the original names the architecture is read
    from (``encoder.down_blocks.i.resnets.j`` -> ``encoder.down.i.block.j``); only for
    reading shapes, never for loading."""
    return {k.replace("encoder.down_blocks.", "encoder.down.").replace(".resnets.", ".block."): v
            for k, v in shapes.items()}


def _resolve_config(source: VAESource, config: ModelConfig, force_upcast: bool | None) -> VAEConfig:
    """The model's VAEConfig after checking the file's architecture against it, with
    ``force_upcast`` from the caller, else the folder's config.json, else the model's."""
    model = config.vae
    found = dict(source.architecture)
    if source.folder_config is not None:
        found["norm_num_groups"] = source.folder_config.norm_num_groups
    wrong = [f"{k}: the VAE's {_shown(found[k])}, the model's {_shown(getattr(model, k))}"
             for k in _ARCHITECTURE if k in found and found[k] != getattr(model, k)]
    if wrong:
        raise CheckpointError(f"{source.path}: a VAE of another architecture than this {model_kind(config)} model's: "
                              f"{'; '.join(wrong)}. Use a VAE made for this model family")
    if source.folder_config is not None and source.folder_config.scaling_factor != model.scaling_factor:
        logger.warning("%s: its config.json says scaling_factor %g, the model's is %g; keeping the model's (the "
                       "U-Net's latents are scaled by it)", source.path, source.folder_config.scaling_factor,
                       model.scaling_factor)
    if force_upcast is None:
        force_upcast = model.force_upcast if source.folder_config is None else source.folder_config.force_upcast
    return with_changes(model, force_upcast=force_upcast)


def _shown(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)


def _file_name(path: Path) -> str:
    return path.name


def _vae_candidates(folder: Path) -> list[Path]:
    """Weight files and diffusers VAE folders (a config.json) in ``folder`` and its ``VAE/``."""
    found: list[Path] = []
    for where in (folder, folder / "VAE"):
        if where.is_dir():
            found += [p for p in _candidates(where) if p.is_file()]
            found += [p for p in sorted(where.iterdir()) if (p / "config.json").is_file()]
    return found
