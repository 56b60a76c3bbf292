"""Winograd 3x3 convolutions (ldm.models.winograd): the convolution they compute, where
they run, and the layer that uses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models import winograd as wg


@pytest.fixture
def mode():
    previous = wg.set_winograd("auto")
    yield wg.set_winograd
    wg.set_winograd(previous)


def _case(n, c_in, c_out, h, w, dtype=torch.float32, channels_last=False, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5).to(dtype)
    b = torch.randn(c_out, generator=g).to(dtype) if bias else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight, b


def _exact(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


def _relative(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


SHAPES = [(1, 3, 5, 7, 9), (2, 8, 4, 16, 16), (1, 16, 16, 13, 6), (3, 4, 8, 1, 1), (1, 6, 6, 4, 21)]


@pytest.mark.parametrize("tf", [wg.F2, wg.F4, wg.F2X4], ids=["F2", "F4", "F2X4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_it_is_the_convolution(tf, shape, channels_last):
    # float32: only rounding separates it from the convolution, at any size (partial tiles at
    # the edges, a 1x1 map), batch and layout; the output keeps the input's memory format.
    x, weight, bias = _case(*shape, channels_last=channels_last, bias=shape[0] != 3)
    got = wg.winograd_conv2d(x, weight, bias, tf)
    expected = _exact(x, weight, bias)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    fmt = torch.channels_last if channels_last and shape[2:] != (1, 1) else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)


def test_rows_of_tiles_are_done_a_chunk_at_a_time(monkeypatch):
    # 3 tile columns and a chunk of 2 tiles: one row per chunk, and a last chunk of one row.
    x, weight, bias = _case(2, 5, 7, 19, 11)
    monkeypatch.setattr(wg, "TILES_PER_CHUNK", 2)
    torch.testing.assert_close(wg.winograd_conv2d(x, weight, bias, wg.F4).double(), _exact(x, weight, bias),
                               atol=1e-5, rtol=1e-5)


def test_in_bfloat16_f2_is_within_twice_the_rounding_of_the_direct_convolution():
    # F(2x2, 3x3), bfloat16's choice: its transforms only add, subtract and halve, so the
    # error stays near the direct convolution's (2.9e-3 vs 5.6e-3 measured at 320 channels).
    # F(2x4, 3x3) on 0, +-1/2, +-3/2 (kept filters) rounds more (9.6e-3), F(4x4, 3x3) on
    # 0, +-1, +-2 far more (3.1e-2).
    x, weight, bias = _case(2, 64, 64, 24, 24, torch.bfloat16)
    expected = _exact(x, weight, bias)
    direct = _relative(F.conv2d(x, weight, bias, padding=1), expected)
    f2, f2x4, f4 = (_relative(wg.winograd_conv2d(x, weight, bias, tf), expected) for tf in (wg.F2, wg.F2X4, wg.F4))
    assert 0 < direct < f2 < 2.5 * direct
    assert f2 < f2x4 < 4 * direct < f4  # why bfloat16 does not use F(4x4, 3x3)
    assert wg.TRANSFORMS[torch.bfloat16] is wg.F2 and wg.TRANSFORMS[torch.float32] is wg.F4


def test_the_transforms_reproduce_a_tile_exactly():
    # Y = A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of one tile, in float64.
    g = torch.Generator().manual_seed(1)
    for tf in (wg.F2, wg.F4, wg.F2X4):
        d = torch.randn(*tf.alpha, generator=g, dtype=torch.float64)
        k = torch.randn(3, 3, generator=g, dtype=torch.float64)
        y = tf.output @ ((tf.filter @ k.flatten()) * (tf.input @ d.flatten()))
        expected = F.conv2d(d[None, None], k[None, None]).flatten()
        assert y.shape == (tf.m[0] * tf.m[1],) and tf.positions == tf.alpha[0] * tf.alpha[1]
        torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)
    # The bfloat16 GEMMs read the input and output transforms as they are: exact in bfloat16.
    for matrix in (wg.F2X4.input, wg.F2X4.output, wg.F2.input, wg.F2.output, wg.F2.filter):
        assert torch.equal(matrix.bfloat16().double(), matrix)


def _conv(c_in=256, c_out=256, **kw):
    return wg.Conv3x3(c_in, c_out, 3, **{"padding": 1, **kw}).requires_grad_(False)  # as loaded


def test_where_it_runs(monkeypatch, mode):
    conv = _conv()
    x = torch.zeros(2, 256, 32, 32)  # 2,048 pixels: the smallest size it runs at in float32
    monkeypatch.setattr(wg, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert wg.use_winograd(conv, x)
    assert not wg.use_winograd(conv, x[:1])  # 1,024 pixels: transforming the filter costs more
    assert wg.use_winograd(conv.bfloat16(), x[:1].bfloat16())  # bfloat16's smaller tiles: enough
    assert not wg.use_winograd(conv, x[:1, :, :16].bfloat16())  # 512 pixels
    conv.float()
    assert not wg.use_winograd(_conv(64, 256), x[:, :64])  # too few channels
    assert wg.use_winograd(_conv(128, 256), x[:, :128])  # float32: 128 are enough
    assert not wg.use_winograd(_conv(stride=2), x)
    assert not wg.use_winograd(_conv(padding=2, dilation=2), x)
    assert not wg.use_winograd(_conv(groups=2), x)
    assert not wg.use_winograd(_conv(padding_mode="reflect"), x)
    assert not wg.use_winograd(conv, x.half())  # float16 on the CPU: not measured
    assert not wg.use_winograd(conv, x.to("meta"))  # only on the CPU
    assert not wg.use_winograd(conv, x.requires_grad_())  # training: the direct convolution
    assert not wg.use_winograd(_conv().requires_grad_(), x.detach())
    with torch.no_grad():
        assert wg.use_winograd(_conv().requires_grad_(), x)
    conv.bfloat16()
    assert wg.use_winograd(conv, x.detach().bfloat16())
    assert not wg.use_winograd(_conv(128, 256).bfloat16(), x[:, :128].detach().bfloat16())  # bfloat16: 256
    monkeypatch.setattr(wg, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert not wg.use_winograd(conv, x.detach().bfloat16())  # AMX: not measured
    monkeypatch.setattr(wg, "cpu_flags", lambda: frozenset({"avx2"}))
    assert not wg.use_winograd(conv, x.detach().bfloat16())  # emulated bfloat16
    assert wg.use_winograd(conv.float(), x.detach())  # float32: everywhere
    mode("on")
    assert wg.use_winograd(conv, x[:1, :, :3, :3].detach())  # any size
    mode("off")
    assert not wg.use_winograd(conv, x.detach())
    with pytest.raises(ValueError, match="Winograd mode must be one of"):
        mode("fast")


def test_the_layer_is_an_nn_conv2d_that_computes_the_same(mode):
    # Same parameters and state-dict keys; the same output up to rounding; a weight changed in
    # place (a LoRA merged in) is used at once: the filter is transformed on each call.
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 16, 3, padding=1)
    conv = wg.Conv3x3(8, 16, 3, padding=1)
    assert isinstance(conv, nn.Conv2d)
    conv.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(2, 8, 12, 10)
    mode("on")
    with torch.no_grad():
        torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)
        delta = torch.randn_like(plain.weight) * 0.1
        conv.weight.add_(delta)
        plain.weight.add_(delta)
        torch.testing.assert_close(conv(x), plain(x), atol=1e-5, rtol=1e-5)
    mode("off")
    with torch.no_grad():
        assert torch.equal(conv(x), plain(x))


def test_gradients_flow_through_the_direct_convolution(mode):
    mode("on")
    conv = wg.Conv3x3(4, 4, 3, padding=1)
    conv(torch.randn(1, 4, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_filter_is_transformed_in_one_rounding(channels_last):
    # bfloat16 F2: one GEMM in bfloat16 with float32 accumulation, rounded once, so the
    # exact (float64) transform rounded to bfloat16 (ties aside); F4 in float32 to rounding.
    _, weight, _ = _case(1, 24, 40, 1, 1, dtype=torch.bfloat16)
    if channels_last:
        weight = weight.to(memory_format=torch.channels_last)
    exact = (wg.F2.filter @ weight.double().permute(2, 3, 1, 0).reshape(9, -1)).reshape(16, 24, 40)
    got = wg.transform_filter(weight, wg.F2)
    assert got.shape == (16, 24, 40) and got.dtype == torch.bfloat16
    assert (got.double() == exact.bfloat16().double()).float().mean() > 0.999
    torch.testing.assert_close(got.double(), exact, atol=0, rtol=2 ** -8)  # within one bfloat16 ulp
    # F(2x4, 3x3)'s ninths are not exact in bfloat16: in float32 a block at a time, rounded once.
    exact = (wg.F2X4.filter @ weight.double().permute(2, 3, 1, 0).reshape(9, -1)).reshape(24, 24, 40)
    got = wg.transform_filter(weight, wg.F2X4)
    assert got.shape == (24, 24, 40) and got.dtype == torch.bfloat16
    assert (got.double() == exact.bfloat16().double()).float().mean() > 0.999
    torch.testing.assert_close(got.double(), exact, atol=0, rtol=2 ** -8)
    w32 = weight.float()
    exact32 = (wg.F4.filter @ w32.double().permute(2, 3, 1, 0).reshape(9, -1)).reshape(36, 24, 40)
    torch.testing.assert_close(wg.transform_filter(w32, wg.F4).double(), exact32, atol=1e-6, rtol=1e-6)


def test_the_filter_workspace_is_one_buffer_reused_and_grown_inside_its_context():
    # Outside: a fresh filter each call. Inside: the same transform written into one buffer,
    # reused for a smaller filter, replaced by a larger one; nested contexts share it.
    _, small, _ = _case(1, 8, 16, 1, 1)
    _, large, _ = _case(1, 16, 24, 1, 1, seed=1)
    expected = wg.transform_filter(small, wg.F4)
    assert wg._scratch(10, torch.float32, small.device) is None
    with wg.filter_workspace():
        got = wg.transform_filter(small, wg.F4, scratch=True)
        assert torch.equal(got, expected)
        again = wg.transform_filter(small, wg.F2, scratch=True)  # 16 rows: fits in the 36-row buffer
        assert again.data_ptr() == got.data_ptr()
        torch.testing.assert_close(again, wg.transform_filter(small, wg.F2), atol=0, rtol=0)
        with wg.filter_workspace():
            bigger = wg.transform_filter(large, wg.F4, scratch=True)
        assert torch.equal(bigger, wg.transform_filter(large, wg.F4))
        assert wg.transform_filter(small, wg.F4, scratch=True).data_ptr() == bigger.data_ptr()
        assert wg.transform_filter(small, wg.F4).data_ptr() != bigger.data_ptr()  # scratch only when asked
    assert wg._WORKSPACE.get() is None


def test_kept_filters_are_made_once_per_weight_and_again_when_it_changes(monkeypatch, mode):
    # filter_workspace(keep=True): a bfloat16 layer's filters are made on its first call and
    # reused; a weight changed in place (a LoRA merged) or replaced is transformed again;
    # float32 (F4, 4x the weight) and contexts without keep transform on every call.
    mode("on")
    made = []
    real = wg.filter_products
    monkeypatch.setattr(wg, "filter_products", lambda *a, **k: made.append(a[0].dtype) or real(*a, **k))
    torch.manual_seed(0)
    conv = wg.Conv3x3(8, 12, 3, padding=1).bfloat16().requires_grad_(False)
    x = _case(1, 8, 12, 8, 8, dtype=torch.bfloat16)[0]  # 64 pixels: F(2x2, 3x3) kept or not
    plain = conv(x)
    with wg.filter_workspace(keep=True):
        outputs = [conv(x), conv(x), conv(x)]
        assert len(made) == 2  # once outside, once inside
        assert all(torch.equal(out, plain) for out in outputs)
        with torch.no_grad():
            conv.weight.add_(0.05)
        changed = conv(x)
        assert len(made) == 3 and not torch.equal(changed, plain)
        conv.weight = nn.Parameter(conv.weight * 2, requires_grad=False)
        replaced = conv(x)
        assert len(made) == 4
        conv.weight.data = conv.weight.data.clone()  # the same values elsewhere: made again
        assert torch.equal(conv(x), replaced) and len(made) == 5
        conv32 = wg.Conv3x3(8, 12, 3, padding=1).requires_grad_(False)
        conv32(x.float()), conv32(x.float())
        assert made[-2:] == [torch.float32, torch.float32]
        previous = wg.set_kept_filters("off")
        try:
            conv(x), conv(x)
            assert len(made) == 9  # switched off: every call
        finally:
            wg.set_kept_filters(previous)
    with torch.inference_mode():  # weights made here are inference tensors, without a version counter
        frozen = wg.Conv3x3(8, 12, 3, padding=1).bfloat16()
        with wg.filter_workspace(keep=True):
            count = len(made)
            assert torch.equal(frozen(x), frozen(x)) and len(made) == count + 1
    assert wg._KEPT.get() is None
    assert torch.equal(replaced, conv(x))  # the kept filters were the weight's own
    with torch.no_grad():
        conv.weight.mul_(0.5)  # back where "changed" was made
    with wg.filter_workspace():
        count = len(made)
        assert torch.equal(conv(x), changed) and torch.equal(conv(x), changed)
        assert len(made) == count + 2  # without keep: every call
        assert wg._KEPT.get() is None


def test_inside_the_workspace_it_runs_over_fewer_pixels_and_float32_there_is_f2(monkeypatch, mode):
    monkeypatch.setattr(wg, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    conv = _conv(1280, 1280)
    x = torch.zeros(1, 1280, 8, 8)  # 64 pixels
    assert not wg.use_winograd(conv, x)
    with wg.filter_workspace():
        assert wg.use_winograd(conv, x)
        assert not wg.use_winograd(conv, x[:, :, :4])  # 32 pixels
        assert not wg.use_winograd(_conv(640, 1280), x[:, :640])  # too few channels for so few pixels
        assert wg.use_winograd(_conv(640, 1280), torch.zeros(2, 640, 32, 32))  # enough pixels: as outside
        assert not wg.use_winograd(conv.bfloat16(), x.bfloat16())  # bfloat16: from 256 pixels
        assert wg.use_winograd(conv, torch.zeros(1, 1280, 16, 16).bfloat16())
    assert wg.transforms_for(x) is wg.F2 and wg.transforms_for(torch.zeros(2, 1, 32, 32)) is wg.F4
    assert wg.transforms_for(x.bfloat16()) is wg.F2 and wg.transforms_for(torch.zeros(2, 1, 64, 64).bfloat16()) is wg.F2


def test_with_kept_filters_bfloat16_runs_wider_tiles_and_the_widest_layers_over_fewer_pixels(monkeypatch, mode):
    # Kept filters: F(2x4, 3x3) from 256 pixels, F(2x2, 3x3) below; over 64-255 pixels only
    # layers with 2,560 channels in (where oneDNN's direct kernel is slow) join.
    monkeypatch.setattr(wg, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    wide, square = _conv(2560, 1280).bfloat16(), _conv(1280, 1280).bfloat16()
    x = torch.zeros(2, 2560, 8, 8).bfloat16()  # 128 pixels
    with wg.filter_workspace():
        assert not wg.use_winograd(wide, x)
        assert wg.transforms_for(torch.zeros(2, 1, 64, 64).bfloat16()) is wg.F2
    with wg.filter_workspace(keep=True):
        assert wg.use_winograd(wide, x) and wg.use_winograd(wide, x[:1])  # down to 64 pixels
        assert not wg.use_winograd(wide, x[:, :, :4, :4])  # 32 pixels
        assert not wg.use_winograd(square, x[:, :1280])  # 1,280 channels in: direct
        assert wg.transforms_for(x) is wg.F2 and wg.transforms_for(x[:, :, :, :4].repeat(1, 1, 4, 4)) is wg.F2X4
        assert wg.transforms_for(torch.zeros(1, 1, 16, 16).bfloat16()) is wg.F2X4  # 256 pixels
        assert wg.transforms_for(torch.zeros(2, 1, 32, 32)) is wg.F4  # float32 as without
        previous = wg.set_kept_filters("off")
        try:
            assert not wg.use_winograd(wide, x)
            assert wg.transforms_for(torch.zeros(1, 1, 16, 16).bfloat16()) is wg.F2
        finally:
            wg.set_kept_filters(previous)
        previous = wg.set_wide_tiles("off")  # kept, in F(2x2, 3x3)
        try:
            assert wg.use_winograd(wide, x)
            assert wg.transforms_for(torch.zeros(2, 1, 64, 64).bfloat16()) is wg.F2
        finally:
            wg.set_wide_tiles(previous)
        with pytest.raises(ValueError, match="tiles mode must be one of"):
            wg.set_wide_tiles("wide")


def test_a_layer_keeps_one_filter_per_transform(monkeypatch, mode):
    # The same layer at batch 2 over 16x16 (F(2x4, 3x3)) and at batch 1 over 8x8 (F(2x2, 3x3)),
    # as after guidance_end: each kept once, each output its transform's convolution.
    mode("on")
    made = []
    real = wg.filter_products
    monkeypatch.setattr(wg, "filter_products", lambda *a, **k: made.append(a[1].shape[0]) or real(*a, **k))
    conv = wg.Conv3x3(8, 12, 3, padding=1).bfloat16().requires_grad_(False)
    big, small = _case(2, 8, 12, 16, 16, dtype=torch.bfloat16)[0], _case(1, 8, 12, 8, 8, dtype=torch.bfloat16)[0]
    with wg.filter_workspace(keep=True):
        outputs = [(conv(big), conv(small)) for _ in range(3)]
        assert made == [24, 16]
    expected = (wg.winograd_conv2d(big, conv.weight, conv.bias, wg.F2X4),
                wg.winograd_conv2d(small, conv.weight, conv.bias, wg.F2))
    for got in outputs:
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(expected[0].double(), _exact(big, conv.weight, conv.bias), atol=0.05, rtol=0.05)


def test_the_layer_inside_the_workspace_computes_the_convolution(mode):
    # float32 under 2,048 pixels (F2) and over (F4), bfloat16: each within its rounding of the
    # direct convolution, in one workspace whose buffer each layer overwrites, twice round.
    torch.manual_seed(0)
    mode("on")
    cases = []
    for shape, dtype, tol in (((1, 8, 12, 8, 8), torch.float32, 1e-5), ((2, 12, 8, 32, 32), torch.float32, 1e-5),
                              ((1, 8, 12, 16, 16), torch.bfloat16, 2e-2)):
        conv = wg.Conv3x3(shape[1], shape[2], 3, padding=1).to(dtype).requires_grad_(False)
        x = _case(shape[0], shape[1], shape[2], *shape[3:], dtype=dtype)[0]
        cases.append((conv, x, _exact(x, conv.weight, conv.bias), tol))
    with wg.filter_workspace():
        for conv, x, expected, tol in cases + cases:
            assert _relative(conv(x), expected) < tol
