"""`ldm batch` with image editing: the JSONL keys, the inputs checked once the model is
loaded, calls grouped by what they share, the manifest's record of inputs, and a resumed
batch refusing inputs that changed.

Most tests render with a stub in place of ``Pipeline.generate`` that records its keywords
(the tiny random SD1 model is loaded for its config and tokenizer); one renders for real
with the shipped toy model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ldm.batchinputs
from ldm.batchedit import EditDefaults
from ldm.batchfile import Settings, read_jobs
from ldm.batchinputs import check_inputs
from ldm.batchplan import expand, plan_chunks
from ldm.cli import main
from ldm.manifest import MANIFEST
from ldm.modelref import ModelRef
from ldm.pipeline import Generation, Pipeline
from ldm.pngmeta import read_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TOY = REPO / "weights" / "ldm-toy.safetensors"
BASE = ["--steps", "2", "--device", "cpu"]  # strength 0.75 runs int(2 * 0.75) = 1 step
MODEL = ModelRef(Path("m"), "m", "0123456789")


def _picture(path: Path, size: tuple[int, int], grey: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (grey,) * 3).save(path)
    return path


def _mask(path: Path, size: tuple[int, int]) -> Path:
    """White (repainted) over the right half."""
    pixels = np.zeros((size[1], size[0]), dtype=np.uint8)
    pixels[:, size[0] // 2:] = 255
    Image.fromarray(pixels).save(path)
    return path


def _jsonl(path: Path, *lines: dict) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _errors(path: Path, settings: Settings = Settings()) -> dict[int, str]:
    return {e.line: e.message for e in read_jobs(path, settings)[1]}


def _entries(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """``Pipeline.generate`` replaced by a stub that records its keywords and returns grey images."""
    recorded: list[dict] = []

    def generate(self, prompt, negative_prompt=None, **kwargs):
        recorded.append({"prompt": prompt, **kwargs})
        picture = Image.new("RGB", (kwargs["width"], kwargs["height"]), (90, 90, 90))
        return Generation([picture] * len(prompt), list(kwargs["seed"]), list(prompt), list(negative_prompt),
                          vae_tiling=["none"] * len(prompt))

    monkeypatch.setattr(Pipeline, "generate", generate)
    return recorded


# --- 1. keys, checked when the file is read ---------------------------------------------


def test_edit_keys_resolve_paths_and_defaults(tmp_path):
    image = _picture(tmp_path / "in" / "cat.png", (64, 48))
    _mask(tmp_path / "in" / "m.png", (64, 48))
    elsewhere = _picture(tmp_path.parent / f"{tmp_path.name}-abs.png", (32, 32))
    prompts = _jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "a", "image": "in/cat.png"},
        {"prompt": "b", "image": "in/cat.png", "mask": "in/m.png", "mask_padding": 16},
        {"prompt": "c", "image": str(elsewhere), "extend": "0,0,32,0", "fill": "noise", "strength": 0.9},
        {"prompt": "d", "image": "in/cat.png", "extend": [8, 0, 0, 8]},
    )
    jobs, errors = read_jobs(prompts, Settings(edit=EditDefaults(mask_blur=6)))
    assert not errors
    a, b, c, d = (j.edit for j in jobs)
    assert (a.image.given, a.image.resolved, a.strength, a.mask, a.mask_blur) == (
        "in/cat.png", str(image.resolve()), 0.75, None, None)
    assert (b.strength, b.mask.given, b.mask_blur, b.mask_padding) == (1.0, "in/m.png", 6, 16)
    assert (c.image.resolved, c.extend, c.fill, c.strength, c.mask) == (
        str(elsewhere.resolve()), (0, 0, 32, 0), "noise", 0.9, None)
    assert (d.extend, d.fill, d.strength) == ((8, 0, 0, 8), "edge", 1.0)
    assert read_jobs(prompts, Settings(edit=EditDefaults(strength=0.4)))[0][0].edit.strength == 0.4


def test_bad_edit_lines_are_reported_by_line(tmp_path):
    _picture(tmp_path / "in.png", (64, 64))
    (tmp_path / "folder.png").mkdir()
    lines = [
        {"prompt": "a", "image": "missing.png"},
        {"prompt": "a", "mask": "in.png"},
        {"prompt": "a", "image": "in.png", "extend": [0, 0, 0, 0]},
        {"prompt": "a", "image": "in.png", "strength": 0},
        {"prompt": "a", "image": "in.png", "strength": 1.5},
        {"prompt": "a", "image": "in.png", "strength": "0.5"},
        {"prompt": "a", "image": "in.png", "mask": "in.png", "extend": [8, 0, 0, 0]},
        {"prompt": "a", "image": "in.png", "fill": "edge"},
        {"prompt": "a", "image": "in.png", "mask_blur": 2},
        {"prompt": "a", "image": "folder.png"},
        {"prompt": "a", "image": "in.png", "extend": "8,0,0"},
        {"prompt": "a", "image": "in.png", "extend": [-8, 0, 0, 0]},
        {"prompt": "a", "image": "in.png", "extend": [8, 0, 0, 0], "fill": "plaid"},
        {"prompt": "a", "image": ""},
        {"prompt": "a", "image": "in.png", "mask": "in.png", "mask_blur": 10**9},
        {"prompt": "a", "image": "in.png", "strength": 0.3, "steps": 3},  # int(3 * 0.3) = 0 steps
        {"prompt": "fine", "image": "in.png", "mask": "in.png", "mask_blur": 0, "strength": 1},
    ]
    path = _jsonl(tmp_path / "p.jsonl", *lines)
    with path.open("a") as f:
        f.write('{"prompt": "a", "image": "in.png", "strength": NaN}\n')
    errors = _errors(path)
    assert sorted(errors) == [*range(1, 17), 18], errors
    assert "missing.png" in errors[1] and "no such file" in errors[1]
    assert "mask needs an 'image'" in errors[2]
    assert "extend needs at least one margin" in errors[3]
    assert "strength must be in (0, 1]" in errors[4] and "strength must be in (0, 1]" in errors[5]
    assert "not both" in errors[7] and "fill needs 'extend'" in errors[8]
    assert "mask_blur needs a 'mask'" in errors[9] and "not a regular file" in errors[10]
    assert "unknown fill 'plaid'" in errors[13] and "runs no step" in errors[16] and "NaN" in errors[18]


def test_bad_command_line_defaults_stop_the_run(tmp_path, capsys):
    prompts = _jsonl(tmp_path / "p.jsonl", {"prompt": "a"})
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--strength", "1.5", *BASE]) == 2
    assert "--strength" in capsys.readouterr().err
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--mask-blur", "99999", *BASE]) == 2
    assert "mask_blur" in capsys.readouterr().err


# --- 2. inputs read once the model is loaded; the plan ------------------------------------


def test_inputs_are_read_once_and_checked_per_line(tmp_path, monkeypatch):
    _picture(tmp_path / "in.png", (70, 50))
    _mask(tmp_path / "m.png", (70, 50))
    _mask(tmp_path / "small.png", (32, 32))
    (tmp_path / "text.png").write_text("not a picture")
    _picture(tmp_path / "tiny.png", (6, 40))
    path = _jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "a", "image": "in.png"},
        {"prompt": "b", "image": "in.png", "mask": "m.png"},
        {"prompt": "c", "image": "in.png", "mask": "small.png"},
        {"prompt": "d", "image": "text.png"},
        {"prompt": "e", "image": "in.png", "mask": "text.png"},
        {"prompt": "f", "image": "tiny.png"},
        {"prompt": "g", "image": "in.png", "extend": [0, 0, 20, 0]},
        {"prompt": "h", "image": "in.png", "mask": "m.png", "mask_padding": 8},
        {"prompt": "i", "image": "in.png", "size": "32x32"},
        {"prompt": "j"},
    )
    reads = []
    inspect_file = ldm.batchinputs._inspect
    monkeypatch.setattr(ldm.batchinputs, "_inspect", lambda p, name: reads.append(p) or inspect_file(p, name))
    jobs, errors = read_jobs(path, Settings())
    assert not errors
    inputs, errors = check_inputs(jobs, native_size=64)
    errors = {e.line: e.message for e in errors}
    assert sorted(errors) == [3, 4, 5, 6], errors
    assert "32x32" in errors[3] and "70x50" in errors[3] and "same size" in errors[3]
    assert "not a readable picture" in errors[4] and "text.png" in errors[5] and "8 pixels" in errors[6]
    assert len(reads) == len({p.resolved for p in reads}) == 5  # each file once
    data = (tmp_path / "in.png").read_bytes()
    assert inputs.files[str((tmp_path / "in.png").resolve())].sha256 == hashlib.sha256(data).hexdigest()
    # The image's size rounded down to 8; extend's canvas (margins rounded to the latent grid);
    # the native size for an only-masked crop; the line's own size.
    assert inputs.sizes == {1: (64, 48), 2: (64, 48), 7: (96, 48), 8: (64, 64), 9: (32, 32)}
    assert inputs.size_of(jobs[-1], 64) == (64, 64)


def test_editing_lines_share_a_call_only_with_their_like(tmp_path):
    _picture(tmp_path / "a.png", (64, 64))
    _picture(tmp_path / "b.png", (64, 64), grey=30)
    _picture(tmp_path / "wide.png", (128, 64))
    _mask(tmp_path / "m.png", (64, 64))
    path = _jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "x", "image": "a.png", "n": 2},
        {"prompt": "x", "image": "b.png"},  # same size and strength: same call as line 1
        {"prompt": "x", "image": "wide.png", "size": "64x64"},  # same output size, other input size
        {"prompt": "x", "image": "a.png", "strength": 0.5},
        {"prompt": "x", "image": "a.png", "mask": "m.png"},
        {"prompt": "x", "image": "a.png", "mask": "m.png", "mask_blur": 0},
        {"prompt": "x"},
    )
    jobs, _ = read_jobs(path, Settings())
    inputs, errors = check_inputs(jobs, 64)
    assert not errors
    items = expand(jobs, 64, MODEL, inputs)
    chunks = plan_chunks(items, 8, lambda item: 1)
    assert [[i.job.line for i in c] for c in chunks] == [[1, 1, 2], [3], [4], [5], [6], [7]]
    assert items[0].params.strength == 0.75 and items[0].params.mask_blur is None
    assert items[5].params.mask_blur == 4 and items[-1].params.strength is None
    assert items[0].inputs["image"]["path"] == "a.png"


# --- 3. rendering, the manifest, and resuming ---------------------------------------------


def _edit_batch(tmp_path: Path) -> Path:
    _picture(tmp_path / "in" / "cat.png", (64, 64))
    _mask(tmp_path / "in" / "m.png", (64, 64))
    return _jsonl(
        tmp_path / "p.jsonl",
        {"prompt": "a red cube", "image": "in/cat.png", "n": 2, "seed": 10},
        {"prompt": "a blue ball", "image": "in/cat.png", "mask": "in/m.png", "seed": 20, "mask_padding": 8},
        {"prompt": "a green cone", "image": "in/cat.png", "extend": "0,0,32,0", "seed": 30},
        {"prompt": "a star", "seed": 40},
    )


def test_calls_get_the_pictures_and_the_manifest_records_them(sd1_folder, tmp_path, calls):
    prompts = _edit_batch(tmp_path)
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), "--mask-blur", "2",
                 *BASE]) == 0
    by_prompt = {c["prompt"][0]: c for c in calls}
    img2img = by_prompt["a red cube"]
    assert len(img2img["image"]) == 2 and img2img["strength"] == 0.75 and "mask" not in img2img
    assert img2img["image"][0].size == (64, 64) and (img2img["width"], img2img["height"]) == (64, 64)
    inpaint = by_prompt["a blue ball"]
    assert (inpaint["strength"], inpaint["mask_blur"], inpaint["mask_padding"]) == (1.0, 2, 8)
    assert inpaint["mask"][0].size == (64, 64)
    outpaint = by_prompt["a green cone"]
    assert outpaint["image"][0].size == outpaint["mask"][0].size == (96, 64)
    assert (outpaint["width"], outpaint["height"]) == (96, 64)
    assert "image" not in by_prompt["a star"]

    entries = {e["line"]: e for e in _entries(out)}
    sha = hashlib.sha256((tmp_path / "in" / "cat.png").read_bytes()).hexdigest()
    assert entries[1]["inputs"] == {"image": {"path": "in/cat.png", "resolved": str((tmp_path / "in/cat.png").resolve()),
                                              "sha256": sha}}
    assert set(entries[2]["inputs"]) == {"image", "mask"}
    assert entries[3]["outpaint"] == {"extend": [0, 0, 32, 0], "fill": "edge"}
    assert "inputs" not in entries[4]
    params = read_parameters(out / entries[2]["file"])
    assert (params.strength, params.mask_blur, params.mask_padding) == (1.0, 2, 8)
    assert "Denoising strength: 0.75" in (out / entries[1]["file"]).read_bytes().decode("latin-1")


def test_a_changed_input_is_refused_on_resume_unless_overwrite(sd1_folder, tmp_path, calls, capsys):
    prompts = _edit_batch(tmp_path)
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), *BASE]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    calls.clear()
    assert main(args) == 0 and not calls  # nothing changed: nothing to redo

    Image.new("L", (64, 64), 255).save(tmp_path / "in" / "m.png")  # another mask under the same name
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "changed since" in err and "line 2: mask 'in/m.png'" in err and "--overwrite" in err
    assert "line 1" not in err and not calls
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before

    assert main([*args, "--overwrite"]) == 0
    assert [c["prompt"] for c in calls] == [["a blue ball"]]
    new_sha = hashlib.sha256((tmp_path / "in" / "m.png").read_bytes()).hexdigest()
    assert {e["line"]: e for e in _entries(out)}[2]["inputs"]["mask"]["sha256"] == new_sha


def test_changed_outpaint_fill_is_a_conflict(sd1_folder, tmp_path, calls, capsys):
    _picture(tmp_path / "in.png", (64, 64))
    out = tmp_path / "out"
    path = _jsonl(tmp_path / "p.jsonl", {"prompt": "a", "image": "in.png", "extend": [0, 0, 32, 0]})
    args = ["batch", str(path), "--model", str(sd1_folder), "-o", str(out), *BASE]
    assert main(args) == 0
    assert main([*args, "--fill", "noise"]) == 2
    assert "outpaint" in capsys.readouterr().err


def test_an_unrecorded_edited_image_is_rendered_again(sd1_folder, tmp_path, calls):
    """A file without its entry (killed in between) cannot vouch for the input it came from."""
    prompts = _edit_batch(tmp_path)
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(sd1_folder), "-o", str(out), *BASE]
    assert main(args) == 0
    entries = _entries(out)
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in entries if e["line"] != 1))
    calls.clear()
    assert main(args) == 0
    assert [c["prompt"] for c in calls] == [["a red cube", "a red cube"]]
    assert len(_entries(out)) == len(entries)


def test_an_input_changed_during_the_run_stops_it(sd1_folder, tmp_path, monkeypatch, capsys):
    prompts = _edit_batch(tmp_path)
    check = ldm.batchinputs.check_inputs

    def check_then_edit(jobs, native):
        result = check(jobs, native)
        Image.new("RGB", (64, 64), 7).save(tmp_path / "in" / "cat.png")
        return result

    monkeypatch.setattr("ldm.batch.check_inputs", check_then_edit)
    assert main(["batch", str(prompts), "--model", str(sd1_folder), "-o", str(tmp_path / "out"), *BASE]) == 2
    assert "changed while the batch ran" in capsys.readouterr().err


@pytest.mark.skipif("image" not in inspect.signature(Pipeline.generate).parameters or not TOY.is_file(),
                    reason="needs a pipeline that takes image= and the shipped model")
def test_editing_batch_renders_with_the_shipped_model(tmp_path):
    prompts = _edit_batch(tmp_path)
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", str(TOY), "-o", str(out), "--sampler", "euler", *BASE]) == 0
    entries = {e["line"]: e for e in _entries(out)}
    assert sorted(entries) == [1, 2, 3, 4]
    with Image.open(out / entries[3]["file"]) as outpainted:
        assert outpainted.size == (96, 64)
    with Image.open(out / entries[2]["file"]) as inpainted:
        kept = np.asarray(inpainted.convert("RGB"))[:, :16]  # far from the mask and its feather
    assert (kept == 120).all()
