"""Building blocks shared by the U-Net and the VAE.

Attribute names follow diffusers (``conv1``, ``time_emb_proj``, ``to_q``,
``transformer_blocks``, ``ff.net.0.proj`` ...) so a diffusers ``state_dict``
loads without renaming. The math follows diffusers' default code path
(``AttnProcessor2_0``), which is the original CompVis/Stability code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fused_linear import FusedLinear, geglu
from .gemm_attention import BLOCK as GEMM_BLOCK
from .gemm_attention import few_keys_attention, gemm_attention, use_few_keys_attention, use_gemm_attention
from .memory_format import memory_format_of
from .switches import no_grad_wanted
from .upsample_conv import upsample_conv2d, use_upsample_phases
from .winograd import Conv3x3
from .token_merging import bipartite_merge


def timestep_embedding(
    timesteps: Tensor,
    dim: int,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    max_period: int = 10000,
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape [N] -> [N, dim], float32.

    The operation order copies diffusers' ``get_timestep_embedding`` exactly:
    for t ~ 1000 the sine arguments are large, so a different (mathematically
    equal) order would change the result in the 4th decimal.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half - downscale_freq_shift)
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class Timesteps(nn.Module):
    """:func:`timestep_embedding` as a module without parameters (diffusers' ``Timesteps``;
    SDXL's ``add_time_proj`` embeds the size and crop ids with it)."""

    def __init__(self, dim: int, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift

    def forward(self, timesteps: Tensor) -> Tensor:
        return timestep_embedding(timesteps, self.dim, self.flip_sin_to_cos, self.downscale_freq_shift)


def guidance_scale_embedding(w: Tensor, dim: int) -> Tensor:
    """A guidance-distilled U-Net's extra input (LCM, Luo et al. 2023; VDM's embedding):
    the sinusoidal embedding of ``1000 w``, shape [N] -> [N, dim], float32, ``[sin, cos]``.

    The operation order copies diffusers' ``get_guidance_scale_embedding``: ``1000 w``
    reaches the thousands, where an equal but reordered formula moves the 4th decimal.
    """
    if w.ndim != 1:
        raise ValueError(f"guidance scales must be one per row, shape [N], got {tuple(w.shape)}")
    if dim < 2:
        raise ValueError(f"guidance embedding width must be at least 2, got {dim}")
    half = dim // 2
    scale = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -scale).to(w.device)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """MLP from the sinusoidal embedding to the vector added in every resnet.

    ``cond_dim``: a guidance-distilled U-Net's ``cond_proj`` (diffusers'
    ``time_cond_proj_dim``), a bias-free projection of :func:`guidance_scale_embedding`
    added to the sinusoidal embedding before the MLP."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim is not None else None
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            emb = emb + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(emb)))


def repeat_rows(x: Tensor, repeat: int) -> Tensor:
    """``x`` stacked ``repeat`` times along its first dimension, in its memory format."""
    return x if repeat == 1 else torch.cat([x] * repeat)


def norm_silu(norm: nn.Module, x: Tensor) -> Tensor:
    """``silu(norm(x))``, the SiLU in place on the normalised tensor where no gradient is
    wanted and no hook on ``norm`` may hold its output: the same values, one fresh tensor
    fewer. At the VAE's full-resolution level one is 67 MB (128 channels x 512 x 512 in
    bfloat16), over glibc's 32 MB limit for reusing freed memory, so each fresh one is new
    pages of the OS: a SiLU took 48 ms out of place, 19 in place; a 512 px bfloat16 decode
    9.5-9.7 s against 10.0-10.4 s with these and the resnets' adds in place (one thread of an
    AMD EPYC, alternating), the U-Net step unchanged (its tensors are smaller)."""
    h = norm(x)
    return F.silu(h, inplace=no_grad_wanted(h) and not norm._forward_hooks)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between.

    ``temb_channels=None`` gives the VAE's variant (no ``time_emb_proj``). A 1x1
    ``conv_shortcut`` exists only when the channel count changes.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int,
        eps: float,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = Conv3x3(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3x3(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        # conv2's output is fresh: the sum may go into it (h + x is x + h, bit for bit).
        return h.add_(x) if no_grad_wanted(h, x) and not self.conv2._forward_hooks else x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv.

    ``padding=0`` is the VAE encoder's variant: the original code pads only
    right and bottom by one pixel before an unpadded conv (diffusers keeps this
    as ``downsample_padding=0``).
    """

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to ``size``), then a 3x3 conv; to twice the size
    on the CPU, as four 2x2 convolutions of the input where :mod:`.upsample_conv` says."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv3x3(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if x.shape[0] >= 64:
            # upsample_nearest_nhwc fails on large batches (diffusers issue #984).
            x = x.contiguous()
        if (size is None or tuple(size) == (2 * x.shape[2], 2 * x.shape[3])) and use_upsample_phases(self.conv, x):
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head attention on [B, N, C] tokens; cross-attention when given a context.

    With ``upcast=True`` the scores and softmax are computed in float32 for
    half-precision inputs (SD 2.x 768-v overflows in float16 otherwise); it
    changes nothing for float32 inputs.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None = None,
        bias: bool = False,
        upcast: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast
        # Queries per SDPA call (None: all at once); see set_attention_chunk.
        self.chunk: int | None = None
        self.to_q = FusedLinear(query_dim, inner, bias=bias)
        self.to_k = FusedLinear(context_dim, inner, bias=bias)
        self.to_v = FusedLinear(context_dim, inner, bias=bias)
        # Linear + Dropout as in the original models (hence the key ``to_out.0``).
        self.to_out = nn.ModuleList([FusedLinear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        out = self._attend(q, k, v)
        for layer in self.to_out:
            out = layer(out)
        return out

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, n, inner = q.shape
        dtype = q.dtype
        q, k, v = (t.view(b, -1, self.heads, inner // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.upcast and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        out = chunked_sdpa(q, k, v, self.chunk)
        return out.transpose(1, 2).reshape(b, n, inner).to(dtype)


def chunked_sdpa(q: Tensor, k: Tensor, v: Tensor, chunk: int | None) -> Tensor:
    """SDPA over [B, heads, N, d] with at most ``chunk`` queries per call: each query's
    output depends only on its own row of scores, so the result is the unsliced one,
    while a backend that keeps the score matrix (the math kernel) holds ``chunk x M``
    of it instead of ``N x M`` (diffusers' ``SlicedAttnProcessor`` slices the batch
    instead, which does not bound one image's 65536 x 65536 self-attention at 2048 px).
    bfloat16 on a CPU without AMX runs :func:`~ldm.models.gemm_attention.gemm_attention`
    instead, faster there, in blocks of at most ``chunk`` queries of one head, or over
    fewer keys :func:`~ldm.models.gemm_attention.few_keys_attention`."""
    if use_gemm_attention(q, k):
        return gemm_attention(q, k, v, min(chunk or GEMM_BLOCK, GEMM_BLOCK))
    if use_few_keys_attention(q, k):
        return few_keys_attention(q, k, v, chunk)
    if chunk is None or q.shape[2] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat([F.scaled_dot_product_attention(part, k, v) for part in q.split(chunk, dim=2)], dim=2)


def set_attention_chunk(module: nn.Module, chunk: int | None) -> None:
    """Make every attention layer in ``module`` run :func:`chunked_sdpa` with ``chunk``
    queries at a time (None: unsliced)."""
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"attention chunk must be a positive int (queries per call) or None, got {chunk!r}")
    for layer in module.modules():
        if isinstance(layer, Attention):
            layer.chunk = chunk


class AttentionBlock2D(Attention):
    """Single-head self-attention over the pixels of a feature map, with a
    GroupNorm in front and a residual connection (the VAE mid-block attention;
    diffusers' ``Attention(..., norm_num_groups, residual_connection=True)``)."""

    def __init__(self, channels: int, groups: int, eps: float) -> None:
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).view(b, c, h * w).transpose(1, 2)
        out = super().forward(tokens, context)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020, arXiv:2002.05202): one projection to 2x width,
    half of it gates the other half through an exact (erf) GELU."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = FusedLinear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        return geglu(self.proj, x)


class FeedForward(nn.Module):
    """GEGLU -> Dropout -> Linear; ``net`` indices give the keys ``ff.net.0.proj`` and ``ff.net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), FusedLinear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)
        # The fraction of tokens merged around self-attention (ldm.models.token_merging; 0: off).
        self.merge_ratio = 0.0

    def forward(self, x: Tensor, context: Tensor, size: tuple[int, int] | None = None, repeat: int = 1) -> Tensor:
        """``size``: the (height, width) grid of the tokens, which token merging needs.
        ``repeat``: ``x`` is the first 1/repeat of the batch, which the rest repeats
        (:func:`ldm.models.unet.repeated_halves`); the self-attention runs on it once and
        its result is repeated before the context enters."""
        if self.merge_ratio > 0 and size is not None:
            merge, unmerge = bipartite_merge(x, *size, int(x.shape[1] * self.merge_ratio))
            x = x + unmerge(self.attn1(merge(self.norm1(x))))
        else:
            x = x + self.attn1(self.norm1(x))
        x = repeat_rows(x, repeat)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """The original ``SpatialTransformer`` (diffusers' ``Transformer2DModel``):
    GroupNorm, project in, ``depth`` transformer blocks over the H*W tokens,
    project out, residual.

    SD 1.x projects with 1x1 convs, SD 2.x with linears (``linear_projection``);
    the two are the same map, but the conv runs before the flatten and the
    linear after, and the weights are shaped differently.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in: nn.Module = FusedLinear(channels, channels)
            self.proj_out: nn.Module = FusedLinear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, 1)
            self.proj_out = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast_attention)
            for _ in range(depth)
        )

    def forward(self, x: Tensor, context: Tensor, repeat: int = 1) -> Tensor:
        """``repeat``: ``x`` is the first 1/repeat of the batch, which the rest repeats; the
        output is the whole batch's (see :meth:`BasicTransformerBlock.forward`)."""
        b, c, h, w = x.shape
        tokens = self.norm(x)
        if not self.linear_projection:
            tokens = self.proj_in(tokens)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear_projection:
            tokens = self.proj_in(tokens)
        for i, block in enumerate(self.transformer_blocks):
            tokens = block(tokens, context, (h, w), repeat if i == 0 else 1)
        if self.linear_projection:
            tokens = self.proj_out(tokens)
        # Back to x's memory layout: the tokens are already channels_last, and making them
        # NCHW for a channels_last proj_out and residual costs two copies (19.6 -> 8.9 ms for
        # proj_out and the add at SD1.5's first level, 512 px, bfloat16, one EPYC thread).
        tokens = tokens.reshape(b * repeat, h, w, c).permute(0, 3, 1, 2).contiguous(memory_format=memory_format_of(x))
        if not self.linear_projection:
            tokens = self.proj_out(tokens)
        return repeat_rows(x, repeat) + tokens
