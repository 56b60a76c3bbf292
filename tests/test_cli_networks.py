"""LoRA tags, embeddings and clip skip through `ldm generate` and `ldm batch`: recorded in
the PNG text as the web UI writes them, reapplied by `--from`, bad ones refused plainly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.cli import main
from ldm.pngmeta import read_parameters, read_text
from test_lora_formats import ATTN, _addnet_hash, factors, kohya_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = f"{ATTN}.attn2.to_k"
TOKEN = "zxqstyle"


def _write_lora(path, seed: int, sd1_folder) -> None:
    from ldm import Pipeline

    shape = Pipeline.from_pretrained(sd1_folder, device="cpu").unet.get_submodule(LAYER).weight.shape
    save_file(kohya_tensors({"lora_unet_" + LAYER.replace(".", "_"): factors(shape, seed=seed, std=0.6)}), path)


@pytest.fixture(scope="module")
def networks(tmp_path_factory, sd1_folder):
    root = tmp_path_factory.mktemp("networks")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    _write_lora(root / "loras" / "ink.safetensors", 0, sd1_folder)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    save_file({"emb_params": vectors}, root / "embeddings" / f"{TOKEN}.safetensors")
    return root


def _common(sd1_folder, networks, out):
    return ["--model", str(sd1_folder), "--device", "cpu", "--steps", "2", "--sampler", "euler",
            "--lora-dir", str(networks / "loras"), "--embedding-dir", str(networks / "embeddings"), "-o", str(out)]


def test_generate_records_loras_embeddings_and_clip_skip_and_from_reapplies_them(sd1_folder, networks, tmp_path,
                                                                                  caplog, capsys):
    out = tmp_path / "out"
    prompt = f"a cat <lora:ink:0.8>, ({TOKEN}:1.2)"
    assert main(["generate", prompt, "--negative", "blurry", "--seed", "4", "--clip-skip", "2",
                 *_common(sd1_folder, networks, out)]) == 0
    (made,) = out.glob("*.png")
    text = read_text(made)
    lora_hash = _addnet_hash(networks / "loras" / "ink.safetensors")[:12]
    assert f'Lora hashes: "ink: {lora_hash}"' in text
    assert "TI hashes: \"zxqstyle: " in text and "Clip skip: 2" in text
    assert text.startswith(prompt + "\n")  # the tags stay in the prompt, as the web UI keeps them
    p = read_parameters(made)
    assert p.clip_skip == 2

    # --from makes the same picture (LoRA, embedding and clip skip all reapplied) ...
    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), *_common(sd1_folder, networks, again)]) == 0
    (remade,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(remade)))
    assert read_text(remade) == text
    # ... and without the clip skip it is another picture.
    other = tmp_path / "other"
    assert main(["generate", "--from", str(made), "--clip-skip", "1", *_common(sd1_folder, networks, other)]) == 0
    (changed,) = other.glob("*.png")
    assert not np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(changed)))
    assert "Clip skip" not in read_text(changed)  # the default is left out, as the web UI does

    # A LoRA file that changed since is said, not silently used.
    newer = tmp_path / "newer"
    _write_lora(newer.parent / "ink.safetensors", 1, sd1_folder)
    caplog.clear()
    args = _common(sd1_folder, networks, newer)
    args[args.index(str(networks / "loras"))] = str(tmp_path)
    assert main(["generate", "--from", str(made), *args]) == 0
    assert f"LoRA 'ink' was [{lora_hash}], the file found now is" in caplog.text


@pytest.mark.parametrize("prompt, extra, message", [
    ("a cat <lora:missing:1>", [], "no LoRA named 'missing'"),
    ("a cat <lora:ink:abc>", [], "is not a number"),
    ("a cat", ["--clip-skip", "0"], "--clip-skip: must be"),
    ("a cat", ["--clip-skip", "9"], "clip_skip must be"),
])
def test_generate_refuses_bad_tags_and_clip_skips_in_one_line(sd1_folder, networks, tmp_path, capsys, prompt, extra,
                                                               message):
    out = tmp_path / "out"
    assert main(["generate", prompt, *extra, *_common(sd1_folder, networks, out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() or not list(out.glob("*.png"))


def test_batch_groups_lines_by_tags_records_them_and_skips_a_missing_lora(sd1_folder, networks, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    lines = [
        {"prompt": "a cat <lora:ink:1>", "seed": 1},
        {"prompt": "a cat", "seed": 1},
        {"prompt": f"a cat, {TOKEN} <lora:ink:0.5>", "seed": 2, "clip_skip": 2},
        {"prompt": "a dog <lora:gone:1>", "seed": 3},
        {"prompt": "a cat", "seed": 4, "clip_skip": 0},
    ]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out"
    assert main(["batch", str(prompts), *_common(sd1_folder, networks, out)]) == 1
    captured = capsys.readouterr()
    assert f"{prompts}:4: error: no LoRA named 'gone'" in captured.err
    assert f"{prompts}:5: error: clip_skip must be" in captured.err
    files = sorted(out.glob("*.png"))
    assert [f.name[:5] for f in files] == ["00001", "00002", "00003"]
    first, plain, third = (read_parameters(f) for f in files)
    lora_hash = _addnet_hash(networks / "loras" / "ink.safetensors")[:12]
    assert first.lora_hashes == {"ink": lora_hash} and plain.lora_hashes == {}
    assert third.clip_skip == 2 and list(third.ti_hashes) == [TOKEN]
    # Same seed and text, with and without the LoRA: the tag changed the picture.
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(files[1])))
    # Each line is the picture `ldm generate --from` makes of it.
    again = tmp_path / "again"
    assert main(["generate", "--from", str(files[2]), *_common(sd1_folder, networks, again)]) == 0
    (remade,) = again.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(files[2])), np.asarray(Image.open(remade)))
    # A rerun finds everything done (the recorded hashes are part of the plan).
    assert main(["batch", str(prompts), *_common(sd1_folder, networks, out)]) == 1
    assert "0 rendered, 3 already done" in capsys.readouterr().out
