"""Loading and converting checkpoints: round trips against diffusers, detection, errors."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.checkpoints import CheckpointError, convert, detect_config, load_model
from ldm.checkpoints.convert import original_state
from ldm.checkpoints.detect import V_RULE_KEY, detect_family
from ldm.checkpoints.loading import build_modules
import yaml

from ldm.config import PRESETS, SD1, SD2, SD2_V, load_config
from reference import load_reference_pipeline

COMPONENTS = ("unet", "vae", "text_encoder")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module", params=["sd1", "sd2v"])
def case(request, tmp_path_factory):
    """A fixture folder, its ldm load, and its conversion to one original-layout file."""
    folder = request.getfixturevalue(f"{request.param}_folder")
    out = tmp_path_factory.mktemp(f"conv_{request.param}")
    single = convert(folder, out / "model.safetensors", layout="original")
    return request.param, folder, load_model(folder), single


def assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"


# --- round trips ---------------------------------------------------------------


def test_load_folder(case):
    name, folder, model, _ = case
    assert model.layout == "diffusers" and model.source == str(folder)
    assert model.config.prediction_type == ("v_prediction" if name == "sd2v" else "epsilon")
    assert model.config.family == ("sd2" if name == "sd2v" else "sd1")
    assert model.tokenizer.pad_token == ("zero" if name == "sd2v" else "eos")
    assert not any(p.is_meta for m in (model.unet, model.vae, model.text_encoder) for p in m.state_dict().values())


def test_folder_to_original_roundtrip(case):
    _, _, model, single = case
    with safe_open(str(single), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert meta["format"] == "pt" and json.loads(meta["ldm.config"]) == model.config.to_dict()
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in keys)
    again = load_model(single)
    assert again.layout == "original"
    assert again.config == model.config
    assert_same_weights(model, again)


def test_original_to_diffusers_loads_in_diffusers(case, tmp_path):
    _, _, model, single = case
    folder = convert(single, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left behind
    pipe = load_reference_pipeline(folder)
    assert pipe.scheduler.config.prediction_type == model.config.prediction_type
    for name in COMPONENTS:
        ours = getattr(model, name).state_dict()
        theirs = {k if k.startswith("text_model.") or name != "text_encoder" else "text_model." + k: v
                  for k, v in getattr(pipe, name).state_dict().items() if not k.endswith("position_ids")}
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    back = load_model(folder)
    assert back.config == model.config
    assert_same_weights(model, back)


def test_convert_dtype_and_overwrite(sd1_folder, tmp_path):
    dst = convert(sd1_folder, tmp_path / "half.safetensors", dtype="float16")
    header = load_file(dst)
    assert {t.dtype for t in header.values() if t.is_floating_point()} == {torch.float16}
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(sd1_folder, dst)
    convert(sd1_folder, dst, overwrite=True)
    assert load_model(dst).unet.conv_in.weight.dtype == torch.float32  # load_model's dtype
    assert load_model(dst, dtype=torch.bfloat16).unet.conv_in.weight.dtype == torch.bfloat16


# --- overrides and logging ---------------------------------------------------------


def test_prediction_type_detected_logged_and_overridable(case, caplog):
    name, _, _, single = case
    other = "epsilon" if name == "sd2v" else "v_prediction"
    with caplog.at_level(logging.INFO, logger="ldm"):
        model = load_model(single, prediction_type=other)
    assert model.config.prediction_type == other
    assert "detected" in caplog.text and "prediction_type override" in caplog.text


def test_invalid_prediction_type(sd1_folder):
    with pytest.raises(ValueError, match="v_prediction"):
        load_model(sd1_folder, prediction_type="sample")


def test_config_override_dict(case):
    _, _, model, single = case
    forced = load_model(single, config=model.config.to_dict())
    assert forced.config == model.config


# --- detection from keys and shapes (full-size models, built on meta) --------------


def original_shapes(config) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape of a full-size model, as a real file has them."""
    modules = build_modules(config)
    state = original_state(config, {n: m.state_dict() for n, m in modules.items()})
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # Keys real files carry that ldm ignores on purpose.
    shapes.update({"betas": (1000,), "alphas_cumprod": (1000,), "posterior_mean_coef1": (1000,),
                   "model_ema.decay": (), "model_ema.num_updates": ()})
    shapes["model_ema.diffusion_modelinput_blocks00weight"] = shapes["model.diffusion_model.input_blocks.0.0.weight"]
    if config.family == "sd1":
        shapes["cond_stage_model.transformer.text_model.embeddings.position_ids"] = (1, 77)
    else:
        shapes["cond_stage_model.model.text_projection"] = (1024, 1024)
        shapes["cond_stage_model.model.logit_scale"] = ()
    return shapes


@pytest.fixture(scope="module")
def full_shapes():
    return {"sd1": original_shapes(SD1), "sd2": original_shapes(SD2)}


def test_detect_full_size_sd1(full_shapes):
    assert detect_config(full_shapes["sd1"]).config == SD1


def test_detect_full_size_sd2_by_v_rule(full_shapes):
    shapes = full_shapes["sd2"]
    assert shapes.get("cond_stage_model.model.transformer.resblocks.23.ln_1.weight") == (1024,)
    gen = torch.Generator().manual_seed(0)
    v_bias = torch.randn(shapes[V_RULE_KEY], generator=gen) * 0.2
    eps_bias = torch.randn(shapes[V_RULE_KEY], generator=gen) * 0.02
    detected = detect_config(shapes, get_tensor=lambda key: v_bias)
    assert detected.config == SD2_V and "0.09" in detected.rule
    assert detect_config(shapes, get_tensor=lambda key: eps_bias).config == SD2


def test_detect_old_sd1_text_keys(full_shapes):
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in full_shapes["sd1"].items()}
    assert detect_config(old).config == SD1


def test_old_sd1_text_keys_and_ema_keys_load(case, tmp_path):
    name, _, model, single = case
    state = load_file(single)
    with safe_open(str(single), "pt") as fh:
        meta = fh.metadata()
    if name == "sd1":  # transformers < 4.17 wrote CLIP without the text_model level
        state = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                 for k, v in state.items()}
    for key in list(state)[:3]:
        state["model_ema." + key.replace(".", "")] = state[key].clone()
    state["betas"] = torch.linspace(0.1, 0.2, 1000)
    state["model_ema.num_updates"] = torch.tensor(7)
    path = tmp_path / "extra.safetensors"
    save_file(state, path, metadata=meta)
    assert_same_weights(model, load_model(path))


def test_unknown_family_and_unsupported(tmp_path, full_shapes):
    with pytest.raises(CheckpointError, match="text encoders of two layouts"):
        detect_family({"conditioner.embedders.0.transformer.x": (1,), **full_shapes["sd1"]})
    pix2pix = dict(full_shapes["sd1"])
    pix2pix["model.diffusion_model.input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(CheckpointError, match="8 input channels.*InstructPix2Pix"):
        detect_config(pix2pix)
    path = tmp_path / "random.safetensors"
    save_file({"foo.bar.weight": torch.zeros(2), "baz.weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"unknown model family.*foo\.bar") as err:
        load_model(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("extra, kind", [(4, "InstructPix2Pix"), (1, "depth-conditioned")])
def test_extra_input_variant_file_refused(case, tmp_path, extra, kind):
    """Inpainting (latent + 5 inputs) loads; other extra inputs are refused by name."""
    _, _, _, single = case
    state = load_file(single)
    w = state["model.diffusion_model.input_blocks.0.0.weight"]
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w[:, :extra]], dim=1)
    path = tmp_path / "variant.safetensors"
    save_file(state, path)
    with pytest.raises(CheckpointError, match=f"{4 + extra} input channels.*{kind}") as err:
        load_model(path)
    assert str(path) in str(err.value)


# --- bad input -------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file(case, tmp_path):
    _, _, _, single = case
    data = single.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are my prompt notes, not weights\n" * 10)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        load_model(path)
    assert str(path) in str(err.value)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(struct.pack("<Q", 5))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tiny)


def test_pickle_refused_then_allowed(case, tmp_path):
    _, _, model, single = case
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(single), "global_step": 3}, path)
    with pytest.raises(CheckpointError, match="allow_pickle=True") as err:
        load_model(path)
    assert "arbitrary code" in str(err.value) and str(path) in str(err.value)
    # No ldm.config metadata in a pickle: a tiny model needs its config given.
    loaded = load_model(path, allow_pickle=True, config=model.config)
    assert_same_weights(model, loaded)


def test_strict_load_lists_missing_unexpected_misshaped(case, tmp_path):
    _, _, _, single = case
    state = load_file(single)
    with safe_open(str(single), "pt") as fh:
        meta = fh.metadata()
    del state["model.diffusion_model.out.2.bias"]
    state["model.diffusion_model.bogus.weight"] = torch.zeros(1)
    state["first_stage_model.quant_conv.bias"] = torch.zeros(5)
    path = tmp_path / "edited.safetensors"
    save_file(state, path, metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    text = str(err.value)
    assert str(path) in text
    assert "1 missing: conv_out.bias" in text
    assert "1 unexpected: bogus.weight" in text
    assert "1 mis-shaped: quant_conv.bias (expected [8], got [5])" in text


def test_wrong_config_override_reports_mismatch(case):
    _, _, _, single = case
    with pytest.raises(CheckpointError, match=r"contradict the config in \d+ field\(s\):.*unet.block_out_channels: weights \(32, 64\)"):
        load_model(single, config="sd1")


# --- preset YAMLs ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_yaml(name, tmp_path):
    assert load_config(CONFIGS / f"{name}.yaml") == PRESETS[name]
    saved = yaml.safe_dump(PRESETS[name].to_dict(), sort_keys=False)
    assert saved == (CONFIGS / f"{name}.yaml").read_text()


# --- diffusers folder variants and atomic writing ------------------------------------


def test_folder_fp16_variant_no_tokenizer(sd2v_folder, tmp_path):
    import shutil

    folder = Path(shutil.copytree(sd2v_folder, tmp_path / "m"))
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    shutil.rmtree(folder / "tokenizer")
    model = load_model(folder)
    assert model.config.text.pad_token == "zero"  # the SD2 default without tokenizer/
    assert_same_weights(model, load_model(sd2v_folder))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": ["transformers", "X"]}))
    with pytest.raises(CheckpointError, match="text_encoder_2.*no pooled text embedding"):
        load_model(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="vae"):
        load_model(folder)


def test_failed_convert_leaves_nothing(sd1_folder, tmp_path, monkeypatch):
    import ldm.checkpoints.diffusers_folder as df

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(df, "save_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(sd1_folder, tmp_path / "out", layout="diffusers")
    assert list(tmp_path.iterdir()) == []
