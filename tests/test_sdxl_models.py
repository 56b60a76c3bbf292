"""SDXL models against the reference: the U-Net (per-level transformer depth, levels
without attention, the text_time embedding) against diffusers' UNet2DConditionModel,
the text encoders (penultimate layer, pooled projection, clip skip) against
transformers' CLIPTextModel / CLIPTextModelWithProjection and diffusers'
StableDiffusionXLPipeline.encode_prompt, and the full-size presets' keys and shapes
against the real stabilityai configs built on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from ldm.config import SD1, SDXL, SDXL_REFINER, TextEncoderConfig, UNetConfig
from ldm.models.text import TextEncoder
from ldm.models.tokenizer import Tokenizer
from ldm.models.unet import UNet
from reference_sdxl import (
    BIGG_TINY,
    CLIP_L_TINY,
    SDXL_REFINER_TINY,
    SDXL_TINY,
    build_sdxl_reference,
    ldm_config,
    ldm_text_config,
    load_sdxl_reference_pipeline,
)
from test_models_parity import _meta_diffusers, _shapes

TOL = 1e-4
SPECS = {"sdxl": SDXL_TINY, "sdxl-refiner": SDXL_REFINER_TINY}
PROMPTS = ["a photo of a cat", "a lighthouse on a cliff at dusk, oil painting", ""]

# Real U-Net configs, from stabilityai/stable-diffusion-xl-{base,refiner}-1.0's unet/config.json.
_SDXL_FAMILY = dict(
    sample_size=128, layers_per_block=2, norm_num_groups=32, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, flip_sin_to_cos=True, freq_shift=0,
)
REAL_UNETS = {
    "sdxl": dict(
        _SDXL_FAMILY,
        block_out_channels=[320, 640, 1280],
        attention_head_dim=[5, 10, 20],
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,
        projection_class_embeddings_input_dim=2816,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    ),
    "sdxl-refiner": dict(
        _SDXL_FAMILY,
        block_out_channels=[384, 768, 1536, 1536],
        attention_head_dim=[6, 12, 24, 24],
        transformer_layers_per_block=4,
        cross_attention_dim=1280,
        projection_class_embeddings_input_dim=2560,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    ),
}
# Real text encoder configs (text_encoder/ and text_encoder_2/ config.json).
_CLIP_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)
REAL_CLIP_L = dict(_CLIP_TEXT, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
REAL_BIGG = dict(_CLIP_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, hidden_act="gelu", projection_dim=1280)

# (original height, width, crop top, left, target height, width) / (..., aesthetic score)
TIME_IDS = {
    "sdxl": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 16, 32, 832, 1216]]),
    "sdxl-refiner": torch.tensor([[1024.0, 1024, 0, 0, 6.0], [832, 1216, 64, 0, 2.5]]),
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models run thousands of small kernels: threads only contend on a busy machine."""


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _with_text_model_level(state: dict) -> dict:
    """transformers 5's CLIPTextModel has no ``text_model`` level; diffusers folders
    (and ldm) name its weights with it, as CLIPTextModelWithProjection still does."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state.items()}


def _load(module: torch.nn.Module, state: dict) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.fixture(scope="module", params=list(SPECS))
def unets(request):
    """(name, diffusers U-Net, ldm U-Net) with the same random weights."""
    spec = SPECS[request.param]
    ref = build_sdxl_reference(spec, seed=3).unet
    return request.param, ref, _load(UNet(ldm_config(spec).unet), ref.state_dict())


@pytest.fixture(scope="module")
def encoders():
    """(ldm CLIP-L, transformers CLIP-L, ldm bigG, transformers bigG), same random weights."""
    ref = build_sdxl_reference(SDXL_TINY, seed=6)
    config = ldm_config(SDXL_TINY)
    clip_l = _load(TextEncoder(config.text), _with_text_model_level(ref.text_encoder.state_dict()))
    bigg = _load(TextEncoder(config.text_2), ref.text_encoder_2.state_dict())
    return clip_l, ref.text_encoder, bigg, ref.text_encoder_2


# --- U-Net ------------------------------------------------------------------------------


def _unet_inputs(name: str, ref, gen: torch.Generator) -> dict:
    x = torch.randn(2, 4, 11, 6, generator=gen)  # non-square, not a multiple of 2**(levels-1)
    context = torch.randn(2, 77, ref.config.cross_attention_dim, generator=gen)
    pooled = ref.config.projection_class_embeddings_input_dim - TIME_IDS[name].shape[1] * 8
    return dict(x=x, t=torch.tensor([999.0, 3.5]), context=context,
                text_embeds=torch.randn(2, pooled, generator=gen), time_ids=TIME_IDS[name])


@torch.no_grad()
def test_unet_matches_diffusers(unets):
    name, ref, ours = unets
    a = _unet_inputs(name, ref, torch.Generator().manual_seed(0))
    expected = ref(a["x"], a["t"], encoder_hidden_states=a["context"],
                   added_cond_kwargs={"text_embeds": a["text_embeds"], "time_ids": a["time_ids"]}).sample
    got = ours(a["x"], a["t"], a["context"], text_embeds=a["text_embeds"], time_ids=a["time_ids"])
    assert _max_diff(got, expected) <= TOL
    # The added embedding reaches the output: other size ids, another prediction.
    other = ours(a["x"], a["t"], a["context"], text_embeds=a["text_embeds"], time_ids=a["time_ids"].flip(0))
    assert _max_diff(other, got) > 1e-3


def test_unet_depth_per_level_mirrors_on_the_way_up():
    with torch.device("meta"):
        unet = UNet(SDXL.unet)

    def depths(blocks):
        return [None if b.attentions is None else len(b.attentions[0].transformer_blocks) for b in blocks]

    assert depths(unet.down_blocks) == [None, 2, 10]
    assert depths(unet.up_blocks) == [10, 2, None]
    assert len(unet.mid_block.attentions[0].transformer_blocks) == 10
    assert unet.up_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 20


@pytest.mark.parametrize("name, config", [("sdxl", SDXL.unet), ("sdxl-refiner", SDXL_REFINER.unet)])
def test_full_size_unet_keys_and_shapes(name, config: UNetConfig):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet(config)
    ref = _meta_diffusers(UNet2DConditionModel, REAL_UNETS[name])
    theirs = _shapes(ref)
    assert _shapes(ours) == theirs
    real = REAL_UNETS[name]
    assert theirs["add_embedding.linear_1.weight"] == (4 * real["block_out_channels"][0],
                                                      real["projection_class_embeddings_input_dim"])


@torch.no_grad()
def test_unet_refuses_missing_or_misshaped_added_conditioning(unets):
    name, ref, ours = unets
    a = _unet_inputs(name, ref, torch.Generator().manual_seed(1))
    x, t, c, pooled, ids = a["x"], a["t"], a["context"], a["text_embeds"], a["time_ids"]
    for kwargs, message in [
        (dict(text_embeds=pooled), "needs time_ids"),
        (dict(time_ids=ids), "needs text_embeds"),
        (dict(text_embeds=pooled[:, :-1], time_ids=ids), r"width .* != "),
        (dict(text_embeds=pooled, time_ids=ids[:, :-1]), r"width .* != "),
        (dict(text_embeds=pooled[:1], time_ids=ids), r"shape \(2, n\)"),
        (dict(text_embeds=pooled, time_ids=ids[0]), r"time_ids must have shape \(2, n\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(x, t, c, **kwargs)
    with pytest.raises(TypeError, match="time_ids must be a tensor"):
        ours(x, t, c, text_embeds=pooled, time_ids=ids.tolist())


def test_sd_unet_refuses_added_conditioning():
    tiny = UNetConfig(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                      num_attention_heads=(2, 2), cross_attention_dim=32, norm_num_groups=8)
    unet = UNet(tiny).eval()
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    for kwargs in (dict(time_ids=TIME_IDS["sdxl"][:1]), dict(text_embeds=torch.randn(1, 40))):
        with pytest.raises(ValueError, match="no text_time embedding"):
            unet(x, 1.0, c, **kwargs)
    assert unet.add_embedding is None and not any(k.startswith("add_") for k in unet.state_dict())


# --- text encoders ------------------------------------------------------------------------


def _ids(pad_token: str) -> torch.Tensor:
    return Tokenizer(pad_token)(PROMPTS)


@torch.no_grad()
def test_clip_l_is_the_raw_penultimate_layer(encoders):
    ours, ref, _, _ = encoders
    ids = _ids("eos")
    hidden = ref(input_ids=ids, output_hidden_states=True).hidden_states
    assert _max_diff(ours(ids), hidden[-2]) <= TOL
    assert _max_diff(ours(ids, clip_skip=2), hidden[-3]) <= TOL
    got, pooled = ours.encode(ids)
    assert pooled is None and torch.equal(got, ours(ids))
    # Raw: the final LayerNorm is not applied (it would change the numbers).
    assert _max_diff(ref.final_layer_norm(hidden[-2]), hidden[-2]) > 0.1
    assert ours.max_clip_skip == CLIP_L_TINY["num_hidden_layers"] - 1
    with pytest.raises(ValueError, match="clip_skip must be an integer from 1 to 2"):
        ours(ids, clip_skip=3)


@torch.no_grad()
def test_bigg_hidden_states_and_pooled_projection(encoders):
    _, _, ours, ref = encoders
    ids = _ids("zero")
    out = ref(input_ids=ids, output_hidden_states=True)
    for clip_skip in (1, 2, 3):
        hidden, pooled = ours.encode(ids, clip_skip=clip_skip)
        assert _max_diff(hidden, out.hidden_states[-(clip_skip + 1)]) <= TOL
        # The pooled embedding is always the last layer's, whatever the skip.
        assert _max_diff(pooled, out.text_embeds) <= TOL
    assert pooled.shape == (3, BIGG_TINY["projection_dim"])
    assert torch.equal(ours(ids), ours.encode(ids)[0])
    assert ours.max_clip_skip == 3
    with pytest.raises(ValueError, match="from 1 to 3"):
        ours.encode(ids, clip_skip=4)


@torch.no_grad()
def test_last_layer_encoder_encode_gives_no_pooled():
    config = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    enc = TextEncoder(config).eval()
    ids = _ids("eos")
    hidden, pooled = enc.encode(ids, clip_skip=2)
    assert pooled is None and torch.equal(hidden, enc(ids, clip_skip=2))
    assert enc.max_clip_skip == 2 and enc.text_projection is None


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_encoders_match_diffusers_encode_prompt(sdxl_folder, clip_skip):
    """diffusers' SDXL clip_skip=k (hidden_states[-(k + 2)]) is ldm's k + 1; None is ldm's 1."""
    pipe = load_sdxl_reference_pipeline(sdxl_folder)
    config = ldm_config(SDXL_TINY)
    clip_l = _load(TextEncoder(config.text), _with_text_model_level(pipe.text_encoder.state_dict()))
    bigg = _load(TextEncoder(config.text_2), pipe.text_encoder_2.state_dict())
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False,
        clip_skip=None if clip_skip == 1 else clip_skip - 1)
    hidden_2, pooled = bigg.encode(_ids("zero"), clip_skip=clip_skip)
    got = torch.cat([clip_l(_ids("eos"), clip_skip=clip_skip), hidden_2], dim=-1)
    assert _max_diff(got, expected) <= TOL
    assert _max_diff(pooled, expected_pooled) <= TOL


@pytest.mark.parametrize("ours, real, cls", [
    (SDXL.text, REAL_CLIP_L, "CLIPTextModel"),
    (SDXL.text_2, REAL_BIGG, "CLIPTextModelWithProjection"),
    (SDXL_REFINER.text, REAL_BIGG, "CLIPTextModelWithProjection"),
], ids=["clip-l", "bigg", "refiner-bigg"])
def test_full_size_text_encoders_keys_and_shapes(ours: TextEncoderConfig, real: dict, cls: str):
    import transformers

    with torch.device("meta"):
        enc = TextEncoder(ours)
        ref = getattr(transformers, cls)(transformers.CLIPTextConfig(**real))
    assert _shapes(enc) == {k: tuple(v.shape) for k, v in _with_text_model_level(ref.state_dict()).items()}


@pytest.mark.parametrize("name", list(SPECS))
def test_saved_folders_are_the_real_layout(request, name):
    """The fixtures' folders load as diffusers' SDXL pipelines, tokenizer_2 pads with "!" (id 0),
    and their weights load into ldm's modules unrenamed."""
    folder = request.getfixturevalue({"sdxl": "sdxl_folder", "sdxl-refiner": "sdxl_refiner_folder"}[name])
    pipe = load_sdxl_reference_pipeline(folder)
    spec, config = SPECS[name], ldm_config(SPECS[name])
    assert type(pipe).__name__ == spec.pipeline
    assert pipe.config.force_zeros_for_empty_prompt is (name == "sdxl")
    assert (pipe.tokenizer_2.pad_token, pipe.tokenizer_2.pad_token_id) == ("!", 0)
    assert (pipe.tokenizer is None) is (pipe.text_encoder is None) is (name == "sdxl-refiner")
    with torch.device("meta"):
        unet, bigg = UNet(config.unet), TextEncoder(config.text_2 or config.text)
    unet.load_state_dict(pipe.unet.state_dict(), strict=True, assign=True)
    bigg.load_state_dict(pipe.text_encoder_2.state_dict(), strict=True, assign=True)


def test_tiny_configs_are_consistent():
    base, refiner = ldm_config(SDXL_TINY), ldm_config(SDXL_REFINER_TINY)
    assert (base.size_conditioning, refiner.size_conditioning) == ("size", "aesthetic")
    assert base.pooled_dim == refiner.pooled_dim == BIGG_TINY["projection_dim"]
    assert refiner.text_2 is None and refiner.text.projection_dim == BIGG_TINY["projection_dim"]
    assert ldm_text_config(CLIP_L_TINY, "eos", projection=False).hidden_layer == "penultimate"
    assert SD1.unet.addition_embed_type is None
