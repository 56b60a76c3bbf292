"""scripts/eval_toy.py and scripts/demo.py on a tiny random checkpoint (structure only:
an untrained model's accuracies mean nothing)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoints import LoadedModel, load_model, save_model
from ldm.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ldm.models.text import TextEncoder
from ldm.models.tokenizer import Tokenizer
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.toy.world import prompt_to_attributes

ROOT = Path(__file__).resolve().parents[1]
THREADS_BEFORE = torch.get_num_threads()

# The toy model's shape (64 px pictures, 8x8x4 latents) at a fraction of its width.
TINY = ModelConfig(
    family="toy",
    unet=UNetConfig(sample_size=8, block_out_channels=(16, 32),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    layers_per_block=1, num_attention_heads=(1, 2), cross_attention_dim=32, norm_num_groups=8),
    vae=VAEConfig(sample_size=64, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=8,
                  scaling_factor=1.0),
    text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
)


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def eval_toy():
    return _load_script("eval_toy")


@pytest.fixture(scope="module")
def demo():
    return _load_script("demo")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight toy-shaped model in the original single-file layout."""
    torch.manual_seed(0)
    text = TINY.text
    model = LoadedModel(TINY, UNet(TINY.unet), AutoencoderKL(TINY.vae), TextEncoder(text),
                        Tokenizer(text.pad_token, text.max_position_embeddings), "tiny", "original")
    path = tmp_path_factory.mktemp("tiny") / "tiny-toy.safetensors"
    save_model(model, path, layout="original")
    assert load_model(path).layout == "original"
    return path


@pytest.fixture(scope="module")
def run(eval_toy, tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    log: list[str] = []
    report = eval_toy.evaluate(tiny_checkpoint, n=4, steps=2, scales=(1.0, 3.0, 7.5), negative_seeds=2,
                               batch_size=3, grid_prompts=eval_toy.GRID_PROMPTS[:5], out=out,
                               grid=out / "sub" / "grid.png", log=log.append)
    return report, out, log


def _check_table(table: dict, count: int, cats: int) -> None:
    assert set(table) <= {"kind", "hat", "color", "background", "hat_color", "all"}
    assert {"kind", "color", "background", "all"} <= set(table)
    for name, entry in table.items():
        assert set(entry) == {"accuracy", "correct", "count"}
        assert 0 <= entry["accuracy"] <= 1
        assert 0 <= entry["correct"] <= entry["count"]
        assert entry["accuracy"] == pytest.approx(entry["correct"] / entry["count"])
    for name in ("kind", "color", "background", "all"):
        assert table[name]["count"] == count
    if cats:
        assert table["hat"]["count"] == cats
    assert table.get("hat_color", {"count": 0})["count"] <= cats


def test_report_structure(run):
    report, _, log = run
    assert set(report) >= {"model", "settings", "attributes", "guidance", "negative", "images", "grid", "seconds"}
    assert report["settings"]["n"] == 4 and report["settings"]["steps"] == 2
    assert report["settings"]["size"] == 64

    images = report["images"]
    assert len(images) == 4
    assert [im["wording"] for im in images] == ["train", "train", "heldout", "heldout"]
    assert [im["seed"] for im in images] == [0, 1, 2, 3]
    for im in images:
        assert im["attributes"] == prompt_to_attributes(im["prompt"])
        assert set(im["scores"]) == set(im["attributes"])  # every stated attribute is scored
    # Both wordings state the same combinations.
    combo = [tuple(im["attributes"][k] for k in ("kind", "color", "background")) for im in images]
    assert combo[:2] == combo[2:]

    cats = sum(im["attributes"]["kind"] == "cat" for im in images)
    attrs = report["attributes"]
    _check_table(attrs["overall"], 4, cats)
    _check_table(attrs["train_wording"], 2, cats // 2)
    _check_table(attrs["heldout_wording"], 2, cats // 2)
    _check_table(attrs["vae_round_trip"], 4, cats)

    assert [g["scale"] for g in report["guidance"]] == [1.0, 3.0, 7.5]
    for g in report["guidance"]:
        _check_table(g["attributes"], 4, cats)
    assert report["guidance"][2]["attributes"] == attrs["overall"]  # 7.5 is the main run

    assert [(t["prompt"], t["negative_prompt"]) for t in report["negative"]] == [
        ("a cat", "red hat"), ("a cat wearing a hat", "red hat"), ("a circle", "red"),
        ("a square", "blue background")]
    for test in report["negative"]:
        for key in ("without", "with"):
            entry = test[key]
            assert entry["count"] == 2 and 0 <= entry["hits"] <= 2
            assert entry["fraction"] == pytest.approx(entry["hits"] / 2)
            assert set(entry["rates"]) == set(test["target"])
            assert all(0 <= r <= 1 for r in entry["rates"].values())

    assert report["seconds"]["total"] > 0
    assert torch.get_num_threads() == THREADS_BEFORE  # evaluate() gives the setting back
    assert any("held-out prompts, guidance 7.5" in line for line in log)


def test_files(run):
    report, out, _ = run
    saved = json.loads((out / "eval_toy.json").read_text())
    assert saved["attributes"] == json.loads(json.dumps(report["attributes"]))
    md = (out / "eval_toy.md").read_text()
    assert "| attribute | training wording | held-out wording | all prompts | VAE round trip" in md
    assert "| guidance |" in md and "| 7.5 |" in md
    assert "| a circle | red | red circle |" in md

    grid = Image.open(out / "sub" / "grid.png")
    assert not (out / "grid.png").exists()  # --grid overrides the default place
    assert grid.width == 4 * 128 and grid.height > 2 * 128  # 5 pictures: 2 rows of 4
    assert report["grid"]["prompts"] == list(report["grid"]["prompts"])[:5]
    assert len(report["grid"]["scores"]) == 5


def test_batching_does_not_change_pictures(eval_toy, tiny_checkpoint):
    pipe = eval_toy.load_pipeline(tiny_checkpoint)
    prompts, seeds = ["a red circle on a blue background", "a cat wearing a hat", "a star"], [5, 6, 7]
    one = eval_toy.render(pipe, prompts, seeds, steps=2, batch_size=1, log=lambda _: None)
    three = eval_toy.render(pipe, prompts, seeds, steps=2, batch_size=3, log=lambda _: None)
    assert one.dtype == np.uint8 and one.shape == (3, 64, 64, 3)
    assert np.abs(one.astype(int) - three.astype(int)).max() <= 1


def test_caption_grid_wraps_long_captions(eval_toy):
    images = [np.full((64, 64, 3), 200, np.uint8)] * 3
    short = eval_toy.caption_grid(images, ["a cat"] * 3, columns=4)
    long = eval_toy.caption_grid(images, [eval_toy.GRID_PROMPTS[1]] * 3, columns=4)
    assert short.width == long.width == 3 * 128
    assert long.height > short.height > 128


def test_grid_prompts_are_in_the_grammar(eval_toy):
    assert len(eval_toy.GRID_PROMPTS) == 12
    for prompt in eval_toy.GRID_PROMPTS:
        attrs = prompt_to_attributes(prompt)
        assert "kind" in attrs, prompt
    assert prompt_to_attributes(eval_toy.GRID_PROMPTS[1]) == {
        "kind": "cat", "color": "black", "hat": True, "hat_color": "red", "background": "yellow"}


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()  # the demo sets it for its process
    yield
    torch.set_num_threads(before)


def test_demo_writes_pictures(demo, tiny_checkpoint, tmp_path, capsys, keep_threads):
    assert demo.main(["--model", str(tiny_checkpoint), "--out", str(tmp_path), "--steps", "2"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files[0] == "01-a-cat-wearing-a-hat.png" and "grid.png" in files
    assert len(files) == len(demo.PROMPTS) + 1
    assert "01-a-cat-wearing-a-hat.png" in capsys.readouterr().out
    from ldm.pngmeta import read_parameters

    params = read_parameters(tmp_path / files[0])
    assert params.prompt == "a cat wearing a hat" and params.seed == demo.SEED and params.steps == 2
    assert params.sampler == demo.UNDISTILLED[0] and params.guidance_embedding is None


def test_demo_samples_a_distilled_model_in_four_lcm_steps(demo, tmp_path, keep_threads):
    # The shipped demo model is guidance-distilled: lcm, 4 steps, its scale into the embedding.
    torch.manual_seed(0)
    config = dataclasses.replace(TINY, unet=dataclasses.replace(TINY.unet, time_cond_proj_dim=8))
    text = config.text
    model = LoadedModel(config, UNet(config.unet), AutoencoderKL(config.vae), TextEncoder(text),
                        Tokenizer(text.pad_token, text.max_position_embeddings), "tiny", "original")
    path = tmp_path / "tiny-lcm.safetensors"
    save_model(model, path, layout="original")
    assert demo.main(["--model", str(path), "--out", str(tmp_path / "out")]) == 0
    from ldm.pngmeta import read_parameters

    params = read_parameters(tmp_path / "out" / "01-a-cat-wearing-a-hat.png")
    sampler, steps, guidance = demo.DISTILLED
    assert (params.sampler, params.steps, params.guidance_embedding) == (sampler, steps, guidance) == ("lcm", 4, 4.5)


def test_demo_says_when_the_weights_are_missing(demo, tmp_path, monkeypatch, capsys, keep_threads):
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path / "nothing.safetensors"))
    assert demo.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing" in err and "nothing.safetensors" in err
    advice = re.search(r"`python scripts/train_toy.py([^`]*)`", err)
    assert advice, err
    _load_script("train_toy").parse_args(advice.group(1).split())  # the advised command parses
    assert not (tmp_path / "out").exists()
