"""LoRA parity with diffusers: the same file loaded by ``StableDiffusionPipeline.load_lora_weights``
(PEFT layers) and by ``Pipeline.load_lora`` (merged weights) gives the same images.

Tiny SD1 (eps, conv proj_in) and SD2-v (linear proj_in) models with random weights; LoRA
factors random with std 0.05 on every attention linear, proj_in/proj_out, feed-forward and
ResNet layer (3x3 LoCon convs included) and, for PEFT files, every text-encoder layer;
per-layer alphas. Same prompts, negative prompt, guidance 7.5, 3 Euler steps, per-image
CPU generators. Known gap in the reference: diffusers 0.42 with transformers 5 mis-loads
the text-encoder half of kohya files, so that half is checked against the published
formula instead. Also: unloading restores every weight bit for bit, and a scale set later
gives exactly the weights of loading with it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldm import Pipeline
from ldm.checkpoints.files import save_safetensors
from reference import load_reference_pipeline
from test_lora_formats import ORIGINAL_NAMES, changed, factors, lora_delta, snapshot, weight

SIZE = 64
STEPS = 3
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels
EFFECT = 0.05  # a LoRA must change some pixel by more than this, or the parity proves nothing
STD = 0.05  # of the random LoRA factors
ALPHAS = (1.0, 8.0)
# diffusers reads a kohya file's per-layer alphas into PEFT's alpha_pattern, but under
# attention-processor names (``attn1.processor.to_q_lora.down.weight``) that match no layer,
# so attention layers get the file's most common alpha: give them all that one (other
# layers vary, and test_kohya_text_encoder_follows_the_formula varies every layer's alpha).
ATTENTION_ALPHA = 2.0

# Tiny models: one thread (multi-threaded kernels crawl when the cores are shared).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipes(sd1_folder, sd2v_folder):
    return {"sd1": (sd1_folder, Pipeline.from_pretrained(sd1_folder, device="cpu")),
            "sd2v": (sd2v_folder, Pipeline.from_pretrained(sd2v_folder, device="cpu"))}


def _restoring(folder, pipe: Pipeline):
    """Hands out (folder, pipeline); afterwards unloads every LoRA, which must restore it."""
    before = snapshot(pipe)
    yield folder, pipe
    pipe.unload_lora()
    assert changed(pipe, before) == []


@pytest.fixture
def sd1(pipes):
    yield from _restoring(*pipes["sd1"])


@pytest.fixture(params=["sd1", "sd2v"])
def each(pipes, request):
    yield from _restoring(*pipes[request.param])


def _reference(folder):
    from diffusers import EulerDiscreteScheduler

    ref = load_reference_pipeline(folder)
    ref.scheduler = EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref


def _load_both(folder, pipe: Pipeline, path, original_layout: bool = False):
    """diffusers' pipeline with its images before the LoRA, then the LoRA in both (diffusers
    maps original-layout U-Net names only when given the U-Net config)."""
    ref = _reference(folder)
    base = _ref_images(ref)
    options = {"unet_config": ref.unet.config} if original_layout else {}
    ref.load_lora_weights(str(path), adapter_name=path.stem, **options)
    pipe.load_lora(path)
    return ref, base


def _ref_images(ref) -> np.ndarray:
    generators = [torch.Generator("cpu").manual_seed(100 + k) for k in range(len(PROMPTS))]
    return ref(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5,
               generator=generators, height=SIZE, width=SIZE, output_type="np").images


def _images(pipe: Pipeline) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, seed=100, width=SIZE,
                height=SIZE, sampler="euler", output="np", progress=False)


def _assert_parity(ref, base: np.ndarray, pipe: Pipeline) -> None:
    expected, ours = _ref_images(ref), _images(pipe)
    assert np.abs(expected - base).max() > EFFECT  # the LoRA does something
    assert np.abs(expected - ours).max() <= TOLERANCE


def _layers(pipe: Pipeline, component: str) -> dict[str, tuple[int, ...]]:
    """The layers a LoRA of these tests covers: module name -> weight shape."""
    model = getattr(pipe, component)
    parts = ("attentions", "resnets") if component == "unet" else ("encoder.layers",)
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(p in n for p in parts)}


def _kohya_file(path, pipe: Pipeline, seed: int, text: bool = False, alphas=None):
    """A kohya-ss file with per-layer alphas (cycling through ``alphas`` if given);
    returns {(component, module): (down, up, alpha)}."""
    tensors, entries = {}, {}
    components = ("unet", "text_encoder") if text else ("unet",)
    for c, component in enumerate(components):
        for i, (name, shape) in enumerate(_layers(pipe, component).items()):
            down, up = factors(shape, seed=seed + 1000 * c + i, std=STD)
            if alphas:
                alpha = alphas[i % len(alphas)]
            else:
                alpha = ATTENTION_ALPHA if ".attn" in name else ALPHAS[i % len(ALPHAS)]
            key = ("lora_unet_" if component == "unet" else "lora_te_") + name.replace(".", "_")
            tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                            f"{key}.alpha": torch.tensor(alpha)})
            entries[component, name] = (down, up, alpha)
    save_safetensors(tensors, path)
    return entries


def _peft_file(path, pipe: Pipeline, seed: int) -> None:
    """A diffusers/PEFT file (transformers-5 text-encoder names), alphas in its metadata."""
    tensors = {}
    for c, component in enumerate(("unet", "text_encoder")):
        for i, (name, shape) in enumerate(_layers(pipe, component).items()):
            down, up = factors(shape, seed=seed + 1000 * c + i, std=STD)
            key = f"{component}.{name.removeprefix('text_model.')}"
            tensors.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "text_encoder.r": 4, "text_encoder.lora_alpha": 2,
            "text_encoder.alpha_pattern": {"encoder.layers.0.self_attn.q_proj": 6},
            "unet.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "proj", "net.2",
                                    "conv1", "conv2", "time_emb_proj", "conv_shortcut"],
            "text_encoder.target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
    save_safetensors(tensors, path, {"lora_adapter_metadata": json.dumps(meta)})


def test_kohya_unet_parity(each, tmp_path):
    folder, pipe = each
    _kohya_file(tmp_path / "k.safetensors", pipe, seed=1)
    _assert_parity(*_load_both(folder, pipe, tmp_path / "k.safetensors"), pipe)


def test_kohya_original_layout_parity(sd1, tmp_path):
    """U-Net names in the original layout (input_blocks_1_1_...), which diffusers maps with
    the U-Net config given (its map sends an attention-less level's upsampler to
    ``attentions``, so that one layer is left out)."""
    folder, pipe = sd1
    names = {v: k for k, v in ORIGINAL_NAMES.items() if k != "output_blocks.1.1.conv"}
    tensors = {}
    for i, (internal, original) in enumerate(names.items()):
        down, up = factors(weight(pipe, f"unet.{internal}").shape, seed=i)
        key = "lora_unet_" + original.replace(".", "_")
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(ATTENTION_ALPHA if ".attn" in internal or i % 2 else 8.0)})
    save_safetensors(tensors, tmp_path / "o.safetensors")
    ref, base = _load_both(folder, pipe, tmp_path / "o.safetensors", original_layout=True)
    _assert_parity(ref, base, pipe)


def test_peft_parity_with_text_encoder(each, tmp_path):
    folder, pipe = each
    _peft_file(tmp_path / "p.safetensors", pipe, seed=2)
    ref, base = _load_both(folder, pipe, tmp_path / "p.safetensors")
    _assert_parity(ref, base, pipe)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref.text_encoder(ids)[0] - pipe.text_encoder(ids)).abs().max()
    assert diff < 1e-4  # the text-encoder half too (this test's prompts alone could hide it)


def test_two_loras_each_with_its_scale(sd1, tmp_path):
    folder, pipe = sd1
    _kohya_file(tmp_path / "k.safetensors", pipe, seed=3)
    _peft_file(tmp_path / "p.safetensors", pipe, seed=4)
    ref = _reference(folder)
    base = _ref_images(ref)
    ref.load_lora_weights(str(tmp_path / "k.safetensors"), adapter_name="k")
    ref.load_lora_weights(str(tmp_path / "p.safetensors"), adapter_name="p")
    pipe.load_lora(tmp_path / "k.safetensors", scale=0.6)
    pipe.load_lora(tmp_path / "p.safetensors", scale=1.4)
    ref.set_adapters(["k", "p"], adapter_weights=[0.6, 1.4])
    _assert_parity(ref, base, pipe)
    pipe.set_lora_scale("k", 1.2)
    pipe.set_lora_scale("p", -0.3)
    ref.set_adapters(["k", "p"], adapter_weights=[1.2, -0.3])
    _assert_parity(ref, base, pipe)
    pipe.unload_lora("k")
    ref.delete_adapters("k")
    ref.set_adapters(["p"], adapter_weights=[-0.3])
    _assert_parity(ref, base, pipe)


def test_kohya_text_encoder_follows_the_formula(sd1, tmp_path):
    """W + multiplier * alpha / rank * up @ down, the text encoder with its own multiplier,
    every layer with its own alpha."""
    _, pipe = sd1
    before = snapshot(pipe)
    entries = _kohya_file(tmp_path / "k.safetensors", pipe, seed=5, text=True, alphas=(0.5, 1.0, 3.0, 8.0))
    pipe.load_lora(tmp_path / "k.safetensors", scale=0.9, text_encoder_scale=0.5)
    assert sum(c == "text_encoder" for c, _ in entries) == 12
    for (component, name), (down, up, alpha) in entries.items():
        multiplier = 0.5 if component == "text_encoder" else 0.9
        w0 = before[f"{component}.{name}.weight"]
        expected = w0 + multiplier * alpha / down.shape[0] * lora_delta(down, up)
        torch.testing.assert_close(weight(pipe, f"{component}.{name}"), expected, rtol=0, atol=1e-6)


def test_unload_restores_every_weight_bit_for_bit(sd1, sd1_folder, tmp_path):
    _, pipe = sd1
    _kohya_file(tmp_path / "k.safetensors", pipe, seed=6, text=True)
    _peft_file(tmp_path / "p.safetensors", pipe, seed=7)
    half = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.float16)
    for model in (pipe, half):
        before = snapshot(model)
        for order in (("k", "p"), ("p", "k")):
            model.load_lora(tmp_path / "k.safetensors", 0.7)
            model.load_lora(tmp_path / "p.safetensors", 1.3, text_encoder_scale=0.2)
            assert changed(model, before)
            for name in order:
                model.unload_lora(name)
            assert changed(model, before) == []
        model.load_lora(tmp_path / "k.safetensors")
        model.load_lora(tmp_path / "p.safetensors")
        model.unload_lora()
        assert changed(model, before) == []
    # a model cast after loading gets the cast of its original weights back
    half.load_lora(tmp_path / "k.safetensors")
    half.to(dtype=torch.float32)
    half.unload_lora()
    assert changed(half, {k: v.float() for k, v in before.items()}) == []


def test_set_scale_gives_the_weights_of_loading_with_it(sd1, tmp_path):
    _, pipe = sd1
    _kohya_file(tmp_path / "k.safetensors", pipe, seed=8, text=True)
    _peft_file(tmp_path / "p.safetensors", pipe, seed=9)
    pipe.load_lora(tmp_path / "k.safetensors", 0.4)
    pipe.load_lora(tmp_path / "p.safetensors", 1.0)
    pipe.set_lora_scale("k", -0.8, text_encoder_scale=1.5)
    pipe.set_lora_scale("p", 0.25)
    switched = snapshot(pipe)
    pipe.unload_lora()
    pipe.load_lora(tmp_path / "k.safetensors", -0.8, text_encoder_scale=1.5)
    pipe.load_lora(tmp_path / "p.safetensors", 0.25)
    assert changed(pipe, switched) == []
    assert [(x.name, x.unet_scale, x.text_encoder_scale) for x in pipe.loras.loaded] == [
        ("k", -0.8, 1.5), ("p", 0.25, 0.25)]
