"""scripts/bench.py's report: the U-Net rows also as steps per second (the GPU table's it/s)."""

from __future__ import annotations

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
