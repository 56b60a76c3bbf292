"""Fuzzing the prompt-file reader: whatever bytes a file holds, `read_jobs` returns
jobs and line errors or raises ldm's own PromptFileError naming the file; never
another exception, never a hang.

Seeded: a failure names its case, and the same seed gives the same case again.
"""

from __future__ import annotations

import json
import random
import time

import pytest
from PIL import Image

from ldm.batchfile import Job, LineError, PromptFileError, Settings, read_jobs

CASES = 400
SEED = 20240501

TEXT = "# prompts\n\na red cube on a table\na green ball, soft light\n  a blue cone  \n"
JSONL = "\n".join(json.dumps(o) for o in [
    {"prompt": "a red cube"},
    {"prompt": "a green ball", "negative_prompt": "blurry", "seed": 7, "steps": 3, "guidance": 5.5},
    {"prompt": "a blue cone", "sampler": "euler", "schedule": "karras", "size": "64x32", "n": 2},
    {"prompt": "a star", "size": [64, 64], "sampler": "ddim", "steps": 20},
    {"prompt": "a cat", "image": "in.png", "strength": 0.5},
    {"prompt": "a hat", "image": "in.png", "mask": "mask.png", "mask_blur": 2, "mask_padding": 16},
    {"prompt": "more", "image": "in.png", "extend": "0,0,32,0", "fill": "blur"},
]) + "\n"

# Values that are valid JSON but wrong for some key, or at the edges of what is allowed.
ODD_VALUES = [
    "NaN", "Infinity", "-Infinity", "1e308", "1e400", "-0.0", "2.5", "true", "null", '"7"', "[]", "{}",
    '{"a": {"b": [1, {"c": null}]}}', "[64, 64, 64]", '"64x"', "-1", "0", str(2**32), str(2**64),
    "9" * 5000, '"\\u0000"', '"\\ud800"', '"Negative prompt: x"', '"a\\nNegative prompt: b"',
    "[" * 3000 + "]" * 3000, '"in.png"', '"mask.png"', '"/"', '"."', '"../in.png"',
    '"' + "a" * 5000 + '"', '"in.png\\u0000"', '"0,0,32,0"', '"1,2,3"', "[0, 0, 0, 0]", "[8, 8, 8, 8]",
    "[1e9, 0, 0, 0]", '"edge"', '"noise"',
]
KEYS = ["prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "schedule", "size", "n", "extra",
        "image", "mask", "strength", "extend", "fill", "mask_blur", "mask_padding"]
INSERTS = [b"\x00", b"\xef\xbb\xbf", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\r", b"\r\n", b"\x1b[31m", b"\x0c",
           b"\xe2\x80\xae", b"{", b"}", b'"', b"\\", b"\n", b"#", b"\t", b"\x85"]


def _flip(data: bytes, rng: random.Random) -> bytes:
    if not data:
        return data
    i = rng.randrange(len(data))
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]


def _insert(data: bytes, rng: random.Random) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.choice(INSERTS) + data[i:]


def _truncate(data: bytes, rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data) + 1)]


def _odd_line(data: bytes, rng: random.Random) -> bytes:
    key = rng.choice(KEYS)
    image = rng.choice(['', ', "image": "in.png"'])  # editing keys mostly need an image to be judged
    line = '{"prompt": "p"%s, "%s": %s}' % (image, key, rng.choice(ODD_VALUES))
    return data + line.encode() + b"\n"


def _long_line(data: bytes, rng: random.Random) -> bytes:
    body = "a" * rng.choice([10_000, 200_000])
    return data + (json.dumps({"prompt": body}) if rng.random() < 0.5 else body).encode() + b"\n"


def _bom(data: bytes, rng: random.Random) -> bytes:
    return rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]) + data


MUTATIONS = [_flip, _insert, _truncate, _odd_line, _long_line, _bom]


def _case(rng: random.Random) -> tuple[str, bytes]:
    suffix, base = rng.choice([(".txt", TEXT), (".jsonl", JSONL)])
    data = base.encode("utf-8")
    for _ in range(rng.randint(1, 4)):
        data = rng.choice(MUTATIONS)(data, rng)
    return suffix, data


def test_any_bytes_give_jobs_line_errors_or_a_prompt_file_error(tmp_path):
    rng = random.Random(SEED)
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")  # the inputs the JSONL lines name
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    start = time.monotonic()
    outcomes = {"parsed": 0, "refused": 0}
    for number in range(CASES):
        suffix, data = _case(rng)
        path = tmp_path / f"case-{number}{suffix}"
        path.write_bytes(data)
        try:
            jobs, errors = read_jobs(path, Settings())
        except PromptFileError as exc:
            assert str(path) in str(exc), f"case {number}: {exc}"
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - reported with the case that made it
            pytest.fail(f"case {number} ({data[:80]!r}...): {type(exc).__name__}: {exc}")
        assert all(isinstance(j, Job) for j in jobs) and all(isinstance(e, LineError) for e in errors)
        assert all(0 < e.line for e in errors) and all(0 < j.line for j in jobs)
        outcomes["parsed"] += 1
    assert time.monotonic() - start < 10
    assert outcomes["parsed"] > CASES // 4 and outcomes["refused"] > CASES // 20, outcomes
