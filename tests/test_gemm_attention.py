"""Attention as GEMMs for bfloat16 on CPUs without AMX (ldm.models.gemm_attention): the
formula, where it is used, and the U-Net it runs in."""

from __future__ import annotations

import pytest
import torch

from ldm import Pipeline
from ldm.models import gemm_attention as ga
from ldm.models.fused_linear import fusable_dtypes
from ldm.models.layers import chunked_sdpa


def _qkv(b, h, n, m, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k, v = (torch.randn(b, h, m, d, generator=g) for _ in range(2))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _formula(q, k, v):
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.fixture
def mode():
    previous = ga.set_gemm_attention("auto")
    yield ga.set_gemm_attention
    ga.set_gemm_attention(previous)


@pytest.mark.parametrize("block", [1, 7, 256, 5000])
def test_it_is_the_attention_formula(block):
    # In float32 only rounding separates it from the formula: blocks, odd sizes, the transposes.
    q, k, v = _qkv(2, 3, 301, 1030, 24)
    out = ga.gemm_attention(q, k, v, block)
    assert out.shape == (2, 3, 301, 24)
    assert out.transpose(1, 2).is_contiguous()  # [B, N, heads, d]: what the output projection reads
    torch.testing.assert_close(out.double(), _formula(q, k, v), atol=2e-6, rtol=2e-6)


def test_in_bfloat16_it_is_within_rounding_of_the_formula():
    q, k, v = _qkv(2, 8, 512, 1024, 40, torch.bfloat16)
    expected = _formula(q, k, v)
    err = (ga.gemm_attention(q, k, v).double() - expected).abs().max().item()
    # Scores of about +-5 rounded to bfloat16 (8 significant bits) move a probability by up to
    # ~1%, averaging out over 1,024 keys, and the output is rounded: within 0.5% of the values'
    # range, and far from float32's 1e-6.
    assert 1e-4 < err < 0.005 * v.abs().max().item()


def _far_bound_qkv():
    # One query far from every key's direction: the Cauchy-Schwarz bound (|q| x the largest
    # key's norm, 400 here) overshoots its largest score (about 10) by far more than
    # exp's range, so every shifted score underflows.
    d = 16
    q, k, v = _qkv(1, 1, 8, 1024, d)
    q = torch.zeros_like(q)
    q[..., 0] = 40 * d**0.5
    k = 0.1 * k
    k[..., 0, :] = 0
    k[..., 0, 1] = 10
    return q, k, v


def _softmax_calls(monkeypatch) -> list:
    calls = []
    real = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax", lambda self, *a, **kw: calls.append(self.shape) or real(self, *a, **kw))
    return calls


def test_a_block_whose_bound_overshoots_is_computed_by_softmax(monkeypatch):
    q, k, v = _far_bound_qkv()
    calls = _softmax_calls(monkeypatch)
    torch.testing.assert_close(ga.gemm_attention(q, k, v, block=4).double(), _formula(q, k, v), atol=2e-6, rtol=2e-6)
    assert len(calls) == 2  # both blocks of the head: after one, the head's next skips the fused try
    # Without the check the block's probabilities would all be 0 and its output 0 / 0.
    monkeypatch.setattr(ga, "MIN_PROBABILITY", 0.0)
    assert ga.gemm_attention(q, k, v).isnan().all()


def test_keys_with_a_large_common_part_keep_a_tight_bound(monkeypatch):
    # Keys = a common vector of norm 400 orthogonal to the queries + small parts: |q| max|k|
    # overshoots by ~400 x |q|, the bound around the keys' mean does not; no softmax call.
    q, k, v = _qkv(1, 2, 64, 1024, 16)
    q[..., 0] = 0
    k = 0.1 * k
    k[..., 0] = 400
    calls = _softmax_calls(monkeypatch)
    out = ga.gemm_attention(q, k, v)
    assert calls == []
    torch.testing.assert_close(out.double(), _formula(q, k, v), atol=2e-6, rtol=2e-6)
    bound = -ga.exp_shift(q.reshape(2, 64, 16) * 0.25, k.reshape(2, 1024, 16)) - ga.SIGMOID_MARGIN[torch.float32]
    scores = (q.reshape(2, 64, 16) * 0.25) @ k.reshape(2, 1024, 16).transpose(1, 2)
    assert (bound >= scores.amax(-1)).all() and (bound < scores.amax(-1) + 20).all()


@pytest.mark.skipif(torch.bfloat16 not in fusable_dtypes(), reason="bfloat16 not native in oneDNN here")
def test_probabilities_come_from_the_first_gemm(monkeypatch):
    # exp is oneDNN's sigmoid applied in the scores' GEMM; float32 and bfloat16 alike.
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(ga.torch.ops.mkldnn, "_linear_pointwise", spy, raising=False)
    for dtype in (torch.float32, torch.bfloat16):
        ga.gemm_attention(*_qkv(1, 2, 300, 1024, 8, dtype), block=256)
    assert calls == ["sigmoid"] * 8  # 2 heads x 2 blocks, twice


def test_it_runs_on_bfloat16_cpus_without_amx_only(monkeypatch, mode):
    q, k, _ = _qkv(1, 2, 8, 1024, 8, torch.bfloat16)
    monkeypatch.setattr(ga, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert ga.use_gemm_attention(q, k)
    assert not ga.use_gemm_attention(q.float(), k.float())  # float32: SDPA's kernel is the faster
    assert not ga.use_gemm_attention(q, k[:, :, :77])  # cross-attention over a prompt's tokens:
    assert ga.use_few_keys_attention(q, k[:, :, :77]) and not ga.use_few_keys_attention(q, k)  # few keys
    assert not ga.use_few_keys_attention(q.float(), k[:, :, :77].float())
    monkeypatch.setattr(ga, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert not ga.use_gemm_attention(q, k)  # AMX: flash's bfloat16 tiles
    monkeypatch.setattr(ga, "cpu_flags", lambda: frozenset())
    assert not ga.use_gemm_attention(q, k)  # flags unknown: SDPA
    assert not ga.use_few_keys_attention(q, k[:, :, :77])
    mode("on")
    assert ga.use_gemm_attention(q, k) and not ga.use_gemm_attention(q.float(), k.float())
    assert ga.use_few_keys_attention(q, k[:, :, :77])
    mode("off")
    monkeypatch.setattr(ga, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert not ga.use_gemm_attention(q, k) and not ga.use_few_keys_attention(q, k[:, :, :77])
    with pytest.raises(ValueError, match=r"GEMM attention mode must be one of \('auto', 'on', 'off'\), got 'x'"):
        mode("x")


def test_sliced_attention_bounds_its_blocks(monkeypatch, mode):
    mode("on")
    q, k, v = _qkv(1, 2, 100, 1024, 16, torch.bfloat16)
    blocks = []
    real = ga.gemm_attention

    def spy(q, k, v, block=ga.BLOCK):
        blocks.append(block)
        return real(q, k, v, block)

    monkeypatch.setattr("ldm.models.layers.gemm_attention", spy)
    torch.testing.assert_close(chunked_sdpa(q, k, v, None), real(q, k, v))
    chunked_sdpa(q, k, v, 16)
    assert blocks == [ga.BLOCK, 16]


def test_in_the_unet_it_is_as_close_to_float32_as_sdpa(sd1_folder, mode, one_thread):
    # 256 px: 1,024 tokens at the tiny U-Net's first level, so its self-attention runs here.
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(4)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([700.0, 300.0])
    with torch.inference_mode():
        ref = pipe.unet(x, t, context)
        pipe.unet.to(torch.bfloat16)
        out = {}
        for m in ("on", "off"):
            mode(m)
            out[m] = pipe.unet(x.bfloat16(), t, context.bfloat16()).float()
    distance = {m: ((o - ref).norm() / ref.norm()).item() for m, o in out.items()}
    assert not torch.equal(out["on"], out["off"])  # the GEMM path did run
    assert distance["on"] < 1.25 * distance["off"]


def test_a_batch_of_one_gives_the_gemm_contiguous_queries(monkeypatch):
    # At batch 1 the heads' queries are a strided view of the projection's output; oneDNN's
    # GEMM with a strided operand ran 700x slower, so each block's operands are contiguous.
    real, strided = torch.ops.mkldnn._linear_pointwise, []

    def spy(*args):
        strided.extend(not t.is_contiguous() for t in args[:2])
        return real(*args)

    monkeypatch.setattr(ga.torch.ops.mkldnn, "_linear_pointwise", spy, raising=False)
    g = torch.Generator().manual_seed(0)
    # [1, tokens, heads x channels] split into heads, as the attention layer does.
    q, k, v = (torch.randn(1, 1024, 3 * 8, generator=g).view(1, 1024, 3, 8).transpose(1, 2) for _ in range(3))
    out = ga.gemm_attention(q, k, v, block=256)
    assert len(strided) == 2 * 3 * 4 and not any(strided)
    torch.testing.assert_close(out.double(), _formula(q, k, v), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("scores", [1, 1000, 1 << 21])
def test_few_keys_attention_is_the_formula_in_blocks(monkeypatch, scores):
    # float32: only rounding separates it from the formula, whatever the block of queries
    # (one query, a few, all); the output is a view of [B, N, heads, d].
    monkeypatch.setattr(ga, "FEW_KEYS_SCORES", scores)
    q, k, v = _qkv(2, 3, 301, 77, 24)
    out = ga.few_keys_attention(q, k, v)
    assert out.shape == (2, 3, 301, 24) and out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.double(), _formula(q, k, v), atol=1e-5, rtol=1e-5)


def test_few_keys_attention_in_bfloat16_is_within_rounding_of_the_formula():
    q, k, v = _qkv(2, 8, 512, 77, 40, torch.bfloat16)
    expected = _formula(q, k, v)
    err = (ga.few_keys_attention(q, k, v).double() - expected).abs().max().item()
    assert 1e-4 < err < 0.005 * v.abs().max().item()
    flash = (torch.nn.functional.scaled_dot_product_attention(q, k, v).double() - expected).abs().max().item()
    assert err < 3 * flash  # scores rounded to bfloat16 before the softmax: more than flash, same order


def test_sliced_few_keys_attention_bounds_its_blocks(monkeypatch, mode):
    # chunked_sdpa with few keys: blocks of at most FEW_KEYS_SCORES scores, and of ``chunk``
    # queries when sliced; the queries' matmul sees no more.
    mode("on")
    q, k, v = _qkv(1, 2, 100, 77, 16, torch.bfloat16)
    rows = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda a, b: rows.append(a.shape[2]) or real(a, b))
    whole = chunked_sdpa(q, k, v, None)
    assert rows[::2] == [100]
    rows.clear()
    torch.testing.assert_close(chunked_sdpa(q, k, v, 16), whole, atol=0, rtol=0)
    assert rows[::2] == [16] * 6 + [4]
    monkeypatch.setattr(ga, "FEW_KEYS_SCORES", 2 * 77 * 30)  # 30 queries of both heads
    rows.clear()
    torch.testing.assert_close(chunked_sdpa(q, k, v, None), whole, atol=0, rtol=0)
    assert rows[::2] == [30, 30, 30, 10]
