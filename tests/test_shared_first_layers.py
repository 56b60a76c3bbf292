"""Classifier-free guidance's two halves share the U-Net's first layers
(ldm.models.unet.repeated_halves): they run once, and the output is the whole batch's."""

from __future__ import annotations

import pytest
import torch

from ldm.config import ControlNetConfig, UNetConfig
from ldm.models import unet as unet_module
from ldm.models.controlnet import ControlNetModel
from ldm.models.unet import UNet

TINY = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
            num_attention_heads=(2, 2), layers_per_block=2)


@pytest.fixture
def shared():
    previous = unet_module.set_shared_first_layers("auto")
    yield unet_module.set_shared_first_layers
    unet_module.set_shared_first_layers(previous)


def _cfg_batch(seed: int = 0):
    """The same latents twice (unconditional, conditional) and two different contexts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    return torch.cat([x, x]), torch.randn(2, 7, 32, generator=gen)


def _batch_sizes(model) -> dict[str, list[int]]:
    """The batch each watched layer runs on, call by call."""
    first = model.down_blocks[0]
    block = first.attentions[0].transformer_blocks[0]
    watched = {"conv_in": model.conv_in, "resnet 0": first.resnets[0], "resnet 1": first.resnets[1],
               "self-attention": block.attn1, "cross-attention": block.attn2}
    seen: dict[str, list[int]] = {name: [] for name in watched}
    for name, layer in watched.items():
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(len(args[0])))
    return seen


@torch.no_grad()
def test_the_halves_of_a_guidance_batch_run_the_first_layers_once(shared):
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY)).eval()
    seen = _batch_sizes(model)
    x, context = _cfg_batch()
    out = model(x, 500, context)
    assert seen == {"conv_in": [1], "resnet 0": [1], "self-attention": [1], "cross-attention": [2], "resnet 1": [2]}
    shared("off")
    whole = model(x, 500, context)
    assert seen["conv_in"] == [1, 2] and seen["self-attention"] == [1, 2]
    # The same arithmetic on the same rows: float32 rounding apart (oneDNN may block a
    # batch of one differently), and the halves differ (two contexts).
    torch.testing.assert_close(out, whole, atol=1e-6, rtol=1e-5)
    assert (out[0] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("change", ["latents", "timestep", "odd batch", "gradients"])
def test_anything_that_differs_between_the_halves_runs_the_whole_batch(change):
    torch.manual_seed(0)
    model = UNet(UNetConfig(**TINY)).eval()
    seen = _batch_sizes(model)
    x, context = _cfg_batch()
    t = torch.tensor([500.0, 500.0])
    if change == "latents":
        x = x.clone()
        x[1, 0, 0, 0] += 1e-3
    elif change == "timestep":
        t = torch.tensor([500.0, 499.0])
    elif change == "odd batch":
        x, context, t = torch.cat([x, x[:1]]), torch.cat([context, context[:1]]), torch.full((3,), 500.0)
    with torch.set_grad_enabled(change == "gradients"):
        if change == "gradients":
            x = x.requires_grad_()
        model(x, t, context)
    assert seen["conv_in"] == [len(x)] and seen["self-attention"] == [len(x)]


@torch.no_grad()
@pytest.mark.parametrize("hint_rows", [1, 2])
def test_a_controlnet_shares_them_too_when_its_hint_repeats(shared, hint_rows):
    torch.manual_seed(0)
    net = ControlNetModel(ControlNetConfig(unet=UNetConfig(**TINY))).eval()
    seen = _batch_sizes(net)
    x, context = _cfg_batch()
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)).expand(hint_rows, -1, -1, -1)
    out = net(x, 500, context, hint)
    assert seen["conv_in"] == [1] and seen["self-attention"] == [1] and seen["cross-attention"] == [2]
    shared("off")
    whole = net(x, 500, context, hint)
    for a, b in zip([*out.down, out.mid], [*whole.down, whole.mid]):
        assert a.shape == b.shape and a.shape[0] == 2
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Another hint per half: no sharing.
    shared("auto")
    net(x, 500, context, torch.rand(2, 3, 64, 64))
    assert seen["conv_in"][-1] == 2


@torch.no_grad()
def test_shared_layers_keep_the_memory_layout():
    # channels_last (the bfloat16 U-Net's layout on the CPU) survives the repeat: no copies back.
    x, context = _cfg_batch()
    model = UNet(UNetConfig(**TINY)).eval().to(memory_format=torch.channels_last)
    skips = []
    model.down_blocks[0].register_forward_hook(lambda _m, _a, out: skips.extend(out[1]))
    model(x, 500, context)
    assert all(s.shape[0] == 2 and s.is_contiguous(memory_format=torch.channels_last) for s in skips)
