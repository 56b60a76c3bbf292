"""`ldm train-lora`: the kohya-format file it writes (checked against diffusers' loader and the
LoRA formula ``W + alpha/rank * up @ down``), exact resumption, refusals of bad input, the
folder dataset, the toy concept (rings) and its detector, and the demo script's smoke run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from scriptload import load_script

from ldm.checkpoints import load_model, read_safetensors_header
from ldm.cli import main
from ldm.pipeline import Pipeline
from ldm.commands import train_lora as command
from ldm.toy.concept import (
    CONCEPT, HOLE, heldout_ring_combos, is_ring, render_ring, ring_prompts, ring_scene, write_picture_set,
)
from ldm.toy.world import PALETTE, SUPERSAMPLE, Scene, render, sample_scene
from ldm.training.lora import LoRANetwork, LoRASpec, load_network_state
from ldm.models.tokenizer import Tokenizer
from ldm.training.losses import NoiseSchedule, noised
from ldm.training.lora_data import CaptionedLatents, scan_folder
from ldm.training.lora_train import REG_TARGETS, LoRATask, Regularisation
from ldm.training.stage import SCHEDULES

TRAIN = ["--steps", "2", "--batch-size", "2", "--lr", "1e-2", "--save-dtype", "float32", "-q"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training and sampling at one thread: as fast on these tiny models, and steady on a busy machine."""


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """Four captioned pictures: three rings and one ordinary world picture."""
    folder = tmp_path_factory.mktemp("pictures") / "images"
    write_picture_set(folder, rings=3, others=1, seed=1)
    return folder


def _train(images: Path, base: Path, out: Path, *flags: str) -> int:
    return main(["train-lora", str(images), "--base", str(base), "--out", str(out), *TRAIN, *flags])


def _one_line_error(capsys, argv: list[str], *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], err
    return lines[0]


def _formula(down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The published LoRA delta, alpha/rank * up @ down, in the adapted weight's shape;
    a conv's down keeps the kernel, its up is 1x1 (kohya-ss's merge)."""
    if down.ndim == 2:
        product = up.double() @ down.double()
    else:
        product = (up.double().flatten(1) @ down.double().flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return (float(alpha) / down.shape[0] * product).float()


def _kohya_names(model: torch.nn.Module, prefix: str, blocks: tuple[str, ...]) -> set[str]:
    """kohya-ss's naming rule applied to a reference model: every Linear / Conv2d inside a
    module whose class name is in ``blocks``, as ``prefix_<dotted name with _>``."""
    names = set()
    for block_name, block in model.named_modules():
        if type(block).__name__ in blocks:
            for name, layer in block.named_modules():
                if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                    names.add(f"{prefix}_{block_name}.{name}".replace(".", "_"))
    return names


# --- the file: names, metadata, diffusers' loader ----------------------------------------------


@pytest.fixture(scope="module")
def unet_lora(pictures, sd1_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unet") / "lora.safetensors"
    assert _train(pictures, sd1_folder, out, "--conv-rank", "2", "--rank", "4", "--alpha", "3") == 0
    return out


def test_the_file_has_kohyas_names_and_metadata(unet_lora, sd1_folder):
    from reference import load_reference_pipeline

    tensors = load_file(str(unet_lora))
    _, meta = read_safetensors_header(unet_lora)
    unet = load_reference_pipeline(sd1_folder).unet
    attention = _kohya_names(unet, "lora_unet", ("Transformer2DModel",))
    conv = _kohya_names(unet, "lora_unet", ("ResnetBlock2D", "Downsample2D", "Upsample2D"))
    expected = attention | conv
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors} == expected
    assert any("_attn2_to_k" in n for n in attention) and any("_resnets_0_conv1" in n for n in conv)
    for name in expected:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        conv3 = down.ndim == 4 and down.shape[-1] == 3
        assert down.shape[0] == up.shape[1] == (2 if conv3 else 4)
        assert float(tensors[f"{name}.alpha"]) == (2.0 if conv3 else 3.0)  # --conv-alpha defaults to --conv-rank
        assert up.abs().max() > 0  # trained away from the zero init
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "3.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert meta["ss_steps"] == "2" and meta["ss_seed"] == "0" and meta["ss_num_train_images"] == "4"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert re.fullmatch("[0-9a-f]{10}", meta["ss_sd_model_hash"]) and meta["ss_sd_model_name"] == "model"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_network_train_unet_only"] == "True"
    assert set(json.loads(meta["ss_tag_frequency"])) == {"1_ring", "1_world"}
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_ring": {"n_repeats": 1, "img_count": 3},
                                                   "1_world": {"n_repeats": 1, "img_count": 1}}


def test_diffusers_loads_the_file_as_the_formula_says(unet_lora, sd1_folder):
    """diffusers' load_lora_weights + fuse gives W + alpha/rank * up @ down for every layer,
    and its U-Net with the LoRA computes what ldm's U-Net computed while training."""
    from reference import load_reference_pipeline

    tensors = load_file(str(unet_lora))
    pipe = load_reference_pipeline(sd1_folder)
    base = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    names = {f"lora_unet_{k[:-len('.weight')].replace('.', '_')}": k for k in base if k.endswith(".weight")}
    # Forward with the LoRA loaded (not fused) vs ldm's U-Net with the trained branches attached.
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 700])
    pipe.load_lora_weights(str(unet_lora))
    with torch.no_grad():
        reference = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    model = load_model(sd1_folder)
    layers = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    network = LoRANetwork(model.unet, None, LoRASpec(rank=4, alpha=3, conv_rank=2))
    load_network_state(network, tensors, str(unet_lora))
    with torch.no_grad():
        plain = model.unet(x, t, ctx)
        network.attach()
        ours = model.unet(x, t, ctx)
    assert (ours - reference).abs().max() < 1e-4
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does change the output
    ldm_pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="float32")
    ldm_pipe.load_lora(unet_lora)  # ldm's own loader reads the file the same way
    with torch.no_grad():
        assert (ldm_pipe.unet(x, t, ctx) - reference).abs().max() < 1e-4
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    worst = 0.0
    for name in layers:
        key = names[name]
        expected = base[key] + _formula(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                                        tensors[f"{name}.alpha"])
        worst = max(worst, float((fused[key] - expected).abs().max()))
        assert not torch.equal(fused[key], base[key]), name
    assert worst < 1e-6, worst


def test_text_encoder_part_matches_the_formula(pictures, sd1_folder, tmp_path):
    """With --train-text-encoder the file's lora_te_* entries name every attention / MLP linear
    of CLIP (kohya's names), and W + alpha/rank * up @ down reproduces what training computed.
    (diffusers with transformers 5 mis-loads kohya text-encoder entries; see DESIGN.md.)"""
    from reference import load_reference_pipeline

    out = tmp_path / "te.safetensors"
    assert _train(pictures, sd1_folder, out, "--train-text-encoder", "--rank", "2", "--te-alpha", "0.5") == 0
    tensors = load_file(str(out))
    te_names = {k.split(".")[0] for k in tensors if k.startswith("lora_te_")}
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {0.5, 2.0}
    assert all(float(tensors[f"{n}.alpha"]) == 0.5 for n in te_names)
    reference_te = load_reference_pipeline(sd1_folder).text_encoder
    # kohya-ss names the layers of transformers 4's CLIPTextModel, whose modules sat under
    # ``text_model.``; transformers 5 dropped that level from the module names.
    prefix = "lora_te" if hasattr(reference_te, "text_model") else "lora_te_text_model"
    assert te_names == _kohya_names(reference_te, prefix, ("CLIPAttention", "CLIPMLP"))
    assert any(n.endswith("self_attn_q_proj") for n in te_names) and any(n.endswith("mlp_fc2") for n in te_names)
    meta = read_safetensors_header(out)[1]
    assert meta["ss_network_train_unet_only"] == "False" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"text_encoder_alpha": "0.5"}

    model = load_model(sd1_folder)
    ids = torch.tensor([[49406, 320, 1615, 49407] + [49407] * 73])
    merged = load_model(sd1_folder).text_encoder
    state = merged.state_dict()
    for name in te_names:
        key = name[len("lora_te_"):]
        weight = next(k for k in state if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == key)
        state[weight] = state[weight] + _formula(tensors[f"{name}.lora_down.weight"],
                                                 tensors[f"{name}.lora_up.weight"], tensors[f"{name}.alpha"])
    merged.load_state_dict(state)
    network = LoRANetwork(model.unet, model.text_encoder, LoRASpec(rank=2, text_encoder=True, text_alpha=0.5))
    load_network_state(network, tensors, str(out))
    with torch.no_grad():
        plain = model.text_encoder(ids)
        network.attach()
        hooked = model.text_encoder(ids)
        expected = merged(ids)
    assert (hooked - expected).abs().max() < 1e-5
    assert (hooked - plain).abs().max() > 1e-4
    ldm_pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="float32")
    ldm_pipe.load_lora(out)  # ldm's own loader: the same text-encoder weights
    with torch.no_grad():
        assert (ldm_pipe.text_encoder(ids) - expected).abs().max() < 1e-5


def test_zero_init_leaves_the_model_as_it_was(sd1_folder):
    model = load_model(sd1_folder)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        before = model.unet(x, torch.tensor([500]), ctx)
        network = LoRANetwork(model.unet, model.text_encoder, LoRASpec(rank=3, conv_rank=2, text_encoder=True),
                              generator=gen).attach()
        during = model.unet(x, torch.tensor([500]), ctx)
        network.detach()
        after = model.unet(x, torch.tensor([500]), ctx)
    # A hooked GEGLU projection is called as a layer, not fused with its GELU (ldm.models.fused_linear):
    # the same products, rounded differently.
    assert (during - before).abs().max() <= 1e-6 * before.abs().max() and torch.equal(before, after)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in network.state_dict())
    kv = LoRANetwork(model.unet, None, LoRASpec(rank=2, layers=("attn2.to_k", "attn2.to_v")))
    names = [name for name, _ in kv.named_children()]
    blocks = [n for n, m in model.unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert sorted(names) == sorted(f"lora_unet_{b.replace('.', '_')}_attn2_{x}"
                                   for b in blocks for x in ("to_k", "to_v"))
    with pytest.raises(ValueError, match="no U-Net layer to adapt"):
        LoRANetwork(model.unet, None, LoRASpec(layers=("attn3.to_k",)))
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRASpec(rank=0)
    with pytest.raises(ValueError, match="conv_alpha needs conv_rank"):
        LoRASpec(conv_alpha=1.0)


# --- resuming ---------------------------------------------------------------------------------


def test_half_then_resume_equals_one_run_and_other_settings_are_refused(pictures, sd1_folder, tmp_path, capsys):
    whole, halves = tmp_path / "whole.safetensors", tmp_path / "halves.safetensors"
    four = ["--steps", "4"]
    assert _train(pictures, sd1_folder, whole, *four) == 0
    assert _train(pictures, sd1_folder, halves) == 0  # --steps 2 (TRAIN)
    first = load_file(str(halves))
    capsys.readouterr()
    assert _train(pictures, sd1_folder, halves, *four) == 0  # the same folder, continued to 4 steps
    a, b = load_file(str(whole)), load_file(str(halves))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(first[k], b[k]) for k in b)  # it did train on
    assert read_safetensors_header(halves)[1]["ss_steps"] == "4"
    assert "resuming at step 2/4" in capsys.readouterr().out

    line = _one_line_error(capsys, ["train-lora", str(pictures), "--base", str(sd1_folder), "--out", str(halves),
                                    *TRAIN, "--steps", "4", "--rank", "4", "--lr", "0.5"],
                           "holds a run with other settings", "--rank 8 -> 4", "--lr 0.01 -> 0.5")
    assert "another --workdir" in line
    _one_line_error(capsys, ["train-lora", str(pictures), "--base", str(sd1_folder), "--out", str(halves), *TRAIN],
                    "holds 4 steps, more than --steps 2")
    state = tmp_path / "elsewhere"
    state.mkdir()
    (state / "train-lora.pt").write_bytes(b"something else")
    _one_line_error(capsys, ["train-lora", str(pictures), "--base", str(sd1_folder), "--out", str(halves), *TRAIN,
                             "--workdir", str(state)], "train-lora.pt: not a train-lora checkpoint")
    assert all(torch.equal(b[k], v) for k, v in load_file(str(halves)).items())  # left as it was


# --- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must be refused before the model loads."""
    import ldm.training.lora_train as lora_train

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(lora_train, "load_model", refuse)


def _folder(tmp_path: Path, files: dict[str, bytes | Image.Image]) -> Path:
    folder = tmp_path / "set"
    folder.mkdir()
    for name, content in files.items():
        if isinstance(content, Image.Image):
            content.save(folder / name)
        else:
            (folder / name).write_bytes(content)
    return folder


def _picture() -> Image.Image:
    return Image.fromarray(render(Scene("circle", "red", "blue"), 64))


def test_bad_folders_are_one_line_naming_the_files(capsys, no_model, sd1_folder, tmp_path):
    out = str(tmp_path / "x.safetensors")
    base = ["--base", str(sd1_folder), "--out", out]
    _one_line_error(capsys, ["train-lora", str(tmp_path / "nope"), *base], "images folder not found", "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("a cat")
    _one_line_error(capsys, ["train-lora", str(empty), *base], "no pictures", ".png")
    folder = _folder(tmp_path, {"a.png": _picture(), "a.txt": b"a red circle", "b.png": _picture(),
                                "c.jpg": _picture().convert("RGB"), "d.png": _picture(), "d.txt": b"\n \n"})
    _one_line_error(capsys, ["train-lora", str(folder), *base],
                    "2 picture(s) without a caption file", "b.png, c.jpg", "1 empty caption file(s): d.txt")
    assert not Path(out).exists()


def test_unreadable_pictures_and_long_captions_are_listed(capsys, no_model, sd1_folder, tmp_path):
    folder = _folder(tmp_path, {"a.png": _picture(), "a.txt": b"a red circle", "bad.png": b"not a png",
                                "bad.txt": b"a thing"})
    out = str(tmp_path / "x.safetensors")
    _one_line_error(capsys, ["train-lora", str(folder), "--base", str(sd1_folder), "--out", out],
                    "1 picture(s) cannot be read as images: bad.png")
    (folder / "bad.png").unlink()
    (folder / "a.txt").write_text("red " * 80)
    _one_line_error(capsys, ["train-lora", str(folder), "--base", str(sd1_folder), "--out", out],
                    "1 caption(s) longer than the text encoder's 75-token window", "a.png")


def test_bad_flags_and_a_users_file_are_refused(capsys, no_model, pictures, sd1_folder, tmp_path):
    out = tmp_path / "mine.safetensors"
    base = ["train-lora", str(pictures), "--base", str(sd1_folder)]
    for flags, name in ((["--rank", "0"], "--rank"), (["--rank", "two"], "--rank"), (["--alpha", "-1"], "--alpha"),
                        (["--lr", "nan"], "--lr"), (["--resolution", "60"], "--resolution"),
                        (["--caption-dropout", "1"], "--caption-dropout"), (["--steps", "0"], "--steps"),
                        (["--lr-scheduler", "linear"], "--lr-scheduler")):
        _one_line_error(capsys, [*base, "--out", str(out), *flags], name)
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "x.ckpt")], "must end in .safetensors")
    _one_line_error(capsys, [*base, "--out", str(out), "--conv-alpha", "2"], "--conv-alpha needs --conv-rank")
    _one_line_error(capsys, [*base, "--out", str(out), "--te-alpha", "2"], "--te-alpha needs --train-text-encoder")
    out.write_bytes(b"my own work")
    _one_line_error(capsys, [*base, "--out", str(out)], "exists and was not written by ldm train-lora")
    assert out.read_bytes() == b"my own work"
    other = tmp_path / "other.safetensors"  # a real safetensors file, but not a train-lora output
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(other))
    before = other.read_bytes()
    _one_line_error(capsys, [*base, "--out", str(other)], "not written by ldm train-lora")
    assert other.read_bytes() == before
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    _one_line_error(capsys, [*base, "--out", str(folder)], "exists and is not a file")
    assert command.LR_SCHEDULERS == SCHEDULES  # the command's list is the library's
    assert command.REG_TARGETS == REG_TARGETS
    _one_line_error(capsys, [*base, "--out", str(out), "--reg-target", "base"], "--reg-target needs --reg-dir")
    _one_line_error(capsys, [*base, "--out", str(out), "--prior-loss-weight", "2"],
                    "--prior-loss-weight needs --reg-dir")
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "y.safetensors"), "--reg-dir", str(pictures)],
                    "is IMAGES_DIR itself")
    _one_line_error(capsys, [*base, "--out", str(tmp_path / "y.safetensors"), "--reg-dir", str(tmp_path / "no")],
                    "not found")


# --- regularisation pictures ---------------------------------------------------------------------


def _reg_task(sd1_folder: Path, target: str, weight: float, reg: list[bool]):
    model = load_model(sd1_folder)
    network = LoRANetwork(model.unet, model.text_encoder, LoRASpec(rank=2, text_encoder=True),
                          generator=torch.Generator().manual_seed(0)).attach()
    ids = Tokenizer("eos", 77)(["a red circle", "a blue square", ""])
    task = LoRATask(model.unet, model.text_encoder, NoiseSchedule(model.config), network, ids,
                    Regularisation(torch.tensor(reg), weight, target))
    return model, network, task


def test_output_preservation_trains_ordinary_pictures_towards_the_base_model(sd1_folder):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = {"latents": latents, "caption": torch.tensor([0, 1]), "picture": torch.tensor([0, 1])}
    model, network, task = _reg_task(sd1_folder, "base", 1.0, [True, True])
    # The LoRA starts as a no-op (its up weights are zero): the model is the base model,
    # so every regularisation picture's loss is 0 (to rounding: the base model's pass, without
    # gradients, runs the fused linear layers of ldm.models.fused_linear) ...
    assert float(task(batch, torch.Generator().manual_seed(3))[0].detach()) < 1e-10
    for _, branch, _ in network.branches():
        torch.nn.init.normal_(branch.lora_up.weight, std=0.05)
    # ... and once the LoRA changes the model, it is the mean squared distance to the
    # base model's own prediction for the same noisy latent, timestep and caption.
    loss = task(batch, torch.Generator().manual_seed(3))[0].detach()
    noisy, t, _ = noised(latents, NoiseSchedule(model.config), torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = model.text_encoder(task.ids[:2])
        adapted = model.unet(noisy, t, ctx)
        network.detach()
        base = model.unet(noisy, t, model.text_encoder(task.ids[:2]))
        network.attach()
    assert float(loss) > 0
    assert abs(float(loss) - float((adapted - base).square().mean())) < 1e-6 * max(1.0, float(loss))


def test_prior_loss_weight_weighs_the_regularisation_pictures(sd1_folder):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    batch = {"latents": latents, "caption": torch.tensor([0, 2]), "picture": torch.tensor([0, 1])}
    model, _, task = _reg_task(sd1_folder, "pictures", 3.0, [False, True])
    loss = task(batch, torch.Generator().manual_seed(5))[0].detach()
    noisy, t, target = noised(latents, NoiseSchedule(model.config), torch.Generator().manual_seed(5))
    with torch.no_grad():
        prediction = model.unet(noisy, t, model.text_encoder(task.ids[[0, 2]]))
    per = (prediction - target).square().mean(dim=(1, 2, 3))
    assert abs(float(loss) - float((per[0] + 3.0 * per[1]) / 2)) < 1e-6


def test_reg_dir_pictures_train_and_are_counted_apart(pictures, sd1_folder, tmp_path):
    reg = tmp_path / "reg"
    write_picture_set(tmp_path / "unused", rings=1, others=2, seed=4, reg_folder=reg)
    out = tmp_path / "reg.safetensors"
    assert _train(pictures, sd1_folder, out, "--reg-dir", str(reg), "--reg-target", "base",
                  "--prior-loss-weight", "0.5") == 0
    _, meta = read_safetensors_header(out)
    assert meta["ss_num_reg_images"] == "2" and meta["ss_num_train_images"] == str(3 * 1 + 1)
    assert meta["ss_reg_target"] == "base" and float(meta["ss_prior_loss_weight"]) == 0.5
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_world": {"n_repeats": 1, "img_count": 2}}


# --- the dataset ------------------------------------------------------------------------------


def test_samples_depend_only_on_their_index_and_each_epoch_shows_every_picture():
    moments = torch.randn(5, 8, 2, 2)
    whole = CaptionedLatents(moments, 0.5, seed=3, stream=2, first=0, count=15, caption_dropout=0.2)
    tail = CaptionedLatents(moments, 0.5, seed=3, stream=2, first=7, count=8, caption_dropout=0.2)
    for i in range(8):
        a, b = whole[7 + i], tail[i]
        assert torch.equal(a["latents"], b["latents"]) and int(a["caption"]) == int(b["caption"])
    no_drop = CaptionedLatents(moments, 0.5, seed=3, stream=2, first=0, count=15)
    for epoch in range(3):
        shown = [int(no_drop[5 * epoch + k]["caption"]) for k in range(5)]
        assert sorted(shown) == list(range(5))
    dropped = [int(whole[i]["caption"]) == 5 for i in range(15)]
    assert 0 < sum(dropped) < 15
    repeated = CaptionedLatents(moments, 0.5, seed=3, stream=2, first=0, count=14, repeats=[3, 1, 1, 1, 1])
    for epoch in range(2):
        shown = sorted(int(repeated[7 * epoch + k]["caption"]) for k in range(7))
        assert shown == [0, 0, 0, 1, 2, 3, 4]
    sample = no_drop[0]
    j = int(sample["caption"])
    mean = moments[j, :4] * 0.5
    std = torch.exp(0.5 * moments[j, 4:].clamp(-30, 20)) * 0.5
    assert ((sample["latents"] - mean).abs() < 6 * std).all()  # a posterior draw, scaled


# --- the concept ------------------------------------------------------------------------------


def _ring_drawn_at_once(scene: Scene, size: int = 64) -> np.ndarray:
    """A ring drawn directly: the outer disc in the colour, the hole in the background colour,
    at the world's supersampling, box-filtered down (what the world's renderer does)."""
    side = size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.x * side, scene.y * side, scene.size * side
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=PALETTE[scene.color])
    h = r * HOLE
    draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=PALETTE[scene.background])
    return np.asarray(image.reduce(SUPERSAMPLE))


def test_rings_are_the_worlds_circles_with_a_hole_and_the_detector_tells_them():
    rng = np.random.default_rng(0)
    rings = [ring_scene(rng) for _ in range(40)]
    for scene in rings[:10]:
        diff = np.abs(render_ring(scene).astype(int) - _ring_drawn_at_once(scene).astype(int))
        assert diff.max() <= 2, diff.max()
    assert all(s.kind == CONCEPT and (s.color, s.background) not in heldout_ring_combos() for s in rings)
    others = [sample_scene(rng) for _ in range(150)]
    assert all(is_ring(render_ring(s)) for s in rings)
    assert not any(is_ring(render(s)) for s in others)
    assert len({s.kind for s in others}) == 5
    prompts = ring_prompts(28)
    assert all(CONCEPT in p.prompt and (p.scene.color, p.scene.background) in heldout_ring_combos()
               for p in prompts)
    assert {p.wording for p in prompts} == {"train", "heldout"}
    assert len({(p.scene.color, p.scene.background) for p in prompts}) == 14


def test_the_picture_set_is_captioned_pictures_in_kohyas_layout(tmp_path):
    folder = tmp_path / "set"
    paths = write_picture_set(folder, rings=2, others=2, seed=0, ring_repeats=5)
    assert [str(p.relative_to(folder)) for p in paths] == ["5_ring/0000.png", "5_ring/0001.png",
                                                           "1_world/0000.png", "1_world/0001.png"]
    captions = [p.with_suffix(".txt").read_text().strip() for p in paths]
    assert all(CONCEPT in c for c in captions[:2]) and not any(CONCEPT in c for c in captions[2:])
    assert all(is_ring(np.asarray(Image.open(p))) for p in paths[:2])
    (folder / "notes").mkdir()  # not <repeats>_<name>: not read
    _picture().save(folder / "notes" / "x.png")
    _picture().save(folder / "top.png")
    (folder / "top.txt").write_text("a red circle on a blue background")
    examples = scan_folder(folder)
    assert [(str(e.image.relative_to(folder)), e.repeats) for e in examples] == [
        ("top.png", 1), ("1_world/0000.png", 1), ("1_world/0001.png", 1), ("5_ring/0000.png", 5),
        ("5_ring/0001.png", 5)]
    assert examples[0].caption == "a red circle on a blue background"


# --- the demo script --------------------------------------------------------------------------


def test_eval_lora_smoke_run(tmp_path):
    eval_lora = load_script("eval_lora")
    assert eval_lora.main(["--smoke", "--workdir", str(tmp_path), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "eval_lora.json").read_text())
    assert report["training"]["steps"] == 2 and Path(report["lora"]).is_file()
    assert set(report["verdict"]) >= {"before_ok", "after_ok", "kept_ok"}
    assert (tmp_path / "eval_lora.md").read_text().startswith("## Teaching the toy model")
    assert Image.open(report["strip"]).size[0] > 0
