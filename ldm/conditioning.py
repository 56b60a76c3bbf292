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
from bisect import bisect_left
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .models.layers import guidance_scale_embedding


@dataclass(frozen=True, eq=False)
class ControlInput:
    """One ControlNet's part of a U-Net batch: the hint of each row ``(B, 3, H, W)`` and
    each row's scale ``(B,)`` (0 for a row it does not act on)."""

    model: torch.nn.Module
    hint: Tensor
    scales: Tensor
    guess_mode: bool

    def _map(self, fn: Any) -> "ControlInput":
        return dataclasses.replace(self, hint=fn(self.hint), scales=fn(self.scales))

    def residuals(self, x: Tensor, t: Tensor, context: Tensor) -> Any:
        """The scaled :class:`~ldm.models.controlnet.ControlResiduals`, or None when no row
        uses this ControlNet (it is then not run)."""
        if not bool((self.scales != 0).any()):
            return None
        # diffusers leaves out guess mode's per-block ramp for a globally pooled (shuffle) ControlNet.
        ramp = self.guess_mode and not self.model.config.global_pool_conditions
        return self.model(x, t, context, self.hint).scaled(self.scales, guess_mode=ramp)


def _same_models(parts: Sequence[tuple[ControlInput, ...]]) -> bool:
    first = parts[0]
    return all(len(p) == len(first) and all(a.model is b.model and a.guess_mode == b.guess_mode
                                             for a, b in zip(p, first)) for p in parts)


def cat_controls(parts: Sequence[tuple[ControlInput, ...]]) -> tuple[ControlInput, ...]:
    """Rows of several batches' controls stacked (the same ControlNets in each)."""
    if not _same_models(parts):
        raise ValueError("cannot batch conditioning with different ControlNets")
    return tuple(dataclasses.replace(c, hint=torch.cat([p[i].hint for p in parts]), scales=torch.cat([p[i].scales for p in parts]))
                 for i, c in enumerate(parts[0]))


@dataclass(frozen=True)
class Conditioning:
    """Per-row conditioning of a U-Net batch; every tensor field has the batch on dim 0.

    ``context``: the cross-attention context, ``(B, tokens, width)``, the text
    encoder's hidden states.
    ``concat``: extra U-Net input channels stacked after the latents, ``(B, C, h, w)``:
    a 9-channel inpainting model's mask and masked-image latents (diffusers'
    ``torch.cat([latents, mask, masked_image_latents], dim=1)``); ``None`` otherwise.
    ``pooled`` / ``time_ids``: SDXL's pooled text embedding ``(B, dim)`` and its size,
    crop and aesthetic ids ``(B, 6 or 5)`` (diffusers' ``added_cond_kwargs``
    ``text_embeds`` / ``time_ids``); ``None`` for SD1/SD2.
    ``control``: the ControlNets run before the U-Net, with each row's hint and scale
    (:mod:`ldm.control`); ``None`` without.
    ``timestep_cond``: a guidance-distilled U-Net's guidance-scale embedding
    ``(B, time_cond_proj_dim)`` (diffusers' ``timestep_cond``; see
    :func:`with_guidance_embedding`); ``None`` for other U-Nets.
    """

    context: Tensor
    concat: Tensor | None = None
    pooled: Tensor | None = None
    time_ids: Tensor | None = None
    control: tuple[ControlInput, ...] | None = None
    timestep_cond: Tensor | None = None

    def __post_init__(self) -> None:
        rows = {name: t.shape[0] for name, t in self._tensors()}
        rows |= {f"control[{i}]": c.hint.shape[0] for i, c in enumerate(self.control or ())}
        if len(set(rows.values())) > 1:
            raise ValueError(f"conditioning fields disagree on the batch size: {rows}")

    def _tensors(self) -> list[tuple[str, Tensor]]:
        return [(f.name, v) for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)]

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def _map(self, fn: Any) -> "Conditioning":
        control = tuple(c._map(fn) for c in self.control) if self.control is not None else None
        return dataclasses.replace(self, control=control, **{name: fn(t) for name, t in self._tensors()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; ``dtype`` applies to floating-point fields only."""
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def select(self, rows: slice) -> "Conditioning":
        """The rows ``rows`` of every field (a sub-batch)."""
        return self._map(lambda t: t[rows])

    def zeros(self) -> "Conditioning":
        """The same shapes, all zeros (SDXL's empty negative prompt); ``time_ids`` are kept."""
        return self.replace(**{name: torch.zeros_like(t) for name, t in self._tensors() if name in ("context", "pooled")})

    def replace(self, **fields: Any) -> "Conditioning":
        """A copy with ``fields`` replaced (e.g. ``concat`` for a 9-channel model)."""
        return dataclasses.replace(self, **fields)

    @classmethod
    def cat(cls, parts: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of ``parts`` stacked field by field (CFG's ``[uncond, cond]`` batch)."""
        first = parts[0]
        fields = {}
        for f in dataclasses.fields(first):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "control" and any(v is not None for v in values):
                if any(v is None for v in values):
                    raise ValueError("cannot batch conditioning with and without ControlNets")
                fields[f.name] = cat_controls(values)
            elif isinstance(values[0], Tensor):
                shapes = {tuple(v.shape[1:]) for v in values}
                if len(shapes) > 1:
                    raise ValueError(f"cannot batch conditioning: {f.name} shapes differ beyond the batch: {shapes}")
                fields[f.name] = torch.cat(values)
            elif any(v != values[0] for v in values):
                raise ValueError(f"cannot batch conditioning with different {f.name}: {values}")
            else:
                fields[f.name] = values[0]
        return dataclasses.replace(first, **fields)


@dataclass(frozen=True)
class ScheduledConditioning:
    """Conditioning that changes with the sampling step (prompt editing, alternation).

    ``segments[k]`` is the batch's :class:`Conditioning` for the sampling steps ``s``
    (0-based, over the steps a call runs) with ``ends[k - 1] < s <= ends[k]``:
    AUTOMATIC1111's rule (``reconstruct_cond_batch``: the first entry whose
    ``end_at_step`` is at or after the step). Steps past the last end use the last
    segment. Every segment has the same batch size and field shapes, so the guidance
    batch can be built for each segment once. The methods of :class:`Conditioning`
    that transform a batch apply to every segment; segments that are the same
    object stay shared.
    """

    segments: tuple[Conditioning, ...]
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.segments or len(self.segments) != len(self.ends):
            raise ValueError(
                f"a scheduled conditioning needs one end step per segment, got {len(self.segments)} "
                f"segments and {len(self.ends)} ends"
            )
        if any(not isinstance(s, Conditioning) for s in self.segments):
            raise TypeError("segments must all be Conditioning")
        if any(b <= a for a, b in zip(self.ends, self.ends[1:])):
            raise ValueError(f"segment end steps must increase, got {self.ends}")
        shapes = {tuple((name, tuple(t.shape)) for name, t in s._tensors()) for s in self.segments}
        if len(shapes) > 1:
            raise ValueError(f"segments differ in field shapes: {sorted(shapes)}")

    @property
    def batch_size(self) -> int:
        return self.segments[0].batch_size

    def at(self, step: int) -> Conditioning:
        """The conditioning of sampling step ``step`` (0-based)."""
        return self.segments[min(bisect_left(self.ends, step), len(self.ends) - 1)]

    def _each(self, fn: Callable[[Conditioning], Conditioning]) -> "ScheduledConditioning":
        done: dict[int, Conditioning] = {}
        for s in self.segments:
            if id(s) not in done:
                done[id(s)] = fn(s)
        return ScheduledConditioning(tuple(done[id(s)] for s in self.segments), self.ends)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> "ScheduledConditioning":
        return self._each(lambda s: s.to(device, dtype))

    def select(self, rows: slice) -> "ScheduledConditioning":
        return self._each(lambda s: s.select(rows))

    def replace(self, **fields: Any) -> "ScheduledConditioning":
        return self._each(lambda s: s.replace(**fields))

    @classmethod
    def cat(cls, parts: Sequence["Conditioning | ScheduledConditioning"]) -> "ScheduledConditioning":
        """Rows of ``parts`` stacked at every step (a plain :class:`Conditioning` part is
        the same at every step); one segment per run of steps on which no part changes."""
        ends = sorted({e for p in parts if isinstance(p, ScheduledConditioning) for e in p.ends})
        if not ends:
            raise ValueError("ScheduledConditioning.cat needs at least one scheduled part")
        built: dict[tuple[int, ...], Conditioning] = {}
        segments = []
        for end in ends:
            picked = [p.at(end) if isinstance(p, ScheduledConditioning) else p for p in parts]
            key = tuple(id(c) for c in picked)
            if key not in built:
                built[key] = Conditioning.cat(picked)
            segments.append(built[key])
        return cls(tuple(segments), tuple(ends))


def run_unet(unet: Any, x: Tensor, t: Tensor, cond: Conditioning, cache: Any = None) -> Tensor:
    """Call the U-Net with what ``cond`` carries; ``cond`` is already in the U-Net's dtype
    and on its device (cast once per call with :meth:`Conditioning.to`, not per step).
    ``cache``: the sampling run's :class:`~ldm.models.feature_cache.FeatureCache`, if any."""
    extra: dict[str, Any] = {} if cache is None else {"cache": cache}
    if cond.pooled is not None:
        extra.update(text_embeds=cond.pooled, time_ids=cond.time_ids)
    if cond.control:
        residuals = control_residuals(cond.control, x, t, cond.context)
        if residuals is not None:
            extra.update(down_residuals=residuals.down, mid_residual=residuals.mid)
    if cond.timestep_cond is not None:
        extra.update(timestep_cond=cond.timestep_cond)
    if cond.concat is not None:
        x = torch.cat([x, cond.concat], dim=1)
    return unet(x, t, cond.context, **extra)


def with_guidance_embedding(cond: "Conditioning | ScheduledConditioning", guidance_scale: float,
                            width: int) -> "Conditioning | ScheduledConditioning":
    """``cond`` with a guidance-distilled U-Net's ``timestep_cond`` for every row: the
    embedding of ``w = guidance_scale - 1`` (LCM distils classifier-free guidance with
    ``eps_uncond + (w + 1) (eps_cond - eps_uncond)``, so ``w + 1`` is the usual scale;
    diffusers' ``LatentConsistencyModelPipeline``), ``width`` its ``time_cond_proj_dim``."""
    w = torch.full((cond.batch_size,), float(guidance_scale) - 1.0)
    return cond.replace(timestep_cond=guidance_scale_embedding(w, width))


def control_residuals(controls: Sequence[ControlInput], x: Tensor, t: Tensor, context: Tensor) -> Any:
    """The summed residuals of the ControlNets that act on some row (diffusers'
    ``MultiControlNetModel``); None when none does."""
    total = None
    for control in controls:
        out = control.residuals(x, t, context)
        if out is not None:
            total = out if total is None else total + out
    return total
