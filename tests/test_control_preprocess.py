"""Hint preprocessors against the code that made ControlNet's hints: lllyasviel/ControlNet's
gradio apps (canny, scribble) and sd-webui-controlnet's annotators (threshold, shuffle),
reproduced here on uint8 pictures with OpenCV as those repositories call it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

cv2 = pytest.importorskip("cv2")

from ldm.control_preprocess import (  # noqa: E402
    PREPROCESSORS, as_hint, canny, parameters, preprocess, scribble, shuffle, threshold)
from ldm.editing import fit_to_size  # noqa: E402


def drawn_picture(width: int = 160, height: int = 128, seed: int = 3) -> np.ndarray:
    """Gradients, filled shapes, lines of random colours and a little noise: uint8 H×W×3."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=2)
    picture = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(15):
        x0, y0 = int(rng.randint(width)), int(rng.randint(height))
        box = (x0, y0, x0 + int(rng.randint(5, 60)), y0 + int(rng.randint(5, 60)))
        fill = tuple(int(c) for c in rng.randint(0, 256, 3))
        (draw.rectangle if rng.randint(2) else draw.ellipse)(box, fill=fill)
        ends = tuple(int(v) for v in (rng.randint(width), rng.randint(height), rng.randint(width), rng.randint(height)))
        draw.line(ends, fill=tuple(int(c) for c in rng.randint(0, 256, 3)), width=int(rng.randint(1, 4)))
    noisy = np.asarray(picture).astype(np.int16) + rng.randint(-6, 7, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def drawn_sketch() -> np.ndarray:
    """Pen on paper: black and red anti-aliased strokes, a grey smudge, on white; uint8."""
    paper = Image.new("RGB", (96, 64), (255, 255, 255))
    draw = ImageDraw.Draw(paper)
    draw.line((5, 5, 90, 60), fill=(0, 0, 0), width=3)
    draw.ellipse((20, 10, 60, 50), outline=(200, 0, 0), width=2)
    draw.rectangle((70, 5, 85, 20), fill=(126, 126, 126))
    draw.rectangle((70, 40, 85, 55), fill=(127, 140, 150))
    return np.asarray(paper.resize((192, 128), Image.Resampling.BILINEAR))  # grey anti-aliased borders


def hwc3_unit(channel: np.ndarray) -> np.ndarray:
    """ControlNet's HWC3 on a uint8 H×W map, then ``/ 255`` as its apps build ``control``."""
    return np.repeat(channel[:, :, None], 3, axis=2).astype(np.float32) / 255.0


def reference_binary(picture: np.ndarray, keep: np.ndarray) -> np.ndarray:
    detected = np.zeros_like(picture)
    detected[keep] = 255
    return detected.astype(np.float32) / 255.0


# --- canny ------------------------------------------------------------------------------


@pytest.mark.parametrize("low,high", [(100, 200), (50, 100), (1, 255), (0, 0), (200, 200), (255, 255)])
def test_canny_is_controlnets_canny_pixel_for_pixel(low, high):
    picture = drawn_picture()
    expected = hwc3_unit(cv2.Canny(picture, low, high))  # annotator/canny on the RGB image
    for given in (picture, picture.astype(np.float32) / 255.0, picture / 255.0, Image.fromarray(picture)):
        got = canny(given, low, high)
        assert got.dtype == np.float32 and got.shape == picture.shape
        np.testing.assert_array_equal(got, expected)


def test_canny_reads_a_file_like_the_picture(tmp_path):
    picture = drawn_picture()
    path = tmp_path / "photo.png"
    Image.fromarray(picture).save(path)
    np.testing.assert_array_equal(canny(path), hwc3_unit(cv2.Canny(picture, 100, 200)))
    np.testing.assert_array_equal(canny(str(path)), canny(picture))


def test_canny_draws_white_edges_on_black_along_a_step():
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    edges = canny(square)
    assert set(np.unique(edges)) == {0.0, 1.0}
    assert (edges == edges[:, :, :1]).all()
    ys, xs = np.nonzero(edges[:, :, 0])
    for y, x in zip(ys, xs):  # every edge pixel touches the step: both colours around it
        around = square[max(y - 1, 0):y + 2, max(x - 1, 0):x + 2, 0]
        assert around.min() == 0 and around.max() == 255, (y, x)
    sides = [(ys <= 16), (ys >= 47), (xs <= 16), (xs >= 47)]
    assert all(side.sum() >= 30 for side in sides), [int(s.sum()) for s in sides]
    assert not canny(np.full((32, 32, 3), 0.5, np.float32)).any()  # flat: no edges


def test_canny_thresholds_order_the_edges():
    picture = drawn_picture()
    counts = {}
    for low, high in [(20, 100), (20, 200), (100, 200), (20, 250)]:
        counts[low, high] = canny(picture, low, high)[:, :, 0] > 0
    # Hysteresis: a higher ``high`` starts fewer edges, a higher ``low`` continues fewer.
    assert not (counts[20, 200] & ~counts[20, 100]).any()
    assert not (counts[20, 250] & ~counts[20, 200]).any()
    assert not (counts[100, 200] & ~counts[20, 200]).any()
    assert counts[20, 100].sum() > counts[20, 250].sum()
    assert counts[20, 200].sum() > counts[100, 200].sum()


@pytest.mark.parametrize("kwargs,needle", [
    ({"low": 200, "high": 100}, "low <= high"),
    ({"low": -1}, "low must be an integer >= 0 and <= 255"),
    ({"high": 256}, "high must be an integer >= 0 and <= 255"),
    ({"low": 10.5}, "low must be an integer"),
    ({"high": True}, "high must be an integer"),
    ({"low": "100"}, "low must be an integer"),
])
def test_canny_refuses_bad_thresholds(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        canny(drawn_picture(), **kwargs)


# --- scribble / threshold ---------------------------------------------------------------


@pytest.mark.parametrize("level", [127, 1, 200, 0, 255])
def test_scribble_inverts_a_sketch_like_gradio_scribble2image(level):
    sketch = drawn_sketch()
    expected = reference_binary(sketch, np.min(sketch, axis=2) < level)
    np.testing.assert_array_equal(scribble(sketch, level), expected)


def test_scribble_default_makes_dark_strokes_white_on_black():
    sketch = drawn_sketch()
    hint = scribble(sketch)
    np.testing.assert_array_equal(hint, reference_binary(sketch, np.min(sketch, axis=2) < 127))
    assert hint[0, 0, 0] == 0.0  # paper: black
    assert hint[10, 10, 0] == 1.0  # the black pen line: white
    assert hint[30, 40].tolist() == [1.0, 1.0, 1.0]  # the red outline (blue and green are 0): white
    assert hint[25, 155, 0] == 1.0 and hint[95, 155, 0] == 0.0  # level 126 is a stroke, 127 is paper


@pytest.mark.parametrize("level", [127, 0, 64, 254, 255])
def test_threshold_is_the_extensions_threshold(level):
    picture = drawn_picture()
    expected = reference_binary(picture, np.min(picture, axis=2) > level)
    np.testing.assert_array_equal(threshold(picture, level), expected)


def test_scribble_is_threshold_of_the_inverted_drawing():
    """sd-webui-controlnet's "invert" (255 - x) then its threshold at 255 - t is scribble at t,
    for a grey drawing (for colour, scribble reads the darkest channel of the drawing)."""
    grey = np.repeat(np.asarray(Image.fromarray(drawn_sketch()).convert("L"))[:, :, None], 3, axis=2)
    for level in (1, 100, 127, 128, 254):
        np.testing.assert_array_equal(scribble(grey, level), threshold(255 - grey, 255 - level))


@pytest.mark.parametrize("function", [scribble, threshold])
@pytest.mark.parametrize("bad", [-1, 256, 127.0, None, False])
def test_binarisers_refuse_bad_levels(function, bad):
    with pytest.raises(ValueError, match="threshold must be an integer >= 0 and <= 255"):
        function(drawn_sketch(), bad)


# --- shuffle ----------------------------------------------------------------------------


def make_noise_disk(H, W, C, F):  # sd-webui-controlnet annotator/util.py, verbatim
    noise = np.random.uniform(low=0, high=1, size=((H // F) + 2, (W // F) + 2, C))
    noise = cv2.resize(noise, (W + 2 * F, H + 2 * F), interpolation=cv2.INTER_CUBIC)
    noise = noise[F: F + H, F: F + W]
    noise -= np.min(noise)
    noise /= np.max(noise)
    if C == 1:
        noise = noise[:, :, None]
    return noise


def content_shuffle(img, h=None, w=None, f=None):  # annotator/shuffle ContentShuffleDetector.__call__
    H, W, C = img.shape
    h, w, f = h or H, w or W, f or 256
    x = make_noise_disk(h, w, 1, f) * float(W - 1)
    y = make_noise_disk(h, w, 1, f) * float(H - 1)
    flow = np.concatenate([x, y], axis=2).astype(np.float32)
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


@pytest.mark.parametrize("seed,size", [(0, (160, 128)), (7, (160, 128)), (2**32 - 1, (600, 520))])
def test_shuffle_is_the_extensions_shuffle_for_its_numpy_seed(seed, size):
    """The extension seeds NumPy's global generator (``set_numpy_seed``) and shuffles."""
    picture = drawn_picture(*size)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        expected = content_shuffle(picture).astype(np.float32) / 255.0
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(shuffle(picture, seed), expected)


def test_shuffle_reproduces_by_seed_and_leaves_numpy_alone():
    picture = drawn_picture()
    state = np.random.get_state()
    first = shuffle(picture, seed=5)
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # global generator untouched
    np.testing.assert_array_equal(shuffle(picture, seed=5), first)
    assert np.abs(shuffle(picture, seed=6) - first).max() > 0.5
    assert np.abs(first - picture / 255.0).mean() > 0.05  # the content moved


def test_shuffle_rearranges_the_colours_it_has():
    """A warp reads pixels from the picture: on a checker of four colours, the output is made of
    those colours (blends only where the flow falls between cells) in about the same shares."""
    colours = np.array([[230, 30, 30], [30, 200, 60], [40, 40, 220], [240, 220, 40]], np.uint8)
    yy, xx = np.mgrid[0:512, 0:512]
    checker = colours[(xx // 8 + 2 * (yy // 8)) % 4]
    for seed in range(3):
        out = np.rint(shuffle(checker, seed) * 255).astype(np.uint8)
        shares = np.array([(out == c).all(axis=2).mean() for c in colours])
        assert shares.sum() > 0.7, shares  # measured 0.77
        assert np.abs(shares / shares.sum() - 0.25).max() < 0.03, shares  # measured <= 0.009
        assert (out != checker).any(axis=2).mean() > 0.5


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "0", None, True])
def test_shuffle_refuses_bad_seeds(bad):
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 and <= 4294967295"):
        shuffle(drawn_picture(), seed=bad)


# --- the table, preprocess, ready-made hints --------------------------------------------


def test_the_table_names_each_preprocessor_with_its_defaults():
    assert list(PREPROCESSORS) == ["none", "canny", "scribble", "threshold", "shuffle"]
    assert parameters("none") == {}
    assert parameters("canny") == {"low": 100, "high": 200}  # gradio_canny2image's defaults
    assert parameters("scribble") == {"threshold": 127}
    assert parameters("threshold") == {"threshold": 127}
    assert parameters("shuffle") == {"seed": 0}


def test_a_ready_made_hint_passes_unchanged(tmp_path):
    depth = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 3, axis=2).repeat(16, axis=0)
    path = tmp_path / "depth.png"
    Image.fromarray(depth).save(path)
    np.testing.assert_array_equal(as_hint(path), depth / np.float32(255.0))
    np.testing.assert_array_equal(preprocess("none", path), depth / np.float32(255.0))


def test_preprocess_dispatches_with_parameters():
    picture = drawn_picture()
    np.testing.assert_array_equal(preprocess("canny", picture, low=50, high=150),
                                  hwc3_unit(cv2.Canny(picture, 50, 150)))
    np.testing.assert_array_equal(preprocess("shuffle", picture, seed=3), shuffle(picture, 3))
    np.testing.assert_array_equal(preprocess("scribble", picture), scribble(picture))


def test_preprocess_fits_to_the_render_size_before_detecting():
    picture = drawn_picture(150, 100)
    fitted = np.rint(fit_to_size(picture / np.float32(255.0), 96, 64) * 255).astype(np.uint8)
    hint = preprocess("canny", picture, size=(96, 64))
    assert hint.shape == (64, 96, 3)
    np.testing.assert_array_equal(hint, hwc3_unit(cv2.Canny(fitted, 100, 200)))  # one-pixel edges


@pytest.mark.parametrize("call,error,needle", [
    (lambda p: preprocess("depth", p), ValueError, "unknown preprocessor 'depth'; valid: none, canny, scribble, "
                                                   "threshold, shuffle"),
    (lambda p: preprocess(None, p), ValueError, "unknown preprocessor None"),
    (lambda p: preprocess("canny", p, threshold=3), ValueError, "'canny' takes low, high; got threshold"),
    (lambda p: preprocess("none", p, seed=3), ValueError, "'none' takes no parameters; got seed"),
    (lambda p: preprocess("canny", p, size=(100, 64)), ValueError, "width must be a positive multiple of 8"),
    (lambda p: preprocess("canny", p, size=64), ValueError, r"size must be \(width, height\)"),
    (lambda p: canny(p[:, :, 0]), ValueError, r"control image must be an array H×W×3"),
    (lambda p: canny(p[:7]), ValueError, "control image is 160x7: it must be at least 8 pixels"),
    (lambda p: canny(p / 128.0), ValueError, "control image values must be in"),
    (lambda p: canny(p.astype(np.int32)), ValueError, "control image must be a float array"),
    (lambda p: shuffle(5), TypeError, "control image must be a PIL image, a path or an H×W×3 array"),
    (lambda p: scribble("no/such/sketch.png"), FileNotFoundError, "no/such/sketch.png"),
])
def test_bad_inputs_are_refused_by_name(call, error, needle):
    with pytest.raises(error, match=needle):
        call(drawn_picture())


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    with pytest.raises(ValueError, match="control image .*notes.png"):
        preprocess("canny", path)
