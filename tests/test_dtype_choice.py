"""The default dtype on CPU: the faster of float32 and bfloat16 on this machine, never an
emulated path (capability check and speed probe mocked); an explicit dtype always wins."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from ldm import Pipeline
from ldm import dtypes

CPU = torch.device("cpu")


@pytest.fixture
def rule(monkeypatch):
    """The automatic rule with ``$LDM_CPU_DTYPE`` unset (conftest pins it to float32 for the
    parity tests) and its once-per-process cache emptied before and after."""
    monkeypatch.delenv(dtypes.CPU_DTYPE_ENV, raising=False)
    dtypes._measured_cpu_dtype.cache_clear()
    yield monkeypatch
    dtypes._measured_cpu_dtype.cache_clear()


def machine(monkeypatch, native: bool, speedup: float | None = None) -> None:
    """A CPU that does (not) compute bfloat16 natively, whose probe measures ``speedup``;
    on an emulating CPU the probe must not even run (it would take seconds)."""
    def probe() -> float:
        if speedup is None:
            raise AssertionError("the bfloat16 probe ran on a CPU that emulates bfloat16")
        return speedup

    monkeypatch.setattr(dtypes, "native_bf16", lambda device: native)
    monkeypatch.setattr(dtypes, "bf16_speedup", probe)


def test_avx2_only_cpu_defaults_to_float32_without_probing(rule):
    machine(rule, native=False)
    assert dtypes.default_dtype(CPU) == torch.float32


@pytest.mark.parametrize("speedup, expected", [
    (3.0, torch.bfloat16),  # AMX-like: native and clearly faster
    (dtypes.BF16_MIN_SPEEDUP, torch.bfloat16),
    (1.1, torch.float32),  # within the probe's noise: not worth bfloat16's precision
    (0.74, torch.float32),  # AVX512-BF16 without AMX, as measured on a Xeon: native but slower
])
def test_native_bf16_is_the_default_only_where_measured_faster(rule, speedup, expected, caplog):
    machine(rule, native=True, speedup=speedup)
    with caplog.at_level(logging.INFO, logger="ldm"):
        assert dtypes.default_dtype(CPU) == expected
        assert dtypes.default_dtype(CPU) == expected
    # Decided and logged once per process, with the measured ratio.
    assert caplog.text.count("default dtype on CPU") == 1 and f"{speedup:.2f}x" in caplog.text


def test_other_devices_keep_their_defaults(rule):
    machine(rule, native=True, speedup=3.0)
    assert dtypes.default_dtype(torch.device("cuda")) == torch.float16
    assert dtypes.default_dtype(torch.device("mps")) == torch.float32


def test_environment_variable_overrides_the_rule_and_is_validated(rule):
    machine(rule, native=True, speedup=3.0)
    for value, expected in (("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
                            ("auto", torch.bfloat16), ("", torch.bfloat16)):
        rule.setenv(dtypes.CPU_DTYPE_ENV, value)
        assert dtypes.default_dtype(CPU) == expected, value
    for bad in ("float16", "int8", "fast"):
        rule.setenv(dtypes.CPU_DTYPE_ENV, bad)
        with pytest.raises(ValueError, match=r"LDM_CPU_DTYPE='.*' is not valid; valid values: auto, float32, bfloat16"):
            dtypes.default_dtype(CPU)


def test_the_test_session_pins_float32(monkeypatch):
    # conftest.py: the parity tests compare with diffusers in float32, whatever this CPU prefers.
    dtypes._measured_cpu_dtype.cache_clear()
    monkeypatch.setattr(dtypes, "native_bf16", lambda device: True)
    monkeypatch.setattr(dtypes, "bf16_speedup", lambda: 3.0)
    try:
        assert dtypes.default_dtype(CPU) == torch.float32
    finally:
        dtypes._measured_cpu_dtype.cache_clear()


def test_pipeline_follows_the_rule_and_an_explicit_dtype_wins(rule, sd1_folder):
    machine(rule, native=True, speedup=3.0)
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    assert pipe.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="float32").dtype == torch.float32
    rule.setenv(dtypes.CPU_DTYPE_ENV, "float32")
    assert Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.bfloat16).dtype == torch.bfloat16
    machine(rule, native=False)
    rule.delenv(dtypes.CPU_DTYPE_ENV)
    dtypes._measured_cpu_dtype.cache_clear()
    assert Pipeline.from_pretrained(sd1_folder, device="cpu").dtype == torch.float32


def test_bfloat16_unet_with_float32_sampler_arithmetic(rule, sd1_folder, one_thread):
    machine(rule, native=True, speedup=3.0)
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    seen: dict[str, list[torch.dtype]] = {"unet": [], "sampler": []}
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen["unet"].append(args[0].dtype))
    try:
        gen = pipe.generate("a cat", steps=2, width=64, height=64, seed=0, output="latent", progress=False,
                            callback=lambda step, total, x: seen["sampler"].append(x.dtype))
    finally:
        hook.remove()
    assert set(seen["unet"]) == {torch.bfloat16} and set(seen["sampler"]) == {torch.float32}
    assert torch.as_tensor(gen.images[0]).dtype == torch.float32
    assert gen.params["dtype"] == "bfloat16"  # what was used, recorded with the image


def test_emulated_bfloat16_is_warned_about_and_native_is_not(sd1_folder, monkeypatch, caplog):
    monkeypatch.setattr(dtypes, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="bfloat16")
    assert "bfloat16 on this CPU is emulated" in caplog.text and "use dtype float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe.to(dtype=torch.float32)
        pipe.to(dtype=torch.bfloat16)
    assert caplog.text.count("emulated") == 1  # float32 is not warned about, bfloat16 again is
    monkeypatch.setattr(dtypes, "native_bf16", lambda device: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm"):
        Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="bfloat16")
    assert "emulated" not in caplog.text


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="bfloat16 is emulated on this CPU")
def test_the_probe_measures_a_ratio_quickly(one_thread):
    import time

    dtypes.bf16_speedup.cache_clear()
    start = time.perf_counter()
    ratio = dtypes.bf16_speedup()
    assert time.perf_counter() - start < 2.0  # tens of ms on an idle core; generous on a busy one
    assert math.isfinite(ratio) and 0.05 < ratio < 50
    assert dtypes.bf16_speedup() == ratio  # cached: measured once per process


def contiguous_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).to(memory_format=torch.contiguous_format)


def test_cpu_vae_is_channels_last_and_decodes_the_same(sd1_pipe, one_thread):
    # ldm.layouts: channels_last measured faster for the VAE on CPU; the U-Net stays contiguous
    # in float32 (these tests' CPU dtype).
    vae, unet = sd1_pipe.vae, sd1_pipe.unet
    convs = [m.weight for m in vae.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                         for w in convs if w.shape[-1] > 1)
    assert all(m.weight.is_contiguous() for m in unet.modules() if isinstance(m, torch.nn.Conv2d))
    reference = contiguous_copy(vae)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, vae.decoder.conv_in.in_channels, 8, 8, generator=gen)
    image = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.inference_mode():
        decoded, expected = vae.decode(z), reference.decode(z)
        encoded, expected_latents = vae.encode(image).mean, reference.encode(image).mean
    # Only the order of additions differs: float32 rounding, far below a pixel level (1/255).
    assert (decoded - expected).abs().max().item() < 1e-5 * expected.abs().max().item()
    assert (encoded - expected_latents).abs().max().item() < 1e-5 * expected_latents.abs().max().item()
    assert decoded.is_contiguous(memory_format=torch.channels_last)  # the layout really changed


def test_a_bfloat16_unet_on_cpu_is_channels_last_and_back_in_float32(sd1_folder):
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.bfloat16)

    def layouts(unet):
        convs = [m.weight for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        return {(w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous()) for w in convs}

    assert layouts(pipe.unet) == {(True, False)}
    pipe.to(dtype=torch.float32)
    assert layouts(pipe.unet) == {(False, True)}
    pipe.to(dtype=torch.bfloat16)
    assert layouts(pipe.unet) == {(True, False)}


def test_layout_rule_is_per_device_and_validated():
    from ldm.layouts import unet_channels_last, vae_channels_last, with_unet_layout, with_vae_layout

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert unet_channels_last(cpu, torch.bfloat16) and not unet_channels_last(cpu, torch.float32)
    assert not unet_channels_last(cuda, torch.bfloat16) and not unet_channels_last(cuda, torch.float16)
    with pytest.raises(TypeError, match="torch.device"):
        unet_channels_last("cpu", torch.bfloat16)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with_unet_layout("unet")
    assert vae_channels_last(torch.device("cpu")) and not vae_channels_last(torch.device("cuda"))
    with pytest.raises(TypeError, match="torch.device"):
        vae_channels_last("cpu")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        with_vae_layout("vae")


def test_components_load_channels_last_as_read_in_the_rule_s_layout(sd1_folder):
    from ldm.checkpoints import load_model
    from ldm.layouts import channels_last_components

    assert channels_last_components(CPU, torch.bfloat16) == ("unet", "vae")
    assert channels_last_components(CPU, torch.float32) == ("vae",)
    assert channels_last_components(torch.device("cuda"), torch.float16) == ()
    with pytest.raises(TypeError, match="torch.dtype"):
        channels_last_components(CPU, "bfloat16")

    def layouts(module):
        convs = [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
        return {(w.is_contiguous(memory_format=torch.channels_last), w.is_contiguous()) for w in convs}

    plain = load_model(sd1_folder, dtype=torch.bfloat16)
    loaded = load_model(sd1_folder, dtype=torch.bfloat16, channels_last=("unet",))
    assert layouts(loaded.unet) == {(True, False)} and layouts(loaded.vae) == {(False, True)}
    for key, value in loaded.unet.state_dict().items():
        assert torch.equal(value, plain.unet.state_dict()[key]), key
    # Loaded in the rule's layout, the pipeline's own layout pass copies nothing.
    from ldm.layouts import with_unet_layout
    pointers = [w.data_ptr() for w in loaded.unet.parameters()]
    assert [w.data_ptr() for w in with_unet_layout(loaded.unet).parameters()] == pointers
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.bfloat16)
    assert layouts(pipe.unet) == {(True, False)} and layouts(pipe.vae) == {(True, False)}
    with pytest.raises(ValueError, match=r"unknown component\(s\) \['unte'\]"):
        load_model(sd1_folder, channels_last=("unte",))
    with pytest.raises(TypeError, match="collection of component names"):
        load_model(sd1_folder, channels_last="unet")
