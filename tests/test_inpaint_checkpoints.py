"""9-channel inpainting checkpoints: loading, detection, conversion both ways, refusals.

An inpainting U-Net's first conv takes 2 * latent + 1 channels (noisy latents, mask,
masked-image latents). Reference folders are diffusers' own
StableDiffusionInpaintPipeline layout, written by tests/reference.py.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm.checkpoints.loading
from ldm.checkpoints import CheckpointError, convert, detect_config, load_model
from ldm.checkpoints.detect import V_RULE_KEY
from ldm.checkpoints.loading import plan
from ldm.config import SD1, SD1_INPAINT, SD2_INPAINT, TOY_INPAINT, inpainting_variant, with_changes
from reference import SD1_INPAINT_TINY, SD2V_INPAINT_TINY, load_reference_pipeline, save_inpaint_folder
from test_checkpoints import assert_same_weights, original_shapes

ROOT = Path(__file__).resolve().parent.parent
TOY_WEIGHTS = ROOT / "weights" / "ldm-toy.safetensors"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
INPAINT_PIPELINE = "StableDiffusionInpaintPipeline"
SPECS = {"sd1": SD1_INPAINT_TINY, "sd2v": SD2V_INPAINT_TINY}


@pytest.fixture(scope="module", params=list(SPECS))
def case(request, tmp_path_factory):
    """A tiny inpainting folder (diffusers' layout), its ldm load, and its single file."""
    out = tmp_path_factory.mktemp(f"inpaint_{request.param}")
    folder = save_inpaint_folder(SPECS[request.param], out / "model", seed=5)
    single = convert(folder, out / "model.safetensors")
    return request.param, folder, load_model(folder), single


def _load_logged(path, caplog, **kwargs):
    with caplog.at_level(logging.INFO, logger="ldm"):
        return load_model(path, **kwargs)


# --- loading and detection --------------------------------------------------------


def test_load_folder_as_inpainting(case, caplog):
    name, folder, _, _ = case
    model = _load_logged(folder, caplog)
    assert model.config.is_inpainting and model.config.unet.in_channels == 9
    assert model.unet.conv_in.weight.shape[1] == 9
    assert model.config.vae.latent_channels == 4  # noise has the VAE's channels, not the U-Net's
    assert model.config.prediction_type == ("v_prediction" if name == "sd2v" else "epsilon")
    family = "sd2" if name == "sd2v" else "sd1"
    assert f"detected {family} inpainting" in caplog.text


def test_single_file_round_trip(case, caplog):
    _, _, model, single = case
    with safe_open(str(single), "pt") as fh:
        assert json.loads(fh.metadata()["ldm.config"]) == model.config.to_dict()
        assert fh.get_slice(CONV_IN).get_shape()[1] == 9
    again = _load_logged(single, caplog)
    assert again.layout == "original" and again.config == model.config
    assert "inpainting" in caplog.text
    assert_same_weights(model, again)


def test_single_file_to_diffusers_folder(case, tmp_path):
    """The folder ldm writes is diffusers' own StableDiffusionInpaintPipeline folder:
    diffusers loads it as one, and re-saving it changes nothing but optional entries."""
    _, _, model, single = case
    folder = convert(single, tmp_path / "out")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == INPAINT_PIPELINE
    pipe = load_reference_pipeline(folder, INPAINT_PIPELINE)
    assert type(pipe).__name__ == INPAINT_PIPELINE and pipe.unet.config.in_channels == 9
    assert torch.equal(pipe.unet.conv_in.weight, model.unet.conv_in.weight)
    pipe.save_pretrained(tmp_path / "resaved")
    theirs = json.loads((tmp_path / "resaved" / "model_index.json").read_text())
    ours = {k: v for k, v in index.items() if k != "_diffusers_version"}
    assert ours == {k: theirs[k] for k in ours}
    extra = {k for k in set(theirs) - set(index) if not k.startswith("_")}  # not _name_or_path
    assert all(theirs[k] == [None, None] for k in extra)  # optional parts, e.g. image_encoder
    back = load_model(folder)
    assert back.config == model.config
    assert_same_weights(model, back)


def test_text_to_image_folder_still_says_so(sd1_folder, tmp_path):
    folder = convert(convert(sd1_folder, tmp_path / "m.safetensors"), tmp_path / "out")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


def test_full_size_detected_by_shapes():
    detected = detect_config(original_shapes(SD1_INPAINT))
    assert detected.config == SD1_INPAINT and "sd1-inpaint preset" in detected.rule
    shapes = original_shapes(SD2_INPAINT)
    gen = torch.Generator().manual_seed(0)
    v_bias = torch.randn(shapes[V_RULE_KEY], generator=gen) * 0.2
    eps_bias = torch.randn(shapes[V_RULE_KEY], generator=gen) * 0.02
    assert detect_config(shapes, get_tensor=lambda key: eps_bias).config == SD2_INPAINT
    v = detect_config(shapes, get_tensor=lambda key: v_bias)
    assert v.config == with_changes(SD2_INPAINT, prediction_type="v_prediction") and "0.09" in v.rule


def test_toy_inpainting_model_detected_without_metadata(tmp_path, caplog):
    """A toy inpainting model as a fine-tune would start it: the shipped U-Net with five
    zero input channels added, saved by a tool that kept no ldm metadata."""
    state = load_file(TOY_WEIGHTS)
    w = state[CONV_IN]
    state[CONV_IN] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:])], dim=1)
    path = tmp_path / "toy-inpaint.safetensors"
    save_file(state, path)
    model = _load_logged(path, caplog)
    assert model.config == TOY_INPAINT
    assert "detected toy inpainting" in caplog.text and "toy-inpaint preset" in caplog.text


# --- refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("channels, kind", [(8, "InstructPix2Pix"), (5, "depth-conditioned")])
def test_other_extra_input_variants_refused(channels, kind, tmp_path):
    shapes = original_shapes(SD1)
    shapes[CONV_IN] = (320, channels, 3, 3)
    with pytest.raises(CheckpointError, match=f"{channels} input channels.*{kind}"):
        detect_config(shapes, where="x.safetensors")


def test_other_extra_input_folder_refused(case, tmp_path):
    import shutil

    _, folder, _, _ = case
    copy = Path(shutil.copytree(folder, tmp_path / "m"))
    config_path = copy / "unet" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "in_channels": 8}))
    with pytest.raises(CheckpointError, match="8 input channels.*InstructPix2Pix") as err:
        load_model(copy)
    assert str(config_path) in str(err.value)


@pytest.fixture
def no_build(monkeypatch):
    """Building modules fails the test: a refusal must come before any allocation."""
    def refuse(config):
        raise AssertionError("modules were built before the mismatch was refused")

    monkeypatch.setattr(ldm.checkpoints.loading, "build_modules", refuse)


@pytest.mark.parametrize("source", ["folder", "single"])
def test_inpainting_weights_on_text_to_image_config_refused(case, source, no_build):
    _, folder, _, single = case
    path = folder if source == "folder" else single
    with pytest.raises(CheckpointError, match="inpainting model.*text-to-image.*sd1-inpaint") as err:
        load_model(path, config="sd1")
    assert str(path) in str(err.value)


@pytest.fixture(scope="module")
def t2i_sources(sd1_folder, tmp_path_factory):
    """A tiny text-to-image folder and the same model as a single file."""
    single = convert(sd1_folder, tmp_path_factory.mktemp("t2i") / "t2i.safetensors")
    return {"folder": sd1_folder, "single": single}


@pytest.mark.parametrize("source", ["folder", "single"])
def test_text_to_image_weights_on_inpainting_config_refused(t2i_sources, source, tmp_path, no_build):
    path = t2i_sources[source]
    config = inpainting_variant(plan(path).config)  # the tiny model with 9 input channels
    with pytest.raises(CheckpointError, match="text-to-image model.*for an inpainting model") as err:
        load_model(path, config=config)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="text-to-image model"):
        convert(path, tmp_path / "out.safetensors", config=config)
    assert not (tmp_path / "out.safetensors").exists()


def _sparse_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """A full-size float16 checkpoint with all-zero data, as a sparse file: a real
    header and length, next to no disk space."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("weights, forced, message", [
    (SD1_INPAINT, "sd1", "weights are an inpainting model.*for a text-to-image model"),
    (SD1, "sd1-inpaint", "weights are a text-to-image model.*for an inpainting model"),
])
def test_full_size_mismatch_refused_before_allocation(weights, forced, message, tmp_path, no_build):
    path = _sparse_checkpoint(tmp_path / "full.safetensors", original_shapes(weights))
    assert path.stat().st_size > 1_500_000_000
    with pytest.raises(CheckpointError, match=message):
        load_model(path, config=forced)


def test_cli_convert_both_ways(case, tmp_path, capsys):
    from ldm.cli import main

    _, folder, model, _ = case
    single, back = tmp_path / "m.safetensors", tmp_path / "back"
    assert main(["convert", str(folder), str(single)]) == 0
    assert main(["convert", str(single), str(back)]) == 0
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == INPAINT_PIPELINE
    assert main(["convert", str(single), str(tmp_path / "x.safetensors"), "--config", "sd1"]) == 2
    assert "inpainting model" in capsys.readouterr().err
    assert_same_weights(model, load_model(back))
