"""ControlNet: model parity with diffusers' ControlNetModel, U-Net residuals, files both ways.

The reference is diffusers: its ControlNetModel (tiny, random weights, zero convs
included), its UNet2DConditionModel with down_block_additional_residuals /
mid_block_additional_residual, and its single-file converter
``convert_controlnet_checkpoint`` for the original (lllyasviel) key layout.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoints import (
    CheckpointError, check_controlnet_fits, convert_controlnet, is_controlnet, load_controlnet, save_controlnet,
)
from ldm.checkpoints.controlnet_file import controlnet_from_diffusers, detect_controlnet
from ldm.checkpoints.diffusers_folder import read_folder_config
from ldm.checkpoints.keymap import apply_mapping
from ldm.checkpoints.keymap_controlnet import controlnet_mappings
from ldm.config import CONTROLNET_SD1, CONTROLNET_SD2, SD1, SD2, SDXL, ControlNetConfig, with_changes
from ldm.foreign_config import unet_from_diffusers
from ldm.models.controlnet import ControlNetModel
from ldm.models.unet import UNet
from reference import SD1_TINY, SD2V_TINY
from reference_controlnet import build_controlnet

SPECS = {"sd1": SD1_TINY, "sd2": SD2V_TINY}
TOL = 1e-5


def _inputs(batch: int = 2, seed: int = 0):
    """Noisy latents, timesteps, text context and a hint image in [0, 1] at pixel size."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    t = torch.tensor([17.0, 803.0][:batch])
    context = torch.randn(batch, 7, 32, generator=gen)
    hint = torch.rand(batch, 3, 64, 64, generator=gen)
    return sample, t, context, hint


def _max_diff(ours, theirs) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


def _reference(folder):
    from diffusers import ControlNetModel as Reference

    return Reference.from_pretrained(folder).eval()


def _assert_close(ours, theirs_down, theirs_mid, what: str) -> None:
    assert len(ours.down) == len(theirs_down)
    diff = _max_diff([*ours.down, ours.mid], [*theirs_down, theirs_mid])
    print(f"{what}: max abs difference {diff:.2e}")
    assert diff < TOL, f"{what}: max abs difference {diff}"


# --- the model ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_residuals_match_diffusers(family, controlnet_folders, one_thread):
    """Same weights, same inputs: ldm's unscaled residuals equal diffusers' at scale 1."""
    loaded = load_controlnet(controlnet_folders[family])
    reference = _reference(controlnet_folders[family])
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        ours = loaded.model(sample, t, context, hint)
        down, mid = reference(sample, t, context, hint, return_dict=False)
    assert loaded.layout == "diffusers" and loaded.config.family == family
    assert float(mid.abs().max()) > 1e-2  # the zero convs are random: nothing trivially 0
    _assert_close(ours, down, mid, f"{family} ControlNet")


def test_scales_and_guess_mode_match_diffusers(controlnet_folders, one_thread):
    """scaled(): diffusers' conditioning_scale, its guess-mode ramp, and a scale per row."""
    loaded = load_controlnet(controlnet_folders["sd1"])
    reference = _reference(controlnet_folders["sd1"])
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        ours = loaded.model(sample, t, context, hint)
        guess = reference(sample, t, context, hint, conditioning_scale=0.6, guess_mode=True, return_dict=False)
        row0 = reference(sample, t, context, hint, conditioning_scale=0.5, return_dict=False)
        row1 = reference(sample, t, context, hint, conditioning_scale=2.0, return_dict=False)
    _assert_close(ours.scaled(0.6, guess_mode=True), *guess, "guess mode x 0.6")
    per_row = ours.scaled(torch.tensor([0.5, 2.0]))
    rows = ([torch.cat([a[:1], b[1:]]) for a, b in zip(row0[0], row1[0])], torch.cat([row0[1][:1], row1[1][1:]]))
    _assert_close(per_row, *rows, "per-row scales 0.5 / 2.0")
    summed = ours + ours
    assert torch.equal(summed.mid, ours.mid * 2)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        ours.scaled(torch.tensor([1.0, 2.0, 3.0]))


def test_global_pooling_matches_diffusers(one_thread):
    """The shuffle ControlNet's global_pool_conditions: residuals averaged to 1x1."""
    _, reference = build_controlnet(SD1_TINY, seed=3, global_pool_conditions=True)
    config = controlnet_from_diffusers(dict(reference.config))
    assert config.global_pool_conditions
    model = ControlNetModel(config).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        ours = model(sample, t, context, hint)
        down, mid = reference(sample, t, context, hint, return_dict=False)
    assert ours.mid.shape == (2, 64, 1, 1)
    _assert_close(ours, down, mid, "global pooling")


def test_hint_of_batch_one_and_bad_hints(controlnet_folders, one_thread):
    loaded = load_controlnet(controlnet_folders["sd1"])
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        both = loaded.model(sample, t, context, hint[:1].expand(2, -1, -1, -1))
        one = loaded.model(sample, t, context, hint[:1])
    assert _max_diff([*one.down, one.mid], [*both.down, both.mid]) < TOL
    with pytest.raises(ValueError, match=r"hint must have shape \(2 or 1, 3, 64, 64\)"):
        loaded.model(sample, t, context, hint[:, :, :32, :32])
    with pytest.raises(TypeError, match="hint must be a tensor"):
        loaded.model(sample, t, context, hint.numpy())


# --- the U-Net with residuals -----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_unet_with_residuals_matches_diffusers(family, one_thread):
    """Residuals added to the skips and after the mid block, as diffusers adds
    down_block_additional_residuals / mid_block_additional_residual (pooled 1x1 ones too)."""
    reference, reference_cn = build_controlnet(SPECS[family], seed=4)
    unet = UNet(unet_from_diffusers(dict(reference.config))).eval()
    unet.load_state_dict(reference.state_dict(), strict=True)
    sample, t, context, hint = _inputs(seed=1)
    with torch.no_grad():
        down, mid = reference_cn(sample, t, context, hint, return_dict=False)
    gen = torch.Generator().manual_seed(5)
    pooled = [torch.randn(d.shape[:2] + (1, 1), generator=gen) for d in down]
    pooled_mid = torch.randn(mid.shape[:2] + (1, 1), generator=gen)
    for residuals, mid_residual in ((down, mid), (pooled, pooled_mid)):
        with torch.no_grad():
            ours = unet(sample, t, context, down_residuals=list(residuals), mid_residual=mid_residual)
            theirs = reference(sample, t, context, down_block_additional_residuals=tuple(residuals),
                               mid_block_additional_residual=mid_residual).sample
            plain = unet(sample, t, context)
        diff = float((ours - theirs).abs().max())
        print(f"{family} U-Net with residuals: max abs difference {diff:.2e}")
        assert diff < TOL
        assert float((ours - plain).abs().max()) > 1e-2  # the residuals did change the output


def test_unet_refuses_residuals_that_do_not_fit(one_thread):
    reference, reference_cn = build_controlnet(SD1_TINY, seed=4)
    unet = UNet(unet_from_diffusers(dict(reference.config))).eval()
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        down, mid = reference_cn(sample, t, context, hint, return_dict=False)
        with pytest.raises(ValueError, match="3 down_residuals for a U-Net with 4 skips"):
            unet(sample, t, context, down_residuals=down[:-1], mid_residual=mid)
        with pytest.raises(ValueError, match="got only down_residuals"):
            unet(sample, t, context, down_residuals=down)
        with pytest.raises(ValueError, match=r"down_residuals\[2\] has shape \(1, 32, 4, 4\)"):
            unet(sample, t, context, down_residuals=[*down[:2], down[2][:1], *down[3:]], mid_residual=mid)
        with pytest.raises(TypeError, match="sequence of tensors"):
            unet(sample, t, context, down_residuals=mid, mid_residual=mid)


# --- key maps -------------------------------------------------------------------------------


def _converted_by_diffusers(original: dict, config) -> dict:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    return convert_controlnet_checkpoint(original, config)


def test_original_file_keys_match_diffusers_converter(controlnet_folders, tmp_path, one_thread):
    """Our original-layout file, fed to diffusers' converter, gives diffusers' state dict
    back key for key and value for value; and it loads back into the same residuals."""
    loaded = load_controlnet(controlnet_folders["sd2"])
    reference = _reference(controlnet_folders["sd2"])
    path = save_controlnet(loaded, tmp_path / "control_tiny.safetensors")
    original = load_file(path)
    assert all(k.startswith("control_model.") for k in original)
    converted = _converted_by_diffusers(original, reference.config)
    expected = reference.state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(torch.equal(converted[k], expected[k]) for k in expected)

    again = load_controlnet(path)
    assert again.layout == "original" and again.config == loaded.config
    sample, t, context, hint = _inputs()
    with torch.no_grad():
        down, mid = reference(sample, t, context, hint, return_dict=False)
        _assert_close(again.model(sample, t, context, hint), down, mid, "sd2 ControlNet from an original file")


def test_original_file_without_prefix_or_metadata(controlnet_folders, tmp_path, caplog, one_thread):
    """Keys without ``control_model.`` load too; a tiny model (context 32) is no preset, so
    detection refuses it by its width and config= loads it."""
    loaded = load_controlnet(controlnet_folders["sd1"])
    bare = apply_mapping(loaded.model.state_dict(), controlnet_mappings(loaded.config)[1])
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in bare.items()}, path)
    assert "input_hint_block.0.weight" in bare and is_controlnet(path)
    with pytest.raises(CheckpointError, match="context width 32 fits no ControlNet preset"):
        load_controlnet(path)
    with caplog.at_level(logging.INFO, logger="ldm"):
        again = load_controlnet(path, config=loaded.config.to_dict())
    assert "config override" in caplog.text and "not detected" in caplog.text
    state = again.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())


def _full_size_original(config: ControlNetConfig) -> dict:
    with torch.device("meta"):
        model = ControlNetModel(config)
    return dict(apply_mapping(model.state_dict(), controlnet_mappings(config)[1]))


def _full_size_reference(**kwargs):
    from diffusers import ControlNetModel as Reference

    with torch.device("meta"):
        return Reference(**kwargs)


@pytest.mark.parametrize("preset, reference_config", [
    (CONTROLNET_SD1, dict(cross_attention_dim=768)),
    (CONTROLNET_SD2, dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)),
], ids=["sd15", "sd21"])
def test_full_size_keys_both_ways(preset, reference_config):
    """The full-size SD1.5 / SD2.1 ControlNet on the meta device: our original keys are the
    released files' (input_hint_block.{0,2,..,14}, zero_convs.0..11, middle_block_out.0),
    diffusers' converter maps them to diffusers' keys and shapes, ours maps them back, and
    detection from those shapes gives the preset."""
    original = _full_size_original(preset)
    reference = _full_size_reference(**reference_config).state_dict()
    modules = {".".join(k.split(".")[:2]) for k in original if k.startswith(("input_hint_block", "zero_convs"))}
    assert modules == {f"input_hint_block.{i}" for i in range(0, 16, 2)} | {f"zero_convs.{i}" for i in range(12)}
    assert {k for k in original if k.startswith("middle_block_out")} == {"middle_block_out.0.weight",
                                                                         "middle_block_out.0.bias"}
    assert not any(k.startswith(("output_blocks", "out.")) for k in original)

    converted = _converted_by_diffusers({"control_model." + k: v for k, v in original.items()}, {"layers_per_block": 2})
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    back = apply_mapping(original, controlnet_mappings(preset)[0])
    assert not back.unmapped and {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in reference.items()}

    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert detect_controlnet(shapes)[0] == preset
    shuffle, rule = detect_controlnet(shapes, path="control_v11e_sd15_shuffle.pth")
    assert shuffle == with_changes(preset, global_pool_conditions=True) and "_shuffle" in rule


def test_detection_refuses_what_fits_no_preset():
    shapes = {k: tuple(v.shape) for k, v in _full_size_original(CONTROLNET_SD1).items()}
    shapes["input_hint_block.0.weight"] = (16, 1, 3, 3)  # a 1-channel hint: not the released SD ControlNet
    with pytest.raises(CheckpointError, match="conditioning_channels: weights 1, preset 3"):
        detect_controlnet(shapes)
    xl = dict(shapes, **{"label_emb.0.0.weight": (1280, 2816), "label_emb.0.2.weight": (1280, 1280)})
    with pytest.raises(CheckpointError, match="SDXL ControlNets are not supported"):
        detect_controlnet(xl)
    with pytest.raises(CheckpointError, match="input_hint_block"):
        detect_controlnet({k: v for k, v in shapes.items() if not k.startswith("input_hint_block.14")})


# --- files: conversions, pickles, what is refused ------------------------------------------------


def test_convert_both_ways_with_the_cli(controlnet_folders, tmp_path, one_thread):
    from ldm.cli import main

    single, folder = tmp_path / "cn.safetensors", tmp_path / "cn-diffusers"
    assert main(["convert", str(controlnet_folders["sd1"]), str(single)]) == 0
    assert main(["convert", str(single), str(folder)]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    reference = _reference(folder)  # diffusers reads what we wrote
    loaded = load_controlnet(controlnet_folders["sd1"])
    assert all(torch.equal(reference.state_dict()[k], v) for k, v in loaded.model.state_dict().items())
    assert main(["convert", str(single), str(folder)]) == 2  # exists, no --overwrite
    assert main(["convert", "--overwrite", str(single), str(folder)]) == 0
    assert main(["convert", "--prediction-type", "epsilon", str(single), str(tmp_path / "x.safetensors")]) == 2
    half = convert_controlnet(folder, tmp_path / "half.safetensors", dtype="float16")
    assert {v.dtype for v in load_file(half).values()} == {torch.float16}


def test_pickle_files_and_the_bundled_base_model(controlnet_folders, tmp_path, caplog, one_thread):
    """A .pth only with allow_pickle (weights_only); a 1.0-style file's bundled SD model and
    DDPM buffers are skipped on purpose, anything else is refused."""
    loaded = load_controlnet(controlnet_folders["sd1"])
    original = load_file(save_controlnet(loaded, tmp_path / "cn.safetensors"))
    bundled = {**original, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2), "betas": torch.zeros(3)}
    path = tmp_path / "control_sd15_tiny.pth"
    torch.save({"state_dict": bundled}, path)
    with pytest.raises(CheckpointError, match="refusing to load a pickle"):
        load_controlnet(path)
    with caplog.at_level(logging.INFO, logger="ldm"):
        again = load_controlnet(path, allow_pickle=True, config=loaded.config)
    assert "ignored 3 keys" in caplog.text
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in loaded.model.state_dict().items())
    torch.save({**bundled, "control_model.extra.weight": torch.zeros(2), "foreign.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match=r"(?s)sd1 ControlNet config.*controlnet \(control_model\.\).*"
                       r"1 unexpected: extra.weight\nkeys outside every component.*1 unexpected: foreign.weight"):
        load_controlnet(path, allow_pickle=True, config=loaded.config)


def test_files_that_are_not_controlnets(controlnet_folders, sd1_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="ControlNet not found"):
        load_controlnet(tmp_path / "missing.safetensors")
    checkpoint = tmp_path / "v1-5.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, checkpoint)
    with pytest.raises(CheckpointError, match="a Stable Diffusion checkpoint"):
        load_controlnet(checkpoint)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, lora)
    with pytest.raises(CheckpointError, match="a LoRA file, not a ControlNet"):
        load_controlnet(lora)
    assert not is_controlnet(lora) and not is_controlnet(checkpoint) and is_controlnet(controlnet_folders["sd1"])
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes((controlnet_folders["sd1"] / weights.name).read_bytes())
    with pytest.raises(CheckpointError, match="pass the folder"):
        load_controlnet(weights)
    with pytest.raises(CheckpointError, match="diffusers model folder without config.json"):
        load_controlnet(sd1_folder)
    diff = tmp_path / "diff.safetensors"
    save_file({"control_model.time_embed.0.weight": torch.zeros(2), "difference": torch.zeros(1)}, diff)
    with pytest.raises(CheckpointError, match="'difference' ControlNet"):
        load_controlnet(diff)


def test_sdxl_controlnets_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="SDXL ControlNets .* are not supported yet"):
        ControlNetConfig(unet=SDXL.unet, family="sdxl")
    folder = tmp_path / "xl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "ControlNetModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "cross_attention_dim": 2048}))
    with pytest.raises(CheckpointError, match="SDXL ControlNets are not supported yet"):
        load_controlnet(folder)


def test_check_controlnet_fits(controlnet_folders, sd1_folder):
    with pytest.raises(ValueError, match=r"for sd2 models \(context width 1024\).*sd1 model \(context width 768\)"):
        check_controlnet_fits(CONTROLNET_SD2, SD1)
    check_controlnet_fits(CONTROLNET_SD1, SD1)
    check_controlnet_fits(CONTROLNET_SD2, SD2)
    tiny_sd1 = read_folder_config(sd1_folder)[0]
    check_controlnet_fits(load_controlnet(controlnet_folders["sd1"]).config, tiny_sd1)
    with pytest.raises(ValueError, match="family sd2 vs sd1; proj_in linear vs conv"):
        check_controlnet_fits(load_controlnet(controlnet_folders["sd2"]).config, tiny_sd1)
    with pytest.raises(TypeError, match="ControlNetConfig"):
        check_controlnet_fits(SD1, SD1)
