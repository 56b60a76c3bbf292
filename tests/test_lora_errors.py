"""LoRA files that must be refused: one clear error naming the file and the entries, and
not a single weight changed (a file is checked whole before anything is applied)."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoints.files import CheckpointError, save_safetensors
from test_lora_formats import ATTN, changed, factors, kohya_tensors, snapshot, weight


K_ATTN = "lora_unet_" + ATTN.replace(".", "_")

# Tiny models: one thread (multi-threaded kernels crawl when the cores are shared).
pytestmark = pytest.mark.usefixtures("one_thread")


def _good(pipe) -> dict[str, torch.Tensor]:
    """A valid kohya file's tensors: U-Net attention and text-encoder layers."""
    names = {f"{K_ATTN}_attn1_to_q": f"unet.{ATTN}.attn1.to_q",
             f"{K_ATTN}_attn2_to_k": f"unet.{ATTN}.attn2.to_k",
             "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1"}
    return kohya_tensors({k: factors(weight(pipe, n).shape, seed=i) for i, (k, n) in enumerate(names.items())})


def _refused(pipe, tmp_path, tensors, *patterns, error=CheckpointError, name="bad.safetensors", **kwargs):
    """Loading must fail with ``error`` matching every pattern, and change no weight."""
    path = tmp_path / name
    if isinstance(tensors, dict):
        save_safetensors(tensors, path)
    before = snapshot(pipe)
    with pytest.raises(error) as info:
        pipe.load_lora(path, **kwargs)
    for pattern in patterns:
        assert pattern in str(info.value), (pattern, str(info.value))
    assert changed(pipe, before) == []
    assert "bad" not in pipe.loras
    return str(info.value)


def test_unmapped_layers_listed_with_a_count(sd1, tmp_path):
    tensors = _good(sd1)
    for i in range(7):
        tensors.update(kohya_tensors({f"lora_unet_down_blocks_9_attentions_{i}_proj_in": factors((32, 32), seed=i)}))
    message = _refused(sd1, tmp_path, tensors, "bad.safetensors", "7 entries name layers the sd1 model does not have",
                       "lora_unet_down_blocks_9_attentions_0_proj_in", "(7 in all)")
    assert "down_blocks_9_attentions_6" not in message  # only the first few are listed


@pytest.mark.parametrize("layer, width, family, model_width", [
    (f"{K_ATTN}_attn2_to_k", 1024, "SD 2.x", "cross-attention width 32"),
    (f"{K_ATTN}_attn2_to_v", 2048, "SDXL", "cross-attention width 32"),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, "SD 1.x (CLIP ViT-L)", "text-encoder width 32"),
])
def test_other_family_named_with_both_widths(sd1, tmp_path, layer, width, family, model_width):
    tensors = {**_good(sd1), **kohya_tensors({layer: factors((32, width), seed=5)})}
    _refused(sd1, tmp_path, tensors, f"is for {family}", str(width), "the model is sd1", model_width)


@pytest.mark.parametrize("metadata, family", [({"ss_v2": "True"}, "sd2"),
                                                ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL")])
def test_kohya_metadata_of_another_family(sd1, tmp_path, metadata, family):
    save_safetensors(_good(sd1), tmp_path / "bad.safetensors", metadata)
    key, value = next(iter(metadata.items()))
    _refused(sd1, tmp_path, None, f"trained on {family} ({key}={value!r}", "the model is sd1")


def test_sdxl_text_encoders_refused_by_name(sd1, tmp_path):
    tensors = {**_good(sd1), **kohya_tensors({"lora_te2_text_model_encoder_layers_0_mlp_fc1": factors((32, 32))})}
    _refused(sd1, tmp_path, tensors, "SDXL", "not a Stable Diffusion 1.x/2.x model")


def test_rank_mismatch_names_the_layer(sd1, tmp_path):
    tensors = _good(sd1)
    tensors[f"{K_ATTN}_attn1_to_q.lora_up.weight"] = torch.zeros(32, 8)
    _refused(sd1, tmp_path, tensors, f"{K_ATTN}_attn1_to_q", "rank mismatch", "rank 4", "rank 8")


def test_shape_that_does_not_fit_names_both_shapes(sd1, tmp_path):
    tensors = {**_good(sd1), **kohya_tensors({f"{K_ATTN}_ff_net_2": factors((32, 32), seed=1)})}  # weight is 32x128
    _refused(sd1, tmp_path, tensors, f"{K_ATTN}_ff_net_2", "[32, 32]", "[32, 128]")


def test_non_finite_values_refused_even_in_the_last_layer(sd1, tmp_path):
    tensors = _good(sd1)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"][1, 2] = float("nan")
    tensors[f"{K_ATTN}_attn1_to_q.alpha"] = torch.tensor(float("inf"))
    _refused(sd1, tmp_path, tensors, "NaN or infinite", "mlp_fc1.lora_down.weight", "attn1_to_q.alpha")


@pytest.mark.parametrize("suffix, kind", [
    ("dora_scale", "DoRA"), ("diff", "LyCORIS full"), ("w_norm", "norm-layer"), ("oft_blocks", "OFT"),
    ("on_input", "(IA)^3"),
])
def test_unsupported_adapter_types_refused_by_name(sd1, tmp_path, suffix, kind):
    tensors = {**_good(sd1), f"{K_ATTN}_attn1_to_q.{suffix}": torch.ones(32, 1)}
    _refused(sd1, tmp_path, tensors, kind, f"{K_ATTN}_attn1_to_q.{suffix}", "does not support")


def test_malformed_entries(sd1, tmp_path):
    half = _good(sd1)
    del half[f"{K_ATTN}_attn1_to_q.lora_up.weight"]
    _refused(sd1, tmp_path, half, "attn1_to_q", "needs both the down (lora_A) and up (lora_B)")
    mixed = {**_good(sd1), f"{K_ATTN}_attn1_to_q.hada_w1_a": torch.ones(32, 4)}
    _refused(sd1, tmp_path, mixed, "attn1_to_q", "mixes")
    alpha = {**_good(sd1), f"{K_ATTN}_attn1_to_q.alpha": torch.ones(3)}
    _refused(sd1, tmp_path, alpha, "alpha must be one number")
    ints = {**_good(sd1), f"{K_ATTN}_attn1_to_q.lora_up.weight": torch.ones(32, 4, dtype=torch.int32)}
    _refused(sd1, tmp_path, ints, "not floating point", "attn1_to_q.lora_up.weight (int32)")
    _refused(sd1, tmp_path, {"model.diffusion_model.x.weight": torch.ones(2)}, "not LoRA, LoHa or LoKr weights",
             "model.diffusion_model.x.weight")


def test_files_that_are_not_loras(sd1, tmp_path):
    _refused(sd1, tmp_path, None, "missing.safetensors", error=FileNotFoundError, name="missing.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, this is not a weight file")
    _refused(sd1, tmp_path, None, "text.safetensors", "not a safetensors file", name="text.safetensors")
    torch.save(_good(sd1), tmp_path / "old.pt")
    _refused(sd1, tmp_path, None, "old.pt", "allow_pickle=True", name="old.pt")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    _refused(sd1, tmp_path, None, "x.gguf", "unknown weight file type", name="x.gguf")
    # opting in reads the pickle with torch.load(weights_only=True)
    assert sd1.load_lora(tmp_path / "old.pt", allow_pickle=True) == "old"


def test_names_and_scales(sd1, tmp_path):
    save_safetensors(_good(sd1), tmp_path / "style.safetensors")
    assert sd1.load_lora(tmp_path / "style.safetensors") == "style"
    with pytest.raises(ValueError, match="'style' is already loaded.*unload it first.*pass name="):
        sd1.load_lora(tmp_path / "style.safetensors")
    assert sd1.load_lora(tmp_path / "style.safetensors", name="style2") == "style2"
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="scale"):
            sd1.set_lora_scale("style", bad)
        with pytest.raises(ValueError, match="scale"):
            sd1.load_lora(tmp_path / "style.safetensors", scale=bad, name="other")
    with pytest.raises(ValueError, match="text_encoder_scale"):
        sd1.set_lora_scale("style", 1.0, text_encoder_scale=float("nan"))
    for call in (lambda: sd1.set_lora_scale("nope", 1.0), lambda: sd1.unload_lora("nope")):
        with pytest.raises(ValueError, match="no LoRA named 'nope' is loaded.*'style', 'style2'"):
            call()
    with pytest.raises(ValueError, match="non-empty"):
        sd1.load_lora(tmp_path / "style.safetensors", name="")
    with pytest.raises(TypeError, match="path"):
        sd1.load_lora(3)
    assert [lora.name for lora in sd1.loras.loaded] == ["style", "style2"]
