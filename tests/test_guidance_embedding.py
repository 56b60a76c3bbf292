"""A guidance-distilled U-Net (LCM's ``time_cond_proj_dim``) against diffusers: the
guidance-scale embedding against the LCM pipeline's ``get_guidance_scale_embedding``, and
the U-Net with its ``cond_proj`` against ``UNet2DConditionModel``, same random weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

from ldm.config import UNetConfig
from ldm.models.layers import guidance_scale_embedding
from ldm.models.unet import UNet

TINY = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
            norm_num_groups=8, time_cond_proj_dim=24)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: threads only contend on a busy machine."""


@pytest.fixture(scope="module")
def unets():
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY, attention_head_dim=2).eval()
    ours = UNet(UNetConfig(**TINY, num_attention_heads=(2, 2)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours.eval()


@pytest.mark.parametrize("dim", [256, 24, 7])
def test_embedding_matches_diffusers(dim):
    w = torch.tensor([0.0, 0.5, 2.0, 7.5, 14.0])  # w = guidance - 1, up to LCM's training range
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_scale_embedding(w, dim), expected)


@torch.no_grad()
def test_unet_with_guidance_embedding_matches_diffusers(unets):
    ref, ours = unets
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([999.0, 259.0])
    cond = guidance_scale_embedding(torch.tensor([7.5, 1.0]), 24)
    expected = ref(x, t, encoder_hidden_states=context, timestep_cond=cond).sample
    got = ours(x, t, context, timestep_cond=cond)
    assert (got - expected).abs().max().item() < 1e-4
    # The embedding is an input that matters: another guidance scale, another prediction.
    other = ours(x, t, context, timestep_cond=guidance_scale_embedding(torch.tensor([2.0, 1.0]), 24))
    assert (other - got)[0].abs().max().item() > 1e-3


def test_guidance_embedding_is_required_and_checked(unets):
    _, ours = unets
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="guidance-distilled.*needs timestep_cond"):
        ours(x, 10, context)
    with pytest.raises(ValueError, match=r"shape \(1, 24\)"):
        ours(x, 10, context, timestep_cond=torch.zeros(1, 16))
    plain = UNet(UNetConfig(**{**TINY, "time_cond_proj_dim": None}, num_attention_heads=(2, 2)))
    with pytest.raises(ValueError, match="has none"):
        plain(x, 10, context, timestep_cond=torch.zeros(1, 24))


@pytest.mark.parametrize("bad", [0, 1, -3, 2.5, True])
def test_config_refuses_bad_width(bad):
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        UNetConfig(**{**TINY, "time_cond_proj_dim": bad}, num_attention_heads=(2, 2))


def test_guidance_embedding_input_checks():
    with pytest.raises(ValueError, match="one per row"):
        guidance_scale_embedding(torch.zeros(2, 1), 8)
    with pytest.raises(ValueError, match="at least 2"):
        guidance_scale_embedding(torch.zeros(2), 1)
