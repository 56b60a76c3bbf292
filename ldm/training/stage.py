"""What a training stage is asked to do (:class:`StageSpec`) and what it hands on
(:class:`StageResult`), with the model-card entry made of both."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from .schedules import warmup_constant_lr, warmup_cosine_lr

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class StageSpec:
    """How one stage trains. ``lr`` warms up linearly, then stays constant (as SD) or
    follows a half cosine to zero at ``steps`` (``schedule="cosine"``). ``use_ema``: the
    stage's result is the EMA of the weights rather than the last weights."""

    name: str
    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float
    ema_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    schedule: str = "constant"
    use_ema: bool = True

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``."""
        if self.schedule == "cosine":
            return warmup_cosine_lr(step, self.lr, self.warmup, self.steps)
        if self.schedule == "constant":
            return warmup_constant_lr(step, self.lr, self.warmup)
        raise ValueError(f"unknown learning-rate schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be continued. A constant rate does not
        depend on the step count, so such a stage can be extended; a cosine one cannot."""
        out: dict[str, Any] = {"batch_size": self.batch_size}
        if self.schedule != "constant":
            out.update(schedule=self.schedule, steps=self.steps, lr=self.lr, warmup=self.warmup)
        return out


@dataclass
class StageResult:
    state: dict[str, Tensor]  # the weights the stage hands on (see StageSpec.use_ema)
    step: int
    record: dict[str, Any]  # seconds, losses, ... for the model card

    def identity(self) -> Any:
        """What later stages record of this one, to notice when it changes."""
        return self.record.get("sha256", self.step)


def given_weights(state: dict[str, Tensor], source: Path) -> StageResult:
    """Weights taken from a file rather than trained here, in float32, with their digest
    (what later stages record of them)."""
    state = {k: v.float().clone() for k, v in state.items()}
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode() + state[key].numpy().tobytes())
    return StageResult(state, 0, {"seconds": 0.0, "losses": [], "from": str(source), "sha256": digest.hexdigest()})


def cpu_copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict on the CPU, where export and the checks after it read weights
    (training may have moved the module to a GPU)."""
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def param_count(state: dict[str, Tensor]) -> int:
    return sum(v.numel() for v in state.values() if v.is_floating_point())


def plain(obj: Any) -> Any:
    """JSON-like data (lists, not tuples) of a config, so saved fingerprints compare equal."""
    return json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj))


def stage_card(spec: StageSpec, result: StageResult, params: int,
               init: StageResult | None = None) -> dict[str, Any]:
    """A stage's model-card entry; ``init``: the given weights its training started from."""
    if "from" in result.record:  # not trained in this run
        return given_card(result) | {"parameters": params}
    losses = result.record["losses"]
    card = {} if init is None else {"init": given_card(init)}
    return card | {"steps": result.step, "batch_size": spec.batch_size, "lr": spec.lr, "parameters": params,
                   "seconds": round(result.record["seconds"], 1),
                   "s_per_step": round(result.record["seconds"] / max(1, result.step), 3),
                   "final_loss": losses[-1][1] if losses else None}


def given_card(result: StageResult) -> dict[str, Any]:
    """Where weights that were not trained here came from."""
    return {"from": result.record["from"], "sha256": result.record["sha256"]}
