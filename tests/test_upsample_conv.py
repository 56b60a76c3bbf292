"""Nearest 2x upsampling then a 3x3 convolution as four phases of the input
(ldm.models.upsample_conv): the result, where it runs, and the layer that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models import upsample_conv as uc
from ldm.models import winograd as wg
from ldm.models.layers import Upsample2D


@pytest.fixture
def mode():
    previous = uc.set_upsample_phases("auto")
    yield uc.set_upsample_phases
    uc.set_upsample_phases(previous)


def _case(n, c_in, c_out, h, w, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=g).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5).to(dtype)
    return x, weight, (torch.randn(c_out, generator=g).to(dtype) if bias else None)


def _exact(x, weight, bias):
    up = F.interpolate(x.double(), scale_factor=2.0, mode="nearest")
    return F.conv2d(up, weight.double(), None if bias is None else bias.double(), padding=1)


def _relative(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def test_the_taps_are_sums_of_the_filter():
    # Each phase tap sums 1, 2 or 4 of the 9 taps; every 3x3 tap is used once per phase.
    assert uc.TAPS.shape == (16, 9)
    per_phase = uc.TAPS.view(4, 4, 9)
    assert torch.equal(per_phase.sum(1), torch.ones(4, 9, dtype=torch.float64))
    assert sorted(per_phase[0].sum(1).tolist()) == [1, 2, 2, 4]  # even rows, even columns


@pytest.mark.parametrize("shape", [(1, 3, 5, 4, 6), (2, 8, 8, 7, 3), (3, 4, 2, 1, 1), (1, 16, 16, 9, 9)], ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
def test_it_is_the_upsampled_convolution(shape, channels_last):
    # float32: only the order of additions separates it from interpolate + conv2d, at any
    # size, batch, with and without bias; channels_last in, channels_last out.
    x, weight, bias = _case(*shape, bias=shape[0] != 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = uc.upsample_conv2d(x, weight, bias)
    expected = _exact(x, weight, bias)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    if channels_last and shape[3:] != (1, 1):
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()


def test_in_bfloat16_it_is_within_twice_the_rounding_of_the_direct_convolution():
    x, weight, bias = _case(2, 64, 64, 12, 12, dtype=torch.bfloat16)
    expected = _exact(x, weight, bias)
    direct = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    got = uc.upsample_conv2d(x, weight, bias)
    assert got.dtype == torch.bfloat16
    assert _relative(got, expected) < 2 * _relative(direct, expected)


def test_phase_filters_keep_the_weights_layout_and_dtype():
    _, weight, _ = _case(1, 4, 6, 2, 2, dtype=torch.bfloat16)
    k = uc.phase_filters(weight.to(memory_format=torch.channels_last))
    assert k.shape == (24, 4, 2, 2) and k.dtype == torch.bfloat16
    assert k.is_contiguous(memory_format=torch.channels_last)
    # Phase (1, 1)'s first tap sums the filter's top-left 2x2 taps (exact: sums of bfloat16 in float32, rounded once).
    expected = weight.float()[:, :, :2, :2].sum((2, 3)).bfloat16()
    assert torch.equal(k[18:, :, 0, 0], expected)


def _conv(c=8, **kw):
    return wg.Conv3x3(c, c, 3, **{"padding": 1, **kw}).requires_grad_(False)


def test_where_it_runs(mode):
    x = torch.zeros(2, 8, 32, 32)  # 2,048 input pixels: the smallest size it runs at
    assert uc.use_upsample_phases(_conv(), x)
    assert not uc.use_upsample_phases(_conv(), x[:1])  # summing the filters would cost more
    assert uc.use_upsample_phases(_conv().bfloat16(), x.bfloat16())
    assert not uc.use_upsample_phases(_conv().half(), x.half())  # float16 on the CPU: not measured
    assert not uc.use_upsample_phases(_conv(), x.to("meta"))  # only on the CPU
    assert not uc.use_upsample_phases(_conv(), x.clone().requires_grad_())  # training: interpolate + conv
    assert not uc.use_upsample_phases(_conv(stride=2), x)
    assert not uc.use_upsample_phases(_conv(padding_mode="reflect"), x)
    # float32 where Winograd's F(4x4, 3x3) runs on the upsampled size: Winograd, as fast.
    big, wide = torch.zeros(2, 128, 32, 32), _conv(128)
    assert wg.use_winograd(wide, big.repeat(1, 1, 2, 2)) and not uc.use_upsample_phases(wide, big)
    assert uc.use_upsample_phases(wide.bfloat16(), big.bfloat16())  # bfloat16: the phases, faster
    previous = wg.set_winograd("off")
    try:
        assert uc.use_upsample_phases(wide.float(), big)
    finally:
        wg.set_winograd(previous)
    mode("on")
    assert uc.use_upsample_phases(wide.float(), big)
    assert uc.use_upsample_phases(_conv(), x[:1, :, :2, :2])  # any size
    mode("off")
    assert not uc.use_upsample_phases(_conv(), x)
    with pytest.raises(ValueError, match="Upsample phases mode must be one of"):
        mode("fast")


def test_the_upsampling_layer_computes_the_same(mode):
    # Upsample2D as shipped (phases) against interpolate + conv (off); a size that is not
    # twice the input (odd skip connections) interpolates; gradients go the direct way.
    torch.manual_seed(0)
    layer = Upsample2D(8)
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        mode("off")
        expected, odd = layer(x), layer(x, size=(9, 13))
        mode("on")
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x, size=(10, 14)), expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(layer(x, size=(9, 13)), odd)
    layer(x.requires_grad_()).sum().backward()
    assert x.grad is not None and layer.conv.weight.grad.abs().sum() > 0


def test_a_bordered_tile_is_its_interior_of_the_whole():
    # A tile with its neighbours as border (ldm.seamless_vae's tiles) gives exactly the
    # whole result's pixels of its interior; with zeros as border, the picture's edge.
    x, weight, bias = _case(2, 6, 5, 9, 11)
    whole = uc.upsample_conv2d(x, weight, bias)
    filters = uc.phase_filters(weight)
    tile = uc.upsample_conv2d(x[:, :, 2:7, 3:9], weight, bias, bordered=True, filters=filters)
    assert tile.shape == (2, 5, 6, 8)
    torch.testing.assert_close(tile, whole[:, :, 6:12, 8:16], atol=1e-6, rtol=1e-6)  # interior rows 3-5, columns 4-7
    edge = uc.upsample_conv2d(F.pad(x, (1, 1, 1, 1)), weight, bias, bordered=True)
    torch.testing.assert_close(edge, whole, atol=1e-6, rtol=1e-6)


def test_the_seamless_vae_upsamples_in_phases_tile_by_tile(mode, monkeypatch):
    # ldm.seamless_vae runs the upsampling layers as phases of halo'd input tiles when the
    # whole layer would: the decode is the whole decode's, and the phases did run.
    from ldm.config import VAEConfig
    from ldm.models.vae import AutoencoderKL
    from ldm.seamless_vae import seamless_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)).eval()
    calls = []
    monkeypatch.setattr("ldm.seamless_vae.upsample_conv2d",
                        lambda *a, **k: calls.append(a[0].shape) or uc.upsample_conv2d(*a, **k))
    z = torch.randn(1, 4, 13, 10)
    mode("on")
    with torch.no_grad():
        whole = vae.decode(z)
        got = seamless_decode(vae, z, tile=8)
    assert len(calls) == 4 * 3  # 13 x 10 latents in 4 x 4 input tiles
    torch.testing.assert_close(got, whole, atol=1e-5, rtol=1e-5)
    mode("off")
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(seamless_decode(vae, z, tile=8), whole, atol=1e-5, rtol=1e-5)
    assert not calls
