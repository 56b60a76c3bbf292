"""``<lora:name:weight>`` tags in prompts, applied for the one call that has them.

As in AUTOMATIC1111's web UI, a tag names a LoRA file by its stem; it is looked up in the
pipeline's LoRA folders (``Pipeline(..., lora_dirs=)``, ``--lora-dir``) and then in
``LDM_LORA_DIR``, and removed from the text before encoding. The LoRAs are merged into the
weights for the call and taken out after it, so the next call (with other tags, or none)
starts from the model as the user left it; LoRAs loaded with ``pipe.load_lora`` stay.

One call shares one set of weights, so every prompt of a call must carry the same tags
(``ldm batch`` groups its lines by their tags). The web UI takes the first prompt's tags
for the whole batch and ignores the others' silently; ldm refuses a mixed call instead.
Tags in a negative prompt are refused: the web UI does not read them either, and as text
they would condition the picture on the tag's letters.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .lora import LoraSet
from .lora_files import LoraTag, extract_lora_tags, find_lora, lora_hash, lora_search_dirs

# Names the call's LoRAs are loaded under: a tag can never take the name of a LoRA the
# user loaded with load_lora (those names cannot start with "<").
_TAG_NAME = "<lora:{}>"


def split_tags(prompts: Sequence[str], negatives: Sequence[str]) -> tuple[list[str], tuple[LoraTag, ...]]:
    """The prompts without their tags, and the tags they share (ValueError if they differ
    between prompts, or if a negative prompt has one)."""
    texts: list[str] = []
    shared: tuple[LoraTag, ...] | None = None
    first = 0
    for i, prompt in enumerate(prompts):
        text, tags = extract_lora_tags(prompt)
        texts.append(text)
        key = tuple(tags)
        if shared is None:
            shared = key
        elif _settings(key) != _settings(shared):
            raise ValueError(
                f"prompt {i} has LoRA tags {_listed(key)} but prompt {first} has {_listed(shared)}: one call "
                "applies one set of LoRAs; render them in separate calls (ldm batch groups lines by their tags)"
            )
    for i, negative in enumerate(negatives):
        if extract_lora_tags(negative)[1]:
            raise ValueError(f"negative prompt {i} has a <lora:...> tag; LoRA tags belong in the prompt "
                             "(the web UI does not apply them from the negative prompt either)")
    return texts, shared or ()


def _settings(tags: tuple[LoraTag, ...]) -> list[tuple[str, float, float]]:
    return [(t.name, t.text_encoder, t.unet) for t in tags]


def _listed(tags: tuple[LoraTag, ...]) -> str:
    return ", ".join(t.tag for t in tags) or "none"


def resolve_tags(tags: Sequence[LoraTag], dirs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Each tag's file (FileNotFoundError naming every folder searched); a LoRA named twice is an error."""
    folders = lora_search_dirs(list(dirs))
    files: dict[str, Path] = {}
    for tag in tags:
        if tag.name in files:
            raise ValueError(f"LoRA {tag.name!r} is tagged twice in the prompt; give it once with its weight")
        files[tag.name] = find_lora(tag.name, folders)
    return files


@lru_cache(maxsize=256)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    return lora_hash(path)


def file_hash(path: Path) -> str:
    """:func:`lora_hash`, computed once per file version (a batch tags the same files many times)."""
    stat = path.stat()
    return _cached_hash(str(path), stat.st_size, stat.st_mtime_ns)


@contextmanager
def tagged_loras(loras: LoraSet, tags: Sequence[LoraTag], dirs: Sequence[str | os.PathLike], *,
                 allow_pickle: bool = False) -> Iterator[dict[str, str]]:
    """Apply the tags' LoRAs for the ``with`` block; yields ``{name: hash}`` for the PNG
    text (``Lora hashes``). Every file is found before any is applied; on leaving, every
    weight they changed gets its value from before the block back."""
    files = resolve_tags(tags, dirs)
    hashes = {name: file_hash(path) for name, path in files.items()}
    loaded: list[str] = []
    # Weights change outside inference mode (a caller may be in it): the merged weights
    # and their saved originals must stay ordinary tensors for later calls.
    with torch.inference_mode(False), torch.no_grad():
        try:
            for tag in tags:
                loaded.append(loras.load(files[tag.name], tag.unet, _TAG_NAME.format(tag.name),
                                         text_encoder_scale=tag.text_encoder, allow_pickle=allow_pickle))
        except BaseException:
            for name in reversed(loaded):
                loras.unload(name)
            raise
    try:
        yield hashes
    finally:
        with torch.inference_mode(False), torch.no_grad():
            for name in reversed(loaded):
                loras.unload(name)
