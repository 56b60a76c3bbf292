"""Training a ControlNet (Zhang et al. 2023, arXiv:2302.05543) for a frozen model.

The recipe of the paper, on ldm's training library:

- the ControlNet starts as a copy of the U-Net's input half (``conv_in``, the timestep
  embedding, the down blocks and the mid block: :func:`controlnet_from_unet`, as
  diffusers' ``ControlNetModel.from_unet``), its hint embedding random but for its last
  conv, and every "zero conv" zero: at step 0 it adds exactly nothing to the U-Net;
- the U-Net and the text encoder are frozen; the loss is the plain diffusion loss of
  the U-Net's prediction with the ControlNet's residuals added
  (:class:`ControlNetTask`), so gradients reach the ControlNet through the U-Net;
- 50% of the captions are replaced by the empty one, so the ControlNet learns to read
  the hint itself rather than lean on the prompt (the paper's section 3.3);
- AdamW, in the resumable stage loop (:func:`~ldm.training.loop.train_stage`, with
  accelerate): a rerun continues from the work folder's checkpoint, bit for bit.

The data are (latent, caption, hint) triples: :class:`HintedLatents` adds to each
:class:`~ldm.training.datasets.LatentPairs` item the hint of the picture's scene
(:func:`ldm.toy.hints.hint`), which the toy world draws for free.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import ControlNetConfig, ModelConfig
from ..models.controlnet import ControlNetModel
from ..models.text import TextEncoder
from ..models.tokenizer import Tokenizer
from ..models.unet import UNet
from ..toy.hints import HINT_KINDS, hint
from ..toy.world import Scene, render
from .datasets import LatentPairs, LatentSet, chw
from .lora_data import encode_pictures
from .loop import RunSettings, train_stage
from .losses import TIMESTEP_SAMPLING, NoiseSchedule, noised
from .stage import StageResult, StageSpec, plain

# The modules a ControlNet starts from the U-Net's (diffusers' from_unet copies these).
COPIED = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")
# The modules that start at zero: the paper's zero convolutions, and (as the paper's code
# and diffusers do, unless asked not to) the hint embedding's last conv.
ZERO_CONVS = ("controlnet_down_blocks.", "controlnet_mid_block.")
HINT_OUT = "controlnet_cond_embedding.conv_out."
ZEROED = (*ZERO_CONVS, HINT_OUT)
CAPTION_DROPOUT = 0.5  # the paper: half the prompts replaced by empty strings


def controlnet_config(model: ModelConfig, embedding_channels: tuple[int, ...]) -> ControlNetConfig:
    """A ControlNet for ``model``'s U-Net whose hint is a picture at the model's pixel size.

    ``embedding_channels``: the hint embedding's widths (SD's are 16, 32, 96, 256); one
    level per halving, so there must be ``log2(vae downsample factor) + 1`` of them."""
    if not isinstance(model, ModelConfig):
        raise TypeError(f"model must be a ModelConfig, got {type(model).__name__}")
    config = ControlNetConfig(unet=model.unet, conditioning_embedding_out_channels=tuple(embedding_channels),
                              family=model.family)
    if config.hint_factor != model.vae.downsample_factor:
        levels = model.vae.downsample_factor.bit_length()
        raise ValueError(f"{len(embedding_channels)} hint embedding widths {tuple(embedding_channels)} shrink the hint "
                         f"{config.hint_factor}x, but the model's latents are {model.vae.downsample_factor}x smaller "
                         f"than its pictures: give {levels} widths")
    return config


def controlnet_from_unet(unet: UNet, config: ControlNetConfig, *, zero_hint_out: bool = True) -> ControlNetModel:
    """A ControlNet of ``config`` holding a copy of ``unet``'s input half (see the module
    doc), its zero convs zero; the hint embedding's other convs keep the random
    initialisation drawn from torch's global RNG (seed it first).

    ``zero_hint_out=False`` leaves the hint embedding's last conv random too. The
    ControlNet still adds exactly nothing at the start (its zero convs see to that), but
    the hint reaches its features from the first step: with that conv at zero as well,
    neither zero layer gets a gradient that depends on the hint until the other has
    grown, and on the toy model 1,350 steps of batch 16 left the hint without any
    effect on the loss (see weights/README.md)."""
    if not isinstance(unet, UNet):
        raise TypeError(f"unet must be an ldm UNet, got {type(unet).__name__}")
    if not isinstance(config, ControlNetConfig):
        raise TypeError(f"config must be a ControlNetConfig, got {type(config).__name__}")
    if config.unet != unet.config:
        raise ValueError(f"the ControlNet's U-Net config is not this U-Net's:\n  {config.unet}\n  {unet.config}")
    controlnet = ControlNetModel(config)
    source = unet.state_dict()
    state = controlnet.state_dict()
    copied = {k: source[k].clone() for k in state if k.startswith(COPIED)}
    rest = [k for k in state if k not in copied and not k.startswith("controlnet_")]
    missing = [k for k in copied if k not in source]
    if rest or missing:  # a module the recipe does not know how to start: refuse rather than guess
        raise ValueError(f"ControlNet keys neither copied nor its own: {rest[:5]}; not in the U-Net: {missing[:5]}")
    zeroed = ZEROED if zero_hint_out else ZERO_CONVS
    zeros = {k: torch.zeros_like(v) for k, v in state.items() if k.startswith(zeroed)}
    controlnet.load_state_dict({**state, **copied, **zeros}, strict=True)
    return controlnet


def hint_pixels(hints: Tensor) -> Tensor:
    """uint8 hints ``(B, 3, H, W)`` in [0, 255] -> float in [0, 1], what a ControlNet reads."""
    return hints.float() / 255.0


class ControlNetTask(nn.Module):
    """The frozen U-Net and text encoder with the trained ``controlnet``;
    ``forward(batch, generator)`` returns the diffusion loss (the contract of
    :func:`~ldm.training.loop.train_stage`). ``batch``: ``latents`` (scaled), caption
    ``ids`` and uint8 ``hints`` at pixel size."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder, controlnet: ControlNetModel,
                 schedule: NoiseSchedule, timesteps: str = "uniform") -> None:
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.controlnet, self.schedule, self.timesteps = controlnet, schedule, timesteps

    def train(self, mode: bool = True) -> "ControlNetTask":
        super().train(mode)
        self.unet.eval()  # the frozen models stay in inference mode
        self.text_encoder.eval()
        return self

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        with torch.no_grad():
            context = self.text_encoder(batch["ids"])
        noisy, t, target = noised(batch["latents"], self.schedule, generator, self.timesteps)
        residuals = self.controlnet(noisy, t, context, hint_pixels(batch["hints"]))
        prediction = self.unet(noisy, t, context, down_residuals=residuals.down, mid_residual=residuals.mid)
        return F.mse_loss(prediction.float(), target), {}


class HintedLatents(LatentPairs):
    """:class:`~ldm.training.datasets.LatentPairs` items with the ``hints`` (uint8
    ``(3, size, size)``) of their pictures' scenes, of kind ``hint_kind``."""

    def __init__(self, latents: LatentSet, seed: int, stream: int, first: int, count: int, p_empty: float,
                 tokenizer: Tokenizer, size: int, hint_kind: str = "silhouette") -> None:
        if hint_kind not in HINT_KINDS:
            raise ValueError(f"unknown hint kind {hint_kind!r}; valid: {', '.join(HINT_KINDS)}")
        super().__init__(latents, seed, stream, first, count, p_empty, tokenizer)
        self.size, self.hint_kind = size, hint_kind

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item, j, _ = self._draw(i)
        return {**item, "hints": chw(hint(self.latents.scenes[j], self.hint_kind, self.size))}


@torch.no_grad()
def encode_scenes(vae: nn.Module, scenes: list[Scene], size: int, scaling_factor: float,
                  device: torch.device | str = "cpu", chunk: int = 1024) -> LatentSet:
    """The posterior moments of ``scenes`` drawn at ``size`` by the world's renderer, with
    the model's ``scaling_factor`` (the one its U-Net was trained at)."""
    if not scenes:
        raise ValueError("no scenes to encode")
    chunks = []
    for lo in range(0, len(scenes), chunk):  # rendered a chunk at a time: the pictures need not all fit
        pictures = np.stack([render(s, size) for s in scenes[lo:lo + chunk]])
        chunks.append(encode_pictures(vae, pictures, device, batch_size=256))
    return LatentSet(torch.cat(chunks), list(scenes), float(scaling_factor))


def controlnet_fingerprint(cn_config: ControlNetConfig, model: ModelConfig, hint_kind: str,
                           p_empty: float, timesteps: str = "uniform") -> dict[str, Any]:
    """What a ControlNet checkpoint must share with a run to be continued."""
    return {"controlnet": plain(cn_config.to_dict()), "scaling_factor": model.vae.scaling_factor,
            "hint": hint_kind, "p_empty": p_empty, "prediction": model.prediction_type,
            **({} if timesteps == "uniform" else {"timesteps": timesteps}),
            "schedule": [model.num_train_timesteps, model.beta_start, model.beta_end, model.beta_schedule]}


def train_controlnet(acc: Accelerator, run: RunSettings, spec: StageSpec, model: ModelConfig, unet: UNet,
                     text_encoder: TextEncoder, controlnet: ControlNetModel, latents: LatentSet,
                     tokenizer: Tokenizer, *, stream: int, hint_kind: str = "silhouette",
                     p_empty: float = CAPTION_DROPOUT, timesteps: str = "uniform",
                     inputs: dict[str, Any] | None = None) -> StageResult:
    """Train ``controlnet`` for the frozen ``unet`` (of ``model``) on ``latents`` with their
    scenes' hints, resuming from / checkpointing to ``run.checkpoint_path(spec.name)``.
    ``timesteps``: how training timesteps are drawn (``ldm.training.losses.TIMESTEP_SAMPLING``).
    ``inputs``: what the frozen model and data are (their change restarts the stage)."""
    if not 0 <= p_empty < 1:
        raise ValueError(f"p_empty must be in [0, 1), got {p_empty!r}")
    if timesteps not in TIMESTEP_SAMPLING:
        raise ValueError(f"unknown timestep sampling {timesteps!r}; valid: {', '.join(TIMESTEP_SAMPLING)}")
    task = ControlNetTask(unet, text_encoder, controlnet, NoiseSchedule(model), timesteps)
    size = model.vae.sample_size
    return train_stage(
        acc, run, spec, task, controlnet,
        lambda first, count: HintedLatents(latents, run.seed, stream, first, count, p_empty, tokenizer, size,
                                           hint_kind),
        stream=stream, fingerprint=controlnet_fingerprint(controlnet.config, model, hint_kind, p_empty, timesteps),
        inputs=inputs or {})
