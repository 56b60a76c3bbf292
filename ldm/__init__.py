"""ldm: latent text-to-image diffusion in the Stable Diffusion family."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "Generation", "ControlNet", "Control", "load_model", "convert", "SAMPLERS", "__version__"]

if TYPE_CHECKING:
    from .checkpoints import convert, load_model
    from .control import Control, ControlNet
    from .pipeline import Generation, Pipeline
    from .samplers import SAMPLERS


def __getattr__(name: str) -> Any:
    # Lazy, so `ldm --help` and light imports do not pay for torch/transformers.
    if name in ("Pipeline", "Generation"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("ControlNet", "Control"):
        from . import control

        return getattr(control, name)
    if name in ("load_model", "convert"):
        from . import checkpoints

        return getattr(checkpoints, name)
    if name == "SAMPLERS":
        from .samplers import SAMPLERS

        return SAMPLERS
    raise AttributeError(f"module 'ldm' has no attribute {name!r}")
