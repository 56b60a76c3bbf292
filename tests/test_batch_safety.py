"""`ldm batch` refuses what it cannot do before rendering, trusts no path from a file,
and lets one run at a time write to a folder.

Uses the tiny random SD1 model (64x64 images) with 1-2 steps and one CPU thread.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from ldm import batchlock
from ldm.batch import BatchOptions, run_batch
from ldm.batchfile import PromptFileError, Settings, check_settings, line_seed, parse_lines, read_jobs
from ldm.cli import main
from ldm.manifest import MANIFEST
from ldm.pngmeta import parse_parameters, read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")  # one CPU thread in this process too

BASE = ["--steps", "1", "--device", "cpu"]


def _errors(lines: list[str], jsonl: bool = True, settings: Settings = Settings()) -> dict[int, str]:
    jobs, errors = parse_lines(lines, settings, jsonl)
    return {e.line: e.message for e in errors}


def _entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


# --- 1. every setting validated before anything renders --------------------------------


def test_every_setting_of_a_line_is_checked_as_the_pipeline_does():
    lines = [
        '{"prompt": "a", "sampler": "ddim", "schedule": "karras"}',  # no Karras sigmas for DDIM
        '{"prompt": "a", "sampler": "ddim", "steps": 1000}',  # DDIM fits 999 steps in 1000
        '{"prompt": "a", "steps": 1000}',  # DPM++ 2M needs steps < timesteps too
        '{"prompt": "a", "guidance": Infinity}',  # Python's json accepts these literals
        '{"prompt": "a", "guidance": NaN}',
        '{"prompt": "a", "guidance": 1e308}',
        '{"prompt": "a", "guidance": 1e400}',  # overflows to inf while parsing
        '{"prompt": "a", "seed": 1, "n": 1000000000}',
        '{"prompt": "a", "size": [12, 64]}',
        '{"prompt": "a", "size": "64x64x3"}',
        '{"prompt": "a", "steps": 2.0}',
        '{"prompt": "a", "seed": -1}',
        '{"prompt": "a", "sampler": ["euler"]}',
        '{"prompt": "a", "schedule": "exponential"}',
        '{"prompt": "a", "negative_prompt": 3}',
        "[" * 100_000,
        '{"prompt": "fine", "sampler": "euler", "schedule": "karras", "steps": 999, "guidance": 100}',
    ]
    errors = _errors(lines)
    assert sorted(errors) == list(range(1, 17)), errors
    assert "karras" in errors[1] and "steps=1000" in errors[2] and "steps=1000" in errors[3]
    assert "Infinity" in errors[4] and "NaN" in errors[5]
    assert "guidance" in errors[6] and "guidance" in errors[7] and "n must be" in errors[8]
    assert "nested too deeply" in errors[16]


def test_command_line_values_are_checked_once_before_anything(sd1_folder, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("ldm.pipeline.Pipeline.from_pretrained", no_model)
    for bad in (Settings(sampler="ddim", schedule="karras"), Settings(sampler="ddim", steps=1000),
                Settings(guidance=float("inf")), Settings(guidance=float("nan")), Settings(n=10**9),
                Settings(seed=2**40), Settings(size=(64, 60))):
        with pytest.raises(ValueError, match="command line"):
            check_settings(bad)
        out = tmp_path / "out"
        with pytest.raises(ValueError, match="command line"):
            run_batch(BatchOptions(prompts, out, bad, model=str(sd1_folder), device="cpu"))
        assert not out.exists()


def _with_timesteps(monkeypatch, timesteps: int) -> None:
    """Load models as if trained with ``timesteps`` steps (as some fine-tunes are)."""
    from ldm.denoisers import DiscreteSchedule
    from ldm.pipeline import Pipeline

    load = Pipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        pipe = load(cls, *args, **kwargs)
        pipe.schedule = DiscreteSchedule(timesteps)
        return pipe

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(from_pretrained))


def test_model_dependent_checks_run_for_every_line_before_rendering(sd1_folder, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red cube", "seed": 1}',
        '{"prompt": "too big", "size": "2048x2048"}',  # its U-Net alone needs > 100 MiB (the VAE would tile)
        '{"prompt": "too many steps for this model", "steps": 200, "sampler": "euler"}',
        '{"prompt": "a blue ball", "seed": 2}',
    ]) + "\n")
    monkeypatch.setattr("ldm.limits.available_bytes", lambda device: 100 * 2**20)
    _with_timesteps(monkeypatch, 100)
    out = tmp_path / "out"
    common = ["--model", str(sd1_folder), "-o", str(out), *BASE]

    assert main(["batch", str(prompts), "--strict", *common]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: error: a 2048x2048 image needs at least" in err
    assert f"{prompts}:3: error: steps=200 exceeds the 100 training timesteps" in err
    assert "--strict: nothing rendered" in err
    assert not list(out.glob("*.png")) and not (out / batchlock.LOCK_FILE).exists()

    assert main(["batch", str(prompts), *common]) == 1
    captured = capsys.readouterr()
    assert f"{prompts}:2: error" in captured.err and "2 bad line(s) skipped: 2, 3" in captured.out
    assert sorted(p.name for p in out.glob("*.png")) == ["00001-00-1.png", "00004-00-2.png"]


# --- 2. prompt files -----------------------------------------------------------------------


def test_binary_and_non_utf8_prompt_files_get_one_error_naming_the_file(tmp_path):
    cases = {
        "nul.txt": (b"a red cube\nab\x00cd\n", "nul.txt:2: NUL byte"),
        "latin1.txt": (b"ok\n\nna\xefve\n", "latin1.txt:3: not UTF-8 text (byte 0xef)"),
        "utf16.txt": ("a red cube\n".encode("utf-16"), "utf16.txt: is UTF-16"),
        "image.jsonl": (Image.new("RGB", (4, 4)).tobytes() + b"\x89PNG\r\n", "image.jsonl:1: NUL byte"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(PromptFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_jobs(path, Settings())


def test_bom_and_crlf_are_not_part_of_the_prompts(tmp_path):
    text = tmp_path / "bom.txt"
    text.write_bytes("\ufeffa red cube\r\n# comment\r\n\r\na blue ball\r\n".encode("utf-8"))
    jobs, errors = read_jobs(text, Settings())
    assert not errors and [(j.line, j.prompt) for j in jobs] == [(1, "a red cube"), (4, "a blue ball")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "a red cube"}\r\n{"prompt": "b"}')
    jobs, errors = read_jobs(jsonl, Settings())
    assert not errors and [j.prompt for j in jobs] == ["a red cube", "b"]


def test_a_folder_or_a_fifo_is_refused_not_waited_on(tmp_path):
    with pytest.raises(PromptFileError, match="is a folder"):
        read_jobs(tmp_path, Settings())
    fifo = tmp_path / "prompts.txt"
    os.mkfifo(fifo)
    result: list = []

    def read():
        try:
            read_jobs(fifo, Settings())
        except Exception as exc:  # noqa: BLE001 - handed to the main thread
            result.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=5)
    if reader.is_alive():  # unblock the reader so the test run can end
        with open(fifo, "w"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result[0], PromptFileError) and "not a regular file" in str(result[0])
    assert str(fifo) in str(result[0])


def test_prompts_that_would_not_round_trip_through_png_metadata_are_refused():
    errors = _errors([
        '{"prompt": "a cat\\nNegative prompt: dogs"}',
        '{"prompt": "a cat", "negative_prompt": "blurry\\n  Negative prompt: x"}',
        '{"prompt": "Negative prompt: a cat"}',
        '{"prompt": "a cat\\non two lines", "negative_prompt": "blurry\\nand dark"}',
    ])
    assert sorted(errors) == [1, 3] and "Negative prompt:" in errors[1]
    # A text file's line cannot hold a line break, but it can start with the marker.
    assert sorted(_errors(["a cat", "Negative prompt: dogs"], jsonl=False)) == [2]
    # What is accepted reads back the same.
    jobs, _ = parse_lines(['{"prompt": "a cat\\non two lines", "negative_prompt": "blurry\\nand dark"}'],
                          Settings(), True)
    from ldm.pngmeta import GenerationParams

    p = GenerationParams(prompt=jobs[0].prompt, negative_prompt=jobs[0].negative_prompt, steps=1,
                         sampler="euler", guidance_scale=7.0, seed=0)
    back = parse_parameters(p.to_text())
    assert (back.prompt, back.negative_prompt) == ("a cat\non two lines", "blurry\nand dark")
    # Spaces around lines, which the text would drop (and CLIP ignores), are dropped up front.
    jobs, _ = parse_lines(['{"prompt": "  a cat \\n on two lines\\r "}'], Settings(), True)
    assert jobs[0].prompt == "a cat\non two lines"


def test_the_command_reports_a_bad_prompt_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\x00\x01\x02")
    assert main(["batch", str(path), "-o", str(tmp_path / "out"), *BASE]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"ldm batch: error: {path}:1: NUL byte: a binary file, not a prompt file (UTF-8 text or JSONL)"


# --- 3. paths from manifests ----------------------------------------------------------------


def test_manifest_entries_cannot_point_outside_the_folder(sd1_folder, tmp_path, capsys, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), *BASE]
    assert main(args) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    absolute = tmp_path / "abs.png"
    Image.new("RGB", (64, 64), "red").save(absolute)
    own = out / "00009-00-5.png"  # a file of the user's with an image-like name
    own.write_bytes(b"mine")
    old = out / "00001-02-5.png"  # an earlier render of line 1, image 2, with another seed
    Image.new("RGB", (64, 64)).save(old)
    params = _entries(out)[0]["parameters"]
    crafted = [
        {"line": 1, "index": 1, "seed": 1, "file": "../victim.txt"},
        {"line": 2, "index": 1, "seed": 1001, "file": str(absolute)},
        {"line": 8, "index": 0, "seed": 7000, "file": "00009-00-5.png"},
        {"line": 7, "index": 0, "seed": 6000, "file": "sub/00007-00-6000.png"},
        {"line": 1, "index": 2, "seed": 5, "file": "00001-02-5.png"},  # valid, but not what is planned now
    ]
    with open(out / MANIFEST, "a") as f:
        for entry in crafted:
            f.write(json.dumps({**entry, "parameters": {**params, "steps": 9}}) + "\n")
    capsys.readouterr()

    assert main([*args, "--n", "3", "--overwrite", "--grid"]) == 0
    assert victim.read_text() == "precious" and absolute.is_file() and own.read_bytes() == b"mine"
    assert old.is_file()  # named only by a manifest entry: never deleted
    for bad in ("../victim.txt", str(absolute), "00009-00-5.png", "sub/00007-00-6000.png"):
        assert f"file {bad!r}" in caplog.text
    files = {e["file"] for e in _entries(out)}
    assert files == {f"0000{line}-0{k}-{line_seed(0, line) + k}.png" for line in (1, 2) for k in range(3)}
    assert Image.open(out / "grid.png").size == (3 * 64, 2 * 64)  # the 6 planned images, nothing else
    assert read_parameters(out / "00001-01-1.png").steps == 1


# --- 4. one writer per folder ------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_is_exclusive_and_only_its_owner_removes_it(tmp_path):
    lock = batchlock.acquire(tmp_path)
    with pytest.raises(batchlock.ActiveRunError, match=f"run is active in {tmp_path}: pid {os.getpid()}"):
        batchlock.acquire(tmp_path)
    path = tmp_path / batchlock.LOCK_FILE
    path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "someone else"}))
    lock.release()  # not ours any more: left alone
    assert path.is_file()
    path.unlink()
    batchlock.acquire(tmp_path).release()
    assert not path.exists()


def test_stale_lock_is_reported_and_taken_over_foreign_host_respected(tmp_path, caplog):
    path = tmp_path / batchlock.LOCK_FILE
    pid = _dead_pid()
    path.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "token": "t", "since": "then"}))
    lock = batchlock.acquire(tmp_path)
    assert f"removed the stale lock of pid {pid}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    foreign = json.dumps({"pid": pid, "host": "another-host.invalid", "token": "t"})
    path.write_text(foreign)
    with pytest.raises(batchlock.ActiveRunError, match="another-host.invalid"):
        batchlock.acquire(tmp_path)
    path.write_text("")  # being written by its owner: respected too
    with pytest.raises(batchlock.ActiveRunError, match="owner unknown"):
        batchlock.acquire(tmp_path)
    assert path.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == [batchlock.LOCK_FILE]


def test_lock_is_released_on_every_exit_path(sd1_folder, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), *BASE]
    lock = out / batchlock.LOCK_FILE
    assert main(args) == 0 and not lock.exists()
    assert main([*args[:-4], "--steps", "2", "--device", "cpu"]) == 2  # conflict
    assert "other settings" in capsys.readouterr().err and not lock.exists()
    assert main(["batch", str(prompts), "--model", str(tmp_path / "missing.safetensors"), "-o", str(out),
                 *BASE]) == 2
    assert not lock.exists()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm.batch.reconcile", interrupted)
    assert main(args) == 130
    assert not lock.exists()
    assert capsys.readouterr().err.strip().endswith(
        f"ldm batch: stopped; 1 image(s) kept in {out} (rerun the same command to continue)")


def test_a_stale_lock_from_a_killed_run_does_not_block_the_next(sd1_folder, tmp_path, caplog):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / batchlock.LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert main(["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), *BASE]) == 0
    assert "stale lock" in caplog.text
    assert [e["file"] for e in _entries(out)] == [f"00001-00-{line_seed(0, 1)}.png"]
    assert not (out / batchlock.LOCK_FILE).exists()
