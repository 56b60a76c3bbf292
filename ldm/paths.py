"""Where ldm finds the model it ships (light: no torch, so the CLI and model search can use it)."""

from __future__ import annotations

import os
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = "ldm-toy.safetensors"
LCM_WEIGHTS = "ldm-toy-lcm.safetensors"  # the shipped model distilled to 1-4 steps
WEIGHTS_ENV = "LDM_WEIGHTS"


def default_weights_path() -> Path:
    """The shipped model: $LDM_WEIGHTS if set, else weights/ldm-toy.safetensors."""
    return Path(os.environ.get(WEIGHTS_ENV, WEIGHTS_DIR / DEFAULT_WEIGHTS))
