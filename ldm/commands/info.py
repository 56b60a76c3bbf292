"""`ldm info`: print the generation parameters stored in PNG files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..pngmeta import GenerationParams, parse_parameters, read_text
from .common import describe, printable, printable_json

USED_EXTRA = ("Batch size", "Batch pos")  # read by `generate --from`


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="print the generation parameters stored in PNG files",
        description="Print the parameters (AUTOMATIC1111 format) of images written by ldm or the "
        "web UI; with --json, one JSON object per image with the parsed fields. A file that "
        "cannot be read is reported and skipped; the exit code is then 2.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE.png")
    p.add_argument("--json", action="store_true", help="parsed fields as JSON lines")
    p.set_defaults(func=run)


def _read(path: Path) -> tuple[str, GenerationParams]:
    """The parameters text of ``path`` and its fields; errors name ``path``."""
    text = read_text(path)
    if text is None:
        raise ValueError(f"{path}: no generation parameters in this image")
    try:
        return text, parse_parameters(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _show(path: Path, text: str, params: GenerationParams, args: argparse.Namespace, first: bool) -> None:
    if args.json:
        record = {"file": str(path), **params.to_dict(), "sampler_name": params.sampler_label,
                  "parameters": text}
        print(printable_json(json.dumps(record, ensure_ascii=False)))
        return
    if len(args.images) > 1:
        print(f"{'' if first else chr(10)}# {printable(str(path))}")
    # The text comes from a file: escape what a terminal would act on, keep the layout.
    print(printable(text))
    unused = [k for k in params.extra if k not in USED_EXTRA]
    if unused:
        print(printable(f"(not used by ldm: {', '.join(unused)})"), file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    failed = shown = 0
    for path in args.images:
        try:
            text, params = _read(path)
        except (OSError, ValueError) as exc:  # missing, not a file, not an image, bad text
            print(f"ldm info: error: {printable(describe(exc))}", file=sys.stderr)
            failed += 1
            continue
        _show(path, text, params, args, first=shown == 0)
        shown += 1
    return 2 if failed else 0
