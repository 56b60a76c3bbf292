"""LoRA files as AUTOMATIC1111's web UI finds, names and hashes them, and its prompt tags.

- :func:`lora_search_dirs` / :func:`find_lora`: a LoRA is found by name (its file's stem)
  in the given folders, then those in ``LDM_LORA_DIR`` (``os.pathsep``-separated), as
  A1111 finds ``<lora:name>`` in its ``models/Lora`` folder (subfolders included).
- :func:`lora_hash`: the short hash A1111 writes in ``Lora hashes`` (``network.py``
  ``NetworkOnDisk``): the ``sshs_model_hash`` a trainer stored in the header if any,
  else the "addnet" hash (``modules/hashes.py`` ``addnet_hash_safetensors``: SHA-256 of
  the file after its header); SHA-256 of the whole file for other formats; first 12 hex digits.
- :func:`extract_lora_tags`: ``<lora:name>``, ``<lora:name:0.8>``, ``<lora:name:te:unet>``,
  ``<lora:name:te=0.5:unet=1>`` (``modules/extra_networks.py`` ``re_extra_net`` /
  ``parse_prompt`` and ``extra_networks_lora.py``), removed from the prompt exactly as
  A1111 removes them.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.files import SAFETENSORS_SUFFIX, check_regular_file, read_safetensors_header

__all__ = ["LORA_DIR_ENV", "LORA_SUFFIXES", "LoraTag", "extract_lora_tags", "find_lora", "lora_hash",
           "lora_search_dirs"]

logger = logging.getLogger("ldm")

LORA_DIR_ENV = "LDM_LORA_DIR"
# Looked for in this order; the pickle formats load only with allow_pickle=True.
LORA_SUFFIXES = (SAFETENSORS_SUFFIX, ".pt", ".ckpt", ".bin")
# A1111 modules/extra_networks.py: re_extra_net
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# The extra-network names A1111 hands to its Lora extension ("lyco" is an alias of "lora").
_LORA_NETWORKS = ("lora", "lyco")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def lora_search_dirs(extra: Sequence[str | os.PathLike] | None = None,
                     environ: Mapping[str, str] | None = None) -> list[Path]:
    """The folders LoRAs are looked up in: ``extra`` first, then the entries of
    ``LDM_LORA_DIR`` (from ``environ``, default ``os.environ``); duplicates dropped."""
    if extra is None:
        extra = []
    if isinstance(extra, (str, bytes, os.PathLike)) or not isinstance(extra, Sequence):
        raise TypeError(f"extra must be a list of folders, got {extra!r:.80}")
    for folder in extra:
        if not isinstance(folder, (str, os.PathLike)):
            raise TypeError(f"LoRA folders must be paths, got {folder!r:.80}")
    from_env = (os.environ if environ is None else environ).get(LORA_DIR_ENV, "")
    folders = [Path(f) for f in extra] + [Path(f) for f in from_env.split(os.pathsep) if f.strip()]
    return list(dict.fromkeys(folders))


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"LoRA name must be a str, got {type(name).__name__}")
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0", os.sep)):
        raise ValueError(f"LoRA name {name!r} must be a file name without folders (e.g. 'ink_style')")
    return name


def _file_names(name: str) -> list[str]:
    """``name`` itself if it has a LoRA suffix, else ``name`` + each suffix in order."""
    if name.lower().endswith(LORA_SUFFIXES):
        return [name]
    return [name + suffix for suffix in LORA_SUFFIXES]


def find_lora(name: str, dirs: Sequence[str | os.PathLike]) -> Path:
    """The file of the LoRA called ``name`` (``name.safetensors``, then ``.pt``, ``.ckpt``,
    ``.bin``): in each folder of ``dirs`` in order, directly, then in its subfolders.

    A name found more than once in one folder's subfolders resolves to the first in
    sorted order, and the others are logged. FileNotFoundError names every folder searched.
    """
    wanted = _file_names(_check_name(name))
    searched: list[str] = []
    for folder in lora_search_dirs(dirs, environ={}):
        if not folder.is_dir():
            searched.append(f"{folder} (not a folder)")
            continue
        searched.append(str(folder))
        direct = [folder / n for n in wanted if (folder / n).is_file()]
        if direct:
            return direct[0]
        nested = sorted((p for n in wanted for p in folder.rglob(n) if p.is_file()),
                        key=lambda p: (wanted.index(p.name), p))
        if nested:
            if len(nested) > 1:
                logger.warning("LoRA %r: using %s; also found %s", name, nested[0],
                               ", ".join(map(str, nested[1:])))
            return nested[0]
    where = "; ".join(searched) if searched else f"no folders (pass some, or set {LORA_DIR_ENV})"
    raise FileNotFoundError(f"no LoRA named {name!r} ({', '.join(wanted)}) in: {where}")


def lora_hash(path: str | os.PathLike) -> str:
    """The 12-hex-digit hash A1111 writes for this file in ``Lora hashes``."""
    path = Path(path)
    check_regular_file(path, "LoRA file")
    start = 0
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        _, metadata = read_safetensors_header(path)
        stored = metadata.get("sshs_model_hash", "")
        if _SHA256_HEX.fullmatch(stored):  # A1111 prefers the trainer's (kohya-ss) hash
            return stored[:12]
        with open(path, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
    with open(path, "rb") as fh:
        fh.seek(start)
        return hashlib.file_digest(fh, "sha256").hexdigest()[:12]


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:...>`` tag: which LoRA, and its text-encoder and U-Net multipliers."""

    name: str
    text_encoder: float
    unet: float
    tag: str  # the tag as written


def _multiplier(value: str, what: str, tag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{tag}: the {what} multiplier {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{tag}: the {what} multiplier must be finite, got {value!r}")
    return number


def _parse_tag(tag: str, args: str) -> LoraTag:
    # A1111 ExtraNetworkParams: "key=value" items are named, the rest positional.
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:  # dyn= (rank truncation) is not supported
        extra = unknown or [":".join(positional[3:])]
        raise ValueError(f"{tag}: unsupported argument(s) {', '.join(map(repr, extra))}; "
                         "expected <lora:name>, <lora:name:te>, <lora:name:te:unet> or te=/unet=")
    if not positional or not positional[0]:
        raise ValueError(f"{tag}: the LoRA name is missing (expected <lora:name:multiplier>)")
    # extra_networks_lora.py: te from the 2nd item (default 1), unet from the 3rd (default te)
    te = _multiplier(positional[1], "text-encoder", tag) if len(positional) > 1 else 1.0
    te = _multiplier(named["te"], "text-encoder", tag) if "te" in named else te
    unet = _multiplier(positional[2], "U-Net", tag) if len(positional) > 2 else te
    unet = _multiplier(named["unet"], "U-Net", tag) if "unet" in named else unet
    return LoraTag(positional[0], te, unet, tag)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt with its ``<lora:...>`` (and ``<lyco:...>``) tags removed, and the tags
    in order. Other ``<name:...>`` extra-network tags (hypernetworks) stay in the text.
    A malformed tag is a ValueError naming it."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    tags: list[LoraTag] = []

    def found(match: re.Match) -> str:
        if match.group(1) not in _LORA_NETWORKS:
            return match.group(0)
        tags.append(_parse_tag(match.group(0), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(found, prompt), tags
