"""What travels from the pipeline to the U-Net besides ``(x, t)``: one small frozen dataclass.

Classifier-free guidance, sub-batching and device moves treat every field the
same way (:meth:`Conditioning.cat`, :meth:`Conditioning.select`,
:meth:`Conditioning.to`), so a feature that needs the U-Net to see something new
(SDXL's pooled text vector and size ids, a 9-channel inpainting model's extra
input channels, ControlNet residuals) adds a field here and a line in
:func:`run_unet`, and never touches the samplers or the guidance wrapper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """Per-row conditioning of a U-Net batch; every tensor field has the batch on dim 0.

    ``context``: the cross-attention context, ``(B, tokens, width)``, the text
    encoder's hidden states.
    ``concat``: extra U-Net input channels stacked after the latents, ``(B, C, h, w)``:
    a 9-channel inpainting model's mask and masked-image latents (diffusers'
    ``torch.cat([latents, mask, masked_image_latents], dim=1)``); ``None`` otherwise.
    """

    context: Tensor
    concat: Tensor | None = None

    def __post_init__(self) -> None:
        rows = {name: t.shape[0] for name, t in self._tensors()}
        if len(set(rows.values())) > 1:
            raise ValueError(f"conditioning fields disagree on the batch size: {rows}")

    def _tensors(self) -> list[tuple[str, Tensor]]:
        return [(f.name, v) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)]

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def _map(self, fn: Any) -> "Conditioning":
        return dataclasses.replace(self, **{name: fn(t) for name, t in self._tensors()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; ``dtype`` applies to floating-point fields only."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, rows: slice) -> "Conditioning":
        """The rows ``rows`` of every field (a sub-batch)."""
        return self._map(lambda t: t[rows])

    @classmethod
    def cat(cls, parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of ``parts`` stacked field by field (CFG's ``[uncond, cond]`` batch)."""
        first = parts[0]
        fields = {}
        for f in dataclasses.fields(first):
            values = [getattr(p, f.name) for p in parts]
            if isinstance(values[0], Tensor):
                shapes = {tuple(v.shape[1:]) for v in values}
                if len(shapes) > 1:
                    raise ValueError(f"cannot batch conditioning: {f.name} shapes differ beyond the batch: {shapes}")
                fields[f.name] = torch.cat(values)
            elif any(v != values[0] for v in values):
                raise ValueError(f"cannot batch conditioning with different {f.name}: {values}")
            else:
                fields[f.name] = values[0]
        return dataclasses.replace(first, **fields)


def run_unet(unet: Any, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """Call the U-Net with what ``cond`` carries; ``cond`` is already in the U-Net's dtype
    and on its device (cast once per call with :meth:`Conditioning.to`, not per step)."""
    if cond.concat is not None:
        x = torch.cat([x, cond.concat], dim=1)
    return unet(x, t, cond.context)
