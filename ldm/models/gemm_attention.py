"""Attention as two GEMMs and a softmax per head and block of queries, for bfloat16 on
CPUs that compute it natively without AMX tiles.

torch's CPU flash-attention kernel (what SDPA runs there) computes bfloat16 at about
float32's speed on such a CPU. On an AMD EPYC with AVX512-BF16 (one thread), 8 heads of 40
channels over 4,096 tokens (SD1.5's first level at 512 px, batch 2) took 0.65 s, about 65
GFLOP/s, where a bfloat16 GEMM runs at 188. Here each head's scores for a block of 256
queries (2 MiB at 4,096 keys) are one oneDNN GEMM, their softmax one call of torch's, and
the output ``V^T P^T`` a second GEMM (40 rows by 256 columns: 181 GFLOP/s in that order,
125 as ``P V``). That call took 0.43-0.49 s; 1.7x faster at the second level (1,024
tokens, 80 channels) and 1.9x on the VAE's mid-block (one head of 512 channels); a whole
U-Net step 8-11% faster.

The scores and probabilities are rounded to bfloat16 (flash keeps both in float32). Alone,
the call is further from exact (max error 0.0025 against flash's 0.0006 for the shape
above), but in the whole U-Net, where every activation is bfloat16, it does not show: on the
full SD1.5 architecture the output's distance to float32 was 1.37% relative against
flash's 1.38% (one step at 512 px; 1.35% vs 1.36% in ``scripts/bench.py``'s run).

Beyond its inputs and output it holds transposed copies of the keys and values and one
block's scores and probabilities (2 x 256 x keys values: 64 MiB at 2048 px, 65,536 tokens),
never the whole score matrix, so the memory plan's fused-attention estimate holds
(:mod:`ldm.limits`).

Used where (:func:`use_gemm_attention`): a CPU tensor in bfloat16, at least
:data:`MIN_KEYS` keys (cross-attention over 77 tokens stays with SDPA), on a CPU whose
flags (/proc/cpuinfo) say AVX512-BF16 and no AMX. With AMX, flash's bfloat16 tiles are
expected to win (not measured), and where the flags are unknown SDPA is kept.
:func:`set_gemm_attention` turns it off or on for comparisons (``scripts/bench.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .cpuinfo import cpu_flags
from .switches import Switch

BLOCK = 256  # queries per GEMM: a block's scores over 4,096 keys fit a 2 MiB cache
MIN_KEYS = 1024
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
    """Whether attention of ``q`` over the keys ``k`` ([B, heads, N, d]) runs here."""
    if SWITCH.mode == "off" or q.device.type != "cpu" or q.dtype != torch.bfloat16 or k.shape[-2] < MIN_KEYS:
        return False
    return SWITCH.mode == "on" or cpu_suits_gemm_attention()


def gemm_attention(q: Tensor, k: Tensor, v: Tensor, block: int = BLOCK) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] (keys and values [B, heads, M, d]),
    ``block`` queries of one head at a time; the output is a [B, heads, N, d] view."""
    b, h, n, d = q.shape
    m = k.shape[2]
    queries = (q * d**-0.5).reshape(b * h, n, d)
    keys_t = k.reshape(b * h, m, d).transpose(1, 2).contiguous()
    values_t = v.reshape(b * h, m, d).transpose(1, 2).contiguous()
    out_t = q.new_empty(b * h, d, n)
    for i in range(b * h):
        for start in range(0, n, block):
            scores = torch.mm(queries[i, start:start + block], keys_t[i])
            out_t[i, :, start:start + block] = torch.mm(values_t[i], scores.softmax(-1).t())
    return out_t.view(b, h, d, n).transpose(2, 3)
