"""The `ldm` command: `convert` here, `generate`, `batch` and `info` in ldm/commands/."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert

    convert(
        args.src, args.dst, layout=args.layout, config=args.config,
        prediction_type=args.prediction_type, dtype=args.dtype,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite,
    )
    print(f"wrote {args.dst} ({args.layout} layout)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between the original single-file layout and diffusers folders",
        description="Read SRC (a .safetensors single file in the original layout, or a diffusers "
        "folder) and write DST in the chosen layout, as safetensors.",
    )
    p.add_argument("src", help="checkpoint file or diffusers folder to read")
    p.add_argument("dst", help="file (original layout) or folder (diffusers layout) to write")
    p.add_argument("--layout", choices=("original", "diffusers"), default=None,
                   help="layout to write (default: original if DST ends in .safetensors, else diffusers)")
    p.add_argument("--config", default=None, help="preset name or YAML file overriding detection")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="store weights in this dtype (default: as read)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading .ckpt/.pt files (weights_only torch.load)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=_convert)


def build_parser(extra: Sequence[Callable[[argparse._SubParsersAction], None]] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent text-to-image diffusion.")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log debug details")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="log only warnings (by default the detected model family and seeds are logged)")
    sub = parser.add_subparsers(dest="command", required=True)
    from .commands import COMMANDS

    for add in (*COMMANDS, _add_convert, *extra):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # `batch --num-processes` starts workers with the same arguments
    if args.command == "convert" and args.layout is None:
        args.layout = "original" if args.dst.endswith(".safetensors") else "diffusers"
    # Other libraries stay at WARNING; ldm's own INFO lines (what was detected, which
    # seed) are what a user needs to understand a result, so they show by default.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.getLogger("ldm").setLevel(level)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # user errors: bad values, missing or unreadable files
        print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
