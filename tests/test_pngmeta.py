"""PNG parameters: what is written reads back the same, or is refused where it is written;
what is read from a file is validated and capped before it sizes any work."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from ldm.commands.common import printable, printable_json
from ldm.pngmeta import (
    MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, GenerationParams, check_params, check_round_trip,
    format_parameters, normalize_prompt, parse_parameters, read_parameters, read_text, save_png,
)

BASE = GenerationParams(prompt="a cat", steps=20, sampler="euler", guidance_scale=7.5, seed=1,
                        width=64, height=64, model="toy", model_hash="0123456789")


def _random_text(rng: random.Random) -> str:
    pieces = ["a", "cat", " ", "  ", "\n", "\r", "\t", ",", ":", '"', "\\", "Negative prompt:",
              "Steps: 2", "Seed: 3", "Size: 8x8", "CFG scale: 1", "(word:1.2)", "立方体", "\x1b[31m",
              "\u2028", "\x85", "\x00", "BREAK", "Model: x"]
    return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))


def _random_params(rng: random.Random) -> GenerationParams:
    return BASE.replace(prompt=_random_text(rng), negative_prompt=_random_text(rng),
                        model=_random_text(rng) or None, seed=rng.randrange(2**32))


def test_negative_prompt_line_in_the_prompt_is_refused_where_written():
    # Read back, the line became the negative prompt.
    p = BASE.replace(prompt="a cat\nNegative prompt: a dog")
    with pytest.raises(ValueError, match=r"prompt line 2 starts with 'Negative prompt:'"):
        check_round_trip(p)
    with pytest.raises(ValueError, match="Negative prompt:"):
        check_round_trip(BASE.replace(prompt="  Negative prompt: first line"))
    check_round_trip(BASE.replace(negative_prompt="x\nNegative prompt: y"))  # stays in the negative


def test_other_text_that_would_not_read_back_is_refused():
    # Spaces and \r around lines are dropped by every reader of the format.
    for prompt in ("a cat ", " a cat", "a cat\r\nin a hat", "a\n\tb"):
        with pytest.raises(ValueError, match="starts or ends with whitespace"):
            check_round_trip(BASE.replace(prompt=prompt))
    with pytest.raises(ValueError, match="negative prompt"):
        check_round_trip(BASE.replace(negative_prompt=" "))
    # Fewer than three keys: the key line is read as part of the prompt.
    few = GenerationParams(prompt="a cat", steps=3)
    with pytest.raises(ValueError, match="prompt 'a cat' would read back .* as 'a cat\\\\nSteps: 3'"):
        check_round_trip(few)
    # With no key line, a last prompt line of three "Key: value" pairs is read as keys.
    keys_like = GenerationParams(prompt="a cat\nStyle: oil, Light: soft, Mood: calm")
    with pytest.raises(ValueError, match="would read back"):
        check_round_trip(keys_like)


def test_values_with_spaces_around_them_are_quoted():
    p = BASE.replace(model=" my model ")
    assert parse_parameters(format_parameters(p)) == p
    check_round_trip(p)


def _accepted(seed: int, count: int) -> list[GenerationParams]:
    """Of ``count`` random parameters, those check_round_trip accepts."""
    rng = random.Random(seed)
    accepted = []
    for _ in range(count):
        p = _random_params(rng)
        try:
            check_round_trip(p)
        except ValueError:
            continue
        accepted.append(p)
    return accepted


def test_round_trip_property():
    """Random prompts: either refused, or read back exactly."""
    accepted = _accepted(1234, 3000)
    assert len(accepted) > 300  # the property was exercised, not only refusals
    for p in accepted:
        assert parse_parameters(format_parameters(p)) == p


def test_round_trip_through_png_files(tmp_path):
    accepted = _accepted(99, 300)
    assert len(accepted) >= 20
    for i, p in enumerate(accepted):
        path = tmp_path / f"{i}.png"
        save_png(Image.new("RGB", (8, 8)), path, p)
        assert read_parameters(path, check=False) == p


def test_normalize_prompt_keeps_the_tokens_and_makes_text_round_trip():
    from ldm.models.tokenizer import Tokenizer

    tokenizer = Tokenizer()
    rng = random.Random(7)
    for _ in range(200):
        text = _random_text(rng).replace("Negative prompt:", "np")
        normal = normalize_prompt(text)
        assert tokenizer.encode(normal) == tokenizer.encode(text)
        if not any(c in text for c in "\x85\u2028"):
            check_round_trip(BASE.replace(prompt=normal, negative_prompt=normal))
    # Readers strip \x85 too, but CLIP reads it as an ellipsis: refused, not dropped.
    assert normalize_prompt("a cat\x85") == "a cat\x85"
    with pytest.raises(ValueError, match="starts or ends with whitespace"):
        check_round_trip(BASE.replace(prompt="a cat\x85"))


@pytest.mark.parametrize("line, field", [
    ("CFG scale: inf", "CFG scale"), ("CFG scale: nan", "CFG scale"), ("CFG scale: 1e308", "CFG scale"),
    ("Steps: 99999999", "Steps"), ("Steps: 0", "Steps"), ("Seed: -1", "Seed"), (f"Seed: {2**32}", "Seed"),
    ("Size: 0x0", "Size width"), ("Size: 99999x99999", "Size width"), ("Size: 64x7", "Size height"),
    ("Clip skip: 0", "Clip skip"), ("Clip skip: 1000", "Clip skip"), ("Clip skip: two", "Clip skip"),
    ('Lora hashes: "no hash here"', "Lora hashes"), ('TI hashes: ": abc"', "TI hashes"),
])
def test_values_read_from_an_image_are_validated_and_capped(tmp_path, line, field):
    path = tmp_path / "bad.png"
    save_png(Image.new("RGB", (8, 8)), path, f"a cat\nSampler: Euler, Model: toy, {line}")
    with pytest.raises(ValueError) as info:
        read_parameters(path)
    assert str(path) in str(info.value) and field in str(info.value)


def test_caps_apply_to_what_the_image_asks_not_to_overrides():
    p = BASE.replace(steps=MAX_STEPS + 1, width=MAX_SIDE + 8, prompt="x" * (MAX_PROMPT_CHARS + 1))
    with pytest.raises(ValueError, match="img.png: Steps"):
        check_params(p, "img.png")
    check_params(p, "img.png", skip=("steps", "width", "prompt"))
    check_params(BASE.replace(steps=MAX_STEPS, width=MAX_SIDE), "img.png")


def test_unreadable_files_are_refused_with_their_name(tmp_path):
    # FIFOs: in test_cli_errors.py, under a timeout.
    folder = tmp_path / "folder.png"
    folder.mkdir()
    text = tmp_path / "text.png"
    text.write_text("not an image")
    good = tmp_path / "good.png"
    save_png(Image.new("RGB", (8, 8)), good, BASE)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    for path, words in ((folder, "folder"), (text, "not an image"), (truncated, str(truncated))):
        with pytest.raises(ValueError, match=words) as info:
            read_text(path)
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.png")


def test_printable_escapes_terminal_controls_but_keeps_the_layout():
    text = "a\tcat\nNegative prompt: x\x1b[2J\r\x9b31m\u202eevil\x7f\x00"
    assert printable(text) == "a\tcat\nNegative prompt: x\\x1b[2J\\x0d\\x9b31m\\u202eevil\\x7f\\x00"
    import json

    encoded = printable_json(json.dumps({"p": text}, ensure_ascii=False))
    assert json.loads(encoded) == {"p": text}
    assert not any(c in encoded for c in "\x1b\x9b\u202e\x7f")


A1111_WITH_NETWORKS = (
    "masterpiece, <lora:add_detail:0.6>, (a cat:1.2) BREAK hat, my-style\n"
    "Negative prompt: easynegative, blurry\n"
    'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x768, Model hash: 6ce0161689, '
    'Model: v1-5, Clip skip: 2, Lora hashes: "add_detail: 7c6bad76eb54, other: 0123456789ab", '
    'TI hashes: "easynegative: c74b4e810b03, my-style: deadbeef0001", Version: v1.10.1'
)


def test_clip_skip_and_network_hashes_are_fields_and_read_back():
    # Text as the web UI writes it (modules/processing.py, extra_networks_lora.py, textual_inversion.py).
    p = parse_parameters(A1111_WITH_NETWORKS)
    assert p.clip_skip == 2
    assert p.lora_hashes == {"add_detail": "7c6bad76eb54", "other": "0123456789ab"}
    assert p.ti_hashes == {"easynegative": "c74b4e810b03", "my-style": "deadbeef0001"}
    assert p.extra == {"Version": "v1.10.1"}
    assert p.to_kwargs()["clip_skip"] == 2
    assert "<lora:add_detail:0.6>" in p.prompt  # the tags stay in the prompt: --from reapplies them
    check_round_trip(p)
    assert parse_parameters(format_parameters(p)) == p
    # Names with ":" or "," cannot read back, so they are written without them, as the web UI does.
    text = format_parameters(BASE.replace(lora_hashes={"a:b,c": "0123"}))
    assert 'Lora hashes: "abc: 0123"' in text


def test_the_dtype_is_written_and_read_back_by_its_canonical_name():
    p = GenerationParams(prompt="a cat", steps=4, seed=1, width=64, height=64, dtype="bfloat16")
    text = format_parameters(p)
    assert "Dtype: bfloat16" in text and parse_parameters(text) == p
    assert parse_parameters(text.replace("bfloat16", "bf16")).dtype == "bfloat16"  # an alias, typed by hand
    assert parse_parameters("a cat\nSteps: 4, Seed: 1, Size: 64x64").dtype is None  # the web UI writes none
    assert "dtype" not in p.to_kwargs()  # the pipeline's, not generate's
    with pytest.raises(ValueError, match="'Dtype': dtype 'float64' is not valid"):
        parse_parameters(text.replace("bfloat16", "float64"))
