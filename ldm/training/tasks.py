"""The trained models, each wrapped so that ``forward(batch, generator)`` returns its loss
and a dict of numbers to log: accelerate/DDP must see the forward that runs every
trained parameter, and the stage loop (:func:`ldm.training.loop.train_stage`) needs
nothing else to know about the model."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.text import TextEncoder
from ..models.tokenizer import EOS_ID
from ..models.unet import UNet
from ..edit_latents import latent_mask
from ..models.vae import AutoencoderKL
from ..toy.clip import ToyCLIP
from .losses import NoiseSchedule, clip_contrastive_loss, diffusion_loss, to_pixels, trim_after_first_eos, vae_loss

DECODER_FROZEN = ("encoder", "quant_conv")  # the VAE parts a decoder fine-tune leaves as they are


class ClipTask(nn.Module):
    """Contrastive training of both CLIP towers on batches of ``images`` and caption ``ids``."""

    def __init__(self, clip: ToyCLIP) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        text, image = self.clip(trim_after_first_eos(batch["ids"], EOS_ID), to_pixels(batch["images"]))
        # With several processes each one contrasts its own slice of the batch.
        loss = clip_contrastive_loss(text, image, self.clip.logit_scale)
        return loss, {"temperature": self.clip.logit_scale.detach().exp()}


class VAETask(nn.Module):
    """The whole VAE on reconstruction plus a small KL (:func:`~ldm.training.losses.vae_loss`)."""

    def __init__(self, vae: AutoencoderKL, kl_weight: float) -> None:
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        return vae_loss(self.vae, to_pixels(batch["images"]), generator, self.kl_weight)


class DecoderTask(nn.Module):
    """SD's decoder fine-tune (the ft-EMA/ft-MSE VAEs): the encoder is frozen, so the
    latents, the scaling factor and every U-Net trained on them stay valid; only the
    decoder learns, on L1 (SD's ft-EMA loss without LPIPS, which needs pretrained
    weights). L1's best guess under doubt is the median picture, MSE's the mean: on a
    latent that could be a circle or a cat's head, MSE paints faint eyes on the circle."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae
        for name in DECODER_FROZEN:
            getattr(vae, name).requires_grad_(False)

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        pixels = to_pixels(batch["images"])
        with torch.no_grad():
            posterior = self.vae.encode(pixels)
        recon = self.vae.decode(posterior.sample(generator))
        return (recon.float() - pixels.float()).abs().mean(), {}


class UNetTask(nn.Module):
    """The U-Net on the diffusion loss, conditioned on a frozen text encoder's last hidden state."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet, self.schedule = unet, schedule
        self.text_encoder = text_encoder.requires_grad_(False).eval()  # frozen, as SD freezes CLIP

    def train(self, mode: bool = True) -> "UNetTask":
        super().train(mode)
        self.text_encoder.eval()  # stays in inference mode while the U-Net trains
        return self

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        with torch.no_grad():
            context = self.text_encoder(batch["ids"])
        return diffusion_loss(self.unet, batch["latents"], context, self.schedule, generator), {}


class InpaintTask(UNetTask):
    """A 9-channel inpainting U-Net (SD's sd-v1-5-inpainting recipe) on the diffusion loss:
    its input is the noisy latents, the mask at latent resolution and the latents of the
    picture with the mask's pixels set to 0 (grey), stacked, exactly as the pipeline
    feeds it (:mod:`ldm.edit_latents`: the same latent mask and masked picture). The VAE
    that encodes the masked picture is frozen."""

    def __init__(self, unet: UNet, text_encoder: TextEncoder, schedule: NoiseSchedule, vae: AutoencoderKL,
                 scaling_factor: float) -> None:
        super().__init__(unet, text_encoder, schedule)
        self.vae, self.scaling_factor = vae.requires_grad_(False).eval(), scaling_factor

    def train(self, mode: bool = True) -> "InpaintTask":
        super().train(mode)
        self.vae.eval()
        return self

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        masks = (batch["masks"] >= 0.5).float()
        with torch.no_grad():
            context = self.text_encoder(batch["ids"])
            masked = to_pixels(batch["images"]) * (1 - masks)
            masked_latents = self.vae.encode(masked).sample(generator).float() * self.scaling_factor
        small = latent_mask(masks, self.vae.config.downsample_factor)
        extra = torch.cat([small.to(masked_latents), masked_latents], dim=1)
        return diffusion_loss(self.unet, batch["latents"], context, self.schedule, generator, extra), {}
