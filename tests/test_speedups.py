"""The opt-in speed-ups: guidance that stops early (``guidance_end``) against diffusers'
documented dynamic classifier-free guidance, and DeepCache's feature reuse
(``cache_interval``) by its properties (no reference implementation ships with diffusers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm import Pipeline
from ldm.config import UNetConfig
from ldm.models.feature_cache import FeatureCache
from ldm.models.layers import ResnetBlock2D, norm_silu
from ldm.models.unet import UNet
from reference import load_reference_pipeline

SIZE = 64
STEPS = 6
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels

TINY = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
            num_attention_heads=(2, 2))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: threads only contend on a busy machine."""


@pytest.fixture(scope="module")
def pipes(sd1_folder):
    return load_reference_pipeline(sd1_folder), Pipeline.from_pretrained(sd1_folder, device="cpu")


def _generators(n: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(100 + k) for k in range(n)]


@pytest.mark.parametrize("sampler,scheduler", [("dpmpp_2m", "DPMSolverMultistepScheduler"),
                                               ("euler_a", "EulerAncestralDiscreteScheduler")])
@pytest.mark.parametrize("end", [0.5, 0.67])
def test_guidance_end_matches_diffusers_dynamic_cfg(pipes, sampler, scheduler, end):
    """diffusers' "dynamic classifier-free guidance": a step-end callback that sets the
    guidance scale to 0 and keeps the conditional half of the prompt embeddings. The
    callback runs after a step, so it fires after the last guided one."""
    import diffusers

    ref, ours = pipes
    guided = int(STEPS * end)

    def drop_guidance(pipe, index, timestep, kwargs):
        if index == guided - 1:
            pipe._guidance_scale = 0.0
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
        return kwargs

    ref_pipe = type(ref)(**{**ref.components, "scheduler": getattr(diffusers, scheduler).from_config(
        ref.scheduler.config)})
    ref_pipe.set_progress_bar_config(disable=True)
    expected = ref_pipe(PROMPTS, negative_prompt=[NEGATIVE] * 2, num_inference_steps=STEPS, guidance_scale=7.5,
                        generator=_generators(2), height=SIZE, width=SIZE, output_type="np",
                        callback_on_step_end=drop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    got = ours(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, seed=100, width=SIZE, height=SIZE,
               sampler=sampler, output="np", progress=False, guidance_end=end)
    assert np.abs(got - expected).max() <= TOLERANCE
    full = ours(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, seed=100, width=SIZE,
                height=SIZE, sampler=sampler, output="np", progress=False)
    assert np.abs(got - full).max() > 2 * TOLERANCE  # the option does something


def test_guidance_end_counts_unet_passes(pipes, monkeypatch):
    """From step int(steps * end) on, one pass per step of the batch, not two."""
    _, ours = pipes
    rows = []
    original = ours._unet_call
    monkeypatch.setattr(ours, "_unet_call", lambda x, t, c, cache=None: rows.append(len(x)) or original(x, t, c))
    ours("a cat", steps=STEPS, seed=0, width=SIZE, height=SIZE, sampler="euler", output="np", progress=False,
         guidance_end=0.5)
    assert rows == [2] * 3 + [1] * 3


@pytest.mark.parametrize("kwargs,match", [
    (dict(guidance_end=0.0), "guidance_end must be a fraction"),
    (dict(guidance_end=1.5), "guidance_end must be a fraction"),
    (dict(guidance_end=float("nan")), "guidance_end"),
    (dict(guidance_end=0.1), "leaves no guided step"),
    (dict(guidance_end=0.5, guidance_scale=1.0), "runs none"),
    (dict(cache_interval=0), "cache_interval"),
    (dict(cache_interval=2.5), "cache_interval"),
    (dict(token_merging=1.0), r"token_merging must be a fraction of the tokens in \[0, 1\)"),
    (dict(token_merging=-0.2), "token_merging must be a fraction"),
])
def test_bad_speedup_options_are_refused(pipes, kwargs, match):
    _, ours = pipes
    with pytest.raises(ValueError, match=match):
        ours("a cat", steps=STEPS, seed=0, width=SIZE, height=SIZE, output="np", progress=False, **kwargs)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(**TINY, layers_per_block=2)).eval()


def _inputs(seed: int = 1, batch: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 77, 32, generator=gen)


@torch.no_grad()
def test_interval_one_is_the_plain_unet(unet):
    x, context = _inputs()
    cache = FeatureCache(1)
    for t in (999, 500, 20):
        assert torch.equal(unet(x, t, context, cache=cache), unet(x, t, context))
    assert (cache.calls, cache.full) == (3, 3)


@pytest.mark.parametrize("branch", [1, 2])
@torch.no_grad()
def test_shallow_pass_on_its_own_input_equals_the_full_pass(unet, branch):
    """The kept feature is exact for the input it came from: the shallow branch on the
    same input rebuilds the full pass's output (to float rounding)."""
    x, context = _inputs()
    cache = FeatureCache(2, branch=branch)
    full = unet(x, 500, context, cache=cache)
    shallow = unet(x, 500, context, cache=cache)
    assert (cache.calls, cache.full) == (2, 1)
    assert (shallow - full).abs().max().item() < 1e-5
    # On another input it is an approximation: the deep part is stale.
    y, _ = _inputs(seed=2)
    stale = unet(y, 480, context, cache=FeatureCache(2, branch=branch))  # a fresh cache: a full pass
    cache.calls = 1  # the next call reuses
    reused = unet(y, 480, context, cache=cache)
    assert 1e-4 < (reused - stale).abs().max().item()


@torch.no_grad()
def test_shallow_pass_takes_controlnet_residuals(unet):
    x, context = _inputs()
    gen = torch.Generator().manual_seed(3)
    _, skips = unet.encode(unet.conv_in(x), unet.embed(x, 500), context)
    down = [0.1 * torch.randn(s.shape, generator=gen) for s in skips]
    mid = torch.zeros(2, 64, 4, 4)
    cache = FeatureCache(2)
    full = unet(x, 500, context, down_residuals=down, mid_residual=mid, cache=cache)
    shallow = unet(x, 500, context, down_residuals=down, mid_residual=mid, cache=cache)
    assert (shallow - full).abs().max().item() < 1e-5


@torch.no_grad()
def test_full_pass_every_interval_and_on_a_new_batch_shape(unet):
    x, context = _inputs()
    cache = FeatureCache(3)
    for t in range(7):
        unet(x, 900 - 100 * t, context, cache=cache)
    assert (cache.calls, cache.full) == (7, 3)  # evaluations 0, 3, 6
    unet(x[:1], 200, context[:1], cache=cache)  # evaluation 7 would reuse, but the batch changed
    assert cache.full == 4


def test_feature_cache_checks():
    with pytest.raises(ValueError, match="interval must be an integer >= 1"):
        FeatureCache(0)
    with pytest.raises(ValueError, match="branch must be an integer >= 1"):
        FeatureCache(2, branch=0)
    shallow = UNet(UNetConfig(**TINY, layers_per_block=1))
    x, context = _inputs()
    with pytest.raises(ValueError, match="branch 2 is deeper"):
        shallow(x, 10, context, cache=FeatureCache(2, branch=2))


def test_cache_interval_in_the_pipeline(pipes, monkeypatch):
    """Every N-th U-Net evaluation of a call is full; the pictures change but stay finite,
    and each sub-batch of the call starts with a full pass."""
    _, ours = pipes
    caches = []
    original = ours._unet_call

    def spy(x, t, c, cache=None):
        if cache is not None and cache not in caches:
            caches.append(cache)
        return original(x, t, c, cache)

    monkeypatch.setattr(ours, "_unet_call", spy)
    kw = dict(steps=STEPS, seed=100, width=SIZE, height=SIZE, sampler="euler", output="np", progress=False)
    got = ours(PROMPTS, **kw, cache_interval=3)
    assert [(c.calls, c.full) for c in caches] == [(STEPS, 2)]
    plain = ours(PROMPTS, **kw)
    assert np.isfinite(got).all() and np.abs(got - plain).max() > 1e-3


# --- the command line, batch files and the PNG text ------------------------------------------


def _pixels(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_generate_records_the_speedups_and_from_makes_the_same_picture(sd1_folder, tmp_path):
    from ldm.cli import main
    from ldm.pngmeta import read_text

    out = tmp_path / "out"
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--steps", "6", "--seed", "3", "--size", "64x64",
                 "--guidance-end", "0.5", "--cache-interval", "2", "--token-merging", "0.5", "--device", "cpu",
                 "-o", str(out)]) == 0
    (made,) = out.glob("*.png")
    text = read_text(made)
    assert "CFG scale: 7.5, Guidance end: 0.5, Cache interval: 2, Token merging ratio: 0.5, Seed: 3" in text
    expected = Pipeline.from_pretrained(sd1_folder, device="cpu")(
        "a cat", steps=6, seed=3, width=64, height=64, guidance_end=0.5, cache_interval=2, token_merging=0.5,
        progress=False)[0]
    assert np.array_equal(_pixels(made), np.asarray(expected))
    again = tmp_path / "again"
    assert main(["generate", "--from", str(made), "--model", str(sd1_folder), "--device", "cpu",
                 "-o", str(again)]) == 0
    (remade,) = again.glob("*.png")
    assert read_text(remade) == text and np.array_equal(_pixels(remade), _pixels(made))
    # The flags override the image's values; 1 turns each off and leaves its key out.
    off = tmp_path / "off"
    assert main(["generate", "--from", str(made), "--model", str(sd1_folder), "--guidance-end", "1",
                 "--cache-interval", "1", "--token-merging", "0", "--device", "cpu", "-o", str(off)]) == 0
    (plain,) = off.glob("*.png")
    assert all(key not in read_text(plain) for key in ("Guidance end", "Cache interval", "Token merging"))
    assert not np.array_equal(_pixels(plain), _pixels(made))


@pytest.mark.parametrize("extra, message", [
    (["--guidance-end", "0"], "must be a fraction of the steps in (0, 1]"),
    (["--guidance-end", "x"], "expected a fraction in (0, 1]"),
    (["--cache-interval", "0"], "must be an integer >= 1"),
    (["--token-merging", "1"], "must be a fraction of the tokens in [0, 1)"),
    (["--token-merging", "half"], "expected a fraction in [0, 1) such as 0.5"),
    (["--guidance-end", "0.5", "--guidance", "1"], "runs none"),
    (["--guidance-end", "0.1"], "leaves no guided step"),
])
def test_bad_speedup_flags_are_one_line(sd1_folder, tmp_path, capsys, extra, message):
    from ldm.cli import main

    argv = ["generate", "a cat", "--model", str(sd1_folder), "--steps", "6", "--size", "64x64", "--device", "cpu",
            *extra, "-o", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not list(tmp_path.glob("*.png"))


def test_batch_lines_take_the_speedups():
    from pathlib import Path

    from ldm.batchfile import Settings, parse_lines
    from ldm.batchplan import expand, plan_chunks
    from ldm.modelref import ModelRef
    from ldm.speedups import Speedups

    lines = ['{"prompt": "a", "guidance_end": 0.6, "cache_interval": 3, "token_merging": 0.5}', '{"prompt": "b"}',
             '{"prompt": "c", "guidance_end": 0}', '{"prompt": "d", "guidance_end": 0.5, "guidance": 1}',
             '{"prompt": "e", "cache_interval": 1.5}', '{"prompt": "f", "guidance_end": 0.01}',
             '{"prompt": "g", "token_merging": 1}']
    jobs, errors = parse_lines(lines, Settings(speedups=Speedups(cache_interval=2)), True)
    messages = {e.line: e.message for e in errors}
    assert set(messages) == {3, 4, 5, 6, 7}, messages
    assert "token_merging must be a fraction of the tokens" in messages[7]
    assert "must be a fraction" in messages[3] and "runs none" in messages[4]
    assert "cache_interval" in messages[5] and "leaves no guided step" in messages[6]
    assert [j.speedups for j in jobs] == [Speedups(0.6, 3, 0.5), Speedups(1.0, 2)]  # b: the command line's
    items = expand(jobs, 64, ModelRef(Path("m"), "m", "0123456789"))
    first = items[0].params
    assert (first.guidance_end, first.cache_interval, first.token_merging) == (0.6, 3, 0.5)
    assert (items[1].params.guidance_end, items[1].params.cache_interval) == (None, 2)
    assert len(plan_chunks(items, 8, lambda item: 1)) == 2  # other speed-ups: other calls


def test_eval_speedups_smoke_run(tmp_path):
    """The README's table comes from this script: every row scored, timed and compared."""
    import json

    from scriptload import load_script

    evaluate = load_script("eval_speedups")
    rows = ["default", "guidance_end=0.4", "cache_interval=2+guidance_end=0.6"]
    assert evaluate.main(["--smoke", "--rows", *rows, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_speedups.json").read_text())
    assert [r["row"] for r in report["rows"]] == rows
    assert report["rows"][0]["to_first_row"]["mean_abs_255"] == 0
    assert report["rows"][2]["options"] == {"cache_interval": 2, "guidance_end": 0.6}
    for row in report["rows"]:
        assert row["seconds_per_picture"] > 0 and {"kind", "color", "background"} <= set(row["attributes"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--rows", "cache_interval=two"])


# --- torch.compile --------------------------------------------------------------------------


def test_compiled_unet_makes_the_same_picture_and_follows_weight_changes(sd1_folder):
    """Pipeline.compile: the compiled U-Net runs (dynamo captured a frame), its picture
    equals the eager one to float rounding, and a weight changed in place afterwards (as a
    LoRA changes them) applies, since weights are not frozen into the graph."""
    from torch._dynamo.utils import counters

    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    kw = dict(steps=2, seed=1, width=SIZE, height=SIZE, sampler="euler", output="np", progress=False)
    eager = pipe("a cat", **kw)
    captured = counters["frames"]["ok"]
    assert pipe.compile() is pipe
    compiled = pipe("a cat", **kw)
    assert counters["frames"]["ok"] > captured
    assert np.abs(compiled - eager).max() < 1e-4
    bias = pipe.unet.conv_out.bias
    with torch.no_grad():
        bias += 0.2
    try:
        changed = pipe("a cat", **kw)
        pipe._compiled_unet = None  # the same change, eager
        expected = pipe("a cat", **kw)
    finally:
        with torch.no_grad():
            bias -= 0.2
    assert np.abs(changed - eager).max() > 1e-2 and np.abs(changed - expected).max() < 1e-4
    with pytest.raises(ValueError, match="compile mode 'fastest' is not one of"):
        pipe.compile(mode="fastest")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_unet_is_one_graph_with_every_cpu_fast_path_forced_on(sd1_folder, dtype):
    """Under torch.compile the U-Net traces as one graph, with no break (CUDA graphs want
    one, and a break in the middle syncs the device every step): the data-dependent checks
    of the shared first layers and the CPU fast paths (Winograd, upsample phases, GEMM
    attention, fused linear layers) step aside, even forced on, and leave it to inductor."""
    from ldm.models.fused_linear import set_fused_linear
    from ldm.models.gemm_attention import set_gemm_attention
    from ldm.models.upsample_conv import set_upsample_phases
    from ldm.models.winograd import set_winograd

    unet = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype=dtype).unet
    latents = torch.randn(1, 4, 16, 16, dtype=dtype).repeat(2, 1, 1, 1)  # a guidance batch: equal halves
    context = torch.randn(2, 77, unet.unet_config.cross_attention_dim, dtype=dtype)
    setters = (set_winograd, set_upsample_phases, set_gemm_attention, set_fused_linear)
    before = [setter("on") for setter in setters]
    try:
        torch._dynamo.reset()
        with torch.inference_mode():
            explained = torch._dynamo.explain(unet)(latents, torch.tensor([500.0, 500.0]), context)
    finally:
        for setter, mode in zip(setters, before):
            setter(mode)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


# --- in-place steps of the resnet blocks ----------------------------------------------------

class _KeptNorm(nn.GroupNorm):
    """A GroupNorm that remembers the tensor it returned."""

    def forward(self, x):
        self.last = super().forward(x)
        return self.last


def test_norm_silu_overwrites_the_normalised_tensor_only_where_nothing_else_needs_it():
    norm, x = _KeptNorm(4, 16), torch.randn(2, 16, 5, 5)
    expected = F.silu(F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))
    with torch.no_grad():
        out = norm_silu(norm, x)
    assert out is norm.last and torch.equal(out, expected)  # in place: no second tensor
    out = norm_silu(norm, x)  # gradients wanted (the weights require them)
    assert out is not norm.last and torch.equal(out, expected) and out.requires_grad
    seen = []
    norm.register_forward_hook(lambda module, inputs, output: seen.append(output))
    with torch.no_grad():
        out = norm_silu(norm, x)
    assert out is not seen[0] and torch.equal(seen[0], F.group_norm(x, 4, norm.weight, norm.bias, norm.eps))


def test_resnet_block_in_place_is_the_formula_with_and_without_gradients():
    block = ResnetBlock2D(8, 16, 12, groups=4, eps=1e-5)  # a shortcut, and a timestep embedding
    x, temb = torch.randn(2, 8, 6, 6), torch.randn(2, 12)

    def formula(x):
        h = block.conv1(F.silu(block.norm1(x))) + block.time_emb_proj(F.silu(temb))[:, :, None, None]
        return block.conv_shortcut(x) + block.conv2(F.silu(block.norm2(h)))

    with torch.inference_mode():
        assert torch.equal(block(x, temb), formula(x))
    grads = []
    for fn in (lambda x: block(x, temb), formula):
        leaf = x.clone().requires_grad_(True)
        fn(leaf).square().sum().backward()
        grads.append((leaf.grad, block.conv1.weight.grad.clone()))
        block.zero_grad()
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
