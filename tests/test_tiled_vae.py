"""Tiled VAE decode / encode (ldm.tiled_vae) against diffusers' enable_tiling() and the untiled VAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import SD1_TINY, build_reference

from ldm.config import VAEConfig
from ldm.foreign_config import vae_from_diffusers
from ldm.models.vae import AutoencoderKL
from ldm.tiled_vae import Tiling, tile_starts, tiled_decode, tiled_encode


@pytest.fixture(scope="module")
def pair():
    """diffusers' tiny VAE with tiling on, and ours with the same weights (tiles of 8
    latents = 64 px, diffusers' sample_size 64; overlap 2 latents = 16 px)."""
    _, ref, _ = build_reference(SD1_TINY, seed=3)
    ref.enable_tiling()
    vae = AutoencoderKL(vae_from_diffusers(dict(ref.config))).eval()
    vae.load_state_dict(ref.state_dict(), strict=True)
    return ref, vae


def _diffusers_starts(length: int, tile: int, overlap: int) -> list[int]:
    # diffusers: range(0, length, tile - overlap), less any tile lying inside the previous one.
    starts = list(range(0, length, tile - overlap))
    return [s for k, s in enumerate(starts) if k == 0 or starts[k - 1] + tile < length]


@pytest.mark.parametrize("length", [1, 8, 9, 14, 15, 20, 22, 23, 64, 256])
def test_tiles_cover_every_side_and_each_seam_overlaps_exactly(length):
    starts = tile_starts(length, 8, 2)
    assert starts == _diffusers_starts(length, 8, 2)
    assert starts[-1] + 8 >= length  # the last tile reaches the end
    for a, b in zip(starts, starts[1:]):
        assert b - a == 6  # every seam overlaps by exactly 2
    if len(starts) > 1:
        assert length - starts[-1] > 2  # no tile lies inside the one before it


@pytest.mark.parametrize("hw", [(22, 22), (22, 16), (16, 30)])
def test_tiled_decode_and_encode_equal_diffusers_enable_tiling(pair, hw, one_thread):
    ref, vae = pair
    g = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    z = torch.randn(1, 4, *hw, generator=g)
    x = torch.rand(1, 3, hw[0] * 8, hw[1] * 8, generator=g) * 2 - 1
    with torch.inference_mode():
        decoded, expected = tiled_decode(vae, z), ref.decode(z).sample
        posterior, reference = tiled_encode(vae, x), ref.encode(x).latent_dist
    assert decoded.shape == expected.shape == (1, 3, hw[0] * 8, hw[1] * 8)
    torch.testing.assert_close(decoded, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.mean, reference.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.logvar, reference.logvar, atol=1e-5, rtol=0)


def test_where_diffusers_adds_a_tile_inside_the_last_one_only_that_band_differs(pair, one_thread):
    # 20 latents: diffusers starts tiles at 0, 6, 12 and 18; the one at 18 (2 latents) lies
    # inside the one at 12, and is blended into the last 16 pixels. We stop at 12.
    ref, vae = pair
    z = torch.randn(1, 4, 20, 20, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours, theirs = tiled_decode(vae, z), ref.decode(z).sample
    torch.testing.assert_close(ours[..., :144, :144], theirs[..., :144, :144], atol=1e-5, rtol=0)
    assert (ours[..., 144:, :] - theirs[..., 144:, :]).abs().max() > 1e-3


def test_an_image_that_fits_one_tile_is_decoded_and_encoded_whole(pair, one_thread):
    _, vae = pair
    z = torch.randn(2, 4, 8, 7, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        assert torch.equal(tiled_decode(vae, z), vae.decode(z))
        assert torch.equal(tiled_encode(vae, x).mean, vae.encode(x).mean)


class _PointwiseVAE(torch.nn.Module):
    """A VAE without spatial context (1x1 convs, nearest up / average down by the factor):
    every output pixel depends on its own input pixel only, so tiling must change nothing,
    whatever the size: what is left to test is the placement, blending weights and crops."""

    def __init__(self) -> None:
        super().__init__()
        self.config = VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)
        gen = torch.Generator().manual_seed(0)
        self.post_quant = torch.nn.Conv2d(4, 3, 1)
        self.encoder = torch.nn.Sequential(torch.nn.AvgPool2d(8), torch.nn.Conv2d(3, 8, 1))
        self.quant_conv = torch.nn.Conv2d(8, 8, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.post_quant(z), scale_factor=8.0, mode="nearest")


@pytest.mark.parametrize("tiling", [Tiling(8, 2), Tiling(6, 3), Tiling(5, 1)])
@pytest.mark.parametrize("hw", [(23, 17), (9, 40), (31, 31)])
def test_tiling_a_vae_without_spatial_context_changes_nothing_at_any_size(tiling, hw):
    vae = _PointwiseVAE()
    z = torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 3, hw[0] * 8, hw[1] * 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(tiled_decode(vae, z, tiling), vae.decode(z), atol=1e-5, rtol=1e-5)
        whole = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
        torch.testing.assert_close(tiled_encode(vae, x, tiling).mean, whole, atol=1e-5, rtol=1e-5)


def test_default_tiles_follow_diffusers_sample_size():
    assert Tiling.for_vae(VAEConfig()) == Tiling(64, 16)  # SD: 512 px tiles, a quarter overlapping
    assert Tiling.for_vae(VAEConfig(sample_size=1024)) == Tiling(128, 32)  # SDXL's VAE


@pytest.mark.parametrize("args, message", [
    ((1, 1), "at least 2"), ((8, 0), "overlap must be in 1..4"), ((8, 5), "overlap must be in 1..4"),
])
def test_bad_tilings_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        Tiling(*args)
    with pytest.raises(TypeError, match="tile must be an int"):
        Tiling(8.0, 2)


def test_bad_inputs_are_refused(pair):
    _, vae = pair
    with pytest.raises(ValueError, match=r"latents must be a \[B, C, H, W\] tensor"):
        tiled_decode(vae, torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        tiled_encode(vae, torch.zeros(1, 3, 100, 64))
    with pytest.raises(ValueError, match="at least 1"):
        tile_starts(0, 8, 2)


def test_seam_script_replays_recorded_group_norm_statistics(pair, capsys, one_thread):
    """scripts/tiled_vae_seams.py: a GroupNorm replaying the statistics it recorded on an input
    gives nn.GroupNorm's output on that input, and other statistics on another; the script runs."""
    from scriptload import load_script

    seams = load_script("tiled_vae_seams")
    _, vae = pair
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z)
        with seams.fixed_group_norm_statistics(vae, record=True):
            vae.decode(z)
        with seams.fixed_group_norm_statistics(vae, record=False):
            torch.testing.assert_close(vae.decode(z), plain, atol=1e-5, rtol=1e-5)
            tile = vae.decode(z[..., :8, :8])  # normalised with the whole input's statistics
        assert (tile - vae.decode(z[..., :8, :8])).abs().max() > 1e-4  # nn.GroupNorm again
    assert seams.main(["--size", "48", "--tiles", "4:1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("tiles of 4 latents")]
    assert len(rows) == 3 and all(" / " in r for r in rows)
    seamless = [line for line in out if "memory='seamless'" in line]
    assert len(seamless) == 1 and int(seamless[0].split("decodes")[1].split("/")[0]) <= 1
