"""`ldm generate`'s ControlNet options, checked and resolved before any model loads.

``--control MODEL:HINT.png[:SCALE]`` (repeatable; see :mod:`ldm.controlspec` for how it is
split) asks for a ControlNet. ``--control-preprocess NAME[:key=value,...]``,
``--control-start F`` and ``--control-end F`` are given once (for every ControlNet) or once
per ControlNet, in order; ``--guess-mode`` / ``--no-guess-mode`` is for all of them.

``--from IMAGE.png`` finds the image's ControlNets by name or hash (``ControlNet N`` keys)
but its hints are not in the text: ``--control-image HINT.png`` gives them again, one per
ControlNet in order (the picture the preprocessor read, which the image's ``Module`` and
thresholds process again at the output size). ``--control`` instead replaces the image's
ControlNets; the other options override theirs.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..controlmeta import JUST_RESIZE, ControlParams, check_writable, thresholds_of
from ..controlspec import (
    ControlText, check_preprocess, check_range, controlnet_path, make_hint, parse_control, parse_preprocess, seeded,
)
from ..editing import load_image
from ..modelref import ModelRef
from ..pngmeta import GenerationParams
from .common import printable

logger = logging.getLogger("ldm")

_SETS_PREPROCESSOR = " (--control-preprocess NAME sets the preprocessor)"
_PER_CONTROL = (("control_preprocess", "--control-preprocess"), ("control_start", "--control-start"),
                ("control_end", "--control-end"))


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet to load and apply: its file, its name and hash, the picture the hint is
    made from, and the unit its PNG text records."""

    path: Path
    ref: ModelRef
    image: np.ndarray
    unit: ControlParams

    @property
    def params(self) -> dict[str, int]:
        return dict(self.unit.thresholds or {})


def _typed(parse: Any, expected: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = expected
    return convert


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError(f"must be a fraction of the steps from 0 to 1, got {text!r}")
    return value


def add_control_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("ControlNet")
    g.add_argument("--control", action="append", type=_typed(parse_control, "MODEL:HINT[:SCALE]"), default=None,
                   metavar="MODEL:HINT.png[:SCALE]",
                   help="a ControlNet (file, folder, or name in the model folders and their ControlNet/) and its hint "
                   "picture, scale default 1 (repeatable; split at the last ':' before a numeric SCALE, so HINT "
                   "cannot hold ':'). With --from, replaces the image's ControlNets")
    g.add_argument("--control-image", action="append", type=Path, default=None, metavar="HINT.png",
                   help="with --from: the hint picture of the image's ControlNet, one per ControlNet in order (the text "
                   "does not hold it)")
    g.add_argument("--control-preprocess", action="append", type=_typed(parse_preprocess, "NAME[:key=value,...]"),
                   default=None, metavar="NAME[:k=v,...]",
                   help="make the hint from the picture: none (default: the picture is the hint), canny[:low=100,"
                   "high=200], scribble[:threshold=127], threshold[:threshold=127], shuffle (from each image's seed); "
                   "once for all ControlNets or once per --control")
    g.add_argument("--control-start", action="append", type=_typed(_fraction, "F"), default=None, metavar="F",
                   help="fraction of the steps before which the ControlNet does not act (default 0; once for all "
                   "or once per --control)")
    g.add_argument("--control-end", action="append", type=_typed(_fraction, "F"), default=None, metavar="F",
                   help="fraction of the steps after which it stops (default 1; once for all or once per --control)")
    g.add_argument("--guess-mode", action=argparse.BooleanOptionalAction, default=None,
                   help="guess mode for every ControlNet (the web UI's 'ControlNet is more important'): residuals on "
                   "the prompt's half of guidance only, the shallow ones weaker")


def check_control_flags(args: argparse.Namespace) -> None:
    """ControlNet options that cannot go together, refused before anything is read."""
    if args.control_image and not args.from_image:
        raise ValueError("--control-image needs --from IMAGE.png (it gives that image's hints); give a ControlNet "
                         "with --control MODEL:HINT.png")
    if args.control_image and args.control:
        raise ValueError("--control-image and --control cannot go together: --control replaces the image's "
                         "ControlNets, with their hints")
    if not args.control and not args.from_image and _first_given(args, _PER_CONTROL):
        raise ValueError(f"{_first_given(args, _PER_CONTROL)} needs --control MODEL:HINT.png")
    if args.control:
        _per_control_counts(args, len(args.control), "--control")


def _first_given(args: argparse.Namespace, options: tuple[tuple[str, str], ...]) -> str | None:
    """The first of ``options`` (or --guess-mode) given on the command line, as its flag."""
    given = [flag for name, flag in options if getattr(args, name)]
    if args.guess_mode is not None:
        given.append("--guess-mode")
    return given[0] if given else None


def _per_control_counts(args: argparse.Namespace, n: int, what: str) -> None:
    for name, flag in _PER_CONTROL:
        values = getattr(args, name) or []
        if len(values) not in (0, 1, n):
            raise ValueError(f"{flag} is given {len(values)} times for {n} ControlNet(s) ({what}): give it once (for "
                             "all) or once per ControlNet")


def _nth(values: list[Any] | None, k: int) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values[k]


def without_controls(p: GenerationParams) -> GenerationParams:
    """``p`` without its ControlNets (those read and those set aside): ``--control`` replaces them."""
    from ..controlmeta import KEY

    return p.replace(controls=(), extra={k: v for k, v in p.extra.items() if not KEY.match(k)})


def _hint(path: Path, flag: str) -> np.ndarray:
    try:
        return load_image(path, f"{flag} {path}")
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag}: hint picture {path} not found") from None


def _new_unit(text: ControlText, ref: ModelRef) -> ControlParams:
    return ControlParams(model=ref.name, model_hash=ref.hash, scale=1.0 if text.scale is None else text.scale)


def _from_flags(args: argparse.Namespace) -> list[ControlRequest]:
    from ..modelref import controlnet_ref

    requests = []
    for text in args.control:
        image = _hint(Path(text.hint), "--control")
        path = controlnet_path(text.model)
        ref = controlnet_ref(path)
        requests.append(ControlRequest(path, ref, image, _new_unit(text, ref)))
    return requests


def _from_image(args: argparse.Namespace, p: GenerationParams) -> list[ControlRequest]:
    """The image's ControlNets, found again, with the hints --control-image gives."""
    from ..modelref import controlnet_ref, find_controlnet

    units = p.controls
    named = ", ".join(f"ControlNet {k} ({printable(c.preprocess)}, {printable(c.label)})" for k, c in enumerate(units))
    if not args.control_image:
        raise ValueError(f"{args.from_image}: this image was made with {named}; its hint is not in the text: give it "
                         "with --control-image HINT.png (one per ControlNet, in order), or replace them with "
                         "--control MODEL:HINT.png")
    if len(args.control_image) != len(units):
        raise ValueError(f"{args.from_image}: this image was made with {len(units)} ControlNet(s) ({named}); "
                         f"--control-image is given {len(args.control_image)} times: give one hint per ControlNet")
    requests = []
    for k, (unit, hint) in enumerate(zip(units, args.control_image)):
        image = _hint(hint, "--control-image")
        path = find_controlnet(unit.model, unit.model_hash)
        ref = controlnet_ref(path)
        if unit.model_hash and unit.model_hash.lower() != ref.hash:
            logger.warning("ControlNet %d hash differs: %s was made with %s, this is %s [%s]; the image will differ", k,
                           args.from_image, printable(unit.label), path, ref.hash)
        requests.append(ControlRequest(path, ref, image, replace(unit, model=ref.name, model_hash=ref.hash)))
    return requests


def _overridden(args: argparse.Namespace, k: int, unit: ControlParams) -> ControlParams:
    """``unit`` with the options given for ControlNet ``k`` (a new preprocessor is run at the
    output size, as ldm always does)."""
    changes: dict[str, Any] = {}
    chosen = _nth(args.control_preprocess, k)
    if chosen is not None:
        name, params = chosen
        changes.update(preprocess=name, thresholds=thresholds_of(name, params), processor_res=None)
    for name, field in (("control_start", "start"), ("control_end", "end")):
        if _nth(getattr(args, name), k) is not None:
            changes[field] = _nth(getattr(args, name), k)
    if args.guess_mode is not None:
        changes["guess_mode"] = args.guess_mode
    return replace(unit, **changes)


def control_requests(args: argparse.Namespace, p: GenerationParams) -> list[ControlRequest]:
    """The ControlNets to apply, read and checked before any model loads (files found,
    hints readable, preprocessors and ranges valid); [] for none."""
    if args.control:
        requests = _from_flags(args)
    elif p.controls:
        _per_control_counts(args, len(p.controls), str(args.from_image))
        requests = _from_image(args, p)
    else:
        given = _first_given(args, (("control_image", "--control-image"), *_PER_CONTROL))
        if given:
            raise ValueError(f"{given}: {args.from_image} was made without a ControlNet; give one with "
                             "--control MODEL:HINT.png")
        return []
    checked = []
    for k, request in enumerate(requests):
        unit = _overridden(args, k, request.unit)
        where = f"ControlNet {k}"
        check_range(unit.start, unit.end, where)
        check_writable(unit)
        try:
            unit.check_module()
            thresholds = check_preprocess(unit.preprocess, unit.thresholds or {})
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}{_SETS_PREPROCESSOR}") from None
        unit = replace(unit, thresholds=thresholds_of(unit.preprocess, thresholds))
        checked.append(replace(request, unit=unit))
    if p.width and p.height:
        check_units(checked, p.width, p.height)
    return checked


def check_units(requests: list[ControlRequest], width: int, height: int) -> None:
    """ValueError for a unit read from an image whose hint ldm would make otherwise (see
    :meth:`ldm.controlmeta.ControlParams.check_detection` / ``check_hint``)."""
    for k, r in enumerate(requests):
        try:
            r.unit.check_detection(width, height)
            r.unit.check_hint((r.image.shape[1], r.image.shape[0]), width, height)
        except ValueError as exc:
            raise ValueError(f"ControlNet {k}: {exc}{_SETS_PREPROCESSOR}") from None


def load_controlnets(requests: list[ControlRequest], pipe: Any, allow_pickle: bool) -> list[Any]:
    """Each request's ControlNet, loaded once per file on the pipeline's device and dtype, and
    checked against its model (ValueError in the library's words)."""
    from ..control import ControlNet

    loaded: dict[Path, Any] = {}
    for r in requests:
        if r.path not in loaded:
            loaded[r.path] = ControlNet.from_pretrained(r.path, device=pipe.device, dtype=pipe.dtype,
                                                        allow_pickle=allow_pickle)
            loaded[r.path].check_fits(pipe.config)
    return [loaded[r.path] for r in requests]


def controls_for(requests: list[ControlRequest], nets: list[Any], width: int, height: int, seed: int) -> list[Any]:
    """The :class:`ldm.Control` objects of a call at ``width`` x ``height`` whose first image has ``seed``."""
    from ..control import Control

    return [Control(net, make_hint(r.unit.preprocess, r.params, r.image, width, height, seed), scale=r.unit.scale,
                    start=r.unit.start, end=r.unit.end, guess_mode=r.unit.guess_mode)
            for r, net in zip(requests, nets)]


def per_image(requests: list[ControlRequest]) -> bool:
    """Whether each image needs its own call: a hint drawn from the image's seed (shuffle)."""
    return any(seeded(r.unit.preprocess) for r in requests)


def recorded_units(requests: list[ControlRequest], used: list[dict[str, Any]]) -> tuple[ControlParams, ...]:
    """The units an output's PNG text records: what the pipeline reports it used (``used``:
    ``Generation.params["controls"]``), with the file's name and hash and the preprocessor."""
    return tuple(replace(r.unit, model=r.ref.name, model_hash=r.ref.hash, scale=u["scale"], start=u["start"],
                         end=u["end"], guess_mode=u["guess_mode"], resize_mode=JUST_RESIZE, processor_res=None)
                 for r, u in zip(requests, used))
