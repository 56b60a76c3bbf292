"""Seeded fuzzing of the safetensors reader: every mutated file loads or is refused
with a CheckpointError naming its path; nothing else escapes, nothing hangs."""

from __future__ import annotations

import faulthandler
import json
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoints import CheckpointError
from ldm.checkpoints.files import open_tensor_file

CASES = 400
SEED = 1234
# Values a corrupt or hostile header might hold where a shape, dtype, offset or metadata value belongs.
ODD_VALUES = [
    None, True, False, 0, -1, 1, 2**63, 2**64 + 1, -(2**63), 1.5, float("nan"), "", "4", "F32",
    [], [0], [-1], [2, 2], [True], [1.0], ["1"], [[1]], [2**40, 2**40], [None], {}, {"a": 1}, [0, 0],
]


def valid_files(folder: Path) -> list[Path]:
    gen = torch.Generator().manual_seed(SEED)
    tensors = [
        {"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen)},
        {"h": torch.randn(2, 2, generator=gen).half(), "i": torch.arange(5), "e": torch.zeros(0)},
        {"x": torch.randn(1, 2, 1, 3, generator=gen).to(torch.bfloat16)},
    ]
    paths = []
    for n, state in enumerate(tensors):
        path = folder / f"valid{n}.safetensors"
        save_file(state, path, metadata={"format": "pt", "ldm.note": "x" * n})
        paths.append(path)
    return paths


def split(data: bytes) -> tuple[int, bytes, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, data[8:8 + n], data[8 + n:]


def join(header: bytes, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    n, header, body = split(data)
    header = bytearray(header)
    kind = rng.randrange(6)
    pos = rng.randrange(len(header))
    if kind == 0:
        header[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:
        header[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif kind == 2:
        del header[pos:pos + rng.randint(1, 4)]
    elif kind == 3:
        return join(bytes(header), body, length=rng.choice([0, 1, n - 1, n + 1, 2**63, 2**64 - 1, len(data)]))
    elif kind == 4:
        return data[: rng.randrange(len(data))]
    else:
        return join(bytes(header), body[: rng.randrange(len(body) + 1)] + b"\0" * rng.randrange(3))
    return join(bytes(header), body, length=n if rng.random() < 0.5 else None)


def mutate_json(rng: random.Random, data: bytes) -> bytes:
    _, header, body = split(data)
    doc = json.loads(header)
    names = [k for k in doc if k != "__metadata__"]
    target = rng.choice(names)
    kind = rng.randrange(7)
    if kind == 0:
        doc[target][rng.choice(["shape", "dtype", "data_offsets"])] = rng.choice(ODD_VALUES)
    elif kind == 1:
        doc["__metadata__"] = rng.choice(ODD_VALUES + [{"k": rng.choice(ODD_VALUES)}])
    elif kind == 2:
        del doc[target][rng.choice(["shape", "dtype", "data_offsets"])]
    elif kind == 3:
        other = rng.choice(names)
        doc[target]["data_offsets"] = list(doc[other]["data_offsets"])
    elif kind == 4:
        start, end = doc[target]["data_offsets"]
        doc[target]["data_offsets"] = rng.choice([[end, start], [start - 1, end - 1], [start + 1, end + 1]])
    elif kind == 5:
        doc[target]["dtype"] = rng.choice(["F64", "I8", "BOOL", "U8", "F8_E4M3", "I64", "f32", "Q4"])
    else:
        doc[target] = rng.choice(ODD_VALUES)
    return join(json.dumps(doc).encode(), body)


def read_everything(path: Path) -> None:
    file = open_tensor_file(path)
    for key in file.keys():
        file.get(key)


def test_fuzzed_headers_load_or_raise_checkpoint_error(tmp_path):
    rng = random.Random(SEED)
    sources = [p.read_bytes() for p in valid_files(tmp_path)]
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        data = rng.choice(sources)
        data = mutate_json(rng, data) if rng.random() < 0.5 else mutate_bytes(rng, data)
        path = tmp_path / f"case{case}.safetensors"
        path.write_bytes(data)
        # A hang (even inside native code) dumps every stack and ends the run.
        faulthandler.dump_traceback_later(10, exit=True)
        try:
            read_everything(path)
            outcomes["loaded"] += 1
        except CheckpointError as exc:
            assert str(exc).strip() and str(path) in str(exc), f"case {case}: {exc!r}"
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(exc).__name__} escaped: {exc}\nheader: {data[:300]!r}")
        finally:
            faulthandler.cancel_dump_traceback_later()
        path.unlink()
    assert outcomes["loaded"] and outcomes["refused"] > CASES // 2, outcomes
