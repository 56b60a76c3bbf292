"""Naming and hashing models the way AUTOMATIC1111 does, and finding them again.

``Model hash`` in an image's parameters is the web UI's "AutoV2" hash of a
checkpoint file: the first 10 hex digits of the SHA-256 of the whole file.
A diffusers folder has no single file, so ldm defines the equivalent as the
first 10 hex digits of the SHA-256 of the text made of one line
``<relative/posix/path>\\0<sha256 hex of the file>\\n`` per file in the folder
and its subfolders (``*.safetensors``, ``*.bin``, ``*.json``, ``*.txt``: weights,
configs and tokenizer files; hidden files skipped), in sorted path order. It
changes exactly when a weight, config or vocabulary file does.

``Model`` is the file name without extension (``v1-5-pruned-emaonly``), or the
folder's name for a diffusers folder.

ControlNets are named as sd-webui-controlnet names them in an image's ``ControlNet N``
text: ``control_v11p_sd15_canny [d14c016b]``, the file's stem and the web UI's *old* model
hash (modules/sd_models.py ``model_hash``, which the extension's ``get_all_models`` prints):
the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (fewer bytes, or none,
in a shorter file; the extension's choice, prone to collisions, so a name is looked up
first). A diffusers ``ControlNetModel`` folder has no such file: its hash is the first 8
hex digits of its folder hash above. They are found in the search dirs and their
``ControlNet/`` subfolders (the web UI's models/ControlNet).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from .paths import WEIGHTS_DIR

FOLDER_SUFFIXES = (".safetensors", ".bin", ".json", ".txt")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SEARCH_ENV = "LDM_MODEL_PATH"
HASH_LENGTH = 10
# The web UI's old model hash (sd_models.model_hash): 64 KiB at 1 MiB, 8 hex digits.
OLD_HASH_OFFSET, OLD_HASH_BYTES, OLD_HASH_LENGTH = 0x100000, 0x10000, 8
CONTROLNET_SUBDIR = "ControlNet"  # the web UI's models/ControlNet
CONTROLNET_CLASS = "ControlNetModel"  # a diffusers ControlNet folder's config.json _class_name
CONTROLNET_SUFFIXES = (*CHECKPOINT_SUFFIXES, ".bin")  # the extension's CN_MODEL_EXTS


@dataclass(frozen=True)
class ModelRef:
    path: Path
    name: str
    hash: str


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime too, so a file replaced in place is hashed again.
    p = Path(path)
    if not p.is_dir():
        return _sha256_file(p)[:HASH_LENGTH]
    lines = []
    for f in sorted(p.rglob("*"), key=lambda q: q.relative_to(p).as_posix()):
        rel = f.relative_to(p)
        if not f.is_file() or f.suffix not in FOLDER_SUFFIXES or any(x.startswith(".") for x in rel.parts):
            continue
        lines.append(f"{rel.as_posix()}\0{_sha256_file(f)}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()[:HASH_LENGTH]


def _stamp(path: Path) -> tuple[int, int]:
    if not path.is_dir():
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    # A folder's own mtime misses edits inside it: combine its files' stamps.
    stamps = [(f.stat().st_size, f.stat().st_mtime_ns) for f in path.rglob("*") if f.is_file()]
    return sum(s for s, _ in stamps), max((m for _, m in stamps), default=0)


def model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "AutoV2" hash of a checkpoint file, or ldm's folder equivalent."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    return _cached_hash(str(path), *_stamp(path))


def model_name(path: str | os.PathLike) -> str:
    path = Path(path)
    return path.name if path.is_dir() else path.stem


def model_ref(path: str | os.PathLike) -> ModelRef:
    path = Path(path)
    return ModelRef(path, model_name(path), model_hash(path))


def old_model_hash(path: str | os.PathLike) -> str:
    """The web UI's old 8-digit model hash of a file (see the module docstring); a folder's
    is the first 8 digits of :func:`model_hash`."""
    path = Path(path).resolve()
    if path.is_dir():
        return model_hash(path)[:OLD_HASH_LENGTH]
    with open(path, "rb") as f:  # FileNotFoundError names the path
        f.seek(OLD_HASH_OFFSET)
        return hashlib.sha256(f.read(OLD_HASH_BYTES)).hexdigest()[:OLD_HASH_LENGTH]


def controlnet_ref(path: str | os.PathLike) -> ModelRef:
    """A ControlNet's name and hash as sd-webui-controlnet writes them (``name [hash]``)."""
    path = Path(path)
    return ModelRef(path, model_name(path), old_model_hash(path))


def search_dirs() -> list[Path]:
    """Where :func:`find_model` looks: ``$LDM_MODEL_PATH`` (os.pathsep-separated),
    the folder of the shipped model, and the current folder."""
    dirs = [Path(d) for d in os.environ.get(SEARCH_ENV, "").split(os.pathsep) if d]
    return [*dirs, WEIGHTS_DIR, Path.cwd()]


def _candidates(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES:
            found.append(p)
        elif p.is_dir() and (p / "model_index.json").is_file():
            found.append(p)
    return found


def _is_controlnet_folder(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text("utf-8")).get("_class_name") == CONTROLNET_CLASS
    except (OSError, ValueError, AttributeError):  # not a readable JSON object: not a ControlNet folder
        return False


def _controlnet_candidates(folder: Path) -> list[Path]:
    """ControlNet files and diffusers ControlNet folders in ``folder`` and its ``ControlNet/``."""
    found: list[Path] = []
    for where in (folder, folder / CONTROLNET_SUBDIR):
        if where.is_dir():
            entries = sorted(where.iterdir())
            found += [p for p in entries if p.is_file() and p.suffix in CONTROLNET_SUFFIXES]
            found += [p for p in entries if p.is_dir() and _is_controlnet_folder(p)]
    return found


def find_controlnet(name: str | None, hash: str | None, dirs: list[Path] | None = None, *,
                    flag: str = "--control") -> Path:
    """The ControlNet an image's ``ControlNet N`` names (``Model: name [hash]``): by name
    first, else by the web UI's old hash, in :func:`search_dirs` and their ``ControlNet/``
    subfolders. FileNotFoundError says where it looked and that ``flag`` gives it."""
    return find_model(name, hash, dirs, what="ControlNet", flag=flag, listing=_controlnet_candidates,
                      hash_of=old_model_hash)


def find_model(name: str | None, hash: str | None, dirs: list[Path] | None = None, *, what: str = "model",
               flag: str = "--model", listing: Callable[[Path], list[Path]] = _candidates,
               name_of: Callable[[Path], str] = model_name, hash_of: Callable[[Path], str] = model_hash) -> Path:
    """The model an image names: by ``Model`` name first, else by ``Model hash`` (likewise
    the refiner of its ``Refiner: name [hash]``; ``listing`` / ``name_of`` / ``hash_of``: what
    a folder offers, what each is called and hashed, for files of another kind such as VAEs).

    Raises FileNotFoundError naming the places searched, ``what`` was sought and the
    ``flag`` that gives it.
    """
    dirs = search_dirs() if dirs is None else dirs
    candidates = [p for d in dirs for p in listing(d)]
    if name:
        by_name = [p for p in candidates if name_of(p) == name]
        if by_name:
            return by_name[0]
    if hash:
        for p in candidates:
            if hash_of(p) == hash.lower():
                return p
    wanted = " ".join(x for x in (f"{name!r}" if name else "", f"[{hash}]" if hash else "") if x) or "(unnamed)"
    raise FileNotFoundError(
        f"{what} {wanted} not found in {', '.join(str(d) for d in dirs)}; pass {flag} PATH "
        f"or add its folder to ${SEARCH_ENV}"
    )
