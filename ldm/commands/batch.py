"""`ldm batch`: render a prompt file, resumably, on one or many processes."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from ..batchedit import EditDefaults
from ..batchfile import Settings
from ..editing import DEFAULT_FILL, DEFAULT_MASK_BLUR
from ..validation import SPACINGS
from .common import (
    add_editing_options, add_generation_options, add_memory_option, positive_int, settings_from_args,
)

FORMATS = {"auto": None, "text": False, "jsonl": True}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="render every line of a prompt file (text or JSONL), resumably",
        description="Render PROMPTS (one prompt per line, or JSONL objects with prompt, "
        "negative_prompt, seed, steps, guidance, sampler, schedule, spacing, size, n, clip_skip, for editing image, "
        "mask, strength, extend, fill, mask_blur, mask_padding, paths relative to PROMPTS' folder, and for SDXL "
        "original_size, crop_offset, target_size, aesthetic_score, negative_aesthetic_score, refiner_start, and "
        "control: a list of ControlNets {model, image, scale, preprocess, start, end, guess_mode}) into "
        "DIR as LLLLL-KK-SEED.png plus manifest.jsonl. A rerun skips finished images. Several processes "
        "(--num-processes N, or `accelerate launch -m ldm batch ...`) split the work and give the "
        "same files as one process.",
    )
    p.add_argument("prompts", type=Path, metavar="PROMPTS",
                   help="prompt file: text, or JSONL if it ends in .jsonl/.ndjson (see --format)")
    add_generation_options(
        p, seed_help="base seed: a line without a seed gets base + 1000 * (line - 1), its images "
        "that + 0, 1, ... (default 0)",
    )
    add_editing_options(p, per_line=True)
    p.add_argument("--batch-size", type=positive_int, default=4,
                   help="images per pipeline call, among lines with the same size/steps/sampler/"
                   "guidance (default 4); keep it when resuming for bit-identical images")
    p.add_argument("--strict", action="store_true",
                   help="check every line first and render nothing if one is bad")
    p.add_argument("--overwrite", action="store_true",
                   help="redo images in DIR that were made with other settings (default: refuse)")
    p.add_argument("--format", choices=tuple(FORMATS), default="auto",
                   help="prompt file format (default: by suffix)")
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timestep spacing for lines without a spacing key (default: the model's, else the sampler's)")
    add_memory_option(p, ". Each PNG and manifest entry records how the VAE ran ('VAE tiling')")
    p.add_argument("--num-processes", type=positive_int, default=1, metavar="N",
                   help="run N processes (one per GPU, or CPU processes over gloo) via torchrun")
    p.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> Settings:
    edit = EditDefaults(strength=args.strength, mask_padding=args.mask_padding,
                        mask_blur=DEFAULT_MASK_BLUR if args.mask_blur is None else args.mask_blur,
                        fill=args.fill or DEFAULT_FILL)
    return dataclasses.replace(settings_from_args(args), edit=edit, spacing=args.spacing)


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run(args: argparse.Namespace) -> int:
    from ..batch import BatchOptions, launch, report_errors, run_batch, strict_refusal
    from ..batchfile import check_settings, read_jobs

    settings = _settings(args)
    jsonl = FORMATS[args.format]
    if args.num_processes > 1 and not _launched():
        # Checked once here, before starting any process: the flags, and with --strict every line.
        check_settings(settings)
        _, errors = read_jobs(args.prompts, settings, jsonl)
        if errors and args.strict:
            report_errors(args.prompts, errors)
            return strict_refusal(args.prompts, errors)
        return launch(args.argv, args.num_processes)
    opts = BatchOptions(
        prompts=args.prompts, outdir=args.output, settings=settings, model=args.model,
        device=args.device, dtype=args.dtype, batch_size=args.batch_size, strict=args.strict,
        overwrite=args.overwrite, grid=args.grid, grid_rows=args.grid_rows, jsonl=jsonl,
        allow_pickle=args.allow_pickle, lora_dirs=tuple(args.lora_dirs or ()),
        embedding_dirs=tuple(args.embedding_dirs) if args.embedding_dirs else None, refiner=args.refiner,
        vae=args.vae, compile=args.compile, memory=args.memory,
    )
    return run_batch(opts)
