"""CLIP skip in AUTOMATIC1111's numbering (1 = last layer, 2 = penultimate, ...).

The web UI (sd_hijack_clip.py, ``encode_with_transformers``) conditions on
``final_layer_norm(hidden_states[-N])``; diffusers' ``clip_skip=k`` uses
``hidden_states[-(k + 1)]``, so ldm's N is diffusers' N - 1: checked on prompt
embeddings and on whole images against StableDiffusionPipeline. The web UI encodes
the negative prompt with the same skip; diffusers' ``encode_prompt`` skips only for
the positive one, so the reference's negative embeddings are its positive-prompt
embeddings of the negative texts.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints.keymap import apply_mapping
from ldm.checkpoints.keymap_text import text_original_to_internal
from ldm.models.text import TextEncoder
from ldm.models.tokenizer import Tokenizer
from ldm.validation import check_clip_skip
from reference import SD1_TINY, load_reference_pipeline
from test_text import SD2_TINY_TEXT, _encoder, _openclip_tower, _original_sd2_state

PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = ["blurry", "low quality"]


def _reference(folder):
    """diffusers' pipeline; its clip_skip reads ``text_encoder.text_model.final_layer_norm``,
    a path transformers 5's CLIPTextModel no longer has (the norm is
    ``text_encoder.final_layer_norm``): the path is given back, outside the module tree,
    so diffusers' own formula runs unchanged."""
    ref = load_reference_pipeline(folder)
    te = ref.text_encoder
    if not hasattr(te, "text_model"):
        object.__setattr__(te, "text_model", SimpleNamespace(final_layer_norm=te.final_layer_norm))
    return ref


@pytest.fixture(scope="module")
def models(sd1_folder, sd2v_folder):
    return {
        "sd1": (_reference(sd1_folder), Pipeline.from_pretrained(sd1_folder, device="cpu")),
        "sd2v": (_reference(sd2v_folder), Pipeline.from_pretrained(sd2v_folder, device="cpu")),
    }


def test_clip_skip_is_the_web_ui_hidden_state():
    enc, ref = _encoder(SD1_TINY)
    ids = Tokenizer()(["a photo of a cat", "a lighthouse at dusk"])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        # A1111: hidden_states[-CLIP_stop_at_last_layers], then the final LayerNorm.
        penultimate = ref.final_layer_norm(out.hidden_states[-2])
        assert torch.equal(enc(ids), enc(ids, clip_skip=1))
        assert (enc(ids, clip_skip=1) - out.last_hidden_state).abs().max().item() < 1e-5
        assert (enc(ids, clip_skip=2) - penultimate).abs().max().item() < 1e-5
        assert (penultimate - out.last_hidden_state).abs().max().item() > 0.1


def test_sd2_counts_from_the_block_it_was_trained_on():
    # SD2 conditions on OpenCLIP's penultimate block; clip_skip=2 is the block before it.
    tower = _openclip_tower()  # 4 blocks, as in an original file
    with torch.device("meta"):
        enc = TextEncoder(SD2_TINY_TEXT)
    state = apply_mapping(_original_sd2_state(tower), text_original_to_internal(SD2_TINY_TEXT, "sd2"))
    enc.load_state_dict(state, strict=True, assign=True)
    ids = Tokenizer("zero")(["a photo of a cat", "a lighthouse on a cliff"])
    with torch.no_grad():
        x = tower.token_embedding(ids) + tower.positional_embedding
        outputs = []
        for block in tower.transformer.resblocks:
            x = block(x, attn_mask=tower.attn_mask)
            outputs.append(tower.ln_final(x))
        assert (enc.eval()(ids, clip_skip=1) - outputs[-2]).abs().max().item() < 1e-4
        assert (enc(ids, clip_skip=2) - outputs[-3]).abs().max().item() < 1e-4
        assert (enc(ids, clip_skip=3) - outputs[-4]).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_prompt_embeddings_match_diffusers(models, family):
    ref, pipe = models[family]
    with torch.no_grad():
        expected, expected_negative = _skipped(ref, PROMPTS), _skipped(ref, NEGATIVE)
        cond, uncond = pipe.encode_prompts(PROMPTS, NEGATIVE, clip_skip=2)
        plain, _ = pipe.encode_prompts(PROMPTS, NEGATIVE)
    assert (cond.context - expected).abs().max().item() < 1e-5
    assert (uncond.context - expected_negative).abs().max().item() < 1e-5
    assert (plain.context - expected).abs().max().item() > 0.1


def _skipped(ref, texts: list[str]) -> torch.Tensor:
    """diffusers' prompt embeddings of ``texts`` with its clip_skip=1."""
    with torch.no_grad():
        return ref.encode_prompt(texts, "cpu", 1, False, clip_skip=1)[0]


def test_images_match_diffusers(models):
    import diffusers

    ref, pipe = models["sd1"]
    scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    ref_pipe = type(ref)(**{**ref.components, "scheduler": scheduler})
    ref_pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(7 + k) for k in range(len(PROMPTS))]
    expected = ref_pipe(prompt_embeds=_skipped(ref, PROMPTS), negative_prompt_embeds=_skipped(ref, NEGATIVE),
                        num_inference_steps=4, guidance_scale=7.5, generator=generators, height=64, width=64,
                        output_type="np").images
    run = dict(steps=4, seed=7, width=64, height=64, sampler="euler", output="np", progress=False)
    generation = pipe.generate(PROMPTS, NEGATIVE, clip_skip=2, **run)
    plain = pipe(PROMPTS, NEGATIVE, **run)
    assert generation.params["clip_skip"] == 2
    assert expected.std() > 0.05
    assert np.abs(generation.images - expected).max() < 1e-3
    assert np.abs(plain - expected).max() > 1e-2


def test_clip_skip_is_validated(models, monkeypatch):
    _, pipe = models["sd1"]
    assert pipe.generate("a", steps=1, width=64, height=64, seed=0, output="latent",
                         progress=False).params["clip_skip"] == 1
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a, **k: pytest.fail("work started"))
    for bad in (0, 3, 1.5, True, "2"):
        with pytest.raises(ValueError, match="clip_skip must be an integer from 1"):
            pipe.generate("a cat", steps=1, clip_skip=bad)
    with pytest.raises(ValueError, match=r"to 2 \(the text encoder's layers\)"):
        pipe.generate("a cat", steps=1, clip_skip=3)
    enc, _ = _encoder(SD1_TINY)
    with pytest.raises(ValueError, match="clip_skip"):
        enc(Tokenizer()(["a"]), clip_skip=3)
    assert check_clip_skip(np.int64(2)) == 2
    with pytest.raises(ValueError, match="or more"):
        check_clip_skip(0)
