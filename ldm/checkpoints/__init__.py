"""Loading and converting checkpoints (original single-file layout and diffusers folders).

Public API: :func:`load_model`, :class:`LoadedModel`, :func:`convert`,
:func:`save_model`, :func:`detect_config`, :class:`CheckpointError`; ControlNets:
:func:`load_controlnet`, :class:`LoadedControlNet`, :func:`save_controlnet`,
:func:`convert_controlnet`, :func:`check_controlnet_fits`, :func:`is_controlnet`.
"""

from .controlnet_file import (
    LoadedControlNet, check_controlnet_fits, convert_controlnet, is_controlnet, load_controlnet, save_controlnet,
)
from .convert import convert, save_model
from .detect import Detection, detect_config, detect_family
from .files import CheckpointError, read_safetensors_header
from .loading import LoadedModel, load_model

__all__ = [
    "CheckpointError", "Detection", "LoadedModel", "convert", "detect_config", "detect_family",
    "load_model", "read_safetensors_header", "save_model",
    "LoadedControlNet", "check_controlnet_fits", "convert_controlnet", "is_controlnet", "load_controlnet",
    "save_controlnet",
]
