"""Several LoRA-family files on one model at once, each with its own scales.

>>> loras = LoraSet(pipe.unet, pipe.text_encoders, pipe.config)  # SDXL base: both encoders
>>> loras.load("styles/ink.safetensors", 0.8)            # name "ink"
>>> loras.load("detail.safetensors", 1.0, text_encoder_scale=0.5)
>>> loras.set_scale("ink", 0.4)
>>> loras.unload("ink")                                   # or loras.unload() for all

Merged into the weights, not patched into the forward pass. Every layer a loaded file
touches holds ``W = W0 + sum_i s_i * dW_i``, computed in float32 from a pristine copy of
``W0`` (kept, in the weight's own dtype, from the first time the layer is touched) and
cast to the weight's dtype; ``s_i`` is the file's multiplier for the layer's component
(U-Net or text encoders: SDXL's two share one multiplier, as A1111's ``te`` and diffusers'
``lora_scale`` do) and ``dW_i`` its delta (alpha/rank included, see
:mod:`ldm.adapters.lora_formats`), summed in load order. Changing a scale or unloading
recomputes only the layers that file touches, from ``W0``: unloading the last file of a
layer copies ``W0`` back, bit for bit, and a scale set later gives exactly the weights
that loading with that scale gives.

Why merged: sampling calls the U-Net 20-50 times (twice per step with guidance) while
scales change between images at most, so merging moves all the cost to the switch.
Measured on one thread of a shared 2-core Intel Xeon, float32, batch 2 (CFG), a LoRA on
every attention, feed-forward, projection and ResNet layer, minimum of 8-30 rounds:
a patched forward (a hook adding ``s * up(down(x))`` per layer, as PEFT and A1111's
forward mode do) costs +21-45% per call on the toy U-Net (108 layers, rank 8/32), +13-25%
on SD1.5's 320-channel resnet+transformer pair at 64x64 latents and +0-10% at 1280
channels; the merged model runs the plain model's kernels (within noise). One
:meth:`LoraSet.set_scale` takes 6-15 ms on the toy model and the 320-channel pair,
130-190 ms on the 1280-channel pair, 1.4-1.6 s for all 258 such layers of the full SD1.5
U-Net (a fraction of one 512-px U-Net call on that CPU; ``scripts/bench_lora.py``). The effect is the same: the parity tests compare the merged
weights with diffusers' patched PEFT layers (images agree to about 1e-5).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..validation import check_finite
from .lora_formats import Delta, read_lora
from .lora_keys import TEXT, TEXT2, UNET, ModuleIndex, Target

__all__ = ["LoraSet", "LoadedLora"]

logger = logging.getLogger("ldm")


@dataclass(frozen=True)
class LoadedLora:
    """One loaded file: the name it is known by, where it came from, its multipliers."""

    name: str
    path: Path
    unet_scale: float
    text_encoder_scale: float
    layers: int  # how many layers it changes


@dataclass
class _Entry:
    path: Path
    deltas: dict[Target, Delta]
    scales: dict[str, float]  # component -> multiplier


def _scales(scale: float, text_encoder_scale: float | None) -> dict[str, float]:
    unet = check_finite(scale, "scale")
    text = unet if text_encoder_scale is None else check_finite(text_encoder_scale, "text_encoder_scale")
    return {UNET: unet, TEXT: text, TEXT2: text}


def _text_encoders(text_encoder: nn.Module | Sequence[nn.Module], config: ModelConfig) -> tuple[nn.Module, ...]:
    encoders = (text_encoder,) if isinstance(text_encoder, nn.Module) else text_encoder
    if not isinstance(encoders, Sequence) or not all(isinstance(m, nn.Module) for m in encoders):
        raise TypeError(f"text_encoder must be a torch.nn.Module or a sequence of them, got {text_encoder!r:.80}")
    wanted = len(config.text_encoders)
    if len(encoders) != wanted:
        raise ValueError(f"the {config.family} model has {wanted} text encoder(s) but {len(encoders)} were given")
    return tuple(encoders)


class LoraSet:
    """The LoRA-family files applied to one U-Net and its text encoders (see the module docs).

    ``text_encoder``: the model's text encoder, or its encoders in ``config.text_encoders``
    order (SDXL base: CLIP ViT-L, then OpenCLIP ViT-bigG)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | Sequence[nn.Module], config: ModelConfig) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
        self.config = config
        self._unet = unet
        self._text_encoders = _text_encoders(text_encoder, config)
        self._index: ModuleIndex | None = None
        self._entries: dict[str, _Entry] = {}  # in load order: the order deltas are summed
        self._originals: dict[Target, torch.Tensor] = {}

    @property
    def index(self) -> ModuleIndex:
        """The model's patchable layers by every name a file may use (built on first use)."""
        if self._index is None:
            self._index = ModuleIndex(self._unet, self._text_encoders[0], self.config.unet, *self._text_encoders[1:])
        return self._index

    @property
    def loaded(self) -> list[LoadedLora]:
        """The loaded files, in load order."""
        return [LoadedLora(name, e.path, e.scales[UNET], e.scales[TEXT], len(e.deltas))
                for name, e in self._entries.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None, *,
             text_encoder_scale: float | None = None, allow_pickle: bool = False) -> str:
        """Apply a LoRA / LoCon / LoHa / LoKr file; return the name it is known by
        (``name``, default the file's stem).

        ``scale`` multiplies its U-Net layers and, unless ``text_encoder_scale`` is given,
        its text-encoder layers (A1111's ``<lora:name:te:unet>`` has one of each). The file
        is checked whole before any weight changes (:class:`~ldm.adapters.lora_formats.LoraError`).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
        path = Path(path)
        scales = _scales(scale, text_encoder_scale)
        name = self._new_name(path.stem if name is None else name, path)
        first = next(self._unet.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        deltas = read_lora(path, self.index, self.config, device=device, allow_pickle=allow_pickle)
        entry = _Entry(path, {d.target: d for d in deltas}, scales)
        self._entries[name] = entry
        try:
            self._refresh(entry.deltas)
        except BaseException:
            # e.g. out of memory half-way: put every layer back as it was
            del self._entries[name]
            self._refresh(entry.deltas)
            raise
        logger.info("loaded LoRA %r from %s: %d layers, scale %g (text encoder %g)",
                    name, path, len(deltas), scales[UNET], scales[TEXT])
        return name

    def set_scale(self, name: str, scale: float, *, text_encoder_scale: float | None = None) -> None:
        """Change a loaded file's multipliers (as :meth:`load` takes them)."""
        entry = self._entry(name)
        entry.scales = _scales(scale, text_encoder_scale)
        self._refresh(entry.deltas)

    def unload(self, name: str | None = None) -> None:
        """Remove one file, or all (``None``); layers no file touches get their exact
        original weights back."""
        names = list(self._entries) if name is None else [self._checked_name(name)]
        for n in names:
            self._refresh(self._entries.pop(n).deltas)

    # --- internals --------------------------------------------------------------------

    def _checked_name(self, name: object) -> str:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if name not in self._entries:
            loaded = ", ".join(map(repr, self._entries)) or "none"
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {loaded})")
        return name

    def _entry(self, name: object) -> _Entry:
        return self._entries[self._checked_name(name)]

    def _new_name(self, name: object, path: Path) -> str:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str, got {name!r}")
        if name in self._entries:
            raise ValueError(
                f"a LoRA named {name!r} is already loaded (from {self._entries[name].path}); to load "
                f"{path} unload it first (unload_lora({name!r})), or pass name= to load it under another "
                "name, or change its scale with set_lora_scale"
            )
        return name

    def _refresh(self, targets: dict[Target, Delta]) -> None:
        with torch.no_grad():
            for target in targets:
                self._recompute(target)

    def _recompute(self, target: Target) -> None:
        """``W = W0 + sum_i s_i dW_i`` for one layer, from the pristine ``W0``, in float32
        (in place for a float32 weight; through a float32 copy for half precision)."""
        weight = self.index.module(target).weight
        active = [(e.scales[target.component], e.deltas[target]) for e in self._entries.values()
                  if target in e.deltas]
        original = self._originals.get(target)
        if not active:
            if original is not None:
                weight.copy_(original)  # copy_ casts if the model changed dtype since
                del self._originals[target]
            return
        if original is None:
            original = self._originals[target] = weight.detach().clone()
        if weight.dtype == torch.float32:
            total = weight
            total.copy_(original)
        else:
            total = original.to(device=weight.device, dtype=torch.float32, copy=True)
        for scale, delta in active:
            delta.add_to(total, scale)
        if total is not weight:
            weight.copy_(total)
