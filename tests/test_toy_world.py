"""The procedural toy world: determinism, splits, caption grammar, pixel scorers, classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.toy import (
    COLORS,
    KINDS,
    caption,
    eval_prompts,
    heldout_combos,
    kind_twin,
    make_batch,
    prompt_to_attributes,
    render,
    sample_scene,
)
from ldm.toy.score import read_colors, score_images


def _scenes(seed, n, split="train"):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


@pytest.mark.parametrize("size", [64, 128])
def test_batches_are_deterministic(size):
    a, b = make_batch(3, 16, size), make_batch(3, 16, size)
    assert a.images.shape == (16, size, size, 3) and a.images.dtype == np.uint8
    assert a.images.tobytes() == b.images.tobytes()
    assert a.captions == b.captions and a.scenes == b.scenes
    c = make_batch(4, 16, size)
    assert c.images.tobytes() != a.images.tobytes() and c.captions != a.captions


def test_heldout_combinations_never_in_train():
    held = heldout_combos()
    assert 0.08 < len(held) / (len(KINDS) * len(COLORS) * (len(COLORS) - 1)) < 0.12
    assert {k for k, _, _ in held} == set(KINDS)
    train = _scenes(0, 6000)
    assert not any((s.kind, s.color, s.background) in held for s in train)
    # Every kind, colour and background still appears in training, only not together.
    assert {s.kind for s in train} == set(KINDS)
    assert {s.color for s in train} == {s.background for s in train} == set(COLORS)
    heldout = _scenes(1, 500, "heldout")
    assert all((s.kind, s.color, s.background) in held for s in heldout)
    with pytest.raises(ValueError, match="split"):
        sample_scene(np.random.default_rng(0), "test")


def test_scenes_are_valid():
    for s in _scenes(2, 2000):
        assert s.color != s.background
        assert s.hat == (s.hat_color is not None) and (not s.hat or s.kind == "cat")
        if s.hat:
            assert s.hat_color not in (s.color, s.background)


def test_kind_weights_set_the_odds_of_each_kind():
    def counts(weights, n=2000):
        rng = np.random.default_rng(9)
        kinds = [sample_scene(rng, kind_weights=weights).kind for _ in range(n)]
        return {k: kinds.count(k) / n for k in KINDS}

    assert counts((0, 1, 0, 0, 0))["circle"] == 1.0
    uniform = counts((2, 2, 2, 2, 2))  # odds, not probabilities
    assert all(abs(f - 0.2) < 0.03 for f in uniform.values()), uniform  # 3 sigma of a binomial is 0.027
    default = counts(None)
    assert abs(default["cat"] - 0.4) < 0.035 and abs(default["star"] - 0.15) < 0.03, default


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (1, 1, 1, 1, -1), (0, 0, 0, 0, 0), (1, 1, 1, 1, float("nan"))])
def test_bad_kind_weights_are_refused(weights):
    with pytest.raises(ValueError, match="kind weights must be 5 non-negative numbers"):
        sample_scene(np.random.default_rng(0), kind_weights=weights)


def test_kind_twins_differ_in_kind_only_and_stay_in_the_train_split():
    held = heldout_combos()
    rng = np.random.default_rng(5)
    for scene in _scenes(6, 1500):
        twin = kind_twin(scene, rng)
        assert twin.kind != scene.kind
        assert (twin.color, twin.background) == (scene.color, scene.background)
        assert (twin.kind, twin.color, twin.background) not in held
        if scene.kind != "cat":
            assert twin.kind != "cat"  # a shape's twin is another shape: the hard negative
        assert twin.hat == (twin.hat_color is not None) and (not twin.hat or twin.kind == "cat")
    assert kind_twin(scene, np.random.default_rng(1)) == kind_twin(scene, np.random.default_rng(1))


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_parse_back_to_scene_attributes(split):
    rng = np.random.default_rng(5)
    for scene in _scenes(5, 1500, split):
        truth = scene.attributes()
        parsed = prompt_to_attributes(caption(scene, rng, split))
        assert parsed["kind"] == scene.kind
        assert all(truth[k] == v for k, v in parsed.items()), (scene, parsed)
        if scene.kind == "cat":
            assert parsed["hat"] == scene.hat
        assert prompt_to_attributes(caption(scene, rng, split, full=True)) == truth


def test_heldout_templates_differ_from_train():
    rng = np.random.default_rng(6)
    scenes = _scenes(6, 800)
    train = {caption(s, rng, "train", full=True) for s in scenes}
    heldout = {caption(s, rng, "heldout", full=True) for s in scenes}
    assert not train & heldout


def test_a_cat_wearing_a_hat_is_a_training_caption():
    assert prompt_to_attributes("a cat wearing a hat") == {"kind": "cat", "hat": True}
    assert prompt_to_attributes("An orange cat.") == {"kind": "cat", "color": "orange", "hat": False}
    assert prompt_to_attributes("") == {}
    batch_captions = make_batch(0, 3000, 8, p_empty=0.1).captions
    assert "a cat wearing a hat" in batch_captions
    assert 0.07 < batch_captions.count("") / 3000 < 0.13
    assert "a cat with a hat" in batch_captions


def test_eval_prompts_cover_heldout_combinations():
    prompts = eval_prompts(len(heldout_combos()), seed=0)
    combos = {(p.attributes["kind"], p.attributes["color"], p.attributes["background"])
              for p in prompts}
    assert combos == heldout_combos()
    for p in prompts:
        assert p.attributes == p.scene.attributes() == prompt_to_attributes(p.prompt)
    assert [p.prompt for p in eval_prompts(5, seed=0)] == [p.prompt for p in prompts[:5]]
    assert all(p.attributes == p.scene.attributes() for p in eval_prompts(20, paraphrase=True))


@pytest.mark.parametrize("size,n", [(64, 400), (128, 100)])
def test_colour_scorers_recover_rendered_colours(size, n):
    batch = make_batch(11, n, size)
    for img, scene in zip(batch.images, batch.scenes):
        assert read_colors(img) == {"background": scene.background, "color": scene.color,
                                    "hat_color": scene.hat_color}, scene
    scores = score_images(batch.images, [
        {k: v for k, v in s.attributes().items() if k not in ("kind", "hat")} for s in batch.scenes
    ])
    assert all(all(s.values()) for s in scores)


def test_colour_scorer_rejects_wrong_colours():
    from ldm.toy import Scene

    scene = Scene("cat", "black", "yellow", True, "red", "top", 0.5, 0.5, 0.2)
    img = render(scene)
    assert read_colors(img)["background"] == "yellow"
    assert score_images([img], [{"color": "black", "background": "blue", "hat_color": "red"}])[0] == {
        "color": True, "background": False, "hat_color": True}


def test_classifier_training_smoke(tmp_path):
    from ldm.toy.classifier import classify, load_classifier, save_classifier, train_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared
    try:
        model = train_classifier(steps=40, seed=0, batch_size=24, lr=5e-3)
    finally:
        torch.set_num_threads(threads)
    losses = model.losses
    assert np.mean(losses[-8:]) < np.mean(losses[:8])
    path = tmp_path / "clf.safetensors"
    save_classifier(model, path)
    loaded = load_classifier(path)
    batch = make_batch(1, 6, 128)
    assert classify(loaded, batch.images) == classify(model, batch.images)
    scores = score_images(batch.images, [s.attributes() for s in batch.scenes], classifier=path)
    assert all({"kind", "color", "background"} <= set(s) for s in scores)
    with pytest.raises(FileNotFoundError, match="no toy classifier"):
        load_classifier(tmp_path / "missing.safetensors")
