"""Prompt files for ``ldm batch``: plain text or JSONL, one job per line.

Plain text (any suffix but ``.jsonl``/``.ndjson``): each line is a prompt. JSONL:
each line is an object with ``prompt`` and optionally ``negative_prompt``,
``seed``, ``steps``, ``guidance``, ``sampler``, ``schedule``, ``spacing`` (the timestep
spacing: ``leading``, ``linspace`` or ``trailing``; default the model's), ``size`` (``"WxH"``,
``[w, h]`` or one int for a square), ``n`` (images of this line), ``clip_skip``, the
image-editing keys of :mod:`ldm.batchedit` (``image``, ``mask``, ``strength``,
``extend``, ``fill``, ``mask_blur``, ``mask_padding``; paths relative to the
file's folder) and SDXL's (:class:`SDXLValues`): ``original_size`` and ``target_size``
(like ``size``, any whole numbers), ``crop_offset`` (``"XxY"`` or ``[x, y]``: pixels from
the left, from the top), ``aesthetic_score``, ``negative_aesthetic_score`` and
``refiner_start`` (with ``ldm batch --refiner MODEL``), ``control`` (a list of ControlNets
with their hint pictures, :mod:`ldm.batchcontrol`), and the opt-in speed-ups
``guidance_end``, ``cache_interval`` and ``token_merging`` (:mod:`ldm.speedups`). In both, blank lines and lines
starting with ``#`` are skipped; missing values come from the command line (:class:`Settings`).

Seeds: a line without a seed gets ``line_seed(base, line)`` = ``(base + 1000 *
(line - 1)) mod (2**32 - 1000)``, ``line`` being its 1-based line number in the
file, and its ``n`` images get that seed + 0, 1, ... So a line's images depend
only on the base seed, its line number and its own settings: not on other
lines, on batching or on how the work is sharded; lines stay 1000 seeds apart.
Editing the file above a line (adding or removing lines) moves its seeds.

Every value is checked here with :mod:`ldm.validation`, the checks the pipeline
itself makes, so a bad line is found before anything renders. The file must be
UTF-8 text (a leading BOM is dropped, CRLF line ends are fine); a binary file, a
folder or a pipe is refused as a whole with :class:`PromptFileError`.
"""

from __future__ import annotations

import codecs
import json
import stat
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .batchcontrol import LineControl, controls_from_object
from .batchedit import EDIT_KEYS, Edit, EditDefaults, check_defaults, edit_from_object
from .speedups import KEYS as SPEEDUP_KEYS
from .speedups import Speedups
from .pngmeta import (
    MAX_CLIP_SKIP, GenerationParams, check_round_trip, normalize_prompt, open_regular, parse_pair, read_pair,
)
from .validation import (
    DEFAULTS, MAX_SEED, SIZE_FACTOR, check_finite, check_fraction, check_guidance, check_int, check_sampler,
    check_distilled_negatives, check_sampling, check_schedule, check_seed, check_side, check_spacing,
)

SEED_STRIDE = 1000
SEED_MODULUS = 2**32 - SEED_STRIDE
# A line's images are seeded seed + 0 .. n - 1; more than a stride would run into the
# next line's seeds, and a line of a million images is a typo, not a plan.
MAX_IMAGES_PER_LINE = SEED_STRIDE
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# SDXL's JSONL keys -> Pipeline.generate's arguments; the pairs are "WxH" / "XxY" as ``size``.
PAIR_KEYS = {"original_size": "original_size", "crop_offset": "crops_coords_top_left",
             "target_size": "target_size"}
SCORE_KEYS = ("aesthetic_score", "negative_aesthetic_score")
JSONL_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "schedule", "spacing", "size",
              "n", "clip_skip", *EDIT_KEYS, *PAIR_KEYS, *SCORE_KEYS, "refiner_start", "control", *SPEEDUP_KEYS)
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class PromptFileError(ValueError):
    """A prompt file that cannot be read as a whole (binary, not UTF-8, a folder, a pipe);
    the message names the file."""


@dataclass(frozen=True)
class SDXLValues:
    """SDXL's size conditioning of a line, as :meth:`ldm.Pipeline.generate` takes it:
    ``(height, width)``, ``(top, left)``; None for the pipeline's default."""

    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None

    def kwargs(self) -> dict[str, Any]:
        """The values that are set, as keyword arguments of ``Pipeline.generate``."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Settings:
    """Values for lines that do not set their own (from the command line)."""

    negative_prompt: str = ""
    steps: int = DEFAULTS.steps
    guidance: float = DEFAULTS.guidance_scale
    sampler: str = DEFAULTS.sampler
    schedule: str = DEFAULTS.schedule
    size: tuple[int, int] | None = None  # None: the model's native size
    n: int = DEFAULTS.num_images
    seed: int = 0  # the base seed
    edit: EditDefaults = EditDefaults()  # for lines with an image
    clip_skip: int = 1
    sdxl: SDXLValues = SDXLValues()
    refiner: bool = False  # a refiner is given (ldm batch --refiner): lines may set refiner_start
    refiner_start: float = DEFAULTS.refiner_start
    spacing: str | None = None  # None: the model's timestep spacing
    speedups: Speedups = Speedups()


@dataclass(frozen=True)
class Job:
    """One valid line of a prompt file, with every value resolved but the size."""

    line: int
    text: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    sampler: str
    schedule: str
    size: tuple[int, int] | None  # None: the model's native size, or the edited image's
    n: int
    edit: Edit | None = None
    clip_skip: int = 1
    sdxl: SDXLValues = SDXLValues()
    refiner_start: float | None = None  # None: the batch has no refiner
    controls: tuple[LineControl, ...] = ()
    spacing: str | None = None  # None: the model's timestep spacing
    speedups: Speedups = Speedups()


@dataclass(frozen=True)
class LineError:
    line: int
    message: str
    text: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def line_seed(base: int, line: int) -> int:
    """The first seed of 1-based ``line`` when the line sets none (see module docstring)."""
    return (base + SEED_STRIDE * (line - 1)) % SEED_MODULUS


def parse_size(value: Any) -> tuple[int, int]:
    """``"512x768"``, ``[512, 768]`` or ``512`` -> (width, height), multiples of 8."""
    width, height = read_pair(value, "size", "'WIDTHxHEIGHT' (e.g. '512x512')")
    return check_side(width, "width"), check_side(height, "height")


def _str(obj: dict, key: str, default: str) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r:.80}")
    return value


def check_steps(sampler: Any, schedule: Any, steps: Any, num_train_timesteps: int = 1000,
                spacing: str | None = None) -> tuple[str, str, int]:
    """Sampler, schedule, steps and the timestep spacing asked for (None: the model's)
    checked together, as sampling will build them."""
    sampler, schedule = check_sampler(sampler), check_schedule(schedule)
    steps = check_int(steps, "steps", 1)
    check_sampling(sampler, schedule, steps, num_train_timesteps, spacing)
    return sampler, schedule, steps


def distilled_negative_error(time_cond_proj_dim: int | None, negative: str) -> str | None:
    """Why a line's negative prompt cannot render on a guidance-distilled model (the
    pipeline's words), or None."""
    try:
        check_distilled_negatives(time_cond_proj_dim, [negative])
    except ValueError as exc:
        return str(exc)
    return None


def _check_metadata(prompt: str, negative: str, sampler: str, schedule: str, steps: int, guidance: float,
                    size: tuple[int, int] | None, seed: int, edit: Edit | None, clip_skip: int,
                    sdxl: SDXLValues, controls: tuple[LineControl, ...], spacing: str | None = None) -> None:
    """Refuse a line whose PNG parameters text would read back as something else
    (e.g. a prompt line starting with ``Negative prompt:``): such an image could not
    be made again from its file. The native size stands in until the model is known."""
    width, height = size or (SIZE_FACTOR, SIZE_FACTOR)
    check_round_trip(GenerationParams(prompt=prompt, negative_prompt=negative, steps=steps, sampler=sampler,
                                      schedule=schedule, spacing=spacing, guidance_scale=guidance, seed=seed, width=width,
                                      height=height, clip_skip=recorded_clip_skip(clip_skip),
                                      **(edit.params() if edit else {}), **sdxl.kwargs(),
                                      controls=tuple(c.unit() for c in controls)))


def recorded_clip_skip(clip_skip: int) -> int | None:
    """``Clip skip`` as the PNG text records it: left out at the default 1, as the web UI does."""
    return clip_skip if clip_skip > 1 else None


def _sdxl_values(obj: dict, defaults: SDXLValues) -> SDXLValues:
    """A line's SDXL keys over the command line's values."""
    values = {name: parse_pair(obj[key], key, 0 if key == "crop_offset" else 1)
              for key, name in PAIR_KEYS.items() if key in obj}
    values.update({key: check_finite(obj[key], key) for key in SCORE_KEYS if key in obj})
    return replace(defaults, **values)


def _refiner_start(obj: dict, settings: Settings) -> float | None:
    if not settings.refiner:
        if "refiner_start" in obj:
            raise ValueError("refiner_start needs a refiner: give one with --refiner MODEL on the command line")
        return None
    return check_fraction(obj.get("refiner_start", settings.refiner_start), "refiner_start")


def _seed_and_count(obj: dict, line: int, settings: Settings) -> tuple[int, int]:
    n = check_int(obj.get("n", settings.n), "n", 1, MAX_IMAGES_PER_LINE)
    seed = check_seed(obj["seed"]) if "seed" in obj else line_seed(settings.seed, line)
    if seed + n - 1 > MAX_SEED:
        raise ValueError(f"seed + n - 1 must be <= {MAX_SEED}, got seed {seed} with n {n}")
    return seed, n


def job_from_object(obj: Any, line: int, text: str, settings: Settings, base: Path = Path(".")) -> Job:
    """A job from one JSONL object, its input paths relative to ``base``; ValueError
    says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with a 'prompt', got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        shown = ", ".join(f"{k!r:.40}" for k in unknown[:5])
        raise ValueError(f"unknown key(s) {shown}; valid keys: {', '.join(JSONL_KEYS)}")
    if "prompt" not in obj:
        raise ValueError("missing 'prompt'")
    # Spaces around lines are dropped as the PNG text drops them (CLIP ignores them).
    prompt = normalize_prompt(_str(obj, "prompt", ""))
    negative = normalize_prompt(_str(obj, "negative_prompt", settings.negative_prompt))
    spacing = check_spacing(obj.get("spacing", settings.spacing))
    sampler, schedule, steps = check_steps(obj.get("sampler", settings.sampler), obj.get("schedule", settings.schedule),
                                           obj.get("steps", settings.steps), spacing=spacing)
    guidance = check_guidance(obj.get("guidance", settings.guidance))
    size = parse_size(obj["size"]) if "size" in obj else settings.size
    seed, n = _seed_and_count(obj, line, settings)
    edit = edit_from_object(obj, base, settings.edit, steps)
    clip_skip = check_int(obj.get("clip_skip", settings.clip_skip), "clip_skip", 1, MAX_CLIP_SKIP)
    sdxl = _sdxl_values(obj, settings.sdxl)
    controls = controls_from_object(obj["control"], base) if "control" in obj else ()
    speedups = Speedups.from_object(obj, settings.speedups)
    speedups.check_call(guidance > 1, steps, edit.strength if edit else None)
    _check_metadata(prompt, negative, sampler, schedule, steps, guidance, size, seed, edit, clip_skip, sdxl,
                    controls, spacing)
    return Job(line, text, prompt, negative, seed, steps, guidance, sampler, schedule, size, n, edit, clip_skip,
               sdxl, _refiner_start(obj, settings), controls, spacing, speedups)


def check_settings(settings: Settings) -> None:
    """The command line's values for lines, checked once (ValueError naming the flag)."""
    try:
        check_seed(settings.seed, "--seed")
        if settings.size is not None:
            parse_size(settings.size)
        check_defaults(settings.edit)
        job_from_object({"prompt": ""}, 1, "", settings)
    except ValueError as exc:
        raise ValueError(f"command line: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; give a finite number")


def _json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def parse_lines(lines: list[str], settings: Settings, jsonl: bool, base: Path = Path(".")
                ) -> tuple[list[Job], list[LineError]]:
    """Jobs and errors (with 1-based line numbers) of a prompt file's lines; input
    paths are relative to ``base``, the file's folder."""
    jobs: list[Job] = []
    errors: list[LineError] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r\n")
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            obj = _json(stripped) if jsonl else {"prompt": stripped}
            jobs.append(job_from_object(obj, number, text, settings, base))
        except ValueError as exc:
            errors.append(LineError(number, str(exc), text))
    return jobs, errors


def _not_a_prompt_file(path: Path, mode: int) -> PromptFileError:
    if stat.S_ISDIR(mode):
        return PromptFileError(f"{path}: is a folder; give a prompt file (text or JSONL)")
    return PromptFileError(f"{path}: not a regular file (a pipe or a device?); give a prompt file")


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; a folder, pipe or device is refused without blocking on it."""
    with open_regular(path, lambda mode: _not_a_prompt_file(path, mode)) as f:
        return f.read()


def decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a prompt file, without a BOM; PromptFileError for anything else."""
    if data.startswith(_UTF16_BOMS):
        raise PromptFileError(f"{path}: is UTF-16 text; save it as UTF-8")
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise PromptFileError(f"{path}:{line}: NUL byte: a binary file, not a prompt file (UTF-8 text or JSONL)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptFileError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); prompt files are UTF-8"
        ) from None


def read_jobs(path: str | Path, settings: Settings, jsonl: bool | None = None
              ) -> tuple[list[Job], list[LineError]]:
    """Read a prompt file (JSONL if its suffix is .jsonl/.ndjson, unless ``jsonl`` says)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    lines = decode(path, _read_bytes(path)).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return parse_lines(lines, settings, is_jsonl(path) if jsonl is None else jsonl, path.parent)
