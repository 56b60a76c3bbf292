"""`ldm info`: print the generation parameters stored in PNG files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..pngmeta import parse_parameters, read_text

USED_EXTRA = ("Batch size", "Batch pos")  # read by `generate --from`


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="print the generation parameters stored in PNG files",
        description="Print the parameters (AUTOMATIC1111 format) of images written by ldm or the "
        "web UI; with --json, one JSON object per image with the parsed fields.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE.png")
    p.add_argument("--json", action="store_true", help="parsed fields as JSON lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = 0
    for i, path in enumerate(args.images):
        try:
            text = read_text(path)
        except OSError as exc:  # missing, unreadable or not an image
            print(f"ldm info: error: {path}: {exc}", file=sys.stderr)
            status = 2
            continue
        if text is None:
            print(f"ldm info: error: {path}: no generation parameters in this image", file=sys.stderr)
            status = 2
            continue
        params = parse_parameters(text)
        if args.json:
            record = {"file": str(path), **params.to_dict(), "sampler_name": params.sampler_label,
                      "parameters": text}
            print(json.dumps(record, ensure_ascii=False))
            continue
        if len(args.images) > 1:
            print(f"{'' if i == 0 else chr(10)}# {path}")
        print(text)
        unused = [k for k in params.extra if k not in USED_EXTRA]
        if unused:
            print(f"(not used by ldm: {', '.join(unused)})", file=sys.stderr)
    return status
