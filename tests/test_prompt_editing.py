"""Prompt editing and alternation while sampling: the conditioning changes with the step.

The denoiser finds the step from the noise level (no call counter), and uses the
web UI's rule for which text a step gets (prompt_parser.reconstruct_cond_batch: the
first schedule entry whose end is at or after the 0-based step). Whole runs are checked
against a hand-run: Euler steps taken here, each with the plain prompts of that step.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Pipeline
from ldm.conditioning import Conditioning, ScheduledConditioning, run_unet
from ldm.denoisers import CFGDenoiser, Denoiser, DiscreteSchedule, step_index
from ldm.samplers import sample, sampling_schedule
from ldm.samplers.base import euler_step

STEPS = 5
RUN = dict(width=64, height=64, sampler="euler", seed=11, guidance_scale=7.5, progress=False)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return Pipeline.from_pretrained(sd1_folder, device="cpu")


def test_step_index_is_a_function_of_the_level():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert [step_index(sigmas, s) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert step_index(sigmas, torch.tensor(7.0)) == 0  # inside step 0 (a midpoint evaluation)
    assert step_index(sigmas, torch.tensor(1.5)) == 2
    assert step_index(sigmas, torch.tensor(11.0)) == 0
    assert step_index(sigmas, torch.tensor(0.0)) == 3
    assert step_index(sigmas, torch.tensor([5.0, 5.0])) == 1
    assert step_index(torch.tensor([3.0, 0.0]), torch.tensor(3.0)) == 0
    with pytest.raises(ValueError, match="one noise level"):
        step_index(sigmas, torch.tensor([5.0, 2.0]))


def test_scheduled_conditioning():
    a, b = Conditioning(torch.zeros(2, 3, 4)), Conditioning(torch.ones(2, 3, 4))
    s = ScheduledConditioning((a, b, a), (2, 5, 10))
    assert [s.at(i) is b for i in range(12)] == [False] * 3 + [True] * 3 + [False] * 6
    half = s.to(dtype=torch.float16)
    assert half.segments[0] is half.segments[2] and half.segments[0].context.dtype == torch.float16
    assert s.select(slice(0, 1)).batch_size == 1
    mask = torch.ones(2, 5, 1, 1)
    assert all(seg.concat is mask for seg in s.replace(concat=mask).segments)
    both = ScheduledConditioning.cat([Conditioning(torch.full((2, 3, 4), -1.0)), s])
    assert both.ends == (2, 5, 10) and both.batch_size == 4
    assert torch.equal(both.at(4).context[2:], b.context) and torch.equal(both.at(4).context[:2], -b.context)
    with pytest.raises(ValueError, match="one end step per segment"):
        ScheduledConditioning((a, b), (3,))
    with pytest.raises(ValueError, match="increase"):
        ScheduledConditioning((a, b), (3, 3))
    with pytest.raises(ValueError, match="shapes"):
        ScheduledConditioning((a, Conditioning(torch.ones(2, 6, 4))), (1, 2))
    with pytest.raises(TypeError, match="Conditioning"):
        ScheduledConditioning((a, torch.ones(2, 3, 4)), (1, 2))
    with pytest.raises(ValueError, match="at least one scheduled"):
        ScheduledConditioning.cat([a, b])


def _recording_cfg(sampler: str, steps: int):
    """CFG over a model that records the conditioning value each evaluation sees: segment k
    of the schedule is filled with k, the unconditional half with -1."""
    seen = []

    def model(x, t, cond):
        seen.append(cond.context[-1, 0, 0].item())
        return torch.zeros_like(x)

    schedule = DiscreteSchedule()
    plan = sampling_schedule(sampler, schedule, steps)
    segments = tuple(Conditioning(torch.full((1, 2, 3), float(k))) for k in range(steps))
    cond = ScheduledConditioning(segments, tuple(range(steps)))
    uncond = Conditioning(torch.full((1, 2, 3), -1.0))
    cfg = CFGDenoiser(Denoiser(model, schedule), cond, uncond, 5.0, sigmas=plan.sigmas)
    sample(sampler, cfg, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)), steps, schedule)
    return seen


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "lms"])
def test_each_step_gets_its_segment(sampler):
    assert _recording_cfg(sampler, 4) == [0.0, 1.0, 2.0, 3.0]


def test_heun_corrector_gets_the_level_it_evaluates():
    # Predictor of step i at sigmas[i], corrector at sigmas[i + 1] (the start of step i + 1);
    # the last step has no corrector.
    assert _recording_cfg("heun", 4) == [0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]


def test_a_schedule_needs_the_levels():
    cond = ScheduledConditioning((Conditioning(torch.zeros(1, 2, 3)),), (1,))
    with pytest.raises(ValueError, match="sigmas"):
        CFGDenoiser(Denoiser(lambda x, t, c: x, DiscreteSchedule()), cond, None, 1.0)


def _hand_run(pipe, texts: list[tuple[str, str]], steps: int, seed: int) -> torch.Tensor:
    """Euler over ``steps`` steps, step i guided by the plain prompts ``texts[i]``."""
    plan = sampling_schedule("euler", pipe.schedule, steps)
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed)) * plan.init_sigma
    denoiser = Denoiser(lambda x, t, c: run_unet(pipe.unet, x, t, c), pipe.schedule, pipe.config.prediction_type)
    with torch.inference_mode():
        for i in range(steps):
            cond, uncond = pipe.encode_prompts([texts[i][0]], [texts[i][1]])
            cfg = CFGDenoiser(denoiser, cond, uncond, RUN["guidance_scale"])
            denoised = cfg(x, plan.sigmas[i], t=plan.timesteps[i])
            x = euler_step(x, plan.sigmas[i], plan.sigmas[i + 1], denoised)
    return x


def _latents(pipe, prompt, negative, steps=STEPS, **kwargs):
    return pipe.generate(prompt, negative, steps=steps, output="latent", **{**RUN, **kwargs}).images


def test_same_text_on_both_sides_is_the_plain_prompt(pipe):
    cond, _ = pipe.encode_prompts(["[a cat:a cat:0.5]"], ["blurry"], steps=STEPS)
    assert isinstance(cond, ScheduledConditioning) and len(cond.segments) == 2
    scheduled = _latents(pipe, "[a cat:a cat:0.5]", "[blurry:blurry:3]")
    assert torch.equal(scheduled, _latents(pipe, "a cat", "blurry"))


def test_a_switch_matches_a_hand_run(pipe):
    # 5 steps: "[..:..:2]" switches after step 2 (steps 0, 1, 2 then 3, 4); "0.5" is int(2.5) = 2.
    prompt, negative = "[a red circle:a blue square:2]", "[blurry:ugly:0.5]"
    a, b = ("a red circle", "blurry"), ("a blue square", "ugly")
    expected = _hand_run(pipe, [a, a, a, b, b], STEPS, RUN["seed"])
    got = _latents(pipe, prompt, negative)
    assert (got - expected).abs().max().item() < 1e-5
    # Switching one step later is a different picture.
    assert (_hand_run(pipe, [a, a, a, a, b], STEPS, RUN["seed"]) - got).abs().max().item() > 1e-3


def test_alternation_matches_a_hand_run(pipe):
    # Schedule [(1, cat), (2, dog), (3, cat), (4, dog)]: steps 0 and 1 both use the first entry.
    cat, dog = ("a cat", ""), ("a dog", "")
    expected = _hand_run(pipe, [cat, cat, dog, cat], 4, RUN["seed"])
    got = _latents(pipe, "[a cat|a dog]", "", steps=4)
    assert (got - expected).abs().max().item() < 1e-5


def test_an_edit_counts_the_steps_it_runs(pipe):
    # img2img at strength 0.5 runs 2 of 4 steps; like the web UI, they are steps 0 and 1 of
    # the prompt schedule (over all 4 steps), so "[a cat:a dog:1]" is "a cat" throughout.
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    run = dict(image=image, strength=0.5, steps=4)
    edited = _latents(pipe, "[a cat:a dog:1]", "", **run)
    assert torch.equal(edited, _latents(pipe, "a cat", "", **run))
    assert (edited - _latents(pipe, "a dog", "", **run)).abs().max().item() > 1e-3


def test_editing_needs_steps(pipe):
    with pytest.raises(ValueError, match="pass steps"):
        pipe.encode_prompts(["a [cat:dog:0.5]"])
    generation = pipe.generate("a [cat:dog:0.5]", steps=2, **{**RUN, "guidance_scale": 1.0})
    assert generation.prompts == ["a [cat:dog:0.5]"]
