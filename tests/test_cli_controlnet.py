"""ControlNet through `ldm generate`, `ldm batch` and the PNG text.

The PNG text is checked against sd-webui-controlnet's own code (internal_controlnet/args.py:
``ControlNetUnit.infotext_fields``, ``serialize``, ``parse``; the hash of its model list,
the web UI's old ``sd_models.model_hash``), re-implemented here from that source. Pictures
are checked against the library call made by hand (``Pipeline.generate(control=Control(...))``
with the hint from ``ldm.control_preprocess``), bit for bit, on the tiny SD1 model and a tiny
SD1 ControlNet; ``--from`` must make the same picture again given the same hint.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Control, ControlNet
from ldm.batchfile import Settings, parse_lines
from ldm.batchinputs import check_inputs
from ldm.batchplan import expand, plan_chunks
from ldm.checkpoints import convert_controlnet
from ldm.cli import main
from ldm.control_preprocess import preprocess
from ldm.controlmeta import ControlParams, parse_unit
from ldm.controlspec import parse_control, parse_preprocess
from ldm.modelref import ModelRef, find_controlnet, model_hash
from ldm.pipeline import Pipeline
from ldm.pngmeta import GenerationParams, check_round_trip, format_parameters, parse_parameters, read_parameters
import test_cli_errors
from test_cli_errors import _one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
no_model = test_cli_errors.no_model  # the fixture: the arguments are refused before any model loads

SIZE = 64
STEPS = ["--steps", "2", "--sampler", "euler"]
# internal_controlnet/args.py ControlNetUnit.infotext_fields(), in order.
EXTENSION_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                    "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
# A unit as the extension serializes it (str() of each field: pydantic floats keep their ".0").
EXTENSION_UNIT = ("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and "
                  "Resize, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance "
                  "End: 1.0, Pixel Perfect: False, Control Mode: Balanced")


def extension_parse(text: str) -> dict:
    """ControlNetUnit.parse with parse_value and displaytext_to_field (internal_controlnet/args.py)."""
    def parse_value(value: str):
        if value in ("True", "False"):
            return value == "True"
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    return {"_".join(w.lower() for w in key.split(" ")): parse_value(value)
            for item in text.split(",") for (key, value) in (item.strip().split(": "),)}


def old_hash(path: Path) -> str:
    """modules/sd_models.py model_hash: sha256 of 0x10000 bytes at 0x100000, 8 hex digits."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[0:8]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def hint_file(tmp_path_factory) -> Path:
    """A 64x64 picture of coloured blocks (edges for canny, content for shuffle)."""
    rng = np.random.default_rng(3)
    array = np.full((SIZE, SIZE, 3), 230, np.uint8)
    for _ in range(5):
        x, y = rng.integers(0, SIZE - 20, 2)
        array[y:y + 20, x:x + 20] = rng.integers(0, 200, 3)
    path = tmp_path_factory.mktemp("hint") / "hint.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def cn_file(controlnet_folders, tmp_path_factory) -> Path:
    """The tiny SD1 ControlNet as an original single file (over 1 MiB, so its old hash reads bytes)."""
    path = convert_controlnet(controlnet_folders["sd1"], tmp_path_factory.mktemp("cnfile") / "control_tiny.safetensors",
                              layout="original")
    assert path.stat().st_size > 0x110000
    return path


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.float32)


def _by_hand(pipe, cn_path: Path, hint: Path, image_seed: int, *, n: int = 1, name: str = "none", scale: float = 1.0,
             start: float = 0.0, end: float = 1.0, guess_mode: bool = False, steps: int = 2,
             **params) -> list[np.ndarray]:
    """The library call the command must make: the hint from control_preprocess at the output size."""
    net = ControlNet.from_pretrained(cn_path, device="cpu", dtype=torch.float32)
    picture = preprocess(name, hint, size=(SIZE, SIZE), **params)
    gen = pipe.generate("a red cube", steps=steps, sampler="euler", seed=image_seed, num_images=n, progress=False,
                        control=Control(net, picture, scale=scale, start=start, end=end, guess_mode=guess_mode))
    return [np.asarray(im) for im in gen.images]


# --- the PNG text, no model ---------------------------------------------------------------

def test_the_extensions_unit_text_is_read_with_its_meaning():
    p = parse_parameters(f'a\nSteps: 2, Seed: 1, Size: 512x512, ControlNet 0: "{EXTENSION_UNIT}"')
    (unit,) = p.controls
    assert unit == ControlParams(model="control_v11p_sd15_canny", model_hash="d14c016b", preprocess="canny",
                                 thresholds={"low": 100, "high": 200}, scale=1.0, start=0.0, end=1.0,
                                 guess_mode=False, resize_mode="Crop and Resize", processor_res=512)
    assert p.extra == {}
    p.check_supported()


def test_what_ldm_writes_is_the_extensions_format_and_reads_back():
    units = (ControlParams("control_tiny", "0123abcd", "canny", {"low": 50, "high": 150}, 0.8, 0.1, 0.9, False),
             ControlParams("shuffle_net", "ffff0000", "shuffle", None, 1.0, 0.0, 1.0, True))
    p = GenerationParams(prompt="a", steps=2, sampler="euler", seed=1, width=64, height=48, controls=units)
    check_round_trip(p)
    # The web UI's pattern for a quoted value (modules/infotext_utils.py), then the extension's parse.
    found = re.findall(r'ControlNet (\d+): ("(?:\\.|[^\\"])+")', format_parameters(p))
    pairs = {int(k): extension_parse(json.loads(quoted)) for k, quoted in found}
    assert sorted(pairs) == [0, 1]
    assert tuple(pairs[0]) == EXTENSION_FIELDS  # every field, in the extension's order
    assert pairs[0] == {"module": "canny", "model": "control_tiny [0123abcd]", "weight": 0.8,
                        "resize_mode": "Just Resize", "processor_res": 48, "threshold_a": 50, "threshold_b": 150,
                        "guidance_start": 0.1, "guidance_end": 0.9, "pixel_perfect": True,
                        "control_mode": "Balanced"}
    # Guess mode is the extension's "ControlNet is more important"; a hidden slider reads 0.5 as it writes it.
    assert (pairs[1]["control_mode"], pairs[1]["threshold_a"], pairs[1]["threshold_b"]) == \
        ("ControlNet is more important", 0.5, 0.5)


@pytest.mark.parametrize("change, reason", [
    ("Control Mode: My prompt is more important", "no ldm equivalent"),
    ("Control Mode: Loud", "unknown Control Mode"),
    ("Model: None", "without a ControlNet"),
    ("Weight: -1", "Weight must be >= 0"),
    ("Guidance Start: 1.0", "must be below Guidance End"),
    ("Advanced Weighting: [1]", "'Advanced Weighting' is not one ldm knows"),
    ("Resize Mode: Squash", "unknown Resize Mode"),
])
def test_units_ldm_cannot_reproduce_are_kept_aside_and_refused(change, reason):
    key = change.split(": ")[0]
    fields = [f for f in EXTENSION_UNIT.split(", ") if not f.startswith(key + ":")] + [change]
    text = f'a\nSteps: 2, Seed: 1, Size: 512x512, ControlNet 0: "{", ".join(fields)}"'
    p = parse_parameters(text)
    assert p.controls == () and "ControlNet 0" in p.extra
    with pytest.raises(ValueError, match="ControlNet 0 cannot be reproduced") as exc:
        p.check_supported()
    assert reason in str(exc.value)
    with pytest.raises(ValueError, match="ControlNet 0 cannot be reproduced"):
        p.to_kwargs()


def test_fields_that_change_nothing_are_read_and_a_disabled_unit_zero_is_skipped():
    unit = parse_unit(EXTENSION_UNIT + ", Low Vram: False, Save Detected Map: True, Hr Option: Both")
    assert unit.model == "control_v11p_sd15_canny"
    p = parse_parameters(f'a\nSteps: 2, Seed: 1, Size: 512x512, ControlNet 1: "{EXTENSION_UNIT}"')
    assert len(p.controls) == 1 and p.extra == {}
    with pytest.raises(ValueError, match="ControlNet"):
        p.to_kwargs()  # rendered with a ControlNet: the caller must give it


def test_the_slider_table_covers_the_preprocessors_and_guess_mode_is_the_extensions_control_mode():
    from ldm.control_preprocess import PREPROCESSORS, parameters
    from ldm.controlmeta import SLIDERS

    assert set(SLIDERS) == set(PREPROCESSORS)
    for name, sliders in SLIDERS.items():
        assert set(sliders) <= set(parameters(name)), name
    # scripts/hook.py soft injection (with cfg injection: "ControlNet is more important") against
    # diffusers' guess mode, torch.logspace(-1, 0, 13): the same shape, 0.59% apart at most.
    extension = torch.tensor([0.825 ** float(12 - i) for i in range(13)], dtype=torch.float64)
    diffusers = torch.logspace(-1, 0, 13, dtype=torch.float64)
    assert (extension / diffusers - 1).abs().max() < 0.006


def test_control_text_splits_from_the_right():
    got = parse_control("/data/a:b/cn.safetensors:edges.png:0.5")
    assert (got.model, got.hint, got.scale) == ("/data/a:b/cn.safetensors", "edges.png", 0.5)
    got = parse_control("cn:x:edges.png")
    assert (got.model, got.hint, got.scale) == ("cn:x", "edges.png", None)
    for bad in ("cn", "cn:", ":edges.png", "cn:edges.png:-1", "cn:edges.png:nan"):
        with pytest.raises(ValueError):
            parse_control(bad)
    assert parse_preprocess("canny:low=50") == ("canny", {"low": 50, "high": 200})
    assert parse_preprocess("shuffle") == ("shuffle", {})
    for bad, message in (("canny:low=300", "low must be"), ("canny:low=50,high=40", "low <= high"),
                         ("sobel", "unknown preprocessor"), ("canny:width=3", "takes low, high"),
                         ("shuffle:seed=3", "image's seed"), ("canny:low", "key=value")):
        with pytest.raises(ValueError, match=message):
            parse_preprocess(bad)


def test_controlnets_are_found_by_name_in_a_controlnet_subfolder_and_by_the_old_hash(cn_file, tmp_path):
    sub = tmp_path / "ControlNet"
    sub.mkdir()
    shutil.copy(cn_file, sub / "canny_tiny.safetensors")
    assert find_controlnet("canny_tiny", None, [tmp_path]) == sub / "canny_tiny.safetensors"
    assert find_controlnet("renamed", old_hash(cn_file), [tmp_path]) == sub / "canny_tiny.safetensors"
    with pytest.raises(FileNotFoundError, match="ControlNet 'renamed' \\[00000000\\] not found"):
        find_controlnet("renamed", "00000000", [tmp_path])


# --- generate ---------------------------------------------------------------------------------

def test_generate_passes_the_hint_made_at_the_output_size_and_from_makes_it_again(
        pipe, sd1_folder, cn_file, hint_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # 4 steps: with start 0.1 and end 0.9 the ControlNet acts on steps 1 and 2 (diffusers' rule).
    argv = ["generate", "a red cube", "--model", str(sd1_folder), "--steps", "4", "--sampler", "euler", "--seed", "5",
            "-o", str(out), "--control", f"{cn_file}:{hint_file}:0.8", "--control-preprocess", "canny:low=50",
            "--control-start", "0.1", "--control-end", "0.9", "--guess-mode"]
    assert main(argv) == 0
    made = out / "00000-5.png"
    expected = _by_hand(pipe, cn_file, hint_file, 5, name="canny", scale=0.8, start=0.1, end=0.9, guess_mode=True,
                        steps=4, low=50, high=200)
    assert np.array_equal(_pixels(made), expected[0])
    plain = np.asarray(pipe.generate("a red cube", steps=4, sampler="euler", seed=5, progress=False).images[0])
    assert np.abs(expected[0].astype(int) - plain).max() > 8  # the ControlNet changed the picture
    unit = read_parameters(made).controls[0]
    assert unit == ControlParams("control_tiny", old_hash(cn_file), "canny", {"low": 50, "high": 200}, 0.8, 0.1,
                                 0.9, True)

    # Elsewhere: the ControlNet is found by name in $LDM_MODEL_PATH/ControlNet, the model by name too.
    models = tmp_path / "models"
    (models / "ControlNet").mkdir(parents=True)
    shutil.copy(cn_file, models / "ControlNet" / cn_file.name)
    shutil.copytree(sd1_folder, models / "model")
    monkeypatch.setenv("LDM_MODEL_PATH", str(models))
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    line = _one_line_error(capsys, ["generate", "--from", str(made), "-o", "again"], "--control-image HINT.png",
                           "ControlNet 0 (canny, control_tiny [")
    assert "its hint is not in the text" in line
    assert main(["generate", "--from", str(made), "-o", "again", "--control-image", str(hint_file)]) == 0
    assert np.array_equal(_pixels(tmp_path / "again" / "00000-5.png"), expected[0])
    # Overrides: another preprocessor for the image's ControlNet.
    assert main(["generate", "--from", str(made), "-o", "other", "--control-image", str(hint_file),
                 "--control-preprocess", "none", "--no-guess-mode"]) == 0
    assert read_parameters(tmp_path / "other" / "00000-5.png").controls[0].preprocess == "none"
    assert not np.array_equal(_pixels(tmp_path / "other" / "00000-5.png"), expected[0])


def test_shuffle_draws_each_images_hint_from_its_own_seed(pipe, sd1_folder, cn_file, hint_file, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "out"
    nets = tmp_path / "nets:v1"  # a ':' in the model's path: --control splits at the last ones
    nets.symlink_to(cn_file.parent)
    assert main(["generate", "a red cube", "--model", str(sd1_folder), *STEPS, "--seed", "9", "--n", "2", "-o",
                 str(out), "--control", f"{nets / cn_file.name}:{hint_file}", "--control-preprocess", "shuffle"]) == 0
    for k in range(2):
        path = out / f"0000{k}-{9 + k}.png"
        assert np.array_equal(_pixels(path), _by_hand(pipe, cn_file, hint_file, 9 + k, name="shuffle", seed=9 + k)[0])
        assert "Batch size" not in read_parameters(path).extra  # each image is its own call
    # --from the second image alone: the same picture.
    monkeypatch.setenv("LDM_MODEL_PATH", str(cn_file.parent))
    assert main(["generate", "--from", str(out / "00001-10.png"), "--model", str(sd1_folder), "-o",
                 str(tmp_path / "again"), "--control-image", str(hint_file)]) == 0
    assert np.array_equal(_pixels(tmp_path / "again" / "00000-10.png"), _pixels(out / "00001-10.png"))


@pytest.mark.parametrize("flags, expected", [
    (["--control", "{cn}:missing.png"], "--control: hint picture missing.png not found"),
    (["--control", "nowhere_net:{hint}"], "ControlNet 'nowhere_net' not found"),
    (["--control", "./no/such/net:{hint}"], "no such file or folder"),
    (["--control", "{cn}:{hint}:-0.5"], "scale must be a finite number >= 0"),
    (["--control", "{cn}:{hint}", "--control-start", "0.6", "--control-end", "0.4"], "start (0.6) must be below"),
    (["--control", "{cn}:{hint}", "--control-preprocess", "sobel"], "unknown preprocessor 'sobel'; valid: none"),
    (["--control", "{cn}:{hint}", "--control-preprocess", "canny:low=999"], "low must be"),
    (["--control", "{cn}:{hint}", "--control", "{cn}:{hint}", "--control-end", "1", "--control-end", "1",
      "--control-end", "1"], "--control-end is given 3 times for 2 ControlNet(s)"),
    (["--control-image", "{hint}"], "--control-image needs --from"),
    (["--control-preprocess", "canny"], "--control-preprocess needs --control"),
    (["--guess-mode"], "--guess-mode needs --control"),
])
def test_bad_control_flags_are_one_line_errors_before_any_model_loads(no_model, cn_file, hint_file, tmp_path,
                                                                      monkeypatch, capsys, flags, expected):
    monkeypatch.setenv("LDM_MODEL_PATH", str(tmp_path))
    flags = [f.format(cn=cn_file, hint=hint_file) for f in flags]
    _one_line_error(capsys, ["generate", "a cat", *STEPS, "-o", str(tmp_path / "out"), *flags], expected)


def test_a_controlnet_of_another_family_is_refused_in_the_librarys_words(sd1_folder, controlnet_folders, hint_file,
                                                                        tmp_path, capsys):
    line = _one_line_error(capsys, ["generate", "a cat", "--model", str(sd1_folder), *STEPS, "-o", str(tmp_path),
                                    "--control", f"{controlnet_folders['sd2']}:{hint_file}"])
    assert "sd2" in line and "sd1" in line
    assert not list(tmp_path.glob("*.png"))


def _web_ui_image(tmp_path: Path, unit: str, size: str = "64x64") -> Path:
    from ldm.pngmeta import save_png

    path = tmp_path / "webui.png"
    save_png(Image.new("RGB", (8, 8)), path, f'a red cube\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 4, Size: '
             f'{size}, Model: model, ControlNet 0: "{unit}"')
    return path


@pytest.mark.parametrize("unit, expected", [
    (EXTENSION_UNIT.replace("Balanced", "My prompt is more important"), "Control Mode 'My prompt is more important'"),
    (EXTENSION_UNIT.replace("Module: canny", "Module: depth_midas"), "preprocessor 'depth_midas' is not one ldm has"),
    (EXTENSION_UNIT, "detected at 512 pixels"),  # Size 64x64: the extension detected at 512
    (EXTENSION_UNIT.replace("Pixel Perfect: False", "Pixel Perfect: True"), "Resize Mode 'Crop and Resize'"),
])
def test_units_from_the_web_ui_that_ldm_would_make_otherwise_are_refused_on_from(no_model, cn_file, tmp_path,
                                                                               monkeypatch, capsys, unit, expected):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (96, 64), "white").save(wide)  # not the 64x64 output's aspect ratio
    monkeypatch.setenv("LDM_MODEL_PATH", str(cn_file.parent))
    unit = unit.replace("control_v11p_sd15_canny [d14c016b]", f"control_tiny [{old_hash(cn_file)}]")
    _one_line_error(capsys, ["generate", "--from", str(_web_ui_image(tmp_path, unit)), "-o", str(tmp_path / "o"),
                             "--control-image", str(wide)], expected)


@pytest.mark.parametrize("flags", [["--control-image", "{hint}"], ["--guess-mode"],
                                   ["--control-preprocess", "canny"]])
def test_control_options_for_an_image_made_without_controlnet_are_refused(no_model, hint_file, tmp_path, capsys,
                                                                          flags):
    from ldm.pngmeta import save_png

    plain = tmp_path / "plain.png"
    save_png(Image.new("RGB", (8, 8)), plain, "a\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Model: m")
    _one_line_error(capsys, ["generate", "--from", str(plain), "-o", str(tmp_path / "o"),
                             *(f.format(hint=hint_file) for f in flags)], "was made without a ControlNet")


def test_a_web_ui_unit_renders_once_its_hint_fits(pipe, sd1_folder, cn_file, hint_file, tmp_path, monkeypatch):
    unit = (EXTENSION_UNIT.replace("control_v11p_sd15_canny [d14c016b]", "control_tiny")
            .replace("Pixel Perfect: False", "Pixel Perfect: True").replace("Weight: 1.0", "Weight: 0.5"))
    monkeypatch.setenv("LDM_MODEL_PATH", str(cn_file.parent))
    assert main(["generate", "--from", str(_web_ui_image(tmp_path, unit)), "--model", str(sd1_folder), "-o",
                 str(tmp_path / "o"), "--control-image", str(hint_file)]) == 0
    got = _pixels(tmp_path / "o" / "00000-4.png")
    # CFG scale 7, as the image says; canny at its recorded thresholds (the defaults).
    net = ControlNet.from_pretrained(cn_file, device="cpu", dtype=torch.float32)
    gen = pipe.generate("a red cube", steps=2, sampler="euler", seed=4, guidance_scale=7.0, progress=False,
                        control=Control(net, preprocess("canny", hint_file, size=(SIZE, SIZE)), scale=0.5))
    assert np.array_equal(got, np.asarray(gen.images[0]))
    assert read_parameters(tmp_path / "o" / "00000-4.png").controls[0].resize_mode == "Just Resize"


# --- batch ----------------------------------------------------------------------------------

def _jobs(tmp_path: Path, lines: list[dict]):
    return parse_lines([json.dumps(line) for line in lines], Settings(), True, tmp_path)


def test_batch_control_lines_are_checked_and_share_calls_only_when_equal(cn_file, hint_file, tmp_path):
    other = tmp_path / "other.png"
    shutil.copy(hint_file, other)
    cn = {"model": str(cn_file), "image": str(hint_file), "preprocess": "canny"}
    jobs, errors = _jobs(tmp_path, [
        {"prompt": "a", "control": [cn]},
        {"prompt": "b", "control": [{**cn, "preprocess": "canny:low=100,high=200"}]},  # the same settings
        {"prompt": "c", "control": [{**cn, "scale": 0.5}]},
        {"prompt": "d", "control": [{**cn, "image": str(other)}]},
        {"prompt": "e", "control": [{**cn, "preprocess": "shuffle"}], "n": 2},
        {"prompt": "f"},
        {"prompt": "bad", "control": [{**cn, "image": "missing.png"}]},
        {"prompt": "bad", "control": [{**cn, "scale": -1}]},
        {"prompt": "bad", "control": [{**cn, "start": 0.5, "end": 0.5}]},
        {"prompt": "bad", "control": [{**cn, "preprocess": "sobel"}]},
        {"prompt": "bad", "control": [{**cn, "model": "nowhere_net"}]},
        {"prompt": "bad", "control": [{**cn, "weight": 1}]},
        {"prompt": "bad", "control": cn},
        {"prompt": "bad", "control": [{"model": str(cn_file)}]},
    ])
    messages = {e.line: e.message for e in errors}
    assert sorted(messages) == list(range(7, 15))
    for line, text in ((7, "control[0] image 'missing.png': no such file"), (8, "control[0] scale must be"),
                       (9, "control[0] start (0.5) must be below"), (10, "unknown preprocessor 'sobel'"),
                       (11, "ControlNet 'nowhere_net' not found"), (12, "unknown key(s) 'weight'"),
                       (13, "control must be a non-empty list"), (14, "missing 'image'")):
        assert text in messages[line], messages[line]
    inputs, unreadable = check_inputs(jobs, SIZE)
    assert unreadable == [] and len(inputs.files) == 2  # the two hint files, read and hashed once each
    items = expand(jobs, SIZE, ModelRef(Path("m"), "m", "0123456789"), inputs)
    chunks = plan_chunks(items, 8, lambda item: 1)
    assert sorted(sorted(i.job.line for i in c) for c in chunks) == [[1, 2], [3], [4], [5], [5], [6]]


def test_batch_renders_control_lines_hashes_their_hints_and_resumes(pipe, sd1_folder, cn_file, hint_file, tmp_path,
                                                                   capsys):
    hint = tmp_path / "hint.png"
    shutil.copy(hint_file, hint)
    (tmp_path / "ControlNet").mkdir()
    shutil.copy(cn_file, tmp_path / "ControlNet" / "canny_tiny.safetensors")
    prompts = tmp_path / "lines.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red cube", "seed": 5, "control": [
        {"model": "ControlNet/canny_tiny.safetensors", "image": "hint.png", "preprocess": "canny:low=50",
         "scale": 0.8}]}) + "\n")
    argv = ["batch", str(prompts), "--model", str(sd1_folder), *STEPS, "-o", str(tmp_path / "out")]
    assert main(argv) == 0
    made = tmp_path / "out" / "00001-00-5.png"
    assert np.array_equal(_pixels(made), _by_hand(pipe, cn_file, hint_file, 5, name="canny", scale=0.8, low=50,
                                                 high=200)[0])
    assert read_parameters(made).controls[0] == ControlParams("canny_tiny", old_hash(cn_file), "canny",
                                                              {"low": 50, "high": 200}, 0.8)
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert entry["inputs"]["control 0"]["sha256"] == hashlib.sha256(hint.read_bytes()).hexdigest()
    capsys.readouterr()
    assert main(argv) == 0 and "1 already done" in capsys.readouterr().out
    Image.new("RGB", (SIZE, SIZE), "black").save(hint)
    assert main(argv) == 2
    assert "line 1: control 0 'hint.png'" in capsys.readouterr().err


def test_batch_refuses_lines_whose_controlnet_does_not_fit(sd1_folder, controlnet_folders, hint_file, tmp_path, capsys):
    prompts = tmp_path / "lines.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "control": [{"model": str(controlnet_folders["sd2"]),
                                                               "image": str(hint_file)}]}) + "\n"
                       + json.dumps({"prompt": "b"}) + "\n")
    assert main(["batch", str(prompts), "--model", str(sd1_folder), *STEPS, "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{prompts}:1: error:" in err and "sd2" in err
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["00002-00-1000.png"]


def test_folder_controlnets_hash_as_their_folder_hash(controlnet_folders):
    from ldm.modelref import controlnet_ref

    folder = controlnet_folders["sd1"]
    assert controlnet_ref(folder).hash == model_hash(folder)[:8]
