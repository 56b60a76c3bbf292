"""Attention as two GEMMs per head and block of queries, for bfloat16 on CPUs that compute
it natively without AMX tiles.

torch's CPU flash-attention kernel (what SDPA runs there) computes bfloat16 at about
float32's speed on such a CPU. On an AMD EPYC with AVX512-BF16 (one thread), 8 heads of 40
channels over 4,096 tokens (SD1.5's first level at 512 px, batch 2) took 0.65 s, about 65
GFLOP/s, where a bfloat16 GEMM runs at 188. Here each head's scores for a block of 256
queries (2 MiB at 4,096 keys) are one oneDNN GEMM and the output ``V^T P^T`` a second (40
rows by 256 columns: 181 GFLOP/s in that order, 125 as ``P V``).

The exponentials are oneDNN's too, applied to each block of scores inside the first GEMM:
``sigmoid(y) = exp(y) / (1 + exp(y))`` is ``exp(y)`` to within ``exp(y)`` relative, so with
each query's scores shifted (the GEMM's bias) below ``-``:data:`SIGMOID_MARGIN` by an upper
bound of them (:func:`exp_shift`), its post-op is the unnormalised softmax. A row of ones
under the transposed values makes the second GEMM's last row each query's sum, which
divides the other 40 (softmax is unchanged by a shift per row). A block whose bound
overshot its largest score by so much that its probabilities underflow
(:data:`MIN_PROBABILITY`) is computed again with torch's softmax. Per block of 256 queries
over 4,096 keys: scores 0.42 ms + softmax 0.62 ms + output 0.46 ms before, scores with exp
0.80 ms + output 0.47 ms now (torch's softmax is bound by its exp, 0.49 ms of it). The
whole call took 0.43-0.49 s with torch's softmax (1.7x faster than flash at the second
level, 1,024 tokens of 80 channels, and 1.9x on the VAE's mid-block, one head of 512);
0.39-0.43 s now (in the U-Net, the first level's five calls 2.29 s a step against 2.43 s,
the two versions alternating; the mid-block's, where exp is a small part, unchanged).

The scores are rounded to bfloat16 only as probabilities (flash keeps both in float32;
torch's softmax here read bfloat16 scores). Alone, the call's relative error against
float64 for the shape above is 3.7e-3 (4.9e-3 with softmax, 2.3e-3 flash's), and in the
whole U-Net, where every activation is bfloat16, it does not show: on the full SD1.5
architecture, one step at 512 px, the output's distance to float32 was 1.722% relative
against 1.731% with torch's softmax and 1.705% with flash (1.40% against flash's 1.38% in
``scripts/bench.py``'s run, other inputs).

Beyond its inputs and output it holds copies of the keys and (transposed) values, one
head's keys and queries in float32 for its bound, and one block's probabilities (256 x keys
values, 32 MiB at 2048 px, 65,536 tokens; twice that in a block computed again),
never the whole score matrix, so the memory plan's fused-attention estimate holds
(:mod:`ldm.limits`).

Used where (:func:`use_gemm_attention`): a CPU tensor in bfloat16, at least
:data:`MIN_KEYS` keys, on a CPU whose flags (/proc/cpuinfo) say AVX512-BF16 and no AMX.
With fewer keys (cross-attention over a prompt's 77 tokens, self-attention at SD1.5's
16x16 and 8x8 levels) the block's GEMM with exponentials does not pay for the bound and
the transposes; those run as :func:`few_keys_attention`, two batched GEMMs around a float32
softmax, on the same CPUs. With AMX, flash's bfloat16 tiles are expected to win (not
measured), and where the flags are unknown SDPA is kept. :func:`set_gemm_attention` turns
both off or on for comparisons (``scripts/bench.py``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cpuinfo import cpu_flags
from .fused_linear import fusable_dtypes
from .switches import Switch

BLOCK = 256  # queries per GEMM: a block's scores over 4,096 keys fit a 2 MiB cache
MIN_KEYS = 1024
FEW_KEYS_SCORES = 1 << 21  # scores per block of few_keys_attention: 8 MiB in float32
# sigmoid(y) = exp(y) / (1 + exp(y)) is exp(y) to within exp(y) relative, so with every
# shifted score at most -margin the probabilities are exp's to within exp(-margin):
# 4.5e-5 in bfloat16 (whose rounding is 2e-3), 2e-9 in float32.
SIGMOID_MARGIN = {torch.bfloat16: 10.0, torch.float32: 20.0}
# Below exp(-87.3) (float32's and bfloat16's smallest normal number) probabilities lose
# precision and then vanish; a block in which some query's probabilities sum to under
# keys x exp(-76) (its bound overshot its largest score by ~60) is computed again by softmax.
MIN_PROBABILITY = math.exp(-76.0)
SWITCH = Switch("GEMM attention")


def set_gemm_attention(mode: str) -> str:
    """``"auto"`` (default: where :func:`use_gemm_attention`'s CPU test says), ``"on"``
    (every bfloat16 CPU attention over enough keys) or ``"off"`` (always SDPA); returns
    the mode it replaces."""
    return SWITCH.set(mode)


def cpu_suits_gemm_attention() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16) without AMX tiles."""
    flags = cpu_flags()
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def use_gemm_attention(q: Tensor, k: Tensor) -> bool:
    """Whether attention of ``q`` over the keys ``k`` ([B, heads, N, d]) runs here
    (:func:`gemm_attention`): bfloat16 on the CPU (see :func:`cpu_suits_gemm_attention`)
    over at least :data:`MIN_KEYS` keys."""
    return k.shape[-2] >= MIN_KEYS and _suits(q)


def use_few_keys_attention(q: Tensor, k: Tensor) -> bool:
    """Whether attention of ``q`` over the keys ``k`` runs as :func:`few_keys_attention`:
    where :func:`use_gemm_attention` would but for having fewer than :data:`MIN_KEYS` keys."""
    return k.shape[-2] < MIN_KEYS and _suits(q)


def _suits(q: Tensor) -> bool:
    # Inside torch.compile (not allowed) the compiled U-Net runs SDPA, as diffusers'.
    if not SWITCH.allows() or q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    return SWITCH.mode == "on" or cpu_suits_gemm_attention()


def few_keys_attention(q: Tensor, k: Tensor, v: Tensor, block: int | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] (keys and values [B, heads, M, d])
    for few keys (a prompt's 77 tokens, a 16x16 map's 256): every head's scores for a block
    of queries are one batched GEMM, their softmax is computed in float32 (torch's
    bfloat16 softmax over rows this short took twice as long), and a second GEMM weighs the
    values. The scale goes on the keys, the fewer. A block holds at most
    :data:`FEW_KEYS_SCORES` scores (and ``block`` queries where given), so memory stays
    bounded at any size; the output is a [B, heads, N, d] view of [B, N, heads, d], the
    layout the attention's output projection reads.

    torch's CPU flash kernel spends most of its time outside the GEMMs here: at SD1.5's 512 px
    (bfloat16, batch 2, one EPYC thread), cross-attention over 4,096 queries of 40
    channels took 14-15 ms against 22 ms, over 1,024 of 80 4.0-4.4 against 7.6-8.4, over
    256 of 160 1.6 against 3.4, and self-attention over 16x16 5.5 against 8.6. The scores are
    rounded to bfloat16 before their softmax, as in :func:`gemm_attention`: relative error
    4.2e-3 against float64 where flash's is 2.1e-3."""
    b, h, n, d = q.shape
    m = k.shape[2]
    keys_t = (k * d**-0.5).transpose(-1, -2)  # [B, heads, d, M]
    rows = max(1, FEW_KEYS_SCORES // (b * h * m))
    rows = min(rows, block) if block else rows
    tokens = q.new_empty(b, n, h, d)
    for start in range(0, n, rows):
        probs = torch.matmul(q[:, :, start:start + rows], keys_t).float().softmax(-1).to(q.dtype)
        tokens[:, start:start + rows] = torch.matmul(probs, v).transpose(1, 2)
    return tokens.transpose(1, 2)


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, block: int = BLOCK) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] (keys and values [B, heads, M, d]),
    ``block`` queries of one head at a time; the output is a [B, heads, N, d] view."""
    b, h, n, d = q.shape
    m = k.shape[2]
    # Contiguous, whatever the batch: at batch 1 the reshape would be a view whose rows are
    # the heads' interleaved channels, and oneDNN's GEMM with such a strided second operand
    # ran 700x slower (1.2 s a block of 256 queries over 4,096 keys). Scaled as it is copied.
    queries = torch.mul(q, d**-0.5, out=q.new_empty(b, h, n, d)).view(b * h, n, d)
    keys = k.reshape(b * h, m, d).contiguous()
    # The values transposed, and under them a row of ones: the second GEMM's last row is
    # then each query's sum of (unnormalised) probabilities.
    values_t = q.new_empty(b * h, d + 1, m)
    values_t[:, :d] = v.reshape(b * h, m, d).transpose(1, 2)
    values_t[:, d] = 1
    fusable = q.dtype in fusable_dtypes()
    floor = m * MIN_PROBABILITY
    # The output as [B, N, heads, d], the layout the attention's output projection reads
    # (one head's [d, block] is a transposed view of it): a [B, heads, d, N] buffer made
    # that input through a transposing copy, 8 of to_out's 16 ms at 512 px's first level.
    tokens = q.new_empty(b, n, h, d)
    out_t = tokens.permute(0, 2, 3, 1)  # [B, heads, d, N], a view
    for i in range(b * h):
        shift = exp_shift(queries[i], keys[i]) if fusable else None  # one head at a time: its float32 copies
        for start in range(0, n, block):
            rows = slice(start, start + block)
            out = out_t[i // h, i % h, :, rows]
            if shift is not None:
                # [M, block]: exp(score - shift) for each key and query, computed in the GEMM.
                probs_t = torch.ops.mkldnn._linear_pointwise(keys[i], queries[i, rows], shift[rows], "sigmoid", [], "")
                weighted = torch.mm(values_t[i], probs_t)
                if weighted[d].float().min() >= floor:
                    torch.div(weighted[:d], weighted[d], out=out)
                    continue
                shift = None  # the bound is loose for this head: its other blocks too, likely
            scores = torch.mm(queries[i, rows], keys[i].t())
            out.copy_(torch.mm(values_t[i, :d], scores.softmax(-1).t()))
    return tokens.transpose(1, 2)


def exp_shift(queries: Tensor, keys: Tensor) -> Tensor:
    """Per query ([..., N, d] against keys [..., M, d]), minus an upper bound of its scores
    and :data:`SIGMOID_MARGIN`, in the queries' dtype ([..., N]): the bias that puts every shifted score where sigmoid is exp
    (raised by 2^-7 of itself first, so that rounding to bfloat16, which shifts a whole row,
    as softmax allows, cannot take it below the scores). The bound is the lower of two
    (Cauchy-Schwarz): ``|q| max|k|``, and ``q.c + |q| max|k - c|`` around the keys' mean
    ``c``, tight where the keys share a large common part."""
    norms = torch.linalg.vector_norm(queries, dim=-1, dtype=torch.float32)
    keys = keys.float()
    centre = keys.mean(-2, keepdim=True)  # [..., 1, d]
    radius = torch.linalg.vector_norm(keys - centre, dim=-1).amax(-1, keepdim=True)
    around_centre = (queries.float() @ centre.transpose(-1, -2)).squeeze(-1) + norms * radius
    around_zero = norms * torch.linalg.vector_norm(keys, dim=-1).amax(-1, keepdim=True)
    bound = torch.minimum(around_centre, around_zero)
    return (-(bound + bound.abs() * 2**-7 + SIGMOID_MARGIN[queries.dtype])).to(queries.dtype)
