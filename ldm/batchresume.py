"""Resuming a batch: what an output folder already holds, judged against the plan.

Read-only. An image counts as done when its file exists and its manifest entry (or, for
a file whose entry was lost to a kill, the parameters stored in its PNG) matches what
its line asks for now. Only files the plan names are ever judged stale (and so ever
deleted by ``--overwrite``); a manifest entry cannot point anywhere else.

An image made from input files (``ldm.batchedit``) is done only if its entry records
the same SHA-256 for each of them as this run read: an input changed since is its own
refusal (``changed_inputs``), redone like a conflict with ``--overwrite``. Such an
image's file found without an entry is rendered again, as its PNG cannot tell which
input made it. The input paths an entry records are never opened.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest
from .batchplan import Item
from .pngmeta import GenerationParams, parse_parameters, read_text


@dataclass
class Reconciled:
    """What an output folder already holds, judged against the planned items."""

    entries: list[dict[str, Any]]  # the manifest to write: kept + adopted entries
    done: set[manifest.Key] = field(default_factory=set)
    adopted: int = 0  # files found without an entry, whose PNG parameters matched
    dropped: int = 0  # entries whose file was missing
    conflicts: list[str] = field(default_factory=list)
    changed_inputs: list[str] = field(default_factory=list)  # "line L: role 'path' (resolved)", once each
    stale_files: list[Path] = field(default_factory=list)  # planned files to delete when overwriting
    unplanned: list[str] = field(default_factory=list)  # files of conflicting entries: never deleted


# Fields a batch records since a later version than others (the U-Net's dtype): an entry
# written before has none, and is not a conflict for lacking it.
RECORDED_LATER = ("dtype",)
# Fields an entry records of how the run went, not of what the batch asked (how the VAE ran
# depends on the free memory): never a conflict.
OUTCOMES = ("vae_tiling",)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> str:
    diffs = [f"{k} {a.get(k)!r} vs now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3]) or "file name"


def _settings(made: dict[str, Any] | Item, entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an image was (an entry) or is to be (an item) made with, its input files aside.
    Unset values (None, empty) are left out, so an entry written before a setting existed
    equals one that leaves it at its default. For an item compared with ``entry``, the
    fields recorded only since later versions are left out where the entry lacks them."""
    if isinstance(made, Item):
        settings = {**made.params.to_dict(), "outpaint": made.outpaint}
        for name in RECORDED_LATER:
            if entry is not None and name not in entry["parameters"]:
                settings.pop(name, None)
    else:
        settings = {**made["parameters"], "outpaint": made.get("outpaint")}
    return {k: v for k, v in settings.items() if v is not None and v != {} and v != [] and k not in OUTCOMES}


def _changed_inputs(entry: dict[str, Any], item: Item) -> list[str]:
    """The inputs of ``item`` whose hash differs from the one its image was made with."""
    made_with = entry.get("inputs", {})
    return [f"line {item.job.line}: {role} {now['path']!r:.200} ({now['resolved']})"
            for role, now in item.inputs.items() if made_with.get(role, {}).get("sha256") != now["sha256"]]


def _stale(outdir: Path, entry: dict[str, Any], item: Item, result: Reconciled) -> None:
    """An entry of another version of ``item``: its file is redone with ``--overwrite``
    if it is the planned name, else kept and only reported."""
    if entry["file"] == item.file:
        result.stale_files.append(outdir / item.file)
    else:
        result.unplanned.append(entry["file"])


def own_file(path: Path) -> bool:
    """A regular file, not a link that could lead out of the output folder."""
    return path.is_file() and not path.is_symlink()


def _judge_entry(outdir: Path, entry: dict[str, Any], item: Item | None, result: Reconciled) -> None:
    if not own_file(outdir / entry["file"]):
        result.dropped += 1  # rendered again if still planned
    elif item is None:  # a line that is now invalid or gone: kept, not ours to judge
        result.entries.append(entry)
    elif _settings(entry) != (planned := _settings(item, entry)) or entry["file"] != item.file:
        result.conflicts.append(f"{entry['file']} (line {item.job.line}, image {item.index}): "
                                f"{_differences(_settings(entry), planned)}")
        _stale(outdir, entry, item, result)
    elif changed := _changed_inputs(entry, item):
        result.changed_inputs += [c for c in changed if c not in result.changed_inputs]
        _stale(outdir, entry, item, result)
    else:
        result.entries.append(entry)
        result.done.add(item.key)


def _png_params(path: Path) -> GenerationParams | None:
    try:
        return parse_parameters(read_text(path))
    except Exception:  # noqa: BLE001 - whatever makes a file unreadable, it is not this image
        return None


def _adopt(path: Path, item: Item, result: Reconciled) -> None:
    """A planned file without an entry (killed between writing it and recording it):
    kept if its PNG parameters are this image's, how the run went aside (and it was made
    from no input file, which they cannot vouch for), else a conflict."""
    made = _png_params(path)
    if made is None or made.replace(**dict.fromkeys(OUTCOMES)).to_text() != item.params.to_text():
        result.conflicts.append(f"{item.file} (line {item.job.line}, image {item.index}): its PNG parameters differ")
        result.stale_files.append(path)
    elif not item.inputs:  # else rendered again: the same image if its inputs are as they were
        mtime = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
        result.entries.append(item.made_with(made.vae_tiling).entry(mtime.isoformat(timespec="seconds")))
        result.done.add(item.key)
        result.adopted += 1


def reconcile(outdir: Path, items: list[Item]) -> Reconciled:
    """Read-only: compare the manifest, its parts and the files with ``items``."""
    planned = {item.key: item for item in items}
    result = Reconciled(entries=[])
    for entry in manifest.read_entries(outdir):
        _judge_entry(outdir, entry, planned.get(manifest.entry_key(entry)), result)
    for key, item in planned.items():
        path = outdir / item.file
        if key not in result.done and path not in result.stale_files and own_file(path):
            _adopt(path, item, result)
    return result
