"""Exporting what a run trained: the original-layout single file (the format SD
checkpoints are shared in) and the toy CLIP scorer, both written through
:mod:`ldm.atomicio`, and a read-back check of the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..atomicio import atomic_write_bytes
from ..checkpoints import load_model
from ..checkpoints.convert import original_metadata, original_state
from ..config import ModelConfig
from ..toy.clip import scorer_metadata

TEXT_TOWER = "text_model."  # the CLIP keys that live in the main checkpoint, not the scorer


def write_safetensors(tensors: dict[str, Tensor], out: Path, metadata: dict[str, str]) -> int:
    """Write ``tensors`` to ``out`` atomically; its size in bytes.

    Every tensor is cloned on the CPU: safetensors refuses views and tensors that
    share storage, which key conversions (reshapes, splits) can leave behind.
    """
    owned = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, safetensors_bytes(owned, metadata={"format": "pt", **metadata}))
    return out.stat().st_size


def export_checkpoint(config: ModelConfig, states: dict[str, dict[str, Tensor]], out: Path) -> int:
    """Write the original-layout single file (fp16, config in the metadata); its size in bytes.

    ``states``: the ``unet``, ``vae`` and ``text_encoder`` state dicts. Raises if a
    weight does not fit float16.
    """
    half = {c: {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in s.items()}
            for c, s in states.items()}
    for name, state in half.items():
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"{name} weights overflow float16: {bad[:5]}")
    return write_safetensors(original_state(config, half), out, original_metadata(config))


def check_export(out: Path, config: ModelConfig, states: dict[str, dict[str, Tensor]]) -> None:
    """Load the file through the same path as real SD checkpoints and compare every weight."""
    loaded = load_model(out)
    if loaded.config != config:
        raise RuntimeError(f"{out}: config read back differs: {loaded.config} != {config}")
    for name, module in (("unet", loaded.unet), ("vae", loaded.vae), ("text_encoder", loaded.text_encoder)):
        for key, value in module.state_dict().items():
            expected = states[name][key].to(torch.float16).float()
            if not torch.equal(value.float(), expected):
                raise RuntimeError(f"{out}: {name}.{key} differs after loading")


def export_clip_scorer(clip_state: dict[str, Tensor], vision: dict[str, Any], projection_dim: int,
                       out: Path) -> int:
    """The CLIP image tower and both projections: with the text encoder of the main
    checkpoint they score how well a picture matches a caption. Its size in bytes."""
    keep = {k: v for k, v in clip_state.items() if not k.startswith(TEXT_TOWER)}
    return write_safetensors(keep, out, scorer_metadata(vision, projection_dim))
