"""Linear layers with the bias and GEGLU's gate fused into oneDNN's matmul
(ldm.models.fused_linear): what they compute, where they run, and what keeps them off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models import fused_linear as fl
from ldm.models.layers import GEGLU

pytestmark = pytest.mark.skipif(torch.float32 not in fl.fusable_dtypes(), reason="torch built without oneDNN")


@pytest.fixture
def mode():
    previous = fl.set_fused_linear("auto")
    yield fl.set_fused_linear
    fl.set_fused_linear(previous)


def _linear(c_in=24, c_out=40, seed=0, cls=fl.FusedLinear):
    torch.manual_seed(seed)
    return cls(c_in, c_out).requires_grad_(False)


def _relative(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def test_it_is_an_nn_linear_with_the_same_keys_and_output(mode):
    plain = _linear(cls=nn.Linear)
    layer = _linear()
    assert isinstance(layer, nn.Linear) and layer.state_dict().keys() == plain.state_dict().keys()
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(2, 7, 24)
    for inputs in (x, x[0], x.transpose(0, 1)):  # 3-D, 2-D, not contiguous
        assert fl.use_fused_linear(layer, inputs)
        expected = F.linear(inputs.double(), plain.weight.double(), plain.bias.double())
        torch.testing.assert_close(layer(inputs).double(), expected, atol=1e-5, rtol=1e-5)
    mode("off")
    assert not fl.use_fused_linear(layer, x) and torch.equal(layer(x), plain(x))


def test_it_calls_onednn_where_it_runs(monkeypatch, mode):
    calls = []
    op = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):
            calls.append(args[3])
            return op(*args)

        def binary(self, *args):
            calls.append(args[-1])
            return op.binary(*args)

    monkeypatch.setattr(fl.torch.ops.mkldnn, "_linear_pointwise", Spy(), raising=False)
    layer, x = _linear(), torch.randn(3, 24)
    layer(x)
    fl.geglu(_linear(24, 80), x)
    assert calls == ["none", "gelu", "mul"]
    mode("off")
    layer(x)
    assert calls == ["none", "gelu", "mul"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_gates_one_half_by_the_gelu_of_the_other(dtype):
    # Against the formula in float64; bfloat16 within twice the unfused path's rounding.
    if dtype not in fl.fusable_dtypes():
        pytest.skip("bfloat16 not native in oneDNN here")
    module = GEGLU(32, 48).requires_grad_(False)
    x = torch.randn(2, 9, 32)
    w, b = module.proj.weight.double(), module.proj.bias.double()
    h, gate = F.linear(x.double(), w, b).chunk(2, dim=-1)
    expected = h * F.gelu(gate)
    module.to(dtype)
    got = module(x.to(dtype))
    assert got.shape == (2, 9, 48) and got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    else:
        h, g = F.linear(x.to(dtype), module.proj.weight, module.proj.bias).chunk(2, dim=-1)
        assert _relative(got, expected) < 2 * _relative(h * F.gelu(g), expected)


def test_training_and_hooks_get_the_plain_layers():
    # The op has no backward: with gradients wanted the layer is F.linear and gradients flow;
    # a forward hook on GEGLU's projection (a LoRA being trained) still sees it called.
    layer = _linear().requires_grad_(True)
    x = torch.randn(3, 24, requires_grad=True)
    assert not fl.use_fused_linear(layer, x)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, x.detach().sum(0).expand(40, 24))  # d sum(x W^T + b) / dW
    torch.testing.assert_close(x.grad, layer.weight.detach().sum(0).expand(3, 24))
    assert layer.bias.grad.eq(3).all()
    with torch.no_grad():
        assert fl.use_fused_linear(layer, x)
    module = GEGLU(24, 16).requires_grad_(False)
    seen = []
    module.proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        module(torch.randn(5, 24))
    assert seen == [(5, 32)]
    # A forward patched onto the projection (accelerate's hooks do so) is called too.
    patched = GEGLU(24, 16).requires_grad_(False)
    plain_forward = patched.proj.forward
    patched.proj.forward = lambda x: seen.append("patched") or plain_forward(x)
    with torch.no_grad():
        patched(torch.randn(5, 24))
    assert seen[-1] == "patched"


def test_where_it_runs(monkeypatch):
    layer, x = _linear(), torch.randn(4, 24)
    assert fl.use_fused_linear(layer, x)
    assert not fl.use_fused_linear(_linear().float().requires_grad_(False), x.double())  # dtype
    assert not fl.use_fused_linear(layer, x.half())
    assert not fl.use_fused_linear(nn.Linear(24, 40, bias=False), x)  # nothing to fuse
    assert not fl.use_fused_linear(layer, x.to("meta"))  # only on the CPU
    assert not fl.use_fused_linear(_linear().to("meta"), x)  # weights elsewhere (offloaded)
    assert not fl.use_fused_linear(layer, x[0])  # 1-D
    monkeypatch.setattr(fl.torch.compiler, "is_compiling", lambda: True)
    assert not fl.use_fused_linear(layer, x)  # torch.compile fuses on its own
    monkeypatch.undo()
    fl.fusable_dtypes.cache_clear()
    monkeypatch.setattr(fl.torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    try:
        assert fl.fusable_dtypes() == (torch.float32,)  # emulated bfloat16: not fused
        assert not fl.use_fused_linear(layer.bfloat16(), x.bfloat16())
    finally:
        monkeypatch.undo()
        fl.fusable_dtypes.cache_clear()
    with pytest.raises(ValueError, match="fused linear mode must be one of"):
        fl.set_fused_linear("fast")
