"""Token merging for Stable Diffusion (Bolya & Hoffman 2023, "Token Merging for Fast
Stable Diffusion"; the ``tomesd`` package, which the web UI's "Token merging ratio" uses).

Before a transformer block's self-attention at the U-Net's highest resolution, the
``ratio`` of its tokens most similar to another token are averaged into it; attention runs
on the rest, and its output is copied back to every merged token. Self-attention's cost
falls with the square of the tokens left (ratio 0.5: a quarter). The picture changes a
little: an opt-in speed-up, off by default.

As tomesd's defaults: tokens are split into destinations (one per 2x2 cell of the latent
grid, here always its top-left token, so that a seed gives the same picture every time;
tomesd picks it at random) and sources (the rest); each source's most similar destination
by cosine similarity of the block's input; the ``ratio`` of all tokens with the highest
similarity are merged (averaged) into their destinations; only self-attention merges, only
at the first level (tomesd's ``max_downsample=1``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Merge = Callable[[Tensor], Tensor]


def bipartite_merge(x: Tensor, height: int, width: int, r: int) -> tuple[Merge, Merge]:
    """``merge`` ([B, N, C] -> [B, N - r, C]) and ``unmerge`` (back to N tokens) for the
    tokens ``x`` of a ``height`` x ``width`` grid, merging ``r`` of them by similarity."""
    b, n, _ = x.shape
    if n != height * width:
        raise ValueError(f"token merging: {n} tokens are not a {height}x{width} grid")
    dst_mask = torch.zeros(height, width, dtype=torch.bool, device=x.device)
    dst_mask[: height - height % 2: 2, : width - width % 2: 2] = True  # one per whole 2x2 cell
    order = torch.argsort((~dst_mask).flatten().to(torch.int8), stable=True)  # destinations first
    num_dst = int(dst_mask.sum())
    r = min(r, n - num_dst)
    if r <= 0:
        return _same, _same
    dst_pos, src_pos = order[:num_dst], order[num_dst:]

    metric = x / x.norm(dim=-1, keepdim=True)
    scores = metric[:, src_pos] @ metric[:, dst_pos].transpose(-1, -2)  # [B, sources, destinations]
    best, best_dst = scores.max(dim=-1)
    ranked = best.argsort(dim=-1, descending=True)
    kept, merged = ranked[:, r:], ranked[:, :r]  # indices among the sources
    into = best_dst.gather(1, merged)  # each merged source's destination
    kept_pos, merged_pos = src_pos[kept], src_pos[merged]  # [B, ...] token positions

    def merge(t: Tensor) -> Tensor:
        c = t.shape[-1]
        dst = t[:, dst_pos].float()
        src = t.gather(1, merged_pos[..., None].expand(-1, -1, c)).float()
        dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), src, reduce="mean", include_self=True)
        return torch.cat([t.gather(1, kept_pos[..., None].expand(-1, -1, c)), dst.to(t.dtype)], dim=1)

    def unmerge(t: Tensor) -> Tensor:
        c = t.shape[-1]
        kept_t, dst = t[:, : kept.shape[1]], t[:, kept.shape[1]:]
        out = t.new_empty(b, n, c)
        out[:, dst_pos] = dst
        out.scatter_(1, kept_pos[..., None].expand(-1, -1, c), kept_t)
        out.scatter_(1, merged_pos[..., None].expand(-1, -1, c), dst.gather(1, into[..., None].expand(-1, -1, c)))
        return out

    return merge, unmerge


def _same(t: Tensor) -> Tensor:
    return t


def set_token_merging(unet: torch.nn.Module, ratio: float) -> None:
    """Merge ``ratio`` of the tokens in the self-attention of ``unet``'s first level (the
    highest resolution, where attention costs most); 0 turns it off."""
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise ValueError(f"token merging ratio must be a number in [0, 1), got {ratio!r}")
    first_level = [unet.down_blocks[0], unet.up_blocks[-1]]
    for block in (m for level in first_level for m in level.modules() if hasattr(m, "merge_ratio")):
        block.merge_ratio = float(ratio)
