"""scripts/bench.py: the report's U-Net rows also as steps per second (the GPU table's it/s),
and its compiled rows (the mode asked, each side's eager U-Net back after)."""

from __future__ import annotations

import types

import pytest
import torch
from scriptload import load_script


def test_the_report_gives_unet_steps_per_second_for_each_batch():
    bench = load_script("bench")
    rows = [bench.row("U-Net step, batch 2 (CFG), 64x64 latents", "ms",
                      {bench.SHIPPED: [0.050], bench.DOCUMENTED: [0.080]}, 1e3),
            bench.row("U-Net step, 4 images (batch 8 with CFG), 64x64 latents", "ms",
                      {bench.SHIPPED: [0.200], bench.DOCUMENTED: [0.250]}, 1e3)]
    info = dict(size=512, repeats=3, mode="full", cpu="x", cpu_isa="y", bf16_native=False, torch_threads=1,
                cpu_count=2, load_average_start="0", load_average_end="0", ldm_default_cpu_dtype="float32")
    text = bench.markdown(info, {"float16": {"gemm_peak_gflops": 1.0, "rows": rows, "checks": {}, "opt_in": {}}})
    assert "U-Net steps per second (it/s), ldm as shipped / diffusers channels_last (documented): " \
           "batch 2 (CFG): 20 / 12.5; 4 images (batch 8 with CFG): 5 / 4" in text
    assert rows[0]["ratio"] == 0.050 / 0.080


def test_compile_mode_is_cuda_graphs_on_cuda_and_inductors_default_elsewhere():
    bench = load_script("bench")
    assert bench.parse_args(["--device", "cuda"]).compile_mode == "reduce-overhead"
    assert bench.parse_args(["--device", "cpu"]).compile_mode == "default"
    assert bench.parse_args(["--device", "cuda", "--compile-mode", "max-autotune"]).compile_mode == "max-autotune"
    with pytest.raises(SystemExit):
        bench.parse_args(["--compile-mode", "fastest"])


def test_both_unets_are_compiled_in_the_mode_asked_and_get_their_eager_unet_back(monkeypatch):
    bench = load_script("bench")
    modes, calls = [], []

    def fake_compile(module, mode=None, dynamic=None):
        modes.append(mode)
        return lambda *args: calls.append(("compiled", module)) or args[0]

    monkeypatch.setattr(bench.torch, "compile", fake_compile)

    class FakeSide(bench.Side):
        def __init__(self, name):
            self.name = name
            self.pipe = types.SimpleNamespace(unet=lambda *args: calls.append(("eager", name)) or args[0])

        def layout(self, unet_cl, vae_cl):
            return False

        def unet(self, x, t, context):
            return self.pipe.unet(x, t, context)

    sides = {name: FakeSide(name) for name in bench.IMPLS}
    eager = {name: side.pipe.unet for name, side in sides.items()}
    x = torch.zeros(2, 4, 8, 8)
    out = bench.bench_compiled(sides, x, torch.zeros(2), torch.zeros(2, 77, 8), 2, torch.device("cpu"),
                               "reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"]
    # each compiled U-Net ran its timed first call, an untimed one and two timed rounds
    assert sum(kind == "compiled" for kind, _ in calls) == 2 * (2 + 2)
    assert {side.pipe.unet for side in sides.values()} == set(eager.values())
    for name in bench.IMPLS:
        assert out[f"{name}: compiled / eager"] > 0
        assert f"{name}: torch.compile + first call (s)" in out
