"""Benchmark ldm against diffusers: same machine, same run, same random weights.

Builds (once, cached) a diffusers StableDiffusionPipeline folder holding the full
SD1.5 architecture with random weights, loads it with both libraries and measures,
interleaving the two (the order flips on every repeat, after one warm-up each) and
reporting medians:

1. load time of the folder;
2. one U-Net forward pass at batch 2 (classifier-free guidance);
3. text-to-image end to end with DPM++ 2M (diffusers' DPMSolverMultistepScheduler),
   same seed, plus the largest pixel difference between the two images as a sanity check;
4. peak memory of a fresh subprocess per library that loads the folder and makes one
   image: peak RSS on CPU (in-process RSS would mix both libraries), and
   ``torch.cuda.max_memory_allocated`` on CUDA.

    python scripts/bench.py                      # CPU: 256x256, 4 steps, 3 repeats
    python scripts/bench.py --device cuda        # CUDA: 512x512, 20 steps, float16

Only diffusers' timings from the same run are comparable with ldm's: on a shared
machine absolute numbers move, the ratios much less.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the diffusers reference helpers live there

from reference import SD1_SCHEDULER_CONFIG, _randomize, write_pipeline_files  # noqa: E402

CACHE = ROOT / ".cache" / "bench"
IMPLS = ("ldm", "diffusers")
PROMPT = "a photograph of an astronaut riding a horse on the moon"
NEGATIVE = "blurry, low quality"
SEED = 42
GUIDANCE = 7.5

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


class LdmSide:
    name = "ldm"

    def __init__(self, folder: Path, device: torch.device, dtype: torch.dtype) -> None:
        from ldm import Pipeline

        self.pipe = Pipeline.from_pretrained(folder, device=device, dtype=dtype)

    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x, t, context)

    def generate(self, size: int, steps: int) -> np.ndarray:
        return self.pipe(
            PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=GUIDANCE, seed=SEED,
            width=size, height=size, sampler="dpmpp_2m", output="np", progress=False,
        )[0]


class DiffusersSide:
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

    def generate(self, size: int, steps: int) -> np.ndarray:
        return self.pipe(
            PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(SEED)], height=size, width=size,
            output_type="np",
        ).images[0]


SIDES = {"ldm": LdmSide, "diffusers": DiffusersSide}


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


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device,
                label: str) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """One untimed warm-up each, then ``repeats`` timed rounds; the order flips every
    round (A B, B A, ...) so drift on a shared machine hits both sides alike."""
    names = list(fns)
    last: dict[str, Any] = {}
    for name in names:
        _, last[name] = timed(fns[name], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds, last[name] = timed(fns[name], device)
            times[name].append(seconds)
            print(f"  {label}: {name} {seconds:.3f} s", file=sys.stderr)
    return times, last


def bench_load(folder: Path, device: torch.device, dtype: torch.dtype, repeats: int
               ) -> dict[str, list[float]]:
    def load(name: str) -> Callable[[], None]:
        def run() -> None:
            side = SIDES[name](folder, device, dtype)
            del side
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

        return run

    times, _ = interleaved({name: load(name) for name in IMPLS}, repeats, device, "load")
    return times


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
    """Load with one library and make one image; print peak memory as JSON."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if args.child == "diffusers":
        quiet_diffusers()
    rss_before = peak_rss_mib()
    with torch.inference_mode():
        side = SIDES[args.child](args.folder, device, dtype)
        side.generate(args.size, args.steps)
    result = {"peak_rss_mib": peak_rss_mib(), "rss_after_imports_mib": rss_before}
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def peak_memory(name: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child", name, "--folder", str(args.folder),
        "--size", str(args.size), "--steps", str(args.steps), "--device", args.device,
        "--dtype", args.dtype, "--threads", str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory child for {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """1/5/15-minute load averages: above the thread count, others were competing."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    info["load_average_start"] = load_average()
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    return info


def median_row(metric: str, unit: str, samples: dict[str, list[float]], scale: float = 1.0) -> dict:
    med = {name: statistics.median(samples[name]) * scale for name in IMPLS}
    best = {name: min(samples[name]) * scale for name in IMPLS}
    return {"metric": metric, "unit": unit, "samples": samples, "min": best, **med,
            "ratio": med["ldm"] / med["diffusers"]}


def markdown(info: dict[str, Any], rows: list[dict], checks: dict[str, float]) -> str:
    lines = [
        f"ldm vs diffusers, SD1.5 architecture with random weights, {info['size']}x{info['size']}, "
        f"{info['steps']} steps DPM++ 2M, CFG {GUIDANCE}, median of {info['repeats']}",
        "",
        "| metric | ldm | diffusers | ratio (ldm/diffusers, <1 better) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {row['metric']} ({row['unit']}) | {row['ldm']:.3f} | {row['diffusers']:.3f} "
                     f"| {row['ratio']:.3f} |")
    lines += [
        "", f"Best of {info['repeats']} (less sensitive to other load on a shared machine):", "",
        "| metric | ldm | diffusers | ratio |", "|---|---|---|---|",
    ]
    for row in rows:
        best = row["min"]
        lines.append(f"| {row['metric']} ({row['unit']}) | {best['ldm']:.3f} | {best['diffusers']:.3f} "
                     f"| {best['ldm'] / best['diffusers']:.3f} |")
    lines += ["", "Sanity checks (same weights, same inputs / seed):", ""]
    lines += [f"- {k}: {v:.3g}" for k, v in checks.items()]
    lines += ["", "Machine:", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


# --- main ----------------------------------------------------------------------------


def parse_dtype(name: str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in names:
        raise SystemExit(f"unknown --dtype {name!r}; valid: {', '.join(names)}")
    return names[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--size", type=int, help="image side in pixels (default: 512 on CUDA, 256 on CPU)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 20 on CUDA, 4 on CPU)")
    p.add_argument("--repeats", type=int, help="timed rounds per metric (default: 5 on CUDA, 3 on CPU)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads, both sides")
    p.add_argument("--folder", type=Path, default=CACHE / "sd15-random",
                   help="the random-weight diffusers folder (built here if missing)")
    p.add_argument("--out", type=Path, default=CACHE / "bench-results",
                   help="results path without suffix: writes .md and .json")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    args.size = args.size or (512 if cuda else 256)
    args.steps = args.steps or (20 if cuda else 4)
    args.repeats = args.repeats or (5 if cuda else 3)
    if args.size % 8:
        p.error(f"--size must be a multiple of 8, got {args.size}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return
    torch.set_num_threads(args.threads)
    quiet_diffusers()
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)
    t0 = time.perf_counter()
    build_folder(args.folder)
    info = machine_info(args)
    print(f"folder ready in {time.perf_counter() - t0:.0f} s; {info}", file=sys.stderr)

    # Memory first, in fresh processes, before this one holds any model.
    mem = {name: peak_memory(name, args) for name in IMPLS}
    rows, checks = [], {}
    with torch.inference_mode():
        rows.append(median_row("load", "s", bench_load(args.folder, device, dtype, args.repeats)))

        sides = {name: SIDES[name](args.folder, device, dtype) for name in IMPLS}
        gen = torch.Generator("cpu").manual_seed(0)
        latent = args.size // 8
        x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
        t = torch.tensor([500.0, 500.0], device=device)
        context = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
        times, out = interleaved({n: (lambda s=s: s.unet(x, t, context)) for n, s in sides.items()},
                                 args.repeats, device, "unet")
        rows.append(median_row(f"U-Net forward, batch 2, {latent}x{latent} latents", "ms", times, 1e3))
        a, b = out["ldm"].float(), out["diffusers"].float()
        checks["U-Net max abs diff / max abs output"] = ((a - b).abs().max() / b.abs().max()).item()

        times, out = interleaved(
            {n: (lambda s=s: s.generate(args.size, args.steps)) for n, s in sides.items()},
            args.repeats, device, "text-to-image",
        )
        rows.append(median_row(f"text-to-image, {args.steps} steps", "s", times))
        checks["image max abs pixel diff (0..1)"] = float(np.abs(out["ldm"] - out["diffusers"]).max())
        if checks["image max abs pixel diff (0..1)"] > 1e-2:
            print("WARNING: ldm's and diffusers' images differ: the timings compare different work",
                  file=sys.stderr)
        del sides, out
        gc.collect()

    key = "cuda_peak_mib" if device.type == "cuda" else "peak_rss_mib"
    label = "peak CUDA memory allocated" if device.type == "cuda" else "peak RSS, fresh process"
    rows.append(median_row(f"{label}, load + 1 image", "MiB", {n: [mem[n][key]] for n in IMPLS}))
    if device.type == "cuda":
        rows.append(median_row("peak RSS, fresh process, load + 1 image", "MiB",
                               {n: [mem[n]["peak_rss_mib"]] for n in IMPLS}))
    info["total_wall_s"] = round(time.perf_counter() - t0, 1)
    info["load_average_end"] = load_average()

    text = markdown(info, rows, checks)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    payload = {"machine": info, "results": rows, "checks": checks, "memory_children": mem}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
