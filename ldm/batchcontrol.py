"""The ``control`` key of a JSONL batch line: its ControlNets, checked when the file is read.

``"control": [{"model": "control_v11p_sd15_canny", "image": "edges/cat.png", "scale": 0.8,
"preprocess": "canny:low=50,high=150", "start": 0, "end": 1, "guess_mode": false}, ...]``:
``model`` and ``image`` are required; ``model`` is a ControlNet file or folder relative to the
prompt file's folder, else a name found in the model search folders and their ``ControlNet/``
(:func:`ldm.controlspec.controlnet_path`); ``image`` is the picture the hint is made from,
relative to the prompt file's folder; ``preprocess`` is ``NAME[:key=value,...]`` as
``ldm generate --control-preprocess`` takes it (default ``none``: the picture is the hint).

Here the values are checked and the paths must exist; the pictures are read and hashed with
the editing inputs (:mod:`ldm.batchinputs`) and the ControlNets loaded once the model is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .batchedit import InputPath, input_path
from .controlmeta import ControlParams, thresholds_of
from .controlspec import check_range, check_scale, controlnet_path, parse_preprocess, seeded
from .modelref import ModelRef, model_name, search_dirs

CONTROL_KEYS = ("model", "image", "scale", "preprocess", "start", "end", "guess_mode")


@dataclass(frozen=True)
class LineControl:
    """One ControlNet of a line: its file, hint picture and settings (``params``: the
    preprocessor's, defaults filled in)."""

    model: InputPath
    image: InputPath
    scale: float = 1.0
    preprocess: str = "none"
    params: tuple[tuple[str, int], ...] = ()
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    @property
    def key(self) -> tuple:
        """What a call shares with another line's ControlNet: equal files and settings."""
        return (self.model.resolved, self.image.resolved, self.scale, self.preprocess, self.params, self.start,
                self.end, self.guess_mode)

    @property
    def seeded(self) -> bool:
        """Whether its hint is drawn from each image's seed (one call per image)."""
        return seeded(self.preprocess)

    def unit(self, ref: ModelRef | None = None) -> ControlParams:
        """The unit an image's PNG text records (``ref``: the ControlNet's name and hash)."""
        return ControlParams(model=ref.name if ref else model_name(self.model.resolved),
                             model_hash=ref.hash if ref else None, preprocess=self.preprocess,
                             thresholds=thresholds_of(self.preprocess, dict(self.params)), scale=self.scale,
                             start=self.start, end=self.end, guess_mode=self.guess_mode)


@functools.lru_cache(maxsize=256)  # a file of many lines naming one ControlNet looks it up once
def _model_path(value: str, base: str, dirs: tuple[str, ...]) -> str:
    return str(controlnet_path(value, Path(base)).resolve())


def _model(value: Any, base: Path) -> InputPath:
    if not isinstance(value, str) or not value:
        raise ValueError(f"model must be a ControlNet path or name (a non-empty string), got {value!r:.80}")
    try:
        resolved = _model_path(value, str(base), tuple(str(d) for d in search_dirs()))
    except OSError as exc:  # not found, or a search folder that cannot be listed
        raise ValueError(str(exc)) from None
    return InputPath(value, resolved)


def _one(obj: Any, k: int, base: Path) -> LineControl:
    where = f"control[{k}]"
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object with 'model' and 'image', got {obj!r:.80}")
    unknown = sorted(set(obj) - set(CONTROL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(repr(u)[:40] for u in unknown[:5])}; valid keys: "
                         f"{', '.join(CONTROL_KEYS)}")
    missing = [key for key in ("model", "image") if key not in obj]
    if missing:
        raise ValueError(f"{where}: missing {missing[0]!r}")
    text = obj.get("preprocess", "none")
    if not isinstance(text, str):
        raise ValueError(f"{where} preprocess must be a string NAME[:key=value,...], got {text!r:.80}")
    guess = obj.get("guess_mode", False)
    if not isinstance(guess, bool):
        raise ValueError(f"{where} guess_mode must be true or false, got {guess!r:.80}")
    try:
        name, params = parse_preprocess(text)
        scale = check_scale(obj.get("scale", 1.0), f"{where} scale")
        start, end = check_range(obj.get("start", 0.0), obj.get("end", 1.0), where)
    except ValueError as exc:
        raise ValueError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
    return LineControl(_model(obj["model"], base), input_path(obj["image"], f"{where} image", base), scale, name,
                       tuple(sorted(params.items())), start, end, guess)


def controls_from_object(value: Any, base: Path) -> tuple[LineControl, ...]:
    """A line's ``control`` value (a non-empty list of objects); ValueError says what is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"control must be a non-empty list of objects with 'model' and 'image', got {value!r:.80}")
    return tuple(_one(obj, k, base) for k, obj in enumerate(value))
