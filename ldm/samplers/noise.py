"""Gaussian noise drawn per image from its own CPU generator.

Image ``k`` of a batch draws from ``generators[k]``, a tensor of shape (1, C, H, W)
per call, in batch order, on the CPU, in float32. That is what diffusers'
``randn_tensor`` does with a list of CPU generators, so the same seeds give the
same numbers, and an image does not depend on the batch size or the device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Generators = Sequence[torch.Generator] | None


def randn(
    shape: Sequence[int],
    generators: Generators = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit Gaussian noise of ``shape`` (batch first), one generator per batch row.

    Without generators the global RNG draws directly on ``device``.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {shape[0]}; pass one per image"
        )
    # float32 on the CPU then cast: identical to drawing in half precision there,
    # and independent of the device the sampler runs on.
    rows = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device=device, dtype=dtype)


def randn_like(x: Tensor, generators: Generators = None) -> Tensor:
    """Noise shaped, typed and placed like ``x``."""
    return randn(x.shape, generators, device=x.device, dtype=x.dtype)
