"""Training latent diffusion models with plain torch and accelerate (no diffusers).

- :mod:`.seeding`: seeds drawn by position, the RNG states a checkpoint keeps
- :mod:`.schedules`, :mod:`.optim`: learning-rate schedules, AdamW parameter groups
- :mod:`.ema`: the EMA of the weights
- :mod:`.losses`: CLIP contrastive, VAE and diffusion (eps / v) losses
- :mod:`.datasets`: toy-world datasets drawn by global sample index
- :mod:`.masks`: random masks for inpainting training
- :mod:`.tasks`: each trained model wrapped so its forward returns the loss
- :mod:`.models`: models built from configs or handed-on states
- :mod:`.stage`, :mod:`.loop`, :mod:`.checkpointing`: the resumable stage loop
- :mod:`.export`: the single-file checkpoint, the CLIP scorer and the read-back check
- :mod:`.lcm_distill`: latent consistency distillation (LCM) of a U-Net

``scripts/train_toy.py`` is the recipe that puts these together.
"""

from .checkpointing import load_checkpoint, save_checkpoint
from .datasets import InpaintPairs, LatentPairs, LatentSet, WorldPairs, chw
from .ema import EMA
from .export import check_export, export_checkpoint, export_clip_scorer, write_safetensors
from .loop import DatasetFactory, Progress, RunSettings, autocast, resume_point, result_state, train_stage
from .losses import NoiseSchedule, clip_contrastive_loss, diffusion_loss, to_pixels, trim_after_first_eos, vae_loss
from .masks import mask_settings, random_mask
from .models import inpainting_unet, text_encoder_from_clip, toy_clip, vae_from_state
from .optim import decay_groups, set_lr
from .schedules import warmup_constant_lr, warmup_cosine_lr
from .seeding import derive_seed, generator_for, rng_state, seed_everything, set_rng_state
from .stage import (SCHEDULES, StageResult, StageSpec, cpu_copy, given_card, given_weights, param_count, plain,
                    stage_card)
from .tasks import DECODER_FROZEN, ClipTask, DecoderTask, InpaintTask, UNetTask, VAETask

__all__ = [
    "ClipTask", "DECODER_FROZEN", "DatasetFactory", "DecoderTask", "EMA", "InpaintPairs", "InpaintTask",
    "LatentPairs", "LatentSet", "NoiseSchedule", "Progress", "RunSettings", "SCHEDULES", "StageResult",
    "StageSpec", "UNetTask", "VAETask", "WorldPairs", "autocast", "check_export", "chw", "clip_contrastive_loss",
    "cpu_copy", "decay_groups", "derive_seed", "diffusion_loss", "export_checkpoint", "export_clip_scorer",
    "generator_for", "given_card", "given_weights", "inpainting_unet", "load_checkpoint", "mask_settings",
    "param_count", "plain", "random_mask", "result_state", "resume_point", "rng_state", "save_checkpoint",
    "seed_everything", "set_lr", "set_rng_state", "stage_card", "text_encoder_from_clip", "to_pixels", "toy_clip",
    "train_stage", "trim_after_first_eos", "vae_from_state", "vae_loss", "warmup_constant_lr", "warmup_cosine_lr",
    "write_safetensors",
]
