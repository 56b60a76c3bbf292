"""ControlNet for the pipeline: the user's objects and what they add to a U-Net call.

``ControlNet.from_pretrained(path)`` loads a ControlNet (a ControlNet 1.0/1.1 single file
or a diffusers ``ControlNetModel`` folder, :func:`ldm.checkpoints.load_controlnet`);
``Control(controlnet, image, scale, start, end, guess_mode)`` asks for it in one call:
``pipe(prompt, control=Control(...))`` or a list of them (their residuals are summed, as
diffusers' ``MultiControlNetModel`` sums them).

Each U-Net evaluation first runs every active ControlNet on the same noisy latents,
timestep and text context, with the hint image (RGB in [0, 1], resized to the output
size with Lanczos), and adds its scaled outputs to the U-Net's skip connections and mid
block (:func:`ldm.conditioning.run_unet`). How the scale is applied follows diffusers'
``StableDiffusionControlNetPipeline``:

- ``scale`` multiplies every residual; with ``guess_mode`` the residuals of the 13 (SD)
  connections are further scaled by ``logspace(-1, 0, 13)`` (shallow ones weaker) and
  only the conditional half of classifier-free guidance gets them, as in the original
  "guess mode" (the prompt may be empty: the ControlNet guesses the content).
- ``start`` / ``end`` (fractions of the steps that run): step ``i`` of ``n`` uses the
  ControlNet unless ``i / n < start`` or ``(i + 1) / n > end``.

The per-row scales travel in :class:`ControlInput` inside the
:class:`~ldm.conditioning.Conditioning`, so guidance batching and sub-batching treat them
like any other field; steps with a different set of active ControlNets become segments of
a :class:`~ldm.conditioning.ScheduledConditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .conditioning import Conditioning, ControlInput, ScheduledConditioning
from .config import ModelConfig
from .dtypes import dtype_name
from .editing import fit_to_size, load_image

Cond = Conditioning | ScheduledConditioning


class ControlNet:
    """A loaded ControlNet: its model (eval mode), config, and the file it came from."""

    def __init__(self, loaded: Any) -> None:
        self.model = loaded.model.eval()
        self.config = loaded.config
        self.source = str(loaded.source)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None, config: Any = None,
                        allow_pickle: bool = False) -> "ControlNet":
        """Load a ControlNet file or folder (see :func:`ldm.checkpoints.load_controlnet`);
        ``device`` / ``dtype`` default as :meth:`ldm.Pipeline.from_pretrained`'s do."""
        from .checkpoints import load_controlnet
        from .dtypes import parse_dtype
        from .pipeline import default_dtype, resolve_device

        device = resolve_device(device)
        dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
        return cls(load_controlnet(path, device=device, dtype=dtype, config=config, allow_pickle=allow_pickle))

    @property
    def name(self) -> str:
        path = Path(self.source)
        return path.name if path.is_dir() else path.stem

    def check_fits(self, config: ModelConfig) -> None:
        """ValueError naming both families if this ControlNet does not fit a model of ``config``."""
        from .checkpoints import check_controlnet_fits

        check_controlnet_fits(self.config, config)

    def check_runs_with(self, device: torch.device, dtype: torch.dtype) -> None:
        """ValueError unless this ControlNet computes on ``device`` in ``dtype`` (a pipeline's),
        rather than torch's shape-free "mat1 and mat2 must have the same dtype" mid-sampling."""
        param, device = next(self.model.parameters()), torch.device(device)
        # "cuda" and "cuda:0" are one device (an index left out is the current one, 0 here).
        same = param.device.type == device.type and (param.device.index or 0) == (device.index or 0)
        if not same or param.dtype != dtype:
            def where(d: Any, t: torch.dtype) -> str:
                return f"{dtype_name(t)} on {d}"

            raise ValueError(f"ControlNet {self.name} is {where(param.device, param.dtype)} but the pipeline "
                             f"computes in {where(device, dtype)}: load it with ControlNet.from_pretrained(path, "
                             "device=pipe.device, dtype=pipe.dtype)")

    def __repr__(self) -> str:
        return f"ControlNet({self.source!r})"


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a fraction of the steps from 0 to 1, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Control:
    """One ControlNet asked for in a call. ``image``: the hint (a PIL image, a path or an
    HxWx3 array in [0, 1]), an edge map, scribble or pose already made (see
    :mod:`ldm.control_preprocess`); resized to the output size. ``scale`` >= 0."""

    controlnet: ControlNet
    image: Any
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.controlnet, ControlNet):
            raise TypeError(f"Control.controlnet must be a ControlNet (ControlNet.from_pretrained(path)), "
                            f"got {type(self.controlnet).__name__}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"Control scale must be a finite number >= 0, got {self.scale!r}")
        start, end = _fraction(self.start, "Control start"), _fraction(self.end, "Control end")
        if start >= end:
            raise ValueError(f"Control start ({start:g}) must be below end ({end:g}): the ControlNet would "
                             "act on no step")
        if not isinstance(self.guess_mode, bool):
            raise TypeError(f"Control guess_mode must be True or False, got {self.guess_mode!r}")

    def active(self, step: int, steps: int) -> bool:
        """diffusers' ``controlnet_keep``: whether step ``step`` (0-based) of ``steps`` uses it."""
        return not (step / steps < self.start or (step + 1) / steps > self.end)


def as_controls(control: Any) -> list[Control]:
    """``control=`` as a list: None, one :class:`Control` or a sequence of them."""
    if control is None:
        return []
    items = [control] if isinstance(control, Control) else control
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(c, Control) for c in items):
        raise TypeError(f"control must be a Control or a non-empty list of them, got {control!r:.80}")
    return list(items)


def hint_tensor(control: Control, width: int, height: int) -> Tensor:
    """The hint as a ``(1, 3, height, width)`` float32 tensor in [0, 1] (Lanczos-resized)."""
    array = load_image(control.image, "control image")
    if array.shape[:2] != (height, width):
        array = fit_to_size(array, width, height, "control image")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].float()


def attach_controls(cond: Cond, uncond: Cond | None, controls: list[Control], hints: list[Tensor],
                    steps: int) -> tuple[Cond, Cond | None]:
    """``cond`` / ``uncond`` with their :class:`ControlInput` fields for a run of ``steps``
    steps: one segment per run of steps with the same active ControlNets (joined with any
    prompt-editing segments). The unconditional rows of a guess-mode ControlNet get scale 0."""
    if not controls:
        return cond, uncond
    pattern = [tuple(c.active(i, steps) for c in controls) for i in range(steps)]
    ends = [i for i in range(steps) if i == steps - 1 or pattern[i + 1] != pattern[i]]

    # diffusers runs a globally pooled (shuffle) ControlNet in guess mode whatever was asked.
    guess = [c.guess_mode or c.controlnet.config.global_pool_conditions for c in controls]

    def inputs(rows: int, active: tuple[bool, ...], negative: bool) -> tuple[ControlInput, ...]:
        return tuple(ControlInput(c.controlnet.model, h.expand(rows, -1, -1, -1),
                                  torch.full((rows,), 0.0 if (not on or (negative and g)) else c.scale), g)
                     for c, h, on, g in zip(controls, hints, active, guess))

    def side(c: Cond | None, negative: bool) -> Cond | None:
        if c is None:
            return None
        own = list(c.ends) if isinstance(c, ScheduledConditioning) else []
        bounds = sorted(set(ends) | set(own))
        segments = []
        for end in bounds:
            base = c.at(end) if isinstance(c, ScheduledConditioning) else c
            active = pattern[min(end, steps - 1)]
            segments.append(base.replace(control=inputs(base.batch_size, active, negative)))
        if len(segments) == 1:
            return segments[0]
        return ScheduledConditioning(tuple(segments), tuple(bounds))

    return side(cond, False), side(uncond, True)
