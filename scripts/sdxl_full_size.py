"""The full-size SDXL base on the CPU: load a 1024x1024 render's worth of weights and
memory, and record the peak.

    python scripts/sdxl_full_size.py                  # bfloat16, 1 step, 1024x1024
    python scripts/sdxl_full_size.py --steps 2 --dtype float32

No SDXL weights can be downloaded, so the script first writes a full-size SDXL base
with random weights as an original-layout single file, as the released
``sd_xl_base_1.0.safetensors`` is laid out (U-Net, VAE, CLIP-L and OpenCLIP bigG; no
ldm metadata, so the model is detected from its shapes), in ``--dtype`` (default
bfloat16; about 7 GB). A fresh process then loads it with ``Pipeline.from_pretrained``
and renders one image, and reports its peak resident memory (Linux's VmHWM), the load
time and the render time. The random weights make a picture of noise; the point is
that everything fits and runs. Slow (minutes) and large: not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_FILE = ROOT / ".cache" / "sdxl-random" / "sdxl-base-random.safetensors"


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def write_random_sdxl(path: Path, dtype_name: str, seed: int = 0) -> None:
    """A full-size SDXL base with random weights, as an original-layout single file."""
    import torch

    from ldm.checkpoints.convert import original_state
    from ldm.checkpoints.files import save_safetensors
    from ldm.checkpoints.loading import build_modules
    from ldm.config import SDXL

    torch.manual_seed(seed)
    dtype = getattr(torch, dtype_name)
    states = {}
    for name, module in build_modules(SDXL).items():
        module.to_empty(device="cpu").to(dtype)
        with torch.no_grad():
            for key, tensor in module.state_dict().items():
                # Norm weights 1, biases 0, other weights small: activations stay finite.
                if key.endswith("bias"):
                    tensor.zero_()
                elif tensor.ndim == 1:
                    tensor.fill_(1.0)
                else:
                    tensor.normal_(0.0, 0.02)
        states[name] = module.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_safetensors(original_state(SDXL, states), tmp, metadata={"format": "pt"})
    tmp.replace(path)


def render(path: Path, dtype_name: str, steps: int, size: int) -> dict:
    """Load and render in this (fresh) process; the figures as a dict."""
    import torch

    from ldm import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(path, device="cpu", dtype=dtype_name)
    loaded = time.perf_counter()
    after_load = peak_rss_mib()
    latents = pipe.generate("a photograph of a cat wearing a hat", steps=steps, width=size, height=size, seed=0,
                            progress=False, output="latent").images
    sampled = time.perf_counter()
    image = pipe.decode(latents, output="np")
    done = time.perf_counter()
    return {"family": pipe.config.family, "dtype": dtype_name, "steps": steps, "size": size,
            "threads": torch.get_num_threads(), "load_s": round(loaded - t0, 1),
            "sample_s": round(sampled - loaded, 1), "decode_s": round(done - sampled, 1),
            "peak_rss_after_load_mib": round(after_load), "peak_rss_mib": round(peak_rss_mib()),
            "image_shape": list(image.shape), "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the random SDXL file (written if missing)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--render", action="store_true", help=argparse.SUPPRESS)  # the fresh process
    args = p.parse_args(argv)
    if args.render:
        print(json.dumps(render(args.file, args.dtype, args.steps, args.size)))
        return 0
    if not args.file.is_file():
        t0 = time.perf_counter()
        write_random_sdxl(args.file, args.dtype)
        print(f"wrote {args.file} ({args.file.stat().st_size / 2**30:.1f} GiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    out = subprocess.run([sys.executable, __file__, "--render", "--file", str(args.file), "--dtype", args.dtype,
                          "--steps", str(args.steps), "--size", str(args.size)], check=True, stdout=subprocess.PIPE,
                         text=True)
    print(out.stdout.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
