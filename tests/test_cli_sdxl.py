"""SDXL through `ldm generate`, `ldm batch` and the PNG text: the refiner as the web UI
names it (``Refiner: name [hash]``, ``Refiner switch at``), the size conditioning as ldm's
own keys, both read back by ``--from`` to make the same picture bit for bit; bad values
refused in one line, before any model loads where they can be."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.batchfile import SDXLValues, Settings, parse_lines
from ldm.batchplan import expand, plan_chunks
from ldm.cli import main
from ldm.modelref import ModelRef, model_hash
from ldm.pipeline import Pipeline
from ldm.pngmeta import (
    DEFAULT_SCORES, GenerationParams, check_round_trip, format_parameters, parse_parameters, read_parameters,
    read_text, recorded_size_fields, save_png,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = GenerationParams(prompt="a cat", steps=4, sampler="euler", guidance_scale=5.0, seed=3, width=64, height=64,
                        model="base", model_hash="0123456789")
# As the web UI v1.6 writes it (modules/sd_samplers_common.py apply_refiner: the checkpoint's
# short_title "name [sha256[:10]]" and the switch fraction; keys joined by ", ").
A1111_TEXT = ("a castle\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, "
              "Size: 1024x1024, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
              "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.6.0")


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# --- the PNG text, no model ---------------------------------------------------------------

def test_web_ui_refiner_keys_read_and_write_back_unchanged():
    p = parse_parameters(A1111_TEXT)
    assert (p.refiner, p.refiner_hash, p.refiner_start) == ("sd_xl_refiner_1.0", "7440042bbd", 0.8)
    assert p.extra == {"Version": "v1.6.0"}
    assert format_parameters(p) == A1111_TEXT
    # A name with a comma is quoted as the web UI quotes any value with one.
    named = BASE.replace(refiner="xl, refiner", refiner_hash="abcdef0123", refiner_start=0.65)
    assert 'Refiner: "xl, refiner [abcdef0123]", Refiner switch at: 0.65' in format_parameters(named)
    check_round_trip(named)
    # A switch point without a refiner says nothing ldm can use: kept aside, not applied.
    alone = parse_parameters("a\nSteps: 2, Seed: 1, Size: 64x64, Refiner switch at: 0.8")
    assert alone.refiner_start is None and alone.extra == {"Refiner switch at": "0.8"}


def test_size_keys_are_wxh_and_only_written_away_from_the_defaults():
    # Pipeline.generate takes (height, width) and (top, left); the text speaks WxH and XxY as Size does.
    p = BASE.replace(width=80, original_size=(96, 128), crops_coords_top_left=(16, 8), target_size=(48, 72),
                     aesthetic_score=7.25, negative_aesthetic_score=1.5)
    text = format_parameters(p)
    assert ("Original size: 128x96, Crop offset: 8x16, Target size: 72x48, Aesthetic score: 7.25, "
            "Negative aesthetic score: 1.5") in text
    assert parse_parameters(text) == p
    check_round_trip(p)
    # The defaults (output size, 0x0, the refiner's 6 / 2.5) are left out, as the web UI leaves its own out.
    used = {"original_size": (64, 80), "crops_coords_top_left": (0, 0), "target_size": (64, 80),
            "aesthetic_score": 6.0, "negative_aesthetic_score": 1.5}
    assert recorded_size_fields(used, width=80, height=64) == {
        "original_size": None, "crops_coords_top_left": None, "target_size": None, "aesthetic_score": None,
        "negative_aesthetic_score": 1.5}
    assert recorded_size_fields(used, width=64, height=80)["original_size"] == (64, 80)  # not this size's default


def test_score_defaults_are_the_references():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from ldm.size_conditioning import AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE

    signature = inspect.signature(StableDiffusionXLImg2ImgPipeline.__call__).parameters
    assert DEFAULT_SCORES == {name: signature[name].default for name in DEFAULT_SCORES}
    # ... and the pipeline's own, so a default left out of the text is the one it uses.
    assert (AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE) == tuple(DEFAULT_SCORES.values())


@pytest.mark.parametrize("key, message", [
    ("Original size: 0x64", r"'Original size' must be an integer >= 1"),
    ("Target size: 64", r"'Target size' must be 'WIDTHxHEIGHT'"),
    ("Crop offset: -8x0", r"'Crop offset' must be 'XxY'"),
    ("Original size: 99999x64", r"<= 65536"),
    ("Aesthetic score: nan", r"'Aesthetic score' must be a finite number"),
    ("Refiner: xl [0123456789], Refiner switch at: 1.5", r"Refiner switch at must be between 0 and 1"),
])
def test_bad_values_in_an_image_are_refused_naming_the_file_and_key(tmp_path, key, message):
    path = tmp_path / "bad.png"
    save_png(Image.new("RGB", (8, 8)), path, f"a cat\nSteps: 2, Seed: 1, Size: 64x64, {key}")
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        read_parameters(path)


def test_to_kwargs_needs_the_refiner_it_names():
    p = BASE.replace(original_size=(96, 128), crops_coords_top_left=(0, 8), refiner="xl", refiner_hash="0123456789",
                     refiner_start=0.5)
    with pytest.raises(ValueError, match=r"rendered with the refiner xl \[0123456789\]: load it"):
        p.to_kwargs()
    refiner = object()
    kwargs = p.to_kwargs(refiner=refiner)
    assert kwargs["refiner"] is refiner and kwargs["refiner_start"] == 0.5
    assert (kwargs["original_size"], kwargs["crops_coords_top_left"]) == ((96, 128), (0, 8))
    assert "target_size" not in kwargs and "aesthetic_score" not in kwargs  # the pipeline's defaults
    # The manifest's JSON gives pairs back as lists: to_dict holds them so, and compares equal.
    record = p.to_dict()
    assert json.loads(json.dumps(record)) == record and record["original_size"] == [96, 128]


# --- the batch file and plan, no model --------------------------------------------------------

def test_batch_keys_are_parsed_checked_and_split_calls():
    lines = [
        '{"prompt": "a", "original_size": "128x96", "crop_offset": [8, 0], "aesthetic_score": 7}',
        '{"prompt": "b", "original_size": [128, 96], "crop_offset": "8x0", "aesthetic_score": 7.0}',
        '{"prompt": "c", "refiner_start": 0.3}',
        '{"prompt": "d", "target_size": "0x64"}',
        '{"prompt": "e", "refiner_start": 1}',
        '{"prompt": "f", "aesthetic_score": "high"}',
    ]
    settings = Settings(refiner=True, refiner_start=0.5, sdxl=SDXLValues(negative_aesthetic_score=2.0))
    jobs, errors = parse_lines(lines, settings, True)
    assert {e.line: e.message for e in errors} == {
        4: "target_size must be an integer >= 1 and <= 65536, got 0",
        5: "refiner_start must be between 0 and 1 (a fraction of the schedule, such as 0.8), got 1.0",
        6: "aesthetic_score must be a number, got 'high'",
    }
    first, second, third = jobs
    assert first.sdxl == second.sdxl == SDXLValues((96, 128), (0, 8), None, 7.0, 2.0)
    assert (first.refiner_start, third.refiner_start) == (0.5, 0.3)
    assert third.sdxl == SDXLValues(negative_aesthetic_score=2.0)
    # Without --refiner a line cannot ask for a switch point.
    _, errors = parse_lines(['{"prompt": "c", "refiner_start": 0.3}'], Settings(), True)
    assert "refiner_start needs a refiner" in errors[0].message

    refiner = ModelRef(Path("xl"), "xl", "abcdef0123")
    items = expand(jobs, 64, ModelRef(Path("base"), "base", "0123456789"), refiner=refiner)
    # The first two ask for the same conditioning: one call; the third switches elsewhere: its own.
    assert [[i.job.line for i in c] for c in plan_chunks(items, 4, lambda item: 1)] == [[1, 2], [3]]
    params = items[0].params
    assert (params.original_size, params.crops_coords_top_left, params.aesthetic_score) == ((96, 128), (0, 8), 7.0)
    assert (params.target_size, params.negative_aesthetic_score) == (None, 2.0)
    assert "Refiner: xl [abcdef0123], Refiner switch at: 0.5" in params.to_text()
    assert items[2].params.refiner_start == 0.3


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize("args, message", [
    (["--original-size", "0x64"], "argument --original-size: must be an integer >= 1"),
    (["--target-size", "wide"], "argument --target-size: must be 'WIDTHxHEIGHT'"),
    (["--crop-offset=-8x0"], "argument --crop-offset: must be 'XxY'"),
    (["--aesthetic-score", "nan"], "argument --aesthetic-score: must be a finite number"),
    (["--negative-aesthetic-score", "low"], "argument --negative-aesthetic-score: expected a number such as 6.0"),
    (["--refiner", "xl", "--refiner-start", "1.5"], "argument --refiner-start: must be between 0 and 1"),
    (["--refiner-start", "0.5"], "--refiner-start needs --refiner"),
])
@pytest.mark.parametrize("command", ["generate", "batch"])
def test_bad_flags_are_one_line_errors_before_any_model_loads(no_model, tmp_path, capsys, command, args, message):
    target = ["a cat"] if command == "generate" else [str(tmp_path / "prompts.txt")]
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert main([command, *target, *args, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_refiner_the_image_names_but_cannot_be_found_is_said_before_loading(no_model, tmp_path, monkeypatch,
                                                                              capsys):
    made = tmp_path / "made.png"
    save_png(Image.new("RGB", (64, 64)), made, BASE.replace(refiner="xl-refiner", refiner_hash="abcdef0123",
                                                            refiner_start=0.5))
    monkeypatch.setenv("LDM_MODEL_PATH", str(tmp_path))
    assert main(["generate", "--from", str(made), "--model", "base", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refiner 'xl-refiner' [abcdef0123] not found in " in err and "pass --refiner PATH" in err
    assert err.count("\n") == 1


@pytest.fixture(scope="module")
def models(sdxl_folder, sdxl_refiner_folder, tmp_path_factory) -> Path:
    """The tiny base and refiner under names of their own (both fixtures' folders are ``model``)."""
    root = tmp_path_factory.mktemp("models")
    (root / "base").symlink_to(sdxl_folder, target_is_directory=True)
    (root / "xl-refiner").symlink_to(sdxl_refiner_folder, target_is_directory=True)
    return root


def _run(*args: str) -> list[str]:
    return [*args, "--size", "64x64", "--steps", "4", "--device", "cpu"]


@pytest.mark.parametrize("args, message", [
    (["--model", "SD1", "--original-size", "128x96"],
     "original_size: this sd1 model reads no size conditioning (only SDXL models have it)"),
    (["--model", "BASE", "--aesthetic-score", "7"], "aesthetic_score: this sdxl model reads size conditioning"),
    (["--model", "BASE", "--refiner", "REFINER", "--refiner-start", "0.9"],
     "refiner_start 0.9 hands over at step 4 of 4, after the last"),
])
def test_what_the_model_does_not_read_is_refused_with_the_pipelines_words(sd1_folder, models, tmp_path, capsys,
                                                                          args, message):
    paths = {"SD1": str(sd1_folder), "BASE": str(models / "base"), "REFINER": str(models / "xl-refiner")}
    args = [paths.get(a, a) for a in args]
    assert main(["generate", "a cat", *_run(*args), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.png"))


def test_generate_with_a_refiner_records_it_and_from_makes_the_same_picture(models, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["generate", "a cat", "--negative", "blurry", "--seed", "3", "--model", str(models / "base"),
                 "--refiner", str(models / "xl-refiner"), "--refiner-start", "0.5", "--original-size", "128x96",
                 "--crop-offset", "8x0", "--target-size", "80x64", "--aesthetic-score", "7",
                 "--negative-aesthetic-score", "2", *_run(), "-o", str(out)]) == 0
    (made,) = out.glob("*.png")
    text = read_text(made)
    refiner_hash = model_hash(models / "xl-refiner")
    assert re.fullmatch(r"[0-9a-f]{10}", refiner_hash)
    assert ("Original size: 128x96, Crop offset: 8x0, Target size: 80x64, Aesthetic score: 7, Negative aesthetic "
            f"score: 2, Refiner: xl-refiner [{refiner_hash}], Refiner switch at: 0.5") in text

    # The flags reach the pipeline as it takes them: (height, width), (top, left).
    base = Pipeline.from_pretrained(models / "base", device="cpu")
    refiner = Pipeline.from_pretrained(models / "xl-refiner", device="cpu")
    call = dict(negative_prompt="blurry", steps=4, seed=3, width=64, height=64, refiner=refiner, refiner_start=0.5,
                crops_coords_top_left=(0, 8), target_size=(64, 80), aesthetic_score=7.0,
                negative_aesthetic_score=2.0, progress=False)
    expected = np.asarray(base("a cat", original_size=(96, 128), **call)[0])
    assert np.array_equal(_pixels(made), expected)
    swapped = np.asarray(base("a cat", original_size=(128, 96), **call)[0])
    assert not np.array_equal(swapped, expected)  # so a WxH / HxW mix-up would have shown

    # --from, elsewhere: the model and the refiner are found by name on LDM_MODEL_PATH.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_MODEL_PATH", str(models))
    assert main(["generate", "--from", str(made), "--device", "cpu", "-o", "again"]) == 0
    (remade,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(_pixels(remade), _pixels(made))
    assert read_text(remade) == text

    # The refiner's score is its own input: back to the default, another picture, and the key is left out.
    assert main(["generate", "--from", str(made), "--aesthetic-score", "6", "--device", "cpu", "-o", "other"]) == 0
    (other,) = (tmp_path / "other").glob("*.png")
    assert not np.array_equal(_pixels(other), _pixels(made))
    assert "Aesthetic score" not in read_text(other) and "Negative aesthetic score: 2" in read_text(other)


def test_batch_with_a_refiner_records_it_resumes_and_matches_generate(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red cube", "seed": 11, "original_size": "128x96", "crop_offset": "8x0", "aesthetic_score": 7}',
        '{"prompt": "a blue ball", "seed": 12}',
        '{"prompt": "a green cone", "refiner_start": 0.9}',
        '{"prompt": "a tree", "crop_offset": "8"}',
    ]) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(models / "base"), "--refiner", str(models / "xl-refiner"),
            "--refiner-start", "0.5", *_run(), "-o", str(out)]
    assert main(args) == 1  # the bad lines are reported and skipped
    captured = capsys.readouterr()
    assert ":3: error: refiner_start 0.9 hands over at step 4 of 4" in captured.err
    assert ":4: error: crop_offset must be 'XxY'" in captured.err
    first, second = out / "00001-00-11.png", out / "00002-00-12.png"
    refiner_hash = model_hash(models / "xl-refiner")
    assert ("Original size: 128x96, Crop offset: 8x0, Aesthetic score: 7, "
            f"Refiner: xl-refiner [{refiner_hash}], Refiner switch at: 0.5") in read_text(first)
    assert "size:" not in read_text(second) and f"Refiner: xl-refiner [{refiner_hash}]" in read_text(second)
    images = {path: _pixels(path) for path in (first, second)}

    # The image's text makes it again with `generate --from`, bit for bit (each line was a call of its own).
    assert main(["generate", "--from", str(first), "--model", str(models / "base"), "--refiner",
                 str(models / "xl-refiner"), "--device", "cpu", "-o", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(_pixels(again), images[first])

    # A lost image is rendered again, the same; the other is kept.
    second.unlink()
    capsys.readouterr()
    assert main(args) == 1
    assert ": 1 rendered, 1 already done" in capsys.readouterr().out
    assert all(np.array_equal(_pixels(path), pixels) for path, pixels in images.items())
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(e["line"], e["parameters"]["refiner_start"]) for e in entries] == [(1, 0.5), (2, 0.5)]

    # Another switch point is another image: refused unless --overwrite.
    assert main([*args[:-2], "--refiner-start", "0.3", "-o", str(out)]) == 2
    assert "refiner_start 0.5 vs now 0.3" in capsys.readouterr().err
