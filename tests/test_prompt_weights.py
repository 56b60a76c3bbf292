"""Weighted prompt encoding as AUTOMATIC1111's web UI does it (modules/sd_hijack_clip.py).

Every expectation is built here from the raw text encoder: token rows written out by
hand (``[BOS, ids..., EOS, pad...]``), encoded, then the web UI's EmphasisOriginal
applied by hand (``m = z.mean(); z = z * w; z = z * m / z.mean()``).
"""

from __future__ import annotations

import pytest
import torch

from ldm.models.tokenizer import BOS_ID, EOS_ID, Tokenizer
from ldm.prompts import (
    count_chunks,
    count_tokens,
    encode_conditioning,
    encode_groups,
    encode_prompts,
    prompt_chunks,
)
from reference import SD1_TINY, SD2V_TINY
from test_text import _encoder

SPECS = {"sd1": SD1_TINY, "sd2v": SD2V_TINY}


@pytest.fixture(scope="module")
def sd1():
    enc, _ = _encoder(SD1_TINY)
    return enc, Tokenizer("eos")


def _row(ids: list[int], pad_id: int) -> list[int]:
    return [BOS_ID, *ids, EOS_ID] + [pad_id] * (75 - len(ids))


def _weighted(enc, pieces: list[tuple[str, float]], tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk written out by hand: the encoder's output and the per-token weights."""
    ids, weights = [], []
    for text, weight in pieces:
        t = tok.encode(text)
        ids += t
        weights += [weight] * len(t)
    z = enc(torch.tensor([_row(ids, tok.pad_id)]))
    return z, torch.tensor([[1.0, *weights] + [1.0] * (76 - len(weights))])


def _emphasis(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    mean = z.mean()
    z = z * w[..., None]
    return z * (mean / z.mean())


@pytest.mark.parametrize("name", SPECS)
def test_unweighted_prompts_are_the_plain_rows(name):
    spec = SPECS[name]
    enc, _ = _encoder(spec)
    tok = Tokenizer(spec.pad_token)
    prompts = ["a photo of a cat", "a lighthouse, at dusk; oil painting", ""]
    with torch.no_grad():
        ours = encode_prompts(enc, tok, prompts)
        plain = enc(torch.tensor([_row(tok.encode(p), tok.pad_id) for p in prompts]))
    assert torch.equal(ours, plain)


@pytest.mark.parametrize("name", SPECS)
def test_weights_follow_the_web_ui_formula(name):
    spec = SPECS[name]
    enc, _ = _encoder(spec)
    tok = Tokenizer(spec.pad_token)
    pieces = [("a ", 1.0), ("red", 1.5), (" house, ", 1.0), ("blue", 1 / 1.1), (" sky", 1.0)]
    with torch.no_grad():
        ours = encode_prompts(enc, tok, ["a (red:1.5) house, [blue] sky"])
        z, w = _weighted(enc, pieces, tok)
        plain, _ = _weighted(enc, [("a red house, blue sky", 1.0)], tok)
    expected = _emphasis(z, w)
    assert (ours - expected).abs().max().item() < 1e-6
    # The weights do something, and the mean over the chunk is what it was.
    assert (ours - plain).abs().max().item() > 0.05
    assert abs(ours.mean().item() - plain.mean().item()) < 1e-6


def test_weights_are_normalised_per_chunk(sd1):
    enc, tok = sd1
    prompt = "cat " * 75 + "(dog:1.4) cat cat"
    with torch.no_grad():
        ours = encode_prompts(enc, tok, [prompt])
        first, _ = _weighted(enc, [("cat " * 75, 1.0)], tok)
        z, w = _weighted(enc, [("dog", 1.4), (" cat cat", 1.0)], tok)
    assert ours.shape == (1, 154, 32)
    assert torch.equal(ours[:, :77], first)  # all weights 1: untouched
    assert (ours[:, 77:] - _emphasis(z, w)).abs().max().item() < 1e-6


def test_texts_encoded_together_share_the_normalisation(sd1):
    # The web UI encodes a prompt's schedule texts in one call, so the mean it restores is
    # over all of their rows of a chunk.
    enc, tok = sd1
    with torch.no_grad():
        (ours,) = encode_groups(enc, tok, [["(cat:1.5) on a mat", "a dog"]])
        z1, w1 = _weighted(enc, [("cat", 1.5), (" on a mat", 1.0)], tok)
        z2, w2 = _weighted(enc, [("a dog", 1.0)], tok)
        alone = encode_prompts(enc, tok, ["(cat:1.5) on a mat"])
    expected = _emphasis(torch.cat([z1, z2]), torch.cat([w1, w2]))
    assert (ours - expected).abs().max().item() < 1e-6
    assert (ours[:1] - alone).abs().max().item() > 1e-4  # not the same as on its own


def _chunk_ids(tok, prompt, **kwargs) -> list[list[int]]:
    return [list(c.ids) for c in prompt_chunks(tok, prompt, **kwargs)]


def test_comma_backtrack():
    tok = Tokenizer()
    cat, comma = tok.encode("cat")[0], tok.encode(",")[0]
    # A full chunk whose last comma is at most 20 tokens back closes after the comma.
    assert _chunk_ids(tok, "cat " * 70 + ", " + "cat " * 10) == [[cat] * 70 + [comma], [cat] * 10]
    assert _chunk_ids(tok, "cat " * 55 + ", " + "cat " * 30) == [[cat] * 55 + [comma], [cat] * 30]
    # 21 tokens back is too far: a hard cut at 75.
    assert _chunk_ids(tok, "cat " * 54 + ", " + "cat " * 30) == [[cat] * 54 + [comma] + [cat] * 20, [cat] * 10]
    # The last comma counts.
    assert _chunk_ids(tok, "cat, " * 3 + "cat " * 70) == [[cat, comma] * 3 + [cat] * 69, [cat]]
    assert _chunk_ids(tok, "cat " * 60 + ", cat " * 10) == [[cat] + [cat] * 59 + [comma, cat] * 7 + [comma],
                                                            [cat] + [comma, cat] * 2]
    # Weights move with their tokens.
    chunks = prompt_chunks(tok, "cat " * 70 + ", (dog:1.3) " + "cat " * 10)
    assert chunks[1].weights == (1.3,) + (1.0,) * 10


def test_break_closes_the_chunk(sd1):
    enc, tok = sd1
    a, b = tok.encode("a cat"), tok.encode("a dog")
    assert _chunk_ids(tok, "a cat BREAK a dog") == [a, b]
    assert _chunk_ids(tok, "BREAK a dog") == [[], b]
    assert _chunk_ids(tok, "a cat BREAK") == [a]
    assert _chunk_ids(tok, "") == [[]]
    # Inside brackets BREAK is a word with weight -1.1 (the web UI splits on -1 only).
    (chunk,) = prompt_chunks(tok, "(a BREAK b)")
    assert list(chunk.ids) == tok.encode("a break b") and chunk.weights == (1.1, -1.1, 1.1)
    with torch.no_grad():
        ours = encode_prompts(enc, tok, ["a cat BREAK a dog"])
        rows = enc(torch.tensor([_row(a, EOS_ID), _row(b, EOS_ID)]))
    assert torch.equal(ours, rows.reshape(1, 154, 32))


class _Units:
    """Textual-inversion stand-in: "dog" is an embedding of ``ids`` (one unit)."""

    def __init__(self, tok: Tokenizer, ids: list[int]) -> None:
        self.trigger = tok.encode("dog")[0]
        self.ids = ids

    def units(self, ids: list[int]) -> list[list[int]]:
        return [list(self.ids) if i == self.trigger else [i] for i in ids]


def test_an_embedding_is_never_split_across_chunks(sd1):
    enc, tok = sd1
    cat = tok.encode("cat")[0]
    vectors = tok.encode("a small red")  # three real ids, so the tiny encoder can run them
    emb = _Units(tok, vectors)
    assert _chunk_ids(tok, "cat " * 72 + "dog", embeddings=emb) == [[cat] * 72 + vectors]
    assert _chunk_ids(tok, "cat " * 73 + "dog", embeddings=emb) == [[cat] * 73, vectors]
    chunks = prompt_chunks(tok, "cat (dog:1.2)", embeddings=emb)
    assert chunks[0].weights == (1.0, 1.2, 1.2, 1.2)
    with torch.no_grad():
        ours = encode_prompts(enc, tok, ["cat " * 73 + "dog"], embeddings=emb)
        rows = enc(torch.tensor([_row([cat] * 73, EOS_ID), _row(vectors, EOS_ID)]))
    assert torch.equal(ours, rows.reshape(1, 154, 32))
    with pytest.raises(ValueError, match="76 vectors"):
        prompt_chunks(tok, "dog", embeddings=_Units(tok, [cat] * 76))

    class Broken:
        def units(self, ids):
            return ids

    with pytest.raises(TypeError, match="units"):
        prompt_chunks(tok, "dog", embeddings=Broken())


def test_cond_and_uncond_get_the_same_chunks(sd1):
    enc, tok = sd1
    long = "cat " * 100
    with torch.no_grad():
        cond, uncond = encode_conditioning(enc, tok, [long, "a dog"], ["", "blurry"])
        empty = enc(torch.tensor([_row([], EOS_ID)]))
    assert cond.context.shape == uncond.context.shape == (2, 154, 32)
    assert torch.equal(uncond.context[0], torch.cat([empty[0], empty[0]]))
    assert torch.equal(cond.context[1, 77:], empty[0])


def test_counts():
    tok = Tokenizer()
    assert count_tokens(tok, "a (red:1.5) house BREAK [blue]") == len(tok.encode("a red house blue"))
    assert count_chunks(tok, "cat " * 70 + ", " + "cat " * 10) == 2
    assert count_chunks(tok, "cat " * 75) == 1
    assert count_chunks(tok, "a BREAK b BREAK c") == 3
    # With editing, the most chunks of any of the step texts.
    assert count_chunks(tok, "[" + "cat " * 80 + ":dog:0.5]", steps=10) == 2
    assert count_chunks(tok, "[" + "cat " * 80 + ":dog:0.5]", steps=1) == 1
    with pytest.raises(ValueError, match="pass steps"):
        count_chunks(tok, "[cat:dog:0.5]")
    with pytest.raises(ValueError, match="min_chunks"):
        encode_groups(None, tok, [["a"]], min_chunks=0)
