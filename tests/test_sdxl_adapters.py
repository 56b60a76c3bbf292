"""SDXL LoRAs and textual-inversion embeddings against diffusers (the reference).

Tiny random SDXL base and refiner models (tests/reference_sdxl.py). LoRA files are
written here in kohya-ss's SDXL spelling (U-Net names in the original SGM layout,
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, the SGM names derived by
hand below from the tiny config, and in diffusers' layout; ``lora_te1_`` for CLIP ViT-L,
``lora_te2_`` for OpenCLIP ViT-bigG) and in diffusers/PEFT's (``unet.``,
``text_encoder.``, ``text_encoder_2.`` with ``lora_adapter_metadata``), random factors
with std 0.05 on every layer. diffusers loads them with
``StableDiffusionXLPipeline.load_lora_weights``; its images (PEFT layers) and its fused
weights (``fuse_lora`` + ``unload_lora_weights``) must equal ldm's merged model. diffusers
0.42 renames kohya attention entries (U-Net ``attn1``/``attn2``, text ``self_attn``) to
attention-processor names and files their alphas under names that match no layer, so
those layers get the file's most common alpha; and it files CLIP ViT-L's alphas under
``text_model.*`` names, which transformers 5's CLIPTextModel no longer has. Parity files
give every attention layer and every CLIP ViT-L layer that one alpha and vary the
others'; a separate test varies every layer's alpha and checks both text encoders
against the published formula (``W + alpha / rank * up @ down``).

Embeddings: SDXL files hold ``clip_l`` and ``clip_g``; diffusers loads each into its
encoder (``load_textual_inversion(sd["clip_g"], token, text_encoder=pipe.text_encoder_2,
tokenizer=pipe.tokenizer_2)``, the documented way). Prompt embeddings must agree. The
pooled embedding is read at the end token (SGM / A1111 / transformers' rule for the real
end-token id): diffusers' tiny and real SDXL folders carry the legacy ``eos_token_id=2``,
with which transformers pools at the largest id, the added token's; the expected pooled
vector is computed from the reference encoder at the end token, and the image test gives
the reference encoder the real end-token id.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm import Pipeline
from ldm.adapters.embeddings import EmbeddingError, EmbeddingTable
from ldm.adapters.lora import LoraSet
from ldm.checkpoints.files import CheckpointError, save_safetensors
from reference_sdxl import SDXL_TINY, load_sdxl_reference_pipeline
from test_lora_formats import RANK, factors, lora_delta
# The same prompts, negative prompt, seeds, size (64), Euler steps (3) as the SD 1.x/2.x parity.
from test_lora_parity import EFFECT, SIZE, STD, STEPS, _images, _ref_images

PIXELS = 1e-3  # max abs difference on [0, 1] pixels
WEIGHTS = 1e-5  # max abs difference of merged weights
EMBEDS = 1e-5
# diffusers maps a kohya file's per-layer alphas for attention layers under processor
# names that match no layer (they get the most common alpha), so those all get this one.
ATTENTION_ALPHA = 2.0
ALPHAS = (1.0, 8.0)
CLIP_L_WIDTH, CLIP_G_WIDTH = SDXL_TINY.text["hidden_size"], SDXL_TINY.text_2["hidden_size"]
CONTEXT = SDXL_TINY.unet["cross_attention_dim"]

pytestmark = pytest.mark.usefixtures("one_thread")


# --- models, snapshots ------------------------------------------------------------------


def _components(pipe: Pipeline) -> dict[str, torch.nn.Module]:
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if pipe.text_encoder_2 is not None:
        parts["text_encoder_2"] = pipe.text_encoder_2
    return parts


def _state(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c, m in _components(pipe).items() for k, v in m.state_dict().items()}


def _changed(pipe: Pipeline, before: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in _state(pipe).items() if not torch.equal(v, before[k])]


def _restoring(pipe: Pipeline):
    """Hands out the pipeline; afterwards unloads every LoRA and embedding, which must
    give back every weight bit for bit."""
    before = _state(pipe)
    yield pipe
    pipe.unload_lora()
    pipe.unload_embedding()
    assert _changed(pipe, before) == []


@pytest.fixture(scope="module")
def xl_pipe(sdxl_folder):
    return Pipeline.from_pretrained(sdxl_folder, device="cpu")


@pytest.fixture(scope="module")
def refiner_pipe(sdxl_refiner_folder):
    return Pipeline.from_pretrained(sdxl_refiner_folder, device="cpu")


@pytest.fixture
def xl(xl_pipe):
    yield from _restoring(xl_pipe)


@pytest.fixture
def refiner(refiner_pipe):
    yield from _restoring(refiner_pipe)


def _reference(sdxl_folder):
    ref = load_sdxl_reference_pipeline(sdxl_folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module) -> float:
    """Largest difference between two modules' weights (transformers 5 writes
    CLIPTextModel's keys without the ``text_model.`` level ldm's encoder has)."""
    mine = ours.state_dict()
    worst = 0.0
    for key, value in theirs.state_dict().items():
        if key.endswith("position_ids"):
            continue
        match = mine[key] if key in mine else mine[f"text_model.{key}"]
        worst = max(worst, (match - value).abs().max().item())
    return worst


# --- SGM (original layout) names of the tiny SDXL U-Net, by hand -------------------------

LAYERS_PER_BLOCK = SDXL_TINY.unet["layers_per_block"]
UP_ATTENTION = tuple(t.startswith("CrossAttn") for t in SDXL_TINY.unet["up_block_types"])
_SGM_TOP = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
_SGM_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}


def sgm_name(name: str) -> str:
    """diffusers module name -> SGM's: block ``n = 1 + (L + 1) * level + j`` on the way
    down, ``(L + 1) * k + j`` on the way up; slot 0 the resnet, 1 the transformer; the
    downsampler ``input_blocks.{(L + 1) * (level + 1)}.0.op``, the upsampler after the
    block's last layer (slot 2 behind a transformer)."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    p, step = name.split("."), LAYERS_PER_BLOCK + 1
    if p[0] == "mid_block":
        block, rest = _SGM_MID[f"{p[1]}.{p[2]}"], p[3:]
    elif p[2] == "downsamplers":
        return f"input_blocks.{step * (int(p[1]) + 1)}.0.op"
    elif p[2] == "upsamplers":
        return f"output_blocks.{step * int(p[1]) + LAYERS_PER_BLOCK}.{2 if UP_ATTENTION[int(p[1])] else 1}.conv"
    else:
        first = 1 + step * int(p[1]) if p[0] == "down_blocks" else step * int(p[1])
        stage = "input_blocks" if p[0] == "down_blocks" else "output_blocks"
        block, rest = f"{stage}.{first + int(p[3])}.{0 if p[2] == 'resnets' else 1}", p[4:]
    rest = ".".join(rest)
    return f"{block}.{_SGM_RESNET[rest] if '.resnets.' in f'.{name}.' else rest}"


def test_sgm_names_follow_the_real_sdxl_numbering():
    """The hand-derived names agree with kohya-ss SDXL files' names for SDXL's structure
    (3 levels, 2 layers each, no attention at the first)."""
    assert sgm_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert sgm_name("mid_block.attentions.0.proj_in") == "middle_block.1.proj_in"
    assert sgm_name("up_blocks.0.attentions.2.proj_out") == "output_blocks.2.1.proj_out"
    assert sgm_name("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert sgm_name("down_blocks.0.downsamplers.0.conv") == "input_blocks.3.0.op"
    assert sgm_name("up_blocks.2.resnets.1.conv_shortcut") == "output_blocks.7.0.skip_connection"


# --- LoRA files -------------------------------------------------------------------------


def _layers(model: torch.nn.Module, parts: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Every linear and conv layer (whose name contains one of ``parts``, if given)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and (not parts or any(p in n for p in parts))}


def _kohya_entry(tensors: dict, key: str, shape, seed: int, alpha: float):
    down, up = factors(shape, seed=seed, std=STD)
    tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)})
    return down, up


def _alpha(module: str, i: int, alphas=None) -> float:
    """Per-layer alphas: ``alphas`` in turn, or (``None``) ATTENTION_ALPHA for attention
    layers and ALPHAS in turn for the others."""
    if alphas is None:
        return ATTENTION_ALPHA if "attn" in module else ALPHAS[i % len(ALPHAS)]
    return alphas[i % len(alphas)]


def _kohya_unet(pipe: Pipeline, seed: int, name=sgm_name) -> dict[str, torch.Tensor]:
    tensors = {}
    for i, (module, shape) in enumerate(_layers(pipe.unet).items()):
        _kohya_entry(tensors, "lora_unet_" + name(module).replace(".", "_"), shape, seed + i, _alpha(module, i))
    return tensors


def _kohya_text(pipe: Pipeline, seed: int, alphas=None) -> tuple[dict, dict]:
    """kohya-ss names (``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``) for every
    linear layer of both encoders; returns the tensors and ``{component.module: delta}``."""
    tensors, deltas = {}, {}
    # alphas None: those diffusers reads right (CLIP ViT-L: one for all layers; see the module docs)
    encoders = (("lora_te1_", "text_encoder", alphas or (ATTENTION_ALPHA,)), ("lora_te2_", "text_encoder_2", alphas))
    for c, (prefix, component, chosen) in enumerate(encoders):
        for i, (module, shape) in enumerate(_layers(getattr(pipe, component)).items()):
            alpha = _alpha(module, i, chosen)
            down, up = _kohya_entry(tensors, prefix + module.replace(".", "_"), shape, seed + 1000 * c + i, alpha)
            deltas[f"{component}.{module}"] = alpha / RANK * lora_delta(down, up)
    return tensors, deltas


def _peft_file(path, pipe: Pipeline, seed: int) -> None:
    """diffusers/PEFT names for the three components (CLIPTextModel without the
    ``text_model`` level, as transformers 5 names it; CLIPTextModelWithProjection with
    it), alphas and an alpha pattern in the metadata."""
    tensors = {}
    components = (("unet", ("attentions", "resnets")), ("text_encoder", ("encoder.layers",)),
                  ("text_encoder_2", ("encoder.layers",)))
    for c, (component, parts) in enumerate(components):
        for i, (module, shape) in enumerate(_layers(getattr(pipe, component), parts).items()):
            down, up = factors(shape, seed=seed + 1000 * c + i, std=STD)
            name = module.removeprefix("text_model.") if component == "text_encoder" else module
            tensors.update({f"{component}.{name}.lora_A.weight": down, f"{component}.{name}.lora_B.weight": up})
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    meta = {"unet.r": RANK, "unet.lora_alpha": 8, "text_encoder.r": RANK, "text_encoder.lora_alpha": 2,
            "text_encoder_2.r": RANK, "text_encoder_2.lora_alpha": 6,
            "text_encoder_2.alpha_pattern": {"text_model.encoder.layers.1.mlp.fc1": 1},
            "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "proj", "net.2",
                                    "conv1", "conv2", "time_emb_proj", "conv_shortcut"],
            "text_encoder.target_modules": text_targets, "text_encoder_2.target_modules": text_targets}
    save_safetensors(tensors, path, {"lora_adapter_metadata": json.dumps(meta)})


def _assert_lora_parity(ref, base: np.ndarray, pipe: Pipeline) -> None:
    """Images with diffusers' PEFT layers, then its fused weights, equal ldm's."""
    expected, ours = _ref_images(ref), _images(pipe)
    assert np.abs(expected - base).max() > EFFECT  # the LoRA does something
    assert np.abs(expected - ours).max() <= PIXELS
    ref.fuse_lora()
    ref.unload_lora_weights()
    for component, module in _components(pipe).items():
        assert _max_diff(module, getattr(ref, component)) <= WEIGHTS, component


def test_kohya_sdxl_lora_matches_diffusers(xl, sdxl_folder, tmp_path):
    """Every U-Net layer in SGM names (conv_in, time and label embeddings included) with
    per-layer alphas, and every layer of both text encoders."""
    text, _ = _kohya_text(xl, seed=5000)
    save_safetensors({**_kohya_unet(xl, seed=1), **text}, tmp_path / "k.safetensors",
                     {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})
    ref = _reference(sdxl_folder)
    base = _ref_images(ref)
    ref.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="k")
    before = _state(xl)
    assert xl.load_lora(tmp_path / "k.safetensors") == "k"
    assert xl.loras.loaded[0].layers == sum(len(_layers(m)) for m in _components(xl).values())
    assert len(_changed(xl, before)) == xl.loras.loaded[0].layers
    _assert_lora_parity(ref, base, xl)


def test_kohya_diffusers_layout_names_are_the_same_layers(xl, tmp_path):
    save_safetensors(_kohya_unet(xl, seed=1), tmp_path / "sgm.safetensors")
    save_safetensors(_kohya_unet(xl, seed=1, name=lambda n: n), tmp_path / "diffusers.safetensors")
    xl.load_lora(tmp_path / "sgm.safetensors")
    merged = _state(xl)
    xl.unload_lora()
    xl.load_lora(tmp_path / "diffusers.safetensors")
    assert _changed(xl, merged) == []  # bit-identical


def test_kohya_text_encoders_follow_the_formula(xl, sdxl_folder, tmp_path):
    """te1 -> CLIP ViT-L, te2 -> bigG (text_projection too), per-layer alphas, names with
    and without the text_model level; text_encoder_scale multiplies both encoders."""
    tensors, deltas = _kohya_text(xl, seed=7000, alphas=(1.0, 2.0, 8.0))
    short = "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    for key in [k for k in tensors if k.startswith(short + ".")]:
        tensors[key.replace("text_model_", "")] = tensors.pop(key)
    save_safetensors(tensors, tmp_path / "te.safetensors")
    ref = _reference(sdxl_folder)  # the weights as diffusers / transformers load them
    xl.load_lora(tmp_path / "te.safetensors", scale=0.5, text_encoder_scale=1.5)
    worst = 0.0
    for name, delta in deltas.items():
        component, _, module = name.partition(".")
        theirs = getattr(ref, component).get_submodule(module.removeprefix("text_model.")
                                                       if component == "text_encoder" else module)
        ours = getattr(xl, component).get_submodule(module)
        worst = max(worst, (ours.weight - (theirs.weight + 1.5 * delta)).abs().max().item())
    assert worst <= WEIGHTS
    assert {k.split(".")[0] for k in deltas} == {"text_encoder", "text_encoder_2"}


def test_peft_sdxl_lora_matches_diffusers(xl, sdxl_folder, tmp_path):
    _peft_file(tmp_path / "p.safetensors", xl, seed=2)
    ref = _reference(sdxl_folder)
    base = _ref_images(ref)
    ref.load_lora_weights(str(tmp_path / "p.safetensors"), adapter_name="p")
    xl.load_lora(tmp_path / "p.safetensors")
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the encoders' own outputs (the prompts alone could hide a layer)
        for component in ("text_encoder", "text_encoder_2"):
            expected = getattr(ref, component)(ids, output_hidden_states=True).hidden_states[-2]
            assert (expected - getattr(xl, component)(ids)).abs().max() < 1e-4, component
    _assert_lora_parity(ref, base, xl)


def test_two_loras_scales_and_unload(xl, tmp_path):
    """Unloading gives back every weight bit for bit (the fixture checks the last step)."""
    before = _state(xl)
    save_safetensors({**_kohya_unet(xl, seed=3), **_kohya_text(xl, seed=9000)[0]}, tmp_path / "k.safetensors")
    _peft_file(tmp_path / "p.safetensors", xl, seed=4)
    xl.load_lora(tmp_path / "k.safetensors", scale=0.7)
    xl.load_lora(tmp_path / "p.safetensors", scale=1.3, text_encoder_scale=0.4)
    both = _state(xl)
    xl.set_lora_scale("k", 0.0)
    xl.set_lora_scale("k", 0.7)
    assert _changed(xl, both) == []
    xl.unload_lora("p")
    xl.unload_lora("k")
    assert _changed(xl, before) == []


# --- the refiner: bigG is its text_encoder --------------------------------------------------


def test_refiner_te2_entries_go_to_its_bigg(refiner, sdxl_refiner_folder, tmp_path):
    """kohya ``lora_te2_`` and PEFT ``text_encoder_2.`` entries change ldm's refiner
    ``text_encoder`` (bigG) as StableDiffusionXLImg2ImgPipeline.load_lora_weights changes
    its ``text_encoder_2``."""
    layers = _layers(refiner.text_encoder, ("encoder.layers",))
    kohya, peft = {}, {}
    for i, (module, shape) in enumerate(layers.items()):
        _kohya_entry(kohya, f"lora_te2_{module.replace('.', '_')}", shape, i, _alpha(module, i))
        down, up = factors(shape, seed=100 + i, std=STD)
        peft.update({f"text_encoder_2.{module}.lora_A.weight": down, f"text_encoder_2.{module}.lora_B.weight": up})
    for name, tensors in (("kohya", kohya), ("peft", peft)):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors")
        ref = _reference(sdxl_refiner_folder)
        ref.load_lora_weights(str(tmp_path / f"{name}.safetensors"), adapter_name=name)
        ref.fuse_lora()
        ref.unload_lora_weights()
        before = _state(refiner)
        refiner.load_lora(tmp_path / f"{name}.safetensors")
        assert len(_changed(refiner, before)) == len(layers)
        assert _max_diff(refiner.text_encoder, ref.text_encoder_2) <= WEIGHTS, name
        refiner.unload_lora()


# --- refusals --------------------------------------------------------------------------------


def _refused(pipe: Pipeline, path, tensors, *patterns, metadata=None) -> str:
    """Loading must fail naming ``path`` and every pattern, and change no weight."""
    if tensors is not None:
        save_safetensors(tensors, path, metadata)
    before = _state(pipe)
    with pytest.raises(CheckpointError) as info:
        pipe.load_lora(path)
    for pattern in (str(path), *patterns):
        assert pattern in str(info.value), (pattern, str(info.value))
    assert _changed(pipe, before) == [] and len(pipe.loras) == 0
    return str(info.value)


ATTN2 = "down_blocks_1_attentions_0_transformer_blocks_0_attn2"


@pytest.mark.parametrize("width, family", [(768, "SD 1.x"), (1024, "SD 2.x")])
def test_sd_unet_lora_on_sdxl_names_both_widths(xl, tmp_path, width, family):
    tensors = {**_kohya_unet(xl, seed=1)}
    _kohya_entry(tensors, f"lora_unet_{ATTN2}_to_k", (64, width), 0, 4.0)
    _refused(xl, tmp_path / "sd.safetensors", tensors, f"is for {family}", f"cross-attention width {width}",
             "the model is sdxl", f"cross-attention width {CONTEXT}")


def test_sd_text_encoder_lora_on_sdxl_is_refused_by_name(xl, tmp_path):
    tensors = {}
    _kohya_entry(tensors, "lora_te_text_model_encoder_layers_0_mlp_fc1", (64, CLIP_L_WIDTH), 0, 4.0)
    _refused(xl, tmp_path / "sd1.safetensors", {**_kohya_unet(xl, seed=1), **tensors},
             "SD 1.x/2.x (one text encoder)", "not an SDXL base model", "lora_te_text_model_encoder_layers_0_mlp_fc1")


def test_second_encoder_width_is_checked(xl, tmp_path):
    tensors = {}
    _kohya_entry(tensors, "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (CLIP_G_WIDTH, 768), 0, 4.0)
    _refused(xl, tmp_path / "te2.safetensors", tensors, "is for SD 1.x (CLIP ViT-L)", "second text-encoder width 768",
             f"second text-encoder width {CLIP_G_WIDTH}")


@pytest.mark.parametrize("metadata, family", [
    ({"ss_v2": "True"}, "sd2"), ({"ss_base_model_version": "sd_v1"}, "sd1"), ({"ss_v2": "False"}, "sd1"),
])
def test_sd_metadata_on_sdxl_is_refused(xl, tmp_path, metadata, family):
    key, value = next(iter(metadata.items()))
    _refused(xl, tmp_path / "meta.safetensors", _kohya_unet(xl, seed=1), f"trained on {family} ({key}={value!r}",
             "the model is sdxl", metadata=metadata)


def test_sdxl_lora_on_sd1_names_both(sd1, tmp_path):
    tensors = {}
    _kohya_entry(tensors, "lora_te1_text_model_encoder_layers_0_mlp_fc1", (64, 768), 0, 4.0)
    _kohya_entry(tensors, "lora_te2_text_model_encoder_layers_0_mlp_fc1", (64, 1280), 1, 4.0)
    _refused(sd1, tmp_path / "xl.safetensors", tensors, "this LoRA is for SDXL (two text encoders)",
             "not a Stable Diffusion 1.x/2.x model", "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight")
    unet = {}
    _kohya_entry(unet, f"lora_unet_{ATTN2}_to_k", (64, 2048), 0, 4.0)
    _refused(sd1, tmp_path / "xl_unet.safetensors", unet, "trained on SDXL", "the model is sd1",
             metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"})


def test_refiner_refuses_clip_l_and_base_entries(refiner, xl_pipe, tmp_path):
    tensors = {}
    _kohya_entry(tensors, "lora_te1_text_model_encoder_layers_0_mlp_fc1", (64, CLIP_L_WIDTH), 0, 4.0)
    _refused(refiner, tmp_path / "te1.safetensors", tensors, "its CLIP ViT-L text encoder, which the refiner does "
             "not have", "not an SDXL refiner")
    peft = {"text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, CLIP_L_WIDTH),
            "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(64, 4)}
    _refused(refiner, tmp_path / "peft_te1.safetensors", peft, "which the refiner does not have")
    # the base's U-Net: its cross-attention takes both encoders' widths
    _refused(refiner, tmp_path / "base.safetensors", _kohya_unet(xl_pipe, seed=1),
             f"cross-attention width {CONTEXT}", "the model is sdxl-refiner", f"cross-attention width {CLIP_G_WIDTH}")


# --- textual inversion ---------------------------------------------------------------------


def _sdxl_embedding(path, n: int, seed: int, widths=(CLIP_L_WIDTH, CLIP_G_WIDTH)) -> dict[str, torch.Tensor]:
    """An SDXL embedding file as A1111 / kohya-ss write it: ``clip_l`` and ``clip_g``."""
    gen = torch.Generator().manual_seed(seed)
    parts = {"clip_l": torch.randn(n, widths[0], generator=gen), "clip_g": torch.randn(n, widths[1], generator=gen)}
    save_file(parts, str(path))
    return parts


def _reference_with(folder, embeddings: dict[str, dict[str, torch.Tensor]]):
    """diffusers' pipeline with each embedding loaded the documented way: clip_l into
    text_encoder / tokenizer, clip_g into text_encoder_2 / tokenizer_2 (the refiner: clip_g only)."""
    ref = _reference(folder)
    for token, parts in embeddings.items():
        if ref.text_encoder is not None:
            ref.load_textual_inversion(parts["clip_l"], token=token, text_encoder=ref.text_encoder,
                                       tokenizer=ref.tokenizer)
        ref.load_textual_inversion(parts["clip_g"], token=token, text_encoder=ref.text_encoder_2,
                                   tokenizer=ref.tokenizer_2)
    return ref


def _pooled_at_end_token(ref, text: str) -> torch.Tensor:
    """SGM's pooled embedding (``FrozenOpenCLIPEmbedder2.pool``): bigG's last layer, normed,
    at the end token, through text_projection; from the reference encoder."""
    tokenizer, encoder = ref.tokenizer_2, ref.text_encoder_2
    ids = tokenizer(ref.maybe_convert_prompt(text, tokenizer), padding="max_length", max_length=77,
                    truncation=True, return_tensors="pt").input_ids
    end = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    with torch.no_grad():
        last = encoder(ids).last_hidden_state
        return encoder.text_projection(last[:, end])


def test_sdxl_embedding_matches_diffusers_in_both_encoders(xl, sdxl_folder, tmp_path):
    """A 3-vector embedding in the prompt and a 1-vector one in the negative prompt."""
    files = {"zxqstyle": _sdxl_embedding(tmp_path / "zxqstyle.safetensors", 3, seed=1),
             "zxqneg": _sdxl_embedding(tmp_path / "zxqneg.safetensors", 1, seed=2)}
    ref = _reference_with(sdxl_folder, files)
    for token in files:
        assert xl.load_embedding(tmp_path / f"{token}.safetensors") == token
    prompt, negative = "a cat wearing a hat, zxqstyle, in the snow", "zxqneg, blurry"
    with torch.no_grad():
        expected, expected_neg, _, _ = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=True, negative_prompt=negative)
    cond, uncond = xl.encode_prompts([prompt], [negative])
    assert (cond.context - expected).abs().max() <= EMBEDS
    assert (uncond.context - expected_neg).abs().max() <= EMBEDS
    assert (cond.pooled - _pooled_at_end_token(ref, prompt)).abs().max() <= EMBEDS
    assert (uncond.pooled - _pooled_at_end_token(ref, negative)).abs().max() <= EMBEDS
    xl.unload_embedding()  # the embeddings matter, in both encoders' halves of the context
    plain, _ = xl.encode_prompts([prompt], [negative])
    for half in (slice(0, CLIP_L_WIDTH), slice(CLIP_L_WIDTH, None)):
        assert (plain.context[..., half] - expected[..., half]).abs().max() > 1e-2


def test_images_match_diffusers_with_embeddings_in_prompt_and_negative(xl, sdxl_folder, tmp_path):
    files = {"zxqstyle": _sdxl_embedding(tmp_path / "zxqstyle.safetensors", 2, seed=3),
             "zxqneg": _sdxl_embedding(tmp_path / "zxqneg.safetensors", 4, seed=4)}
    ref = _reference_with(sdxl_folder, files)
    # The real end-token id, so that transformers pools at the end token (see the module docs).
    ref.text_encoder_2.text_model.eos_token_id = ref.tokenizer_2.eos_token_id
    for token in files:
        xl.load_embedding(tmp_path / f"{token}.safetensors")
    prompts, negative = ["a cat wearing a hat, zxqstyle", "a red circle"], "zxqneg, blurry"
    expected = ref(prompts, negative_prompt=[negative] * 2, num_inference_steps=STEPS, guidance_scale=7.5,
                   generator=[torch.Generator("cpu").manual_seed(7 + k) for k in range(2)], height=SIZE,
                   width=SIZE, output_type="np").images
    settings = dict(steps=STEPS, guidance_scale=7.5, seed=7, width=SIZE, height=SIZE, sampler="euler",
                    output="np", progress=False)
    assert np.abs(xl(prompts, negative_prompt=negative, **settings) - expected).max() <= PIXELS
    xl.unload_embedding()
    assert np.abs(xl(prompts, negative_prompt=negative, **settings) - expected).max() > EFFECT


def test_both_matrices_get_the_rows_at_the_same_ids_and_unload_restores_them(xl, tmp_path):
    layers = [encoder.text_model.get_input_embeddings() for encoder in xl.text_encoders]
    before = [layer.weight.detach().clone() for layer in layers]
    vocab = before[0].shape[0]
    parts = _sdxl_embedding(tmp_path / "zxqrows.safetensors", 3, seed=5)
    xl.load_embedding(tmp_path / "zxqrows.safetensors")
    for layer, key in zip(layers, ("clip_l", "clip_g")):
        assert layer.num_embeddings == vocab + 3 and torch.equal(layer.weight[vocab:], parts[key])
    assert xl.embeddings.units(xl.tokenizer.encode("a zxqrows")) == [xl.tokenizer.encode("a"),
                                                                     [vocab, vocab + 1, vocab + 2]]
    xl.unload_embedding()
    for layer, original in zip(layers, before):
        assert layer.num_embeddings == vocab and torch.equal(layer.weight, original)


def _refused_embedding(pipe: Pipeline, path, *patterns) -> None:
    with pytest.raises(EmbeddingError) as info:
        pipe.load_embedding(path)
    for pattern in (str(path), *patterns):
        assert pattern in str(info.value), (pattern, str(info.value))
    assert pipe.embeddings.tokens == []


def test_one_encoder_embeddings_on_sdxl_are_refused_with_both_widths(xl, tmp_path):
    for width, family in ((768, "768 wide (SD1.x, CLIP ViT-L)"), (CLIP_L_WIDTH, f"{CLIP_L_WIDTH} wide")):
        save_file({"emb_params": torch.randn(2, width)}, str(tmp_path / "sd1.safetensors"))
        _refused_embedding(xl, tmp_path / "sd1.safetensors", f"one tensor, {family}",
                           f"two text encoders, {CLIP_L_WIDTH} wide and {CLIP_G_WIDTH} wide", "'clip_l' and a 'clip_g'")


def test_sdxl_embedding_on_sd1_is_refused_with_both_widths(sd1, tmp_path):
    _sdxl_embedding(tmp_path / "xl.safetensors", 2, seed=0, widths=(768, 1280))
    width = sd1.text_encoder.config.hidden_size
    _refused_embedding(sd1, tmp_path / "xl.safetensors", "an SDXL embedding", "clip_l 768 wide",
                       "clip_g 1280 wide (SDXL, OpenCLIP ViT-bigG)", "needs an SDXL model", f"single CLIP (SD1/SD2), "
                       f"{width} wide")


def test_malformed_sdxl_embeddings_are_refused(xl, tmp_path):
    _sdxl_embedding(tmp_path / "wide.safetensors", 2, seed=0, widths=(CLIP_L_WIDTH, 1280))
    _refused_embedding(xl, tmp_path / "wide.safetensors", "'clip_g' is 1280 wide (SDXL, OpenCLIP ViT-bigG)",
                       f"OpenCLIP ViT-bigG text encoder is {CLIP_G_WIDTH} wide")
    save_file({"clip_l": torch.randn(2, CLIP_L_WIDTH), "clip_g": torch.randn(3, CLIP_G_WIDTH)},
              str(tmp_path / "count.safetensors"))
    _refused_embedding(xl, tmp_path / "count.safetensors", "'clip_l' has 2 vectors but 'clip_g' has 3")
    save_file({"clip_g": torch.randn(2, CLIP_G_WIDTH)}, str(tmp_path / "half.safetensors"))
    _refused_embedding(xl, tmp_path / "half.safetensors", "exactly two tensors, 'clip_l' and 'clip_g'",
                       "found keys ['clip_g']")
    with pytest.raises(EmbeddingError, match="contains NaN or inf"):
        xl.embeddings.add("zxqnan", {"clip_l": torch.full((1, CLIP_L_WIDTH), float("nan")),
                                     "clip_g": torch.zeros(1, CLIP_G_WIDTH)})
    assert xl.embeddings.tokens == []


def test_refiner_takes_clip_g_and_bigg_wide_tensors(refiner, sdxl_refiner_folder, tmp_path):
    parts = _sdxl_embedding(tmp_path / "zxqxl.safetensors", 2, seed=6)
    ref = _reference_with(sdxl_refiner_folder, {"zxqxl": parts})
    assert refiner.load_embedding(tmp_path / "zxqxl.safetensors") == "zxqxl"
    prompt = "a zxqxl cat"
    with torch.no_grad():
        expected = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)[0]
    assert (refiner.encode_prompts([prompt])[0].context - expected).abs().max() <= EMBEDS
    layer = refiner.text_encoder.text_model.get_input_embeddings()
    assert torch.equal(layer.weight[-2:], parts["clip_g"])
    save_file({"emb_params": torch.randn(1, CLIP_G_WIDTH)}, str(tmp_path / "zxqg.safetensors"))
    assert refiner.load_embedding(tmp_path / "zxqg.safetensors") == "zxqg"
    save_file({"emb_params": torch.randn(1, CLIP_L_WIDTH)}, str(tmp_path / "zxql.safetensors"))
    with pytest.raises(EmbeddingError, match=f"is {CLIP_L_WIDTH} wide but this model's text encoder is "
                                             f"{CLIP_G_WIDTH} wide"):
        refiner.load_embedding(tmp_path / "zxql.safetensors")


def test_adapters_need_every_text_encoder(xl_pipe):
    with pytest.raises(ValueError, match="the sdxl model has 2 text encoder\\(s\\) but 1 were given"):
        LoraSet(xl_pipe.unet, xl_pipe.text_encoder, xl_pipe.config)
    with pytest.raises(TypeError, match="torch.nn.Module or a sequence"):
        LoraSet(xl_pipe.unet, [xl_pipe.text_encoder, "bigG"], xl_pipe.config)
    with pytest.raises(ValueError, match="2 text encoders but 1 tokenizers"):
        EmbeddingTable(xl_pipe.text_encoders, xl_pipe.tokenizer)
    with pytest.raises(TypeError, match="a TextEncoder or a sequence of one or two"):
        EmbeddingTable([xl_pipe.text_encoder] * 3, [xl_pipe.tokenizer] * 3)
    with pytest.raises(TypeError, match="a tensor or a dict of 'clip_l' and 'clip_g'"):
        xl_pipe.embeddings.add("zxq", [0.0] * CLIP_L_WIDTH)
