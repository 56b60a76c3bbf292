"""`ldm generate --image/--mask/--extend`: the keywords the pipeline gets, the editing keys in
the PNG parameters, `--from` an edited image, and one-line errors before any model loads.

A fake pipeline records the calls; one test runs the shipped model end to end once the
pipeline takes an ``image``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_cli_errors
from PIL import Image

from ldm.cli import UsageError, build_parser, main
from ldm.pipeline import Pipeline
from ldm.pngmeta import check_round_trip, format_parameters, parse_parameters, read_parameters, read_text, save_png
from test_cli_errors import FakePipeline, _one_line_error

REPO = Path(__file__).resolve().parent.parent
EDITING_PIPELINE = "image" in inspect.signature(Pipeline.generate).parameters
BASE = ["--steps", "2", "--sampler", "euler", "--seed", "7"]
no_model = test_cli_errors.no_model  # the fixture: the arguments are refused before any model loads


class EditingPipeline(FakePipeline):
    """Also reports the size and editing settings, as the pipeline does (with its defaults)."""

    def generate(self, **kwargs):
        gen = super().generate(**kwargs)
        image, mask = kwargs.get("image"), kwargs.get("mask")
        if image is not None:
            width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
            gen.params.update(width=width, height=height,
                              strength=kwargs.get("strength", 1.0 if mask is not None else 0.75),
                              mask_blur=kwargs.get("mask_blur", 4), mask_padding=kwargs.get("mask_padding"))
        return gen

    @classmethod
    def in_place_of_the_model(cls, monkeypatch) -> "EditingPipeline":
        """Every model load returns this one fake, so its calls can be read after `main`."""
        pipe = cls()
        monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(lambda _, *a, **k: pipe))
        return pipe


@pytest.fixture
def fake(monkeypatch) -> EditingPipeline:
    return EditingPipeline.in_place_of_the_model(monkeypatch)


@pytest.fixture
def inputs(tmp_path) -> SimpleNamespace:
    """A 64x48 picture, a mask of its size, one of another size, and a text file."""
    rng = np.random.default_rng(0)
    image, mask, small, text = (tmp_path / n for n in ("in.png", "mask.png", "small.png", "notes.txt"))
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    m = np.zeros((48, 64), np.uint8)
    m[16:32, 24:40] = 255
    Image.fromarray(m).save(mask)
    Image.fromarray(m[:40]).save(small)
    text.write_text("hello")
    return SimpleNamespace(image=image, mask=mask, small=small, text=text, out=tmp_path / "out")


def _argv(inputs, *flags: str) -> list[str]:
    return ["generate", "a red cube", "-o", str(inputs.out), *BASE, *flags]


def _run(inputs, *flags: str) -> int:
    return main(_argv(inputs, *flags))


# --- what the pipeline gets, what the PNG says ------------------------------------------


def test_img2img(fake, inputs):
    assert _run(inputs, "--image", str(inputs.image), "--strength", "0.6") == 0
    (call,) = fake.calls
    assert call["strength"] == 0.6 and "mask" not in call and "keep_unmasked" not in call
    expected = np.asarray(Image.open(inputs.image), np.float32) / 255
    assert np.array_equal(call["image"], expected)
    text = read_text(inputs.out / "00000-7.png")
    assert "Denoising strength: 0.6" in text and "Size: 64x48" in text and "Mask blur" not in text


def test_img2img_records_the_pipeline_default_strength(fake, inputs):
    assert _run(inputs, "--image", str(inputs.image)) == 0
    assert "strength" not in fake.calls[0]
    assert read_parameters(inputs.out / "00000-7.png").strength == 0.75


def test_inpainting(fake, inputs):
    assert _run(inputs, "--image", str(inputs.image), "--mask", str(inputs.mask), "--mask-blur", "6",
                "--mask-padding", "16", "--raw-decode") == 0
    (call,) = fake.calls
    assert call["mask"].shape == (48, 64) and call["mask"].sum() == 16 * 16
    assert (call["mask_blur"], call["mask_padding"], call["keep_unmasked"]) == (6, 16, False)
    text = read_text(inputs.out / "00000-7.png")
    assert ("Denoising strength: 1, Mask blur: 6, Inpaint area: Only masked, Masked area padding: 16"
            in text)


def test_outpainting(fake, inputs):
    assert _run(inputs, "--image", str(inputs.image), "--extend", "0,0,32,0", "--fill", "color") == 0
    (call,) = fake.calls
    canvas, mask = call["image"], call["mask"]
    assert canvas.size == mask.size == (96, 48) and mask.mode == "L"
    assert (np.asarray(mask)[:, 56:] == 255).all() and (np.asarray(mask)[:, :56] == 0).all()
    assert read_parameters(inputs.out / "00000-7.png").mask_blur == 4


def test_from_an_edited_image_needs_its_inputs_again(fake, capsys, inputs):
    assert _run(inputs, "--image", str(inputs.image), "--strength", "0.6") == 0
    made = inputs.out / "00000-7.png"
    _one_line_error(capsys, ["generate", "--from", str(made), "-o", str(inputs.out)],
                    f"{made}: this image was made from an input image (Denoising strength: 0.6): "
                    "give it with --image")
    assert len(fake.calls) == 1  # refused before the model
    assert main(["generate", "--from", str(made), "--image", str(inputs.image), "-o", str(inputs.out)]) == 0
    again = fake.calls[-1]
    assert again["strength"] == 0.6 and again["seed"] == 7 and np.array_equal(again["image"], fake.calls[0]["image"])


def test_from_an_inpainted_image_needs_the_mask_too(fake, capsys, inputs):
    assert _run(inputs, "--image", str(inputs.image), "--mask", str(inputs.mask)) == 0
    made = inputs.out / "00000-7.png"
    for flags in ([], ["--image", str(inputs.image)]):
        _one_line_error(capsys, ["generate", "--from", str(made), "-o", str(inputs.out), *flags],
                        "made from an input image and a mask (Denoising strength: 1, Mask blur: 4)", "--mask")
    assert main(["generate", "--from", str(made), "--image", str(inputs.image), "--mask", str(inputs.mask),
                 "--strength", "0.5", "-o", str(inputs.out)]) == 0
    assert (fake.calls[-1]["strength"], fake.calls[-1]["mask_blur"]) == (0.5, 4)


def test_a_txt2img_image_has_no_editing_keys(fake, inputs):
    assert _run(inputs) == 0
    assert not {"image", "mask", "strength", "mask_blur"} & set(fake.calls[0])
    assert "Denoising" not in read_text(inputs.out / "00000-7.png")


# --- the editing keys of the parameters text ----------------------------------------------

A1111_INPAINT = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc, "
                 "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32")


def test_editing_keys_read_and_round_trip():
    p = parse_parameters(A1111_INPAINT)
    assert (p.strength, p.mask_blur, p.mask_padding, p.extra) == (0.75, 4, 32, {})
    assert format_parameters(p).endswith(
        "Denoising strength: 0.75, Mask blur: 4, Inpaint area: Only masked, Masked area padding: 32")
    check_round_trip(p)
    assert {k: p.to_kwargs()[k] for k in ("strength", "mask_blur", "mask_padding")} == {
        "strength": 0.75, "mask_blur": 4, "mask_padding": 32}
    for bad in (p.replace(strength=0.1 + 0.2), p.replace(mask_padding=None), p.replace(mask_blur=0)):
        check_round_trip(bad)


@pytest.mark.parametrize("text, fields", [
    ("x\nSteps: 2, Seed: 1, Denoising strength: 0.5", (0.5, None, None)),  # img2img
    ("x\nSteps: 2, Seed: 1, Mask blur: 4, Denoising strength: 0.5, Inpaint area: Whole picture, "
     "Masked area padding: 32", (0.5, 4, None)),
    # "Only masked" without a padding: the web UI's default padding
    ("x\nSteps: 2, Seed: 1, Denoising strength: 0.5, Inpaint area: Only masked", (0.5, None, 32)),
    ("x\nSteps: 2, Seed: 1, Denoising strength: 0.7, Hires upscale: 2", (None, None, None)),  # hires fix's strength
])
def test_editing_keys_as_the_web_ui_writes_them(text, fields):
    p = parse_parameters(text)
    assert (p.strength, p.mask_blur, p.mask_padding) == fields
    assert (p.edit_inputs is None) == (fields[0] is None)


@pytest.mark.parametrize("key, value", [("Denoising strength", "1.5"), ("Denoising strength", "0"),
                                        ("Mask blur", "-1"), ("Masked area padding", "99999")])
def test_editing_keys_are_checked(tmp_path, key, value):
    text = f"x\nSteps: 2, Seed: 1, Inpaint area: Only masked, {key}: {value}"
    path = tmp_path / "p.png"
    save_png(Image.new("RGB", (8, 8)), path, text)
    with pytest.raises(ValueError, match=f"{path}: {key}"):
        read_parameters(path)


# --- errors, before any model loads ------------------------------------------------------


@pytest.mark.parametrize("flags, name", [
    (["--strength", "0"], "--strength"), (["--strength", "1.5"], "--strength"), (["--strength", "nan"], "--strength"),
    (["--strength", "much"], "--strength"), (["--mask-blur", "-1"], "--mask-blur"),
    (["--mask-padding", "2.5"], "--mask-padding"), (["--extend", "1,2"], "--extend"),
    (["--extend=-8,0,0,0"], "--extend"), (["--extend", "0,0,0,0"], "--extend"), (["--fill", "smear"], "--fill"),
])
def test_a_bad_editing_flag_is_one_line_naming_it(capsys, no_model, inputs, flags, name):
    line = _one_line_error(capsys, _argv(inputs, "--image", str(inputs.image), *flags), name)
    assert "strength_float" not in line and "pixels_int" not in line


def test_margins_name_the_side():
    with pytest.raises(UsageError, match="argument --extend: top must be an integer >= 0, got -8"):
        build_parser().parse_args(["generate", "x", "--extend=0,-8,0,0"])


@pytest.mark.parametrize("flags, words", [
    (["--mask", "M"], "--mask needs --image"), (["--strength", "0.5"], "--strength needs --image"),
    (["--extend", "0,0,8,0"], "--extend needs --image"),
    (["--image", "I", "--mask", "M", "--extend", "0,0,8,0"], "--mask and --extend cannot go together"),
    (["--image", "I", "--fill", "noise"], "--fill needs --extend"),
    (["--image", "I", "--mask-blur", "2"], "--mask-blur needs --mask or --extend"),
    (["--image", "I", "--raw-decode"], "--raw-decode needs --mask or --extend"),
])
def test_flags_that_do_not_go_together(capsys, no_model, inputs, flags, words):
    flags = [str(inputs.image) if f == "I" else str(inputs.mask) if f == "M" else f for f in flags]
    _one_line_error(capsys, _argv(inputs, *flags), words)


def test_unreadable_inputs_are_named(capsys, no_model, inputs, tmp_path):
    missing = tmp_path / "missing.png"
    _one_line_error(capsys, _argv(inputs, "--image", str(missing)), f"--image {missing}: No such file")
    _one_line_error(capsys, _argv(inputs, "--image", str(inputs.text)), f"--image {inputs.text}: not an image")
    _one_line_error(capsys, _argv(inputs, "--image", str(tmp_path)), "--image", "is a folder")
    _one_line_error(capsys, _argv(inputs, "--image", str(inputs.image), "--mask", str(inputs.text)),
                    f"--mask {inputs.text}: not an image")
    _one_line_error(capsys, _argv(inputs, "--image", str(inputs.image), "--mask", str(inputs.small)),
                    "--mask is 64x40 but the image is 64x48")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 64)).save(tiny)
    _one_line_error(capsys, _argv(inputs, "--image", str(tiny)), "at least 8 pixels")


# --- the shipped model -------------------------------------------------------------------


@pytest.mark.skipif(not EDITING_PIPELINE, reason="Pipeline.generate does not take image= yet")
def test_inpainting_with_the_shipped_model(inputs):
    model = REPO / "weights" / "ldm-toy.safetensors"
    assert main(["generate", "a red cube", "-o", str(inputs.out), *BASE, "--model", str(model), "--device", "cpu",
                 "--image", str(inputs.image), "--mask", str(inputs.mask), "--strength", "0.8", "--size", "64x48"]) == 0
    out = inputs.out / "00000-7.png"
    p = read_parameters(out)
    assert (p.strength, p.mask_blur, p.width, p.height) == (0.8, 4, 64, 48)
    result, original = np.asarray(Image.open(out)), np.asarray(Image.open(inputs.image))
    mask = np.asarray(Image.open(inputs.mask)) > 0
    far = np.ones_like(mask)
    far[16 - 12:32 + 12, 24 - 12:40 + 12] = False  # beyond the 4 px feather's reach
    assert np.array_equal(result[far], original[far])  # keep_unmasked: the input's pixels exactly
    assert not np.array_equal(result[mask], original[mask])
