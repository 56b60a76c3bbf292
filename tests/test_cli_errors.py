"""The `ldm` command's errors: one line naming the flag or file, exit code 2, no
traceback (-v shows it); nothing loads a model before the arguments are checked;
Ctrl-C stops with exit code 130 and keeps what was written.

Most tests replace the pipeline with a fake (argument handling only); one runs the
real command in a subprocess and interrupts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

import ldm.commands.common as common
import ldm.commands.generate as generate
from subprocesses import default_sigint
from ldm import validation
from ldm.checkpoints.files import CheckpointError
from ldm.cli import build_parser, main
from ldm.limits import MemoryLimitError
from ldm.pipeline import Pipeline
from ldm.pngmeta import GenerationParams, read_parameters, save_png

REPO = Path(__file__).resolve().parent.parent
GOOD = GenerationParams(prompt="a red cube", negative_prompt="blurry", steps=2, sampler="euler",
                        guidance_scale=5.0, seed=42, width=64, height=64)


class FakePipeline:
    """Stands in for the model: records each call, returns blank images."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def generate(self, **kwargs):
        self.calls.append(kwargs)
        n, seed = kwargs["num_images"], kwargs["seed"]
        return SimpleNamespace(images=[Image.new("RGB", (8, 8)) for _ in range(n)],
                               seeds=[seed + k for k in range(n)], params={"width": 8, "height": 8},
                               vae_tiling=["none"] * n)


@pytest.fixture
def fake(monkeypatch) -> FakePipeline:
    pipe = FakePipeline()
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    return pipe


@pytest.fixture
def no_model(monkeypatch):
    """The arguments must be refused before any model loads."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))


@pytest.fixture
def no_hang():
    """A FIFO opened for reading blocks forever: fail the test instead."""

    def timeout(*_):
        raise TimeoutError("blocked (opened a FIFO?)")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], err
    return lines[0]


def _png(path: Path, text: str | GenerationParams) -> Path:
    save_png(Image.new("RGB", (8, 8)), path, text)
    return path


# --- flags ------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, name", [
    (["--seed", "abc"], "--seed"), (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--steps", "0"], "--steps"), (["--steps", "2.5"], "--steps"), (["--n", "many"], "--n"),
    (["--guidance", "inf"], "--guidance"), (["--guidance", "nan"], "--guidance"),
    (["--guidance", "1e308"], "--guidance"), (["--guidance", "-1"], "--guidance"),
    (["--size", "7x7"], "--size"), (["--size", "big"], "--size"), (["--grid-rows", "0"], "--grid-rows"),
    (["--dtype", "int8"], "--dtype"), (["--device", "bogus"], "--device"), (["--device", "cuda:99"], "--device"),
    (["--sampler", "nope"], "--sampler"), (["--bogus"], "--bogus"),
])
def test_a_bad_flag_is_one_line_naming_it(capsys, no_model, tmp_path, flags, name):
    line = _one_line_error(capsys, ["generate", "a cat", "-o", str(tmp_path), *flags], name)
    # The text is for people: no Python type-function names.
    assert not any(word in line for word in ("_seed", "positive_int", "_guidance", "invalid int value"))


def test_batch_flags_and_missing_output_are_one_line(capsys, tmp_path):
    _one_line_error(capsys, ["batch", "p.txt", "-o", str(tmp_path), "--batch-size", "0"], "--batch-size")
    _one_line_error(capsys, ["batch", "p.txt"], "-o/--output")  # batch still needs its folder


def test_cuda_without_a_gpu_says_which_devices_exist(capsys, monkeypatch, no_model, tmp_path):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _one_line_error(capsys, ["generate", "a cat", "--device", "cuda", "-o", str(tmp_path)],
                    "--device", "no cuda device", "devices here: cpu")


def test_numbers_are_accepted_as_people_type_them():
    args = build_parser().parse_args(["generate", "x", "--steps", "20.0", "--seed", "1e3", "--guidance", "7",
                                      "--dtype", "fp16", "--device", "cpu", "--n", " 2 ", "--size", "64", "-v"])
    assert (args.steps, args.seed, args.guidance, args.dtype, args.n) == (20, 1000, 7.0, "float16", 2)
    assert args.size == (64, 64) and build_parser().parse_args(["generate", "--size", "64X32"]).size == (64, 32)
    assert args.verbose  # -v after the command works too


def test_output_that_is_a_file_is_refused_before_the_model_loads(capsys, no_model, tmp_path):
    file = tmp_path / "taken"
    file.write_text("")
    _one_line_error(capsys, ["generate", "a cat", "-o", str(file)], f"-o {file}", "not a folder")
    _one_line_error(capsys, ["generate", "a cat", "-o", str(file / "sub")], str(file), "not a folder")


@pytest.mark.parametrize("error", [
    CheckpointError("model.safetensors: truncated"), MemoryLimitError("needs 80 GiB, 8 GiB free"),
    FileNotFoundError(2, "No such file or directory", "missing.safetensors"),
])
def test_user_errors_are_one_line_and_verbose_shows_the_traceback(capsys, monkeypatch, tmp_path, error):
    def fail(cls, *args, **kwargs):
        raise error

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(fail))
    argv = ["generate", "a cat", "-o", str(tmp_path)]
    line = _one_line_error(capsys, argv, "ldm generate: error: ")
    assert "[Errno" not in line
    assert main([*argv, "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def bug(cls, *args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(bug))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "a cat", "-o", str(tmp_path)])


# --- defaults ---------------------------------------------------------------------------


def test_generate_without_output_writes_to_outputs(fake, capsys, caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "a cat", "--seed", "3"]) == 0
    assert (tmp_path / "outputs" / "00000-3.png").is_file()
    assert "outputs/00000-3.png  seed 3" in capsys.readouterr().out
    assert str(tmp_path / "outputs") in caplog.text


def test_one_table_of_defaults(fake, tmp_path):
    assert common.DEFAULTS is validation.DEFAULTS
    assert main(["generate", "a cat", "-o", str(tmp_path)]) == 0
    (call,) = fake.calls
    d = validation.DEFAULTS
    assert (call["steps"], call["guidance_scale"], call["sampler"], call["num_images"]) == (
        d.steps, d.guidance_scale, d.sampler, d.num_images)


# --- prompts that would not read back -------------------------------------------------


def test_a_prompt_line_starting_with_negative_prompt_is_refused(capsys, no_model, tmp_path):
    _one_line_error(capsys, ["generate", "a cat\nNegative prompt: a dog", "-o", str(tmp_path)],
                    "prompt line 2 starts with 'Negative prompt:'")


def test_spaces_around_prompt_lines_are_dropped_so_the_image_reads_back(fake, tmp_path):
    assert main(["generate", "  a cat \r\n in a hat ", "--negative", " blurry\r", "--seed", "1",
                 "-o", str(tmp_path)]) == 0
    p = read_parameters(tmp_path / "00000-1.png")
    assert (p.prompt, p.negative_prompt) == ("a cat\nin a hat", "blurry")
    assert fake.calls[0]["prompt"] == "a cat\nin a hat"  # what is rendered is what is stored


# --- --from -----------------------------------------------------------------------------


@pytest.mark.parametrize("line, field", [
    ("CFG scale: inf", "CFG scale"), ("CFG scale: nan", "CFG scale"), ("CFG scale: 1e308", "CFG scale"),
    ("Steps: 99999999", "Steps"), ("Seed: -1", "Seed"), (f"Seed: {2**32}", "Seed"),
    ("Size: 0x0", "Size"), ("Size: 99999x99999", "Size"),
])
def test_from_validates_the_image_values_before_the_model_loads(capsys, no_model, tmp_path, line, field):
    image = _png(tmp_path / "in.png", f"a cat\nSampler: Euler, Model: toy, {line}")
    _one_line_error(capsys, ["generate", "--from", str(image), "-o", str(tmp_path / "out")], str(image), field)


def test_flags_replace_values_the_image_may_not_ask(fake, tmp_path):
    image = _png(tmp_path / "in.png", "a cat\nSteps: 99999999, Sampler: Euler, Seed: 5, Size: 99999x99999")
    assert main(["generate", "--from", str(image), "--steps", "2", "--size", "64x64",
                 "-o", str(tmp_path / "out")]) == 0
    assert (fake.calls[0]["steps"], fake.calls[0]["width"]) == (2, 64)


def test_from_renders_one_image_when_the_call_was_large(fake, caplog, tmp_path):
    out = tmp_path / "out"
    huge = _png(tmp_path / "huge.png", GOOD.replace(seed=107, extra={"Batch size": "5000", "Batch pos": "7"}))
    assert main(["generate", "--from", str(huge), "-o", str(out)]) == 0
    assert (fake.calls[-1]["num_images"], fake.calls[-1]["seed"]) == (1, 107)
    assert "Batch size 5000" in caplog.text and "last bits" in caplog.text
    # A small call is rendered again for bit-identical pixels, as before.
    small = _png(tmp_path / "small.png", GOOD.replace(seed=43, extra={"Batch size": "4", "Batch pos": "1"}))
    assert main(["generate", "--from", str(small), "-o", str(out)]) == 0
    assert (fake.calls[-1]["num_images"], fake.calls[-1]["seed"]) == (4, 42)
    assert read_parameters(out / "00001-43.png").extra == {"Batch size": "4", "Batch pos": "1"}


def test_from_a_fifo_or_folder_is_refused_without_hanging(capsys, no_model, no_hang, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    _one_line_error(capsys, ["generate", "--from", str(fifo), "-o", str(tmp_path / "o")], str(fifo), "pipe")
    _one_line_error(capsys, ["generate", "--from", str(tmp_path), "-o", str(tmp_path / "o")],
                    str(tmp_path), "folder")


# --- info -------------------------------------------------------------------------------


def test_info_reports_each_bad_file_by_name_and_goes_on(capsys, no_hang, tmp_path):
    good = _png(tmp_path / "good.png", GOOD)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    text = tmp_path / "text.png"
    text.write_text("hello")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    corrupt = _png(tmp_path / "corrupt.png", "a cat\nSteps: many, Sampler: Euler, Seed: 1")
    bare = tmp_path / "bare.png"
    Image.new("RGB", (8, 8)).save(bare)
    missing, folder = tmp_path / "missing.png", tmp_path / "folder"
    folder.mkdir()
    bad = [missing, folder, fifo, text, truncated, corrupt, bare]
    assert main(["info", str(good), *map(str, bad), str(good)]) == 2
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == len(bad) and "Traceback" not in captured.err
    for path, line in zip(bad, errors):
        assert line.startswith(f"ldm info: error: {path}: "), line
    assert captured.out.count("a red cube\nNegative prompt: blurry\nSteps: 2") == 2


def test_info_escapes_control_characters_from_the_file(capsys, tmp_path):
    prompt = "a cat\x1b[2J\x1b]0;owned\x07 in\ta hat\r\x9b31m\u202eevil"
    image = _png(tmp_path / "x.png", GOOD.replace(prompt=prompt, negative_prompt="line 1\nline 2"))
    assert main(["info", str(image)]) == 0
    out = capsys.readouterr().out
    assert "\\x1b[2J\\x1b]0;owned\\x07 in\ta hat\\x0d\\x9b31m\\u202eevil" in out
    assert "\nNegative prompt: line 1\nline 2\nSteps: 2" in out
    assert main(["info", "--json", str(image)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\x9b\u202e")
    import json

    assert json.loads(out)["prompt"] == prompt


# --- Ctrl-C -----------------------------------------------------------------------------


def test_ctrl_c_keeps_written_images_and_exits_130(fake, capsys, monkeypatch, tmp_path):
    saved = []

    def save_then_stop(image, path, params):
        if saved:
            raise KeyboardInterrupt
        saved.append(path)
        save_png(image, path, params)

    monkeypatch.setattr(generate, "save_png", save_then_stop)
    assert main(["generate", "a cat", "--n", "3", "-o", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == f"ldm generate: stopped; 1 image(s) kept in {tmp_path}"
    assert [p.name for p in tmp_path.iterdir()] == [saved[0].name]


def test_ctrl_c_elsewhere_is_one_line(capsys, monkeypatch, tmp_path):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("ldm.commands.info.read_text", interrupted)
    assert main(["info", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err == "ldm: stopped\n"


def test_sigint_during_a_real_generate(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ldm", "generate", "a red cube", "--steps", "1000", "--sampler", "euler",
         "--device", "cpu", "-o", str(tmp_path / "out")],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, preexec_fn=default_sigint,
    )
    err = b""
    deadline = time.monotonic() + 120
    while b"euler:" not in err and time.monotonic() < deadline:  # sampling has started
        chunk = os.read(proc.stderr.fileno(), 4096)
        assert chunk, err.decode()  # the command ended before sampling
        err += chunk
    proc.send_signal(signal.SIGINT)
    err += proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    text = err.decode()
    assert "Traceback" not in text
    assert text.rstrip().endswith(f"ldm generate: stopped; 0 image(s) kept in {tmp_path / 'out'}")


def test_a_closed_pipe_is_not_an_error(tmp_path):
    image = _png(tmp_path / "x.png", GOOD)
    proc = subprocess.Popen([sys.executable, "-m", "ldm", "info", *[str(image)] * 2000], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline()  # `| head -1`
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""
