"""The trained model shipped in weights/ (skipped until scripts/train_toy.py has made it).

Pictures are scored with ldm.toy.score (colours from pixels, kind and hat by the toy
classifier). Fixed seeds, and otherwise the settings a user gets from ``pipe(prompt)``;
a check passes when most of the seeds show what the prompt says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.checkpoints import load_model
from ldm.pipeline import DEFAULT_WEIGHTS, WEIGHTS_DIR, Pipeline
from ldm.toy.classifier import classify, get_classifier
from ldm.toy.roundtrip import vae_round_trips
from ldm.toy.score import color_map, read_colors, score_images
from ldm.toy.world import COLORS, make_batch, prompt_to_attributes

WEIGHTS = WEIGHTS_DIR / DEFAULT_WEIGHTS
pytestmark = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"{WEIGHTS} is not there yet (train it: python scripts/train_toy.py --bf16 vae)")

SEEDS = [0, 1, 2, 3]
NEEDED = 3  # of len(SEEDS)


@pytest.fixture(scope="module")
def pipe():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as fast for this tiny model, and steady on a busy machine
    try:
        yield Pipeline.from_pretrained(WEIGHTS, device="cpu", dtype="float32")
    finally:
        torch.set_num_threads(before)


def _render(pipe, prompt: str, seeds=SEEDS) -> np.ndarray:
    gen = pipe.generate([prompt] * len(seeds), seed=list(seeds), output="np", progress=False)
    return (np.clip(gen.images, 0, 1) * 255).round().astype(np.uint8)


def test_loads_through_the_original_layout_loader():
    model = load_model(WEIGHTS)
    assert model.layout == "original"
    assert model.config.family == "toy"
    assert model.config.default_size == 64
    assert model.config.vae.scaling_factor != 1.0  # the measured factor, not the preset's placeholder


def test_the_vae_keeps_the_kind_of_held_out_pictures(pipe):
    """The decoder draws what the encoder saw (no cat's eyes painted on a circle), on
    (kind, colour, background) combinations the VAE never trained on."""
    scenes = make_batch(777, 500, split="heldout").scenes
    read = classify(get_classifier(None), vae_round_trips(pipe, scenes))
    assert np.mean([r["kind"] == s.kind for r, s in zip(read, scenes)]) >= 0.92


def _ring(labels: np.ndarray, width: int = 4) -> np.ndarray:
    return np.concatenate([labels[:width].ravel(), labels[-width:].ravel(),
                           labels[:, :width].ravel(), labels[:, -width:].ravel()])


def _flat_background(img: np.ndarray) -> bool:
    """The edges are one palette colour, as in every toy-world picture (noise is not)."""
    ring = _ring(color_map(img))
    return ring.min() >= 0 and np.bincount(ring).max() > 0.9 * ring.size


def test_red_circle_on_blue_background(pipe):
    images = _render(pipe, "a red circle on a blue background")
    blue, red = COLORS.index("blue"), COLORS.index("red")
    ok = []
    for img in images:
        colors = read_colors(img)
        labels = color_map(img)
        inside = labels[8:-8, 8:-8]
        ok.append(colors["color"] == "red" and colors["background"] == "blue"
                  and (_ring(labels) == blue).mean() > 0.9  # blue at the edges
                  and (inside == red).sum() > 0.5 * (inside != blue).sum())  # red is most of what is not blue
    assert sum(ok) >= NEEDED, ok


# Known gaps of the current weights are strict xfails, so the day a retrained model
# draws them, the test says so (see weights/README.md for the held-out scores).
_GAP = pytest.mark.xfail(strict=True, reason="ldm-toy draws this circle lumpy, with faint cat eyes: "
                                              "the classifier reads a cat or a star in all 4 seeds")


@pytest.mark.parametrize("prompt", [
    "a green triangle on a white background",
    "a blue square on a yellow background",
    "a white circle on a black background",
    "a purple star on an orange background",
    pytest.param("a red circle on an orange background", marks=_GAP),
])
def test_shapes_have_the_kind_and_colours_asked_for(pipe, prompt):
    attrs = prompt_to_attributes(prompt)
    scores = score_images(_render(pipe, prompt), [attrs] * len(SEEDS))
    assert sum(all(s.values()) for s in scores) >= NEEDED, scores


@pytest.fixture(scope="module")
def hatted_cats(pipe):
    prompt = "a cat wearing a hat"
    attrs = prompt_to_attributes(prompt)
    assert attrs == {"kind": "cat", "hat": True}
    images = _render(pipe, prompt)
    return images, score_images(images, [attrs] * len(SEEDS))


def test_cat_wearing_a_hat(hatted_cats):
    images, scores = hatted_cats
    # The classifier's verdict, and a hat of its own colour on top.
    ok = [s["kind"] and s["hat"] and read_colors(img)["hat_color"] is not None
          for s, img in zip(scores, images)]
    assert sum(ok) >= NEEDED, (scores, ok)


def test_cat_wearing_a_hat_on_a_flat_background(hatted_cats):
    images, _ = hatted_cats
    assert sum(_flat_background(img) for img in images) >= NEEDED


def test_same_seed_same_picture(pipe):
    a = _render(pipe, "a green triangle on a white background", [7])
    b = _render(pipe, "a green triangle on a white background", [7])
    c = _render(pipe, "a green triangle on a white background", [8])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


INPAINT_WEIGHTS = WEIGHTS_DIR / "ldm-toy-inpaint.safetensors"


@pytest.mark.skipif(not INPAINT_WEIGHTS.is_file(), reason=f"{INPAINT_WEIGHTS} is not there")
def test_shipped_inpainting_model_repaints_the_mask_and_keeps_the_rest():
    """The 9-channel toy model (scripts/train_toy.py --inpaint-steps): the new object's colour
    inside the mask as the prompt says, every pixel outside it the input's."""
    from ldm.editing import feather_alpha
    from ldm.toy.edits import box_mask, edit_scenes, object_box, rekinded
    from ldm.toy.world import caption, render

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = Pipeline.from_pretrained(INPAINT_WEIGHTS, device="cpu", dtype="float32")
        assert pipe.config.is_inpainting
        rng = np.random.default_rng(1)
        scenes = edit_scenes(len(SEEDS), seed=0)
        targets = [rekinded(s, rng) for s in scenes]
        images = [render(s, 64) for s in scenes]
        masks = [box_mask(object_box(s, 64, 3), 64) for s in scenes]
        prompts = [caption(t, np.random.default_rng(i), "train", full=True) for i, t in enumerate(targets)]
        out = pipe.generate(prompts,
                            image=images, mask=masks, seed=list(SEEDS), sampler="euler", steps=20,
                            output="pil", progress=False).images
        out = [np.asarray(im) for im in out]
    finally:
        torch.set_num_threads(before)
    for picture, original, mask in zip(out, images, masks):
        outside = feather_alpha(mask.astype(np.float32), 4) == 0  # beyond the 4-pixel feather
        assert outside.any()
        np.testing.assert_array_equal(picture[outside], original[outside])
    scores = score_images(out, [{"color": t.color, "kind": t.kind} for t in targets])
    assert sum(s["color"] for s in scores) >= NEEDED, (prompts, scores)
