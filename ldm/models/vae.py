"""AutoencoderKL: images <-> latents, built from a VAEConfig.

Module names equal diffusers' ``AutoencoderKL`` (``encoder.down_blocks.0.resnets.0``,
``encoder.mid_block.attentions.0.to_q``, ``quant_conv`` ...). The scaling factor
lives in ``config.scaling_factor``; the pipeline applies it, not this module.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..config import VAEConfig
from .layers import AttentionBlock2D, norm_silu
from .unet import DownBlock2D, MidBlock2D, UpBlock2D

# The VAE normalises with eps=1e-6 everywhere (the U-Net uses config.norm_eps).
_EPS = 1e-6


def _mid_block(channels: int, groups: int) -> MidBlock2D:
    return MidBlock2D(
        channels,
        temb_channels=None,
        groups=groups,
        eps=_EPS,
        attention=partial(AttentionBlock2D, groups=groups, eps=_EPS),
    )


class Encoder(nn.Module):
    """conv_in, down blocks (the last without downsampler), mid block, norm-SiLU-conv_out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
    ) -> None:
        super().__init__()
        channels = block_out_channels
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock2D(
                channels[max(i - 1, 0)],
                channels[i],
                layers_per_block,
                temb_channels=None,
                groups=groups,
                eps=_EPS,
                add_downsample=i < len(channels) - 1,
                downsample_padding=0,
            )
            for i in range(len(channels))
        )
        self.mid_block = _mid_block(channels[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x, _ = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (one more resnet per level than the encoder), norm-SiLU-conv_out."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...],
        layers_per_block: int,
        groups: int,
    ) -> None:
        super().__init__()
        rev = block_out_channels[::-1]
        n = layers_per_block + 1
        self.conv_in = nn.Conv2d(in_channels, rev[0], 3, padding=1)
        self.mid_block = _mid_block(rev[0], groups)
        self.up_blocks = nn.ModuleList(
            UpBlock2D(
                [rev[max(i - 1, 0)]] + [rev[i]] * (n - 1),
                rev[i],
                temb_channels=None,
                groups=groups,
                eps=_EPS,
                add_upsample=i < len(rev) - 1,
            )
            for i in range(len(rev))
        )
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), per latent element."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)
        # Clamped as in the original ldm code and diffusers, so exp() stays finite.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * noise. The noise is drawn in float32 on the generator's device
        (CPU by default) and then moved, so it is the same on every device and dtype."""
        device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=torch.float32)
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over each sample's latent, shape [B]."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """``encode(images in [-1, 1]) -> DiagonalGaussian``; ``decode(latents) -> images``.

    Latents here are unscaled: multiply by ``config.scaling_factor`` after
    encoding and divide before decoding.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        latent = config.latent_channels
        args = (config.block_out_channels, config.layers_per_block, config.norm_num_groups)
        self.encoder = Encoder(config.in_channels, 2 * latent, *args)
        self.decoder = Decoder(latent, config.out_channels, *args)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = nn.Conv2d(latent, latent, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Reconstruction through the mode of the posterior, or a sample when given a generator."""
        posterior = self.encode(x)
        z = posterior.mode() if generator is None else posterior.sample(generator)
        return self.decode(z)
