"""A VAE file in place of the model's (``vae=`` / ``load_vae`` / ``--vae``), and float16 with a
VAE that overflows it (``force_upcast``).

The VAE under test is a second tiny SDXL VAE (the same architecture as the tiny SDXL model's,
other random weights), saved by diffusers as (a) a VAE folder with ``force_upcast: false`` as
sdxl-vae-fp16-fix has it, (b) its ``diffusion_pytorch_model.safetensors`` alone, and (c) the
original layout the web UI's VAE files use, certified by diffusers' own converter
(``convert_ldm_vae_checkpoint`` gives the diffusers tensors back exactly). Each must load
the source tensors bit for bit and make the images the same weights make when they are the
model folder's own ``vae/``; decoding matches diffusers' AutoencoderKL.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import ldm.pipeline as pipeline_module
from ldm.checkpoints import CheckpointError
from ldm.checkpoints.keymap import add_prefix, apply_mapping
from ldm.checkpoints.keymap_vae import vae_internal_to_original
from ldm.checkpoints.vae_file import find_vae, open_vae, vae_ref
from ldm.cli import main
from ldm.config import VAEConfig
from ldm.foreign_config import vae_to_diffusers
from ldm.pipeline import Pipeline, vae_upcast_dtype
from ldm.pngmeta import GenerationParams, check_round_trip, format_parameters, parse_parameters, read_text
from reference import _VAE, _randomize
from reference_sdxl import SDXL_VAE_TINY

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "diffusion_pytorch_model.safetensors"
CALL = dict(steps=2, seed=5, width=64, height=64, guidance_scale=5.0, progress=False)


def _diffusers_vae(config: dict, seed: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config).eval()
    _randomize(vae, seed)
    return vae


def _original_state(state: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """``state`` (diffusers names) in the original layout, checked against diffusers' converter:
    converting it back gives every diffusers tensor, equal."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    original = {k: v.contiguous() for k, v in apply_mapping(state, vae_internal_to_original(config)).items()}
    back = convert_ldm_vae_checkpoint(add_prefix(original, "first_stage_model."), vae_to_diffusers(config))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    return original


@pytest.fixture(scope="module")
def xl(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder, device="cpu")


@pytest.fixture(scope="module")
def vae_files(sdxl_folder, tmp_path_factory):
    """The other VAE (diffusers module and state dict), its three forms, and the model folder
    with it as its own vae/ (the same weights loaded normally)."""
    root = tmp_path_factory.mktemp("vae")
    source = _diffusers_vae(SDXL_VAE_TINY, seed=77)
    state = {k: v.detach().clone() for k, v in source.state_dict().items()}
    fixed = root / "xl-vae-fp16-fix"
    source.save_pretrained(fixed)
    config = json.loads((fixed / "config.json").read_text())
    assert config["force_upcast"] is True  # diffusers' default: the fixed VAE's release says false
    (fixed / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    single = root / "xl-vae.safetensors"
    shutil.copyfile(fixed / WEIGHTS, single)
    original = root / "xl-vae-original.safetensors"
    save_file(_original_state(state, Pipeline.from_pretrained(sdxl_folder, device="cpu").config.vae), original)
    model = root / "model-with-vae"
    shutil.copytree(sdxl_folder, model, ignore=shutil.ignore_patterns("vae"))
    source.save_pretrained(model / "vae")
    return dict(source=source, state=state, folder=fixed, single=single, original=original, model=model)


@pytest.fixture(scope="module")
def expected(vae_files):
    """The model with the other VAE as its own vae/: what vae= must give."""
    return Pipeline.from_pretrained(vae_files["model"], device="cpu")


@pytest.mark.parametrize("form, layout", [("folder", "diffusers"), ("single", "diffusers"), ("original", "original")])
def test_each_form_loads_the_source_weights_and_makes_the_same_images(sdxl_folder, vae_files, expected, xl, form,
                                                                      layout):
    path = vae_files[form]
    assert open_vae(path).layout == layout
    pipe = Pipeline.from_pretrained(sdxl_folder, device="cpu", vae=path)
    assert pipe.vae_file == path
    loaded = pipe.vae.state_dict()
    assert loaded.keys() == vae_files["state"].keys()
    assert all(torch.equal(loaded[k], v) for k, v in vae_files["state"].items())
    # The model's scaling factor and the folder's force_upcast (False), else the model's (True).
    assert pipe.config.vae.scaling_factor == 0.13025
    assert pipe.config.vae.force_upcast is (form != "folder")
    images = pipe.generate("a cat", **CALL, output="np").images
    assert np.array_equal(images, expected.generate("a cat", **CALL, output="np").images)
    assert not np.allclose(images, xl.generate("a cat", **CALL, output="np").images, atol=1e-2)  # it was swapped
    # Decoding is diffusers' AutoencoderKL's.
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae_files["source"].decode(z / 0.13025).sample
    ours = pipe.decode(z, "np")[0]
    assert np.abs(ours - (reference[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)).max() < 1e-5


def test_the_original_layout_loads_with_its_prefix_and_training_leftovers(xl, vae_files, tmp_path, caplog):
    original = load_file(vae_files["original"])
    leftovers = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.ones(2, 3),
                 "model_ema.decay": torch.tensor(0.999), "model_ema.num_updates": torch.tensor(10)}
    path = tmp_path / "a1111.vae.pt"
    torch.save({"state_dict": {**add_prefix(original, "first_stage_model."), **leftovers}}, path)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*refusing to load a pickle"):
        xl.load_vae(path)
    pipe = Pipeline.from_pretrained(xl.model.source, device="cpu", allow_pickle=True)
    with caplog.at_level(logging.INFO, logger="ldm"):
        pipe.load_vae(path)
    assert f"ignored 4 VAE training key(s) in {path}" in caplog.text
    loaded = pipe.vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vae_files["state"].items())


def test_force_upcast_can_be_given(xl, vae_files):
    pipe = Pipeline.from_pretrained(xl.model.source, device="cpu")
    pipe.load_vae(vae_files["single"], force_upcast=False)
    assert pipe.config.vae.force_upcast is False and pipe.model.config.vae.force_upcast is False
    pipe.load_vae(vae_files["folder"], force_upcast=True)
    assert pipe.config.vae.force_upcast is True
    with pytest.raises(TypeError, match="force_upcast must be True, False or None"):
        pipe.load_vae(vae_files["folder"], force_upcast="no")


# --- refusals -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide_vae(tmp_path_factory):
    """A VAE of another architecture (wider second level, two resnets per level) in all three forms."""
    root = tmp_path_factory.mktemp("wide")
    spec = {**SDXL_VAE_TINY, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 2}
    vae = _diffusers_vae(spec, seed=3)
    vae.save_pretrained(root / "folder")
    config = VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8)
    save_file(_original_state(vae.state_dict(), config), root / "original.safetensors")
    return {"folder": root / "folder", "single": root / "folder" / WEIGHTS, "original": root / "original.safetensors"}


@pytest.mark.parametrize("form", ["folder", "single", "original"])
def test_a_vae_of_another_architecture_is_refused_naming_both(xl, wide_vae, form):
    before = {k: v.clone() for k, v in xl.vae.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        xl.load_vae(wide_vae[form])
    message = str(err.value)
    assert message.startswith(f"{wide_vae[form]}: a VAE of another architecture than this sdxl model's")
    assert "block_out_channels: the VAE's (16, 32, 32, 32), the model's (16, 16, 32, 32)" in message
    assert "layers_per_block: the VAE's 2, the model's 1" in message
    after = xl.vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and xl.vae_file is None


def test_the_sd1_vae_fits_the_sdxl_model_and_keeps_its_scaling_factor(sd1_folder, sdxl_folder, caplog):
    # Real SD1 and SDXL VAEs share their architecture (so do the tiny references); the latents
    # are the U-Net's, scaled by the model's factor, whatever the VAE's config says.
    assert json.loads((sd1_folder / "vae" / "config.json").read_text())["block_out_channels"] == list(
        _VAE["block_out_channels"])
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe = Pipeline.from_pretrained(sdxl_folder, device="cpu", vae=sd1_folder / "vae")
    assert "says scaling_factor 0.18215, the model's is 0.13025; keeping the model's" in caplog.text
    assert pipe.config.vae.scaling_factor == 0.13025


def test_files_that_are_not_a_vae_are_refused_with_the_reason(xl, vae_files, sdxl_folder, tmp_path):
    state = dict(vae_files["state"])
    original = load_file(vae_files["original"])
    cases = {
        "missing.safetensors": (FileNotFoundError, "VAE not found: "),
        "nan.safetensors": ({**state, "decoder.conv_in.bias": torch.full((32,), float("nan"))},
                            r"1 weight\(s\) hold NaN or infinite values.*decoder.conv_in.bias"),
        "mixed.safetensors": ({**state, "encoder.down.0.block.0.norm1.weight": torch.ones(16)},
                              "mixes the VAE's original key names"),
        "lora.safetensors": ({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, r"not a VAE file \(keys: lora_unet"),
        "extra.safetensors": ({**original, "mystery.weight": torch.ones(2)}, "1 unexpected: mystery.weight"),
        "short.safetensors": ({k: v for k, v in state.items() if k != "post_quant_conv.bias"},
                              "1 missing: post_quant_conv.bias"),
        "ints.safetensors": ({**state, "quant_conv.bias": torch.ones(8, dtype=torch.int32)},
                             r"stored as integers or bool.*quant_conv.bias \(int32\)"),
        "whole.safetensors": ({**add_prefix(original, "first_stage_model."), "model.diffusion_model.out.0.bias":
                               torch.ones(2)}, "a whole checkpoint .* not a VAE file"),
    }
    before = {k: v.clone() for k, v in xl.vae.state_dict().items()}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, dict):
            save_file(content, path)
        error = content if isinstance(content, type) else CheckpointError
        with pytest.raises(error) as err:
            xl.load_vae(path)
        assert str(path) in str(err.value) and re.search(message, str(err.value)), (name, err.value)
    folder = tmp_path / "taesd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(CheckpointError, match="holds a AutoencoderTiny, not an AutoencoderKL"):
        xl.load_vae(folder)
    (folder / "config.json").write_text(json.dumps(vae_to_diffusers(xl.config.vae)))
    with pytest.raises(FileNotFoundError, match=f"{folder}: no VAE weights found"):
        xl.load_vae(folder)
    with pytest.raises(CheckpointError, match="a whole diffusers model folder, not a VAE; pass its vae/"):
        xl.load_vae(sdxl_folder)
    with pytest.raises(TypeError, match="vae must be a path"):
        Pipeline.from_pretrained(sdxl_folder, device="cpu", vae=3)
    after = xl.vae.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-applied


# --- float16 ------------------------------------------------------------------------------------------


def test_upcast_dtype_is_bfloat16_only_where_native():
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert vae_upcast_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert vae_upcast_dtype(torch.device("meta")) == torch.float32


def _decoder_dtypes(pipe: Pipeline) -> list[torch.dtype]:
    """The dtypes the VAE's decoder and encoder are run in, recorded from now on."""
    seen: list[torch.dtype] = []
    for part in (pipe.vae.decoder, pipe.vae.encoder):
        part.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen


@pytest.mark.parametrize("upcast", [torch.float32, torch.bfloat16])
def test_float16_with_force_upcast_decodes_upcast_once_logged(sdxl_folder, xl, monkeypatch, caplog, upcast):
    monkeypatch.setattr(pipeline_module, "vae_upcast_dtype", lambda device: upcast)
    pipe = Pipeline.from_pretrained(sdxl_folder, device="cpu", dtype=torch.float16)
    assert pipe.config.vae.force_upcast and pipe.vae.dtype == torch.float16
    seen = _decoder_dtypes(pipe)
    weights = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.INFO, logger="ldm"):
        images = pipe.decode(z, "np")
        pipe.decode(z[:1], "np")
    name = str(upcast).removeprefix("torch.")
    assert caplog.text.count(f"VAE: encoding and decoding in {name}, not float16") == 1
    assert seen == [upcast] * 3 and pipe.vae.dtype == torch.float16
    # The float16 weights are as they were (float16 -> bfloat16 -> float16 would round them).
    after = pipe.vae.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in weights.items())
    # float32: the float32 pipeline's decode but for the weights' float16 rounding (measured
    # 9.5e-4), and that of the same rounded weights in float32 to float32 rounding (1.2e-6).
    tolerance = 1e-3 if upcast == torch.float32 else 3e-2  # bfloat16: measured 2.0e-2
    assert np.abs(images - xl.decode(z, "np")).max() < tolerance
    if upcast == torch.float32:
        rounded = copy.deepcopy(pipe.vae).float()
        with torch.no_grad():
            same = (rounded.decode(z / 0.13025) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert np.abs(images - same).max() < 1e-5
    # Encoding for an edit too.
    seen.clear()
    pipe.generate("a cat", image=np.full((64, 64, 3), 0.5, np.float32), strength=0.5, steps=2, seed=1,
                  progress=False, output="latent")
    assert seen == [upcast]


def test_float16_without_force_upcast_stays_float16_with_the_nan_retry(sdxl_folder, vae_files, caplog):
    pipe = Pipeline.from_pretrained(sdxl_folder, device="cpu", dtype=torch.float16, vae=vae_files["folder"])
    assert pipe.config.vae.force_upcast is False and pipe.vae.dtype == torch.float16
    seen = _decoder_dtypes(pipe)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.INFO, logger="ldm"):
        pipe.decode(z, "np")
    assert seen == [torch.float16] and "encoding and decoding in" not in caplog.text
    # Latents past float16's range: NaN in float16, decoded again in float32 (the safety net).
    seen.clear()
    huge = torch.full((1, 4, 8, 8), 1e4)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        image = pipe.decode(huge, "np")
    assert "VAE decode in torch.float16 gave NaN/inf; decoding again in float32" in caplog.text
    assert seen == [torch.float16, torch.float32] and pipe.vae.dtype == torch.float16
    assert np.isfinite(image).all()


# --- the PNG text and the command line ----------------------------------------------------------------

# As the web UI v1.6 writes it (modules/processing.py: "VAE hash" / "VAE" after "Model").
A1111_TEXT = ("a castle\nSteps: 30, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 1024x1024, Model hash: 31e35c80fc, "
              "Model: sd_xl_base_1.0, VAE hash: 235745af8d, VAE: sdxl_vae.safetensors, Version: v1.6.0")


def test_the_web_uis_vae_keys_read_and_write_back():
    p = parse_parameters(A1111_TEXT)
    assert (p.vae, p.vae_hash, p.extra) == ("sdxl_vae.safetensors", "235745af8d", {"Version": "v1.6.0"})
    assert format_parameters(p) == A1111_TEXT
    named = GenerationParams(prompt="a", steps=2, seed=1, vae="my, vae.pt", vae_hash="0123456789")
    assert 'VAE hash: 0123456789, VAE: "my, vae.pt"' in format_parameters(named)
    check_round_trip(named)


def test_vae_ref_is_the_web_uis_name_and_hash(vae_files):
    ref = vae_ref(vae_files["single"])
    assert ref.name == "xl-vae.safetensors"
    assert ref.hash == hashlib.sha256(vae_files["single"].read_bytes()).hexdigest()[:10]
    assert find_vae(None, ref.hash, [vae_files["single"].parent]) == vae_files["single"]


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_with_vae_records_it_and_from_finds_it(sdxl_folder, vae_files, expected, tmp_path, monkeypatch,
                                                        capsys):
    models = tmp_path / "models"
    (models / "VAE").mkdir(parents=True)
    (models / "base").symlink_to(sdxl_folder, target_is_directory=True)
    vae = models / "VAE" / "xl-vae.safetensors"
    shutil.copyfile(vae_files["single"], vae)
    run = ["--size", "64x64", "--steps", "2", "--seed", "5", "--guidance", "5", "--device", "cpu"]
    assert main(["generate", "a cat", "--model", str(models / "base"), "--vae", str(vae), *run,
                 "-o", str(tmp_path / "out")]) == 0
    (made,) = (tmp_path / "out").glob("*.png")
    digest = hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert f"Model: base, VAE hash: {digest}, VAE: xl-vae.safetensors" in read_text(made)
    assert np.array_equal(_pixels(made), np.asarray(expected("a cat", **CALL)[0]))

    # --from finds the model and the VAE by name (the VAE in a VAE/ folder, as the web UI keeps them).
    monkeypatch.setenv("LDM_MODEL_PATH", str(models))
    assert main(["generate", "--from", str(made), "--device", "cpu", "-o", str(tmp_path / "again")]) == 0
    (again,) = (tmp_path / "again").glob("*.png")
    assert np.array_equal(_pixels(again), _pixels(made)) and read_text(again) == read_text(made)

    # Not to be found: said in one line, with the flag that gives it.
    vae.unlink()
    capsys.readouterr()
    assert main(["generate", "--from", str(made), "--device", "cpu", "-o", str(tmp_path / "lost")]) == 2
    err = capsys.readouterr().err
    assert f"VAE 'xl-vae.safetensors' [{digest}] not found in " in err and "pass --vae PATH" in err
    assert err.count("\n") == 1 and not (tmp_path / "lost").exists()
    assert main(["generate", "a cat", "--model", str(models / "base"), "--vae", str(vae), *run,
                 "-o", str(tmp_path / "lost")]) == 2
    assert f"VAE not found: {vae}" in capsys.readouterr().err


def test_batch_with_vae_names_it_in_every_image(sdxl_folder, vae_files, expected, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), "--model", str(sdxl_folder), "--vae", str(vae_files["folder"]), "--size",
                 "64x64", "--steps", "2", "--seed", "5", "--guidance", "5", "--device", "cpu", "-o", str(out)]) == 0
    (made,) = out.glob("*.png")
    ref = vae_ref(vae_files["folder"])
    assert f"VAE hash: {ref.hash}, VAE: xl-vae-fp16-fix" in read_text(made)
    # The folder's VAE runs as the model folder's own vae/ does (float32 here: force_upcast aside).
    assert np.array_equal(_pixels(made), np.asarray(expected("a cat", **CALL)[0]))
