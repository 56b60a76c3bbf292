"""U-Net and VAE parity with diffusers: same keys and shapes, same numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.config import SD1, SD2, UNetConfig, VAEConfig
from ldm.foreign_config import unet_from_diffusers, unet_to_diffusers, vae_from_diffusers, vae_to_diffusers
from ldm.models.layers import Attention
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from reference import SD1_TINY, SD2V_TINY, _randomize, build_reference

TOL = 1e-4


@pytest.fixture(scope="module", params=[SD1_TINY, SD2V_TINY], ids=lambda s: s.name)
def pair(request):
    """(diffusers unet, ours, diffusers vae, ours) with the same random weights."""
    ref_unet, ref_vae, _ = build_reference(request.param, seed=3)
    unet = UNet(unet_from_diffusers(dict(ref_unet.config))).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    vae = AutoencoderKL(vae_from_diffusers(dict(ref_vae.config))).eval()
    vae.load_state_dict(ref_vae.state_dict(), strict=True)
    return ref_unet, unet, ref_vae, vae


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "shape, timestep, context_len",
    [
        ((2, 4, 8, 8), torch.tensor([999, 3.5]), 77),
        ((2, 4, 8, 8), torch.tensor(500), 154),  # long prompt: two 77-token chunks
        ((2, 4, 10, 6), 1.0, 77),  # latent size not a multiple of 2**(levels-1)
        ((1, 4, 7, 5), torch.tensor([12]), 77),
    ],
)
@torch.no_grad()
def test_unet_matches_diffusers(pair, shape, timestep, context_len, winograd):
    ref, ours, _, _ = pair
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    context = torch.randn(shape[0], context_len, ref.config.cross_attention_dim, generator=gen)
    expected = ref(x, timestep, encoder_hidden_states=context).sample
    got = ours(x, timestep, context)
    assert _max_diff(got, expected) < TOL


@torch.no_grad()
def test_three_level_unet_with_deep_transformers_matches_diffusers():
    """Three levels (so a middle up block gets a forced upsample size), two resnets and
    two transformer layers per block, a plain level at the bottom, upcast attention."""
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=2,
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=24,
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=8,
    ).eval()
    _randomize(ref, seed=5)
    ours = UNet(unet_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 11, 6, generator=gen)
    context = torch.randn(2, 77, 24, generator=gen)
    t = torch.tensor([999.0, 0.5])
    assert _max_diff(ours(x, t, context), ref(x, t, encoder_hidden_states=context).sample) < TOL


@torch.no_grad()
def test_vae_matches_diffusers(pair, winograd):
    _, _, ref, ours = pair
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 32, 24, generator=gen) * 2 - 1
    expected = ref.encode(image).latent_dist
    got = ours.encode(image)
    assert _max_diff(got.mean, expected.mean) < TOL
    assert _max_diff(got.logvar, expected.logvar) < TOL
    assert _max_diff(got.std, expected.std) < TOL

    z = torch.randn(2, 4, 5, 3, generator=gen)
    assert _max_diff(ours.decode(z), ref.decode(z).sample) < TOL

    # diffusers draws the noise from the CPU generator too, in the latent's dtype (float32 here).
    sample = got.sample(torch.Generator().manual_seed(7))
    ref_sample = expected.sample(torch.Generator().manual_seed(7))
    assert _max_diff(sample, ref_sample) < TOL
    assert torch.equal(got.mode(), got.mean)


def _meta_diffusers(cls, config: dict):
    from accelerate import init_empty_weights

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights():
        return cls(**config)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("config", [SD1.unet, SD2.unet], ids=["sd1", "sd2"])
def test_full_size_unet_keys_and_shapes(config: UNetConfig):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        ours = UNet(config)
    ref = _meta_diffusers(UNet2DConditionModel, unet_to_diffusers(config))
    assert ours.device.type == "meta"
    assert _shapes(ours) == _shapes(ref)
    assert len(_shapes(ours)) == 686


def test_full_size_vae_keys_and_shapes():
    from diffusers import AutoencoderKL as RefAutoencoderKL

    config = VAEConfig()
    with torch.device("meta"):
        ours = AutoencoderKL(config)
    ref = _meta_diffusers(RefAutoencoderKL, vae_to_diffusers(config))
    assert _shapes(ours) == _shapes(ref)


def test_sd2_layout_has_linear_projection_and_per_level_heads():
    with torch.device("meta"):
        unet = UNet(SD2.unet)
    transformer = unet.down_blocks[1].attentions[0]
    assert isinstance(transformer.proj_in, torch.nn.Linear)
    assert transformer.transformer_blocks[0].attn1.heads == 10
    assert unet.mid_block.attentions[0].transformer_blocks[0].attn1.heads == 20


@torch.no_grad()
def test_upcast_attention_same_in_float32():
    base = unet_from_diffusers(dict(SD2V_TINY.unet))
    plain = UNet(dataclasses.replace(base, upcast_attention=False)).eval()
    upcast = UNet(dataclasses.replace(base, upcast_attention=True)).eval()
    upcast.load_state_dict(plain.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([10, 900])
    assert torch.equal(plain(x, t, context), upcast(x, t, context))


@torch.no_grad()
def test_upcast_attention_computes_in_float32():
    """In bfloat16, upcasting equals float32 attention on the same (bf16) projections."""
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, context_dim=12, upcast=True).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    ctx = torch.randn(2, 7, 12, dtype=torch.bfloat16)
    q, k, v = attn.to_q(x), attn.to_k(ctx), attn.to_v(ctx)
    expected = attn._attend(q.float(), k.float(), v.float()).to(torch.bfloat16)
    assert torch.equal(attn._attend(q, k, v), expected)


def test_models_expose_dtype_and_device():
    vae = AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4))
    assert vae.dtype == torch.float32 and vae.device.type == "cpu"
    assert vae.to(torch.float16).dtype == torch.float16


def test_unknown_block_type_is_refused():
    config = dataclasses.replace(
        unet_from_diffusers(dict(SD1_TINY.unet)),
        down_block_types=("CrossAttnDownBlock2D", "SimpleDownBlock2D"),
    )
    with pytest.raises(ValueError, match="SimpleDownBlock2D"):
        UNet(config)
