"""`ldm train-lora`: train a LoRA on a folder of captioned pictures (kohya-ss's convention)
and write it as a kohya-format safetensors file."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..dtypes import DTYPE_NAMES
from ..validation import check_side
from .common import _option_type, check_output_dir, dtype_name, positive_int, seed_int

# ldm.training.stage.SCHEDULES, named here so that parsing the command line does not import torch.
LR_SCHEDULERS = ("constant", "cosine")
REG_TARGETS = ("pictures", "base")  # ldm.training.lora_train.REG_TARGETS


def _positive(value: float) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a finite number > 0")
    return value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _fraction(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError("must be in [0, 1)")
    return value


positive_float = _option_type(float, _positive, "a number > 0")
fraction_float = _option_type(float, _fraction, "a number in [0, 1) such as 0.05")
resolution_int = _option_type(int, lambda v: check_side(v, "value"), "a multiple of 8 such as 512")
steps_int = _option_type(int, _non_negative, "a whole number >= 0")


def layer_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected layer-name endings such as attn2.to_k,attn2.to_v, got {text!r}")
    return names


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-lora", help="train a LoRA on a folder of captioned pictures (kohya-format .safetensors)",
        description="Train a LoRA of --base on the pictures in IMAGES_DIR, each with its caption in a "
        ".txt file of the same name (kohya-ss's convention), and write it to --out in kohya's format "
        "(lora_unet_* / lora_te_* with ss_* metadata), which ldm, AUTOMATIC1111, ComfyUI and diffusers "
        "load. Rerun the same command to continue an interrupted run (or to train to more --steps); "
        "its state is in --workdir. Several GPUs: `accelerate launch -m ldm train-lora ...`; several CPU "
        "processes: `ACCELERATE_USE_CPU=1 torchrun --nproc-per-node N -m ldm train-lora ...` (a run repeats "
        "bit for bit with the same number of processes).",
    )
    p.add_argument("images", type=Path, metavar="IMAGES_DIR", help="folder of NAME.png + NAME.txt pairs")
    p.add_argument("--out", type=Path, required=True, metavar="LORA.safetensors",
                   help="the LoRA file to write (an existing file is replaced only if train-lora wrote it)")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="checkpoint or diffusers folder to train on (default: the shipped model, $LDM_WEIGHTS)")
    p.add_argument("--rank", type=positive_int, default=8, help="LoRA rank, kohya's network_dim (default 8)")
    p.add_argument("--alpha", type=positive_float, default=None,
                   help="LoRA alpha: the branch is scaled by alpha/rank (default: the rank, scale 1; kohya's "
                   "own default is 1, which needs a rank-times larger --lr)")
    p.add_argument("--conv-rank", type=positive_int, default=None,
                   help="also train the ResNet blocks' 3x3 convs at this rank (kohya's conv_dim; default: off)")
    p.add_argument("--conv-alpha", type=positive_float, default=None, help="alpha of those (default: --conv-rank)")
    p.add_argument("--layers", type=layer_list, default=(), metavar="NAME,NAME",
                   help="train only the U-Net layers whose names end so, e.g. attn2.to_k,attn2.to_v (the "
                   "cross-attention keys and values); default: every layer kohya trains")
    p.add_argument("--train-text-encoder", action="store_true",
                   help="also train a LoRA on the text encoder's attention and MLP layers (default: U-Net only)")
    p.add_argument("--te-alpha", type=positive_float, default=None,
                   help="alpha of the text encoder's layers (default: --alpha); lower is a smaller effective "
                   "learning rate for the text encoder, as kohya's --text_encoder_lr")
    p.add_argument("--steps", type=positive_int, default=1000, help="optimizer steps in all (default 1000)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="pictures per step (default 1)")
    p.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--lr-scheduler", choices=LR_SCHEDULERS, default="constant",
                   help="after the warm-up: constant, or a half cosine to 0 at --steps (default constant)")
    p.add_argument("--warmup", type=steps_int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--resolution", type=resolution_int, default=None, metavar="PX",
                   help="square training size; pictures are scaled and centre-cropped to it (default: the "
                   "model's native size)")
    p.add_argument("--caption-dropout", type=fraction_float, default=0.0, metavar="P",
                   help="train this fraction of steps on the empty caption (default 0)")
    p.add_argument("--caption-extension", default=".txt", metavar=".EXT",
                   help="caption file suffix (default .txt)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the LoRA's init, data order and noise "
                   "(default 0)")
    p.add_argument("--save-every", type=positive_int, default=100, metavar="N",
                   help="checkpoint the run every N steps (default 100)")
    p.add_argument("--log-every", type=positive_int, default=None, metavar="N",
                   help="progress line every N steps (default: about 20 lines)")
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="the run's resumable state (default: OUT without .safetensors, plus .train-lora/)")
    p.add_argument("--save-dtype", type=dtype_name, choices=DTYPE_NAMES, default="float16",
                   help="dtype of the saved weights (default float16)")
    p.add_argument("--ema-decay", type=fraction_float, default=None, metavar="D",
                   help="save the moving average of the weights (decay D, e.g. 0.99) rather than the last "
                   "ones (default)")
    p.add_argument("--reg-dir", type=Path, default=None, metavar="DIR",
                   help="regularisation pictures, laid out as IMAGES_DIR (kohya's --reg_data_dir): ordinary "
                   "pictures of what the LoRA must leave as it was")
    p.add_argument("--prior-loss-weight", type=positive_float, default=1.0, metavar="W",
                   help="loss weight of the --reg-dir pictures (kohya's; default 1)")
    p.add_argument("--reg-target", choices=REG_TARGETS, default="pictures",
                   help="train the --reg-dir pictures towards the pictures (kohya's prior preservation, the "
                   "default) or towards the base model's own prediction for them ('base': output "
                   "preservation, which keeps ordinary prompts closer to the base model; one more forward "
                   "pass per regularisation picture)")
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (GPUs, AMX CPUs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.lora import LoRASpec
    from ..training.lora_train import LoRATraining, train_lora

    for flag, given, needs, present in (("--conv-alpha", args.conv_alpha, "--conv-rank", args.conv_rank),
                                        ("--te-alpha", args.te_alpha, "--train-text-encoder", args.train_text_encoder),
                                        ("--reg-target", args.reg_target != "pictures" or None, "--reg-dir",
                                         args.reg_dir),
                                        ("--prior-loss-weight", args.prior_loss_weight != 1.0 or None, "--reg-dir",
                                         args.reg_dir)):
        if given is not None and not present:
            raise ValueError(f"{flag} needs {needs}")
    spec = LoRASpec(rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
                    text_encoder=args.train_text_encoder, text_alpha=args.te_alpha, layers=args.layers)
    settings = LoRATraining(
        images=args.images, out=args.out, base=Path(args.base) if args.base else None, workdir=args.workdir,
        network=spec, steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_scheduler=args.lr_scheduler,
        warmup=args.warmup, resolution=args.resolution, seed=args.seed, save_every=args.save_every,
        log_every=args.log_every, caption_dropout=args.caption_dropout, caption_suffix=args.caption_extension,
        save_dtype=args.save_dtype, bf16=args.bf16, ema_decay=args.ema_decay, reg_images=args.reg_dir,
        prior_loss_weight=args.prior_loss_weight, reg_target=args.reg_target,
    )
    check_output_dir(settings.out.parent, "--out")
    check_output_dir(settings.state_dir, "--workdir")
    result = train_lora(settings)
    if result.written:
        print(f"wrote {result.out} ({result.steps} steps on {result.pictures} pictures)")
    return 0
