"""Token merging (ldm.models.token_merging) against a brute-force reading of the method, and
in the U-Net and the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.config import UNetConfig
from ldm.models.token_merging import bipartite_merge, set_token_merging
from ldm.models.unet import UNet
from test_speedups import TINY




def _brute_force(x: torch.Tensor, h: int, w: int, r: int) -> torch.Tensor:
    """What merge, an identity in between, then unmerge gives, token by token: destinations
    are the top-left token of each whole 2x2 cell, every other token is a source; each
    source's best destination by cosine similarity; the r sources most similar to theirs are
    averaged with it (the destination too), and all of them take that average."""
    out = x.clone()
    for row in range(x.shape[0]):
        tokens = x[row]
        dst = [i * w + j for i in range(0, h - h % 2, 2) for j in range(0, w - w % 2, 2)]
        src = [k for k in range(h * w) if k not in dst]
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        best = {s: max(dst, key=lambda d: float(unit[s] @ unit[d])) for s in src}
        sim = {s: float(unit[s] @ unit[best[s]]) for s in src}
        merged = sorted(src, key=lambda s: -sim[s])[:r]
        for d in dst:
            group = [d] + [s for s in merged if best[s] == d]
            mean = tokens[group].double().mean(0).to(x.dtype)
            out[row, group] = mean
    return out


@pytest.mark.parametrize("h, w, ratio", [(8, 8, 0.5), (5, 7, 0.3), (6, 4, 0.75)])
def test_merge_then_unmerge_is_the_method_token_by_token(h, w, ratio):
    x = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(h * w))
    r = int(h * w * ratio)
    merge, unmerge = bipartite_merge(x, h, w, r)
    sources = h * w - (h // 2) * (w // 2)
    assert merge(x).shape == (2, h * w - min(r, sources), 16)
    torch.testing.assert_close(unmerge(merge(x)), _brute_force(x, h, w, min(r, sources)), atol=1e-5, rtol=0)


def test_nothing_to_merge_is_the_identity():
    x = torch.randn(1, 16, 8)
    merge, unmerge = bipartite_merge(x, 4, 4, 0)
    assert merge(x) is x and unmerge(x) is x
    with pytest.raises(ValueError, match="15 tokens are not a 4x4 grid"):
        bipartite_merge(x[:, :15], 4, 4, 4)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, float("nan"), "0.5", True])
def test_bad_ratios_are_refused(ratio):
    with pytest.raises(ValueError, match="token merging ratio must be a number in \\[0, 1\\)"):
        set_token_merging(UNet(UNetConfig(**TINY)), ratio)


@torch.no_grad()
def test_the_unet_merges_only_at_its_first_level_and_zero_is_the_plain_unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(**TINY)).eval()
    gen = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    t = torch.tensor([500.0, 20.0])
    plain = unet(x, t, context)
    set_token_merging(unet, 0.5)
    ratios = {name: m.merge_ratio for name, m in unet.named_modules() if hasattr(m, "merge_ratio")}
    assert ratios and all((v == 0.5) == (n.startswith(("down_blocks.0.", "up_blocks.1."))) for n, v in ratios.items())
    merged = unet(x, t, context)
    set_token_merging(unet, 0.0)
    assert torch.equal(unet(x, t, context), plain)
    difference = (merged - plain).abs().mean() / plain.abs().mean()
    assert 0 < difference < 0.5  # a changed but related prediction


def test_the_pipeline_merges_for_the_call_only(sd1_pipe, one_thread):
    kwargs = dict(steps=4, seed=5, width=64, height=64, output="np", progress=False)
    plain = sd1_pipe("a cat", **kwargs)
    merged = sd1_pipe("a cat", token_merging=0.5, **kwargs)
    assert np.array_equal(sd1_pipe("a cat", token_merging=0.5, **kwargs), merged)  # the seed decides it
    assert 0 < np.abs(merged - plain).mean() < 0.1
    assert all(m.merge_ratio == 0 for m in sd1_pipe.unet.modules() if hasattr(m, "merge_ratio"))
    assert np.array_equal(sd1_pipe("a cat", **kwargs), plain)


def test_the_bench_times_a_merged_step_against_the_full_one():
    from scriptload import load_script

    torch.manual_seed(0)
    unet = UNet(UNetConfig(**TINY)).eval()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        row = load_script("bench").bench_token_merging(unet, x, t, context, 1, torch.device("cpu"))
    assert row["U-Net step, token_merging 0.5 (ms)"] > 0 and row["token_merging 0.5 step / full step"] > 0
    assert all(m.merge_ratio == 0 for m in unet.modules() if hasattr(m, "merge_ratio"))
