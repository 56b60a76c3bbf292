"""Seamless tiled VAE (ldm.seamless_vae): layer by layer in tiles, equal to diffusers' untiled VAE."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from reference import SD1_TINY, TEST_DEVICE, build_reference

from ldm import seamless_vae
from ldm.foreign_config import vae_from_diffusers
from ldm.models.vae import AutoencoderKL
from ldm.seamless_vae import seamless_decode, seamless_encode


@pytest.fixture(scope="module")
def pair():
    """diffusers' tiny VAE (untiled) and ours with the same weights, GroupNorm affines random
    so that a wrong statistic or a dropped affine shows."""
    _, ref, _ = build_reference(SD1_TINY, seed=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    vae = AutoencoderKL(vae_from_diffusers(dict(ref.config))).eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), vae


def _latents(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("h, w, tile", [(13, 21, 16), (16, 16, 8), (9, 7, 256)])
def test_decode_is_diffusers_untiled_decode(pair, h, w, tile, one_thread, winograd):
    ref, vae = pair
    z = _latents(h, w)
    with torch.no_grad():
        expected = ref.decode(z).sample
    got = seamless_decode(vae, z, tile=tile)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_in_float64_it_is_the_whole_decode_and_encode_to_rounding(pair, one_thread):
    _, vae = pair
    vae = copy.deepcopy(vae).double()
    z = _latents(11, 18).double()
    with torch.no_grad():
        whole = vae.decode(z)
        posterior = vae.encode(whole.clamp(-1, 1))
        moments = torch.cat([posterior.mean, posterior.logvar], 1)
    assert (seamless_decode(vae, z, tile=8) - whole).abs().max() < 1e-10
    got = seamless_encode(vae, whole.clamp(-1, 1), tile=24)
    assert (torch.cat([got.mean, got.logvar], 1) - moments).abs().max() < 1e-10


def test_in_bfloat16_it_is_as_close_to_float32_as_the_whole_decode(pair, one_thread):
    _, vae = pair
    z = _latents(16, 16)
    with torch.no_grad():
        reference = vae.decode(z)
        half = copy.deepcopy(vae).to(torch.bfloat16)
        whole = half.decode(z.bfloat16()).float()
    out = seamless_decode(half, z.bfloat16(), tile=32)
    assert out.dtype == torch.bfloat16
    seamless = out.float()
    assert (seamless - reference).abs().mean() <= 1.5 * (whole - reference).abs().mean()


def test_encode_is_diffusers_untiled_encode(pair, one_thread):
    ref, vae = pair
    x = torch.rand(1, 3, 104, 136, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist
    got = seamless_encode(vae, x, tile=32)
    torch.testing.assert_close(got.mean, expected.mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(got.logvar, expected.logvar, atol=1e-4, rtol=0)


def test_every_convolution_runs_on_tiles_no_larger_than_asked_plus_its_halo(pair, monkeypatch, one_thread):
    _, vae = pair
    real, sides = torch.nn.functional.conv2d, []

    def conv2d(x, weight, *args, **kwargs):
        if weight.shape[-1] == 3:  # the 1x1 convs at latent size (post_quant_conv) run whole
            sides.append(max(x.shape[-2:]))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(seamless_vae.F, "conv2d", conv2d)
    seamless_decode(vae, _latents(16, 16), tile=8)  # the output is 128 px a side
    assert sides and max(sides) <= 8 + 2  # a 3x3 kernel reads one pixel more on each side
    assert len(sides) > 100


def test_the_levels_script_runs_each_level_in_its_own_process(capsys):
    from scriptload import load_script

    assert load_script("vae_levels").main(["--tiny", "--size", "128"]) == 0
    rows = {r["level"]: r for r in map(json.loads, capsys.readouterr().out.splitlines()[1:])}
    assert set(rows) == {"fast", "seamless", "tiled"}
    assert rows["fast"]["max_difference"] == 0 and rows["seamless"]["max_difference"] <= 1
    assert all(r["peak_rss_growth_mib"] >= 0 and r["estimate_mib"] > 0 for r in rows.values())


def test_activations_can_live_on_another_device_than_the_tiles(pair, one_thread):
    # On the CPU both are the CPU; scripts/gpu_check.sh runs this with the tiles on the GPU.
    _, vae = pair
    vae = copy.deepcopy(vae).to(TEST_DEVICE)
    z = _latents(8, 8)
    with torch.no_grad():
        whole = vae.decode(z.to(TEST_DEVICE)).cpu()
    parked = seamless_decode(vae, z.to(TEST_DEVICE), tile=16, store="cpu")
    assert parked.device.type == torch.device(TEST_DEVICE).type  # returned where the latents are
    torch.testing.assert_close(parked.cpu(), whole, atol=1e-4, rtol=0)


def test_a_planned_seamless_vae_computes_on_the_device_parked_or_offloaded(sd1_pipe, monkeypatch, one_thread):
    # Through the memory runner, on the test device (scripts/gpu_check.sh: CUDA). An offloaded
    # VAE's hooks move it only when its forward runs, which the seamless VAE never calls: the
    # runner must move it onto the device itself, or it would compute in CPU memory.
    from ldm.limits import MEMORY_LEVELS, MemoryPlan
    from ldm.memory import runner_of, use_plan

    pipe = sd1_pipe
    z = _latents(16, 16)[:1].to(TEST_DEVICE)
    whole = pipe.decode(z, "np")
    calls = []
    real = seamless_vae.seamless_decode

    def spy(vae, z, store=None):
        calls.append((store, next(vae.decoder.parameters()).device.type))
        return real(vae, z, store=store)

    monkeypatch.setattr("ldm.memory.seamless_decode", spy)
    moves, real_to = [], pipe.vae.decoder.to  # on the CPU the only trace of the move
    monkeypatch.setattr(pipe.vae.decoder, "to", lambda *a, **k: moves.append(a) or real_to(*a, **k))
    fast = runner_of(pipe).plan
    decoded, moved = {}, {}
    try:
        for level, store in (("seamless", "cpu"), ("offload", None), ("offload", "cpu")):
            use_plan(pipe, MemoryPlan(level, fast.tiling, fast.chunk, MEMORY_LEVELS, "test", "seamless", store))
            moves.clear()
            decoded[level, store] = pipe.decode(z, "np")
            moved[level, store] = list(moves)
    finally:
        use_plan(pipe, MemoryPlan("fast", fast.tiling, fast.chunk, fast.levels, "test"))
    device = torch.device(TEST_DEVICE).type
    assert calls == [("cpu", device), (None, device), ("cpu", device)]
    assert all((pipe.device,) in moved[key] for key in (("offload", None), ("offload", "cpu")))
    for key, image in decoded.items():
        assert abs(image - whole).max() < 2e-3, key  # the same picture, to rounding


@pytest.mark.parametrize("tile, latents, message", [
    (4, _latents(8, 8), "tile must be an int of at least 8 pixels, got 4"),
    (8.0, _latents(8, 8), "tile must be an int of at least 8 pixels, got 8.0"),
    (64, torch.zeros(4, 8, 8), r"latents must be a \[B, C, H, W\] tensor, got torch.Size\(\[4, 8, 8\]\)"),
])
def test_bad_arguments_are_refused(pair, tile, latents, message):
    with pytest.raises(ValueError, match=message):
        seamless_decode(pair[1], latents, tile=tile)
