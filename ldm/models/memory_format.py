"""The memory layout of a feature map, for the tensors made to match it."""

from __future__ import annotations

import torch
from torch import Tensor


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last where ``x`` [N, C, H, W] is laid out so (and not also contiguous, as
    a map of one pixel or one channel is), else contiguous."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format
