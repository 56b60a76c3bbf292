"""ControlNet (Zhang et al. 2023, arXiv:2302.05543), built from a ControlNetConfig.

A trained copy of the U-Net's input half (:class:`~ldm.models.unet.UNetEncoder`: the
same blocks, built the same way) whose first features also receive the embedded hint
image, plus a 1x1 "zero conv" on every skip and on the mid block's output. Module
names equal diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks.N``, ``controlnet_mid_block``), so its ``state_dict`` keys
and shapes match one to one.

The outputs are the zero convs' outputs, unscaled: diffusers multiplies them by
``conditioning_scale`` inside the model; in ldm the caller scales them
(:meth:`ControlResiduals.scaled`), per ControlNet and per batch row, and sums several
ControlNets' (``+``) before handing them to ``UNet.forward(down_residuals=, mid_residual=)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ControlNetConfig
from .unet import UNetEncoder, repeated_halves


@dataclass(frozen=True)
class ControlResiduals:
    """What a ControlNet adds to the U-Net: one tensor per skip (``down``, in the U-Net's
    skip order) and one after the mid block (``mid``)."""

    down: tuple[Tensor, ...]
    mid: Tensor

    def scaled(self, scale: float | Tensor, *, guess_mode: bool = False) -> "ControlResiduals":
        """The residuals times ``scale`` (a number, or one per batch row: shape [B]).

        ``guess_mode``: also times diffusers' per-block ramp ``logspace(-1, 0, n + 1)``
        (0.1 for the first skip up to 1.0 for the mid block), which lets the hint speak
        louder than a weak prompt. diffusers skips the ramp for a ControlNet with
        ``global_pool_conditions``; pass ``guess_mode=False`` for one.
        """
        if isinstance(scale, Tensor):
            if scale.ndim != 1 or scale.shape[0] != self.mid.shape[0]:
                raise ValueError(f"a per-row scale must have shape ({self.mid.shape[0]},), got {tuple(scale.shape)}")
            scale = scale.to(self.mid.device, self.mid.dtype)[:, None, None, None]
        elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a number or a tensor, got {type(scale).__name__}")
        n = len(self.down)
        ramp = torch.logspace(-1, 0, n + 1, device=self.mid.device).tolist() if guess_mode else [1.0] * (n + 1)
        down = tuple(r * (scale * w) for r, w in zip(self.down, ramp))
        return ControlResiduals(down, self.mid * (scale * ramp[-1]))

    def __add__(self, other: "ControlResiduals") -> "ControlResiduals":
        """Several ControlNets' residuals summed (diffusers' MultiControlNetModel)."""
        if not isinstance(other, ControlResiduals):
            return NotImplemented
        if len(other.down) != len(self.down):
            raise ValueError(f"cannot add residuals of {len(other.down)} skips to residuals of {len(self.down)}")
        return ControlResiduals(tuple(a + b for a, b in zip(self.down, other.down)), self.mid + other.mid)


class ControlNetConditioningEmbedding(nn.Module):
    """The hint encoder (the original ``input_hint_block``): a 3x3 conv to the first width,
    then per further width a 3x3 conv and a stride-2 3x3 conv to it, SiLU after each, and
    a zero-initialised 3x3 conv to the U-Net's first width."""

    def __init__(self, out_channels: int, conditioning_channels: int, block_out_channels: tuple[int, ...]) -> None:
        super().__init__()
        widths = block_out_channels
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths, widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, hint: Tensor) -> Tensor:
        x = F.silu(self.conv_in(hint))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


def _zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 conv; the paper initialises it to zero so training starts from the plain U-Net
    (the weights loaded over it set it)."""
    return nn.Conv2d(channels, channels, 1)


class ControlNetModel(UNetEncoder):
    """``controlnet(sample, timestep, context, hint) -> ControlResiduals``."""

    def __init__(self, config: ControlNetConfig) -> None:
        if not isinstance(config, ControlNetConfig):
            raise TypeError(f"config must be a ControlNetConfig, got {type(config).__name__}")
        super().__init__(config.unet)
        self.config = config
        channels = config.unet.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        # One zero conv per skip the U-Net keeps: conv_in's output, each resnet's, each downsampler's.
        widths = [channels[0]]
        for level, c in enumerate(channels):
            downsampler = 1 if level < len(channels) - 1 else 0
            widths += [c] * (config.unet.layers_per_block + downsampler)
        self.controlnet_down_blocks = nn.ModuleList(_zero_conv(c) for c in widths)
        self.controlnet_mid_block = _zero_conv(channels[-1])

    def check_hint(self, sample: Tensor, hint: Tensor) -> None:
        """ValueError unless ``hint`` is [B or 1, conditioning_channels, H * f, W * f] for a
        ``sample`` [B, C, H, W], f the config's :attr:`~ldm.config.ControlNetConfig.hint_factor`."""
        if not isinstance(hint, Tensor):
            raise TypeError(f"hint must be a tensor, got {type(hint).__name__}")
        b, _, h, w = sample.shape
        f = self.config.hint_factor
        want = (self.config.conditioning_channels, h * f, w * f)
        if hint.ndim != 4 or hint.shape[0] not in (1, b) or tuple(hint.shape[1:]) != want:
            raise ValueError(
                f"hint must have shape ({b} or 1, {want[0]}, {want[1]}, {want[2]}): the conditioning image at "
                f"pixel size ({f} x the latents' {h}x{w}), got {tuple(hint.shape)}")

    def forward(self, sample: Tensor, timestep: Tensor | float | int, encoder_hidden_states: Tensor,
                hint: Tensor) -> ControlResiduals:
        """The residuals for the U-Net run on ``sample`` [B, C, H, W] at ``timestep`` with
        context ``encoder_hidden_states`` [B, L, D], given ``hint`` (see :meth:`check_hint`;
        the pipelines pass the conditioning image in [0, 1]). Unscaled, see the module doc."""
        if sample.ndim != 4:
            raise ValueError(f"sample must be [B, C, H, W], got shape {tuple(sample.shape)}")
        self.check_hint(sample, hint)
        context = encoder_hidden_states
        temb = self.embed(sample, timestep)
        hint = hint.to(sample.device, sample.dtype)
        repeat = 2 if repeated_halves(sample, temb, hint) else 1
        half = len(sample) // repeat  # a hint of one row broadcasts: hint[:half] is all of it
        x = self.conv_in(sample[:half]) + self.controlnet_cond_embedding(hint[:half])
        x, skips = self.encode(x, temb, context, repeat)
        x = self.mid_block(x, temb, context)
        down = tuple(conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips))
        mid = self.controlnet_mid_block(x)
        if self.config.global_pool_conditions:
            # The shuffle ControlNet: its hint carries no layout, only colours and textures.
            down = tuple(r.mean(dim=(2, 3), keepdim=True) for r in down)
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return ControlResiduals(down, mid)
