"""Train the shipped toy model (weights/ldm-toy.safetensors) from scratch on the toy world.

    python scripts/train_toy.py --bf16 vae       # the full recipe, ~65 min on a 2-core AMX CPU
    python scripts/train_toy.py --vae-from weights/ldm-toy.safetensors
                                                 # the shipped VAE, new CLIP and U-Net
    python scripts/train_toy.py --unet-from weights/ldm-toy.safetensors --unet-kinds 1,1,1,1,1 \
        --unet-steps 2400 --unet-lr 2e-4 --workdir runs/ft --out runs/ft/ldm-toy.safetensors \
        --clip-out runs/ft/toy-clip-vision.safetensors
                                                 # train the shipped U-Net further, on evenly mixed kinds
    python scripts/train_toy.py --unet-from runs/dec/base/ldm-toy.safetensors --unet-steps 0 \
        --decoder-steps 600 --workdir runs/dec/w --out runs/dec/ldm-toy.safetensors \
        --clip-out runs/dec/toy-clip-vision.safetensors
                                                 # fine-tune a release's VAE decoder only (this release's)
    python scripts/train_toy.py --unet-from weights/ldm-toy.safetensors --unet-steps 0 \
        --inpaint-steps 2000 --workdir runs/inpaint --out runs/inpaint/ldm-toy.safetensors \
        --clip-out runs/inpaint/toy-clip-vision.safetensors \
        --inpaint-out runs/inpaint/ldm-toy-inpaint.safetensors
                                                 # a toy inpainting model from the shipped one (~70 min on 2 cores)
    python scripts/train_toy.py --smoke          # every stage, 2 steps, tiny sizes (~5 s)
    accelerate launch scripts/train_toy.py --bf16 all          # one or several GPUs
    ACCELERATE_USE_CPU=1 torchrun --nproc-per-node 2 scripts/train_toy.py --workdir W ...
                                                 # several CPU processes (gloo)

Stages, as Stable Diffusion was built (each checkpointed into --workdir; a rerun of
the same command resumes where it stopped and skips finished stages):

1. ``clip``: a small CLIP (``ldm.toy.clip.ToyCLIP``: transformers' CLIP text tower,
   CLIP's ResNet image tower) trained contrastively on (image, caption) pairs of the
   toy world, each batch holding pairs that differ in kind only. Its text tower becomes
   the frozen text encoder; its image tower is kept as a toy CLIP scorer (``--clip-out``).
2. ``vae``: an AutoencoderKL (8x down-sampling, 4 latent channels), MSE + small KL.
3. ``latents``: a fixed set of pictures encoded once; the VAE scaling factor is
   1/std of those latents, as SD measured it.
4. ``unet``: the cross-attention U-Net, eps prediction on scaled latents with SD's
   1000 scaled-linear betas, conditioned on the frozen text encoder's last hidden
   state, 10% empty captions (classifier-free guidance), EMA of the weights.
5. ``decoder`` (only with ``--decoder-steps``): SD's decoder fine-tune (as its ft-EMA
   VAE): the encoder frozen, so latents and U-Net stay valid, the decoder trained on L1.
6. ``inpaint`` (only with ``--inpaint-steps``): an inpainting U-Net made as SD's
   sd-v1-5-inpainting was made from SD 1.5: the U-Net above with 5 zero-initialised
   input channels in ``conv_in`` (the mask at latent size and the latents of the picture
   with the masked pixels set to grey), fine-tuned on random masks (boxes, strokes,
   borders for outpainting, 25% everything: ``ldm.training.masks``), eps loss, 10% empty
   captions, EMA. Exported beside the main file as a ``toy-inpaint`` model (``--inpaint-out``).
7. export: one original-layout safetensors file (fp16, config in the metadata), which
   is then loaded back through ``ldm.checkpoints.load_model`` as a check, and a JSON of
   model-card numbers (``--card``).

Every sample is drawn from the world by its global index (seeded from --seed, the
stage and the index) and every step's noise from a generator seeded by the step, so
a resumed run is bit-for-bit the run that was never interrupted.

This file is the recipe (sizes, stage wiring, command line); the datasets, tasks,
resumable stage loop, EMA and export it uses are ``ldm.training``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing
    sys.path.insert(0, str(ROOT))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DataLoaderConfiguration  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from ldm.atomicio import atomic_write_bytes  # noqa: E402
from ldm.checkpoints import LoadedModel, load_model  # noqa: E402
from ldm.config import (  # noqa: E402
    ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig, inpainting_variant, preset, with_changes,
)
from ldm.models.text import TextEncoder  # noqa: E402
from ldm.models.tokenizer import EOS_ID, Tokenizer  # noqa: E402
from ldm.models.unet import UNet  # noqa: E402
from ldm.models.vae import AutoencoderKL, DiagonalGaussian  # noqa: E402
from ldm.toy.clip import ToyCLIP  # noqa: E402
from ldm.toy.world import (  # noqa: E402
    KIND_WEIGHTS, KINDS, Scene, caption, kind_odds, make_batch, prompt_to_attributes, render, sample_scene,
)
from ldm.training import (  # noqa: E402
    DECODER_FROZEN,
    SCHEDULES,
    ClipTask,
    DatasetFactory,
    DecoderTask,
    InpaintPairs,
    InpaintTask,
    LatentPairs,
    LatentSet,
    NoiseSchedule,
    RunSettings,
    StageResult,
    StageSpec,
    UNetTask,
    VAETask,
    WorldPairs,
    autocast,
    check_export,
    chw,
    cpu_copy,
    derive_seed,
    export_checkpoint,
    export_clip_scorer,
    generator_for,
    given_weights,
    inpainting_unet,
    load_checkpoint,
    mask_settings,
    param_count,
    plain,
    save_checkpoint,
    seed_everything,
    stage_card,
    text_encoder_from_clip,
    to_pixels,
    toy_clip,
    train_stage,
    trim_after_first_eos,
    vae_from_state,
)

logger = logging.getLogger("train_toy")

# Stage ids keep the random streams of the stages apart (see derive_seed).
STAGE_IDS = {"clip": 1, "vae": 2, "latents": 3, "unet": 4, "eval": 5, "decoder": 6, "inpaint": 7}
STAGES = ("clip", "vae", "unet", "decoder", "inpaint")
CLIP_SCORER = "toy-clip-vision.safetensors"  # beside the checkpoint it pairs with
INPAINT_MODEL = "ldm-toy-inpaint.safetensors"


# --- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full recipe and the smoke run."""

    model: ModelConfig
    vision: dict[str, Any]  # open_clip ModifiedResNet arguments of the CLIP image tower
    projection_dim: int
    specs: dict[str, StageSpec]
    latent_images: int  # pictures encoded once for the U-Net stage
    save_every: int
    log_every: int
    eval_pictures: int  # per split, for the model card


# Seconds per step on the two kinds of 2-core CPU machine seen (quiet, steady state):
#   Intel with AMX, `--bf16 vae`: clip (ViT tower) 0.39, vae 0.43 (bf16), unet 0.66-0.73;
#   AMD EPYC without bf16 units:  clip 0.55-0.65, vae 2.1 (float32), unet 1.42.
# On the AMD machine the VAE stage alone would take 105 min, so the shipped run reuses
# an earlier run's VAE (`--vae-from`): 12 + 4 (latents) + 71 = ~87 minutes for
# CLIP, latents and U-Net. On the Intel one the whole recipe, VAE included, is ~65 min.
# Every stage decays its rate on a cosine to zero: with a constant rate the last
# weights of a few-thousand-step run are noisy, and an EMA of decay 0.999 still lags
# (the VAE's came out 3 dB worse than its last weights). The U-Net keeps SD's EMA.
FULL = Sizes(
    model=preset("toy"),
    vision=dict(image_size=64, layers=[1, 1, 1, 1], width=16, heads=8),
    projection_dim=128,
    specs={
        "clip": StageSpec("clip", steps=1200, batch_size=128, lr=5e-4, warmup=100, weight_decay=0.1,
                          ema_decay=0.999, betas=(0.9, 0.98), schedule="cosine", use_ema=False),
        "vae": StageSpec("vae", steps=3000, batch_size=32, lr=1e-3, warmup=100, weight_decay=0.0,
                         ema_decay=0.999, schedule="cosine", use_ema=False),
        "unet": StageSpec("unet", steps=3000, batch_size=128, lr=5e-4, warmup=200, weight_decay=0.01,
                          ema_decay=0.999, schedule="cosine", use_ema=True),
        # Off unless asked for (--decoder-steps): 600 steps add ~16 min on the AMD CPU,
        # past the 90-minute budget of the CPU recipe. The shipped release ran it.
        "decoder": StageSpec("decoder", steps=0, batch_size=32, lr=2e-4, warmup=50, weight_decay=0.0,
                             ema_decay=0.999, schedule="cosine", use_ema=False),
        # Off unless asked for (--inpaint-steps). A fine-tune of a trained U-Net: a lower rate
        # than from scratch, and a smaller batch, since every sample's masked picture is
        # encoded by the VAE during the step (the CPU's largest cost here).
        "inpaint": StageSpec("inpaint", steps=0, batch_size=64, lr=1e-4, warmup=100, weight_decay=0.01,
                             ema_decay=0.999, schedule="cosine", use_ema=True),
    },
    latent_images=32768,
    save_every=250,
    log_every=25,
    eval_pictures=256,
)

SMOKE = Sizes(
    model=ModelConfig(
        family="toy",
        unet=UNetConfig(sample_size=4, block_out_channels=(16, 32),
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        layers_per_block=1, num_attention_heads=(1, 2), cross_attention_dim=32,
                        norm_num_groups=8),
        vae=VAEConfig(sample_size=32, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                      norm_num_groups=8, scaling_factor=1.0),
        text=TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2),
    ),
    vision=dict(image_size=32, layers=[1, 1, 1, 1], width=4, heads=2),
    projection_dim=32,
    specs={name: StageSpec(name, steps=0 if name == "decoder" else 2, batch_size=4, lr=1e-3, warmup=1,
                           weight_decay=0.0, ema_decay=0.9)
           for name in STAGES},  # the decoder stage is off unless asked for, as in FULL
    latent_images=8,
    save_every=1,
    log_every=1,
    eval_pictures=8,
)


def _stage_list(text: str) -> tuple[str, ...]:
    names = STAGES if text == "all" else tuple(n for n in text.split(",") if n)
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown stages {unknown}; valid: {', '.join(STAGES)} or 'all'")
    return names


def _kind_weights(text: str) -> tuple[float, ...]:
    try:
        weights = tuple(float(w) for w in text.split(","))
        kind_odds(weights)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return weights


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None,
                   help="checkpoints and caches (default runs/toy; --smoke: a new temp folder)")
    p.add_argument("--out", type=Path, default=None,
                   help="exported checkpoint (default weights/ldm-toy.safetensors; --smoke: in the workdir)")
    p.add_argument("--clip-out", type=Path, default=None,
                   help="toy CLIP scorer (default weights/toy-clip-vision.safetensors; --smoke: in the workdir)")
    p.add_argument("--inpaint-out", type=Path, default=None,
                   help=f"the inpainting model of --inpaint-steps (default weights/{INPAINT_MODEL}; --smoke: "
                        "in the workdir)")
    p.add_argument("--card", type=Path, default=None,
                   help="model-card numbers as JSON (default <workdir>/model_card.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="every stage for 2 steps at tiny sizes")
    p.add_argument("--bf16", type=_stage_list, default=(), metavar="STAGES",
                   help="bf16 autocast for these stages: comma-separated among "
                        f"{','.join(STAGES)}, or 'all'. On the 2-core AMX CPU it makes the VAE "
                        "2.2x faster but the small-map U-Net 10%% slower, hence '--bf16 vae'; "
                        "on recent GPUs use 'all'")
    for name in STAGES:
        p.add_argument(f"--{name}-steps", type=int, default=None, help=f"{name} stage steps")
        p.add_argument(f"--{name}-batch", type=int, default=None, help=f"{name} stage global batch size")
        p.add_argument(f"--{name}-lr", type=float, default=None, help=f"{name} stage learning rate")
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=None,
                   help="learning-rate schedule of every stage (default: the recipe's, cosine)")
    p.add_argument("--vae-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="take the VAE of this ldm/SD checkpoint instead of training one (as SD 2 kept "
                        "SD 1's): the shipped model's VAE is reused this way, since its stage costs "
                        "more than the rest together on a CPU without bf16 units")
    p.add_argument("--unet-from", type=Path, default=None, metavar="CHECKPOINT",
                   help="train the U-Net of this toy checkpoint further instead of from scratch; its text "
                        "encoder, VAE and scaling factor are kept (the U-Net was trained on them), and so is "
                        "the CLIP scorer beside it (toy-clip-vision.safetensors): no CLIP or VAE stage runs")
    p.add_argument("--unet-kinds", type=_kind_weights, default=None, metavar="W,W,W,W,W",
                   help=f"odds of {', '.join(KINDS)} in the U-Net's pictures (default the world's, "
                        f"{','.join(f'{w:g}' for w in KIND_WEIGHTS)}); e.g. 1,1,1,1,1 for as many "
                        "of each (weights/README.md has what that did)")
    p.add_argument("--latent-images", type=int, default=None, help="pictures encoded for the U-Net stage")
    p.add_argument("--p-empty", type=float, default=0.1, help="fraction of empty captions (guidance)")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="VAE KL weight (SD's, sum-reduced)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--log-every", type=int, default=None, help="log a line every N steps")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace) -> Sizes:
    """The sizes to use: the full or smoke table, with the command line's overrides."""
    base = SMOKE if args.smoke else FULL
    specs = {}
    for name, spec in base.specs.items():
        changes = {k: v for k, v in (("steps", getattr(args, f"{name}_steps")),
                                     ("batch_size", getattr(args, f"{name}_batch")),
                                     ("lr", getattr(args, f"{name}_lr")),
                                     ("schedule", args.lr_schedule)) if v is not None}
        specs[name] = with_changes(spec, **changes)
    sizes = with_changes(base, specs=specs)
    for key in ("latent_images", "save_every", "log_every"):
        if getattr(args, key) is not None:
            sizes = with_changes(sizes, **{key: getattr(args, key)})
    if args.workdir is None:
        args.workdir = Path(tempfile.mkdtemp(prefix="train_toy_")) if args.smoke else ROOT / "runs" / "toy"
    weights = args.workdir if args.smoke else ROOT / "weights"
    args.out = args.out or weights / "ldm-toy.safetensors"
    args.clip_out = args.clip_out or weights / CLIP_SCORER
    args.inpaint_out = args.inpaint_out or weights / INPAINT_MODEL
    args.card = args.card or args.workdir / "model_card.json"
    return sizes


# --- the stages ---------------------------------------------------------------------------


def clip_model(sizes: Sizes) -> ToyCLIP:
    """The recipe's toy CLIP, its text tower exactly the model's text encoder."""
    return toy_clip(sizes.model.text, sizes.vision, sizes.projection_dim)


def run_stage(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, name: str, task: nn.Module,
              trained: nn.Module, make_dataset: DatasetFactory, fingerprint: dict[str, Any],
              inputs: dict[str, Any]) -> StageResult:
    """``train_stage`` with this run's settings and the stage's own random stream."""
    run = RunSettings(workdir=args.workdir, seed=args.seed, save_every=sizes.save_every,
                      log_every=sizes.log_every, workers=args.workers, bf16=tuple(args.bf16))
    return train_stage(acc, run, sizes.specs[name], task, trained, make_dataset, stream=STAGE_IDS[name],
                       fingerprint=fingerprint, inputs=inputs)


def stage_init(args: argparse.Namespace, name: str) -> None:
    """Seed model initialisation per stage, so it does not depend on skipped stages."""
    seed_everything(derive_seed(args.seed, STAGE_IDS[name]))


def train_clip(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, tokenizer: Tokenizer) -> StageResult:
    stage_init(args, "clip")
    clip = clip_model(sizes)
    spec = sizes.specs["clip"]
    fingerprint = plain({"text": plain(sizes.model.text), "vision": sizes.vision, "proj": sizes.projection_dim,
                         "kind_twins": True})
    size = sizes.vision["image_size"]
    if spec.batch_size % (2 * acc.num_processes):
        raise SystemExit(f"--clip-batch {spec.batch_size} must be even on every one of {acc.num_processes} "
                         "process(es): each batch holds pairs of kind twins")
    return run_stage(acc, args, sizes, "clip", ClipTask(clip), clip,
                     lambda first, count: WorldPairs(args.seed, STAGE_IDS["clip"], first, count, size, tokenizer,
                                                     twins=True),
                     fingerprint, {})


def train_vae(acc: Accelerator, args: argparse.Namespace, sizes: Sizes) -> StageResult:
    stage_init(args, "vae")
    config = sizes.model.vae
    vae = AutoencoderKL(config)
    fingerprint = {"vae": plain(with_changes(config, scaling_factor=1.0)), "kl_weight": args.kl_weight}
    return run_stage(acc, args, sizes, "vae", VAETask(vae, args.kl_weight), vae,
                     lambda first, count: WorldPairs(args.seed, STAGE_IDS["vae"], first, count,
                                                     config.sample_size, None),
                     fingerprint, {})


def train_decoder(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, vae: StageResult) -> StageResult:
    """The decoder fine-tune (``DecoderTask``) of ``vae``: its encoder comes out unchanged."""
    stage_init(args, "decoder")
    config = sizes.model.vae
    model = vae_from_state(config, vae.state)
    fingerprint = {"vae": plain(with_changes(config, scaling_factor=1.0)), "loss": "l1", "frozen": "encoder"}
    return run_stage(acc, args, sizes, "decoder", DecoderTask(model), model,
                     lambda first, count: WorldPairs(args.seed, STAGE_IDS["decoder"], first, count,
                                                     config.sample_size, None),
                     fingerprint, {"vae": vae.identity()})


def checked_model(flag: str, path: Path, sizes: Sizes, parts: tuple[str, ...]) -> LoadedModel:
    """``path`` loaded as a checkpoint whose ``parts`` have the recipe's configs."""
    loaded = load_model(path)
    for part in parts:
        want, have = (getattr(c, part) for c in (sizes.model, loaded.config))
        if part == "vae":  # measured from the data, not part of the architecture
            want, have = (with_changes(c, scaling_factor=1.0) for c in (want, have))
        if have != want:
            raise SystemExit(f"{flag} {path}: its {part} is not the recipe's:\n  {have}\n  expected {want}")
    return loaded


def vae_from_checkpoint(path: Path, sizes: Sizes) -> StageResult:
    """The VAE of an existing checkpoint, checked against the recipe's VAE config."""
    return given_weights(checked_model("--vae-from", path, sizes, ("vae",)).vae.state_dict(), path)


@dataclass
class Release:
    """A released toy model to train further (``--unet-from``): the results of its
    CLIP and VAE stages, its U-Net's weights and the scaling factor they were trained at."""

    clip: StageResult
    vae: StageResult
    unet: StageResult
    scaling_factor: float


def release_from_checkpoint(path: Path, sizes: Sizes) -> Release:
    """The toy checkpoint at ``path`` and the CLIP scorer beside it, checked against the
    recipe. CLIP's state is put back together from the checkpoint's text tower and the
    scorer's image tower and projections (how ``export_clip_scorer`` split it)."""
    loaded = checked_model("--unet-from", path, sizes, ("unet", "vae", "text"))
    scorer_path = path.with_name(CLIP_SCORER)
    if not scorer_path.is_file():
        raise SystemExit(f"--unet-from {path}: no CLIP scorer beside it ({scorer_path}); "
                         "the checkpoint's text encoder is only kept with the image tower it was trained with")
    clip_state = {**load_file(str(scorer_path)), **loaded.text_encoder.state_dict()}
    try:
        clip_model(sizes).load_state_dict(clip_state, strict=True)
    except RuntimeError as exc:
        raise SystemExit(f"--unet-from {path}: {scorer_path} does not fit the recipe's CLIP: {exc}") from None
    return Release(clip=given_weights(clip_state, scorer_path), vae=given_weights(loaded.vae.state_dict(), path),
                   unet=given_weights(loaded.unet.state_dict(), path),
                   scaling_factor=loaded.config.vae.scaling_factor)


def scaled_config(sizes: Sizes, scaling_factor: float) -> ModelConfig:
    """The recipe's model config with the VAE scaling factor its U-Net was trained at."""
    return with_changes(sizes.model, vae=with_changes(sizes.model.vae, scaling_factor=scaling_factor))


def kinds_input(args: argparse.Namespace) -> dict[str, Any]:
    """``--unet-kinds`` for the records that later runs compare (absent when not given,
    so caches and checkpoints of runs made before the option still match)."""
    return {} if args.unet_kinds is None else {"kinds": plain(args.unet_kinds)}


def latent_scenes(seed: int, n: int, kind_weights: tuple[float, ...] | None = None) -> list[Scene]:
    return [sample_scene(np.random.default_rng(derive_seed(seed, STAGE_IDS["latents"], i)), kind_weights=kind_weights)
            for i in range(n)]


@torch.no_grad()
def encode_latents(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, vae_state: dict[str, Tensor],
                   vae_id: Any) -> LatentSet:
    """Encode ``sizes.latent_images`` pictures once (cached in the workdir) and measure
    the scaling factor: 1 / std of posterior samples over all of them, as SD did."""
    path = args.workdir / "latents.pt"
    inputs = {"vae": vae_id, "n": sizes.latent_images, "seed": args.seed, **kinds_input(args)}
    scenes = latent_scenes(args.seed, sizes.latent_images, args.unet_kinds)
    cached = load_checkpoint(path)
    if cached is not None and cached["inputs"] == inputs:
        return LatentSet(cached["moments"], scenes, cached["scaling_factor"], cached["stats"])
    t0 = time.perf_counter()
    if acc.is_main_process:
        vae = vae_from_state(sizes.model.vae, vae_state).to(acc.device).eval()
        size, chunks = sizes.model.vae.sample_size, []
        for lo in range(0, len(scenes), 256):
            images = torch.stack([chw(render(s, size)) for s in scenes[lo : lo + 256]])
            with autocast(acc, "vae" in args.bf16):
                posterior = vae.encode(to_pixels(images.to(acc.device)))
            chunks.append(torch.cat([posterior.mean, posterior.logvar], 1).float().cpu())
        moments = torch.cat(chunks)
        sample = DiagonalGaussian(moments).sample(generator_for(args.seed, STAGE_IDS["latents"]))
        scaling = float(1.0 / sample.std())
        stats = {"scaling_factor": scaling, "latent_std": float(sample.std()),
                 "channel_mean": sample.mean((0, 2, 3)).tolist(), "channel_std": sample.std((0, 2, 3)).tolist(),
                 "seconds": time.perf_counter() - t0}
        save_checkpoint({"inputs": inputs, "moments": moments, "scaling_factor": scaling, "stats": stats}, path)
        acc.print(f"[latents] encoded {len(scenes)} pictures in {stats['seconds']:.0f} s; "
                  f"latent std {stats['latent_std']:.4f} -> scaling factor {scaling:.5f}")
    acc.wait_for_everyone()
    cached = load_checkpoint(path)
    return LatentSet(cached["moments"], scenes, cached["scaling_factor"], cached["stats"])


def train_unet(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, config: ModelConfig,
               text_encoder: TextEncoder, latents: LatentSet, upstream: dict[str, Any],
               tokenizer: Tokenizer, init: StageResult | None = None) -> StageResult:
    """The U-Net stage, from scratch or (``init``) from given weights: their EMA starts there too."""
    stage_init(args, "unet")
    unet = UNet(config.unet)
    if init is not None:
        unet.load_state_dict(init.state, strict=True)
    task = UNetTask(unet, text_encoder, NoiseSchedule(config))
    return run_stage(acc, args, sizes, "unet", task, unet,
                     lambda first, count: LatentPairs(latents, args.seed, STAGE_IDS["unet"], first, count,
                                                      args.p_empty, tokenizer),
                     diffusion_fingerprint(args, config), upstream)


def diffusion_fingerprint(args: argparse.Namespace, config: ModelConfig) -> dict[str, Any]:
    """What a U-Net stage's checkpoint must share to be continued."""
    return {"unet": plain(config.unet), "p_empty": args.p_empty,
            "schedule": [config.num_train_timesteps, config.beta_start, config.beta_end,
                         config.beta_schedule, config.prediction_type]}


def train_inpaint(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, config: ModelConfig,
                  text_encoder: TextEncoder, vae_state: dict[str, Tensor], latents: LatentSet, unet: StageResult,
                  upstream: dict[str, Any], tokenizer: Tokenizer) -> StageResult:
    """The inpainting fine-tune (``InpaintTask``) of the text-to-image U-Net ``unet``
    (trained at ``config``'s scaling factor); its EMA starts at that U-Net too."""
    stage_init(args, "inpaint")
    model = inpainting_unet(config, unet.state)
    vae = vae_from_state(config.vae, vae_state)
    task = InpaintTask(model, text_encoder, NoiseSchedule(config), vae, config.vae.scaling_factor)
    fingerprint = {**diffusion_fingerprint(args, inpainting_variant(config)), "masks": plain(mask_settings())}
    size = config.vae.sample_size
    return run_stage(acc, args, sizes, "inpaint", task, model,
                     lambda first, count: InpaintPairs(latents, args.seed, STAGE_IDS["inpaint"], first, count,
                                                       args.p_empty, tokenizer, size),
                     fingerprint, {**upstream, "unet": unet.identity()})


def export_inpainting(args: argparse.Namespace, sizes: Sizes, config: ModelConfig, states: dict[str, Any],
                      unet: StageResult, inpaint: StageResult) -> dict[str, Any]:
    """Write the inpainting model (``states`` with the inpainting U-Net) and check it loads
    back as a toy-inpaint model; its model-card entry."""
    inpaint_config = inpainting_variant(config)
    inpaint_states = {**states, "unet": inpaint.state}
    size = export_checkpoint(inpaint_config, inpaint_states, args.inpaint_out)
    check_export(args.inpaint_out, inpaint_config, inpaint_states)
    given = unet if "from" in unet.record else None  # the U-Net it started from, if not trained here
    return {**stage_card(sizes.specs["inpaint"], inpaint, param_count(inpaint.state), given),
            "checkpoint": str(args.inpaint_out), "checkpoint_bytes": size}


# --- evaluation numbers for the card ----------------------------------------------------------


@torch.no_grad()
def evaluate(acc: Accelerator, args: argparse.Namespace, sizes: Sizes, clip_state: dict[str, Tensor],
             vae_state: dict[str, Tensor], tokenizer: Tokenizer) -> dict[str, float]:
    """Numbers for the card, on ``n`` pictures of each split with captions stating every
    attribute (held-out: unseen combinations and phrasings): the VAE's reconstruction
    PSNR, and how often CLIP's best-matching picture for a caption has exactly the
    caption's attributes (several pictures may share them, so this is not top-1 of one)."""
    vae = vae_from_state(sizes.model.vae, vae_state).to(acc.device).eval()
    clip = clip_model(sizes)
    clip.load_state_dict(clip_state)
    clip = clip.to(acc.device).eval()
    out: dict[str, float] = {}
    n = sizes.eval_pictures
    for split in ("train", "heldout"):
        seed = derive_seed(args.seed, STAGE_IDS["eval"], split == "heldout")
        batch = make_batch(seed, n, sizes.model.vae.sample_size, split=split)
        rng = np.random.default_rng(seed)
        texts = [caption(s, rng, split, full=True) for s in batch.scenes]
        pixels = to_pixels(torch.stack([chw(im) for im in batch.images])).to(acc.device)
        mse = ((vae(pixels).float().clamp(-1, 1) - pixels) ** 2).mean((1, 2, 3)).clamp(min=1e-10)
        # [-1, 1] images: peak-to-peak 2, PSNR = 10 log10(4 / mse), averaged over pictures.
        out[f"vae_psnr_db_{split}"] = float((10 * torch.log10(4.0 / mse)).mean())
        clip_pixels = torch.nn.functional.interpolate(pixels, size=sizes.vision["image_size"], mode="area")
        logits = clip.similarity(trim_after_first_eos(tokenizer(texts), EOS_ID).to(acc.device), clip_pixels)
        attrs = [prompt_to_attributes(t) for t in texts]
        best = logits.argmax(1).tolist()
        out[f"clip_text_to_image_{split}"] = sum(attrs[i] == attrs[j] for i, j in enumerate(best)) / n
    return out


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # Precision is chosen per stage (see --bf16), so accelerate's global switch stays off.
    acc = Accelerator(mixed_precision="no",
                      dataloader_config=DataLoaderConfiguration(split_batches=True))
    if args.workdir is None and args.smoke and acc.num_processes > 1:
        raise SystemExit("--smoke with several processes needs --workdir (one folder for all of them)")
    sizes = resolve(args)
    args.workdir.mkdir(parents=True, exist_ok=True)
    acc.print(f"workdir {args.workdir}, {acc.num_processes} process(es) on {acc.device}, "
              f"bf16 autocast for: {', '.join(args.bf16) or 'none'}")
    t0 = time.perf_counter()
    text_config = sizes.model.text
    tokenizer = Tokenizer(text_config.pad_token, text_config.max_position_embeddings)

    if args.unet_from is None and sizes.specs["unet"].steps == 0:
        raise SystemExit("--unet-steps 0 keeps a given U-Net as it is: it needs --unet-from")
    if args.unet_from is not None and args.vae_from is not None:
        raise SystemExit("--unet-from keeps that checkpoint's VAE (its U-Net was trained on it): "
                         "leave out --vae-from")
    # Given weights are checked before anything trains.
    release = None if args.unet_from is None else release_from_checkpoint(args.unet_from, sizes)
    given_vae = None if args.vae_from is None else vae_from_checkpoint(args.vae_from, sizes)
    if release:
        clip, vae = release.clip, release.vae
    else:
        clip = train_clip(acc, args, sizes, tokenizer)
        vae = given_vae or train_vae(acc, args, sizes)
    text_encoder = text_encoder_from_clip(text_config, clip.state)
    init = release.unet if release else None
    inpainting = sizes.specs["inpaint"].steps > 0
    latents, latent_stats = None, {}
    if init is None or sizes.specs["unet"].steps or inpainting:  # not when only the decoder is fine-tuned
        latents = encode_latents(acc, args, sizes, vae.state, vae.identity())
        if release:  # its U-Net learned at its own scale; the new pictures' std is only recorded
            latents = dataclasses.replace(latents, scaling_factor=release.scaling_factor)
        latent_stats = latents.stats
    config = scaled_config(sizes, release.scaling_factor if release else latents.scaling_factor)
    upstream = {"clip_step": clip.step, "vae": vae.identity(), "latents": sizes.latent_images,
                "scaling_factor": config.vae.scaling_factor, **kinds_input(args)}
    if init is not None:
        upstream.update(clip=clip.identity(), unet_from=init.identity())
    if init is not None and sizes.specs["unet"].steps == 0:  # the given U-Net as it is
        unet = init
    else:
        unet = train_unet(acc, args, sizes, config, text_encoder, latents, upstream, tokenizer, init)
    # After the U-Net, which never sees the decoder; the encoder the latents came from is frozen.
    decoder = train_decoder(acc, args, sizes, vae) if sizes.specs["decoder"].steps else None
    final_vae = decoder.state if decoder else vae.state
    inpaint = (train_inpaint(acc, args, sizes, config, text_encoder, final_vae, latents, unet, upstream, tokenizer)
               if inpainting else None)

    card: dict[str, Any] = {}
    if acc.is_main_process:
        states = {"unet": unet.state, "vae": final_vae, "text_encoder": cpu_copy(text_encoder.state_dict())}
        size = export_checkpoint(config, states, args.out)
        check_export(args.out, config, states)
        clip_size = export_clip_scorer(clip.state, sizes.vision, sizes.projection_dim, args.clip_out)
        params = {"clip": param_count(clip.state), "vae": param_count(vae.state), "unet": param_count(unet.state)}
        card = {
            "checkpoint": str(args.out), "checkpoint_bytes": size, "clip_scorer": str(args.clip_out),
            "clip_scorer_bytes": clip_size, "seed": args.seed, "bf16_stages": list(args.bf16),
            "unet_kinds": dict(zip(KINDS, (args.unet_kinds or KIND_WEIGHTS.tolist()))),
            "processes": acc.num_processes, "device": str(acc.device),
            "text_encoder_parameters": param_count(states["text_encoder"]),
            "stages": {"clip": stage_card(sizes.specs["clip"], clip, params["clip"]),
                       "vae": stage_card(sizes.specs["vae"], vae, params["vae"]),
                       "unet": stage_card(sizes.specs["unet"], unet, params["unet"], init)},
            "latents": latent_stats, "eval": evaluate(acc, args, sizes, clip.state, final_vae, tokenizer),
            "config": config.to_dict(), "wall_seconds_this_run": round(time.perf_counter() - t0, 1),
        }
        if decoder:
            frozen = tuple(f"{name}." for name in DECODER_FROZEN)
            trained = {k: v for k, v in decoder.state.items() if not k.startswith(frozen)}
            card["stages"]["decoder"] = stage_card(sizes.specs["decoder"], decoder, param_count(trained))
        if inpaint:
            card["stages"]["inpaint"] = export_inpainting(args, sizes, config, states, unet, inpaint)
        args.card.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.card, (json.dumps(card, indent=2) + "\n").encode())
        extra = f", {args.inpaint_out}" if inpaint else ""
        acc.print(f"wrote {args.out} ({size / 2**20:.1f} MiB), {args.clip_out} ({clip_size / 2**20:.1f} MiB){extra}, "
                  f"{args.card}")
    acc.wait_for_everyone()
    acc.end_training()
    return card


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
