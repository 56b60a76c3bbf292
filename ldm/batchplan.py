"""The plan of a batch: every image of every line, and how they are grouped into pipeline calls.

The plan depends only on the prompt file, the settings and the model's native size and
tokenizer, never on the number of processes or on what is already on disk, so every
run and every rank computes the same one (see :mod:`ldm.batch`).
"""

from __future__ import annotations

import datetime as _dt
import functools
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import manifest
from .adapters.lora_files import extract_lora_tags
from .batchfile import Job, recorded_clip_skip
from .batchinputs import Inputs
from .modelref import ModelRef
from .pngmeta import GenerationParams, recorded_size_fields
from .prompts import count_chunks


@dataclass(frozen=True)
class Item:
    """One image to render: image ``index`` of a job."""

    job: Job
    index: int
    width: int
    height: int
    params: GenerationParams
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)  # see Inputs.records
    input_size: tuple[int, int] | None = None  # of the picture an editing call receives

    @property
    def key(self) -> manifest.Key:
        return self.job.line, self.index

    @property
    def seed(self) -> int:
        return self.job.seed + self.index

    @property
    def file(self) -> str:
        return manifest.image_name(self.job.line, self.index, self.seed)

    @property
    def outpaint(self) -> dict[str, Any] | None:
        """How the canvas was made (not in the PNG parameters, but it changes the image)."""
        edit = self.job.edit
        if edit is None or edit.extend is None:
            return None
        return {"extend": list(edit.extend), "fill": edit.fill}

    def made_with(self, vae_tiling: str | None) -> "Item":
        """This item as rendered: its parameters with how the VAE ran, which the run found
        (the memory level depends on the free memory), not the batch file."""
        return replace(self, params=self.params.replace(vae_tiling=vae_tiling))

    def entry(self, time: str | None = None) -> dict[str, Any]:
        entry = {
            "line": self.job.line, "input": self.job.text, "index": self.index, "seed": self.seed,
            "file": self.file, "parameters": self.params.to_dict(), "time": time or _now(),
        }
        if self.inputs:
            entry["inputs"] = self.inputs
        if self.outpaint:
            entry["outpaint"] = self.outpaint
        return entry


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def expand(jobs: list[Job], native_size: int, model: ModelRef, inputs: Inputs | None = None,
           refiner: ModelRef | None = None, vae: ModelRef | None = None,
           controlnets: dict[str, ModelRef] | None = None, guidance_embedded: bool = False,
           dtype: str | None = None) -> list[Item]:
    """Every image of every job, with the parameters its PNG will carry (``inputs``:
    the lines' input files, see :func:`ldm.batchinputs.check_inputs`; ``refiner`` and
    ``vae``: the batch's refiner and VAE file, named in every image; ``controlnets``: the
    name and hash of each ControlNet the lines use, by resolved path; ``guidance_embedded``: the
    model is guidance-distilled, its guidance scale recorded as such; ``dtype``: the U-Net's, by name)."""
    inputs = inputs or Inputs()
    items = []
    named = {"refiner": refiner.name, "refiner_hash": refiner.hash} if refiner is not None else {}
    if vae is not None:
        named.update(vae=vae.name, vae_hash=vae.hash)
    for job in jobs:
        width, height = inputs.size_of(job, native_size)
        records = inputs.records(job)
        sdxl = recorded_size_fields(job.sdxl.kwargs(), width, height)
        units = tuple(c.unit((controlnets or {}).get(c.model.resolved)) for c in job.controls)
        for k in range(job.n):
            params = GenerationParams(
                prompt=job.prompt, negative_prompt=job.negative_prompt, steps=job.steps,
                sampler=job.sampler, schedule=job.schedule, spacing=job.spacing, guidance_scale=job.guidance,
                guidance_embedding=job.guidance if guidance_embedded else None, seed=job.seed + k,
                width=width, height=height, model=model.name, model_hash=model.hash,
                clip_skip=recorded_clip_skip(job.clip_skip), **inputs.networks.get(job.line, {}),
                **(job.edit.params() if job.edit else {}), **sdxl, **named,
                refiner_start=job.refiner_start if refiner is not None else None, controls=units,
                **job.speedups.params(), dtype=dtype,
            )
            items.append(Item(job, k, width, height, params, records, inputs.input_sizes.get(job.line)))
    return items


def _edit_key(item: Item) -> tuple | None:
    """What one editing call shares besides the pictures (None: text to image)."""
    edit = item.job.edit
    if edit is None:
        return None
    return item.input_size, edit.strength, edit.masked, edit.mask_blur, edit.mask_padding


def _control_key(item: Item) -> tuple:
    """What one call's ControlNets share: equal files and settings; a hint drawn from the
    image's seed (shuffle) makes each image its own call."""
    controls = item.job.controls
    return tuple(c.key for c in controls), item.seed if any(c.seeded for c in controls) else None


@functools.lru_cache(maxsize=None)
def _tag_settings(prompt: str) -> tuple:
    return tuple((t.name, t.text_encoder, t.unet) for t in extract_lora_tags(prompt)[1])


def plan_chunks(items: list[Item], batch_size: int, context_chunks: Callable[[Item], int]) -> list[list[Item]]:
    """Items grouped by what one pipeline call must share, in line order, cut into
    chunks of ``batch_size``; groups ordered by their first line."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        j = item.job
        # A call applies one set of <lora:...> tags: lines with other tags (or weights) go apart.
        key = (item.width, item.height, j.steps, j.sampler, j.schedule, j.spacing, j.guidance, j.clip_skip, j.sdxl,
               j.refiner_start, j.speedups, _tag_settings(j.prompt), context_chunks(item), _edit_key(item),
               _control_key(item))
        groups.setdefault(key, []).append(item)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def token_chunks(tokenizer: Any, embeddings: Any = None) -> Callable[[Item], int]:
    """The number of 77-token rows an item's text context has in a single call
    (see :func:`ldm.prompts.count_chunks`: weights, BREAK, commas, prompt editing)."""

    @functools.lru_cache(maxsize=None)  # a line's n images share its texts: tokenized once
    def count(text: str, steps: int) -> int:
        return count_chunks(tokenizer, text, steps=steps, embeddings=embeddings)

    def chunks(item: Item) -> int:
        j = item.job
        n = count(extract_lora_tags(j.prompt)[0], j.steps)  # the text the pipeline encodes
        return max(n, count(j.negative_prompt, j.steps)) if j.guidance > 1 else n

    return chunks
