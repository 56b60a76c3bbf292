"""The input pictures of a batch: read, checked and hashed once per run, loaded per call.

Once the model is loaded, and before anything renders, every input file named by a
line (:mod:`ldm.batchedit`, and the hint pictures of its ControlNets, :mod:`ldm.batchcontrol`)
is read once: it must be a picture PIL can decode, a mask the size of its image. The size a line renders at follows as in the pipeline: the
line's ``size``, else the image's (or the canvas ``extend`` makes) rounded down to
multiples of 8, or the model's native size for the crop of ``mask_padding``. Each
file's SHA-256 goes into the manifest, so a resumed batch can tell that an input
changed since its images were made.

When a call renders, each file is read again and must be the one that was hashed (same
inode, length and modification time): an input edited during the run stops it with
:class:`InputChangedError` rather than making images the manifest would misdescribe.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from .batchcontrol import LineControl
from .batchedit import Edit, InputPath
from .batchfile import Job, LineError
from .editing import default_size, extend, rounded_margins
from .pngmeta import open_regular


class InputChangedError(ValueError):
    """An input file changed after it was hashed in this run."""


@dataclass(frozen=True)
class InputFile:
    """What was read of one input file: its hash, its picture's size and its stamp."""

    sha256: str
    size: tuple[int, int]  # (width, height) in pixels
    stamp: tuple[int, int, int]  # (inode, bytes, mtime in ns) when it was hashed


@dataclass(frozen=True)
class Inputs:
    """The run's input files (by resolved path) and the size each editing line renders at."""

    files: dict[str, InputFile] = field(default_factory=dict)
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # line -> (width, height)
    input_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # line -> what the pipeline receives
    # line -> the "lora_hashes" / "ti_hashes" its PNG text records (see ldm.batch.network_fields)
    networks: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)

    def size_of(self, job: Job, native_size: int) -> tuple[int, int]:
        """The size ``job`` renders at (see :func:`check_inputs`), by default the model's native size."""
        return self.sizes.get(job.line) or job.size or (native_size, native_size)

    def records(self, job: Job) -> dict[str, dict[str, str]]:
        """The manifest's record of a line's input files (its edit's, its ControlNets' hints,
        by role): path as given, resolved, SHA-256."""
        return {role: {"path": p.given, "resolved": p.resolved, "sha256": self.files[p.resolved].sha256}
                for role, p in input_files(job).items()}


def input_files(job: Job) -> dict[str, InputPath]:
    """The files a line reads, by role: ``image``, ``mask``, ``control N`` (the Nth ControlNet's hint)."""
    files = dict(job.edit.inputs()) if job.edit is not None else {}
    files.update({f"control {k}": c.image for k, c in enumerate(job.controls)})
    return files


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _read(path: str) -> tuple[bytes, tuple[int, int, int]]:
    """The bytes of a regular file and its stamp, from one open (no race with a swapped path)."""
    with open_regular(path, lambda mode: OSError(f"{path}: not a regular file")) as f:
        stamp = _stamp(os.fstat(f.fileno()))
        return f.read(), stamp


def _decode(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()  # a truncated file fails here, not in the middle of a batch
    return image


def _inspect(path: InputPath, name: str) -> InputFile:
    try:
        data, stamp = _read(path.resolved)
        size = _decode(data).size
    except Exception as exc:  # noqa: BLE001 - whatever PIL or the OS says, the line cannot render
        raise ValueError(f"{name} {path.given!r:.200}: not a readable picture ({exc})") from None
    return InputFile(hashlib.sha256(data).hexdigest(), size, stamp)


class _Reader:
    """Each input file inspected once, its result (or error) reused by every line naming it."""

    def __init__(self) -> None:
        self.files: dict[str, InputFile] = {}
        self._errors: dict[str, str] = {}

    def __call__(self, path: InputPath, name: str) -> InputFile:
        key = path.resolved
        if key not in self.files and key not in self._errors:
            try:
                self.files[key] = _inspect(path, name)
            except ValueError as exc:
                self._errors[key] = str(exc)
        if key in self._errors:
            raise ValueError(self._errors[key])
        return self.files[key]


def _input_size(edit: Edit, read: Callable[[InputPath, str], InputFile]) -> tuple[int, int]:
    """The size of the picture the pipeline receives: the image, or the canvas around it."""
    width, height = read(edit.image, "image").size
    if edit.mask is not None:
        mask = read(edit.mask, "mask").size
        if mask != (width, height):
            raise ValueError(f"mask {edit.mask.given!r:.200} is {mask[0]}x{mask[1]}, its image "
                             f"{edit.image.given!r:.200} {width}x{height}: they must be the same size")
    if edit.extend is None:
        return width, height
    left, top, right, bottom = rounded_margins((width, height), edit.extend)
    return width + left + right, height + top + bottom


def _render_size(job: Job, input_size: tuple[int, int], native_size: int) -> tuple[int, int]:
    """The line's ``size``, else the input's rounded down to multiples of 8; with
    ``mask_padding`` the crop renders at the model's native size (the pipeline's rule)."""
    size = default_size(*input_size)  # checked in any case: an input under 8 pixels a side is refused
    if job.size:
        return job.size
    return (native_size, native_size) if job.edit.mask_padding is not None else size


def check_inputs(jobs: list[Job], native_size: int) -> tuple[Inputs, list[LineError]]:
    """Read every input of ``jobs`` once; the sizes of the editing lines and the lines that cannot render."""
    read = _Reader()
    sizes, input_sizes, errors = {}, {}, []
    for job in jobs:
        try:
            for k, control in enumerate(job.controls):
                read(control.image, f"control[{k}] image")
        except ValueError as exc:
            errors.append(LineError(job.line, str(exc), job.text))
            continue
        if job.edit is None:
            continue
        try:
            input_size = _input_size(job.edit, read)
            sizes[job.line] = _render_size(job, input_size, native_size)
        except ValueError as exc:
            errors.append(LineError(job.line, str(exc), job.text))
            continue
        input_sizes[job.line] = input_size
    return Inputs(read.files, sizes, input_sizes), errors


def _load(path: InputPath, files: dict[str, InputFile], line: int) -> Any:
    """The picture of an input file, which must still be the one hashed for this run."""
    data, stamp = _read(path.resolved)
    if stamp != files[path.resolved].stamp:
        raise InputChangedError(f"input {path.given!r:.200} of line {line} ({path.resolved}) changed while "
                                "the batch ran; rerun the command once it is final")
    return _decode(data)


def _pictures(edit: Edit, files: dict[str, InputFile], line: int) -> tuple[Any, Any]:
    """A line's image and mask as the pipeline takes them (the canvas and its mask for ``extend``)."""
    image = _load(edit.image, files, line)
    mask = _load(edit.mask, files, line) if edit.mask is not None else None
    if edit.extend is not None:
        image, mask = extend(image, *edit.extend, fill=edit.fill)
    return image, mask


def control_arguments(controls: tuple[LineControl, ...], nets: dict[str, Any], width: int, height: int, seed: int,
                      files: dict[str, InputFile], line: int) -> dict[str, Any]:
    """The ``control`` keyword of a call at ``width`` x ``height`` whose first image has ``seed``
    (the calls' lines have equal ControlNets, :func:`ldm.batchplan.plan_chunks`); ``nets``: the
    loaded ControlNets by resolved path."""
    if not controls:
        return {}
    from .control import Control
    from .controlspec import make_hint

    return {"control": [Control(nets[c.model.resolved], make_hint(c.preprocess, dict(c.params),
                                                                  _load(c.image, files, line), width, height, seed),
                                scale=c.scale, start=c.start, end=c.end, guess_mode=c.guess_mode) for c in controls]}


def edit_arguments(edits: list[tuple[int, Edit | None]], files: dict[str, InputFile]) -> dict[str, Any]:
    """The editing keywords of one pipeline call, for its images' (line, edit) in order.

    The edits share everything but their pictures (:func:`ldm.batchplan.plan_chunks`);
    each line's pictures are read once per call.
    """
    first = edits[0][1]
    if first is None:
        return {}
    pictures = {line: _pictures(edit, files, line) for line, edit in dict(edits).items()}
    kwargs: dict[str, Any] = {"image": [pictures[line][0] for line, _ in edits], "strength": first.strength}
    if first.masked:
        kwargs.update(mask=[pictures[line][1] for line, _ in edits], mask_blur=first.mask_blur)
        if first.mask_padding is not None:
            kwargs["mask_padding"] = first.mask_padding
    return kwargs
