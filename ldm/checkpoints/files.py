"""Reading and writing weight files, validated before anything large is allocated.

A :class:`TensorFile` is a lazy view of one or more weight files: keys and shapes
come from the header (safetensors) without reading tensor data; ``get(key)``
reads one tensor. Pickle files (``.ckpt``/``.pt``/``.pth``/``.bin``) can run
arbitrary code when unpickled, so they are refused unless the caller opts in,
and even then are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..atomicio import non_regular_reason
from ..dtypes import dtype_name

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"

# safetensors dtype -> (torch dtype name, bytes per element): names for messages and
# the float check, sizes to check the data offsets.
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
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


def check_regular_file(path: Path, what: str = "weight file") -> None:
    """FileNotFoundError if ``path`` is missing; CheckpointError if it is a folder,
    a FIFO, a device, ... (reading a FIFO would hang)."""
    try:
        reason = non_regular_reason(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{what} {exc}") from None
    if reason:
        raise CheckpointError(f"{path}: {reason}; expected a {what}")


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors file's header; return ``(entries, metadata)``.

    Checks the 8-byte length prefix, the JSON header (no duplicate names), the
    metadata (strings only), and that every tensor's dtype is known, its shape a
    list of non-negative integers, its data offsets integers that match dtype and
    shape, lie inside the file and overlap no other tensor's, so a truncated
    download, a renamed text file or a corrupt header is reported here, with its path.
    """
    path = Path(path)
    check_regular_file(path)
    header, metadata, _ = _read_header(path)
    return header, metadata


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """:func:`read_safetensors_header` of a path already checked to be a regular file, and
    where the tensor data starts."""
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
    header = _parse_header(path, raw)
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    data_size = size - 8 - n
    for key, entry in header.items():
        _check_entry(path, key, entry, data_size)
    _check_overlaps(path, header)
    return header, metadata, 8 + n


def _unique_object(path: Path):
    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: corrupt safetensors header (name {key!r} appears twice)")
            out[key] = value
        return out

    return hook


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_object(path))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    return header


def _check_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(
            f"{path}: corrupt safetensors header (__metadata__ must map names to strings, "
            f"found {_preview(metadata)})"
        )
    return metadata


def _preview(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_entry(path: Path, key: str, entry: object, data_size: int) -> None:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header (tensor {key!r}: {what})")

    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        raise bad(f"expected the fields {sorted(_ENTRY_FIELDS)}, found {_preview(entry)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_DTYPES:
        raise bad(f"unsupported dtype {_preview(dtype)}; known: {sorted(ST_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"shape {_preview(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise bad(f"data_offsets {_preview(offsets)} is not a pair of integers")
    start, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if start < 0 or end - start != numel * ST_DTYPES[dtype][1]:
        raise bad(f"offsets {start}..{end} do not match {dtype} {shape}")
    if end > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({key!r} ends at byte {end} of the data "
            f"section, which has only {data_size} bytes; re-download or re-convert it)"
        )


def _check_overlaps(path: Path, header: dict[str, dict]) -> None:
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], k) for k, e in header.items()
                   if e["data_offsets"][1] > e["data_offsets"][0])
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(
                f"{path}: corrupt safetensors header (the data of {a!r} and {b!r} overlap)"
            )


class ReadBuffer:
    """One block of memory that tensors read only to be converted at once are read into,
    one after another: a view of it is valid until the next read. Loading the float32
    SD1.5 folder in bfloat16 spent 1.8 s zero-filling and faulting in a fresh bytearray per
    tensor (4.3 GB in all) on a 2-core AMD EPYC; reused, the block is faulted in once."""

    def __init__(self, nbytes: int = 0) -> None:
        self._data = bytearray(nbytes)  # sized for the largest tensor up front: no regrowth

    def view(self, nbytes: int) -> memoryview:
        if nbytes > len(self._data):
            self._data = bytearray(0)  # release the old block before the larger one is made
            self._data = bytearray(nbytes)
        return memoryview(self._data)[:nbytes]


class _CopyReader:
    """Tensors of a checked safetensors file read into memory of their own, not views of a
    mapping: what a loader converting to another dtype wants, since the pages of a mapping
    it has read stay in the process's resident memory until the file is closed (loading a
    float32 SD1.5 folder in bfloat16 peaked at the mapped 4.3 GB plus the 2.1 GB of copies)."""

    def __init__(self, path: Path, header: dict[str, dict], data_start: int) -> None:
        self.path, self.header, self.data_start = path, header, data_start

    def get_tensor(self, key: str, buffer: ReadBuffer | None = None) -> torch.Tensor:
        entry = self.header[key]
        start, end = entry["data_offsets"]
        # Read straight into it: one copy, not bytes then bytearray.
        data = bytearray(end - start) if buffer is None else buffer.view(end - start)
        with open(self.path, "rb") as fh:
            fh.seek(self.data_start + start)
            got = fh.readinto(data)
        if got != end - start:
            raise CheckpointError(f"{self.path}: tensor {key!r} is cut short (the file changed while loading?)")
        dtype = getattr(torch, ST_DTYPES[entry["dtype"]][0])
        if not data:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"])


class TensorFile:
    """Keys, shapes, dtypes (torch names) and lazily read tensors of one or more weight files."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict[str, str],
                 readers: dict[str, object], dtypes: dict[str, str],
                 copy_readers: dict[str, _CopyReader] | None = None) -> None:
        self.path = path
        self.shapes = shapes
        self.metadata = metadata
        self.dtypes = dtypes
        self._readers = readers  # key -> a safe_open handle or an in-memory dict
        self._copy_readers = copy_readers or {}  # key -> a _CopyReader (safetensors files)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def nbytes(self, key: str) -> int:
        """The stored size of tensor ``key`` in bytes."""
        numel = 1
        for d in self.shapes[key]:
            numel *= d
        return numel * getattr(torch, self.dtypes[key]).itemsize

    def get(self, key: str, *, copy: bool = False, buffer: ReadBuffer | None = None) -> torch.Tensor:
        """The tensor ``key``: a view of the mapped file (no copy: best when it is used as
        stored), or with ``copy`` read into its own memory (best when it is converted), or
        into ``buffer`` (a view valid until its next read: for a loader that converts it
        into memory of its own at once)."""
        if copy and key in self._copy_readers:
            try:
                return self._copy_readers[key].get_tensor(key, buffer)
            except OSError as exc:
                raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {exc}") from None
        reader = self._readers[key]
        if isinstance(reader, dict):
            return reader[key]
        try:
            return reader.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r}: {exc}") from None


def open_tensor_file(path: str | Path, *, allow_pickle: bool = False) -> TensorFile:
    """Open a ``.safetensors`` (validated header) or, on opt-in, a pickle checkpoint."""
    path = Path(path)
    check_regular_file(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path, allow_pickle)
    if suffix != SAFETENSORS_SUFFIX:
        raise CheckpointError(
            f"{path}: unknown weight file type {suffix!r}; expected .safetensors "
            f"(or, with allow_pickle=True, one of {list(PICKLE_SUFFIXES)})"
        )
    header, metadata, data_start = _read_header(path)  # checked above
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    dtypes = {k: ST_DTYPES[v["dtype"]][0] for k, v in header.items()}
    copies = _CopyReader(path, header, data_start)
    return TensorFile(path, shapes, dict(metadata), {k: handle for k in shapes}, dtypes, {k: copies for k in shapes})


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
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    dtypes = {k: dtype_name(v.dtype) for k, v in tensors.items()}
    return TensorFile(path, shapes, {}, {k: tensors for k in tensors}, dtypes)


def merge_tensor_files(path: Path, files: list[TensorFile]) -> TensorFile:
    """One view of several shards (a sharded diffusers component)."""
    shapes: dict[str, tuple[int, ...]] = {}
    readers: dict[str, object] = {}
    copies: dict[str, _CopyReader] = {}
    dtypes: dict[str, str] = {}
    for f in files:
        for key in f.shapes:
            shapes[key] = f.shapes[key]
            readers[key] = f._readers[key]
            dtypes[key] = f.dtypes[key]
            if key in f._copy_readers:
                copies[key] = f._copy_readers[key]
    return TensorFile(path, shapes, {}, readers, dtypes, copies)


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
