"""Training a LoRA on a folder of captioned pictures (what `ldm train-lora` runs).

The recipe is kohya-ss's ``train_network.py`` for SD 1.x/2.x LoRA, on ldm's training
library: the base model is frozen; pictures are encoded once by its VAE and captions
once by its text encoder (unless the text encoder is trained too); every step draws
uniform timesteps and unit noise (:class:`~ldm.training.losses.NoiseSchedule`, the
model's own training schedule) and trains the LoRA branches
(:mod:`ldm.training.lora`) on the eps / v loss with AdamW, gradient clipping at 1
and a constant or cosine learning rate after a linear warm-up. The resumable stage
loop (:func:`~ldm.training.loop.train_stage`) checkpoints into the work folder, so the
same command run again continues where it stopped, bit for bit; a run may also be
continued to more steps (constant rate). The result is a kohya-format safetensors file
(``lora_unet_*`` / ``lora_te_*``, ``ss_*`` metadata) written atomically; an existing
file there is only replaced if ``ldm train-lora`` wrote it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import Tensor, nn

from ..checkpoints import CheckpointError, load_model, read_safetensors_header
from ..checkpoints.loading import plan
from ..config import ModelConfig
from ..dtypes import DTYPE_NAMES, parse_dtype
from ..modelref import model_hash, model_name
from ..models.tokenizer import Tokenizer
from ..paths import default_weights_path
from ..validation import check_finite, check_int, check_seed, check_side
from .checkpointing import load_checkpoint
from .export import write_safetensors
from .loop import RunSettings, train_stage
from .lora import WRITER, WRITER_KEY, LoRANetwork, LoRASpec, kohya_metadata, kohya_state
from .lora_data import (
    CAPTION_SUFFIX, CaptionedLatents, Example, dataset_digest, encode_pictures, load_pictures, name_files,
    scan_folder,
)
from .losses import NoiseSchedule, diffusion_loss, noised
from .seeding import generator_for
from .stage import SCHEDULES, StageSpec

logger = logging.getLogger("ldm")

STAGE = "train-lora"  # the work folder's checkpoint: <workdir>/train-lora.pt
# Random streams (see ldm.training.seeding.derive_seed): LoRA init, data, step noise.
INIT_STREAM, DATA_STREAM, NOISE_STREAM = 1, 2, 3
WEIGHT_DECAY = 1e-2  # AdamW's usual default, as kohya-ss and diffusers' LoRA scripts use
MAX_GRAD_NORM = 1.0  # kohya-ss's default
SUFFIX = ".safetensors"
REG_TARGETS = ("pictures", "base")
# Fingerprint entries named as the command's flags, for the "other settings" message.
_FLAGS = {"base": "--base", "images": "IMAGES_DIR (its pictures or captions)", "schedule": "--lr-scheduler"}


@dataclass(frozen=True)
class LoRATraining:
    """Everything one LoRA training run is asked to do (the flags of `ldm train-lora`).

    ``base``: any checkpoint ldm loads (None: the shipped model). ``workdir``: resumable
    state (None: ``<out without .safetensors>.train-lora/`` beside ``out``).
    ``resolution``: square training size (None: the model's native size).
    ``log_every``: steps between progress lines (None: about 20 lines in all).
    ``reg_images``: a folder of regularisation pictures (kohya-ss's ``--reg_data_dir``,
    the same layout as ``images``), trained with the loss weight ``prior_loss_weight``.
    ``reg_target``: what they are trained towards: ``"pictures"``, the pictures
    themselves (kohya-ss, DreamBooth's prior preservation), or ``"base"``, the base
    model's own prediction for the same noisy latent and caption (output
    preservation): the LoRA learns to leave ordinary prompts as the base model draws
    them rather than to redraw them, which keeps more of what it knew.
    """

    images: Path
    out: Path
    base: Path | None = None
    workdir: Path | None = None
    network: LoRASpec = field(default_factory=LoRASpec)
    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    warmup: int = 0
    resolution: int | None = None
    seed: int = 0
    save_every: int = 100
    log_every: int | None = None
    caption_dropout: float = 0.0
    caption_suffix: str = CAPTION_SUFFIX
    save_dtype: str = "float16"
    bf16: bool = False
    ema_decay: float | None = None  # None: the last weights; else their exponential moving average
    reg_images: Path | None = None
    prior_loss_weight: float = 1.0
    reg_target: str = "pictures"

    def __post_init__(self) -> None:
        for name in ("images", "out") + (("reg_images",) if self.reg_images is not None else ()):
            if not isinstance(getattr(self, name), Path):
                raise TypeError(f"{name} must be a pathlib.Path, got {type(getattr(self, name)).__name__}")
        if self.out.suffix != SUFFIX:
            raise ValueError(f"out {self.out}: a LoRA file must end in {SUFFIX}")
        if not isinstance(self.network, LoRASpec):
            raise TypeError(f"network must be a LoRASpec, got {type(self.network).__name__}")
        for name, minimum in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("save_every", 1)):
            check_int(getattr(self, name), name, minimum)
        if self.log_every is not None:
            check_int(self.log_every, "log_every", 1)
        if self.resolution is not None:
            check_side(self.resolution, "resolution")
        check_seed(self.seed)
        if check_finite(self.lr, "lr") <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= check_finite(self.caption_dropout, "caption_dropout") < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if self.lr_scheduler not in SCHEDULES:
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; valid: {', '.join(SCHEDULES)}")
        if self.ema_decay is not None and not 0 < check_finite(self.ema_decay, "ema_decay") < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if check_finite(self.prior_loss_weight, "prior_loss_weight") <= 0:
            raise ValueError(f"prior_loss_weight must be > 0, got {self.prior_loss_weight!r}")
        if self.reg_target not in REG_TARGETS:
            raise ValueError(f"unknown reg_target {self.reg_target!r}; valid: {', '.join(REG_TARGETS)}")
        if self.reg_images is None and (self.reg_target != "pictures" or self.prior_loss_weight != 1.0):
            raise ValueError("reg_target and prior_loss_weight need reg_images (a folder of regularisation "
                             "pictures)")
        if self.save_dtype not in DTYPE_NAMES:
            raise ValueError(f"unknown save_dtype {self.save_dtype!r}; valid: {', '.join(DTYPE_NAMES)}")

    @property
    def state_dir(self) -> Path:
        return self.workdir if self.workdir is not None else self.out.with_suffix(".train-lora")

    @property
    def base_path(self) -> Path:
        return self.base if self.base is not None else default_weights_path()


@dataclass
class LoRAResult:
    out: Path
    steps: int
    seconds: float  # training time over every run of this work folder
    losses: list  # [step, mean loss] at each progress line
    pictures: int
    metadata: dict[str, str]
    written: bool  # this process wrote the file (the main one, with several processes)


def check_out(out: Path) -> None:
    """Refuse an ``out`` that exists and is not a LoRA file written by ``ldm train-lora``:
    a user's file is never replaced."""
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_file():
        raise ValueError(f"--out {out}: exists and is not a file")
    try:
        _, metadata = read_safetensors_header(out)
    except CheckpointError:
        metadata = {}
    if metadata.get(WRITER_KEY) != WRITER:
        raise ValueError(f"--out {out}: exists and was not written by {WRITER}; not replaced (choose another "
                         "--out, or move the file away)")


def check_captions(tokenizer: Tokenizer, examples: list[Example], folder: Path) -> None:
    """Refuse captions longer than one CLIP window: training encodes one window per
    caption, and cutting a caption would train on words it does not have."""
    window = tokenizer.max_length - 2
    long = [ex.image for ex in examples if len(tokenizer.encode(ex.caption)) > window]
    if long:
        raise ValueError(f"{folder}: {len(long)} caption(s) longer than the text encoder's "
                         f"{window}-token window (shorten them): {name_files(long, folder)}")


def resume_check(path: Path, fingerprint: dict[str, Any], steps: int) -> int:
    """The step the checkpoint at ``path`` reached (0 if none), after refusing one made with
    other settings (naming each that changed, as flags) or already past ``steps``."""
    try:
        ckpt = load_checkpoint(path)
    except Exception as exc:  # torch.load raises many types on a file it cannot read (IndexError, ...)
        raise ValueError(f"{path}: not a train-lora checkpoint ({exc.__class__.__name__}); use another "
                         "--workdir") from None
    if ckpt is None:
        return 0
    if not isinstance(ckpt, dict) or not {"fingerprint", "step"} <= set(ckpt):
        raise ValueError(f"{path}: not a train-lora checkpoint; use another --workdir")
    saved = ckpt["fingerprint"]
    changed = [f"{_FLAGS.get(k, '--' + k.replace('_', '-'))} {saved.get(k)!r} -> {fingerprint.get(k)!r}"
               for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if changed:
        raise ValueError(f"{path.parent} holds a run with other settings: {', '.join(changed)}; rerun with "
                         "its settings to continue it, or use another --workdir to start a new one")
    if ckpt["step"] > steps:
        raise ValueError(f"{path.parent} holds {ckpt['step']} steps, more than --steps {steps}: pass "
                         f"--steps {ckpt['step']} or more, or use another --workdir")
    return int(ckpt["step"])


@dataclass(frozen=True)
class Regularisation:
    """Which pictures are regularisation pictures (``mask``, one per picture), their loss
    weight, and their target (see :class:`LoRATraining`)."""

    mask: Tensor
    weight: float = 1.0
    target: str = "pictures"


class LoRATask(nn.Module):
    """The frozen model plus the LoRA branches; ``forward(batch, generator)`` returns the
    diffusion loss (the contract of :func:`~ldm.training.loop.train_stage`).

    ``ids``: the captions' token rows, then the empty caption's. With a frozen text
    encoder their embeddings are computed once here (kohya-ss's
    ``cache_text_encoder_outputs``); otherwise every step encodes its captions. With
    ``reg`` targets from the base model, the base model's embeddings are kept too.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, schedule: NoiseSchedule,
                 network: LoRANetwork, ids: Tensor, reg: Regularisation | None = None) -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.network, self.schedule, self.reg = network, schedule, reg
        self.train_text_encoder = network.spec.text_encoder
        self.register_buffer("ids", ids, persistent=False)
        with torch.no_grad(), self.base_model():
            base = text_encoder(ids) if (not self.train_text_encoder or self.to_base) else None
        if not self.train_text_encoder:
            self.register_buffer("contexts", base, persistent=False)
        if self.to_base:
            self.register_buffer("base_contexts", base, persistent=False)

    @property
    def to_base(self) -> bool:
        return self.reg is not None and self.reg.target == "base"

    @contextlib.contextmanager
    def base_model(self) -> Iterator[None]:
        """The model without the LoRA for the ``with`` block."""
        attached = self.network.attached
        self.network.detach()
        try:
            yield
        finally:
            if attached:
                self.network.attach()

    def train(self, mode: bool = True) -> "LoRATask":
        super().train(mode)
        self.unet.eval()  # the frozen model stays in inference mode (dropout off)
        self.text_encoder.eval()
        return self

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        caption = batch["caption"]
        context = self.text_encoder(self.ids[caption]) if self.train_text_encoder else self.contexts[caption]
        if self.reg is None:
            return diffusion_loss(self.unet, batch["latents"], context, self.schedule, generator), {}
        noisy, t, target = noised(batch["latents"], self.schedule, generator)
        prediction = self.unet(noisy, t, context).float()
        reg = self.reg.mask.to(caption.device)[batch["picture"]]
        if self.to_base and bool(reg.any()):
            with torch.no_grad(), self.base_model():
                kept = self.unet(noisy[reg], t[reg], self.base_contexts[caption[reg]]).float()
            target = target.index_put((reg.nonzero()[:, 0],), kept)
        per_picture = (prediction - target).square().flatten(1).mean(1)
        weights = torch.where(reg, self.reg.weight, 1.0)
        return (per_picture * weights).mean(), {}


def base_model_version(config: ModelConfig) -> str:
    """kohya-ss's ``ss_base_model_version`` (``sd_v1``, ``sd_v2``, ``sd_v2_v``); ``ldm_toy`` for the toy."""
    version = {"sd1": "sd_v1", "sd2": "sd_v2"}.get(config.family, f"ldm_{config.family}")
    return version + ("_v" if config.prediction_type == "v_prediction" else "")


def _group(folder: Path, ex: Example) -> str:
    """The name kohya-ss gives a picture's folder in its metadata (the subfolder, or the folder)."""
    return ex.image.parent.name if ex.image.parent != folder else folder.name


def _tag_frequency(folder: Path, examples: list[Example]) -> dict[str, dict[str, int]]:
    """kohya-ss's ``ss_tag_frequency``: the comma-separated tags of each folder's captions, counted."""
    out: dict[str, Counter] = {}
    for ex in examples:
        out.setdefault(_group(folder, ex), Counter()).update(t.strip() for t in ex.caption.split(",") if t.strip())
    return {name: dict(tags) for name, tags in out.items()}


def _dataset_dirs(folder: Path, examples: list[Example]) -> dict[str, dict[str, int]]:
    """kohya-ss's ``ss_dataset_dirs``: each folder's repeats and picture count."""
    out: dict[str, dict[str, int]] = {}
    for ex in examples:
        entry = out.setdefault(_group(folder, ex), {"n_repeats": ex.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def _fingerprint(settings: LoRATraining, base_hash: str, data: str, resolution: int) -> dict[str, Any]:
    """What a checkpoint in the work folder must share with this run to be continued
    (the stage loop adds the batch size, the seed and, for a cosine rate, the steps)."""
    net = settings.network
    return {"base": base_hash, "images": data, "resolution": resolution, "rank": net.rank,
            "alpha": net.resolved_alpha, "conv_rank": net.conv_rank, "conv_alpha": net.resolved_conv_alpha,
            "train_text_encoder": net.text_encoder, "te_alpha": net.text_alpha, "layers": list(net.layers),
            "lr": settings.lr,
            "lr_scheduler": settings.lr_scheduler, "warmup": settings.warmup,
            "caption_dropout": settings.caption_dropout, "bf16": settings.bf16, "ema_decay": settings.ema_decay,
            } | ({"reg_target": settings.reg_target, "prior_loss_weight": settings.prior_loss_weight}
                 if settings.reg_images is not None else {})


def stage_spec(settings: LoRATraining) -> StageSpec:
    """The stage loop's settings: AdamW, clipping, the rate schedule; the last weights, as
    kohya-ss keeps them, or with ``ema_decay`` their moving average (as SD kept its U-Net's),
    which evens out the noise of the last steps."""
    ema = settings.ema_decay
    return StageSpec(STAGE, steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                     warmup=settings.warmup, weight_decay=WEIGHT_DECAY, ema_decay=ema or 0.0,
                     max_grad_norm=MAX_GRAD_NORM, schedule=settings.lr_scheduler, use_ema=ema is not None)


@dataclass
class Prepared:
    """A run's checked inputs: what :func:`prepare` read, before the model loads."""

    examples: list[Example]
    config: ModelConfig
    resolution: int
    pictures: Any  # uint8 (N, resolution, resolution, 3)
    tokenizer: Tokenizer
    base_hash: str
    fingerprint: dict[str, Any]
    spec: StageSpec


def prepare(settings: LoRATraining) -> Prepared:
    """Check every input before anything large is built: the folder, its pictures and
    captions, the output file, the base model's headers, the work folder's checkpoint."""
    if not isinstance(settings, LoRATraining):
        raise TypeError(f"settings must be a LoRATraining, got {type(settings).__name__}")
    examples = scan_folder(settings.images, settings.caption_suffix)
    if settings.reg_images is not None:
        if settings.reg_images.resolve() == settings.images.resolve():
            raise ValueError(f"--reg-dir {settings.reg_images} is IMAGES_DIR itself; give a separate folder")
        examples += scan_folder(settings.reg_images, settings.caption_suffix, reg=True)
    check_out(settings.out)
    base = settings.base_path
    config = plan(base).config  # from the headers: the weights load once the inputs are all checked
    if config.is_inpainting:
        raise ValueError(f"--base {base}: an inpainting model ({config.unet.in_channels}-channel U-Net); "
                         "train-lora trains text-to-image models")
    resolution = settings.resolution or config.default_size
    pictures = load_pictures(examples, resolution)
    tokenizer = Tokenizer(config.text.pad_token, config.text.max_position_embeddings)
    check_captions(tokenizer, examples, settings.images)
    base_hash = model_hash(base)
    fingerprint = _fingerprint(settings, base_hash, dataset_digest(pictures, examples), resolution)
    spec = stage_spec(settings)
    resume_check(settings.state_dir / f"{STAGE}.pt", {**fingerprint, **spec.fingerprint(), "seed": settings.seed},
                 settings.steps)
    return Prepared(examples, config, resolution, pictures, tokenizer, base_hash, fingerprint, spec)


def metadata_fields(settings: LoRATraining, run: Prepared, steps: int, processes: int) -> dict[str, Any]:
    """The ``ss_*`` entries that describe the model, the data and the schedule (kohya-ss's names)."""
    base, examples, size = settings.base_path, run.examples, run.resolution
    return {
        "ss_sd_model_name": model_name(base), "ss_sd_model_hash": run.base_hash,
        "ss_base_model_version": base_model_version(run.config), "ss_v2": run.config.family == "sd2",
        "ss_resolution": f"({size}, {size})",
        "ss_num_train_images": sum(ex.repeats for ex in examples if not ex.reg),
        "ss_num_reg_images": sum(ex.repeats for ex in examples if ex.reg),
        "ss_prior_loss_weight": settings.prior_loss_weight, "ss_reg_target": settings.reg_target,
        "ss_batch_size_per_device": settings.batch_size // processes, "ss_total_batch_size": settings.batch_size,
        "ss_learning_rate": settings.lr, "ss_unet_lr": settings.lr,
        "ss_text_encoder_lr": settings.lr if settings.network.text_encoder else None,
        "ss_lr_scheduler": settings.lr_scheduler, "ss_lr_warmup_steps": settings.warmup,
        "ss_optimizer": f"torch.optim.AdamW(weight_decay={WEIGHT_DECAY})", "ss_max_grad_norm": MAX_GRAD_NORM,
        "ss_max_train_steps": settings.steps, "ss_steps": steps, "ss_seed": settings.seed,
        "ss_caption_dropout_rate": settings.caption_dropout, "ss_cache_latents": True,
        "ss_mixed_precision": "bf16" if settings.bf16 else "no", "ss_ema_decay": settings.ema_decay,
        "ss_output_name": settings.out.stem,
        "ss_tag_frequency": _tag_frequency(settings.images, [ex for ex in examples if not ex.reg]),
        "ss_dataset_dirs": _dataset_dirs(settings.images, [ex for ex in examples if not ex.reg]),
        "ss_reg_dataset_dirs": (_dataset_dirs(settings.reg_images, [ex for ex in examples if ex.reg])
                                if settings.reg_images is not None else {}),
        "ss_training_finished_at": time.time(),
    }


def train_lora(settings: LoRATraining, accelerator: Accelerator | None = None) -> LoRAResult:
    """Train the LoRA ``settings`` describe and write it to ``settings.out``.

    Every input is checked before the model loads (:func:`prepare`); user errors are
    ValueError / FileNotFoundError naming the file or setting.
    """
    run = prepare(settings)
    model = load_model(settings.base_path, device="cpu", dtype=torch.float32)
    acc = accelerator or Accelerator(mixed_precision="no", dataloader_config=DataLoaderConfiguration(
        split_batches=True))
    examples = run.examples
    logger.info("%d captioned pictures (%d per epoch) from %s at %dx%d; base %s (%s)", len(examples),
                sum(ex.repeats for ex in examples), settings.images, run.resolution, run.resolution,
                settings.base_path, run.base_hash)
    moments = encode_pictures(model.vae.to(acc.device).eval(), run.pictures, acc.device)
    model.vae.to("cpu")
    network = LoRANetwork(model.unet, model.text_encoder, settings.network,
                          generator_for(settings.seed, INIT_STREAM)).attach()
    ids = run.tokenizer([ex.caption for ex in examples] + [""])
    reg = (Regularisation(torch.tensor([ex.reg for ex in examples]), settings.prior_loss_weight, settings.reg_target)
           if settings.reg_images is not None else None)
    task = LoRATask(model.unet, model.text_encoder, NoiseSchedule(run.config), network, ids, reg)
    loop = RunSettings(workdir=settings.state_dir, seed=settings.seed, save_every=settings.save_every,
                       log_every=settings.log_every or max(1, settings.steps // 20),
                       bf16=(STAGE,) if settings.bf16 else ())
    scale, repeats = run.config.vae.scaling_factor, [ex.repeats for ex in examples]
    try:
        result = train_stage(
            acc, loop, run.spec, task, network,
            lambda first, count: CaptionedLatents(moments, scale, settings.seed, DATA_STREAM, first, count,
                                                  settings.caption_dropout, repeats),
            stream=NOISE_STREAM, fingerprint=run.fingerprint, inputs={})
    finally:
        network.detach()
    metadata = kohya_metadata(settings.network, metadata_fields(settings, run, result.step, acc.num_processes))
    if acc.is_main_process:
        check_out(settings.out)  # again: the file may have appeared while training ran
        write_safetensors(kohya_state(result.state, parse_dtype(settings.save_dtype)), settings.out, metadata)
        logger.info("wrote %s (%d LoRA layers, %d steps)", settings.out, len(list(network.children())), result.step)
    acc.wait_for_everyone()
    return LoRAResult(settings.out, result.step, result.record["seconds"], result.record["losses"],
                      len(examples), metadata, acc.is_main_process)
