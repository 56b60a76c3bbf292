"""Benchmark ldm against diffusers: same machine, same run, same random weights.

Builds (once, cached) a diffusers StableDiffusionPipeline folder holding the full
SD1.5 architecture with random weights, loads it with both libraries and measures,
for each dtype (on CPU float32, and bfloat16 where the CPU computes it natively),
interleaving the variants (the order flips on every repeat, after one warm-up each)
and reporting medians:

1. load time of the folder;
2. text encoding of the prompt and the negative prompt;
3. one U-Net step at batch 2 (classifier-free guidance), VAE decode and VAE encode of
   one image, each in GFLOP/s (FLOPs counted once with torch's FlopCounterMode) and as a
   percentage of this machine's own GEMM peak in that dtype (measured here);
4. text-to-image end to end with DPM++ 2M (diffusers' DPMSolverMultistepScheduler),
   same seed, plus the largest pixel difference between the two images as a sanity check;
5. peak memory of a fresh subprocess per library that loads the folder and makes one
   image: peak RSS on CPU (in-process RSS would mix both libraries), and
   ``torch.cuda.max_memory_allocated`` on CUDA.

The U-Net and the VAE of each library run in both memory layouts (contiguous NCHW and
channels_last); "ldm as shipped" is the layout ldm picks for the device (ldm.layouts:
on CPU a channels_last VAE, and a channels_last U-Net in bfloat16 only), diffusers' documented CPU settings are
SDPA attention and a channels_last U-Net and VAE, and the ratio column compares the two.
The GEMM peak is measured before and after each dtype's rows (the better counts: on a
shared machine the worse one saw other load); oneDNN's direct 3x3 convolutions can beat
the GEMM, so a VAE figure above 100% is possible.

    python scripts/bench.py --short --threads 1   # CPU, a few minutes: 256x256, 4 steps, 1 repeat
    python scripts/bench.py                       # full: 512x512, 20 steps, 3 repeats
    python scripts/bench.py --device cuda         # CUDA: float16
    python scripts/bench.py --unet-only --repeats 5 --threads 1   # the U-Net step alone, one line per dtype
    python scripts/bench.py --device cuda --unet-only --compile --repeats 10   # and compiled (CUDA graphs) against eager

Only diffusers' timings from the same run are comparable with ldm's: on a shared
machine absolute numbers move, the ratios much less.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the diffusers reference helpers live there
sys.path.insert(0, str(ROOT))

from reference import SD1_SCHEDULER_CONFIG, _randomize, write_pipeline_files  # noqa: E402

from ldm.dtypes import BF16_MIN_SPEEDUP, bf16_speedup, default_dtype, native_bf16, parse_dtype  # noqa: E402
from ldm.models.cpuinfo import cpu_flags, cpu_model  # noqa: E402
from ldm.models.winograd import filter_workspace  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
IMPLS = ("ldm", "diffusers")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
SEED = 42
GUIDANCE = 7.5
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")

# The real SD1.5 component configs (runwayml/stable-diffusion-v1-5), minus metadata.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    center_input_sample=False,
)
SD_VAE = dict(
    sample_size=512,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    norm_num_groups=32,
    act_fn="silu",
)
CLIP_L_TEXT = dict(  # OpenAI CLIP ViT-L/14 text tower
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


# --- the model folder ----------------------------------------------------------


def build_folder(path: Path, seed: int = 0) -> Path:
    """Write the random-weight SD1.5 diffusers folder once; later runs reuse it."""
    if (path / "model_index.json").is_file():
        return path
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    print(f"building the random-weight SD1.5 folder in {path} (once) ...", file=sys.stderr)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # One component at a time, so at most one full-size model is in memory.
    for i, (name, make) in enumerate((
        ("unet", lambda: UNet2DConditionModel(**SD15_UNET)),
        ("vae", lambda: AutoencoderKL(**SD_VAE)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))),
    )):
        module = make().eval()
        # Realistic-scale weights everywhere (default inits leave e.g. conv_out at zero).
        _randomize(module, seed * 10 + i)
        module.save_pretrained(tmp / name)
        del module
        gc.collect()
    write_pipeline_files(tmp, SD1_SCHEDULER_CONFIG, "eos")
    tmp.rename(path)
    return path


# --- the two implementations behind one interface ----------------------------------


def set_layout(modules: tuple[torch.nn.Module, ...], channels_last: bool) -> None:
    """Convolution weights in channels_last (NHWC) or contiguous (NCHW) memory; torch's
    convolutions then give outputs in the weights' layout, whatever the input's."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for module in modules:
        module.to(memory_format=fmt)


class Side:
    """One loaded library; its U-Net and VAE can switch memory layout between runs."""

    name = ""
    state: tuple[bool, bool] | None = None  # (U-Net, VAE) channels_last, once set here

    def layout(self, unet_cl: bool, vae_cl: bool) -> bool:
        """Sets it; whether the U-Net's changed (its weights are then new tensors)."""
        changed = False
        for i, (module, cl) in enumerate(((self.pipe.unet, unet_cl), (self.pipe.vae, vae_cl))):
            if self.state is None or self.state[i] != cl:
                set_layout((module,), cl)
                changed |= i == 0
        self.state = (unet_cl, vae_cl)
        return changed


class LdmSide(Side):
    name = "ldm"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from ldm import Pipeline

        self.pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype)

    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x, t, context)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(z)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.encode(image).mean

    def text(self) -> torch.Tensor:
        cond, uncond = self.pipe.encode_prompts([PROMPT], [NEGATIVE])
        return torch.cat([uncond.context, cond.context])

    def generate(self, size: int, steps: int) -> np.ndarray:
        return self.pipe(
            PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=GUIDANCE, seed=SEED,
            width=size, height=size, sampler="dpmpp_2m", output="np", progress=False,
        )[0]


class DiffusersSide(Side):
    name = "diffusers"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe = StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        ).to(device)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(
            pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
        )
        # diffusers' default already; set it so the comparison is SDPA against SDPA.
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.device = device

    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.decode(z, return_dict=False)[0]

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.pipe.vae.encode(image).latent_dist.mean

    def text(self) -> torch.Tensor:
        cond, uncond = self.pipe.encode_prompt(PROMPT, self.device, 1, True, NEGATIVE)
        return torch.cat([uncond, cond])

    def generate(self, size: int, steps: int) -> np.ndarray:
        return self.pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(SEED)], height=size, width=size,
            output_type="np",
        ).images[0]


SIDES = {"ldm": LdmSide, "diffusers": DiffusersSide}


@dataclass(frozen=True)
class Variant:
    """A library with its U-Net and VAE in one memory layout (None: ldm as shipped, each
    component in the layout ldm.layouts picks for the device): a column of the table."""

    side: str
    channels_last: bool | None

    @property
    def label(self) -> str:
        if self.channels_last is None:
            return f"{self.side} as shipped"
        return f"{self.side} {'channels_last' if self.channels_last else 'contiguous'}" + (
            " (documented)" if self == DOCUMENTED else "")

    def layout(self, device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
        """(U-Net, VAE) channels_last."""
        if self.channels_last is None:
            from ldm.layouts import unet_channels_last, vae_channels_last

            return unet_channels_last(device, dtype), vae_channels_last(device)
        return self.channels_last, self.channels_last


# diffusers' documented CPU settings: SDPA, channels_last U-Net and VAE. In this order,
# flipping it every round costs each side one layout switch per round.
LDM, LDM_CL = Variant("ldm", False), Variant("ldm", True)
DIFFUSERS, DIFFUSERS_CL = Variant("diffusers", False), Variant("diffusers", True)
SHIPPED, DOCUMENTED = Variant("ldm", None), DIFFUSERS_CL
VARIANTS = (LDM, LDM_CL, DIFFUSERS_CL, DIFFUSERS)  # measured for the U-Net and the VAE
COLUMNS = (SHIPPED, *VARIANTS)
AS_USED = {SHIPPED.side: SHIPPED, DOCUMENTED.side: DOCUMENTED}  # rows measured per library


def quiet_diffusers() -> None:
    import warnings

    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    dlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    # ``torch_dtype`` is kept for older diffusers releases; newer ones warn about it.
    warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)


# --- timing ----------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(fns: dict[Any, Callable[[], Any]], repeats: int, device: torch.device, label: str,
                before: Callable[[Any], None] = lambda key: None, warmup: bool = True
                ) -> tuple[dict[Any, list[float]], dict[Any, Any]]:
    """One untimed warm-up each (unless ``warmup`` is False: the same shapes already ran),
    then ``repeats`` timed rounds; the order flips every round (A B, B A, ...) so drift on
    a shared machine hits all alike. ``before(key)`` runs untimed before each call."""
    keys = list(fns)
    last: dict[Any, Any] = {}
    if warmup:
        for key in keys:
            before(key)
            _, last[key] = timed(fns[key], device)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            before(key)
            seconds, last[key] = timed(fns[key], device)
            times[key].append(seconds)
            print(f"  {label}: {getattr(key, 'label', key)} {seconds:.3f} s", file=sys.stderr)
    return times, last


def bench_load(folder: Path, device: torch.device, dtype: torch.dtype, repeats: int
               ) -> dict[str, list[float]]:
    def load(name: str) -> Callable[[], None]:
        def run() -> None:
            side = SIDES[name](folder, device, dtype)
            side.layout(*AS_USED[name].layout(device, dtype))  # loaded as it is used
            del side
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        return run

    times, _ = interleaved({name: load(name) for name in IMPLS}, repeats, device, "load")
    return times


def gemm_peak(dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """This machine's matmul throughput in ``dtype``, GFLOP/s: the best of a few large
    square and U-Net-shaped products, each the best of ``repeats`` runs."""
    shapes = ((2048, 2048, 2048), (4096, 1280, 1280), (8192, 320, 1280))
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        seconds = min(timed(lambda: a @ b, device)[0] for _ in range(repeats + 1))
        best = max(best, 2 * m * k * n / seconds / 1e9)
    return best


def count_flops(size: int) -> dict[str, float]:
    """FLOPs of one U-Net step at batch 2, one VAE decode and one encode at ``size``,
    counted once on the meta device (shapes only: no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.checkpoints.loading import build_modules
    from ldm.config import PRESETS

    modules = build_modules(PRESETS["sd1"])
    latent = size // 8
    with torch.device("meta"):
        x, t, context = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
        z, image = torch.randn(1, 4, latent, latent), torch.randn(1, 3, size, size)
    runs = {"unet": lambda: modules["unet"](x, t, context), "decode": lambda: modules["vae"].decode(z),
            "encode": lambda: modules["vae"].encode(image).mean}
    flops = {}
    for name, run in runs.items():
        with FlopCounterMode(display=False) as counter:
            run()
        flops[name] = float(counter.get_total_flops())
    return flops


# --- peak memory in a fresh process ------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak RSS. Linux's VmHWM starts afresh at exec; ru_maxrss does
    not (a child inherits its parent's peak), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child_main(args: argparse.Namespace) -> None:
    """Load with one library as it is used (ldm as shipped, diffusers with its documented
    settings) and make one image; print peak memory as JSON."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtypes[0])
    if args.child == "diffusers":
        quiet_diffusers()
    rss_before = peak_rss_mib()
    with torch.inference_mode():
        side = SIDES[args.child](args.folder, device, dtype)
        side.layout(*AS_USED[args.child].layout(device, dtype))
        side.generate(args.size, args.memory_steps)
    result = {"peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": rss_before}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def peak_memory(name: str, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", name, "--folder", str(args.folder),
        "--size", str(args.size), "--memory-steps", str(args.memory_steps), "--device", args.device,
        "--dtypes", dtype, "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory child for {name} ({dtype}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- one dtype ---------------------------------------------------------------------


def row(metric: str, unit: str, samples: dict[Any, list[float]], scale: float = 1.0,
        flops: float | None = None, peak_gflops: float | None = None,
        shipped: Variant | None = None) -> dict[str, Any]:
    """Medians per variant (and best-of), the ratio ldm as shipped / diffusers documented,
    and, given the work's FLOPs, GFLOP/s and the share of the GEMM peak. ``shipped``: the
    measured variant that is ldm as shipped, for rows measured per layout."""
    cells = {}
    for key, values in samples.items():
        label = (key if isinstance(key, Variant) else AS_USED[key]).label
        med = statistics.median(values)
        cell = {"median": med * scale, "min": min(values) * scale, "samples": [v * scale for v in values]}
        if flops is not None:
            cell["gflops"] = flops / med / 1e9
            if peak_gflops:
                cell["peak_percent"] = 100 * cell["gflops"] / peak_gflops
        cells[label] = cell
    if shipped is not None:
        cells[SHIPPED.label] = dict(cells[shipped.label])
    ratio = cells[SHIPPED.label]["median"] / cells[DOCUMENTED.label]["median"]
    return {"metric": metric, "unit": unit, "cells": cells, "ratio": ratio}


def unet_inputs(latent: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A U-Net step's inputs at batch 2 (CFG): the same latents and timestep twice (the
    unconditional and the conditional prediction), two text contexts."""
    x = torch.randn(1, 4, latent, latent, generator=gen).to(device, dtype).repeat(2, 1, 1, 1)
    t = torch.tensor([500.0, 500.0], device=device)
    return x, t, torch.randn(2, 77, 768, generator=gen).to(device, dtype)


def bench_dtype(dtype_name: str, args: argparse.Namespace, flops: dict[str, float],
                peak: float | None) -> tuple[list[dict], dict[str, float], dict[str, Any]]:
    device, dtype = torch.device(args.device), parse_dtype(dtype_name)
    print(f"--- {dtype_name} ---", file=sys.stderr)
    mem = {name: peak_memory(name, dtype_name, args) for name in IMPLS}  # before this process holds a model
    rows, checks = [], {}
    # ldm's phases run inside a filter workspace (ldm.models.winograd) as the pipeline's do:
    # the U-Net's keeping its filters from step to step (a denoising loop), the VAE's not.
    denoising = functools.partial(filter_workspace, keep=True)
    with torch.inference_mode():
        rows.append(row("load", "s", bench_load(args.folder, device, dtype, args.repeats)))
        sides = {name: SIDES[name](args.folder, device, dtype) for name in IMPLS}

        def before(variant: Variant, warm: Callable[[Side], Any] | None = None) -> None:
            side = sides[variant.side]
            if side.layout(*variant.layout(device, dtype)) and warm is not None:
                # New weights: a denoising loop makes their kept Winograd filters once, on its
                # first step, so a U-Net step is timed with them made (untimed call).
                warm(side)

        def components(label: str, call: Callable[[Side], Any], variants: tuple[Variant, ...] = VARIANTS,
                       warmup: bool = True, workspace: Callable[[], ContextManager] = filter_workspace
                       ) -> tuple[dict, dict]:
            fns = {v: (lambda s=sides[v.side]: call(s)) for v in variants}
            keeps = workspace is denoising
            with workspace():
                return interleaved(fns, args.repeats, device, label,
                                   functools.partial(before, warm=call if keeps else None), warmup)

        times, out = components("text", lambda s: s.text(), (SHIPPED, DOCUMENTED))
        rows.append(row("text encoding, prompt + negative", "ms", times, 1e3))
        checks["text embeddings max abs diff"] = (out[SHIPPED].float() - out[DOCUMENTED].float()).abs().max().item()

        gen = torch.Generator("cpu").manual_seed(0)
        latent = args.size // 8
        x, t, context = unet_inputs(latent, device, dtype, gen)
        z = torch.randn(1, 4, latent, latent, generator=gen).to(device, dtype)
        image = (torch.rand(1, 3, args.size, args.size, generator=gen) * 2 - 1).to(device, dtype)
        for key, label, call in (
            ("unet", f"U-Net step, batch 2 (CFG), {latent}x{latent} latents", lambda s: s.unet(x, t, context)),
            ("decode", f"VAE decode, 1 image {args.size}x{args.size}", lambda s: s.decode(z)),
            ("encode", f"VAE encode, 1 image {args.size}x{args.size}", lambda s: s.encode(image)),
        ):
            times, out = components(key, call, workspace=denoising if key == "unet" else filter_workspace)
            unet_cl, vae_cl = SHIPPED.layout(device, dtype)
            shipped = LDM_CL if (unet_cl if key == "unet" else vae_cl) else LDM
            rows.append(row(label, "ms", times, 1e3, flops[key], peak, shipped))
            ref = out[DOCUMENTED].float()
            for variant in (LDM, LDM_CL):
                checks[f"{key}: {variant.label} vs {DOCUMENTED.label}, max abs diff / max abs"] = (
                    (out[variant].float() - ref).abs().max() / ref.abs().max()).item()
            del out
        if args.batch4:  # the GPU table's second batch size: 4 images, both guidance halves each
            x4, t4, context4 = (v.repeat(4, *[1] * (v.ndim - 1)) for v in (x, t, context))
            times, _ = components("unet x4", lambda s: s.unet(x4, t4, context4), (SHIPPED, DOCUMENTED),
                                  workspace=denoising)
            rows.append(row(f"U-Net step, 4 images (batch 8 with CFG), {latent}x{latent} latents", "ms", times,
                            1e3, 4 * flops["unet"], peak))

        sides[SHIPPED.side].layout(*SHIPPED.layout(device, dtype))
        with denoising():  # the U-Net comparisons as in a denoising loop
            opt_in = bench_feature_cache(sides[SHIPPED.side].pipe.unet, x, t, context, args.repeats, device)
            opt_in.update(bench_token_merging(sides[SHIPPED.side].pipe.unet, x, t, context, args.repeats, device))
            if device.type == "cpu" and dtype == torch.bfloat16:
                opt_in.update(bench_gemm_attention(sides[SHIPPED.side].pipe.unet, x, t, context, args.repeats,
                                                   device))
        if device.type == "cpu":  # enters each model's workspace itself
            opt_in.update(bench_fast_paths(sides[SHIPPED.side].pipe, x, t, context, z, args.repeats, device))
        if args.compile:
            with denoising():
                opt_in.update(bench_compiled(sides, x, t, context, args.repeats, device, args.compile_mode))
        # The components above ran the same shapes: no warm-up needed for the whole image. The
        # pipeline enters its phases' workspaces itself.
        times, out = components("text-to-image", lambda s: s.generate(args.size, args.steps),
                                (SHIPPED, DOCUMENTED), warmup=False, workspace=contextlib.nullcontext)
        rows.append(row(f"text-to-image, {args.steps} steps DPM++ 2M", "s", times))
        checks["image max abs pixel diff (0..1)"] = float(np.abs(out[SHIPPED] - out[DOCUMENTED]).max())
        sides.clear()  # both models go before the next dtype loads
        del out
        gc.collect()

    key = "cuda_peak_mib" if device.type == "cuda" else "peak_rss_mib"
    label = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS, fresh process"
    rows.append(row(f"{label}, load + 1 image", "MiB", {n: [mem[n][key]] for n in IMPLS}))
    if device.type == "cuda":
        rows.append(row("peak RSS, fresh process, load + 1 image", "MiB", {n: [mem[n]["peak_rss_mib"]] for n in IMPLS}))
    return rows, checks, mem, opt_in


def bench_unet_only(dtype_name: str, args: argparse.Namespace) -> str:
    """The U-Net step of ldm as shipped against diffusers as documented, interleaved, on the
    inputs of the full run's row; one line with the medians, their ratio and every time
    (and with ``--compile``, a second line: both U-Nets compiled against eager)."""
    device, dtype = torch.device(args.device), parse_dtype(dtype_name)
    with torch.inference_mode(), filter_workspace(keep=True):
        sides = {name: SIDES[name](args.folder, device, dtype) for name in IMPLS}
        latent = args.size // 8
        x, t, context = unet_inputs(latent, device, dtype, torch.Generator("cpu").manual_seed(0))
        fns = {v: (lambda s=sides[v.side]: s.unet(x, t, context)) for v in (SHIPPED, DOCUMENTED)}
        times, _ = interleaved(fns, args.repeats, device, "unet",
                               lambda v: sides[v.side].layout(*v.layout(device, dtype)))
        compiled = (bench_compiled(sides, x, t, context, args.repeats, device, args.compile_mode)
                    if args.compile else {})
    ldm, diffusers = (statistics.median(times[v]) for v in (SHIPPED, DOCUMENTED))
    every = "; ".join(f"{v.label}: {', '.join(f'{s:.4g}' for s in times[v])}" for v in times)
    line = (f"{dtype_name}, U-Net step, batch 2, {latent}x{latent} latents, median of {args.repeats}: ldm {ldm:.4g} s, "
            f"diffusers {diffusers:.4g} s, ratio {ldm / diffusers:.3f} ({diffusers / ldm:.2f}x) ({every} s)")
    if compiled:
        line += (f"\n{dtype_name}, torch.compile (mode {args.compile_mode}), the same step: "
                 + "; ".join(f"{k} {v:.4g}" for k, v in compiled.items()))
    return line


def bench_compiled(sides: dict[str, Side], x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                   repeats: int, device: torch.device, mode: str = "default") -> dict[str, float]:
    """Both U-Nets through ``torch.compile`` (inductor in ``mode``, weights not frozen:
    what ``Pipeline.compile`` does), each in its shipped / documented layout: the compile
    (with the first call), then the compiled step against the eager one in the same rounds.
    Each side gets its eager U-Net back after."""
    out: dict[str, float] = {}
    fns: dict[str, Callable[[], Any]] = {}
    eager = {name: side.pipe.unet for name, side in sides.items()}
    try:
        for variant in (SHIPPED, DOCUMENTED):
            side = sides[variant.side]
            side.layout(*variant.layout(device, x.dtype))
            compiled = torch.compile(eager[variant.side], mode=mode, dynamic=False)
            seconds, _ = timed(lambda: _with_unet(side, compiled, x, t, context), device)
            out[f"{side.name}: torch.compile + first call (s)"] = seconds
            _with_unet(side, compiled, x, t, context)  # reduce-overhead records its CUDA graph on a later call
            fns[f"{side.name} compiled"] = lambda s=side, m=compiled: _with_unet(s, m, x, t, context)
            fns[f"{side.name} eager"] = lambda s=side, m=eager[variant.side]: _with_unet(s, m, x, t, context)
        times, _ = interleaved(fns, repeats, device, "compiled", warmup=False)
    finally:
        for name, side in sides.items():
            side.pipe.unet = eager[name]
    for key, samples in times.items():
        out[f"{key} U-Net step (ms)"] = float(np.median(samples)) * 1e3
    for side in sides.values():
        out[f"{side.name}: compiled / eager"] = (out[f"{side.name} compiled U-Net step (ms)"]
                                                 / out[f"{side.name} eager U-Net step (ms)"])
    return out


def _with_unet(side: Side, module: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
               context: torch.Tensor) -> torch.Tensor:
    side.pipe.unet = module
    return side.unet(x, t, context)


def bench_feature_cache(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        repeats: int, device: torch.device) -> dict[str, float]:
    """ldm alone: the U-Net's full step against its shallow branch on kept deep features
    (``cache_interval`` > 1, DeepCache), and what an interval of 3 makes of a step on average."""
    from ldm.models.feature_cache import FeatureCache

    cache = FeatureCache(2)
    unet(x, t, context, cache=cache)  # a full pass keeps the feature

    def shallow() -> torch.Tensor:
        cache.calls = 1  # an evaluation the interval says to reuse
        return unet(x, t, context, cache=cache)

    times, _ = interleaved({"full": lambda: unet(x, t, context), "shallow": shallow}, repeats, device,
                           "feature cache")
    full, part = (float(np.median(times[k])) for k in ("full", "shallow"))
    return {"U-Net full step (ms)": full * 1e3, "U-Net shallow step on kept features (ms)": part * 1e3,
            "shallow / full": part / full, "cache_interval 3: mean step / full step": (full + 2 * part) / (3 * full)}


def with_mode(setter: Callable[[str], str], mode: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run with a module-wide switch (``set_gemm_attention``, ``set_winograd``, ...) at ``mode``."""
    def run() -> torch.Tensor:
        previous = setter(mode)
        try:
            return fn()
        finally:
            setter(previous)
    return run


def in_float32(module: torch.nn.Module, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn``'s output with ``module`` in float32 (a reduced-precision module's weights come
    back unchanged: bfloat16 -> float32 -> bfloat16 is exact); ``fn`` casts its inputs."""
    dtype = next(module.parameters()).dtype
    module.float()
    try:
        return fn().float()
    finally:
        module.to(dtype)


def distance(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_gemm_attention(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                         repeats: int, device: torch.device) -> dict[str, float]:
    """ldm alone, bfloat16 on the CPU: the U-Net step with its attention as GEMMs
    (ldm.models.gemm_attention, on by default where the CPU suits it) against torch's
    SDPA, and each one's distance to the float32 U-Net on the same (bfloat16) inputs."""
    from ldm.models.gemm_attention import cpu_suits_gemm_attention, set_gemm_attention

    step = {k: with_mode(set_gemm_attention, mode, lambda: unet(x, t, context))
            for k, mode in (("gemm", "on"), ("sdpa", "off"))}
    times, out = interleaved(step, repeats, device, "GEMM attention")
    ref = in_float32(unet, lambda: unet(x.float(), t, context.float()))
    gemm, sdpa = (float(np.median(times[k])) for k in ("gemm", "sdpa"))
    return {"U-Net step, GEMM attention (ms)": gemm * 1e3, "U-Net step, SDPA attention (ms)": sdpa * 1e3,
            "GEMM attention step / SDPA step": gemm / sdpa,
            "GEMM attention on by default here (AVX512-BF16, no AMX)": float(cpu_suits_gemm_attention()),
            "U-Net output vs float32, relative, GEMM attention": distance(out["gemm"], ref),
            "U-Net output vs float32, relative, SDPA attention": distance(out["sdpa"], ref)}


def bench_fast_paths(pipe: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, z: torch.Tensor,
                     repeats: int, device: torch.device) -> dict[str, float]:
    """ldm alone on the CPU, for each of its convolution and linear fast paths (Winograd 3x3
    convolutions, ldm.models.winograd; upsampling convolutions as four phases,
    ldm.models.upsample_conv; biases and GEGLU fused into the GEMM, ldm.models.fused_linear):
    the U-Net step and the VAE decode with it where it pays (the default) against without
    it, and each one's distance to the float32 result without the convolution paths."""
    from ldm.models.fused_linear import set_fused_linear
    from ldm.models.unet import set_shared_first_layers
    from ldm.models.upsample_conv import set_upsample_phases
    from ldm.models.winograd import set_kept_filters, set_wide_tiles, set_winograd

    def plain(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return with_mode(set_winograd, "off", with_mode(set_upsample_phases, "off", fn))

    result: dict[str, float] = {}
    both = (("Winograd", set_winograd, "direct convolutions"),
            ("upsample phases", set_upsample_phases, "interpolate + conv"),
            ("fused linear", set_fused_linear, "F.linear + GELU"))
    bf16_only = (set_kept_filters, set_wide_tiles)
    unet_only = (("kept filters", set_kept_filters, "filters made on each call"),
                 ("F(2x4) tiles", set_wide_tiles, "F(2x2) tiles"),
                 ("shared first layers", set_shared_first_layers, "both halves through them"))
    # Each in its workspace as the pipeline runs it: the U-Net's keeps its filters over the loop.
    for key, module, call, paths, keep in (
            ("U-Net step", pipe.unet, lambda dt: pipe.unet(x.to(dt), t, context.to(dt)), both + unet_only, True),
            ("VAE decode", pipe.vae, lambda dt: pipe.vae.decode(z.to(dt)), both, False)):
        with filter_workspace(keep=keep):
            dtype = next(module.parameters()).dtype
            ref = plain(lambda: in_float32(module, lambda: call(torch.float32)))()  # one reference for both paths
            # Kept filters and their F(2x4) tiles are bfloat16's: in float32 both sides would be one computation.
            for path, setter, without in (p for p in paths if dtype == torch.bfloat16 or p[1] not in bf16_only):
                fns = {mode: with_mode(setter, mode, lambda: call(dtype)) for mode in ("auto", "off")}
                times, out = interleaved(fns, repeats, device, f"{path} {key}")
                auto, off = (float(np.median(times[k])) for k in ("auto", "off"))
                result.update({f"{key}, {path} where it pays (ms)": auto * 1e3, f"{key}, {without} (ms)": off * 1e3,
                               f"{key}: {path} / {without}": auto / off,
                               f"{key} vs float32 without both, relative, {path}": distance(out["auto"], ref),
                               f"{key} vs float32 without both, relative, {without}": distance(out["off"], ref)})
    return result


def bench_token_merging(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        repeats: int, device: torch.device) -> dict[str, float]:
    """ldm alone: the U-Net step with half the first level's tokens merged around
    self-attention (``token_merging=0.5``, ToMe) against the full step."""
    from ldm.models.token_merging import set_token_merging

    def merged() -> torch.Tensor:
        set_token_merging(unet, 0.5)
        try:
            return unet(x, t, context)
        finally:
            set_token_merging(unet, 0.0)

    times, _ = interleaved({"full": lambda: unet(x, t, context), "merged": merged}, repeats, device, "token merging")
    full, part = (float(np.median(times[k])) for k in ("full", "merged"))
    return {"U-Net step, token_merging 0.5 (ms)": part * 1e3, "token_merging 0.5 step / full step": part / full}


# --- report ------------------------------------------------------------------------


def load_average() -> str:
    """1/5/15-minute load averages: above the thread count, others were competing."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import transformers

    cpu = torch.device("cpu")
    flags = cpu_flags()
    isa = [name for name in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    info = {
        "cpu": cpu_model(),
        "cpu_isa": ", ".join(isa) or "unknown",
        "bf16_native": native_bf16(cpu),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "dtypes": ", ".join(args.dtypes),
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "mode": "short" if args.short else "full",
    }
    if info["bf16_native"]:
        info["bf16_probe_speedup"] = round(bf16_speedup(), 3)
    info["ldm_default_cpu_dtype"] = str(default_dtype(cpu)).removeprefix("torch.")
    info["load_average_start"] = load_average()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def fmt_cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "–"
    text = f"{cell['median']:.4g}"
    if "peak_percent" in cell:
        text += f" ({cell['gflops']:.0f} GFLOP/s, {cell['peak_percent']:.0f}%)"
    return text


def markdown(info: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    bf16 = "native" if info["bf16_native"] else "emulated"
    lines = [
        f"ldm vs diffusers, SD1.5 architecture with random weights, {info['size']}x{info['size']}, "
        f"CFG {GUIDANCE}, median of {info['repeats']} ({info['mode']} mode)",
        "",
        f"Machine: {info['cpu']} ({info['cpu_isa']}; bfloat16 {bf16}), {info['torch_threads']} torch "
        f"thread(s) of {info['cpu_count']} CPUs, load average {info['load_average_start']} at the start, "
        f"{info['load_average_end']} at the end; ldm's default CPU dtype here: {info['ldm_default_cpu_dtype']}"
        + (f" (bfloat16 probe: {info['bf16_probe_speedup']}x float32's speed, needs {BF16_MIN_SPEEDUP}x)"
           if "bf16_probe_speedup" in info else ""),
    ]
    for dtype_name, result in results.items():
        peak = result["gemm_peak_gflops"]
        lines += [
            "", f"{dtype_name}: GEMM peak measured {peak:.0f} GFLOP/s. Cells: median; for the U-Net and the VAE, "
            "GFLOP/s and % of that peak.", "",
            f"| metric | {' | '.join(v.label for v in COLUMNS)} | ratio {SHIPPED.label} / "
            f"{DOCUMENTED.label} (<1: ldm faster) |",
            "|---|" + "---|" * (len(COLUMNS) + 1),
        ]
        for r in result["rows"]:
            cells = [fmt_cell(r["cells"].get(v.label)) for v in COLUMNS]
            lines.append(f"| {r['metric']} ({r['unit']}) | {' | '.join(cells)} | {r['ratio']:.3f} |")
        steps = [r for r in result["rows"] if r["metric"].startswith("U-Net step")]
        lines += ["", "U-Net steps per second (it/s), " + f"{SHIPPED.label} / {DOCUMENTED.label}: " + "; ".join(
            f"{r['metric'].split(', ')[1]}: {1e3 / r['cells'][SHIPPED.label]['median']:.3g} / "
            f"{1e3 / r['cells'][DOCUMENTED.label]['median']:.3g}" for r in steps)]
        lines += ["", "Checks (same weights, same inputs / seed):", ""]
        lines += [f"- {k}: {v:.3g}" for k, v in result["checks"].items()]
        lines += ["", f"Opt-in: DeepCache (`cache_interval`) and token merging (`token_merging`), "
                  f"{SHIPPED.label} alone, batch 2; in bfloat16 on the CPU, its attention as GEMMs against "
                  "torch's SDPA; on the CPU, its convolution and linear fast paths against their absence; with --compile, "
                  "torch.compile of both U-Nets:", ""]
        lines += [f"- {k}: {v:.3g}" for k, v in result["opt_in"].items()]
    lines += ["", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------


def default_dtypes(device: str) -> list[str]:
    """float16 on CUDA; on CPU float32, and bfloat16 too where it is native (emulated, a
    full-size U-Net step takes many minutes)."""
    if device.startswith("cuda"):
        return ["float16"]
    return ["float32", "bfloat16"] if native_bf16(torch.device("cpu")) else ["float32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", help="comma-separated (default: float16 on CUDA; float32 on CPU, "
                   "and bfloat16 where the CPU computes it natively)")
    p.add_argument("--short", action="store_true",
                   help="a few minutes on CPU: 256x256, 4 steps, 1 repeat (the full mode: 512x512, 20 steps, 3)")
    p.add_argument("--size", type=int, help="image side in pixels (default 512; 256 with --short)")
    p.add_argument("--steps", type=int, help="steps of the end-to-end image (default 20; 4 with --short)")
    p.add_argument("--repeats", type=int, help="timed rounds per metric (default 3; 1 with --short)")
    p.add_argument("--memory-steps", type=int,
                   help="steps of the peak-memory image (default: --steps; 1 with --short: the peak is "
                   "the weights and the VAE decode, and from 8 steps on, in bfloat16 on the CPU, the Winograd "
                   "filters ldm keeps over the loop)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--folder", type=Path, default=CACHE / "sd15-random",
                   help="the random-weight diffusers folder (built here if missing)")
    p.add_argument("--out", type=Path, default=CACHE / "bench-results",
                   help="results path without suffix: writes .md and .json")
    p.add_argument("--batch4", action=argparse.BooleanOptionalAction, default=None,
                   help="also a U-Net step for 4 images (batch 8 with CFG; default: on CUDA only)")
    p.add_argument("--compile", action="store_true",
                   help="also time both U-Nets through torch.compile (compiles take minutes on a CPU)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode for --compile (default: reduce-overhead, i.e. CUDA graphs, on CUDA, "
                        "as diffusers documents for its U-Net; default elsewhere)")
    p.add_argument("--unet-only", action="store_true",
                   help="only the U-Net step, ldm as shipped against diffusers as documented, per dtype: a "
                        "quick ratio with more repeats (prints one line per dtype, writes nothing)")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size = args.size or (256 if args.short else 512)
    args.steps = args.steps or (4 if args.short else 20)
    args.repeats = args.repeats or (1 if args.short else 3)
    args.memory_steps = args.memory_steps or (1 if args.short else args.steps)
    args.batch4 = args.device.startswith("cuda") if args.batch4 is None else args.batch4
    args.compile_mode = args.compile_mode or ("reduce-overhead" if args.device.startswith("cuda") else "default")
    args.dtypes = args.dtypes.split(",") if args.dtypes else default_dtypes(args.device)
    for name in args.dtypes:
        try:
            parse_dtype(name)
        except ValueError as exc:
            p.error(f"--dtypes: {exc}")
    if args.size % 8:
        p.error(f"--size must be a multiple of 8, got {args.size}")
    if min(args.steps, args.repeats, args.memory_steps, args.threads) < 1:
        p.error("--steps, --repeats, --memory-steps and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    torch.set_num_threads(args.threads)
    quiet_diffusers()
    device = torch.device(args.device)
    t0 = time.perf_counter()
    build_folder(args.folder)
    info = machine_info(args)
    print(f"folder ready in {time.perf_counter() - t0:.0f} s; {info}", file=sys.stderr)
    if args.unet_only:
        for name in args.dtypes:
            print(bench_unet_only(name, args))
        return
    flops = count_flops(args.size)
    results = {}
    for name in args.dtypes:
        peak = gemm_peak(parse_dtype(name), device)
        rows, checks, mem, opt_in = bench_dtype(name, args, flops, peak)
        after = gemm_peak(parse_dtype(name), device)
        if after > peak:  # the first measurement was disturbed: rescale the percentages
            for r in rows:
                for cell in r["cells"].values():
                    if "peak_percent" in cell:
                        cell["peak_percent"] *= peak / after
        results[name] = {"gemm_peak_gflops": max(peak, after), "gemm_peak_before_after": [peak, after],
                         "rows": rows, "checks": checks, "memory_children": mem, "opt_in": opt_in}
    info["total_wall_s"] = round(time.perf_counter() - t0, 1)
    info["load_average_end"] = load_average()

    text = markdown(info, results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    payload = {"machine": info, "flops": flops, "results": results}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
