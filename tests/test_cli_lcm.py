"""Few-step sampling through `ldm generate`, `ldm batch` and the PNG text: ``--sampler lcm``
(``Sampler: LCM`` as the web UI names it), a guidance-distilled model's scale recorded as
``Guidance embedding`` and read back by ``--from`` to make the same picture bit for bit, the
batch file's ``spacing`` key; bad combinations refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.batchfile import Settings, parse_lines
from ldm.batchplan import expand, plan_chunks
from ldm.cli import main
from ldm.modelref import ModelRef
from ldm.pipeline import Pipeline
from ldm.pngmeta import check_params, check_round_trip, parse_parameters, read_text
from reference import save_diffusers_folder
from test_lcm import LCM_TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return save_diffusers_folder(LCM_TINY, tmp_path_factory.mktemp("lcm-cli") / "lcm", seed=7)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _one_line(capsys, argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err, err


# --- the PNG text, no model ------------------------------------------------------------------


def test_lcm_and_the_guidance_embedding_in_the_png_text():
    p = parse_parameters("a cat\nSteps: 4, Sampler: LCM, CFG scale: 8.5, Guidance embedding: 8.5, Seed: 3, "
                         "Size: 64x64")
    assert (p.sampler, p.guidance_scale, p.guidance_embedding) == ("lcm", 8.5, 8.5)
    check_round_trip(p)
    # Either key gives the scale to render with.
    alone = parse_parameters("a cat\nSteps: 4, Sampler: LCM, Guidance embedding: 3, Seed: 3, Size: 64x64")
    assert alone.to_kwargs()["guidance_scale"] == 3.0
    # Two different scales cannot both be the model's: refused, unless --guidance replaces them.
    mixed = p.replace(guidance_embedding=2.0)
    with pytest.raises(ValueError, match="CFG scale 8.5 and Guidance embedding 2 differ"):
        check_params(mixed, "x.png")
    check_params(mixed, "x.png", skip=("guidance_scale",))


# --- generate ---------------------------------------------------------------------------------


def _generate(folder: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "a cat", "--model", str(folder), "--sampler", "lcm", "--steps", "4", "--guidance", "8.5",
            "--seed", "3", "--size", "64x64", "--device", "cpu", *extra, "-o", str(out)]


def test_generate_lcm_records_the_guidance_embedding_and_from_makes_it_again(lcm_folder, tmp_path):
    out = tmp_path / "out"
    assert main(_generate(lcm_folder, out)) == 0
    (made,) = out.glob("*.png")
    text = read_text(made)
    assert "Steps: 4, Sampler: LCM, CFG scale: 8.5, Guidance embedding: 8.5, Seed: 3" in text
    expected = Pipeline.from_pretrained(lcm_folder, device="cpu")("a cat", steps=4, guidance_scale=8.5, seed=3,
                                                                  sampler="lcm", progress=False)[0]
    assert np.array_equal(_pixels(made), np.asarray(expected))

    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), "--model", str(lcm_folder), "--device", "cpu", "-o",
                 str(again)]) == 0
    (remade,) = again.glob("*.png")
    assert np.array_equal(_pixels(remade), _pixels(made)) and read_text(remade) == text
    # Another scale through the flag: another picture, both keys follow it.
    other = tmp_path / "other"
    assert main(["generate", "--from", str(made), "--model", str(lcm_folder), "--guidance", "3", "--device", "cpu",
                 "-o", str(other)]) == 0
    (changed,) = other.glob("*.png")
    assert "CFG scale: 3, Guidance embedding: 3," in read_text(changed)
    assert not np.array_equal(_pixels(changed), _pixels(made))


def test_an_ordinary_model_records_no_guidance_embedding(sd1_folder, tmp_path):
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--sampler", "lcm", "--steps", "2", "--seed", "1",
                 "--size", "64x64", "--device", "cpu", "-o", str(tmp_path)]) == 0
    (made,) = tmp_path.glob("*.png")
    assert "Sampler: LCM" in read_text(made) and "Guidance embedding" not in read_text(made)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "60"], "steps=60 is more than the lcm sampler can take"),
    (["--schedule", "karras"], "karras sigmas are not available for 'lcm'"),
    (["--spacing", "trailing"], "spacing='trailing' does not apply to lcm"),
    (["--negative", "blurry"], "this model is guidance-distilled"),
])
def test_bad_lcm_calls_are_one_line(lcm_folder, tmp_path, capsys, extra, message):
    _one_line(capsys, _generate(lcm_folder, tmp_path, *extra), message)
    assert not list(tmp_path.glob("*.png"))


# --- batch ------------------------------------------------------------------------------------


def test_batch_lines_take_spacing_and_lcm_with_the_samplers_checks():
    lines = [
        '{"prompt": "a", "sampler": "euler_a", "spacing": "trailing", "steps": 1, "guidance": 0}',
        '{"prompt": "b", "sampler": "euler_a", "steps": 1, "guidance": 0}',
        '{"prompt": "c", "sampler": "lcm", "steps": 4}',
        '{"prompt": "d", "spacing": "uniform"}',
        '{"prompt": "e", "sampler": "lcm", "spacing": "leading"}',
        '{"prompt": "f", "sampler": "lcm", "steps": 51}',
    ]
    jobs, errors = parse_lines(lines, Settings(), True)
    messages = {e.line: e.message for e in errors}
    assert set(messages) == {4, 5, 6}
    assert "unknown timestep spacing 'uniform'" in messages[4]
    assert "spacing='leading' does not apply to lcm" in messages[5]
    assert "steps=51 is more than the lcm sampler can take" in messages[6]
    assert [j.spacing for j in jobs] == ["trailing", None, None]
    items = expand(jobs, 64, ModelRef(Path("m"), "m", "0123456789"), guidance_embedded=True)
    assert items[0].params.spacing == "trailing" and items[0].params.guidance_embedding == 0.0
    assert items[2].params.sampler == "lcm"
    # Lines that differ only in spacing are separate calls.
    assert len(plan_chunks(items[:2], 8, lambda item: 1)) == 2
    # `ldm batch --spacing` is the default of lines that set none; lcm refuses it as a line's own.
    jobs, errors = parse_lines(['{"prompt": "x"}', '{"prompt": "y", "sampler": "lcm"}'],
                               Settings(spacing="trailing"), True)
    assert [j.spacing for j in jobs] == ["trailing"] and "does not apply to lcm" in errors[0].message


def test_batch_on_a_distilled_model(lcm_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red cube", "sampler": "lcm", "steps": 2, "guidance": 6, "seed": 11}',
        '{"prompt": "a blue ball", "sampler": "lcm", "steps": 2, "negative_prompt": "blurry"}',
        '{"prompt": "a tree", "sampler": "euler_a", "spacing": "trailing", "steps": 1, "guidance": 1, "seed": 12}',
    ]) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", str(lcm_folder), "--size", "64x64", "--device", "cpu",
                 "-o", str(out)]) == 1  # the negative prompt's line is reported and skipped
    assert ":2: error: negative prompt 'blurry': this model is guidance-distilled" in capsys.readouterr().err
    first, third = out / "00001-00-11.png", out / "00003-00-12.png"
    assert "Sampler: LCM, CFG scale: 6, Guidance embedding: 6, Seed: 11" in read_text(first)
    assert "Timestep spacing: trailing" in read_text(third)
    pipe = Pipeline.from_pretrained(lcm_folder, device="cpu")
    for path, call in ((first, dict(prompt="a red cube", sampler="lcm", steps=2, guidance_scale=6, seed=11)),
                       (third, dict(prompt="a tree", sampler="euler_a", spacing="trailing", steps=1,
                                    guidance_scale=1, seed=12))):
        assert np.array_equal(_pixels(path), np.asarray(pipe(**call, progress=False)[0])), path
    assert sorted(p.name for p in out.glob("*.png")) == [first.name, third.name]


def test_convert_keeps_the_guidance_embedding_both_ways(lcm_folder, tmp_path):
    import torch

    from ldm.checkpoints import load_model

    single, folder = tmp_path / "lcm.safetensors", tmp_path / "lcm-folder"
    assert main(["convert", str(lcm_folder), str(single)]) == 0
    assert main(["convert", str(single), str(folder)]) == 0
    original, back = (load_model(p, device="cpu") for p in (lcm_folder, folder))
    assert back.config == original.config and back.config.unet.time_cond_proj_dim == LCM_TINY.unet["time_cond_proj_dim"]
    state = back.unet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.unet.state_dict().items())
