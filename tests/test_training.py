"""The ldm.training package, and scripts/train_toy.py (its recipe): smoke run, export, resume, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scriptload import load_script

from ldm.config import PRESETS, ModelConfig
from ldm.training import (
    EMA,
    NoiseSchedule,
    Progress,
    RunSettings,
    StageSpec,
    clip_contrastive_loss,
    derive_seed,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    train_stage,
    trim_after_first_eos,
    warmup_constant_lr,
    warmup_cosine_lr,
)

MB = 10**6


@pytest.fixture(scope="module")
def train_toy():
    """The recipe and its command line (the library pieces come from ldm.training)."""
    return load_script("train_toy")


def _smoke(train_toy, workdir: Path, *extra: str) -> dict:
    return train_toy.main(["--smoke", "--workdir", str(workdir), *extra])


def _smoke_log(train_toy, capsys, workdir: Path, *extra: str) -> tuple[dict, str]:
    """A smoke run's model card and what it printed."""
    capsys.readouterr()
    card = _smoke(train_toy, workdir, *extra)
    return card, capsys.readouterr().out


def _load_model():
    try:
        from ldm.checkpoints import load_model
    except ImportError as exc:  # pragma: no cover - only while the loader is being written
        pytest.skip(f"ldm.checkpoints.load_model is not importable yet: {exc}")
    return load_model


# --- ldm.training -------------------------------------------------------------------


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2)
    seeds = {derive_seed(0, stage, step) for stage in range(4) for step in range(100)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)


def test_ema_follows_litema_decay():
    module = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(1.0)
    ema.update(module)  # decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 0.9))
    restored = EMA(module, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.shadow["weight"], ema.shadow["weight"])


def test_warmup_then_constant_lr():
    assert warmup_constant_lr(0, 1.0, 4) == 0.25
    assert warmup_constant_lr(3, 1.0, 4) == 1.0
    assert warmup_constant_lr(1000, 1.0, 4) == 1.0


def test_warmup_then_cosine_lr():
    assert warmup_cosine_lr(0, 1.0, 4, 104) == 0.25
    assert warmup_cosine_lr(4, 1.0, 4, 104) == 1.0  # first step after warm-up: the peak
    assert warmup_cosine_lr(54, 1.0, 4, 104) == pytest.approx(0.5)  # half way: cos(pi/2) = 0
    assert warmup_cosine_lr(104, 1.0, 4, 104) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine_lr(104, 1.0, 4, 104, final_fraction=0.1) == pytest.approx(0.1)
    rates = [warmup_cosine_lr(s, 1.0, 4, 104) for s in range(4, 105)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_lr(0, 1.0, 0, 0)


def test_save_checkpoint_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"step": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "missing.pt") is None


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    save_checkpoint(state, tmp_path / "rng.pt")
    first = (torch.rand(3), torch.randint(0, 10**6, (1,)).item())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    assert torch.equal(torch.rand(3), first[0]) and torch.randint(0, 10**6, (1,)).item() == first[1]


def test_clip_loss():
    x = torch.eye(4)
    good = clip_contrastive_loss(x, x, torch.tensor(math.log(100.0)))
    bad = clip_contrastive_loss(x, x.roll(1, 0), torch.tensor(math.log(100.0)))
    assert good < 1e-3 < math.log(4) < bad
    # The temperature is clipped at 100, as in CLIP.
    assert torch.equal(clip_contrastive_loss(x, x, torch.tensor(10.0)), good)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noise_schedule(prediction_type):
    schedule = NoiseSchedule(ModelConfig(prediction_type=prediction_type))
    a = schedule.alphas_cumprod
    # SD's scaled-linear betas: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012).
    assert math.isclose(1 - a[0].item(), 0.00085, rel_tol=1e-4)
    assert math.isclose(a[-1].item(), 0.0047, rel_tol=0.01)
    x0, noise, t = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.tensor([0, 999])
    xt = schedule.add_noise(x0, noise, t)
    assert torch.allclose(xt[1], a[999].sqrt() * x0[1] + (1 - a[999]).sqrt() * noise[1])
    target = schedule.target(x0, noise, t)
    expected = noise if prediction_type == "epsilon" else a[t].sqrt()[:, None, None, None] * noise - (
        1 - a[t]).sqrt()[:, None, None, None] * x0
    assert torch.allclose(target, expected)


def test_timestep_sampling():
    schedule = NoiseSchedule(ModelConfig())
    x0 = torch.zeros(20000, 1)
    uniform, _ = schedule.draw(x0, torch.Generator().manual_seed(0))
    cubic, _ = schedule.draw(x0, torch.Generator().manual_seed(0), "cubic")
    for t in (uniform, cubic):
        assert t.dtype == torch.long and 0 <= int(t.min()) and int(t.max()) <= 999
    # t = (1 - u^3) T: P(t >= T/2) = P(u^3 <= 1/2) = 0.5^(1/3) = 0.794; uniform: 0.5.
    assert abs((cubic >= 500).float().mean().item() - 0.5 ** (1 / 3)) < 0.01
    assert abs((uniform >= 500).float().mean().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="unknown timestep sampling 'cosine'.*uniform, cubic"):
        schedule.draw(x0, None, "cosine")


class _Points(torch.utils.data.Dataset):
    """y = 2x + 1 at points drawn by global sample index, as the stage loop expects."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.randn(1, generator=torch.Generator().manual_seed(derive_seed(7, self.first + i)))
        return {"x": x, "y": 2 * x + 1}


class _Regression(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch, generator):
        jitter = 0.01 * torch.randn(batch["x"].shape, generator=generator)  # the step's own noise
        return torch.nn.functional.mse_loss(self.model(batch["x"] + jitter), batch["y"]), {}


def _fit(workdir: Path, steps: int) -> dict[str, torch.Tensor]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    spec = StageSpec("fit", steps=steps, batch_size=4, lr=0.1, warmup=1, weight_decay=0.0, ema_decay=0.9)
    run = RunSettings(workdir=workdir, seed=3, save_every=1, log_every=1)
    result = train_stage(Accelerator(cpu=True), run, spec, _Regression(model), model, _Points,
                         stream=1, fingerprint={"model": "linear"}, inputs={})
    return result.state


def test_the_stage_loop_is_generic_and_resumes_exactly(tmp_path, capsys):
    straight = _fit(tmp_path / "straight", 4)
    _fit(tmp_path / "resumed", 2)
    resumed = _fit(tmp_path / "resumed", 4)
    assert "[fit] resuming at step 2/4" in capsys.readouterr().out
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert load_checkpoint(tmp_path / "resumed" / "fit.pt")["step"] == 4


# --- the toy preset -------------------------------------------------------------------


def test_toy_preset_fits_the_size_budget():
    from ldm.models.text import TextEncoder
    from ldm.models.unet import UNet
    from ldm.models.vae import AutoencoderKL

    toy = PRESETS["toy"]
    assert toy.default_size == 64 and toy.unet.cross_attention_dim == toy.text.hidden_size
    with torch.device("meta"):
        modules = [UNet(toy.unet), AutoencoderKL(toy.vae), TextEncoder(toy.text)]
    params = sum(p.numel() for m in modules for p in m.parameters())
    assert 2 * params < 40 * MB  # fp16 storage


# --- scripts/train_toy.py ---------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(train_toy, tmp_path_factory):
    """An uninterrupted smoke run with 4 U-Net and 4 inpainting steps: (workdir, model card)."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, _smoke(train_toy, workdir, "--unet-steps", "4", "--inpaint-steps", "4")


def test_smoke_run_exports_a_loadable_checkpoint(straight_run):
    load_model = _load_model()
    workdir, card = straight_run
    out = workdir / "ldm-toy.safetensors"
    assert card["checkpoint_bytes"] == out.stat().st_size < 40 * MB
    tensors = load_file(out)
    prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in tensors}
    assert {"model.diffusion_model", "first_stage_model.encoder", "cond_stage_model.transformer"} <= prefixes
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    model = load_model(out)
    assert model.config.family == "toy"
    assert model.config.vae.scaling_factor == pytest.approx(card["latents"]["scaling_factor"])
    assert set(card["stages"]) == {"clip", "vae", "unet", "inpaint"}
    scorer = load_file(workdir / "toy-clip-vision.safetensors")
    assert "visual.attnpool.c_proj.weight" in scorer and "text_projection.weight" in scorer
    assert not any(k.startswith("text_model.") for k in scorer)  # the text tower is in the checkpoint


def test_vae_from_a_checkpoint_skips_the_stage_and_hands_that_vae_on(train_toy, straight_run, tmp_path, capsys):
    load_model = _load_model()
    source = straight_run[0] / "ldm-toy.safetensors"
    capsys.readouterr()
    card = _smoke(train_toy, tmp_path, "--unet-steps", "2", "--vae-from", str(source))
    assert "[vae]" not in capsys.readouterr().out  # not trained
    assert card["stages"]["vae"]["from"] == str(source) and len(card["stages"]["vae"]["sha256"]) == 64
    given, made = load_model(source).vae.state_dict(), load_model(tmp_path / "ldm-toy.safetensors").vae.state_dict()
    assert all(torch.equal(given[k], made[k]) for k in given)

    # The full recipe's VAE has another shape: refused before anything trains.
    with pytest.raises(SystemExit, match="not the recipe's"):
        train_toy.main(["--workdir", str(tmp_path / "full"), "--vae-from", str(source)])
    assert not (tmp_path / "full" / "clip.pt").exists()


def test_unet_from_a_release_starts_from_its_unet_and_keeps_the_rest(train_toy, straight_run, tmp_path, capsys):
    load_model = _load_model()
    source_dir = straight_run[0]
    source = source_dir / "ldm-toy.safetensors"
    capsys.readouterr()
    # Learning rate 0: the exported U-Net must be the source's, bit for bit (its EMA
    # starts at the given weights). Other kinds than the source's pictures change the
    # latents' std, which must not change the scaling factor the U-Net was trained at.
    card = _smoke(train_toy, tmp_path, "--unet-steps", "2", "--unet-lr", "0", "--unet-from", str(source),
                  "--unet-kinds", "0,0,0,0,1")
    log = capsys.readouterr().out
    assert "[clip]" not in log and "[vae]" not in log  # neither stage runs
    before, after = load_model(source), load_model(tmp_path / "ldm-toy.safetensors")
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert after.config == before.config
    assert card["latents"]["scaling_factor"] != pytest.approx(before.config.vae.scaling_factor)
    assert card["stages"]["unet"]["init"]["from"] == str(source) and card["stages"]["unet"]["steps"] == 2
    assert card["unet_kinds"] == {"cat": 0, "circle": 0, "square": 0, "triangle": 0, "star": 1}
    scorers = [load_file(d / "toy-clip-vision.safetensors") for d in (source_dir, tmp_path)]
    assert scorers[0].keys() == scorers[1].keys() and all(torch.equal(scorers[0][k], scorers[1][k])
                                                          for k in scorers[0])


def test_unet_from_refuses_what_it_cannot_continue(train_toy, straight_run, tmp_path):
    source = straight_run[0] / "ldm-toy.safetensors"
    with pytest.raises(SystemExit, match="leave out --vae-from"):
        _smoke(train_toy, tmp_path / "a", "--unet-from", str(source), "--vae-from", str(source))
    with pytest.raises(SystemExit, match="its unet is not the recipe's"):  # the full recipe's U-Net is larger
        train_toy.main(["--workdir", str(tmp_path / "full"), "--unet-from", str(source)])
    alone = tmp_path / "alone" / "ldm-toy.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(source.read_bytes())
    with pytest.raises(SystemExit, match="no CLIP scorer beside it"):
        _smoke(train_toy, tmp_path / "b", "--unet-from", str(alone))
    assert not any((tmp_path / d / "unet.pt").exists() for d in ("a", "b", "full"))


def test_decoder_fine_tune_changes_the_decoder_only(train_toy, straight_run, tmp_path, capsys):
    load_model = _load_model()
    source = straight_run[0] / "ldm-toy.safetensors"
    card, log = _smoke_log(train_toy, capsys, tmp_path, "--unet-from", str(source), "--unet-steps", "0",
                           "--decoder-steps", "2", "--inpaint-steps", "0")
    assert "[decoder] step 2/2" in log
    assert "[unet]" not in log and "[latents]" not in log  # the U-Net is kept, nothing to encode
    before, after = load_model(source), load_model(tmp_path / "ldm-toy.safetensors")
    assert after.config == before.config  # the scaling factor included
    for part in ("unet", "text_encoder"):
        a, b = getattr(before, part).state_dict(), getattr(after, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    a, b = before.vae.state_dict(), after.vae.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)  # latents of any picture unchanged
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("decoder."))
    assert card["stages"]["unet"]["from"] == str(source)
    assert card["stages"]["decoder"]["steps"] == 2
    assert card["stages"]["decoder"]["parameters"] < card["stages"]["vae"]["parameters"]

    with pytest.raises(SystemExit, match="needs --unet-from"):
        _smoke(train_toy, tmp_path / "alone", "--unet-steps", "0")


@pytest.mark.parametrize("bad", ["1,1,1", "1,1,1,1,x", "0,0,0,0,0"])
def test_unet_kinds_must_be_five_weights(train_toy, bad, capsys):
    with pytest.raises(SystemExit):
        train_toy.parse_args(["--unet-kinds", bad])
    assert "--unet-kinds" in capsys.readouterr().err


def test_resume_continues_and_matches_an_uninterrupted_run(train_toy, straight_run, tmp_path, capsys):
    _smoke(train_toy, tmp_path / "a", "--unet-steps", "2")
    first = load_checkpoint(tmp_path / "a" / "unet.pt")
    assert first["step"] == 2
    capsys.readouterr()

    _smoke(train_toy, tmp_path / "a", "--unet-steps", "4")
    log = capsys.readouterr().out
    assert "[clip] done earlier" in log and "[vae] done earlier" in log
    assert "[unet] resuming at step 2/4" in log and "[unet] step 1/" not in log
    resumed = load_checkpoint(tmp_path / "a" / "unet.pt")
    assert resumed["step"] == 4
    assert [s for s, _ in resumed["record"]["losses"]] == [1, 2, 3, 4]
    assert resumed["record"]["losses"][:2] == first["record"]["losses"]

    straight = load_checkpoint(straight_run[0] / "unet.pt")
    for key in ("model", "ema"):
        a, b = resumed[key], straight[key]
        a, b = (a["shadow"], b["shadow"]) if key == "ema" else (a, b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    exported = [load_file(d / "ldm-toy.safetensors") for d in (tmp_path / "a", straight_run[0])]
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])


def test_cosine_run_resumes_bit_exact_after_an_interruption(train_toy, tmp_path, monkeypatch, capsys):
    cosine = ("--lr-schedule", "cosine", "--unet-steps", "4")
    straight = tmp_path / "straight"
    _smoke(train_toy, straight, *cosine)

    update = Progress.update

    def crash_at_step_3(self, step, loss, stats):
        if self.spec.name == "unet" and step == 3:
            raise KeyboardInterrupt
        return update(self, step, loss, stats)

    monkeypatch.setattr(Progress, "update", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        _smoke(train_toy, tmp_path / "a", *cosine)
    assert load_checkpoint(tmp_path / "a" / "unet.pt")["step"] == 2
    monkeypatch.setattr(Progress, "update", update)
    capsys.readouterr()
    _smoke(train_toy, tmp_path / "a", *cosine)
    assert "[unet] resuming at step 2/4" in capsys.readouterr().out
    a, b = (load_checkpoint(d / "unet.pt")["model"] for d in (tmp_path / "a", straight))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The cosine's shape depends on the step count, so a finished stage cannot be extended.
    with pytest.raises(SystemExit, match="other settings"):
        _smoke(train_toy, tmp_path / "a", "--lr-schedule", "cosine", "--unet-steps", "6")


def test_trimming_after_the_end_token_keeps_clip_text_embeddings_exact():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from ldm.foreign_config import text_to_transformers
    from ldm.models.tokenizer import EOS_ID, Tokenizer

    torch.manual_seed(0)
    cfg = dict(text_to_transformers(PRESETS["toy"].text), hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=2)
    model = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    ids = Tokenizer()(["a red cat wearing a blue hat on a green background", "a star", ""])
    trimmed = trim_after_first_eos(ids, EOS_ID)
    assert trimmed.shape[1] == len(Tokenizer().encode("a red cat wearing a blue hat on a green background")) + 2
    with torch.no_grad():
        full, short = model(input_ids=ids).text_embeds, model(input_ids=trimmed).text_embeds
    assert torch.allclose(full, short, atol=1e-5)


# --- the inpainting stage --------------------------------------------------------------------


def test_random_masks_are_binary_deterministic_and_of_every_kind():
    import numpy as np

    from ldm.training import masks

    draws = [masks.random_mask(np.random.default_rng(i), 32) for i in range(200)]
    again = [masks.random_mask(np.random.default_rng(i), 32) for i in range(200)]
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert all(m.shape == (32, 32) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in draws)
    full = sum(bool(m.all()) for m in draws)
    assert 0.15 < full / len(draws) < 0.35 and not any((m == 0).all() for m in draws)
    rng = np.random.default_rng(0)
    border = masks.border_mask(rng, 32)
    assert border.any() and any(line.all() for line in (border[:, 0], border[0], border[:, -1], border[-1]))
    assert 0 < masks.box_mask(rng, 32).mean() < 1 and 0 < masks.stroke_mask(rng, 32).mean() < 1
    with pytest.raises(ValueError, match="size"):
        masks.random_mask(rng, 4)


def test_inpainting_unet_starts_as_the_given_unet_with_zero_extra_channels():
    from ldm.models.unet import UNet
    from ldm.training import inpainting_unet
    from ldm.config import with_changes

    config = PRESETS["toy"]
    config = with_changes(config, unet=with_changes(config.unet, block_out_channels=(16, 32),
                                                     num_attention_heads=(1, 2), norm_num_groups=8))
    torch.manual_seed(0)
    source = UNet(config.unet).state_dict()
    unet = inpainting_unet(config, source)
    state = unet.state_dict()
    assert unet.config.in_channels == 9
    assert torch.equal(state["conv_in.weight"][:, :4], source["conv_in.weight"])
    assert not state["conv_in.weight"][:, 4:].any()
    assert all(torch.equal(state[k], v) for k, v in source.items() if k != "conv_in.weight")
    with pytest.raises(ValueError, match="input channels"):
        inpainting_unet(config, state)


def test_inpaint_stage_exports_a_toy_inpainting_model(straight_run):
    load_model = _load_model()
    workdir, card = straight_run
    stage = card["stages"]["inpaint"]
    assert stage["steps"] == 4 and stage["checkpoint"] == str(workdir / "ldm-toy-inpaint.safetensors")
    model, base = load_model(workdir / "ldm-toy-inpaint.safetensors"), load_model(workdir / "ldm-toy.safetensors")
    assert model.config.is_inpainting and model.config.unet.in_channels == 9
    assert model.config.vae == base.config.vae and model.config.text == base.config.text
    a, b = model.vae.state_dict(), base.vae.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same VAE: the masked picture's latents match
    assert model.unet.state_dict()["conv_in.weight"][:, 4:].any()  # the new channels learned


def test_inpaint_stage_from_a_release_with_rate_zero_keeps_its_unet(train_toy, straight_run, tmp_path, capsys):
    load_model = _load_model()
    source = straight_run[0] / "ldm-toy.safetensors"
    card, log = _smoke_log(train_toy, capsys, tmp_path, "--unet-from", str(source), "--unet-steps", "0",
                           "--inpaint-steps", "2", "--inpaint-lr", "0")
    assert "[unet]" not in log and "[inpaint] step 2/2" in log
    given, made = load_model(source).unet.state_dict(), load_model(tmp_path / "ldm-toy-inpaint.safetensors")
    state = made.unet.state_dict()
    assert torch.equal(state["conv_in.weight"][:, :4], given["conv_in.weight"])
    assert not state["conv_in.weight"][:, 4:].any()  # zero-initialised, as SD's inpainting model began
    assert all(torch.equal(state[k], v) for k, v in given.items() if k != "conv_in.weight")
    assert card["stages"]["inpaint"]["init"]["from"] == str(source)


def test_inpaint_stage_resumes_bit_exact(train_toy, straight_run, tmp_path, capsys):
    _smoke(train_toy, tmp_path, "--unet-steps", "4", "--inpaint-steps", "2")
    _, log = _smoke_log(train_toy, capsys, tmp_path, "--unet-steps", "4", "--inpaint-steps", "4")
    assert "[unet] done earlier" in log and "[inpaint] resuming at step 2/4" in log
    resumed, straight = (load_checkpoint(d / "inpaint.pt") for d in (tmp_path, straight_run[0]))
    for key in ("model", "ema"):
        a, b = resumed[key], straight[key]
        a, b = (a["shadow"], b["shadow"]) if key == "ema" else (a, b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), key
    exported = [load_file(d / "ldm-toy-inpaint.safetensors") for d in (tmp_path, straight_run[0])]
    assert exported[0].keys() == exported[1].keys()
    assert all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
