"""Options shared by `ldm generate` and `ldm batch`, and how the command prints.

Generation options default to None here, so that `generate --from` can tell an
override from a default; :data:`ldm.validation.DEFAULTS` fills the rest (the
table ``Pipeline.generate`` uses too). Every option's type function refuses a bad
value with ``argparse.ArgumentTypeError`` and a text for the user: argparse then
names the flag, where a plain ValueError would show the function's name.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any, Callable

from ..batchfile import SDXLValues, Settings, parse_size
from ..dtypes import DTYPE_NAMES, canonical_dtype_name
from ..editing import DEFAULT_FILL, DEFAULT_MASK_BLUR, FILLS
from ..pngmeta import DEFAULT_SCORES, MAX_CLIP_SKIP, parse_pair
from ..speedups import Speedups
from ..validation import (
    A1111_SAMPLERS, DEFAULTS, MAX_SEED, SCHEDULES, check_finite, check_fraction, check_guidance, check_guidance_end,
    check_int, check_margins, check_merge_ratio, check_seed, check_strength,
)

# Option name -> field of validation.DEFAULTS where the names differ.
_DEFAULT_FIELDS = {"guidance": "guidance_scale", "n": "num_images"}
# Terminal controls in text from files: C0 (but newline and tab), DEL, C1 (0x9b is
# a one-byte CSI) and the bidi overrides that reorder what is displayed.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_DEVICE_TYPES = ("cuda", "mps", "xpu")


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters shown as ``\\x1b``-style escapes."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", text)


def printable_json(text: str) -> str:
    """JSON text with the controls ``json.dumps`` leaves (DEL, C1, bidi) as ``\\u`` escapes."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def describe(exc: BaseException) -> str:
    """An error as one readable line: ``PATH: No such file or directory`` rather than ``[Errno 2] ...``."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{os.fsdecode(exc.filename)}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # "20.0" or "1e3" are whole numbers too
        if not value.is_integer():
            raise
        return int(value)


def _option_type(parse: Callable[[str], Any], check: Callable[[Any], Any], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then ``check`` the value; errors in words."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as exc:
            # "guidance_scale must be ..." -> "must be ...": argparse names the flag.
            message = str(exc)
            reason = message[message.find("must "):] if "must " in message else message
            raise argparse.ArgumentTypeError(reason) from None

    convert.__name__ = expected
    return convert


positive_int = _option_type(_whole_number, lambda v: check_int(v, "value", 1), "a whole number >= 1")
seed_int = _option_type(_whole_number, check_seed, f"a whole number from 0 to {MAX_SEED}")
guidance_float = _option_type(float, check_guidance, "a number such as 7.5")
dtype_name = _option_type(str, canonical_dtype_name, "a dtype name")
strength_float = _option_type(float, check_strength, "a number in (0, 1] such as 0.6")
pixels_int = _option_type(_whole_number, lambda v: check_int(v, "value", 0), "a whole number of pixels >= 0")
clip_skip_int = _option_type(_whole_number, lambda v: check_int(v, "value", 1, MAX_CLIP_SKIP),
                             "a whole number >= 1 (1: the last layer, 2: the penultimate)")
score_float = _option_type(float, lambda v: check_finite(v, "value"), "a number such as 6.0")
refiner_start_float = _option_type(float, lambda v: check_fraction(v, "value"),
                                   "a number between 0 and 1 such as 0.8")
guidance_end_float = _option_type(float, lambda v: check_guidance_end(v, name="value"),
                                  "a fraction in (0, 1] such as 0.6")
merge_ratio_float = _option_type(float, lambda v: check_merge_ratio(v, name="value"),
                                 "a fraction in [0, 1) such as 0.5")


def _pair(minimum: int, form: str) -> Callable[[str], tuple[int, int]]:
    """An argparse type for ``WxH`` / ``XxY`` (one number: both), held as Pipeline.generate
    takes it: ``(h, w)`` / ``(y, x)`` (see :func:`ldm.pngmeta.parse_pair`)."""
    return _option_type(str, lambda t: parse_pair(int(t) if t.strip().isdigit() else t, "value", minimum), form)


pixel_size = _pair(1, "WxH")
pixel_offset = _pair(0, "XxY")


def margins_arg(text: str) -> tuple[int, int, int, int]:
    """``L,T,R,B``: outpainting margins in pixels (the side is named when one is refused)."""
    try:
        values = tuple(_whole_number(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError("expected four whole numbers L,T,R,B (pixels added left, top, right, "
                                         f"bottom) such as 0,0,256,0, got {text!r}")
    try:
        return check_margins(*values)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_arg(text: str) -> tuple[int, int]:
    """``WxH``, or one number for a square."""
    try:
        return parse_size(int(text) if text.strip().isdigit() else text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def device_arg(text: str) -> str:
    """A device torch can parse and this machine has, checked before any model loads."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device name; {_devices_here()}") from None
    if device.type == "cpu":
        return text
    count = _device_count(device.type)
    if count == 0:
        raise argparse.ArgumentTypeError(f"no {device.type} device on this machine; {_devices_here()}")
    if device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r} does not exist; {_devices_here()}")
    return text


def _device_count(kind: str) -> int:
    import torch

    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None) if kind in _DEVICE_TYPES else None
    if backend is None or not backend.is_available():
        return 0
    return backend.device_count()


def _devices_here() -> str:
    names = ["cpu"] + [f"{kind}:{i}" for kind in _DEVICE_TYPES for i in range(_device_count(kind))]
    return f"devices here: {', '.join(names)}"


def check_output_dir(folder: Path, flag: str = "-o") -> None:
    """Refuse, before any model loads, an output folder that cannot be made or written."""
    existing = folder
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent  # the nearest folder that exists: it must take the new ones
    if not existing.is_dir():
        what = "exists and is not a folder" if existing == folder else f"{existing} is not a folder"
        raise ValueError(f"{flag} {folder}: {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {folder}: {existing} is not writable")


def add_memory_option(p: argparse.ArgumentParser, more: str = "") -> None:
    from ..limits import MEMORY_CHOICES

    p.add_argument("--memory", choices=MEMORY_CHOICES, default="auto",
                   help="memory level: auto (default: the fastest that fits the free memory), fast, seamless (the "
                   "VAE layer by layer in tiles, same picture), tiled (the VAE in blended tiles), sliced (sliced "
                   "attention, the VAE seamless where it fits, else blended), offload (and models offloaded to the "
                   "CPU; GPU only)" + more)


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="checkpoint (.safetensors) or diffusers folder (default: the shipped model, $LDM_WEIGHTS)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", type=dtype_name, choices=DTYPE_NAMES, default=None,
                   help="default: float16 on GPU; on CPU the faster of float32 and bfloat16 here, never an "
                   "emulated bfloat16 ($LDM_CPU_DTYPE overrides) (fp16, bf16 ... accepted)")
    p.add_argument("--vae", default=None, metavar="PATH",
                   help="a VAE to use in place of the model's (and the refiner's): a diffusers VAE folder such as "
                   "sdxl-vae-fp16-fix, or a .safetensors file in diffusers' or the web UI's key names")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.pt checkpoints, LoRAs and embeddings (loaded with weights_only=True)")
    p.add_argument("--lora-dir", dest="lora_dirs", type=Path, action="append", default=None, metavar="DIR",
                   help="folder of LoRA files for <lora:name:weight> in prompts (repeatable; searched before "
                   "$LDM_LORA_DIR)")
    p.add_argument("--embedding-dir", dest="embedding_dirs", type=Path, action="append", default=None,
                   metavar="DIR", help="folder of textual-inversion embeddings, used when a prompt names a file's "
                   "stem (repeatable; searched before $LDM_EMBEDDING_DIR)")


def add_generation_options(p: argparse.ArgumentParser, *, seed_help: str, default_output: str | None = None) -> None:
    """The options of `generate` and `batch`; ``-o`` is required unless ``default_output`` is given."""
    d = DEFAULTS
    p.add_argument("--negative", default=None, metavar="TEXT", help="negative prompt")
    p.add_argument("--steps", type=positive_int, default=None, help=f"sampling steps (default {d.steps})")
    p.add_argument("--guidance", type=guidance_float, default=None, metavar="G",
                   help=f"classifier-free guidance scale, 0 to 100, 1 disables it (default {d.guidance_scale})")
    p.add_argument("--sampler", choices=tuple(A1111_SAMPLERS), default=None, help=f"default {d.sampler}")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="sigma schedule; karras for the k-samplers (default: the sampler's own)")
    p.add_argument("--seed", type=seed_int, default=None, help=seed_help)
    p.add_argument("--n", type=positive_int, default=None, help=f"images per prompt (default {d.num_images})")
    p.add_argument("--size", type=size_arg, default=None, metavar="WxH",
                   help="image size, multiples of 8 (default: the model's native size)")
    p.add_argument("--clip-skip", type=clip_skip_int, default=None, metavar="N",
                   help="condition on the text encoder's N-th layer from the end, as the web UI counts: "
                   "1 the last (default), 2 the penultimate")
    add_sdxl_options(p)
    add_speedup_options(p)
    add_model_options(p)
    if default_output is None:
        p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="output folder")
    else:
        p.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                       help=f"output folder (default: {default_output}/ in the current folder)")
    p.add_argument("--grid", action="store_true", help="also write a grid of the images")
    p.add_argument("--grid-rows", type=positive_int, default=None, metavar="R",
                   help="grid rows (default: round(sqrt(images)), as the web UI does)")


def add_speedup_options(p: argparse.ArgumentParser) -> None:
    """The opt-in speed-ups (:mod:`ldm.speedups`): off unless asked; they change the picture a little."""
    g = p.add_argument_group("speed-ups that change the picture a little (off by default)")
    g.add_argument("--guidance-end", type=guidance_end_float, default=None, metavar="F",
                   help="classifier-free guidance for this fraction of the steps only, one U-Net pass per step "
                   "after it (e.g. 0.6; default 1: every step)")
    g.add_argument("--cache-interval", type=positive_int, default=None, metavar="N",
                   help="DeepCache: the whole U-Net every N-th evaluation, its shallow branch on kept deep "
                   "features in between (e.g. 3; default 1: off)")
    g.add_argument("--token-merging", type=merge_ratio_float, default=None, metavar="R",
                   help="ToMe: merge this fraction of the tokens around self-attention at the U-Net's highest "
                   "resolution, as the web UI's token merging ratio (e.g. 0.5; default 0: off)")
    p.add_argument("--compile", action="store_true",
                   help="run the U-Net through torch.compile, for GPUs: the first picture of each size waits a "
                   "minute or more for the compile (the picture is the same to float rounding); on the CPUs "
                   "measured, ldm's eager U-Net was faster (README, Speed)")


def add_sdxl_options(p: argparse.ArgumentParser) -> None:
    """SDXL's refiner and size conditioning; models that do not read a value refuse it."""
    g = p.add_argument_group("SDXL (other models refuse these)")
    g.add_argument("--refiner", default=None, metavar="PATH",
                   help="the SDXL refiner (checkpoint or diffusers folder): it takes over the last part of the "
                   "steps, from the base model's latents")
    g.add_argument("--refiner-start", type=refiner_start_float, default=None, metavar="F",
                   help=f"fraction of the schedule after which the refiner takes over (default "
                   f"{DEFAULTS.refiner_start}; needs --refiner)")
    g.add_argument("--original-size", type=pixel_size, default=None, metavar="WxH",
                   help="the size the picture is said to have had before cropping and resizing (default: the "
                   "image size); larger asks for sharper detail")
    g.add_argument("--crop-offset", type=pixel_offset, default=None, metavar="XxY",
                   help="top-left corner of the crop the picture is said to be, in pixels from the left x from "
                   "the top (default 0x0: uncropped, subjects centred)")
    g.add_argument("--target-size", type=pixel_size, default=None, metavar="WxH",
                   help="the size the base model is told it draws (default: the image size)")
    g.add_argument("--aesthetic-score", type=score_float, default=None, metavar="S",
                   help=f"the refiner's aesthetic score for the prompt (default "
                   f"{DEFAULT_SCORES['aesthetic_score']:g})")
    g.add_argument("--negative-aesthetic-score", type=score_float, default=None, metavar="S",
                   help=f"the refiner's aesthetic score for the negative prompt (default "
                   f"{DEFAULT_SCORES['negative_aesthetic_score']:g})")


def sdxl_values(args: argparse.Namespace) -> SDXLValues:
    """The size-conditioning options, as ``Pipeline.generate`` takes them (None: not given)."""
    return SDXLValues(original_size=args.original_size, crops_coords_top_left=args.crop_offset,
                      target_size=args.target_size, aesthetic_score=args.aesthetic_score,
                      negative_aesthetic_score=args.negative_aesthetic_score)


def add_editing_options(p: argparse.ArgumentParser, *, per_line: bool = False) -> None:
    """Image-editing options (img2img, inpainting, outpainting); all default to None or False.

    ``per_line`` (``ldm batch``): only the settings that can default every line's; each line
    names its own image, mask and margins.
    """
    title = "image editing (defaults for the lines that give an 'image')" if per_line else \
        "image editing (img2img, inpainting, outpainting)"
    g = p.add_argument_group(title)
    if not per_line:
        g.add_argument("--image", type=Path, default=None, metavar="IN.png",
                       help="start from this image (img2img); the size defaults to its own, rounded down to "
                       "multiples of 8")
        g.add_argument("--mask", type=Path, default=None, metavar="MASK.png",
                       help="repaint where this mask is white (inpainting); the size of --image")
    g.add_argument("--strength", type=strength_float, default=None, metavar="S",
                   help="denoising strength in (0, 1]: the share of the steps that run; lower keeps more "
                   "of the image (default 0.75, 1.0 with a mask)")
    g.add_argument("--mask-blur", type=pixels_int, default=None, metavar="PX",
                   help=f"feather the seam over about PX pixels outside the mask (default {DEFAULT_MASK_BLUR})")
    g.add_argument("--mask-padding", type=pixels_int, default=None, metavar="PX",
                   help="render only the masked region plus PX pixels around it, at the full size, and "
                   "paste it back (small edits in big pictures)")
    if not per_line:
        g.add_argument("--raw-decode", action="store_true",
                       help="keep the decoded picture as it is: do not put the input's pixels back outside the "
                       "mask")
        g.add_argument("--extend", type=margins_arg, default=None, metavar="L,T,R,B",
                       help="outpaint: add this many pixels left, top, right and bottom of --image (rounded up "
                       "to multiples of 8) and paint them")
    g.add_argument("--fill", choices=FILLS, default=None,
                   help=f"what the new area of an outpainting starts from (default {DEFAULT_FILL})")


def value(args: argparse.Namespace, name: str) -> Any:
    """Option ``name``, or its default from :data:`ldm.validation.DEFAULTS`."""
    got = getattr(args, name)
    return getattr(DEFAULTS, _DEFAULT_FIELDS.get(name, name)) if got is None else got


def settings_from_args(args: argparse.Namespace, base_seed: int = 0) -> Settings:
    if args.refiner_start is not None and args.refiner is None:
        raise ValueError("--refiner-start needs --refiner (the model that takes over)")
    return Settings(
        negative_prompt=args.negative or "", steps=value(args, "steps"), guidance=value(args, "guidance"),
        sampler=value(args, "sampler"), schedule=value(args, "schedule"), size=args.size,
        n=value(args, "n"), seed=base_seed if args.seed is None else args.seed, clip_skip=args.clip_skip or 1,
        sdxl=sdxl_values(args), refiner=args.refiner is not None, refiner_start=value(args, "refiner_start"),
        speedups=Speedups.from_attributes(args),
    )


def resolve_model(path: str | None) -> Path:
    from ..pipeline import default_weights_path

    return Path(path) if path else default_weights_path()
