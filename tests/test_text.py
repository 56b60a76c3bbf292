"""Text side: TextEncoder, tokenizer, prompt chunking, text key maps.

Ground truth: transformers' CLIPTextModel and CLIPTokenizer, diffusers'
StableDiffusionPipeline.encode_prompt, and open_clip's own text tower run the
way stable-diffusion's FrozenOpenCLIPEmbedder runs it (penultimate block).
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.checkpoints.keymap import UnmappedKeyError, apply_mapping
from ldm.checkpoints.keymap_text import (
    count_openclip_blocks,
    text_diffusers_to_internal,
    text_internal_to_original,
    text_original_to_internal,
)
from ldm.config import SD1, SD2, TextEncoderConfig
from ldm.foreign_config import text_from_transformers
from ldm.models.text import TextEncoder
from ldm.models.tokenizer import Tokenizer
from ldm.prompts import count_tokens, encode_prompts
from reference import SD1_TINY, SD2V_TINY, build_reference, load_reference_pipeline

SPECS = {"sd1": SD1_TINY, "sd2v": SD2V_TINY}
TOL = 1e-4

# With pad token "!" (SD2 style), transformers' CLIPTokenizer treats every "!" in
# the text as the special pad token (id 0), while OpenCLIP's tokenizer, which
# SD2 was trained with, encodes it as the ordinary BPE token "!" (id 0 is "!"
# too, but merges like "!!" or "!," differ). So "!" is left out of the prompts
# compared with transformers for that pad style.
PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, trending on artstation, 4k, highly detailed",
    "portrait of a woman (smiling), oil painting; by greg rutkowski & alphonse mucha",
    "Hello, World. It's 3:45pm -- time for tea?",
    "",
    "   extra    spaces\tand\nnewlines  ",
    "café déjà vu, naïve façade",
]
EXCLAIMED = ["wow!!! so cool!", "stop! hammer time"]


def _encoder(spec, seed=0) -> tuple[TextEncoder, nn.Module]:
    """Our encoder loaded (meta build, strict, assign) from a reference CLIPTextModel."""
    _, _, ref = build_reference(spec, seed)
    with torch.device("meta"):
        enc = TextEncoder(text_from_transformers(spec.text, pad_token=spec.pad_token))
    enc.load_state_dict(apply_mapping(ref.state_dict(), text_diffusers_to_internal), strict=True, assign=True)
    return enc.eval(), ref


def _folder_encoder(folder, spec) -> TextEncoder:
    state = load_file(folder / "text_encoder" / "model.safetensors")
    with torch.device("meta"):
        enc = TextEncoder(text_from_transformers(spec.text, pad_token=spec.pad_token))
    enc.load_state_dict(apply_mapping(state, text_diffusers_to_internal), strict=True, assign=True)
    return enc.eval()


# --- TextEncoder ---------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_text_encoder_matches_transformers(name):
    spec = SPECS[name]
    enc, ref = _encoder(spec)
    tok = Tokenizer(spec.pad_token)
    ids = tok(["a photo of a cat", "a red bus in the rain at night", ""])
    random_ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([ids, random_ids])
    with torch.no_grad():
        ours = enc(ids)
        theirs = ref(input_ids=ids).last_hidden_state
    assert ours.shape == (5, 77, spec.text["hidden_size"])
    assert (ours - theirs).abs().max().item() < TOL


def test_text_encoder_keys_meta_build_and_properties():
    with torch.device("meta"):
        enc = TextEncoder(SD1.text)
        enc2 = TextEncoder(SD2.text)
    keys = list(enc.state_dict())
    assert keys[0] == "text_model.embeddings.token_embedding.weight"
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.encoder.layers.11.mlp.fc2.bias" in keys
    assert keys[-1] == "text_model.final_layer_norm.bias"
    assert not any("position_ids" in k for k in keys)
    assert len(keys) == 4 + 12 * 16
    assert enc.device.type == "meta" and enc.dtype == torch.float32
    assert enc2.text_model.embeddings.token_embedding.weight.shape == (49408, 1024)
    assert len(enc2.text_model.encoder.layers) == 23
    # No buffer is left on the meta device: after an assign load, .to() works.
    assert not list(enc.buffers())


def test_text_encoder_dtype_move_and_input_checks():
    enc, _ = _encoder(SD1_TINY)
    enc = enc.to(torch.float64)
    assert enc.dtype == torch.float64 and enc.device.type == "cpu"
    ids = Tokenizer()(["a cat"])
    assert enc(ids).dtype == torch.float64
    with pytest.raises(ValueError, match="window"):
        enc(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        enc(torch.zeros(77, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        enc(torch.zeros(1, 77))


def test_diffusers_folder_keys_map(sd1_folder):
    # transformers 5 saves without the "text_model." level; older folders had it
    # (and sometimes a persistent position_ids): all map to the same keys.
    state = load_file(sd1_folder / "text_encoder" / "model.safetensors")
    new = apply_mapping(state, text_diffusers_to_internal)
    old = {"text_model." + k if not k.startswith("text_model.") else k: v for k, v in state.items()}
    old["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert apply_mapping(old, text_diffusers_to_internal).keys() == new.keys()
    with torch.device("meta"):
        enc = TextEncoder(text_from_transformers(SD1_TINY.text))
    assert set(new) == set(enc.state_dict())


# --- tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("name,pad", [("sd1", "eos"), ("sd2v", "zero")])
def test_tokenizer_matches_transformers(name, pad, sd1_folder, sd2v_folder):
    from transformers import CLIPTokenizer

    folder = {"sd1": sd1_folder, "sd2v": sd2v_folder}[name]
    hf = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompts = PROMPTS + ["a very long prompt " * 30]
    if pad == "eos":
        prompts += EXCLAIMED
    theirs = hf(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ours = Tokenizer(pad)(prompts)
    assert torch.equal(ours, theirs.input_ids)


# --- prompt encoding ----------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_encode_prompts_matches_diffusers(name, sd1_folder, sd2v_folder):
    spec = SPECS[name]
    folder = {"sd1": sd1_folder, "sd2v": sd2v_folder}[name]
    pipe = load_reference_pipeline(folder)
    enc = _folder_encoder(folder, spec)
    tok = Tokenizer(spec.pad_token)
    prompts = PROMPTS[:4]
    negatives = ["blurry, low quality", "", "ugly", "text, watermark"]
    with torch.no_grad():
        cond_ref, uncond_ref = pipe.encode_prompt(
            prompts, "cpu", 1, True, negative_prompt=negatives
        )
        # In ldm's (A1111's) prompt language brackets are weights; escaped, they are the
        # literal characters diffusers reads.
        cond = encode_prompts(enc, tok, [p.replace("(", r"\(").replace(")", r"\)") for p in prompts])
        uncond = encode_prompts(enc, tok, negatives)
    assert any("(" in p for p in prompts)
    assert cond.shape == cond_ref.shape == (4, 77, 32)
    assert (cond - cond_ref).abs().max().item() < TOL
    assert (uncond - uncond_ref).abs().max().item() < TOL


def test_long_prompt_is_chunked_not_cut(caplog):
    enc, _ = _encoder(SD1_TINY)
    tok = Tokenizer("eos")
    # No commas: a comma near a chunk's end moves the cut (tests/test_prompt_weights.py).
    long = " and ".join(f"a small red house number {i}" for i in range(22))
    ids = tok.encode(long)
    assert count_tokens(tok, long) == len(ids)
    assert 150 < len(ids) <= 225
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="ldm"):
        out = encode_prompts(enc, tok, [long, "a cat"])
        rows = enc(torch.tensor([tok.pad(ids[:75]), tok.pad(ids[75:150]), tok.pad(ids[150:])]))
        short = enc(tok(["a cat"]))
        empty = enc(tok([""]))
    assert any("3 chunks" in r.getMessage() for r in caplog.records)
    assert out.shape == (2, 231, 32)
    assert torch.allclose(out[0].reshape(3, 77, 32), rows, atol=1e-5)
    # The short prompt is padded with empty-string chunks to the same length.
    assert torch.allclose(out[1, :77], short[0], atol=1e-5)
    assert torch.allclose(out[1, 77:154], empty[0], atol=1e-5)
    assert torch.allclose(out[1, 154:], empty[0], atol=1e-5)


def test_min_chunks_pads_uncond_to_cond():
    enc, _ = _encoder(SD2V_TINY)
    tok = Tokenizer("zero")
    long = " ".join(["lighthouse"] * 100)
    with torch.no_grad():
        cond = encode_prompts(enc, tok, [long])
        k = cond.shape[1] // 77
        uncond = encode_prompts(enc, tok, [""], min_chunks=k)
        single = encode_prompts(enc, tok, [""])
    assert k == 2 and uncond.shape == cond.shape
    assert torch.allclose(uncond[:, :77], single, atol=1e-6)
    assert torch.allclose(uncond[:, 77:], single, atol=1e-6)


def test_prompt_validation():
    enc, _ = _encoder(SD1_TINY)
    tok = Tokenizer()
    with pytest.raises(TypeError, match="single str"):
        encode_prompts(enc, tok, "a cat")
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        encode_prompts(enc, tok, ["a cat", None])
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(enc, tok, [])
    with pytest.raises(ValueError, match="min_chunks"):
        encode_prompts(enc, tok, ["a"], min_chunks=0)
    with pytest.raises(TypeError):
        count_tokens(tok, 42)
    with pytest.raises(ValueError, match="window"):
        encode_prompts(enc, Tokenizer(max_length=100), ["a"])


# --- original-layout key maps --------------------------------------------------------


def _openclip_tower(layers=4, width=32, heads=4):
    open_clip = pytest.importorskip("open_clip")
    tower = open_clip.transformer.TextTransformer(
        context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers,
        mlp_ratio=2.0, output_dim=width, act_layer=nn.GELU,
    ).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if p.ndim == 1:  # LayerNorm weights and biases, all biases: off their init.
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return tower


def _sd2_original_conditioning(tower, ids):
    """stable-diffusion's FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer
    (open_clip is batch-first now, so without its permutes)."""
    x = tower.token_embedding(ids) + tower.positional_embedding
    blocks = tower.transformer.resblocks
    for block in blocks[: len(blocks) - 1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


SD2_TINY_TEXT = TextEncoderConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    hidden_act="gelu", pad_token="zero",
)


def _original_sd2_state(tower):
    state = {"model." + k: v for k, v in tower.state_dict().items()}
    state["model.logit_scale"] = torch.tensor(4.6052)
    return state


def test_sd2_original_matches_open_clip():
    tower = _openclip_tower()
    state = _original_sd2_state(tower)
    assert count_openclip_blocks(state) == 4
    cfg = SD2_TINY_TEXT
    assert cfg.num_hidden_layers == count_openclip_blocks(state) - 1
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    enc.load_state_dict(apply_mapping(state, text_original_to_internal(cfg, "sd2")), strict=True, assign=True)
    tok = Tokenizer("zero")
    ids = tok(["a photo of a cat", "a lighthouse on a cliff at dusk, oil painting", ""])
    with torch.no_grad():
        ours = enc.eval()(ids)
        theirs = _sd2_original_conditioning(tower, ids)
    assert (ours - theirs).abs().max().item() < TOL


def test_sd2_round_trip_is_exact_and_layout_matches_open_clip():
    tower = _openclip_tower()
    cfg = SD2_TINY_TEXT
    with torch.device("meta"):
        enc = TextEncoder(cfg)
    enc.load_state_dict(
        apply_mapping(_original_sd2_state(tower), text_original_to_internal(cfg, "sd2")),
        strict=True, assign=True,
    )
    internal = enc.state_dict()
    original = text_internal_to_original(cfg, "sd2")(internal)
    # Same keys and shapes as a real OpenCLIP tower, less what we never keep.
    expected = {k: v.shape for k, v in _original_sd2_state(tower).items()
                if k not in ("model.text_projection", "model.logit_scale")}
    assert {k: v.shape for k, v in original.items()} == expected
    assert count_openclip_blocks(original) == 4
    assert all(not v.any() for k, v in original.items() if ".resblocks.3." in k)
    back = apply_mapping(original, text_original_to_internal(cfg, "sd2"))
    assert back.keys() == internal.keys()
    assert all(torch.equal(back[k], internal[k]) for k in internal)
    # Blocks 0..2 come back bit-exact in the original layout too.
    for k, v in _original_sd2_state(tower).items():
        if ".resblocks.3." not in k and k in original:
            assert torch.equal(original[k], v), k


def test_sd2_extra_blocks_surface_as_unexpected_keys():
    tower = _openclip_tower(layers=5)
    keymap = text_original_to_internal(SD2_TINY_TEXT, "sd2")  # expects 4 blocks
    mapped = apply_mapping(_original_sd2_state(tower), keymap)
    assert any(k.startswith("text_model.encoder.layers.4.") for k in mapped)
    with torch.device("meta"):
        enc = TextEncoder(SD2_TINY_TEXT)
    with pytest.raises(RuntimeError, match="Unexpected"):
        enc.load_state_dict(mapped, strict=True, assign=True)


def test_sd1_both_key_styles_and_round_trip():
    enc, _ = _encoder(SD1_TINY)
    internal = enc.state_dict()
    cfg = text_from_transformers(SD1_TINY.text)
    original = text_internal_to_original(cfg, "sd1")(internal)
    assert all(k.startswith("transformer.text_model.") for k in original)
    new_style = dict(original)
    new_style["transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None]
    old_style = {"transformer." + k[len("transformer.text_model."):]: v for k, v in original.items()}
    old_style["transformer.embeddings.position_ids"] = torch.arange(77)[None]
    assert "transformer.embeddings.token_embedding.weight" in old_style
    keymap = text_original_to_internal(cfg, "sd1")
    for state in (new_style, old_style):
        back = apply_mapping(state, keymap)
        assert back.keys() == internal.keys()
        assert all(torch.equal(back[k], internal[k]) for k in internal)
    with torch.device("meta"):
        fresh = TextEncoder(cfg)
    fresh.load_state_dict(apply_mapping(old_style, keymap), strict=True, assign=True)


def test_keymap_misc():
    cfg = SD2_TINY_TEXT
    keymap = text_original_to_internal(cfg, "sd2")
    t = torch.zeros(1)
    with pytest.raises(UnmappedKeyError):
        keymap("model.something_new", t)
    with pytest.raises(ValueError, match="family"):
        text_original_to_internal(cfg, "sdxl")
    with pytest.raises(ValueError, match="divisible by 3"):
        keymap("model.transformer.resblocks.0.attn.in_proj_bias", torch.zeros(4))
    keys = [
        "cond_stage_model.model.transformer.resblocks.0.ln_1.weight",
        "cond_stage_model.model.transformer.resblocks.23.ln_1.weight",
        "cond_stage_model.model.visual.transformer.resblocks.31.ln_1.weight",
        "model.diffusion_model.input_blocks.0.0.weight",
    ]
    assert count_openclip_blocks(keys) == 24
    assert count_openclip_blocks(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == 0
    with pytest.raises(ValueError, match="both map to"):
        apply_mapping(
            {"transformer.embeddings.token_embedding.weight": t,
             "transformer.text_model.embeddings.token_embedding.weight": t},
            text_original_to_internal(SD1.text, "sd1"),
        )
