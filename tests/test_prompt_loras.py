"""``<lora:name:weight>`` tags: found in the LoRA folders, applied for the call that has
them, removed from the text, recorded as A1111's ``Lora hashes``; bad tags refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints.files import save_safetensors
from test_lora_formats import _addnet_hash, changed, factors, kohya_tensors, snapshot, weight

pytestmark = pytest.mark.usefixtures("one_thread")

from test_lora_formats import ATTN
LAYERS = {f"unet.{ATTN}.attn2.to_k": "lora_unet_", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": "lora_te_"}
RUN = dict(steps=2, guidance_scale=7.5, width=32, height=32, seed=3, sampler="euler", output="np", progress=False)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, sd1_pipe):
    folder = tmp_path_factory.mktemp("loras")
    (folder / "styles").mkdir()
    for i, stem in enumerate(("ink", "glow")):
        entries = {}
        for layer, prefix in LAYERS.items():
            entries[prefix + layer.split(".", 1)[1].replace(".", "_")] = factors(
                weight(sd1_pipe, layer).shape, seed=i, std=0.5)
        save_safetensors(kohya_tensors(entries), folder / "styles" / f"{stem}.safetensors"
                         if stem == "glow" else folder / f"{stem}.safetensors")
    return folder


@pytest.fixture
def tagged(sd1, lora_dir):
    sd1.lora_dirs = [lora_dir]
    yield sd1
    sd1.lora_dirs = []


def test_a_tag_is_the_lora_loaded_for_the_call_and_taken_out_after(tagged, lora_dir):
    before = snapshot(tagged)
    gen = tagged.generate("a cat <lora:ink:0.7>, <lora:glow:0.5:1.2>", "blurry", **RUN)
    assert changed(tagged, before) == []  # the call's LoRAs are gone again
    assert gen.prompts == ["a cat <lora:ink:0.7>, <lora:glow:0.5:1.2>"]
    assert gen.params["lora_hashes"] == {
        "ink": _addnet_hash(lora_dir / "ink.safetensors")[:12],
        "glow": _addnet_hash(lora_dir / "styles" / "glow.safetensors")[:12],
    }
    # The same as loading them by hand (A1111: te multiplier first, unet second) and the
    # text without its tags, as A1111 removes them.
    tagged.load_lora(lora_dir / "ink.safetensors", 0.7)
    tagged.load_lora(lora_dir / "styles" / "glow.safetensors", 1.2, text_encoder_scale=0.5)
    by_hand = tagged.generate("a cat , ", "blurry", **RUN)
    tagged.unload_lora()
    np.testing.assert_array_equal(gen.images, by_hand.images)
    plain = tagged.generate("a cat , ", "blurry", **RUN)
    assert np.abs(plain.images - gen.images).max() > 1e-3  # the tags did something


def test_loras_loaded_by_hand_stay_and_combine_with_tags(tagged, lora_dir):
    tagged.load_lora(lora_dir / "ink.safetensors", 0.3, name="mine")
    kept = snapshot(tagged)
    tagged.generate("a cat <lora:ink:1>", **RUN)
    assert changed(tagged, kept) == []
    assert [lo.name for lo in tagged.loras.loaded] == ["mine"]


def test_the_environment_folder_is_searched_after_the_given_ones(sd1, lora_dir, monkeypatch):
    monkeypatch.setenv("LDM_LORA_DIR", str(lora_dir))
    gen = sd1.generate("a cat <lora:ink>", **RUN)
    assert list(gen.params["lora_hashes"]) == ["ink"]


def test_a_missing_lora_names_every_folder_searched(tagged, lora_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_LORA_DIR", str(tmp_path / "nowhere"))
    before = snapshot(tagged)
    with pytest.raises(FileNotFoundError) as info:
        tagged.generate("a cat <lora:ink:1> <lora:missing:0.5>", **RUN)
    assert "'missing'" in str(info.value) and str(lora_dir) in str(info.value)
    assert str(tmp_path / "nowhere") in str(info.value)
    assert changed(tagged, before) == []  # found before any was applied


@pytest.mark.parametrize("prompt, negative, message", [
    ("a cat <lora:ink:abc>", "", "not a number"),
    ("a cat <lora:ink:nan>", "", "finite"),
    ("a cat <lora:ink:1> <lora:ink:0.5>", "", "tagged twice"),
    ("a cat", "blurry <lora:ink:1>", "negative prompt 0"),
])
def test_bad_tags_are_refused_before_any_work(tagged, prompt, negative, message):
    with pytest.raises(ValueError, match=message):
        tagged.generate(prompt, negative, **RUN)


def test_prompts_of_one_call_must_share_their_tags(tagged):
    with pytest.raises(ValueError, match="prompt 1 has LoRA tags <lora:ink:0.5> but prompt 0 has <lora:ink:1>"):
        tagged.generate(["a cat <lora:ink:1>", "a dog <lora:ink:0.5>"], **RUN)
    gen = tagged.generate(["a cat <lora:ink:1>", "a dog<lora:ink:1>"], **RUN)
    assert list(gen.params["lora_hashes"]) == ["ink"]


def test_tags_apply_under_inference_mode_and_half_precision(sd1_folder, lora_dir):
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.bfloat16, lora_dirs=[lora_dir])
    before = snapshot(pipe)
    with torch.inference_mode():
        gen = pipe.generate("a cat <lora:ink:1>", **RUN)
    assert np.isfinite(gen.images).all()
    assert changed(pipe, before) == []
    assert not any(p.is_inference() for p in pipe.unet.parameters())
