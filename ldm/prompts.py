"""Prompt encoding for the pipeline, with long prompts chunked instead of cut.

CLIP sees at most 77 positions (BOS + 75 tokens + EOS). Like AUTOMATIC1111's
web UI, a longer prompt is split into chunks of 75 BPE tokens, each chunk is
encoded as its own 77-token row, and the rows are concatenated along the
sequence axis; the U-Net's cross-attention accepts any context length. A prompt
of at most 75 tokens gives exactly the single row diffusers computes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .models.text import TextEncoder
from .models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of str, got a single str; pass [prompt]")
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (use '' for no prompt)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return list(prompts)


def count_tokens(tokenizer: Tokenizer, prompt: str) -> int:
    """Number of BPE tokens in ``prompt``, not counting the begin/end tokens."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return len(tokenizer.encode(prompt))


def _chunks(ids: list[int], size: int) -> list[list[int]]:
    """``ids`` in pieces of ``size``; an empty prompt is one empty chunk."""
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]


def encode_prompts(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    min_chunks: int = 1,
) -> torch.Tensor:
    """Embeddings ``(B, 77 * k, hidden)`` for ``B`` prompts, ``k`` chunks each.

    Every prompt is padded with chunks encoding the empty string up to the
    largest chunk count in the batch (and at least ``min_chunks``), so a
    conditional and an unconditional batch can be made the same length by
    encoding them together or by passing the other's chunk count. Runs with
    autograd as the caller has it: wrap in ``torch.inference_mode()`` to sample.
    """
    prompts = _check_prompts(prompts)
    if not isinstance(min_chunks, int) or isinstance(min_chunks, bool) or min_chunks < 1:
        raise ValueError(f"min_chunks must be an int >= 1, got {min_chunks!r}")
    if tokenizer.max_length > encoder.context_length:
        raise ValueError(
            f"tokenizer rows of {tokenizer.max_length} tokens do not fit the encoder's "
            f"window of {encoder.context_length}"
        )
    size = tokenizer.max_length - 2
    per_prompt = [_chunks(tokenizer.encode(p), size) for p in prompts]
    for i, chunks in enumerate(per_prompt):
        if len(chunks) > 1:
            logger.info(
                "prompt %d has %d tokens, more than the %d-token window: encoding it as %d chunks",
                i, sum(len(c) for c in chunks), size, len(chunks),
            )
    k = max(min_chunks, max(len(c) for c in per_prompt))
    rows = [tokenizer.pad(c) for chunks in per_prompt for c in chunks + [[]] * (k - len(chunks))]
    ids = torch.tensor(rows, dtype=torch.long, device=encoder.device)
    # Identical rows (the empty pad chunks, a repeated negative prompt) are encoded once.
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    hidden = encoder(unique)[inverse]
    return hidden.reshape(len(prompts), k * tokenizer.max_length, hidden.shape[-1])
