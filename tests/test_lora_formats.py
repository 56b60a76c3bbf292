"""LoRA-family files: every spelling and adapter kind against the published formulas.

Expected weights are computed here, independently of ldm, from the formulas of kohya-ss /
A1111 (``W + multiplier * alpha / rank * up @ down``), LyCORIS (LoHa: Hadamard product of
two low-rank products; LoKr: Kronecker product; Tucker cores) and PEFT (``lora_alpha / r``,
``alpha_pattern``, rsLoRA). Expected names come from the original-layout U-Net as
written out by hand for the tiny config, not from ldm's key map. Also A1111's hash,
folder lookup and ``<lora:...>`` prompt tags.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import pytest
import torch

from ldm import Pipeline
from ldm.adapters.lora_files import extract_lora_tags, find_lora, lora_hash, lora_search_dirs
from ldm.checkpoints.files import save_safetensors

RANK = 4

# Tiny models: one thread (multi-threaded kernels crawl when the cores are shared).
pytestmark = pytest.mark.usefixtures("one_thread")


# --- shared with test_lora_errors.py and test_lora_parity.py ----------------------------


def factors(shape, rank: int = RANK, seed: int = 0, std: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) for a weight of ``shape``: a conv's down has its kernel, up is 1x1."""
    gen = torch.Generator().manual_seed(seed)
    out, inp, *kernel = shape
    down = torch.randn(rank, inp, *kernel, generator=gen) * std
    up = torch.randn(out, rank, *([1] * len(kernel)), generator=gen) * std
    return down, up


def lora_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """kohya-ss / A1111: dW[o, i, ...] = sum_r up[o, r] down[r, i, ...]."""
    return torch.einsum("or,ri...->oi...", up.reshape(up.shape[0], -1), down)


def kohya_tensors(entries: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{kohya layer name: (down, up)}`` -> the file's tensors."""
    out = {}
    for name, (down, up) in entries.items():
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
    return out


def snapshot(pipe: Pipeline) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.detach().clone() for k, v in state.items()}


def changed(pipe: Pipeline, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in snapshot(pipe).items() if not torch.equal(v, before[k])]


def weight(pipe: Pipeline, name: str) -> torch.Tensor:
    component, _, module = name.partition(".")
    return getattr(pipe, component).get_submodule(module).weight.detach()


# (fixtures sd1_pipe and sd1: tests/conftest.py)


# Original (CompVis) layout -> diffusers layout for the tiny SD1 U-Net (block_out_channels
# (32, 64), one layer per block, attention at level 0 only), written out by hand.
ORIGINAL_NAMES = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "input_blocks.1.0.in_layers.2": "down_blocks.0.resnets.0.conv1",
    "input_blocks.1.0.emb_layers.1": "down_blocks.0.resnets.0.time_emb_proj",
    "input_blocks.1.1.proj_in": "down_blocks.0.attentions.0.proj_in",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "input_blocks.2.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.3.0.skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "middle_block.1.transformer_blocks.0.ff.net.0.proj": "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "middle_block.2.out_layers.3": "mid_block.resnets.1.conv2",
    "output_blocks.1.1.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.1.proj_out": "up_blocks.1.attentions.1.proj_out",
    "out.2": "conv_out",
}


def _kohya(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


def test_kohya_names_in_both_unet_layouts_and_text_encoder(sd1, tmp_path):
    """Underscored names resolve against the real modules (to_out_0 vs to_q), in
    diffusers and original layout alike, and the text encoder's with or without text_model."""
    entries, expected = {}, {}
    before = snapshot(sd1)
    for i, (original, internal) in enumerate(ORIGINAL_NAMES.items()):
        down, up = factors(weight(sd1, f"unet.{internal}").shape, seed=i)
        entries[_kohya("lora_unet_", original)] = (down, up)
        expected[f"unet.{internal}"] = lora_delta(down, up)
    for i, name in enumerate(["text_model.encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]):
        full = name if name.startswith("text_model") else f"text_model.{name}"
        down, up = factors(weight(sd1, f"text_encoder.{full}").shape, seed=100 + i)
        entries[_kohya("lora_te_", name)] = (down, up)
        expected[f"text_encoder.{full}"] = lora_delta(down, up)
    save_safetensors(kohya_tensors(entries), tmp_path / "orig.safetensors")
    renamed = dict(entries)  # the same deltas under the diffusers-layout names
    for original, internal in ORIGINAL_NAMES.items():
        renamed[_kohya("lora_unet_", internal)] = renamed.pop(_kohya("lora_unet_", original))
    save_safetensors(kohya_tensors(renamed), tmp_path / "diffusers.safetensors")

    sd1.load_lora(tmp_path / "orig.safetensors")
    for name, delta in expected.items():
        torch.testing.assert_close(weight(sd1, name), before[f"{name}.weight"] + delta, rtol=0, atol=1e-6)
    assert sorted(changed(sd1, before)) == sorted(f"{n}.weight" for n in expected)
    merged = snapshot(sd1)
    sd1.unload_lora()
    sd1.load_lora(tmp_path / "diffusers.safetensors")
    assert changed(sd1, merged) == []  # bit-identical to the original-layout file


ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
TEXT_ATTN = "text_model.encoder.layers.0.self_attn"


def _pairs(base: dict[str, tuple[torch.Tensor, torch.Tensor]], down_key: str, up_key: str,
           rename=lambda n: n) -> dict[str, torch.Tensor]:
    out = {}
    for name, (down, up) in base.items():
        out[f"{rename(name)}{down_key}"] = down
        out[f"{rename(name)}{up_key}"] = up
    return out


def test_diffusers_and_peft_spellings_agree_with_kohya(sd1, tmp_path):
    layers = [f"unet.{ATTN}.attn1.to_q", f"unet.{ATTN}.attn2.to_out.0", f"unet.{ATTN}.ff.net.2",
              f"text_encoder.{TEXT_ATTN}.k_proj", f"text_encoder.{TEXT_ATTN}.out_proj",
              "text_encoder.text_model.encoder.layers.1.mlp.fc2"]
    base = {n: factors(weight(sd1, n).shape, seed=i) for i, n in enumerate(layers)}
    before = snapshot(sd1)
    expected = {n: before[f"{n}.weight"] + lora_delta(*base[n]) for n in layers}

    def kohya(n: str) -> str:
        return ("lora_unet_" if n.startswith("unet.") else "lora_te_") + n.partition(".")[2].replace(".", "_")

    def no_text_model(n: str) -> str:  # transformers >= 5 module names
        return n.replace("text_encoder.text_model.", "text_encoder.")

    def processor(n: str) -> str:  # diffusers' old attention processors
        n = n.replace(".attn1.", ".attn1.processor.").replace(".to_out.0", ".to_out")
        for ours, theirs in (("k_proj", "to_k"), ("out_proj", "to_out")):
            n = n.replace(f".{ours}", f".{theirs}")
        return n + "_lora"

    spellings = {
        "kohya": _pairs(base, ".lora_down.weight", ".lora_up.weight", kohya),
        "kohya-AB": _pairs(base, ".lora_A.weight", ".lora_B.weight", kohya),
        "peft": _pairs(base, ".lora_A.weight", ".lora_B.weight"),
        "peft-transformers5": _pairs(base, ".lora_A.weight", ".lora_B.weight", no_text_model),
        "diffusers": _pairs(base, ".lora.down.weight", ".lora.up.weight"),
        "diffusers-text": _pairs(base, ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    }
    processors = {n: base[n] for n in layers if "attn" in n}
    spellings["processor"] = _pairs(processors, ".down.weight", ".up.weight", processor)
    bare = {n.removeprefix("unet."): v for n, v in base.items() if n.startswith("unet.")}
    spellings["diffusers-no-prefix"] = _pairs(bare, ".lora.down.weight", ".lora.up.weight")
    for label, tensors in spellings.items():
        save_safetensors(tensors, tmp_path / f"{label}.safetensors")
        sd1.load_lora(tmp_path / f"{label}.safetensors")
        for n in layers:
            if label == "diffusers-no-prefix" and not n.startswith("unet."):
                continue
            if label == "processor" and n not in processors:
                continue
            torch.testing.assert_close(weight(sd1, n), expected[n], rtol=0, atol=1e-6, msg=f"{label}: {n}")
        sd1.unload_lora()


def test_alpha_over_rank_and_peft_metadata(sd1, tmp_path):
    q, v = f"unet.{ATTN}.attn1.to_q", f"unet.{ATTN}.attn1.to_v"
    kq, kv = f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_q", f"lora_unet_{ATTN.replace('.', '_')}_attn1_to_v"
    (dq, uq), (dv, uv) = factors(weight(sd1, q).shape, seed=1), factors(weight(sd1, v).shape, seed=2)
    before = snapshot(sd1)
    save_safetensors({f"{kq}.lora_down.weight": dq, f"{kq}.lora_up.weight": uq, f"{kq}.alpha": torch.tensor(1.0),
                      f"{kv}.lora_down.weight": dv, f"{kv}.lora_up.weight": uv}, tmp_path / "k.safetensors")
    sd1.load_lora(tmp_path / "k.safetensors", scale=0.8)
    # alpha 1 over rank 4; no alpha: factor 1
    torch.testing.assert_close(weight(sd1, q), before[f"{q}.weight"] + 0.8 * (1 / RANK) * lora_delta(dq, uq),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(weight(sd1, v), before[f"{v}.weight"] + 0.8 * lora_delta(dv, uv), rtol=0, atol=1e-6)
    sd1.unload_lora()

    meta = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.alpha_pattern": {f"{ATTN}.attn1.to_v": 2},
            "unet.use_rslora": False}
    peft = {f"{q}.lora_A.weight": dq, f"{q}.lora_B.weight": uq, f"{v}.lora_A.weight": dv, f"{v}.lora_B.weight": uv}
    for rslora in (False, True):
        meta["unet.use_rslora"] = rslora
        save_safetensors(peft, tmp_path / "p.safetensors", {"lora_adapter_metadata": json.dumps(meta)})
        sd1.load_lora(tmp_path / "p.safetensors")
        rank = math.sqrt(RANK) if rslora else RANK
        torch.testing.assert_close(weight(sd1, q), before[f"{q}.weight"] + 8 / rank * lora_delta(dq, uq),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(weight(sd1, v), before[f"{v}.weight"] + 2 / rank * lora_delta(dv, uv),
                                   rtol=0, atol=1e-6)
        sd1.unload_lora()


def test_conv1x1_and_linear_deltas_interchange(sd1, sd2v_folder, tmp_path):
    """SD1's proj_in is a 1x1 conv, SD2's a linear: a delta made for one fits the other."""
    sd2 = Pipeline.from_pretrained(sd2v_folder, device="cpu")
    name = "unet.down_blocks.0.attentions.0.proj_in"
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    for pipe, conv_factors in ((sd1, False), (sd2, True)):
        w0 = weight(pipe, name).clone()
        c = w0.shape[0]
        down, up = factors((c, c, 1, 1) if conv_factors else (c, c), seed=3)
        save_safetensors({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, tmp_path / "p.safetensors")
        pipe.load_lora(tmp_path / "p.safetensors")
        expected = w0 + lora_delta(down, up).reshape(w0.shape)
        torch.testing.assert_close(weight(pipe, name), expected, rtol=0, atol=1e-6)
        pipe.unload_lora()
        assert torch.equal(weight(pipe, name), w0)


def _cp(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker/CP rebuild per kernel position: W[:, :, k, l] = a^T core[:, :, k, l] b."""
    out = torch.empty(a.shape[1], b.shape[1], *core.shape[2:])
    for k in range(core.shape[2]):
        for m in range(core.shape[3]):
            out[:, :, k, m] = a.T @ core[:, :, k, m] @ b
    return out


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by blocks: block (i, j) is a[i, j] * b."""
    rows, cols = b.shape[0], b.shape[1]
    out = torch.empty(a.shape[0] * rows, a.shape[1] * cols, *b.shape[2:])
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = a[i, j] * b
    return out


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.3


LINEAR = f"{ATTN}.attn1.to_k"  # 32 x 32
CONV = "down_blocks.0.resnets.0.conv2"  # 32 x 32 x 3 x 3


def _lycoris_cases() -> dict[str, tuple]:
    """name -> (layer, entries, alpha, rank that divides it, delta before alpha/rank), in
    LyCORIS's shapes; rank as A1111/ComfyUI read it (None: alpha does not apply)."""
    r = 4
    w = {k: _randn(*s, seed=i) for i, (k, s) in enumerate({
        "a1": (32, r), "b1": (r, 32), "a2": (32, r), "b2": (r, 32),
        "cb1": (r, 32 * 9), "cb2": (r, 32 * 9),
        "t1": (r, r, 3, 3), "t2": (r, r, 3, 3), "ta1": (r, 32), "tb1": (r, 32), "ta2": (r, 32), "tb2": (r, 32),
        "k1": (4, 8), "k2a": (8, r), "k2b": (r, 4), "k1a": (4, 2), "k1b": (2, 8), "k2": (8, 4),
        "kc2": (8, 4, 3, 3), "kt2": (r, r, 3, 3), "kta": (r, 8), "ktb": (r, 4),
        "mid": (r, r, 3, 3), "mdown": (r, 32, 1, 1), "mup": (32, r, 1, 1),
    }.items())}
    return {
        "loha-linear": (LINEAR, {"hada_w1_a": w["a1"], "hada_w1_b": w["b1"], "hada_w2_a": w["a2"],
                                 "hada_w2_b": w["b2"]}, 2.0, r, lambda: (w["a1"] @ w["b1"]) * (w["a2"] @ w["b2"])),
        "loha-conv": (CONV, {"hada_w1_a": w["a1"], "hada_w1_b": w["cb1"], "hada_w2_a": w["a2"],
                             "hada_w2_b": w["cb2"]}, 3.0, r,
                      lambda: ((w["a1"] @ w["cb1"]) * (w["a2"] @ w["cb2"])).reshape(32, 32, 3, 3)),
        "loha-tucker": (CONV, {"hada_t1": w["t1"], "hada_w1_a": w["ta1"], "hada_w1_b": w["tb1"],
                               "hada_t2": w["t2"], "hada_w2_a": w["ta2"], "hada_w2_b": w["tb2"]}, 1.0, r,
                        lambda: _cp(w["t1"], w["ta1"], w["tb1"]) * _cp(w["t2"], w["ta2"], w["tb2"])),
        "lokr-w1-w2ab": (LINEAR, {"lokr_w1": w["k1"], "lokr_w2_a": w["k2a"], "lokr_w2_b": w["k2b"]}, 2.0, r,
                         lambda: _kron(w["k1"], w["k2a"] @ w["k2b"])),
        "lokr-w1ab-w2-full": (LINEAR, {"lokr_w1_a": w["k1a"], "lokr_w1_b": w["k1b"], "lokr_w2": w["k2"]}, 1.0, 2,
                              lambda: _kron(w["k1a"] @ w["k1b"], w["k2"])),
        # both factors full: no rank, so scale 1 whatever alpha says (LyCORIS, A1111, ComfyUI)
        "lokr-full": (LINEAR, {"lokr_w1": w["k1"], "lokr_w2": w["k2"]}, 5.0, None, lambda: _kron(w["k1"], w["k2"])),
        "lokr-conv": (CONV, {"lokr_w1": w["k1"], "lokr_w2": w["kc2"]}, None, None, lambda: _kron(w["k1"], w["kc2"])),
        "lokr-tucker": (CONV, {"lokr_w1": w["k1"], "lokr_t2": w["kt2"], "lokr_w2_a": w["kta"],
                               "lokr_w2_b": w["ktb"]}, 2.0, r, lambda: _kron(w["k1"], _cp(w["kt2"], w["kta"], w["ktb"]))),
        # A1111 rebuild_cp_decomposition: W[:, :, k, l] = up @ mid[:, :, k, l] @ down
        "locon-mid": (CONV, {"lora_down.weight": w["mdown"], "lora_mid.weight": w["mid"], "lora_up.weight": w["mup"]},
                      2.0, r, lambda: _cp(w["mid"], w["mup"][:, :, 0, 0].T, w["mdown"][:, :, 0, 0])),
    }


@pytest.mark.parametrize("case", list(_lycoris_cases()))
def test_lycoris_formulas(sd1, tmp_path, case):
    layer, entries, alpha, rank, formula = _lycoris_cases()[case]
    key = "lora_unet_" + layer.replace(".", "_")
    tensors = {f"{key}.{role}": t for role, t in entries.items()}
    if alpha is not None:
        tensors[f"{key}.alpha"] = torch.tensor(alpha)
    w0 = weight(sd1, f"unet.{layer}").clone()
    save_safetensors(tensors, tmp_path / "l.safetensors")
    sd1.load_lora(tmp_path / "l.safetensors", scale=0.7)
    factor = alpha / rank if alpha is not None and rank is not None else 1.0
    expected = w0 + 0.7 * factor * formula().reshape(w0.shape)
    torch.testing.assert_close(weight(sd1, f"unet.{layer}"), expected, rtol=0, atol=2e-6)


# --- A1111 files: hash, folders, prompt tags -------------------------------------------------


def _addnet_hash(path) -> str:
    """A1111 modules/hashes.py addnet_hash_safetensors, as written there."""
    hash_sha256 = hashlib.sha256()
    with open(path, "rb") as b:
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        for chunk in iter(lambda: b.read(1024 * 1024), b""):
            hash_sha256.update(chunk)
    return hash_sha256.hexdigest()


def test_lora_hash_is_a1111s(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(3, 2)}
    save_safetensors(tensors, tmp_path / "a.safetensors", {"ss_output_name": "a"})
    save_safetensors(tensors, tmp_path / "b.safetensors", {"ss_output_name": "something else entirely"})
    assert lora_hash(tmp_path / "a.safetensors") == _addnet_hash(tmp_path / "a.safetensors")[:12]
    # the header (metadata) is not hashed: same tensors, same hash
    assert lora_hash(tmp_path / "a.safetensors") == lora_hash(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "b.safetensors").read_bytes()
    # a trainer's sshs_model_hash wins, as in A1111's NetworkOnDisk
    stored = "0123456789abcdef" * 4
    save_safetensors(tensors, tmp_path / "c.safetensors", {"sshs_model_hash": stored})
    assert lora_hash(tmp_path / "c.safetensors") == stored[:12]
    torch.save(tensors, tmp_path / "d.pt")
    assert lora_hash(tmp_path / "d.pt") == hashlib.sha256((tmp_path / "d.pt").read_bytes()).hexdigest()[:12]
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        lora_hash(tmp_path / "missing.safetensors")


def test_search_dirs_and_find_lora(tmp_path):
    a, b, nested = tmp_path / "a", tmp_path / "b", tmp_path / "b" / "styles" / "ink"
    nested.mkdir(parents=True)
    a.mkdir()
    (a / "x.pt").write_bytes(b"0")
    (b / "x.safetensors").write_bytes(b"0")
    (a / "y.safetensors").write_bytes(b"0")
    (nested / "z.safetensors").write_bytes(b"0")
    env = {"LDM_LORA_DIR": os.pathsep.join([str(b), "", str(tmp_path / "gone")])}
    dirs = lora_search_dirs([a], environ=env)
    assert dirs == [a, b, tmp_path / "gone"]
    assert find_lora("x", dirs) == a / "x.pt"  # the first folder wins
    assert find_lora("x", [b, a]) == b / "x.safetensors"
    assert find_lora("x.pt", [b, a]) == a / "x.pt"
    assert find_lora("z", dirs) == nested / "z.safetensors"  # subfolders, as A1111 walks them
    with pytest.raises(FileNotFoundError) as err:
        find_lora("nope", dirs)
    for folder in dirs:
        assert str(folder) in str(err.value)
    for bad in ("../x", "a/x", ""):
        with pytest.raises(ValueError, match="without folders"):
            find_lora(bad, dirs)
    with pytest.raises(TypeError):
        lora_search_dirs(str(a))


def _a1111_parse(prompt: str) -> str:
    """A1111 modules/extra_networks.py parse_prompt's removal: re_extra_net -> ''."""
    return re.sub(r"<(\w+):([^>]+)>", "", prompt)


@pytest.mark.parametrize("prompt, tags", [
    ("a cat <lora:ink>", [("ink", 1.0, 1.0)]),
    ("<lora:ink:0.8>, a cat, <lyco:detail:0.5:1.2>", [("ink", 0.8, 0.8), ("detail", 0.5, 1.2)]),
    ("a <lora:ink:te=0.3:unet=0.9> cat", [("ink", 0.3, 0.9)]),
    ("a <lora:ink:0.4:unet=-1> cat", [("ink", 0.4, -1.0)]),
    ("no tags at all", []),
])
def test_extract_lora_tags(prompt, tags):
    text, found = extract_lora_tags(prompt)
    assert text == _a1111_parse(prompt)
    assert [(t.name, t.text_encoder, t.unet) for t in found] == tags


def test_other_extra_networks_stay_and_bad_tags_are_named():
    text, found = extract_lora_tags("a <hypernet:x:1> cat <lora:y>")
    assert text == "a <hypernet:x:1> cat " and [t.name for t in found] == ["y"]
    for bad, what in (("<lora:x:abc>", "not a number"), ("<lora:x:nan>", "finite"), ("<lora::1>", "missing"),
                      ("<lora:x:1:1:8>", "unsupported"), ("<lora:x:dyn=8>", "unsupported"),
                      ("<lora:x:te=1:foo=2>", "unsupported")):
        with pytest.raises(ValueError, match=re.escape(bad) + ".*" + what):
            extract_lora_tags(f"a {bad} b")
