"""Options shared by `ldm generate` and `ldm batch`.

Generation options default to None here, so that `generate --from` can tell an
override from a default; :data:`DEFAULTS` fills the rest (the same values as
``Pipeline.generate``'s defaults).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..batchfile import SCHEDULES, Settings, parse_size
from ..pngmeta import A1111_SAMPLERS

DEFAULTS = dict(steps=25, guidance=7.5, sampler="dpmpp_2m", schedule="default", n=1)
DTYPES = ("float32", "float16", "bfloat16")


def size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _guidance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (1 disables guidance), got {text}")
    return value


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint (.safetensors) or diffusers folder (default: the shipped model, $LDM_WEIGHTS)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt checkpoints (loaded with weights_only=True)")


def add_generation_options(p: argparse.ArgumentParser, *, seed_help: str) -> None:
    d = DEFAULTS
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    p.add_argument("--steps", type=positive_int, default=None, help=f"sampling steps (default {d['steps']})")
    p.add_argument("--guidance", type=_guidance, default=None, metavar="G",
                   help=f"classifier-free guidance scale, 1 disables it (default {d['guidance']})")
    p.add_argument("--sampler", choices=tuple(A1111_SAMPLERS), default=None,
                   help=f"default {d['sampler']}")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="sigma schedule; karras for the k-samplers (default: the sampler's own)")
    p.add_argument("--seed", type=_seed, default=None, help=seed_help)
    p.add_argument("--n", type=positive_int, default=None, help=f"images per prompt (default {d['n']})")
    p.add_argument("--size", type=size_arg, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    add_model_options(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    p.add_argument("--grid", action="store_true", help="also write a grid of the images")
    p.add_argument("--grid-rows", type=positive_int, default=None, metavar="R",
                   help="grid rows (default: round(sqrt(images)), as the web UI does)")


def value(args: argparse.Namespace, name: str):
    got = getattr(args, name)
    return DEFAULTS[name] if got is None else got


def settings_from_args(args: argparse.Namespace, base_seed: int = 0) -> Settings:
    return Settings(
        negative_prompt=args.negative or "", steps=value(args, "steps"), guidance=value(args, "guidance"),
        sampler=value(args, "sampler"), schedule=value(args, "schedule"), size=args.size,
        n=value(args, "n"), seed=base_seed if args.seed is None else args.seed,
    )


def resolve_model(path: str | None) -> Path:
    from ..pipeline import default_weights_path

    return Path(path) if path else default_weights_path()
