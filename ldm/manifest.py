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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

from .atomicio import atomic_write_bytes

logger = logging.getLogger("ldm")

MANIFEST = "manifest.jsonl"
PART_GLOB = "manifest.part-*.jsonl"

Key = tuple[int, int]  # (line, index)


def part_path(outdir: Path, rank: int) -> Path:
    return outdir / f"manifest.part-{rank:05d}.jsonl"


def entry_key(entry: dict[str, Any]) -> Key:
    return int(entry["line"]), int(entry["index"])


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    entries = []
    data = path.read_text(encoding="utf-8")
    lines = data.split("\n")
    # A crash mid-append can leave a last line without its newline: not an entry yet.
    complete = lines[:-1]
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            entry_key(entry)
            entry["file"] = str(entry["file"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s:%d: unreadable manifest entry, ignored", path, number)
            continue
        entries.append(entry)
    if lines[-1].strip():
        logger.info("%s: incomplete last entry (interrupted write) ignored", path)
    return entries


def manifest_files(outdir: Path) -> list[Path]:
    files = [outdir / MANIFEST] if (outdir / MANIFEST).is_file() else []
    return files + sorted(outdir.glob(PART_GLOB))


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
    parts = sorted(outdir.glob(PART_GLOB))
    path = atomic_write_bytes(outdir / MANIFEST, text.encode("utf-8"))
    for p in parts:
        p.unlink(missing_ok=True)
    return path


def merge(outdir: Path) -> list[dict[str, Any]]:
    """Fold the parts into ``manifest.jsonl``; returns the merged entries, sorted."""
    entries = read_entries(outdir)
    write_manifest(outdir, entries)
    return sorted(entries, key=entry_key)
