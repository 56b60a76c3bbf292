"""The manifest of a batch output folder: one JSON line per image written.

``manifest.jsonl`` holds the consolidated record, sorted by (line, index).
While a run is going, each process appends to its own ``manifest.part-RRRRR.jsonl``
(one fsynced ``write`` per entry, right after the image's atomic write), so
processes never write the same file. Parts are merged into ``manifest.jsonl``
(atomically, deterministic order, duplicates dropped) at the start of a run,
which is how a killed run's entries are recovered, and at its end.

An entry::

    {"line": 3, "input": "a red cube", "index": 0, "seed": 2000, "file": "00003-00-2000.png",
     "parameters": {... GenerationParams.to_dict() ...}, "time": "2024-05-01T12:00:00+00:00"}

An image made from input files (a batch line with ``image``/``mask``, or the hint pictures
of its ControlNets, roles ``control 0``, ``control 1``, ...) also records them, and an
outpainted one how its canvas was made::

    "inputs": {"image": {"path": "in/cat.png", "resolved": "/data/in/cat.png", "sha256": "9f86..."},
               "mask": {...}, "control 0": {...}},
    "outpaint": {"extend": [0, 0, 32, 0], "fill": "edge"}

A manifest is a file anyone can edit, so an entry is trusted only as far as it
names its own image: ``file`` must be exactly ``image_name(line, index, seed)``,
a bare name inside the output folder. Any other entry (an absolute path, ``..``,
a folder, another image's name) is ignored with a warning: never read, deleted or
put in a grid. The input paths an entry records are for people to read: ldm
compares their hashes, and never opens, writes or deletes what they name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from .atomicio import atomic_write_bytes
from .validation import is_int

logger = logging.getLogger("ldm")

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part-*.jsonl"

Key = tuple[int, int]  # (line, index)


def image_name(line: int, index: int, seed: int) -> str:
    """``LLLLL-KK-SEED.png``: the file of image ``index`` of prompt-file ``line``."""
    return f"{line:05d}-{index:02d}-{seed}.png"


def part_path(outdir: Path, rank: int) -> Path:
    return outdir / f"manifest.part-{rank:05d}.jsonl"


def entry_key(entry: dict[str, Any]) -> Key:
    return int(entry["line"]), int(entry["index"])


def check_entry(entry: Any) -> None:
    """ValueError unless ``entry`` is a dict naming its own image file (see module docstring)."""
    if not isinstance(entry, dict):
        raise ValueError("not a JSON object")
    numbers = [entry.get(k) for k in ("line", "index", "seed")]
    if not all(is_int(v) and v >= 0 for v in numbers):
        raise ValueError("line, index and seed must be integers >= 0")
    if not isinstance(entry.get("parameters"), dict):
        raise ValueError("no parameters")
    if entry.get("file") != image_name(*numbers):
        raise ValueError(f"file {entry.get('file')!r:.80} is not this entry's image {image_name(*numbers)!r}")
    _check_inputs(entry.get("inputs", {}))


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, dict) or not all(
        isinstance(record, dict) and isinstance(record.get("sha256"), str) for record in inputs.values()
    ):
        raise ValueError("inputs must map each role to a record with its sha256")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    entries = []
    # Undecodable bytes become U+FFFD: that entry is then ignored, not the whole manifest.
    data = path.read_bytes().decode("utf-8", errors="replace")
    lines = data.split("\n")
    # A crash mid-append can leave a last line without its newline: not an entry yet.
    complete = lines[:-1]
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            check_entry(entry)
        except (ValueError, RecursionError) as exc:
            logger.warning("%s:%d: manifest entry ignored: %s", path, number, exc)
            continue
        entries.append(entry)
    if lines[-1].strip():
        logger.info("%s: incomplete last entry (interrupted write) ignored", path)
    return entries


def part_files(outdir: Path) -> list[Path]:
    # Regular files only: never a folder, or a pipe that would block the read.
    return [p for p in sorted(outdir.glob(PART_GLOB)) if p.is_file()]


def manifest_files(outdir: Path) -> list[Path]:
    files = [outdir / MANIFEST] if (outdir / MANIFEST).is_file() else []
    return files + part_files(outdir)


def read_entries(outdir: Path) -> list[dict[str, Any]]:
    """Every entry of the manifest and its parts, first occurrence of each key kept."""
    seen: dict[Key, dict[str, Any]] = {}
    for path in manifest_files(outdir):
        for entry in _read_jsonl(path):
            seen.setdefault(entry_key(entry), entry)
    return list(seen.values())


def dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, sort_keys=False)


def write_manifest(outdir: Path, entries: Iterable[dict[str, Any]]) -> Path:
    """Atomically replace ``manifest.jsonl`` with ``entries`` sorted by (line, index),
    then delete the parts (their entries are in it now)."""
    unique: dict[Key, dict[str, Any]] = {}
    for entry in entries:
        unique.setdefault(entry_key(entry), entry)
    text = "".join(dumps(unique[k]) + "\n" for k in sorted(unique))
    parts = part_files(outdir)
    path = atomic_write_bytes(outdir / MANIFEST, text.encode("utf-8"))
    for p in parts:
        p.unlink(missing_ok=True)
    return path


def merge(outdir: Path) -> list[dict[str, Any]]:
    """Fold the parts into ``manifest.jsonl``; returns the merged entries, sorted."""
    entries = read_entries(outdir)
    write_manifest(outdir, entries)
    return sorted(entries, key=entry_key)
