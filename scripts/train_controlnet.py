"""Train a toy ControlNet for the shipped toy model: where the object goes, from its silhouette.

    python scripts/train_controlnet.py --out runs/stage1-controlnet-silhouette.safetensors
    python scripts/train_controlnet.py --init-from runs/stage1-controlnet-silhouette.safetensors \
        --workdir runs/controlnet-silhouette-2 --steps 1200 --lr 5e-4 --seed 1
                                                 # the shipped weights/ldm-toy-controlnet-silhouette.safetensors:
                                                 # 1,400 steps, then 1,200 more (~25 min on 2 CPU cores)
    python scripts/train_controlnet.py --hint outline --out runs/outline.safetensors
    python scripts/train_controlnet.py --smoke   # 2 steps at batch 2 on 8 pictures (seconds)
    accelerate launch scripts/train_controlnet.py                   # one or several GPUs

The toy world knows where it draws each object, so hints cost nothing: every training
picture is a train-split scene (held-out (kind, colour, background) combinations never
occur), its caption (half of them replaced by the empty caption, as the ControlNet
paper does) and its hint, the object's silhouette (``ldm.toy.hints``) at the scene's own
random position and size. The pictures are encoded once by the model's VAE (cached in
``--workdir``); the ControlNet starts as a copy of the frozen U-Net's input half with
zero convs (``ldm.training.controlnet``) and trains on the diffusion loss through the
frozen U-Net, AdamW with a cosine rate after a warm-up, in ldm's resumable stage loop:
rerun the same command after an interruption and it continues where it stopped, bit
for bit. The result is written in the original ControlNet layout (``control_model.*``
keys, ``ldm.checkpoints.save_controlnet``; the config in the metadata), read back with
``ldm.checkpoints.load_controlnet`` as a check; a JSON of model-card numbers is written
beside the checkpoints (``--card``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run as a file from a checkout without installing; bench beside it
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402

from ldm.models.cpuinfo import cpu_model  # noqa: E402

from ldm.atomicio import atomic_write_bytes  # noqa: E402
from ldm.checkpoints import LoadedControlNet, load_controlnet, load_model, save_controlnet  # noqa: E402
from ldm.modelref import model_hash  # noqa: E402
from ldm.paths import WEIGHTS_DIR, default_weights_path  # noqa: E402
from ldm.toy.hints import HINT_KINDS  # noqa: E402
from ldm.toy.world import sample_scene  # noqa: E402
from ldm.training import (  # noqa: E402
    RunSettings, StageSpec, cpu_copy, derive_seed, load_checkpoint, param_count, save_checkpoint, seed_everything,
    stage_card,
)
from ldm.training.controlnet import (  # noqa: E402
    CAPTION_DROPOUT, controlnet_config, controlnet_from_unet, encode_scenes, train_controlnet,
)
from ldm.training.datasets import LatentSet  # noqa: E402
from ldm.training.losses import TIMESTEP_SAMPLING  # noqa: E402

STAGE = "controlnet"
# Random streams (see ldm.training.seeding.derive_seed): scenes, initialisation, training.
SCENE_STREAM, INIT_STREAM, TRAIN_STREAM = 11, 12, 13
# The hint embedding's widths, SD's (16, 32, 96, 256) scaled to the toy U-Net's 64 channels;
# four levels take the 64-pixel hint to the 8x8 latents.
EMBEDDING = (16, 32, 64, 128)
# 1,400 steps x 32 at one thread on the 2-core Intel Xeon: ~0.55 s/step, about 13 minutes.
# A rate well above the paper's 1e-5: a small model, a short run, a cosine to zero. Each
# of the 4,096 pictures is seen about 11 times, each time with other noise, timestep and
# caption. (weights/README.md has the runs that led here.)
FULL = dict(steps=1400, batch=32, lr=1e-3, warmup=50, scenes=4096, save_every=100, log_every=25)
SMOKE = dict(steps=2, batch=2, lr=1e-3, warmup=1, scenes=8, save_every=1, log_every=1)
WEIGHT_DECAY = 1e-2
SAVE_DTYPE = torch.float16  # as the toy model is shipped
THREADS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="the frozen base model (default: the shipped toy)")
    p.add_argument("--hint", choices=HINT_KINDS, default="silhouette", help="hint kind (default %(default)s)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="checkpoint and latents cache (default runs/controlnet-<hint>; --smoke: a new temp folder)")
    p.add_argument("--out", type=Path, default=None,
                   help="the ControlNet file (default weights/ldm-toy-controlnet-<hint>.safetensors; --smoke: "
                        "in the workdir)")
    p.add_argument("--card", type=Path, default=None, help="model-card numbers (default <workdir>/card.json)")
    p.add_argument("--smoke", action="store_true", help="2 steps at batch 2 on 8 pictures")
    p.add_argument("--init-from", type=Path, default=None, metavar="CONTROLNET",
                   help="continue training this ControlNet file (of the same model and hint) instead of "
                        "starting from the U-Net's copy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", choices=TIMESTEP_SAMPLING, default="uniform",
                   help="how training timesteps are drawn: uniform (the paper), or cubic (T2I-Adapter's "
                        "t = (1 - u^3) T, mostly noisy steps, where the layout is decided); default %(default)s")
    p.add_argument("--caption-dropout", type=float, default=CAPTION_DROPOUT,
                   help="fraction of captions replaced by the empty one (default %(default)s, the paper's)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (default %(default)s: as fast as two on this small model, and steady "
                        "when other jobs share the cores)")
    add_size_flags(p, FULL, SMOKE)
    args = p.parse_args(argv)
    resolve_sizes(p, args, FULL, SMOKE)
    if not 0 <= args.caption_dropout < 1:
        p.error(f"--caption-dropout must be in [0, 1), got {args.caption_dropout}")
    if args.workdir is None:
        args.workdir = (Path(tempfile.mkdtemp(prefix="train_controlnet_")) if args.smoke
                        else ROOT / "runs" / f"controlnet-{args.hint}")
    args.out = args.out or (args.workdir if args.smoke else WEIGHTS_DIR) / f"ldm-toy-controlnet-{args.hint}.safetensors"
    args.card = args.card or args.workdir / "card.json"
    args.model = args.model or default_weights_path()
    return args


def add_size_flags(p: argparse.ArgumentParser, full: dict[str, Any], smoke: dict[str, Any]) -> None:
    """The run's sizes (``--steps``, ``--batch``, ``--lr``, ``--warmup``, ``--scenes``,
    ``--save-every``, ``--log-every``), by default ``full``'s, or ``smoke``'s with ``--smoke``."""
    for name, kind in (("steps", int), ("batch", int), ("lr", float), ("warmup", int), ("scenes", int),
                       ("save_every", int), ("log_every", int)):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
                       help=f"default {full[name]} ({smoke[name]} with --smoke)")


def resolve_sizes(p: argparse.ArgumentParser, args: argparse.Namespace, full: dict[str, Any],
                  smoke: dict[str, Any]) -> None:
    """Fill in the sizes not given (see :func:`add_size_flags`); refuse impossible ones
    (and ``--threads`` below 1) with a usage error."""
    for name, value in (smoke if args.smoke else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch", "scenes", "save_every", "log_every", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0 or not args.lr > 0:
        p.error("--warmup must be >= 0 and --lr > 0")


def stage_spec(args: argparse.Namespace) -> StageSpec:
    """AdamW with a cosine rate; the last weights (the paper keeps no moving average)."""
    return StageSpec(STAGE, steps=args.steps, batch_size=args.batch, lr=args.lr, warmup=args.warmup,
                     weight_decay=WEIGHT_DECAY, ema_decay=0.0, schedule="cosine", use_ema=False)


def training_scenes(seed: int, n: int) -> list:
    """``n`` train-split scenes, scene ``i`` from its own seed."""
    return [sample_scene(np.random.default_rng(derive_seed(seed, SCENE_STREAM, i)), "train") for i in range(n)]


def cached_latents(acc: Accelerator, args: argparse.Namespace, vae: torch.nn.Module, scaling_factor: float,
                   size: int, base: str) -> LatentSet:
    """The training scenes encoded by the model's VAE, once per work folder."""
    path = args.workdir / "latents.pt"
    inputs = {"model": base, "scenes": args.scenes, "seed": args.seed, "size": size}
    scenes = training_scenes(args.seed, args.scenes)
    cached = load_checkpoint(path)
    if cached is not None and cached["inputs"] == inputs:
        return LatentSet(cached["moments"], scenes, scaling_factor)
    t0 = time.perf_counter()
    latents = encode_scenes(vae.to(acc.device).eval(), scenes, size, scaling_factor, acc.device)
    if acc.is_main_process:
        save_checkpoint({"inputs": inputs, "moments": latents.moments}, path)
    acc.print(f"encoded {len(scenes)} pictures in {time.perf_counter() - t0:.0f} s")
    return latents


def export(args: argparse.Namespace, config: Any, state: dict[str, torch.Tensor]) -> int:
    """Write the original-layout file and check it reads back to the trained weights."""
    from ldm.models.controlnet import ControlNetModel

    model = ControlNetModel(config)
    model.load_state_dict(state, strict=True)
    loaded = LoadedControlNet(config, model, "trained by scripts/train_controlnet.py", "original")
    save_controlnet(loaded, args.out, layout="original", dtype=SAVE_DTYPE, overwrite=True)
    back = load_controlnet(args.out).model.state_dict()
    worst = max(float((back[k] - v.to(SAVE_DTYPE).float()).abs().max()) for k, v in state.items())
    if set(back) != set(state) or worst > 0:
        raise SystemExit(f"{args.out} does not read back as written (largest difference {worst})")
    return args.out.stat().st_size


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Encode, train, export (see the module doc); the model-card numbers."""
    acc = Accelerator(mixed_precision="no", dataloader_config=DataLoaderConfiguration(split_batches=True))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = model_hash(args.model)
    loaded = load_model(args.model)
    model = loaded.config
    config = controlnet_config(model, EMBEDDING)
    acc.print(f"base {args.model} ({base}), hint {args.hint}, workdir {args.workdir}, "
              f"{acc.num_processes} process(es) on {acc.device}")
    latents = cached_latents(acc, args, loaded.vae, model.vae.scaling_factor, model.vae.sample_size, base)
    seed_everything(derive_seed(args.seed, INIT_STREAM))  # the hint embedding's random start
    controlnet = controlnet_from_unet(loaded.unet, config, zero_hint_out=False)
    inputs = {"model": base, "scenes": args.scenes}
    if args.init_from is not None:
        given = load_controlnet(args.init_from)
        if given.config != config:
            raise SystemExit(f"--init-from {args.init_from}: not a ControlNet of this recipe:\n  {given.config}\n"
                             f"  expected {config}")
        controlnet.load_state_dict(given.model.state_dict(), strict=True)
        inputs["init"] = model_hash(args.init_from)
    settings = RunSettings(workdir=args.workdir, seed=args.seed, save_every=args.save_every,
                           log_every=args.log_every)
    spec = stage_spec(args)
    result = train_controlnet(acc, settings, spec, model, loaded.unet, loaded.text_encoder, controlnet, latents,
                              loaded.tokenizer, stream=TRAIN_STREAM, hint_kind=args.hint,
                              p_empty=args.caption_dropout, timesteps=args.timesteps, inputs=inputs)
    card: dict[str, Any] = {}
    if acc.is_main_process:
        state = cpu_copy(result.state)
        size = export(args, config, state)
        card = {"controlnet": str(args.out), "bytes": size, "base": str(args.model), "base_hash": base,
                "init_from": str(args.init_from) if args.init_from else None, "init": inputs.get("init"),
                "hint": args.hint, "seed": args.seed, "scenes": args.scenes, "caption_dropout": args.caption_dropout,
                "timesteps": args.timesteps,
                "config": config.to_dict(), "processes": acc.num_processes, "device": str(acc.device),
                "cpu": cpu_model(), "threads": torch.get_num_threads(),
                **stage_card(spec, result, param_count(state)),
                "wall_seconds_this_run": round(time.perf_counter() - t0, 1)}
        args.card.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.card, (json.dumps(card, indent=2) + "\n").encode())
        acc.print(f"wrote {args.out} ({size / 2**20:.1f} MiB), {args.card}")
    acc.wait_for_everyone()
    acc.end_training()
    return card


if __name__ == "__main__":
    main()
