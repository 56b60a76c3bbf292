"""Memory levels: the automatic choice (ldm.limits.plan_memory), sliced attention, the
out-of-memory retry and CPU offload (ldm.memory), and the checks of their arguments."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from failures import failing_on
from ldm import Pipeline
from ldm.cli import UsageError, build_parser, main
from ldm.limits import (
    CHOICE_HEADROOM, MEMORY_LEVELS, MemoryLimitError, MemoryPlan, decode_bytes, filter_workspace_bytes, level_needs,
    plan_batch, plan_memory, seamless_host_bytes,
)
from ldm.memory import is_out_of_memory, runner_of, use_plan
from ldm.pngmeta import read_parameters
from ldm.models.layers import Attention, chunked_sdpa, set_attention_chunk
from ldm.tiled_vae import Tiling, tiled_decode

CPU_OOM = ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)")
SIZE = 128  # latents 16x16: three tiles of the tiny VAE's 8 a side


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, device="cpu")


def _run(pipe, **kwargs):
    kwargs = {"steps": 2, "output": "np", "progress": False, "seed": 0, "width": SIZE, "height": SIZE, **kwargs}
    return pipe("a cat", **kwargs)


def _needs(config, size, level, device="cpu", **kwargs):
    return level_needs(config, size, size, dtype_bytes=4, guided=True, device=device, level=level, **kwargs)


def _plan(config, size, available, device="cpu", **kwargs):
    return plan_memory(config, size, size, dtype_bytes=4, guided=True, device=device, available=available, **kwargs)


# --- the automatic choice ---------------------------------------------------------------

def test_enough_memory_keeps_everything_whole(pipe, caplog):
    with caplog.at_level(logging.INFO, logger="ldm"):
        plan = _plan(pipe.config, 256, 2**40)
    assert plan.level == "fast" and plan.vae_tiling is None and plan.attention_chunk is None and not plan.offload
    assert "memory: fast" in caplog.text and "free on cpu" in caplog.text


def test_short_memory_picks_the_tiled_vae_and_says_why(pipe, caplog):
    fast, tiled = _needs(pipe.config, 256, "fast"), _needs(pipe.config, 256, "tiled")
    # Independently of the planner: whole, the decoder is the peak; one 64 px tile is far less.
    assert fast["VAE"] == decode_bytes(pipe.config, 256, 256, 4) > max(fast["U-Net"], *tiled.values())
    with caplog.at_level(logging.INFO, logger="ldm"):
        plan = _plan(pipe.config, 256, CHOICE_HEADROOM * max(tiled.values()))
    assert plan.level == "tiled" and plan.vae_tiling == Tiling(8, 2) and plan.attention_chunk is None
    line = [r.message for r in caplog.records if r.message.startswith("memory:")][-1]
    assert line.startswith("memory: tiled (tiled VAE; VAE tiling blended): the VAE of a 256x256 image needs ~") and "free on cpu" in line
    # Where only tiling fits, the call is no longer refused (it was: the whole decode > free).
    assert plan_batch(pipe.config, 1, 256, 256, dtype_bytes=4, guided=True, device="cpu",
                      available=max(tiled.values())) == 1


def test_between_whole_and_blended_tiles_the_seamless_vae_is_chosen(pipe, caplog):
    # At 1024 px the tiny VAE's layer-by-layer peak is below its whole forward's.
    fast, seamless, tiled = (_needs(pipe.config, 1024, lvl) for lvl in ("fast", "seamless", "tiled"))
    assert fast["VAE"] > seamless["VAE"] > tiled["VAE"]
    with caplog.at_level(logging.INFO, logger="ldm"):
        plan = _plan(pipe.config, 1024, CHOICE_HEADROOM * max(seamless.values()))
    assert plan.level == "seamless" and plan.vae_seamless and plan.vae_tiling is None
    assert plan.attention_chunk is None and not plan.offload
    assert "memory: seamless (seamless tiled VAE; VAE tiling seamless): the VAE of a 1024x1024 image needs ~" in caplog.text
    assert not plan.lower("test").vae_seamless and plan.lower("test").vae_tiling is not None


def test_a_backend_that_keeps_attention_scores_gets_sliced_attention(pipe):
    # MPS's SDPA holds the score matrix: 2 rows x 2 heads x 4096 x 4096 at 512 px, 1024 queries sliced.
    sliced = _needs(pipe.config, 512, "sliced", device="mps", chunk=1024)
    tiled = _needs(pipe.config, 512, "tiled", device="mps")
    assert tiled["U-Net"] >= 2 * 2 * 4096 * 4096 * 4 > sliced["U-Net"]
    available = CHOICE_HEADROOM * max(sliced.values())
    plan = _plan(pipe.config, 512, available, device="mps")
    assert plan.level == "sliced" and plan.attention_chunk is not None and plan.attention_chunk <= 1024
    # Its VAE runs seamless where that fits, else in blended tiles.
    seamless = _needs(pipe.config, 512, "sliced", device="mps", chunk=plan.chunk, vae_mode="seamless")
    assert plan.vae_mode == ("seamless" if CHOICE_HEADROOM * max(seamless.values()) <= available else "blended")


def test_on_an_accelerator_offloading_the_idle_models_is_the_last_level(pipe):
    resident = {"unet": 2**30, "vae": 2**29, "text": 2**29}  # as if the weights filled the device
    offload = _needs(pipe.config, 256, "offload", device="cuda", resident=resident)
    sliced = _needs(pipe.config, 256, "sliced", device="cuda", resident=resident)
    assert offload["U-Net"] == 0 < sliced["U-Net"]  # the idle weights free more than it needs
    plan = _plan(pipe.config, 256, max(sliced.values()) - 1, device="cuda", resident=resident)
    assert plan.level == "offload" and plan.offload
    # A seamless VAE that runs out of memory on the device keeps its activations in CPU memory next.
    assert [(p.level, p.vae_store) for p in _chain(_plan(pipe.config, 64, 2**40, device="cuda"))] == [
        ("fast", None), ("seamless", None), ("seamless", "cpu"), ("tiled", None), ("sliced", None), ("offload", None)]
    assert [p.level for p in _chain(_plan(pipe.config, 64, 2**40))] == ["fast", "seamless", "tiled", "sliced"]


def test_sliced_and_offload_run_the_vae_seamless_where_it_fits(pipe):
    # Weights that, offloaded, leave room for the U-Net and the seamless VAE but not at "sliced".
    resident = {"unet": 2**27, "vae": 2**25, "text": 0}
    seamless, blended = (_needs(pipe.config, 1024, "offload", device="cuda", resident=resident, vae_mode=mode)
                         for mode in ("seamless", "blended"))
    sliced = _needs(pipe.config, 1024, "sliced", device="cuda", resident=resident, vae_mode="blended")
    assert sliced["U-Net"] > seamless["VAE"] > max(blended["VAE"], seamless["U-Net"])
    roomy = _plan(pipe.config, 1024, CHOICE_HEADROOM * max(seamless.values()), device="cuda", resident=resident)
    assert (roomy.level, roomy.vae_mode, roomy.vae_tiling) == ("offload", "seamless", None)
    tight = _plan(pipe.config, 1024, CHOICE_HEADROOM * max(seamless.values()) - 1, device="cuda", resident=resident,
                  host_available=0)  # no room in CPU memory for the seamless VAE's activations either
    assert (tight.level, tight.vae_mode) == ("offload", "blended") and tight.vae_tiling is not None
    # Named without a measure of the free memory, they take the leanest VAE.
    assert _plan(pipe.config, 256, None, memory="sliced").vae_mode in ("seamless", "blended")


def test_on_an_accelerator_a_seamless_vae_too_big_for_the_device_keeps_its_activations_in_cpu_memory(pipe, caplog):
    on_device, stored = (_needs(pipe.config, 1024, "seamless", device="cuda", vae_store=store) for store in (None, "cpu"))
    host = seamless_host_bytes(pipe.config, 1024, 1024, 4)
    # Independently of the planner: keeping the activations elsewhere saves at most what they take.
    assert 0 < on_device["VAE"] - stored["VAE"] <= host and on_device["VAE"] > on_device["U-Net"]
    available = CHOICE_HEADROOM * max(stored.values())
    assert available < CHOICE_HEADROOM * max(on_device.values())
    with caplog.at_level(logging.INFO, logger="ldm"):
        plan = _plan(pipe.config, 1024, available, device="cuda", host_available=CHOICE_HEADROOM * host)
    assert (plan.level, plan.vae_mode, plan.vae_store, plan.vae_tiling) == ("seamless", "seamless", "cpu", None)
    assert "VAE tiling seamless, activations in CPU memory" in plan.label
    assert "wait in CPU memory" in caplog.text
    # Where CPU memory cannot hold them either, blended tiles; on the CPU there is nowhere else.
    short = _plan(pipe.config, 1024, available, device="cuda", host_available=CHOICE_HEADROOM * host - 1)
    assert (short.level, short.vae_store) == ("tiled", None)
    assert _plan(pipe.config, 1024, available, device="cpu").vae_store is None
    with pytest.raises(ValueError, match="keeps a seamless VAE's activations in CPU memory .* on the CPU"):
        MemoryPlan("seamless", plan.tiling, plan.chunk, MEMORY_LEVELS[:-1], "test", "seamless", "cpu")
    with pytest.raises(ValueError, match="not for VAE tiling 'blended'"):
        MemoryPlan("tiled", plan.tiling, plan.chunk, MEMORY_LEVELS, "test", "blended", "cpu")
    with pytest.raises(ValueError, match=r"vae_store must be one of \(None, 'cpu'\), got 'disk'"):
        _needs(pipe.config, 1024, "seamless", device="cuda", vae_store="disk")


def test_a_retry_never_runs_the_vae_less_lean_than_it_was(pipe):
    plan = _plan(pipe.config, 64, 2**40, device="cuda", memory="sliced")
    assert plan.vae_mode == "seamless"
    steps = [(p.level, p.vae_mode, p.vae_store) for p in _chain(plan)]
    assert steps == [("sliced", "seamless", None), ("sliced", "seamless", "cpu"), ("offload", "seamless", "cpu"),
                     ("offload", "blended", None)]
    tiled = _plan(pipe.config, 64, 2**40, device="cuda", memory="tiled")
    assert [(p.level, p.vae_mode) for p in _chain(tiled)] == [
        ("tiled", "blended"), ("sliced", "blended"), ("offload", "blended")]
    with pytest.raises(ValueError, match="memory level 'fast' runs the VAE none, not 'seamless'"):
        MemoryPlan("fast", Tiling(8, 2), 64, MEMORY_LEVELS, "test", "seamless")


def test_a_seamless_vae_that_runs_out_of_memory_at_sliced_is_redone_in_blended_tiles(pipe, monkeypatch, caplog,
                                                                                     one_thread):
    tiled = _run(pipe, memory="tiled")

    def seamless_failing(vae, z, store=None):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr("ldm.memory.seamless_decode", seamless_failing)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        gen = pipe.generate("a cat", steps=2, output="np", progress=False, seed=0, width=SIZE, height=SIZE,
                            memory="sliced")
    np.testing.assert_array_equal(gen.images, tiled)
    assert gen.vae_tiling == ["blended"]
    assert "VAE ran out of memory at memory level sliced (" in caplog.text
    assert "retrying it at sliced (sliced attention, seamless tiled VAE where it fits, else tiled; VAE tiling " \
        "blended)" in caplog.text


@pytest.mark.parametrize("recorded, room, level, mode, warning", [
    ("blended", None, "tiled", "blended", None),  # kept although the whole VAE would fit
    ("seamless", None, "seamless", "seamless", None),
    ("none", None, "fast", "none", None),
    ("none", "seamless", "seamless", "seamless", "it may differ by rounding"),
    ("seamless", "tiled", "tiled", "blended", "it may differ where tiles overlap"),
])
def test_a_recorded_vae_tiling_is_kept_where_it_fits(pipe, caplog, recorded, room, level, mode, warning):
    available = 2**40 if room is None else CHOICE_HEADROOM * max(_needs(pipe.config, 1024, room).values())
    with caplog.at_level(logging.INFO, logger="ldm"):
        plan = _plan(pipe.config, 1024, available, vae_mode=recorded)
    assert (plan.level, plan.vae_mode) == (level, mode)
    if warning:
        assert f"the picture was made with VAE tiling {recorded!r}, this run uses {mode!r}" in caplog.text
        assert warning in caplog.text
    else:
        assert "the picture was made with VAE tiling" in caplog.text and "this run uses" not in caplog.text


def test_a_named_level_wins_over_a_recorded_vae_tiling_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm"):
        plan = _plan(pipe.config, 256, 2**40, memory="fast", vae_mode="blended")
    assert (plan.level, plan.vae_mode) == ("fast", "none")
    assert "made with VAE tiling 'blended', this run uses 'none' (asked for (memory='fast'))" in caplog.text
    with pytest.raises(ValueError, match=r"vae_tiling must be one of \('none', 'seamless', 'blended'\), got 'x'"):
        _run(pipe, vae_tiling="x")


def test_each_image_records_how_its_vae_ran(pipe, monkeypatch, one_thread):
    assert pipe.generate("a", steps=1, output="np", progress=False, num_images=2, memory="seamless",
                         width=SIZE, height=SIZE).vae_tiling == ["seamless", "seamless"]
    assert pipe.generate("a", steps=1, output="latent", progress=False).vae_tiling == []
    monkeypatch.setattr(pipe.vae, "decode", failing_on(2, pipe.vae.decode, RuntimeError(CPU_OOM)))
    gen = pipe.generate("a", steps=1, output="np", progress=False, num_images=2, memory="fast", width=SIZE,
                        height=SIZE)
    assert gen.vae_tiling == ["none", "seamless"]


def test_from_runs_the_vae_as_the_picture_recorded(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_MODEL_PATH", str(sd1_folder.parent))
    args = ["--steps", "2", "--seed", "3", "--size", f"{SIZE}x{SIZE}", "--model", str(sd1_folder),
            "--device", "cpu"]
    assert main(["generate", "a red cube", *args, "--memory", "tiled", "-o", str(tmp_path / "tiled")]) == 0
    assert main(["generate", "a red cube", *args, "-o", str(tmp_path / "auto")]) == 0
    tiled, auto = tmp_path / "tiled" / "00000-3.png", tmp_path / "auto" / "00000-3.png"
    assert (read_parameters(tiled).vae_tiling, read_parameters(auto).vae_tiling) == ("blended", "none")
    assert _pixels(tiled) != _pixels(auto)  # blended tiles make another picture here
    # Plenty of memory, so "auto" alone would decode whole: --from keeps the blended tiles.
    again = tmp_path / "again"
    assert main(["generate", "--from", str(tiled), "--device", "cpu", "-o", str(again)]) == 0
    assert _pixels(again / "00000-3.png") == _pixels(tiled)
    assert read_parameters(again / "00000-3.png") == read_parameters(tiled)


def test_batch_takes_a_memory_level_and_records_how_the_vae_ran(sd1_folder, tmp_path, capsys):
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(sd1_folder), "--device", "cpu", "--steps", "2",
            "--size", f"{SIZE}x{SIZE}", "-o", str(out)]
    assert main([*args, "--memory", "tiled"]) == 0
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["parameters"]["vae_tiling"] for e in entries] == ["blended", "blended"]
    assert {read_parameters(out / e["file"]).vae_tiling for e in entries} == {"blended"}
    # How the VAE ran is not a setting: a rerun that would decode whole has nothing to do.
    capsys.readouterr()
    assert main(args) == 0
    assert "0 rendered, 2 already done" in capsys.readouterr().out
    # A level the device lacks is refused before any folder or model.
    assert main([*args[:-1], str(tmp_path / "new"), "--memory", "offload"]) == 2
    assert "memory='offload' moves models between an accelerator and the CPU" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path)).tobytes()


def _chain(plan):
    while plan is not None:
        yield plan
        plan = plan.lower("test")


def test_what_even_the_leanest_level_cannot_fit_is_refused_with_the_numbers(pipe):
    sliced = _needs(pipe.config, 256, "sliced")
    # Short of the headroom "auto" wants, but enough for the bare estimate: the leanest level runs.
    assert _plan(pipe.config, 256, max(sliced.values())).level == "sliced"
    with pytest.raises(MemoryLimitError, match=r"a 256x256 image needs at least \d+ MiB for U-Net \(with guidance\) "
                       r"even at memory level 'sliced' .* but only \d+ MiB is free on cpu"):
        _plan(pipe.config, 256, sliced["U-Net"] - 1)


def test_unreadable_free_memory_runs_fast_and_a_named_level_is_kept(pipe, monkeypatch, caplog):
    monkeypatch.setattr("ldm.limits.available_bytes", lambda device: None)
    with caplog.at_level(logging.INFO, logger="ldm"):
        assert _plan(pipe.config, 256, None).level == "fast"
    assert "cannot be read" in caplog.text
    assert _plan(pipe.config, 256, 2**40, memory="sliced").level == "sliced"


@pytest.mark.parametrize("memory, message", [
    ("turbo", r"memory must be one of \('auto', 'fast', 'seamless', 'tiled', 'sliced', 'offload'\), got 'turbo'"),
    (None, "memory must be one of"), (2, "memory must be one of"),
    ("offload", "on cpu the leanest level is 'sliced'"),
])
def test_bad_memory_values_are_refused_before_any_work(pipe, monkeypatch, memory, message):
    monkeypatch.setattr(pipe, "encode_prompts", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match=message):
        _run(pipe, memory=memory)


def test_a_plan_refuses_a_level_its_device_lacks():
    with pytest.raises(ValueError, match="memory level must be one of"):
        MemoryPlan("offload", Tiling(8, 2), 64, MEMORY_LEVELS[:-1], "test")


def test_the_generate_command_takes_a_memory_level():
    parser = build_parser()
    assert parser.parse_args(["generate", "a cat", "--memory", "tiled"]).memory == "tiled"
    assert parser.parse_args(["generate", "a cat"]).memory == "auto"
    with pytest.raises(UsageError, match=r"--memory: invalid choice: 'huge' \(choose from 'auto', 'fast'"):
        parser.parse_args(["generate", "a cat", "--memory", "huge"])


def test_the_unet_estimate_counts_the_winograd_filter_buffer_where_it_runs(pipe, monkeypatch):
    # The widest layer's F(2x2) filter: 16 values per 3x3 filter of (2 x widest) in, widest out.
    widest = max(pipe.config.unet.block_out_channels)

    def needs(flags):
        monkeypatch.setattr("ldm.models.winograd.cpu_flags", lambda: frozenset(flags))
        return level_needs(pipe.config, 256, 256, dtype_bytes=2, guided=True, device="cpu", level="fast")

    native, emulated = needs({"avx512_bf16"}), needs(())
    assert native["U-Net"] - emulated["U-Net"] == 16 * 2 * widest * widest * 2 and native["VAE"] == emulated["VAE"]
    assert filter_workspace_bytes(pipe.config, 2, "cpu") == 0  # emulated bfloat16: no Winograd
    assert filter_workspace_bytes(pipe.config, 4, "cpu") == 16 * 2 * widest * widest * 4  # float32: any CPU
    assert filter_workspace_bytes(pipe.config, 4, "meta") == 0  # only on the CPU


def test_kept_winograd_filters_are_counted_at_the_levels_that_keep_them(monkeypatch):
    # SD1.5 at 512 px, guided, bfloat16: the resnets' 3x3 layers that run as Winograd are
    # those of the 64x64 level (8,192 pixels), the 32x32 (2,048) and the 1280-channel ones of
    # the 16x16 (512 pixels, 256 inside the workspace), all in F(2x4, 3x3) (24 values per 9
    # weights); of the 8x8 (128 pixels) only those with 2,560 channels in, in F(2x2, 3x3)
    # (16). Their channels in x out, by hand from the architecture:
    #   64x64: down 4 x 320x320; up 960, 640, 640 in x 320 and 3 x 320x320 -> 1,433,600
    #   32x32: down 320x640 and 3 x 640x640; up 1920, 1280, 960 in x 640 and 3 x 640x640 -> 5,324,800
    #   16x16: down 3 x 1280x1280 (640 -> 1280 has too few); up 2560, 2560, 1920 in x 1280 and
    #          3 x 1280x1280 -> 18,841,600
    #   8x8: up 3 x 2560 in x 1280 -> 9,830,400
    # 25,600,000 pairs of 24 bfloat16 values, 9,830,400 of 16.
    from ldm.config import SD1
    from ldm.limits import kept_filter_bytes

    monkeypatch.setattr("ldm.models.winograd.cpu_flags", lambda: frozenset({"avx512_bf16"}))
    kept = kept_filter_bytes(SD1, 512, 512, dtype_bytes=2, guided=True, device="cpu")
    assert kept == (25_600_000 * 24 + 9_830_400 * 16) * 2
    needs = {level: level_needs(SD1, 512, 512, dtype_bytes=2, guided=True, device="cpu", level=level)["U-Net"]
             for level in ("fast", "tiled", "sliced")}
    assert needs["fast"] == needs["tiled"] == needs["sliced"] + kept  # sliced keeps none (CPU attention is fused)
    assert kept_filter_bytes(SD1, 512, 512, dtype_bytes=4, guided=True, device="cpu") == 0  # float32: F4, not kept
    assert kept_filter_bytes(SD1, 512, 512, dtype_bytes=2, guided=True, device="meta") == 0
    monkeypatch.setattr("ldm.models.winograd.cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert kept_filter_bytes(SD1, 512, 512, dtype_bytes=2, guided=True, device="cpu") == 0  # no Winograd there


def test_the_unet_phase_keeps_its_filters_over_enough_steps_at_a_whole_level(pipe):
    from ldm.models import winograd

    def kept(phase, evaluations, level="fast"):
        fast = runner_of(pipe).plan
        runner = use_plan(pipe, MemoryPlan(level, fast.tiling, fast.chunk, fast.levels, "test"))
        seen = []
        runner.run(phase, lambda: seen.append(winograd._KEPT.get()), evaluations=evaluations)
        use_plan(pipe, fast)
        return seen[0] is not None

    steps = winograd.KEEP_MIN_STEPS
    assert kept("U-Net", steps) and kept("U-Net", steps, "seamless")
    assert not kept("U-Net", steps - 1) and not kept("VAE", steps) and not kept("U-Net", steps, "sliced")
    assert winograd._KEPT.get() is None


def test_generation_tells_the_runner_how_many_steps_run(pipe, monkeypatch):
    from ldm.memory import MemoryRunner

    told = []
    real = MemoryRunner.run
    monkeypatch.setattr(MemoryRunner, "run", lambda self, phase, fn, generators=(), evaluations=1:
                        told.append((phase, evaluations)) or real(self, phase, fn, generators, evaluations))
    _run(pipe, steps=3)
    assert told[0] == ("U-Net", 3)


# --- sliced attention -------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 99, 100, 1000])
def test_chunked_attention_is_the_attention_formula(chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (100, 37, 37))
    scores = q.double() @ k.double().transpose(-1, -2) / 16**0.5
    expected = torch.softmax(scores, dim=-1) @ v.double()
    torch.testing.assert_close(chunked_sdpa(q, k, v, chunk).double(), expected, atol=1e-5, rtol=1e-5)


def test_setting_a_chunk_reaches_every_attention_and_keeps_the_unet_output(pipe, one_thread):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0, 20.0])
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    layers = [m for m in pipe.unet.modules() if isinstance(m, Attention)]
    try:
        with torch.inference_mode():
            whole = pipe.unet(x, t, context)
            set_attention_chunk(pipe.unet, 16)  # 256 tokens in 16 calls
            assert layers and all(m.chunk == 16 for m in layers)
            sliced = pipe.unet(x, t, context)
    finally:
        set_attention_chunk(pipe.unet, None)
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, -4, 2.5, "8", True])
def test_bad_attention_chunks_are_refused(pipe, chunk):
    with pytest.raises(ValueError, match="attention chunk must be a positive int"):
        set_attention_chunk(pipe.unet, chunk)


# --- out of memory: the phase again, one level leaner --------------------------------

def test_out_of_memory_errors_are_told_from_others():
    assert is_out_of_memory(RuntimeError(CPU_OOM))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_a_decode_that_runs_out_of_memory_is_redone_seamless_then_tiled(pipe, monkeypatch, caplog, one_thread):
    whole, tiled = _run(pipe, memory="fast"), _run(pipe, memory="tiled")
    real = pipe.vae.decode
    shapes = []

    def decode_failing_once(z):
        shapes.append(tuple(z.shape[-2:]))
        if len(shapes) == 1:
            raise RuntimeError(CPU_OOM)
        return real(z)

    monkeypatch.setattr(pipe.vae, "decode", decode_failing_once)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        images = _run(pipe, memory="fast")
    # The seamless retry gives the whole decode's picture (it does not call vae.decode).
    assert shapes == [(16, 16)]
    np.testing.assert_allclose(images, whole, atol=1e-5)
    assert "VAE ran out of memory at memory level fast (VAE and attention whole; VAE tiling none) (" in caplog.text
    assert "retrying it at seamless (seamless tiled VAE; VAE tiling seamless)" in caplog.text

    def seamless_failing(vae, z, store=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    def decode(z):
        shapes.append(tuple(z.shape[-2:]))
        return real(z)

    monkeypatch.setattr("ldm.memory.seamless_decode", seamless_failing)
    monkeypatch.setattr(pipe.vae, "decode", decode)
    shapes.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm"):
        images = _run(pipe, memory="seamless")
    np.testing.assert_array_equal(images, tiled)
    # Tiles of 8 starting at 0, 6 and 12 on each side (the last 4 wide).
    assert sorted(shapes) == sorted((h, w) for h in (8, 8, 4) for w in (8, 8, 4))
    assert "retrying it at tiled (tiled VAE; VAE tiling blended)" in caplog.text


def test_a_unet_that_runs_out_of_memory_mid_sampling_redoes_the_batch_with_the_same_noise(
        pipe, monkeypatch, caplog, one_thread):
    # euler_a draws fresh noise every step: the retry must rewind each image's generator.
    kwargs = dict(sampler="euler_a", steps=3)
    expected = _run(pipe, memory="sliced", num_images=2, **kwargs)
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    forward = failing_on(2, pipe.unet.forward, oom)  # on the second step
    monkeypatch.setattr(pipe.unet, "forward", forward)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        images = _run(pipe, memory="fast", num_images=2, **kwargs)
    np.testing.assert_allclose(images, expected, atol=1e-6)
    assert len(forward.calls) == 1 + 1 + 3  # one step, the failure, then all three again
    assert "U-Net ran out of memory at memory level fast (" in caplog.text
    assert "retrying it at sliced (sliced attention, seamless tiled VAE where it fits, else tiled; VAE tiling " \
        "seamless)" in caplog.text


def test_other_errors_are_not_retried_and_the_leanest_level_gives_up_clearly(pipe, monkeypatch):
    def broken(z):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(pipe.vae, "decode", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        _run(pipe, memory="fast")

    def always_oom(z):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(pipe.vae, "decode", always_oom)
    monkeypatch.setattr("ldm.memory.seamless_decode", lambda vae, z, store=None: always_oom(z))
    with pytest.raises(MemoryLimitError, match=r"VAE ran out of memory on cpu even at memory level sliced \(.*VAE tiling blended\)"):
        _run(pipe, memory="fast")


# --- CPU offload (accelerate's hooks; here the execution device is the CPU itself) --------

def test_offloaded_models_compute_on_the_execution_device_and_come_back(pipe, one_thread):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = (tiled_decode(pipe.vae, z / pipe.config.vae.scaling_factor) / 2 + 0.5).clamp(0, 1)
    fast = runner_of(pipe).plan
    offload = MemoryPlan("offload", fast.tiling, fast.chunk, MEMORY_LEVELS, "test")
    try:
        runner = use_plan(pipe, offload)
        assert hasattr(pipe.unet, "_hf_hook") and hasattr(pipe.vae.decoder, "_hf_hook")
        assert pipe.device == torch.device("cpu")
        decoded = pipe.decode(z, "np")
        assert runner.plan.offload
    finally:
        use_plan(pipe, MemoryPlan("fast", fast.tiling, fast.chunk, fast.levels, "test"))
    assert not hasattr(pipe.unet, "_hf_hook") and not hasattr(pipe.vae.decoder, "_hf_hook")
    np.testing.assert_allclose(decoded, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert all(m.chunk is None for m in pipe.unet.modules() if isinstance(m, Attention))


def test_each_phase_runs_inside_one_filter_workspace_freed_after_it(pipe):
    # ldm.models.winograd.filter_workspace: the buffer for per-call filters lives for a phase.
    from ldm.models import winograd

    seen = []
    runner = runner_of(pipe)
    runner.run("U-Net", lambda: seen.append(winograd._WORKSPACE.get()))
    runner.run("VAE", lambda: seen.append(winograd._WORKSPACE.get()))
    assert seen == [{}, {}] and seen[0] is not seen[1]
    assert winograd._WORKSPACE.get() is None
