"""SDXL checkpoints: the original single-file layout (SGM) and diffusers folders, both ways.

References: diffusers' single-file converter (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``) for the original layout's names, shapes and values;
open_clip's text tower for OpenCLIP ViT-bigG's original names; the released SDXL
``config.json`` files for the configs; diffusers' StableDiffusionXL pipelines for the
folders ldm writes. Full-size models are built on the meta device (no memory); values
are compared on the tiny models of tests/reference_sdxl.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from open_clip import get_model_config
from open_clip.transformer import TextTransformer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.checkpoints import CheckpointError, convert, detect_config, load_model
from ldm.checkpoints.convert import original_state
from ldm.checkpoints.keymap import apply_mapping
from ldm.checkpoints.layouts import layout_of, prefixes, split_components
from ldm.checkpoints.loading import build_modules, original_mappings
from ldm.config import OPENCLIP_BIGG, PRESETS, with_changes
from ldm.foreign_config import text_from_transformers, unet_from_diffusers, vae_from_diffusers
from reference_sdxl import SDXL_REFINER_TINY, SDXL_TINY, ldm_config, load_sdxl_reference_pipeline

SPECS = {"sdxl": SDXL_TINY, "sdxl-refiner": SDXL_REFINER_TINY}
UNET = "model.diffusion_model."
LABEL_EMB = UNET + "label_emb.0.0.weight"
# Where diffusers' converter looks for the OpenCLIP ViT-bigG encoder of each model.
BIGG_PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model.",
               "sdxl-inpaint": "conditioner.embedders.1.model."}

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, as released.
SDXL_BASE_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json: the same keys, these values.
SDXL_REFINER_UNET_JSON = {
    **SDXL_BASE_UNET_JSON, "attention_head_dim": [6, 12, 24, 24], "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560, "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# text_encoder_2/config.json of both releases (OpenCLIP ViT-bigG as CLIPTextModelWithProjection).
SDXL_TEXT_ENCODER_2_JSON = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0,
    "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "torch_dtype": "float16", "transformers_version": "4.32.0.dev0", "vocab_size": 49408,
}
RELEASED_UNET_JSON = {"sdxl": SDXL_BASE_UNET_JSON, "sdxl-refiner": SDXL_REFINER_UNET_JSON}
# vae/config.json of both releases.
SDXL_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _converter_config(config) -> dict:
    """What diffusers' convert_ldm_unet_checkpoint reads of the U-Net config."""
    return {"layers_per_block": config.unet.layers_per_block, "addition_embed_type": "text_time"}


def _reference_text_states(original: dict, name: str, bigg) -> dict[str, dict]:
    """diffusers' converter applied to an original-layout state dict: the text encoders by
    ldm component name (the refiner's bigG is ldm's text_encoder)."""
    bigg_state = convert_open_clip_checkpoint(bigg, original, prefix=BIGG_PREFIX[name])
    if name == "sdxl-refiner":
        return {"text_encoder": bigg_state}
    return {"text_encoder": convert_ldm_clip_checkpoint(original), "text_encoder_2": bigg_state}


# --- 1. full size, on the meta device ---------------------------------------------------


@pytest.fixture(scope="module", params=["sdxl", "sdxl-refiner", "sdxl-inpaint"])
def full(request):
    """A full-size SDXL preset's modules (meta) and its original-layout state dict."""
    config = PRESETS[request.param]
    states = {name: module.state_dict() for name, module in build_modules(config).items()}
    return request.param, config, states, original_state(config, states)


def test_released_configs_translate_to_the_presets():
    assert unet_from_diffusers(SDXL_BASE_UNET_JSON) == PRESETS["sdxl"].unet
    assert unet_from_diffusers(SDXL_REFINER_UNET_JSON) == PRESETS["sdxl-refiner"].unet
    # The "fp16-fix" VAEs only tell the pipeline not to upcast: the same architecture.
    for upcast in (True, False):
        assert vae_from_diffusers({**SDXL_VAE_JSON, "force_upcast": upcast}) == \
            with_changes(PRESETS["sdxl"].vae, force_upcast=upcast)
    with pytest.raises(ValueError, match="force_upcast must be true or false"):
        vae_from_diffusers({**SDXL_VAE_JSON, "force_upcast": "no"})
    assert text_from_transformers(SDXL_TEXT_ENCODER_2_JSON, "zero", hidden_layer="penultimate") == OPENCLIP_BIGG
    # CLIPTextModel's config.json has a projection_dim too, but no projection.
    plain = {**SDXL_TEXT_ENCODER_2_JSON, "architectures": ["CLIPTextModel"]}
    assert text_from_transformers(plain, "zero").projection_dim is None
    with pytest.raises(ValueError, match="transformer_layers_per_block"):
        unet_from_diffusers({**SDXL_BASE_UNET_JSON, "transformer_layers_per_block": [[1, 1], [2, 2], [10, 10]]})


def test_full_size_unet_keys_are_the_released_models(full):
    """ldm's U-Net built from a preset has the keys and shapes of diffusers' U-Net built
    from the released config.json (so the maps below are tested at the real sizes)."""
    name, config, states, _ = full
    released = RELEASED_UNET_JSON.get(name, {**SDXL_BASE_UNET_JSON, "in_channels": 9})
    with torch.device("meta"):
        reference = UNet2DConditionModel(**{k: v for k, v in released.items() if not k.startswith("_")})
    assert _shapes(states["unet"]) == _shapes(reference.state_dict())


def test_full_size_original_layout_matches_diffusers_converter(full):
    """ldm's internal -> original names, fed to diffusers' single-file converter, give
    back ldm's internal keys and shapes, component by component."""
    name, config, states, original = full
    assert _shapes(convert_ldm_unet_checkpoint(original, _converter_config(config))) == _shapes(states["unet"])
    vae = convert_ldm_vae_checkpoint(original, {"down_block_types": [0] * 4, "up_block_types": [0] * 4})
    assert _shapes(vae) == _shapes(states["vae"])
    bigg = build_modules(config)["text_encoder" if name == "sdxl-refiner" else "text_encoder_2"]
    for component, reference in _reference_text_states(original, name, bigg).items():
        assert _shapes(reference) == _shapes(states[component]), component
    assert not any(k.endswith("position_ids") for k in original)


def test_full_size_bigg_has_open_clips_names(full):
    """SGM stores bigG as open_clip's text tower: every name and shape of it, no more."""
    name, _, _, original = full
    model = get_model_config("ViT-bigG-14")
    with torch.device("meta"):
        tower = TextTransformer(**model["text_cfg"], output_dim=model["embed_dim"], act_layer=torch.nn.GELU)
    expected = {BIGG_PREFIX[name] + k: shape for k, shape in _shapes(tower.state_dict()).items()}
    assert {k: v for k, v in _shapes(original).items() if k.startswith(BIGG_PREFIX[name])} == expected
    assert len([k for k in expected if ".resblocks." in k and k.endswith("ln_1.weight")]) == 32  # all kept


def test_full_size_original_to_internal_is_exact(full):
    _, config, states, original = full
    layout = layout_of(config)
    parts, ignored, unknown = split_components(original, layout)
    assert ignored == [] and unknown == []
    for component, mapping in original_mappings(config).items():
        n = len(prefixes(layout)[component])
        back = apply_mapping({k[n:]: tuple(original[k].shape) for k in parts[component]}, mapping)
        assert back == _shapes(states[component]), component
        assert back.unmapped == () and back.dropped == ()


def test_full_size_detection(full):
    name, config, _, original = full
    shapes = _shapes(original)
    # What SDXL 1.0's files are known by: context width and label_emb's input width.
    context = shapes[UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
    assert (context, shapes[LABEL_EMB]) == {"sdxl": (2048, (1280, 2816)), "sdxl-inpaint": (2048, (1280, 2816)),
                                            "sdxl-refiner": (1280, (1536, 2560))}[name]
    assert shapes[UNET + "input_blocks.0.0.weight"][1] == (9 if name == "sdxl-inpaint" else 4)
    found = detect_config(shapes)
    assert found.config == config and found.config.prediction_type == "epsilon"
    assert f"match the {name} preset" in found.rule and "no 'v_pred' marker" in found.rule
    # ComfyUI's rule: v-prediction SDXL fine-tunes carry an empty "v_pred" marker key.
    marked = detect_config({**shapes, "v_pred": (0,)})
    assert marked.config == with_changes(config, prediction_type="v_prediction")
    with pytest.raises(CheckpointError, match="zero-terminal-SNR"):
        detect_config({**shapes, "ztsnr": (0,)})


def test_full_size_unknown_sgm_layouts_refused(full):
    name, _, _, original = full
    shapes = _shapes(original)
    if name == "sdxl-refiner":
        shapes["conditioner.embedders.1.model.ln_final.weight"] = (1280,)
    else:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("conditioner.embedders.0.")}
    with pytest.raises(CheckpointError, match="SDXL-style text encoders"):
        detect_config(shapes)
    no_label = {k: v for k, v in _shapes(original).items() if ".label_emb." not in k}
    with pytest.raises(CheckpointError, match="fit no known model family"):
        detect_config(no_label)


# --- 2. tiny models, with values -------------------------------------------------------


@pytest.fixture(scope="module", params=list(SPECS))
def tiny(request, tmp_path_factory):
    """A tiny SDXL base / refiner diffusers folder, its ldm load, and its single file."""
    name = request.param
    folder = request.getfixturevalue(f"{name.replace('-', '_')}_folder")
    single = convert(folder, tmp_path_factory.mktemp(name) / "model.safetensors")
    return name, folder, load_model(folder), single


def assert_same_weights(a, b):
    assert a.modules().keys() == b.modules().keys()
    for name, module in a.modules().items():
        sa, sb = module.state_dict(), b.modules()[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"


def _internal_keys(component: str, state: dict) -> dict:
    """transformers >= 5 has CLIPTextModel without its text_model level; ldm keeps it."""
    if not component.startswith("text_encoder"):
        return state
    return {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in state.items() if not k.endswith("position_ids")}


def test_folder_loads_as_the_reference(tiny):
    """Every weight diffusers / transformers saved in the folder, under ldm's name."""
    name, folder, model, _ = tiny
    assert model.config == ldm_config(SPECS[name]) and model.layout == "diffusers"
    files = {"unet": "unet/diffusion_pytorch_model", "vae": "vae/diffusion_pytorch_model"}
    if name == "sdxl":
        files |= {"text_encoder": "text_encoder/model", "text_encoder_2": "text_encoder_2/model"}
        assert (model.tokenizer.pad_id, model.tokenizer_2.pad_id) == (49407, 0)  # tokenizer_2 pads with "!"
    else:
        files["text_encoder"] = "text_encoder_2/model"  # bigG
        assert model.text_encoder_2 is None and model.tokenizer_2 is None and model.tokenizer.pad_id == 0
    assert model.modules().keys() == files.keys()
    for component, stem in files.items():
        theirs = _internal_keys(component, load_file(folder / f"{stem}.safetensors"))
        ours = model.modules()[component].state_dict()
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component


def test_original_roundtrip_is_bit_identical(tiny):
    name, _, model, single = tiny
    with safe_open(str(single), "pt") as fh:
        keys = list(fh.keys())
    heads = {".".join(k.split(".")[:4]) for k in keys if k.startswith("conditioner.")}
    assert heads == ({"conditioner.embedders.0.transformer", "conditioner.embedders.1.model"} if name == "sdxl"
                     else {"conditioner.embedders.0.model"})
    again = load_model(single)
    assert again.layout == "original" and again.config == model.config
    assert_same_weights(model, again)


def test_original_values_match_diffusers_converter(tiny):
    """Every tensor of the single file, read by diffusers' converter, is ldm's: the fused
    q/k/v split in order and bigG's projection transposed back (it is 40 x 48)."""
    name, _, model, single = tiny
    original = load_file(single)
    states = {component: module.state_dict() for component, module in model.modules().items()}
    reference = {
        "unet": convert_ldm_unet_checkpoint(original, _converter_config(model.config)),
        "vae": convert_ldm_vae_checkpoint(original, {"down_block_types": [0] * 4, "up_block_types": [0] * 4}),
        **_reference_text_states(original, name, None),
    }
    assert reference.keys() == states.keys()
    for component, theirs in reference.items():
        ours = states[component]
        assert ours.keys() == theirs.keys(), component
        for k in ours:
            assert torch.equal(ours[k], theirs[k].reshape(ours[k].shape)), f"{component}.{k}"
    bigg = BIGG_PREFIX[name] + "text_projection"
    assert original[bigg].shape == (48, 40)


def test_written_folder_loads_in_diffusers(tiny, tmp_path):
    name, _, model, single = tiny
    folder = convert(single, tmp_path / "out")
    index = json.loads((folder / "model_index.json").read_text())
    assert index.get("requires_aesthetics_score") is (True if name == "sdxl-refiner" else None)
    assert index["force_zeros_for_empty_prompt"] is (name == "sdxl")  # as the releases
    pipe = load_sdxl_reference_pipeline(folder)
    assert type(pipe).__name__ == SPECS[name].pipeline
    components = {"unet": pipe.unet, "vae": pipe.vae}
    if name == "sdxl":
        components |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
        assert (pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token) == ("<|endoftext|>", "!")
        assert pipe.tokenizer_2.pad_token_id == 0
    else:
        components["text_encoder"] = pipe.text_encoder_2
        assert pipe.text_encoder is None and pipe.tokenizer_2.pad_token_id == 0
    for component, module in components.items():
        theirs = _internal_keys(component, module.state_dict())
        ours = model.modules()[component].state_dict()
        assert ours.keys() == theirs.keys(), component
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component
    again = load_model(folder)
    assert again.config == model.config
    assert_same_weights(model, again)


def test_original_without_metadata_needs_a_config(tiny, tmp_path, caplog):
    """Tiny widths fit no preset: refused with what the shapes say; loads with config=.
    The keys SDXL files carry that no module uses load as the reference drops them."""
    name, _, model, single = tiny
    state = load_file(single)
    bigg = BIGG_PREFIX[name]
    extras = {bigg + "logit_scale": torch.tensor(4.6), bigg + "attn_mask": torch.zeros(77, 77),
              "denoiser.sigmas": torch.linspace(14.6, 0.03, 1000)}
    if name == "sdxl":
        extras["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "plain.safetensors"
    save_file({**state, **extras}, path)
    with pytest.raises(CheckpointError, match=f"fit no known model family.*{name} \\(") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert ("second text encoder width 48, 4 layers" in str(err.value)) == (name == "sdxl")
    with caplog.at_level(logging.INFO, logger="ldm"):
        again = load_model(path, config=ldm_config(SPECS[name]))
    assert f"config override for {path}" in caplog.text
    assert f"ignored {len(extras)} unused keys in {path}" in caplog.text
    assert_same_weights(model, again)
    save_file({**state, bigg + "mystery.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="unexpected: .*mystery"):
        load_model(path, config=ldm_config(SPECS[name]))


def test_sd1_config_on_an_sdxl_file_refused(tiny):
    name, _, _, single = tiny
    with pytest.raises(CheckpointError, match=f"contradict the config.*layout: weights '{name}', config 'sd1'"):
        load_model(single, config="sd1")


# --- 3. folder errors ------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_base_folder_without_text_encoder_2(sdxl_folder, tmp_path):
    folder = _copy(sdxl_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match="SDXL base model .* no text_encoder_2/ folder") as err:
        load_model(folder)
    assert str(folder) in str(err.value)


def test_folder_configs_must_agree(sdxl_folder, sdxl_refiner_folder, tmp_path):
    with pytest.raises(CheckpointError, match="holds a sdxl model .* config given is for a sdxl-refiner"):
        load_model(sdxl_folder, config=ldm_config(SDXL_REFINER_TINY))
    folder = _copy(sdxl_refiner_folder, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "requires_aesthetics_score": False}))
    with pytest.raises(CheckpointError, match="requires_aesthetics_score=False but .* 5 ids"):
        load_model(folder)
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    with pytest.raises(CheckpointError, match="no text encoder"):
        load_model(folder)
