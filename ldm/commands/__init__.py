"""Subcommands of the `ldm` command: each module has ``add_parser(subparsers)``."""

from . import batch, generate, info, train_lora

COMMANDS = (generate.add_parser, batch.add_parser, info.add_parser, train_lora.add_parser)
