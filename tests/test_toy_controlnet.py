"""The toy ControlNet: its hints (ldm.toy.hints), the mask read back from pictures, the
training recipe (ldm.training.controlnet, scripts/train_controlnet.py: diffusers'
from_unet start, exact resumption, the exported file) and the evaluation's smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, binary_fill_holes
from scriptload import load_script

from ldm.checkpoints import load_controlnet, load_model, read_safetensors_header
from ldm.toy.hints import hint, iou, object_mask, outline, silhouette, silhouette_mask
from ldm.toy.world import PALETTE, Scene, render, sample_scene
from ldm.training import load_checkpoint
from ldm.training.controlnet import ZEROED, controlnet_config, controlnet_from_unet, hint_pixels
from ldm.training.loop import Progress

SMOKE = ["--smoke", "--steps", "4", "--save-every", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Training and sampling at one thread: as fast on these tiny models, and steady on a busy machine."""


@pytest.fixture(scope="module")
def train_script():
    return load_script("train_controlnet")


@pytest.fixture(scope="module")
def straight_run(train_script, tmp_path_factory):
    """An uninterrupted smoke run of 4 steps: its work folder and card."""
    workdir = tmp_path_factory.mktemp("straight")
    card = train_script.main([*SMOKE, "--workdir", str(workdir)])  # at one thread, its default
    return workdir, card


# --- hints -----------------------------------------------------------------------------


def test_silhouette_of_a_circle_is_the_disc_at_the_scenes_position_and_size():
    scene = Scene("circle", "red", "blue", x=0.3, y=0.6, size=0.22)
    image = silhouette(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()
    # The disc computed here from the scene's numbers: pixel centres within the radius.
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    disc = (xx - 0.3 * 64) ** 2 + (yy - 0.6 * 64) ** 2 <= (0.22 * 64) ** 2
    mask = silhouette_mask(scene)
    assert iou(mask, disc) > 0.97
    assert image[mask].min() > 128 and image[~mask].max() < 140  # white object, black ground


def test_a_cats_silhouette_has_its_eyes_and_hat_filled_in():
    scene = Scene("cat", "white", "black", hat=True, hat_color="red", hat_style="top", x=0.5, y=0.55, size=0.25)
    mask = silhouette_mask(scene)
    assert (binary_fill_holes(mask) == mask).all()  # no holes where the eyes are
    inside = binary_erosion(mask)
    assert inside.sum() > 100 and (silhouette(scene)[inside] == 255).all()  # nor rims around them
    hatless = silhouette_mask(Scene("cat", "white", "black", x=0.5, y=0.55, size=0.25))
    # The hat sits above the head: the hatted silhouette reaches higher.
    assert np.nonzero(mask.any(1))[0].min() < np.nonzero(hatless.any(1))[0].min()


def test_outline_is_the_silhouettes_rim():
    scene = Scene("square", "red", "blue", x=0.5, y=0.5, size=0.25)
    rim, mask = outline(scene)[..., 0] > 0, silhouette_mask(scene)
    assert rim.any() and not (rim & ~mask).any()
    assert not rim[32, 32] and mask[32, 32]  # the inside is left empty
    assert (hint(scene, "outline") == outline(scene)).all() and (hint(scene) == silhouette(scene)).all()


def test_hint_refuses_what_it_cannot_draw():
    with pytest.raises(ValueError, match="valid: silhouette, outline"):
        hint(Scene("circle", "red", "blue"), "canny")
    with pytest.raises(TypeError, match="Scene"):
        silhouette({"kind": "circle"})
    with pytest.raises(ValueError, match="positive integer"):
        outline(Scene("circle", "red", "blue"), width=0)


# --- the object mask -------------------------------------------------------------------


def test_object_mask_matches_the_true_silhouette_on_the_worlds_pictures():
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng, "train" if i % 2 else "heldout") for i in range(200)]
    ious = np.array([iou(object_mask(render(s), s.background), silhouette_mask(s)) for s in scenes])
    # Equal but for a few anti-aliased edge pixels (0.9999 on average over 1,000 scenes).
    assert ious.min() >= 0.99 and ious.mean() >= 0.999


def test_object_mask_cuts_a_mix_of_object_and_background_at_half():
    red, blue = np.array(PALETTE["red"], float), np.array(PALETTE["blue"], float)
    image = np.zeros((3, 3, 3), np.uint8)
    image[:] = np.round(0.7 * red + 0.3 * blue)
    image[0, 0] = np.round(0.3 * red + 0.7 * blue)
    mask = object_mask(image, "blue")
    assert mask.sum() == 8 and not mask[0, 0]
    assert not object_mask(np.full((8, 8, 3), PALETTE["green"], np.uint8), "green").any()


def test_object_mask_and_iou_refuse_bad_input():
    with pytest.raises(ValueError, match="valid: red"):
        object_mask(np.zeros((4, 4, 3), np.uint8), "teal")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        object_mask(np.zeros((4, 4)), "red")
    with pytest.raises(ValueError, match="different shapes"):
        iou(np.zeros((2, 2), bool), np.zeros((3, 3), bool))
    a = np.zeros((4, 4), bool)
    b = a.copy()
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(4 / 12) and iou(a & False, b & False) == 1.0


# --- training --------------------------------------------------------------------------


def test_controlnet_starts_as_diffusers_from_unet_does(sd1_folder):
    """Every weight as diffusers' ControlNetModel.from_unet sets it: the U-Net's input half
    copied, the zero convs and the hint embedding's last conv zero."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    loaded = load_model(sd1_folder)
    channels = (16, 32, 96, 256)
    ours = controlnet_from_unet(loaded.unet, controlnet_config(loaded.config, channels)).state_dict()
    theirs = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(sd1_folder / "unet"),
                                       conditioning_embedding_out_channels=channels).state_dict()
    assert ours.keys() == theirs.keys()
    random = [k for k in ours if k.startswith("controlnet_cond_embedding.") and not k.startswith(ZEROED)]
    assert random and all(ours[k].abs().max() > 0 for k in random)  # random in both: not compared
    for key in ours.keys() - set(random):
        assert ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key]), key


def test_controlnet_adds_nothing_at_the_start_and_refuses_a_foreign_unet(sd1_folder):
    loaded = load_model(sd1_folder)
    config = controlnet_config(loaded.config, (16, 32, 96, 256))
    # The recipe's start: the hint embedding's last conv random too, the zero convs still zero.
    controlnet = controlnet_from_unet(loaded.unet, config, zero_hint_out=False)
    assert controlnet.controlnet_cond_embedding.conv_out.weight.abs().max() > 0
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 32, generator=gen)
    hints = hint_pixels(torch.randint(0, 256, (2, 3, 64, 64), generator=gen, dtype=torch.uint8))
    with torch.no_grad():
        res = controlnet(x, torch.tensor([10, 900]), ctx, hints)
        assert all(r.abs().max() == 0 for r in (*res.down, res.mid))
        plain = loaded.unet(x, torch.tensor([10, 900]), ctx)
        controlled = loaded.unet(x, torch.tensor([10, 900]), ctx, down_residuals=res.down, mid_residual=res.mid)
    assert torch.equal(plain, controlled)
    with pytest.raises(ValueError, match="give 4 widths"):
        controlnet_config(loaded.config, (16, 32))
    toy = load_model(Path(__file__).resolve().parents[1] / "weights" / "ldm-toy.safetensors")
    with pytest.raises(ValueError, match="not this U-Net's"):
        controlnet_from_unet(toy.unet, config)


def test_smoke_run_writes_an_original_layout_toy_controlnet(straight_run):
    workdir, card = straight_run
    out = workdir / "ldm-toy-controlnet-silhouette.safetensors"
    shapes, metadata = read_safetensors_header(out)
    assert shapes and all(k.startswith("control_model.") for k in shapes)
    assert {"control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight",
            "control_model.middle_block_out.0.weight"} <= set(shapes)
    loaded = load_controlnet(out)
    assert loaded.config.family == "toy" and loaded.layout == "original"
    assert loaded.config.unet == load_model(card["base"]).config.unet
    trained = load_checkpoint(workdir / "controlnet.pt")
    assert trained["step"] == 4 and card["steps"] == 4
    for key, value in trained["model"].items():  # written in float16
        assert torch.equal(loaded.model.state_dict()[key], value.half().float()), key
    # Trained: the zero convs have left zero.
    assert trained["model"]["controlnet_mid_block.weight"].abs().max() > 0
    assert json.loads((workdir / "card.json").read_text())["hint"] == "silhouette"


def test_an_interrupted_run_resumes_bit_exact(train_script, straight_run, tmp_path, monkeypatch, capsys):
    update = Progress.update

    def crash_at_step_3(self, step, loss, stats):
        if step == 3:
            raise KeyboardInterrupt
        return update(self, step, loss, stats)

    monkeypatch.setattr(Progress, "update", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_script.main([*SMOKE, "--workdir", str(tmp_path)])
    assert load_checkpoint(tmp_path / "controlnet.pt")["step"] == 2
    monkeypatch.setattr(Progress, "update", update)
    capsys.readouterr()
    train_script.main([*SMOKE, "--workdir", str(tmp_path)])
    assert "[controlnet] resuming at step 2/4" in capsys.readouterr().out
    a, b = (load_checkpoint(d / "controlnet.pt") for d in (tmp_path, straight_run[0]))
    assert a["record"]["losses"] == b["record"]["losses"]
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(SystemExit, match="other settings"):
        train_script.main([*SMOKE, "--workdir", str(tmp_path), "--lr", "5e-4"])


def test_init_from_continues_a_given_controlnet(train_script, straight_run, tmp_path):
    given = straight_run[0] / "ldm-toy-controlnet-silhouette.safetensors"
    card = train_script.main(["--smoke", "--steps", "1", "--lr", "1e-9", "--workdir", str(tmp_path),
                              "--init-from", str(given)])
    assert card["init_from"] == str(given) and card["init"]
    start, trained = (load_controlnet(p).model.state_dict() for p in (given, Path(card["controlnet"])))
    # A step at a rate of 1e-9 leaves the given weights as they were (to float16).
    assert all(torch.allclose(trained[k], start[k], atol=1e-3) for k in start)
    assert trained["controlnet_mid_block.weight"].abs().max() > 0


# --- evaluation ------------------------------------------------------------------------


def test_eval_smoke_run_reports_every_scale(straight_run, tmp_path):
    evaluate = load_script("eval_controlnet")
    controlnet = straight_run[0] / "ldm-toy-controlnet-silhouette.safetensors"
    assert evaluate.main(["--smoke", "--controlnet", str(controlnet), "--out", str(tmp_path), "--guess-mode",
                          "--guidance", "3"]) == 0
    report = json.loads((tmp_path / "eval_controlnet.json").read_text())
    assert report["settings"]["guidance"] == 3 and report["settings"]["guess_mode"]
    assert "guidance 3, guess mode" in (tmp_path / "eval_controlnet.md").read_text()
    assert [r["scale"] for r in report["scales"]] == [0.0, 0.5, 1.0, 1.5]
    for row in report["scales"]:
        assert 0 <= row["iou"] <= 1 and len(row["ious"]) == 2 and "kind" in row["attributes"]
    # Through the VAE the scene's own picture keeps its silhouette: the measure's ceiling.
    assert report["vae_round_trip"]["iou"] > 0.8
    assert report["verdict"]["run"] and (tmp_path / "controlnet.png").is_file()
    assert "| 1.5 |" in (tmp_path / "eval_controlnet.md").read_text()


@pytest.mark.parametrize("bad", ["0.5", "31"])
def test_eval_refuses_a_guidance_out_of_range(bad, capsys):
    with pytest.raises(SystemExit):
        load_script("eval_controlnet").parse_args(["--guidance", bad])
    assert f"--guidance must be between 1 and 30, got {float(bad)}" in capsys.readouterr().err


def test_caption_dropout_is_a_setting_of_the_run(train_script, straight_run, capsys):
    assert straight_run[1]["caption_dropout"] == 0.5  # the paper's, by default
    args = train_script.parse_args(["--smoke", "--caption-dropout", "0.1", "--workdir", str(straight_run[0])])
    assert args.caption_dropout == 0.1
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            train_script.parse_args(["--smoke", "--caption-dropout", bad])
        assert "--caption-dropout must be in [0, 1)" in capsys.readouterr().err
    # A resumed run with another rate is another run (the rate is in the stage's fingerprint).
    with pytest.raises(SystemExit, match="other settings"):
        train_script.main([*SMOKE, "--workdir", str(straight_run[0]), "--caption-dropout", "0.2"])
