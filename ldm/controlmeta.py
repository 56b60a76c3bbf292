"""ControlNet units in PNG parameters, in the format of the web UI's ControlNet extension.

sd-webui-controlnet (Mikubill) writes one key per enabled unit, ``ControlNet 0``,
``ControlNet 1``, ..., whose value is its own ``Field: value, ...`` list
(internal_controlnet/args.py ``ControlNetUnit.serialize``; no value may hold ``,`` or ``:``)::

    ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1, Resize Mode: Just Resize,
    Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1,
    Pixel Perfect: True, Control Mode: Balanced"

What ``ldm`` writes there and how it maps:

- ``Module``: the preprocessor (:data:`ldm.control_preprocess.PREPROCESSORS`: ``none``,
  ``canny``, ``threshold``, ``shuffle`` share the extension's names; ``scribble`` is ldm's
  own, ControlNet's ``gradio_scribble2image`` binarisation, which the extension has no module
  for). ``Threshold A`` / ``Threshold B``: the extension's two sliders, canny's ``low`` /
  ``high`` and threshold's / scribble's ``threshold``; a slider the module does not use is
  written as the extension writes it (its hidden default 0.5) and ignored when read.
- ``Model``: ``name [hash]``, :func:`ldm.modelref.controlnet_ref` (the web UI's old 8-digit hash).
- ``Weight``, ``Guidance Start``, ``Guidance End``: :class:`ldm.Control`'s scale, start, end.
- ``Control Mode``: ``Balanced`` is plain ControlNet; ``ControlNet is more important`` is
  guess mode, the mode the extension made of the original guess mode: residuals on the
  conditional half of guidance only, the shallow ones weaker (the extension scales block ``i``
  of 13 by ``0.825 ** (12 - i)``, diffusers and ldm by ``10 ** ((i - 12) / 12)``, which is
  ``0.8254 ** (12 - i)``: at most 0.59% apart, on the shallowest block). ``My prompt is more
  important`` (the soft weights on both halves) has no ldm equivalent and is refused.
- ``Resize Mode``: ``Just Resize``: ldm stretches the hint to the output size (Lanczos). The
  extension's ``Crop and Resize`` / ``Resize and Fill`` give the same picture for a hint of the
  output's aspect ratio only; :meth:`ControlParams.check_hint` refuses any other.
- ``Pixel Perfect: True`` with ``Processor Res`` the output's shorter side: ldm detects at the
  output size. A unit detected at another resolution is read, and refused where it matters
  (:meth:`ControlParams.check_detection`).

A unit ldm cannot reproduce (another control mode, advanced weighting, a unit without a
model, a damaged value, a field whose effect ldm does not know) raises :class:`ValueError`
in :func:`parse_unit`; :mod:`ldm.pngmeta` keeps its text aside and refuses it when asked to
render it. Fields that change nothing here (``Low Vram``, ``Save Detected Map``, ``Hr Option``
for the web UI's hires fix) are read and dropped.

The hint image itself is not in the text (the extension does not write it either): an image
made with a ControlNet is made again with its hint given anew.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

PREFIX = "ControlNet "
KEY = re.compile(r"^ControlNet (\d+)$")
BALANCED, GUESS, PROMPT_MODE = "Balanced", "ControlNet is more important", "My prompt is more important"
JUST_RESIZE = "Just Resize"
# The extension's resize modes, and the old names it still reads (ControlNetUnit.check_resize_mode).
RESIZE_MODES = {JUST_RESIZE: JUST_RESIZE, "Crop and Resize": "Crop and Resize", "Resize and Fill": "Resize and Fill",
                "Inner Fit (Scale to Fit)": "Crop and Resize", "Outer Fit (Shrink to Fit)": "Resize and Fill",
                "Scale to Fit (Inner Fit)": "Crop and Resize", "Envelope (Outer Fit)": "Resize and Fill"}
# Preprocessor -> the parameters the extension's Threshold A and B sliders hold; its keys are
# ldm.control_preprocess.PREPROCESSORS (not imported: reading PNG text needs no OpenCV).
SLIDERS: dict[str, tuple[str, ...]] = {"none": (), "canny": ("low", "high"), "threshold": ("threshold",),
                                       "scribble": ("threshold",), "shuffle": ()}
UNUSED_SLIDER = 0.5  # what the extension writes for a slider its module hides (PreprocessorParameter.value)
_FIELDS = ("Module", "Model", "Weight", "Resize Mode", "Processor Res", "Threshold A", "Threshold B",
           "Guidance Start", "Guidance End", "Pixel Perfect", "Control Mode")
_HARMLESS = ("Low Vram", "Save Detected Map", "Hr Option")
_TITLE = re.compile(r"^(.*?)(?: \[([0-9a-fA-F]+)\])?$", re.S)
_FORBIDDEN = (",", ":")  # the extension's separators; its serialize() refuses them in values
MAX_LEVEL = 255


@dataclass(frozen=True)
class ControlParams:
    """One ControlNet unit of an image's parameters (see the module docstring).

    ``thresholds``: the preprocessor's slider parameters (``{"low": 100, "high": 200}`` for
    canny), as :func:`ldm.control_preprocess.preprocess` takes them. ``processor_res``: the
    resolution the hint was detected at when not the output's (None: pixel perfect, as ldm does).
    """

    model: str
    model_hash: str | None = None
    preprocess: str = "none"
    thresholds: dict[str, int] | None = None
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    resize_mode: str = JUST_RESIZE
    processor_res: int | None = None

    @property
    def label(self) -> str:
        """``Model`` as the extension writes it: ``name [hash]``."""
        return f"{self.model} [{self.model_hash}]" if self.model_hash else self.model

    def check_module(self) -> None:
        """ValueError for a preprocessor ldm does not have (one the web UI ran)."""
        if self.preprocess not in SLIDERS:
            raise ValueError(f"preprocessor {self.preprocess!r} is not one ldm has ({', '.join(SLIDERS)}): "
                             "make the hint elsewhere and give it with preprocessor none")

    def check_detection(self, width: int, height: int) -> None:
        """ValueError unless ldm's hint equals the one detected for this unit at ``width`` x
        ``height``: a known preprocessor, detected at the output size (or none)."""
        self.check_module()
        if self.preprocess != "none" and self.processor_res not in (None, min(width, height)):
            raise ValueError(f"its hint was detected at {self.processor_res} pixels (Processor Res, without Pixel "
                             f"Perfect); ldm detects at the output size ({min(width, height)} here): give the "
                             "detected hint with preprocessor none, or choose the preprocessor anew")

    def check_hint(self, hint_size: tuple[int, int], width: int, height: int) -> None:
        """ValueError if the hint (``(w, h)``) would be fitted otherwise than the unit's
        ``Resize Mode`` fitted it: modes agree only for a hint of the output's aspect ratio."""
        if self.resize_mode != JUST_RESIZE and hint_size[0] * height != hint_size[1] * width:
            raise ValueError(f"made with Resize Mode {self.resize_mode!r}, and the hint is {hint_size[0]}x"
                             f"{hint_size[1]} for a {width}x{height} picture: ldm stretches the hint ({JUST_RESIZE}); "
                             "give a hint of the picture's aspect ratio")


def thresholds_of(preprocess: str, params: dict[str, Any]) -> dict[str, int] | None:
    """The slider parameters of ``params`` a unit records (None for a module without sliders)."""
    names = SLIDERS.get(preprocess, ())
    return {name: params[name] for name in names if name in params} or None


def check_writable(c: ControlParams) -> None:
    """ValueError for a unit whose text would not read back: a name with the extension's separators."""
    for what, text in (("ControlNet name", c.model), ("preprocessor", c.preprocess)):
        if any(ch in text for ch in _FORBIDDEN) or text != text.strip() or not text or "\n" in text:
            raise ValueError(f"{what} {text!r} cannot be written in the web UI's ControlNet text (no ',' or ':', "
                             "no spaces around it); rename the file")


def format_unit(c: ControlParams, width: int | None, height: int | None) -> str:
    """The unit's text (see the module docstring); ``width`` x ``height``: the output size."""
    from .pngmeta import _number  # one number format for the whole text

    sliders = [(c.thresholds or {}).get(name) for name in SLIDERS.get(c.preprocess, ())]
    a, b = (sliders + [None, None])[:2]
    res = c.processor_res if c.processor_res is not None else min(width or 0, height or 0) or -1
    values = (c.preprocess, c.label, c.scale, c.resize_mode, res, UNUSED_SLIDER if a is None else a,
              UNUSED_SLIDER if b is None else b, c.start, c.end, c.processor_res is None,
              GUESS if c.guess_mode else BALANCED)
    return ", ".join(f"{k}: {_number(v) if isinstance(v, float) else v}" for k, v in zip(_FIELDS, values))


def _items(text: str) -> dict[str, str]:
    """``Field: value, ...`` as the extension's ``ControlNetUnit.parse`` splits it."""
    items: dict[str, str] = {}
    for item in text.split(","):
        parts = item.strip().split(": ")
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"{item.strip()!r:.60} is not 'Field: value'")
        items[parts[0]] = parts[1].strip()
    return items


def _float(items: dict[str, str], key: str, default: float) -> float:
    if key not in items:
        return default
    try:
        value = float(items[key])
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {items[key]!r:.40}")
    return value


def _fraction(items: dict[str, str], key: str, default: float) -> float:
    value = _float(items, key, default)
    if not 0 <= value <= 1:
        raise ValueError(f"{key} must be a fraction of the steps from 0 to 1, got {value:g}")
    return value


def _whole(value: float, key: str, low: int, high: int) -> int:
    if not value.is_integer() or not low <= value <= high:
        raise ValueError(f"{key} must be a whole number from {low} to {high}, got {value:g}")
    return int(value)


def _bool(items: dict[str, str], key: str, default: bool) -> bool:
    value = items.get(key, str(default))
    if value not in ("True", "False"):
        raise ValueError(f"{key} must be True or False, got {value!r:.40}")
    return value == "True"


def _thresholds(items: dict[str, str], module: str) -> dict[str, int] | None:
    names = SLIDERS.get(module, ())
    found = {}
    for name, key in zip(names, ("Threshold A", "Threshold B")):
        if key in items:
            found[name] = _whole(_float(items, key, 0.0), key, 0, MAX_LEVEL)
    return found or None


def _mode(items: dict[str, str]) -> bool:
    mode = items.get("Control Mode", BALANCED)
    if mode == PROMPT_MODE:
        raise ValueError(f"Control Mode {PROMPT_MODE!r} (soft weights on both halves of guidance) has no ldm "
                         f"equivalent; ldm has {BALANCED!r} and {GUESS!r} (guess mode)")
    if mode not in (BALANCED, GUESS):
        raise ValueError(f"unknown Control Mode {mode!r:.60}; valid: {BALANCED}, {GUESS}")
    return mode == GUESS


def _model(items: dict[str, str]) -> tuple[str, str | None]:
    title = items.get("Model", "None")
    if title == "None":
        raise ValueError("no Model: a unit without a ControlNet (a preprocessor preview) is not one ldm renders")
    m = _TITLE.match(title)
    if not m[1].strip():
        raise ValueError(f"Model {title!r:.60} has no name")
    return m[1], m[2]


def parse_unit(text: str) -> ControlParams:
    """One unit's text (see the module docstring); ValueError says what ldm cannot reproduce."""
    items = _items(text)
    unknown = [k for k in items if k not in _FIELDS and k not in _HARMLESS]
    if unknown:
        raise ValueError(f"field {unknown[0]!r:.60} is not one ldm knows the effect of; it reads "
                         f"{', '.join(_FIELDS)}")
    module = items.get("Module", "none")
    name, digest = _model(items)
    scale = _float(items, "Weight", 1.0)
    if scale < 0:
        raise ValueError(f"Weight must be >= 0, got {scale:g}")
    start, end = _fraction(items, "Guidance Start", 0.0), _fraction(items, "Guidance End", 1.0)
    if start >= end:
        raise ValueError(f"Guidance Start ({start:g}) must be below Guidance End ({end:g})")
    resize = items.get("Resize Mode", "Crop and Resize")  # the extension's default
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown Resize Mode {resize!r:.60}; valid: {', '.join(dict.fromkeys(RESIZE_MODES.values()))}")
    res = None
    if not _bool(items, "Pixel Perfect", False):
        res = _whole(_float(items, "Processor Res", 512.0), "Processor Res", 1, 1 << 16)
    return ControlParams(model=name, model_hash=digest, preprocess=module, thresholds=_thresholds(items, module),
                         scale=scale, start=start, end=end, guess_mode=_mode(items), resize_mode=RESIZE_MODES[resize],
                         processor_res=res)


def unit_keys(pairs: dict[str, str]) -> list[str]:
    """The ``ControlNet N`` keys of a parameters text, by unit number."""
    return sorted((k for k in pairs if KEY.match(k)), key=lambda k: int(KEY.match(k)[1]))
