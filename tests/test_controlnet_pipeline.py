"""ControlNet end to end: ldm's ``pipe(..., control=Control(...))`` against diffusers'
StableDiffusionControlNetPipeline (and its img2img and inpainting pipelines, and
MultiControlNetModel).

Tiny random SD1 model (tests/reference.py) and tiny random ControlNets copied from its
U-Net config (tests/reference_controlnet.py, zero convolutions random so the residuals
matter), loaded by ldm from the diffusers folders and from an original-layout file; same
prompts, same hint image, same per-image CPU generators, guidance 7.5 with a negative
prompt.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import Control, ControlNet
from ldm.checkpoints import convert_controlnet
from reference import PIXEL_TOLERANCE, SD1_TINY, TEST_DEVICE, TEST_DTYPE, load_reference_pipeline
from reference_controlnet import save_controlnet_folder
from test_editing_parity import grid_mask
from test_pipeline_parity import SCHEDULERS

SIZE = 64
STEPS = 6
PROMPTS = ["a cat wearing a hat", "a red circle on a blue background"]
NEGATIVE = "blurry, low quality"
TOLERANCE = PIXEL_TOLERANCE  # max abs difference on [0, 1] pixels


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is as fast, and steady on a busy machine."""


def _picture(seed: int) -> Image.Image:
    """A hint of blocks and lines (an edge-map-like picture), RGB uint8."""
    rng = np.random.default_rng(seed)
    array = np.zeros((SIZE, SIZE, 3), np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, SIZE - 16, 2)
        array[y:y + int(rng.integers(4, 16)), x:x + int(rng.integers(4, 16))] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def controlnets(controlnet_folders, tmp_path_factory):
    """Two tiny SD1 ControlNet folders (the second made here with other weights)."""
    second = save_controlnet_folder(SD1_TINY, tmp_path_factory.mktemp("cn2") / "sd1b", seed=11)
    return [controlnet_folders["sd1"], second]


@pytest.fixture(scope="module")
def ours(controlnets):
    return [ControlNet.from_pretrained(f, device=TEST_DEVICE, dtype=TEST_DTYPE) for f in controlnets]


def _reference(sd1_folder, controlnets, sampler: str, *, img2img: bool = False, inpaint: bool = False,
               **kwargs) -> np.ndarray:
    import diffusers
    from diffusers import ControlNetModel

    base = load_reference_pipeline(sd1_folder)
    nets = [ControlNetModel.from_pretrained(f, dtype=TEST_DTYPE).to(TEST_DEVICE) for f in controlnets]
    cls = (diffusers.StableDiffusionControlNetInpaintPipeline if inpaint else
           diffusers.StableDiffusionControlNetImg2ImgPipeline if img2img else diffusers.StableDiffusionControlNetPipeline)
    cls_name, options = SCHEDULERS[sampler]
    pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
               controlnet=nets if len(nets) > 1 else nets[0],
               scheduler=getattr(diffusers, cls_name).from_config(base.scheduler.config, **options),
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5,
                generator=[torch.Generator().manual_seed(100 + k) for k in range(len(PROMPTS))], height=SIZE,
                width=SIZE, output_type="np", **kwargs).images


def _ours(pipe, controls, sampler: str, **kwargs) -> np.ndarray:
    return pipe(PROMPTS, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=7.5, seed=100, width=SIZE,
                height=SIZE, sampler=sampler, output="np", progress=False, control=controls, **kwargs)


def _close(got: np.ndarray, expected: np.ndarray, alone: np.ndarray) -> None:
    assert got.shape == expected.shape == (len(PROMPTS), SIZE, SIZE, 3)
    assert np.abs(got - expected).max() < TOLERANCE
    assert np.abs(alone - expected).max() > 0.01  # the ControlNet changed the picture (by more than 1e-3)


@pytest.fixture(scope="module")
def plain(sd1_pipe):
    """The pictures without a ControlNet (to see that the ControlNet matters)."""
    return {s: _ours(sd1_pipe, None, s) for s in ("euler", "dpmpp_2m")}


@pytest.mark.parametrize("guess_mode", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_one_controlnet_matches_diffusers(sd1_pipe, sd1_folder, controlnets, ours, plain, sampler, guess_mode):
    hint = _picture(1)
    expected = _reference(sd1_folder, controlnets[:1], sampler, image=hint, controlnet_conditioning_scale=0.7,
                          control_guidance_start=0.1, control_guidance_end=0.8, guess_mode=guess_mode)
    got = _ours(sd1_pipe, Control(ours[0], hint, scale=0.7, start=0.1, end=0.8, guess_mode=guess_mode), sampler)
    _close(got, expected, plain[sampler])


def test_two_controlnets_sum_as_multicontrolnet(sd1_pipe, sd1_folder, controlnets, ours, plain):
    hints = [_picture(1), _picture(2)]
    expected = _reference(sd1_folder, controlnets, "dpmpp_2m", image=hints, controlnet_conditioning_scale=[0.7, 1.2],
                          control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.9])
    got = _ours(sd1_pipe, [Control(ours[0], hints[0], scale=0.7), Control(ours[1], hints[1], scale=1.2, start=0.2,
                                                                          end=0.9)], "dpmpp_2m")
    _close(got, expected, plain["dpmpp_2m"])


def test_img2img_with_a_controlnet_matches_diffusers(sd1_pipe, sd1_folder, controlnets, ours):
    init, hint = _picture(5), _picture(1)
    expected = _reference(sd1_folder, controlnets[:1], "ddim", img2img=True, image=[init] * 2, control_image=hint,
                          strength=0.7, controlnet_conditioning_scale=0.9)
    got = _ours(sd1_pipe, Control(ours[0], hint, scale=0.9), "ddim", image=[init] * 2, strength=0.7)
    alone = _ours(sd1_pipe, None, "ddim", image=[init] * 2, strength=0.7)
    _close(got, expected, alone)


def test_inpainting_with_a_controlnet_matches_diffusers(sd1_pipe, sd1_folder, controlnets, ours):
    init, hint = _picture(5), _picture(1)
    mask = grid_mask(16, 8, 48, 40)
    # One image per prompt: given one image for several prompts, diffusers samples every
    # image's latents with the first generator (ldm: each with its own).
    expected = _reference(sd1_folder, controlnets[:1], "euler", inpaint=True, image=[init] * 2, mask_image=[mask] * 2,
                          control_image=hint, strength=0.8, controlnet_conditioning_scale=0.9)
    kwargs = dict(image=[init] * 2, mask=[mask] * 2, strength=0.8, keep_unmasked=False)
    got = _ours(sd1_pipe, Control(ours[0], hint, scale=0.9), "euler", **kwargs)
    _close(got, expected, _ours(sd1_pipe, None, "euler", **kwargs))


def test_an_original_layout_file_gives_the_same_pictures(sd1_pipe, controlnets, ours, tmp_path):
    single = convert_controlnet(controlnets[0], tmp_path / "control_tiny.safetensors", layout="original")
    again = ControlNet.from_pretrained(single, device=TEST_DEVICE, dtype=TEST_DTYPE)
    hint = _picture(3)
    a = _ours(sd1_pipe, Control(ours[0], hint, scale=0.8), "euler")
    b = _ours(sd1_pipe, Control(again, hint, scale=0.8), "euler")
    assert np.array_equal(a, b)


def test_scale_zero_is_the_plain_model_and_bad_controls_are_refused(sd1_pipe, controlnet_folders, ours):
    # (At scale 0 the ControlNet is not even run.)
    assert np.array_equal(_ours(sd1_pipe, Control(ours[0], _picture(1), scale=0.0), "euler"),
                          _ours(sd1_pipe, None, "euler"))
    sd2 = ControlNet.from_pretrained(controlnet_folders["sd2"], device=TEST_DEVICE, dtype=TEST_DTYPE)
    with pytest.raises(ValueError, match="sd2.*sd1|sd1.*sd2"):
        _ours(sd1_pipe, Control(sd2, _picture(1)), "euler")
    with pytest.raises(ValueError, match=r"start \(0.8\) must be below end \(0.2\)"):
        Control(ours[0], _picture(1), start=0.8, end=0.2)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        Control(ours[0], _picture(1), scale=-1)
    with pytest.raises(ValueError, match="control image must be an array H×W×3"):
        _ours(sd1_pipe, Control(ours[0], np.zeros((SIZE, SIZE))), "euler")
    with pytest.raises(TypeError, match="Control.controlnet must be a ControlNet"):
        Control("control_sd15_canny.safetensors", _picture(1))
    with pytest.raises(FileNotFoundError):
        ControlNet.from_pretrained("no/such/controlnet.safetensors")
    other = torch.float16 if sd1_pipe.dtype != torch.float16 else torch.float32
    elsewhere = ControlNet.from_pretrained(controlnet_folders["sd1"], device=sd1_pipe.device, dtype=other)
    with pytest.raises(ValueError, match=f"ControlNet sd1 is {str(other)[6:]} on .* but the pipeline computes in "
                       r".*: load it with ControlNet.from_pretrained\(path, device=pipe.device, dtype=pipe.dtype\)"):
        _ours(sd1_pipe, Control(elsewhere, _picture(1)), "euler")
    with pytest.raises(ValueError, match="start 0.1 / end 0.9 leave none of the 2 steps"):
        sd1_pipe("x", steps=2, control=Control(ours[0], _picture(1), start=0.1, end=0.9), progress=False)
