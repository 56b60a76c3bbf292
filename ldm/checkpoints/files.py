"""Reading and writing weight files, validated before anything large is allocated.

A :class:`TensorFile` is a lazy view of one or more weight files: keys and shapes
come from the header (safetensors) without reading tensor data; ``get(key)``
reads one tensor. Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``) can run
arbitrary code when unpickled, so they are refused unless the caller opts in,
and even then are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

# Bytes per element of each safetensors dtype, to check the data offsets.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# A header larger than this is not a real checkpoint header (safetensors' own limit).
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, unknown, unsupported or mismatched.

    The message always names the path and says what was found.
    """


def pickle_refusal(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: refusing to load a pickle checkpoint ({path.suffix}). Unpickling can run "
        "arbitrary code hidden in the file. Prefer a .safetensors file (convert once with "
        "`ldm convert`); if you trust this file, pass allow_pickle=True (--allow-pickle), "
        "which loads it with torch.load(weights_only=True), never plain pickle."
    )


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors file's header; return ``(entries, metadata)``.

    Checks the 8-byte length prefix, the JSON header, and that every tensor's
    data offsets match its dtype and shape and lie inside the file, so a truncated
    download or a renamed text file is reported here, with its path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes long)")
        (n,) = struct.unpack("<Q", prefix)
        if n < 2 or n > _MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{path}: not a safetensors file (header length field reads {n}; "
                f"first bytes {prefix!r})"
            )
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header needs {8 + n} bytes, "
                f"file has {size})"
            )
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data_size)
    return header, metadata


def _check_entry(path: Path, key: str, entry: object, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header (bad entry for {key!r})") from None
    if dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{path}: unsupported safetensors dtype {dtype!r} for {key!r}")
    numel = 1
    for d in shape:
        numel *= d
    if end - start != numel * _DTYPE_BYTES[dtype] or start < 0:
        raise CheckpointError(
            f"{path}: corrupt safetensors header ({key!r}: offsets {start}..{end} do not "
            f"match {dtype} {shape})"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({key!r} ends at byte {end} of the data "
            f"section, which has only {data_size} bytes; re-download or re-convert it)"
        )


class TensorFile:
    """Keys, shapes and lazily read tensors of one or more weight files."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                 readers: dict[str, object]) -> None:
        self.path = path
        self.shapes = shapes
        self.metadata = metadata
        self._readers = readers  # key -> a safe_open handle or an in-memory dict

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        reader = self._readers[key]
        if isinstance(reader, dict):
            return reader[key]
        return reader.get_tensor(key)


def open_tensor_file(path: str | Path, *, allow_pickle: bool = False) -> TensorFile:
    """Open a ``.safetensors`` (validated header) or, on opt-in, a pickle checkpoint."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a weight file")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_pickle)
    if suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(
            f"{path}: unknown weight file type {suffix!r}; expected .safetensors "
            f"(or, with allow_pickle=True, one of {list(PICKLE_SUFFIXES)})"
        )
    header, metadata = read_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    return TensorFile(path, shapes, dict(metadata), {k: handle for k in shapes})


def _open_pickle(path: Path, allow_pickle: bool) -> TensorFile:
    if not allow_pickle:
        raise pickle_refusal(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: could not load with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Files that need full pickle "
            "are not supported."
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return TensorFile(path, shapes, {}, {k: tensors for k in tensors})


def merge_tensor_files(path: Path, files: list[TensorFile]) -> TensorFile:
    """One view of several shards (a sharded diffusers component)."""
    shapes: dict[str, tuple[int, ...]] = {}
    readers: dict[str, object] = {}
    for f in files:
        for key in f.shapes:
            shapes[key] = f.shapes[key]
            readers[key] = f._readers[key]
    return TensorFile(path, shapes, {}, readers)


# --- atomic writing ----------------------------------------------------------


def _temp_sibling(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}")


def check_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"destination folder does not exist: {dst.parent}")


@contextmanager
def atomic_path(dst: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; move it to ``dst`` only on success.

    A crash or exception leaves ``dst`` untouched (the temporary is removed), so a
    half-written checkpoint never appears under the final name.
    """
    dst = Path(dst)
    check_destination(dst, overwrite)
    tmp = _temp_sibling(dst)
    try:
        yield tmp
        if dst.is_dir() and not dst.is_symlink():
            # Directories cannot be replaced in one rename: move the old one aside first.
            old = _temp_sibling(dst)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` with tensors made contiguous and unshared."""
    out = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})
    os.chmod(path, 0o644)  # safetensors creates files owner-only; checkpoints are shared data
