"""Prompt files for ``ldm batch``: plain text or JSONL, one job per line.

Plain text (any suffix but ``.jsonl``/``.ndjson``): each line is a prompt. JSONL:
each line is an object with ``prompt`` and optionally ``negative_prompt``,
``seed``, ``steps``, ``guidance``, ``sampler``, ``schedule``, ``size`` (``"WxH"``,
``[w, h]`` or one int for a square) and ``n`` (images of this line). In both,
blank lines and lines starting with ``#`` are skipped; missing values come from
the command line (:class:`Settings`).

Seeds: a line without a seed gets ``line_seed(base, line)`` = ``(base + 1000 *
(line - 1)) mod (2**32 - 1000)``, ``line`` being its 1-based line number in the
file, and its ``n`` images get that seed + 0, 1, ... So a line's images depend
only on the base seed, its line number and its own settings: not on other
lines, on batching or on how the work is sharded; lines stay 1000 seeds apart.
Editing the file above a line (adding or removing lines) moves its seeds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .pngmeta import A1111_SAMPLERS

SEED_STRIDE = 1000
SEED_MODULUS = 2**32 - SEED_STRIDE
MAX_SEED = 2**32 - 1
SCHEDULES = ("default", "karras")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSONL_KEYS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "schedule", "size", "n")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
SIZE_FACTOR = 8  # the VAE's downsampling in every SD model


@dataclass(frozen=True)
class Settings:
    """Values for lines that do not set their own (from the command line)."""

    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    sampler: str = "dpmpp_2m"
    schedule: str = "default"
    size: tuple[int, int] | None = None  # None: the model's native size
    n: int = 1
    seed: int = 0  # the base seed


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
    size: tuple[int, int] | None
    n: int


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
    if isinstance(value, str) and _SIZE.match(value):
        m = _SIZE.match(value)
        size = (int(m[1]), int(m[2]))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value):
        size = (int(value[0]), int(value[1]))
    elif _is_int(value):
        size = (int(value), int(value))
    else:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512'), got {value!r}")
    if any(v < SIZE_FACTOR or v % SIZE_FACTOR for v in size):
        raise ValueError(f"size must be positive multiples of {SIZE_FACTOR} (e.g. '512x512'), got {value!r}")
    return size


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(obj: dict, key: str, default: int, minimum: int) -> int:
    value = obj.get(key, default)
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _str(obj: dict, key: str, default: str) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {value!r}")
    return value


def job_from_object(obj: Any, line: int, text: str, settings: Settings) -> Job:
    """A job from one JSONL object; ValueError says what is wrong with it."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object with a 'prompt', got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(JSONL_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(JSONL_KEYS)}")
    if "prompt" not in obj:
        raise ValueError("missing 'prompt'")
    prompt = _str(obj, "prompt", "")
    negative = _str(obj, "negative_prompt", settings.negative_prompt)
    steps = _int(obj, "steps", settings.steps, 1)
    n = _int(obj, "n", settings.n, 1)
    guidance = obj.get("guidance", settings.guidance)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0:
        raise ValueError(f"guidance must be a number >= 0, got {guidance!r}")
    sampler = _str(obj, "sampler", settings.sampler)
    if sampler not in A1111_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(A1111_SAMPLERS)}")
    schedule = _str(obj, "schedule", settings.schedule)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    size = parse_size(obj["size"]) if "size" in obj else settings.size
    if "seed" in obj:
        seed = _int(obj, "seed", 0, 0)
    else:
        seed = line_seed(settings.seed, line)
        if n > SEED_STRIDE:
            raise ValueError(f"n > {SEED_STRIDE} would reuse the next line's seeds; give this line a seed")
    if seed + n - 1 > MAX_SEED:
        raise ValueError(f"seed + n - 1 must be <= {MAX_SEED}, got seed {seed} with n {n}")
    return Job(line, text, prompt, negative, seed, steps, float(guidance), sampler, schedule, size, n)


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def parse_lines(lines: list[str], settings: Settings, jsonl: bool) -> tuple[list[Job], list[LineError]]:
    """Jobs and errors (with 1-based line numbers) of a prompt file's lines."""
    jobs: list[Job] = []
    errors: list[LineError] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r\n")
        stripped = text.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            if jsonl:
                try:
                    obj = json.loads(stripped)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
            else:
                obj = {"prompt": stripped}
            jobs.append(job_from_object(obj, number, text, settings))
        except ValueError as exc:
            errors.append(LineError(number, str(exc), text))
    return jobs, errors


def read_jobs(path: str | Path, settings: Settings, jsonl: bool | None = None
              ) -> tuple[list[Job], list[LineError]]:
    """Read a prompt file (JSONL if its suffix is .jsonl/.ndjson, unless ``jsonl`` says)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return parse_lines(lines, settings, is_jsonl(path) if jsonl is None else jsonl)
