"""scripts/eval_editing.py and the toy-world edit pieces it uses (ldm.toy.edits)."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
from scriptload import load_script

from ldm.pipeline import Pipeline
from ldm.toy.edits import box_mask, edit_scenes, object_box, object_mask, recolored, rekinded
from ldm.toy.world import PALETTE, Scene, heldout_combos, render

EDITING = "image" in inspect.signature(Pipeline.generate).parameters


@pytest.fixture(scope="module")
def eval_editing():
    return load_script("eval_editing")


# --- ldm.toy.edits -----------------------------------------------------------------------


def test_object_mask_is_exactly_the_pixels_that_differ_from_the_background():
    scene = Scene("circle", "red", "blue", x=0.5, y=0.5, size=0.2)
    picture = render(scene, 64)
    mask = object_mask(scene, 64)
    assert (picture[~mask] == PALETTE["blue"]).all() and mask[32, 32] and not mask[0, 0]
    grown = object_mask(scene, 64, dilate=2)
    assert (grown >= mask).all() and grown.sum() > mask.sum()
    x0, y0, x1, y1 = object_box(scene, 64, margin=3)
    ys, xs = np.nonzero(mask)
    assert (x0, y0, x1, y1) == (xs.min() - 3, ys.min() - 3, xs.max() + 4, ys.max() + 4)
    assert box_mask((x0, y0, x1, y1), 64).sum() == (x1 - x0) * (y1 - y0)
    with pytest.raises(ValueError, match="dilate"):
        object_mask(scene, 64, dilate=-1)


def test_edits_change_what_they_say_and_stay_in_the_train_split():
    scenes = edit_scenes(40, seed=3)
    assert scenes == edit_scenes(40, seed=3) and scenes != edit_scenes(40, seed=4)
    rng = np.random.default_rng(0)
    for scene in scenes:
        new = recolored(scene, rng)
        assert new.kind == scene.kind and new.background == scene.background and (new.x, new.y) == (scene.x, scene.y)
        assert new.color not in (scene.color, scene.background, scene.hat_color)
        other = rekinded(scene, rng)
        assert other.kind != scene.kind and other.color not in (scene.color, scene.background)
        assert other.background == scene.background and not other.hat
        for s in (new, other):
            assert (s.kind, s.color, s.background) not in heldout_combos()


# --- the script's measures -------------------------------------------------------------------


def test_measures(eval_editing):
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    border = eval_editing.inner_border(mask, 2)
    assert border.sum() == 64 - 16 and not border[7, 7] and border[4, 4]
    area = eval_editing.new_area((64, 96), "right", 32)
    assert area[:, 64:].all() and not area[:, :64].any()
    assert eval_editing.new_area((96, 64), "top", 32)[:32].all()
    picture = np.zeros((16, 16, 3), dtype=np.uint8)
    changed = picture.copy()
    changed[8, 8] = 255
    assert eval_editing.max_change_outside(changed, picture, mask, 4) == 0.0  # inside the mask
    changed[0, 0] = 51
    assert eval_editing.max_change_outside(changed, picture, mask, 0) == pytest.approx(0.2)
    assert eval_editing.rate([True, False, True]) == {"rate": 2 / 3, "hits": 2, "count": 3}


def test_command_line_refuses_bad_values(eval_editing, capsys):
    for bad in (["--strengths", "0"], ["--strengths", "1.5"], ["--n", "0"]):
        with pytest.raises(SystemExit):
            eval_editing.parse_args(bad)
    assert "--strengths" in capsys.readouterr().err


# --- a tiny run ----------------------------------------------------------------------------


def _rates(entry):
    return [v for k, v in entry.items() if isinstance(v, dict) and "rate" in v]


@pytest.mark.skipif(not EDITING, reason="Pipeline.generate does not take an image yet")
def test_tiny_run_writes_a_report_with_numbers_in_range(eval_editing, tmp_path):
    report = eval_editing.evaluate(None, n=4, strengths=(0.5, 1.0), steps=2, batch_size=4, out=tmp_path,
                                   strip_rows=2, log=lambda message: None)
    assert [row["strength"] for row in report["img2img"]] == [0.5, 1.0]
    entries = [*report["img2img"], report["inpainting"], report["outpainting"]]
    rates = [r for e in entries for r in _rates(e)]
    assert len(rates) == 2 * 3 + 6 + 1 and all(r["count"] == 4 for r in rates)
    numbers = [r["rate"] for r in rates] + [row[k] for row in report["img2img"]
                                            for k in ("object_iou", "pixel_distance")]
    numbers += [report[s]["max_abs_outside"] for s in ("inpainting", "outpainting")]
    assert all(0.0 <= x <= 1.0 for x in numbers)
    assert not report["inpainting_model"] and len(report["inpainting"]["prompts"]) == 4

    saved = json.loads((tmp_path / "eval_editing.json").read_text())
    assert saved["settings"]["n"] == 4 and saved["strip"] == str(tmp_path / "strip.png")
    md = (tmp_path / "eval_editing.md").read_text()
    assert "### img2img" in md and "### Inpainting" in md and "### Outpainting" in md
    from PIL import Image

    with Image.open(tmp_path / "strip.png") as strip:  # 2 rows of 128-px pictures, 6 columns, headers
        assert strip.height > 2 * 128 and strip.width > 6 * 128
