"""Generator pictures through a model's VAE: what a U-Net that drew exactly the prompt
would give, so the ceiling that the VAE and the scorer set on a toy model's scores."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..training.losses import to_pixels
from .world import Scene, render


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline ``output='np'`` floats in [0, 1] -> uint8, rounded as its PIL output is."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def vae_round_trips(pipe: Any, scenes: Sequence[Scene], batch_size: int = 32) -> np.ndarray:
    """Each scene drawn at the pipeline's size, encoded (posterior mean) and decoded by
    its VAE, as uint8 ``(N, H, W, 3)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size, scale, out = int(pipe.config.default_size), pipe.config.vae.scaling_factor, []
    for lo in range(0, len(scenes), batch_size):
        pictures = np.stack([render(s, size) for s in scenes[lo:lo + batch_size]])
        pixels = to_pixels(torch.from_numpy(pictures).permute(0, 3, 1, 2))
        latents = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).mean.float() * scale
        out.append(to_uint8(pipe.decode(latents, output="np")))
    return np.concatenate(out)
