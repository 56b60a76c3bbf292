"""Linear layers with their bias, and GEGLU's gate, fused into oneDNN's matmul on the CPU.

``F.linear`` with a bias on the CPU first copies the bias into every row of the output and
then accumulates the product into it: one extra pass over the output, which for the
feed-forward's first projection at SD1.5's first level (8,192 tokens x 2,560 channels,
42 MB in bfloat16) took 15 of its 84 ms. GEGLU then splits that output in two strided
halves, runs GELU over one and multiplies: three more passes. oneDNN's matmul applies a
bias, an elementwise function or a binary operation with another tensor to each output
block while it is still in cache (torch exposes it as ``torch.ops.mkldnn._linear_pointwise``,
what inductor emits for CPU linears), so here:

- a :class:`FusedLinear` (a ``nn.Linear``: same parameters, keys and LoRA patching) adds its
  bias inside the GEMM;
- :func:`geglu` computes the gate half as one GEMM with bias and GELU applied, then the
  other half as a GEMM whose bias and product with the gate are applied to each block:
  no 2x-wide intermediate, no strided halves.

Measured on one thread of an AMD EPYC with AVX512-BF16 (no AMX), SD1.5's three feed-forward
widths at 512 px, batch 2 (``F.linear`` + chunk + GELU + multiply -> fused): bfloat16 96 ->
72 ms, 75 -> 68, 69 -> 66; float32 217 -> 171, 151 -> 135, 153 -> 129. The results are the
same products with fewer roundings (bfloat16 max error against float32 4.7e-3 vs 6.2e-3).

Where it runs (:func:`use_fused_linear`): a CPU tensor in float32, or bfloat16 where oneDNN
computes it natively, the weight's dtype, a layer with a bias, no gradients wanted (the op
has no backward: training runs ``F.linear``, as diffusers), not inside ``torch.compile``
(which fuses on its own), and torch built with oneDNN. :func:`set_fused_linear` turns it
off, for comparisons (``scripts/bench.py``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .switches import Switch, no_grad_wanted

SWITCH = Switch("fused linear")


def set_fused_linear(mode: str) -> str:
    """``"auto"`` / ``"on"`` (default; the same: it paid at every shape measured) or
    ``"off"`` (``F.linear`` and GELU as separate passes); returns the mode it replaces."""
    return SWITCH.set(mode)


@functools.cache
def fusable_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's fused matmul computes natively here (none without oneDNN)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def use_fused_linear(layer: nn.Linear, x: Tensor) -> bool:
    """Whether ``layer`` applied to ``x`` runs fused here (see the module docs)."""
    return (SWITCH.allows() and layer.bias is not None and x.device.type == "cpu" and x.dim() >= 2
            and layer.weight.device.type == "cpu" and x.dtype in fusable_dtypes() and layer.weight.dtype == x.dtype
            and no_grad_wanted(x, layer.weight))


class FusedLinear(nn.Linear):
    """``nn.Linear`` whose bias is added inside oneDNN's GEMM where
    :func:`use_fused_linear` says; ``F.linear`` elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        if use_fused_linear(self, x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def geglu(proj: nn.Linear, x: Tensor) -> Tensor:
    """``h * gelu(g)`` where ``h, g`` are the two halves of ``proj(x)`` (exact, erf GELU)."""
    # Hooks on ``proj`` (a LoRA being trained) or a forward patched onto it (accelerate's
    # offloading) expect it to be called.
    if proj._forward_hooks or proj._forward_pre_hooks or "forward" in vars(proj) or not use_fused_linear(proj, x):
        h, gate = proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)
    # Rows of a [2 x width, C_in] weight: each half is a contiguous block, no copy.
    (w_h, w_g), (b_h, b_g) = proj.weight.chunk(2), proj.bias.chunk(2)
    gate = torch.ops.mkldnn._linear_pointwise(x, w_g, b_g, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gate, w_h, b_h, "mul")
