"""The cross-attention U-Net of Stable Diffusion 1.x/2.x and SDXL, built from a UNetConfig.

Module names equal diffusers' ``UNet2DConditionModel`` for the same config, so
its ``state_dict`` keys and shapes match one to one. The down/mid/up blocks are
generic (optional attention after each resnet) and are reused by the VAE.
SDXL adds a transformer depth per level and the ``text_time`` embedding: the
pooled text embedding and the sinusoidal embeddings of the size / crop (or
aesthetic score) ids, through an MLP, added to the timestep embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from ..config import UNetConfig
from .feature_cache import FeatureCache
from .layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Timesteps,
    Transformer2D,
    Upsample2D,
    norm_silu,
    repeat_rows,
    timestep_embedding,
)
from .switches import Switch, no_grad_wanted

# Builds the attention module that follows a resnet, given its channel count.
# It is called as ``attention(x, context)``.
AttentionFactory = Callable[[int], nn.Module]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


SHARED_FIRST_LAYERS = Switch("shared first layers")


def set_shared_first_layers(mode: str) -> str:
    """``"auto"`` / ``"on"`` (default; the same) or ``"off"`` (every layer on the whole
    batch) for :func:`repeated_halves`; returns the mode it replaces."""
    return SHARED_FIRST_LAYERS.set(mode)


def repeated_halves(sample: Tensor, *inputs: Tensor) -> bool:
    """Whether the batch's second half repeats its first exactly, in ``sample`` (the
    U-Net's input) and in each of ``inputs`` (the vector its resnets take, a ControlNet's
    hint; one row broadcast to the batch counts as repeating): classifier-free guidance's
    batch, the same latents at the same timestep for the unconditional and the conditional
    prediction. Everything before the text context first enters (``conv_in``, the first
    resnet, the first transformer's self-attention) is then the same for both halves, so
    it runs on one. SDXL's added embedding carries the pooled text, so its halves differ
    and it runs whole. Not where gradients are wanted: the inputs' second halves would get
    none (the parameters' would be the same). Nor inside ``torch.compile``: the check reads
    the data, which would split the compiled U-Net into three graphs with a device sync
    between them on every call, where CUDA graphs want one."""
    if not SHARED_FIRST_LAYERS.allows() or len(sample) < 2 or len(sample) % 2 or not no_grad_wanted(sample, *inputs):
        return False
    half = len(sample) // 2
    return torch.equal(sample[:half], sample[half:]) and all(
        len(t) == 1 or torch.equal(t[:half], t[half:]) for t in inputs)


def _attentions(factory: AttentionFactory | None, channels: int, n: int) -> nn.ModuleList | None:
    return nn.ModuleList(factory(channels) for _ in range(n)) if factory is not None else None


class DownBlock2D(nn.Module):
    """``num_layers`` resnets, each optionally followed by an attention module,
    then an optional stride-2 downsampler.

    Covers diffusers' ``DownBlock2D`` and ``CrossAttnDownBlock2D`` (U-Net) and
    ``DownEncoderBlock2D`` (VAE: no timestep, ``downsample_padding=0``).
    Returns the output and every intermediate output (the U-Net's skips).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        add_downsample: bool,
        downsample_padding: int = 1,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(num_layers)
        )
        self.attentions = _attentions(attention, out_channels, num_layers)
        self.downsamplers = (
            nn.ModuleList([Downsample2D(out_channels, downsample_padding)]) if add_downsample else None
        )

    def forward(
        self, x: Tensor, temb: Tensor | None = None, context: Tensor | None = None, repeat: int = 1
    ) -> tuple[Tensor, list[Tensor]]:
        """``repeat``: ``x`` is the first 1/repeat of the batch (``temb`` the whole batch's),
        which the rest repeats: the first resnet, and the first attention until the context
        enters, run on it once (:func:`repeated_halves`); the outputs are the whole batch's."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            once = repeat if i == 0 else 1
            x = resnet(x, temb if once == 1 else temb[: len(x)])
            if self.attentions is not None:
                x = self.attentions[i](x, context, repeat=once)
            else:
                x = repeat_rows(x, once)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock2D(nn.Module):
    """Resnets (each optionally followed by attention), then an optional upsampler.

    ``in_channels[i]`` is the input width of resnet ``i``, skip included. Given
    ``skips``, resnet ``i`` first concatenates the last unused skip (diffusers'
    ``UpBlock2D`` / ``CrossAttnUpBlock2D``); without, it is the VAE's
    ``UpDecoderBlock2D``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        add_upsample: bool,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, out_channels, temb_channels, groups, eps) for c in in_channels
        )
        self.attentions = _attentions(attention, out_channels, len(in_channels))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(
        self,
        x: Tensor,
        temb: Tensor | None = None,
        context: Tensor | None = None,
        skips: Sequence[Tensor] | None = None,
        upsample_size: tuple[int, int] | None = None,
        *,
        first: int = 0,
        stop: int | None = None,
    ) -> Tensor:
        """``first`` / ``stop``: run only resnets ``first .. stop - 1`` (and the upsampler
        when the last one runs); resnet ``i`` takes ``skips[len(resnets) - 1 - i]``, so a
        run from ``first`` needs only the first ``len(resnets) - first`` skips."""
        n = len(self.resnets)
        stop = n if stop is None else stop
        for i in range(first, stop):
            if skips is not None:
                x = torch.cat([x, skips[n - 1 - i]], dim=1)
            x = self.resnets[i](x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None and stop == n:
            x = self.upsamplers[0](x, upsample_size)
        return x


class MidBlock2D(nn.Module):
    """resnet, then ``num_layers`` x (attention, resnet) at constant width.

    diffusers' ``UNetMidBlock2DCrossAttn`` (U-Net) and ``UNetMidBlock2D`` (VAE).
    """

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int | None,
        groups: int,
        eps: float,
        attention: AttentionFactory,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps) for _ in range(num_layers + 1)
        )
        self.attentions = _attentions(attention, channels, num_layers)

    def forward(self, x: Tensor, temb: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


def check_residuals(skips: Sequence[Tensor], mid: Tensor, down_residuals: Sequence[Tensor] | None,
                    mid_residual: Tensor | None) -> None:
    """ValueError (TypeError for a non-tensor) unless a ControlNet's residuals fit a U-Net
    run whose skips and mid-block input are ``skips`` and ``mid``: both given, one per
    skip, each of its target's shape, or of that shape averaged to 1x1 (a ControlNet with
    ``global_pool_conditions``)."""
    if down_residuals is None or mid_residual is None:
        given = "down_residuals" if mid_residual is None else "mid_residual"
        raise ValueError(f"down_residuals and mid_residual are a ControlNet's outputs and go together; "
                         f"got only {given}")
    if isinstance(down_residuals, Tensor) or not isinstance(down_residuals, Sequence):
        raise TypeError(f"down_residuals must be a sequence of tensors, got {type(down_residuals).__name__}")
    if len(down_residuals) != len(skips):
        raise ValueError(f"{len(down_residuals)} down_residuals for a U-Net with {len(skips)} skips "
                         "(conv_in, every down-block resnet and downsampler); the ControlNet does not fit it")
    targets = [(f"down_residuals[{i}]", r, s) for i, (r, s) in enumerate(zip(down_residuals, skips))]
    for name, residual, target in targets + [("mid_residual", mid_residual, mid)]:
        if not isinstance(residual, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(residual).__name__}")
        shape, want = tuple(residual.shape), tuple(target.shape)
        if shape != want and shape != want[:2] + (1, 1):
            raise ValueError(f"{name} has shape {shape}, the U-Net's features there have {want} "
                             f"(or {want[:2] + (1, 1)} pooled); the ControlNet or its batch does not fit")


class UNetEncoder(nn.Module):
    """The U-Net's input half: ``conv_in``, the timestep embedding (and SDXL's added one),
    the down blocks and the mid block, under diffusers' names. :class:`UNet` adds the up
    path; a ControlNet (:mod:`ldm.models.controlnet`) is a trained copy of this half.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        for kind in config.down_block_types:
            if kind not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unknown down block type {kind!r}; valid: {DOWN_BLOCK_TYPES}")
        self.unet_config = config
        channels = config.block_out_channels
        levels = len(channels)
        temb = channels[0] * 4
        common = self._block_options()

        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, config.time_cond_proj_dim)
        if config.addition_embed_type == "text_time":
            self.add_time_proj = Timesteps(config.addition_time_embed_dim, config.flip_sin_to_cos, config.freq_shift)
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb)
        else:
            self.add_time_proj = self.add_embedding = None

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(config.down_block_types):
            self.down_blocks.append(
                DownBlock2D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    config.layers_per_block,
                    add_downsample=i < levels - 1,
                    attention=self._transformer(i, kind.startswith("CrossAttn")),
                    **common,
                )
            )

        self.mid_block = MidBlock2D(
            channels[-1],
            attention=self._transformer(levels - 1, True),
            **common,
        )

    def _block_options(self) -> dict:
        """The keyword arguments every U-Net block takes: timestep width, norm groups and eps."""
        c = self.unet_config
        return dict(temb_channels=c.block_out_channels[0] * 4, groups=c.norm_num_groups, eps=c.norm_eps)

    def _transformer(self, level: int, enabled: bool) -> AttentionFactory | None:
        """The attention modules of down level ``level`` (the mid block: the last level's;
        up block ``i``: those of the level it mirrors, ``levels - 1 - i``, as diffusers
        reverses heads and depths for the up path)."""
        if not enabled:
            return None
        c = self.unet_config
        return partial(
            Transformer2D,
            heads=c.num_attention_heads[level],
            context_dim=c.cross_attention_dim,
            depth=c.depth(level),
            groups=c.norm_num_groups,
            linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def time_embed(
        self, timestep: Tensor | float | int, batch: int, device: torch.device, dtype: torch.dtype,
        timestep_cond: Tensor | None = None,
    ) -> Tensor:
        """The timestep vector fed to every resnet, shape [batch, 4 * block_out_channels[0]];
        a guidance-distilled U-Net also takes ``timestep_cond`` (see :meth:`check_timestep_cond`)."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim == 0:
            t = t[None]
        t = t.expand(batch)
        c = self.unet_config
        self.check_timestep_cond(timestep_cond, batch)
        emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        cond = timestep_cond.to(dtype) if timestep_cond is not None else None
        return self.time_embedding(emb.to(dtype), cond)

    def check_timestep_cond(self, timestep_cond: Tensor | None, batch: int) -> None:
        """A guidance-distilled U-Net (``time_cond_proj_dim``) needs the guidance scale's
        embedding (``ldm.models.layers.guidance_scale_embedding``) for every row, and others
        take none: left out, the model would run at a guidance scale nobody chose."""
        width = self.unet_config.time_cond_proj_dim
        if width is None:
            if timestep_cond is not None:
                raise ValueError("timestep_cond is a guidance-distilled U-Net's guidance embedding; this U-Net "
                                 "has none (time_cond_proj_dim is None)")
            return
        if timestep_cond is None:
            raise ValueError(f"this U-Net is guidance-distilled (time_cond_proj_dim {width}): it needs "
                             "timestep_cond, the embedding of its guidance scale, for every row")
        if not isinstance(timestep_cond, Tensor) or tuple(timestep_cond.shape) != (batch, width):
            shape = tuple(timestep_cond.shape) if isinstance(timestep_cond, Tensor) else type(timestep_cond).__name__
            raise ValueError(f"timestep_cond must have shape ({batch}, {width}), got {shape}")

    def text_time_embed(self, text_embeds: Tensor | None, time_ids: Tensor | None, batch: int,
                        dtype: torch.dtype) -> Tensor | None:
        """SDXL's extra embedding (diffusers' ``addition_embed_type="text_time"``), added to
        the timestep vector: ``text_embeds`` [batch, pooled] and the sinusoidal embeddings of
        ``time_ids`` [batch, n] side by side, through ``add_embedding``. None for a U-Net
        without it (SD1/SD2), which takes neither input."""
        if self.add_embedding is None:
            if text_embeds is not None or time_ids is not None:
                raise ValueError("text_embeds and time_ids are SDXL's added conditioning; this U-Net has no "
                                 "text_time embedding (addition_embed_type is None), so pass neither")
            return None
        for name, value in (("text_embeds", text_embeds), ("time_ids", time_ids)):
            if value is None:
                raise ValueError(f"this U-Net (addition_embed_type 'text_time', SDXL) needs {name}: "
                                 "text_embeds (batch, pooled width) and time_ids (batch, 6 or 5 ids)")
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
            if value.ndim != 2 or value.shape[0] != batch:
                raise ValueError(f"{name} must have shape ({batch}, n) for a batch of {batch} samples, "
                                 f"got {tuple(value.shape)}")
        inputs = self.add_embedding.linear_1.in_features
        width = self.add_time_proj.dim
        if text_embeds.shape[1] + time_ids.shape[1] * width != inputs:
            raise ValueError(
                f"text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time_ids x {width} != "
                f"{inputs}, the width add_embedding takes (pooled width + 6 size ids, or 5 for the refiner, "
                f"x addition_time_embed_dim {width})")
        time_embeds = self.add_time_proj(time_ids.flatten().to(text_embeds.device)).reshape(batch, -1)
        # torch.cat promotes to the wider dtype before the cast, as diffusers' concat does.
        return self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(dtype))

    def embed(self, sample: Tensor, timestep: Tensor | float | int, text_embeds: Tensor | None = None,
              time_ids: Tensor | None = None, timestep_cond: Tensor | None = None) -> Tensor:
        """The vector every resnet takes: the timestep's embedding (with a guidance-distilled
        U-Net's guidance embedding), plus SDXL's added one."""
        added = self.text_time_embed(text_embeds, time_ids, sample.shape[0], sample.dtype)
        temb = self.time_embed(timestep, sample.shape[0], sample.device, sample.dtype, timestep_cond)
        return temb if added is None else temb + added

    def encode(self, x: Tensor, temb: Tensor, context: Tensor, repeat: int = 1) -> tuple[Tensor, list[Tensor]]:
        """Run the down blocks on ``x`` (``conv_in``'s output); return the lowest-resolution
        features and the skips: ``x`` itself, then every resnet's and downsampler's output.
        ``repeat``: ``x`` is the first 1/repeat of the batch, which the rest repeats
        (:func:`repeated_halves`); the outputs are the whole batch's."""
        skips = [repeat_rows(x, repeat)]
        for i, block in enumerate(self.down_blocks):
            x, block_skips = block(x, temb, context, repeat=repeat if i == 0 else 1)
            skips.extend(block_skips)
        return x, skips


class UNet(UNetEncoder):
    """eps/v-predicting U-Net: ``unet(sample, timestep, context) -> Tensor``."""

    def __init__(self, config: UNetConfig) -> None:
        for kind in config.up_block_types:
            if kind not in UP_BLOCK_TYPES:
                raise ValueError(f"unknown up block type {kind!r}; valid: {UP_BLOCK_TYPES}")
        super().__init__(config)
        channels = config.block_out_channels
        levels = len(channels)
        common = self._block_options()

        # Up block i mirrors level L-1-i. It consumes that level's resnet outputs
        # plus the skip entering the level (the previous level's downsampler
        # output, or conv_in's output for the last block); so its last resnet
        # takes a skip of the next-shallower width.
        rev = channels[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(config.up_block_types):
            prev, out, shallower = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, levels - 1)]
            n = config.layers_per_block + 1
            in_channels = [(prev if j == 0 else out) + (shallower if j == n - 1 else out) for j in range(n)]
            self.up_blocks.append(
                UpBlock2D(
                    in_channels,
                    out,
                    add_upsample=i < levels - 1,
                    attention=self._transformer(levels - 1 - i, kind.startswith("CrossAttn")),
                    **common,
                )
            )

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    @property
    def config(self) -> UNetConfig:
        return self.unet_config

    def forward(
        self,
        sample: Tensor,
        timestep: Tensor | float | int,
        encoder_hidden_states: Tensor,
        *,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
        down_residuals: Sequence[Tensor] | None = None,
        mid_residual: Tensor | None = None,
        timestep_cond: Tensor | None = None,
        cache: FeatureCache | None = None,
    ) -> Tensor:
        """Predict noise (or v) for ``sample`` [B, C, H, W] at ``timestep`` ([B] or scalar),
        conditioned on ``encoder_hidden_states`` [B, L, D] (any L); an SDXL U-Net also on
        ``text_embeds`` [B, pooled] and ``time_ids`` [B, 6 or 5] (see :meth:`text_time_embed`);
        a guidance-distilled U-Net also on ``timestep_cond`` [B, time_cond_proj_dim], its
        guidance scale's embedding (see :meth:`check_timestep_cond`).

        ``down_residuals`` (one per skip, in order) and ``mid_residual``: a ControlNet's
        outputs, added to the skips and to the mid block's output, as diffusers'
        ``down_block_additional_residuals`` / ``mid_block_additional_residual``; both or neither.

        ``cache``: a :class:`~ldm.models.feature_cache.FeatureCache` (DeepCache): a full
        pass keeps the deep feature in it, and the evaluations it says to reuse run only
        the shallow branch on that feature.
        """
        context = encoder_hidden_states
        temb = self.embed(sample, timestep, text_embeds, time_ids, timestep_cond)
        if cache is not None:
            cache.check_fits(self.unet_config.layers_per_block)
            if cache.reuse(sample):
                return self._shallow(sample, temb, context, cache, down_residuals)
        repeat = 2 if repeated_halves(sample, temb) else 1
        x, skips = self.encode(self.conv_in(sample[: len(sample) // repeat]), temb, context, repeat)
        if down_residuals is not None or mid_residual is not None:
            check_residuals(skips, x, down_residuals, mid_residual)
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        x = self.mid_block(x, temb, context)
        if mid_residual is not None:
            x = x + mid_residual

        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size rather than 2x, so H and W need not be
            # multiples of 2**(levels-1) (diffusers' forward_upsample_size).
            size = tuple(skips[-1].shape[-2:]) if skips else None
            if cache is not None and block is self.up_blocks[-1]:
                first = n - 1 - cache.branch
                x = block(x, temb, context, skips=block_skips, stop=first)
                cache.keep(x)
                x = block(x, temb, context, skips=block_skips, first=first)
            else:
                x = block(x, temb, context, skips=block_skips, upsample_size=size)
        return self.out(x)

    def out(self, x: Tensor) -> Tensor:
        return self.conv_out(norm_silu(self.conv_norm_out, x))

    def _shallow(self, sample: Tensor, temb: Tensor, context: Tensor, cache: FeatureCache,
                 down_residuals: Sequence[Tensor] | None) -> Tensor:
        """The shallow branch on the kept deep feature: skips ``s_0 .. s_branch`` from
        ``conv_in`` and the first down block's first resnets, then the last up block
        from the resnet that takes ``s_branch`` (a ControlNet's residuals for those
        skips added, as in a full pass)."""
        down = self.down_blocks[0]
        x = self.conv_in(sample)
        skips = [x]
        for i in range(cache.branch):
            x = down.resnets[i](x, temb)
            if down.attentions is not None:
                x = down.attentions[i](x, context)
            skips.append(x)
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        last = self.up_blocks[-1]
        x = last(cache.feature, temb, context, skips=skips, first=len(last.resnets) - 1 - cache.branch)
        return self.out(x)
