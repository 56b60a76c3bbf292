"""An exponential moving average of a module's weights, as SD keeps for its U-Net."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` (the original ldm
    ``LitEma``), so early averages are not dominated by the random initialisation.
    Shadows are float32 whatever the module's dtype.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in self._tracked(module)}

    @staticmethod
    def _tracked(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
        return ((k, v) for k, v in module.state_dict().items() if v.is_floating_point())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for key, value in self._tracked(module):
            shadow = self.shadow[key]
            shadow.lerp_(value.detach().to(shadow.device, torch.float32), 1.0 - decay)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the module's parameters")
        device = next(iter(self.shadow.values())).device
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.to(device, torch.float32) for k, v in state["shadow"].items()}

    def averaged_state(self, module: nn.Module) -> dict[str, Tensor]:
        """``module.state_dict()`` with the averaged values (non-float entries kept)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v
                for k, v in module.state_dict().items()}
