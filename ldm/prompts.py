"""Prompt encoding as AUTOMATIC1111's web UI does it: weights, BREAK, 75-token chunks.

Follows the web UI's ``FrozenCLIPEmbedderWithCustomWordsBase`` (modules/sd_hijack_clip.py)
with its default options (emphasis "Original", comma_padding_backtrack 20):

1. The prompt is split into ``(piece, weight)`` pairs by :func:`parse_prompt_attention`
   and each piece is tokenized on its own (``tokenize_line``).
2. Tokens are packed into chunks of 75: a full chunk whose last comma is at most 20
   tokens back is closed after that comma and the rest moves to the next chunk; ``BREAK``
   closes the chunk (padding it); a textual-inversion embedding of several vectors is
   never split across chunks (it starts the next one).
3. Each chunk becomes a row ``[BOS, ids..., EOS, pad...]`` of 77 (padding with EOS for SD1,
   with id 0 for SD2), encoded on its own; the rows are concatenated along the sequence
   axis, which the U-Net's cross-attention accepts at any length.
4. Weights (``process_tokens`` with ``EmphasisOriginal``): for chunk ``i`` of a group of
   texts encoded together, ``z`` of shape ``(texts, 77, width)``:
   ``m = z.mean(); z = z * w[..., None]; z = z * (m / z.mean())``, in float32. The web
   UI encodes each prompt's texts together (one text, or a prompt-editing schedule's
   texts), so the mean is over that group's chunk-``i`` rows, never over the batch.

A prompt without weights, BREAK or commas near a 75-token boundary gives exactly the
rows of the plain tokenizer, and at most 75 tokens exactly what diffusers computes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .conditioning import Conditioning, ScheduledConditioning
from .models.text import TextEncoder
from .models.tokenizer import Tokenizer
from .prompt_schedule import schedule_conditioning, texts_at_steps
from .prompt_syntax import BREAK, BREAK_WEIGHT, parse_prompt_attention

logger = logging.getLogger(__name__)

# The web UI's comma_padding_backtrack default: how far back a comma may close a full chunk.
COMMA_BACKTRACK = 20


class Embeddings(Protocol):
    """Textual-inversion tokens: splits a piece's ids into units, each trigger of a known
    embedding one unit of its reserved ids, every other token a unit of one id."""

    def units(self, ids: list[int]) -> list[list[int]]: ...


@dataclass(frozen=True)
class PromptChunk:
    """Up to ``max_length - 2`` token ids of one chunk and the weight of each."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


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


def _pieces(prompt: str) -> list[tuple[str, float]]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return parse_prompt_attention(prompt)


def _is_break(piece: str, weight: float) -> bool:
    # The web UI splits only on weight exactly -1: a BREAK inside brackets is text.
    return piece == BREAK and weight == BREAK_WEIGHT


def count_tokens(tokenizer: Tokenizer, prompt: str) -> int:
    """Number of BPE tokens the encoder sees for ``prompt``: the tokens of its weighted
    pieces (brackets and weights are syntax, not text), without begin/end tokens."""
    return sum(len(tokenizer.encode(p)) for p, w in _pieces(prompt) if not _is_break(p, w))


def _units(tokenizer: Tokenizer, piece: str, embeddings: Embeddings | None, size: int) -> list[list[int]]:
    ids = tokenizer.encode(piece)
    if embeddings is None:
        return [[i] for i in ids]
    units = embeddings.units(ids)
    if not isinstance(units, list) or not all(
        isinstance(u, list) and u and all(isinstance(i, int) and not isinstance(i, bool) for i in u) for u in units
    ):
        raise TypeError(f"embeddings.units must return a list of non-empty lists of int ids, got {units!r:.120}")
    for unit in units:
        if len(unit) > size:
            raise ValueError(
                f"an embedding of {len(unit)} vectors in {piece[:40]!r} does not fit a {size}-token chunk"
            )
    return units


def prompt_chunks(tokenizer: Tokenizer, prompt: str, *, embeddings: Embeddings | None = None) -> list[PromptChunk]:
    """``prompt`` packed into chunks as the web UI's ``tokenize_line`` packs it.

    An empty prompt is one empty chunk; ``BREAK`` closes the current chunk even when it
    is empty (so a leading ``BREAK`` gives an empty first chunk).
    """
    size = tokenizer.max_length - 2
    comma = tokenizer.encode(",")[0]
    chunks: list[PromptChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        chunks.append(PromptChunk(tuple(ids), tuple(weights)))
        ids, weights, last_comma = [], [], -1

    for piece, weight in _pieces(prompt):
        if _is_break(piece, weight):
            close()
            continue
        for unit in _units(tokenizer, piece, embeddings, size):
            if unit[0] == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # The chunk is full: close it after its last comma, carry the rest over.
                cut = last_comma + 1
                moved, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = moved, moved_weights
            if len(ids) == size or len(ids) + len(unit) > size:
                close()
            ids += unit
            weights += [weight] * len(unit)
    if ids or not chunks:
        close()
    return chunks


def count_chunks(tokenizer: Tokenizer, prompt: str, *, steps: int | None = None,
                 embeddings: Embeddings | None = None) -> int:
    """How many 77-token rows ``prompt`` encodes to: the most of any of its texts over
    ``steps`` steps of prompt editing (see :mod:`ldm.prompt_schedule`)."""
    return max(len(prompt_chunks(tokenizer, text, embeddings=embeddings))
               for _, text in texts_at_steps(prompt, steps))


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The web UI's ``EmphasisOriginal``: ``z`` (texts, tokens, width) scaled per token by
    ``weights`` (texts, tokens), then rescaled so that the mean of all of ``z`` is what it
    was (their comment: "restoring original mean is likely not correct, but it seems to
    work well"). In float32, returned in ``z``'s dtype."""
    z32 = z.float()
    mean = z32.mean()
    scaled = z32 * weights.to(z32.device, torch.float32)[..., None]
    return (scaled * (mean / scaled.mean())).to(z.dtype)


def _row_weights(chunk: PromptChunk, length: int) -> list[float]:
    return [1.0, *chunk.weights] + [1.0] * (length - 1 - len(chunk.weights))


def _chunk_rows(
    tokenizer: Tokenizer, texts: list[str], min_chunks: int, embeddings: Embeddings | None
) -> tuple[list[list[PromptChunk]], int]:
    """Every text's chunks, padded with empty chunks to ``k``, the most of any text (and at
    least ``min_chunks``); returns the rows and ``k``."""
    cache: dict[str, list[PromptChunk]] = {}
    for text in texts:
        if text not in cache:
            cache[text] = prompt_chunks(tokenizer, text, embeddings=embeddings)
            if len(cache[text]) > 1:
                logger.info("prompt %r is %d chunks of up to %d tokens", text[:60], len(cache[text]),
                            tokenizer.max_length - 2)
    k = max(min_chunks, max(len(c) for c in cache.values()))
    empty = PromptChunk((), ())
    return [cache[t] + [empty] * (k - len(cache[t])) for t in texts], k


def _encode_rows(encoder: TextEncoder, tokenizer: Tokenizer, rows: list[list[PromptChunk]], k: int,
                 clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``(texts, k, 77, width)`` of the chunk rows, and the pooled embedding
    of each text's first chunk ``(texts, dim)`` for an encoder that has one (the web UI
    takes the first chunk's; up to 75 tokens that is diffusers' pooled embedding)."""
    if tokenizer.max_length > encoder.context_length:
        raise ValueError(
            f"tokenizer rows of {tokenizer.max_length} tokens do not fit the encoder's "
            f"window of {encoder.context_length}"
        )
    ids = torch.tensor([tokenizer.pad(list(c.ids)) for row in rows for c in row], dtype=torch.long,
                       device=encoder.device)
    # Identical rows (empty pad chunks, a repeated negative prompt) are encoded once.
    unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
    hidden, pooled = encoder.encode(unique, clip_skip=clip_skip)
    hidden = hidden[inverse].reshape(len(rows), k, tokenizer.max_length, -1)
    pooled = pooled[inverse].reshape(len(rows), k, -1)[:, 0] if pooled is not None else None
    return hidden, pooled


def _emphasised(groups: list[list[str]], hidden: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """Each group's rows ``(len(group), k * 77, width)`` with the prompt weights applied."""
    out, first = [], 0
    k, length = hidden.shape[1], hidden.shape[2]
    for group in groups:
        z, w = hidden[first : first + len(group)], weights[first : first + len(group)]
        first += len(group)
        # Chunks whose weights are all 1 are left as they are: the formula is then the identity.
        parts = [apply_emphasis(z[:, i], w[:, i]) if bool((w[:, i] != 1).any()) else z[:, i] for i in range(k)]
        out.append(torch.stack(parts, dim=1).reshape(len(group), k * length, -1))
    return out


def _as_tuple(value: Any, kind: type, name: str) -> tuple:
    values = (value,) if isinstance(value, kind) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if not values or not all(isinstance(v, kind) for v in values):
        raise TypeError(f"{name} must be a {kind.__name__} or a sequence of them, got {value!r:.80}")
    return values


def encode_text_groups(
    encoders: TextEncoder | Sequence[TextEncoder],
    tokenizers: Tokenizer | Sequence[Tokenizer],
    groups: Sequence[Sequence[str]],
    *,
    min_chunks: int = 1,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
) -> list[Conditioning]:
    """:func:`encode_groups` for a model with one or more text encoders: each group's
    :class:`~ldm.conditioning.Conditioning`, its context every encoder's emphasised hidden
    states side by side (SDXL: CLIP-L's 768 then bigG's 1280, as both SGM and diffusers
    concatenate them; the web UI weights each encoder's states on their own, then joins
    them), and ``pooled`` the first chunk's pooled embedding of the last encoder that has
    one. The encoders' tokenizers differ only in padding, so the chunks are the same."""
    if not isinstance(min_chunks, int) or isinstance(min_chunks, bool) or min_chunks < 1:
        raise ValueError(f"min_chunks must be an int >= 1, got {min_chunks!r}")
    encoders = _as_tuple(encoders, TextEncoder, "encoders")
    tokenizers = _as_tuple(tokenizers, Tokenizer, "tokenizers")
    if len(encoders) != len(tokenizers):
        raise ValueError(f"{len(encoders)} text encoders but {len(tokenizers)} tokenizers: one each")
    groups = [_check_prompts(g) for g in groups]
    texts = [t for g in groups for t in g]
    rows, k = _chunk_rows(tokenizers[0], texts, min_chunks, embeddings)
    length = tokenizers[0].max_length
    weights = torch.tensor([_row_weights(c, length) for row in rows for c in row]).reshape(len(texts), k, length)
    contexts, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers):
        hidden, pooled_here = _encode_rows(encoder, tokenizer, rows, k, clip_skip)
        contexts.append(_emphasised(groups, hidden, weights))
        pooled = pooled_here if pooled_here is not None else pooled
    out, first = [], 0
    for i, group in enumerate(groups):
        context = torch.cat([c[i] for c in contexts], dim=-1)
        rows_pooled = pooled[first : first + len(group)] if pooled is not None else None
        first += len(group)
        out.append(Conditioning(context, pooled=rows_pooled))
    return out


def encode_groups(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    groups: Sequence[Sequence[str]],
    *,
    min_chunks: int = 1,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
) -> list[torch.Tensor]:
    """Each group of texts encoded as the web UI encodes one call's texts: a tensor
    ``(len(group), 77 * k, width)`` per group, ``k`` the most chunks of any text (and at
    least ``min_chunks``), shorter texts padded with empty chunks; weights are
    normalised over a group's rows (see the module docstring). ``clip_skip`` as in
    :meth:`~ldm.models.text.TextEncoder.forward`.
    """
    return [c.context for c in encode_text_groups(encoder, tokenizer, groups, min_chunks=min_chunks,
                                                  clip_skip=clip_skip, embeddings=embeddings)]


def encode_prompts(
    encoder: TextEncoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    min_chunks: int = 1,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
) -> torch.Tensor:
    """Embeddings ``(B, 77 * k, width)`` for ``B`` prompts in the web UI's prompt language
    (weights, ``BREAK``; no prompt editing: see :func:`encode_conditioning`), ``k`` chunks each.

    Every prompt is padded with chunks encoding the empty string up to the largest
    chunk count in the batch (and at least ``min_chunks``), so a conditional and an
    unconditional batch can be made the same length by encoding them together or by
    passing the other's chunk count. Each prompt's weights are normalised on their own,
    as the web UI encodes each prompt in its own call. Runs with autograd as the caller
    has it: wrap in ``torch.inference_mode()`` to sample.
    """
    prompts = _check_prompts(prompts)
    groups = encode_groups(encoder, tokenizer, [[p] for p in prompts], min_chunks=min_chunks,
                           clip_skip=clip_skip, embeddings=embeddings)
    return torch.cat(groups)


def encode_conditioning(
    encoder: TextEncoder | Sequence[TextEncoder],
    tokenizer: Tokenizer | Sequence[Tokenizer],
    prompts: Sequence[str],
    negatives: Sequence[str] | None = None,
    *,
    steps: int | None = None,
    clip_skip: int = 1,
    embeddings: Embeddings | None = None,
    zero_empty_negatives: bool = False,
) -> tuple[Conditioning | ScheduledConditioning, Conditioning | ScheduledConditioning | None]:
    """Conditioning of ``prompts`` (and ``negatives``), both in the full prompt language,
    from one text encoder or several (:func:`encode_text_groups`).

    Prompt editing and alternation (:mod:`ldm.prompt_schedule`) need ``steps``; a side
    where some prompt changes with the step is a
    :class:`~ldm.conditioning.ScheduledConditioning`, otherwise a plain
    :class:`~ldm.conditioning.Conditioning`. Both sides have the same number of chunks.
    ``zero_empty_negatives``: an empty negative prompt is all zeros, context and pooled
    embedding (SDXL's ``force_zeros_for_empty_prompt``; the web UI does the same).
    """
    prompts = _check_prompts(prompts)
    sides = [prompts] if negatives is None else [prompts, _check_prompts(negatives)]
    schedules = [[texts_at_steps(p, steps) for p in side] for side in sides]
    flat = [s for side in schedules for s in side]
    encoded = encode_text_groups(encoder, tokenizer, [[text for _, text in s] for s in flat],
                                 clip_skip=clip_skip, embeddings=embeddings)
    if zero_empty_negatives and negatives is not None:
        encoded[len(prompts):] = [c.zeros() if text == "" else c for c, text in zip(encoded[len(prompts):], sides[1])]
    cond = schedule_conditioning(schedules[0], encoded[: len(prompts)])
    uncond = schedule_conditioning(schedules[1], encoded[len(prompts):]) if negatives is not None else None
    return cond, uncond


__all__ = [
    "COMMA_BACKTRACK",
    "Embeddings",
    "PromptChunk",
    "apply_emphasis",
    "count_chunks",
    "count_tokens",
    "encode_conditioning",
    "encode_groups",
    "encode_text_groups",
    "encode_prompts",
    "parse_prompt_attention",
    "prompt_chunks",
]
