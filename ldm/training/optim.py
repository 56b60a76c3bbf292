"""The optimizer's parameter groups and their learning rate."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on biases, norms and embeddings.

    Decaying the CLIP token table would shrink every row that the toy captions
    never use toward zero, making out-of-world words collapse onto one embedding.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate (the schedule is applied by hand, step by step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
