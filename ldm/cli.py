"""The `ldm` command: `convert` here, `generate`, `batch` and `info` in ldm/commands/."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from .commands.common import dtype_name
from .dtypes import DTYPE_NAMES


def _convert(args: argparse.Namespace) -> int:
    from .checkpoints.controlnet_file import convert_controlnet, is_controlnet
    from .checkpoints.convert import check_layout, convert

    layout = check_layout(Path(args.dst), args.layout)
    if is_controlnet(args.src, allow_pickle=args.allow_pickle):
        if args.prediction_type is not None:
            raise ValueError(f"{args.src} is a ControlNet: --prediction-type does not apply to it")
        convert_controlnet(args.src, args.dst, layout=layout, config=args.config, dtype=args.dtype,
                           allow_pickle=args.allow_pickle, overwrite=args.overwrite)
        print(f"wrote {args.dst} (ControlNet, {layout} layout)")
        return 0
    convert(
        args.src, args.dst, layout=layout, config=args.config,
        prediction_type=args.prediction_type, dtype=args.dtype,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite,
    )
    print(f"wrote {args.dst} ({layout} layout)")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert a checkpoint between the original single-file layout and diffusers folders",
        description="Read SRC (a .safetensors single file in the original layout, or a diffusers "
        "folder; a model or a ControlNet, told apart by its keys) and write DST in the chosen layout, "
        "as safetensors.",
    )
    p.add_argument("src", help="checkpoint file or diffusers folder to read")
    p.add_argument("dst", help="file (original layout) or folder (diffusers layout) to write")
    p.add_argument("--layout", choices=("original", "diffusers"), default=None,
                   help="layout to write (default: original if DST ends in .safetensors, else diffusers)")
    p.add_argument("--config", default=None,
                   help="preset name or YAML file overriding detection (a ControlNet: sd1 or sd2)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    p.add_argument("--dtype", type=dtype_name, choices=DTYPE_NAMES, default=None,
                   help="store weights in this dtype (default: as read)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading .ckpt/.pt files (weights_only torch.load)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DST if it is a previous convert output (a safetensors checkpoint "
                   "or a diffusers model folder); anything else is never replaced")
    p.set_defaults(func=_convert)


class UsageError(Exception):
    """A command line argparse cannot parse; the message is the whole line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (no usage block), for main()."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _add_log_options(p: argparse.ArgumentParser, default: object = False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default,
                   help="also log debug details, and show tracebacks of errors")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="log only warnings (by default the detected model family and seeds are logged)")


def build_parser(extra: Sequence[Callable[[argparse._SubParsersAction], None]] = ()) -> argparse.ArgumentParser:
    parser = _Parser(prog="ldm", description="Latent text-to-image diffusion.")
    _add_log_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    from .commands import COMMANDS

    for add in (*COMMANDS, _add_convert, *extra):
        add(sub)
    for command in sub.choices.values():  # `ldm generate ... -v` works as well as `ldm -v generate`
        if "-v" not in command._option_string_actions:
            _add_log_options(command, default=argparse.SUPPRESS)
    return parser


# Errors a user causes (bad values, files missing, unreadable or of the wrong kind);
# anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
EXIT_USER_ERROR = 2
EXIT_STOPPED = 130  # 128 + SIGINT, as shells report it


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `ldm` command; returns the exit code (a user error is one line, code 2)."""
    from .commands.common import describe, printable

    argv = list(sys.argv[1:] if argv is None else argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        return _run(args, argv)
    except UsageError as exc:
        print(printable(str(exc)), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("ldm: stopped", file=sys.stderr)
        return EXIT_STOPPED
    except BrokenPipeError:  # `ldm info *.png | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 1
    except USER_ERRORS as exc:
        if args is None:  # not from the command: a bug in building the parser
            raise
        if args.verbose:
            traceback.print_exc()
        print(f"ldm {args.command}: error: {printable(describe(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    args.argv = argv  # `batch --num-processes` starts workers with the same arguments
    # Other libraries stay at WARNING; ldm's own INFO lines (what was detected, which
    # seed) are what a user needs to understand a result, so they show by default.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.getLogger("ldm").setLevel(level)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
