"""Learning-rate schedules, as pure functions of the step (so a resumed run gets the same rates)."""

from __future__ import annotations

import math


def warmup_constant_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then constant, as SD's training configs do.

    Deliberately independent of the total step count, so that extending a
    finished run with more steps gives exactly the run that asked for them at once.
    """
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     final_fraction: float = 0.0) -> float:
    """Linear warm-up, then a half cosine from ``base_lr`` down to ``final_fraction * base_lr``
    at ``total_steps``. For short runs: the decay settles the weights by the last step, which
    a constant rate (SD's choice for runs of hundreds of thousands of steps) does not."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (final_fraction + (1 - final_fraction) * cosine)
