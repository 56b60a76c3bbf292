"""Compare ldm.limits' memory estimates with what a run really uses (CPU, peak RSS growth).

    python scripts/measure_memory.py 512 1024

Each size runs in its own process, so one size's peak does not hide the next one's.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(size: int) -> str:
    import torch

    from ldm import Pipeline
    from ldm.limits import decode_bytes, unet_bytes_per_row

    torch.set_num_threads(1)
    pipe = Pipeline.from_pretrained(device="cpu", dtype=torch.float32)
    pipe("a cat", steps=1, seed=0, progress=False)  # load everything lazily allocated once
    base = _peak()
    latents = pipe.generate("a cat", steps=1, width=size, height=size, seed=0, progress=False,
                            output="latent").images
    after_unet = _peak()
    pipe.decode(latents)
    after_decode = _peak()
    mib = 2**20
    unet = 2 * unet_bytes_per_row(pipe.config, size, size, 4)
    decode = decode_bytes(pipe.config, size, size, 4)
    return (f"{size} px: U-Net estimate {unet / mib:.0f} MiB, measured {(after_unet - base) / mib:.0f} MiB; "
            f"decode estimate {decode / mib:.0f} MiB, measured {(after_decode - after_unet) / mib:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[512, 1024])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(measure(args.one))
        return
    for size in args.sizes:
        subprocess.run([sys.executable, __file__, "--one", str(size)], check=True)


if __name__ == "__main__":
    main()
