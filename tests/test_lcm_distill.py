"""Latent consistency distillation (ldm.training.lcm_distill, scripts/train_lcm.py): the loss
against the formulas of diffusers' train_lcm_distill_sd_wds.py computed here with diffusers'
own models and schedulers, the student's start, the target network's moving average, an
interrupted smoke run resumed bit for bit, the exported model, the evaluation's smoke run
and refused inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from scriptload import load_script

from ldm.checkpoints import load_model, read_safetensors_header
from ldm.models.layers import guidance_scale_embedding
from ldm.samplers.lcm import lcm_timesteps
from ldm.training import RunSettings, StageSpec, load_checkpoint
from ldm.training.lcm_distill import (
    ConsistencyPair, DDIMSolver, LCDSettings, LCDTask, distill_lcm, split_pair_state, student_from_teacher,
)
from ldm.training.losses import NoiseSchedule

SMOKE = ["--smoke", "--steps", "4", "--save-every", "2"]
COND_DIM = 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models at one thread: as fast, and steady on a busy machine."""


def _nudge(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every weight a little, so the student, the target and the teacher all differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _task(folder, loss: str = "l2", timestep_scaling: float = 10.0):
    loaded = load_model(folder)
    settings = LCDSettings(w_min=2.0, w_max=9.0, cond_dim=COND_DIM, loss=loss, huber_c=0.05,
                           timestep_scaling=timestep_scaling)
    pair = ConsistencyPair(student_from_teacher(loaded.unet, COND_DIM))
    _nudge(pair.student, 1)
    _nudge(pair.target, 2)
    task = LCDTask(loaded.unet, loaded.text_encoder, pair, NoiseSchedule(loaded.config),
                   loaded.tokenizer([""])[0], settings)
    return loaded, task


def _reference_loss(folder, task: LCDTask, latents, context, uncond, index, noise, w) -> torch.Tensor:
    """The script's steps 2-10 with diffusers' U-Nets (holding our weights), its DDPMScheduler's
    alphas, LCMScheduler's boundary scalings and the LCM pipeline's guidance embedding."""
    from diffusers import DDPMScheduler, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel

    s = task.settings
    teacher = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    nets = {}
    for name, module in (("student", task.pair.student), ("target", task.pair.target)):
        net = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=COND_DIM).eval()
        net.load_state_dict(module.state_dict(), strict=True)
        nets[name] = net
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    kind = scheduler.config.prediction_type
    acp = scheduler.alphas_cumprod
    alpha, sigma = acp.sqrt(), (1 - acp).sqrt()
    k = scheduler.config.num_train_timesteps // s.num_ddim_timesteps
    ddim = torch.from_numpy((np.arange(1, s.num_ddim_timesteps + 1) * k).round().astype(np.int64) - 1)
    acp_prev = torch.cat([acp[:1], acp[ddim[:-1]]])
    start = ddim[index]
    end = torch.where(start - k < 0, torch.zeros_like(start), start - k)
    lcm = LCMScheduler(timestep_scaling=s.timestep_scaling)

    def col(values):
        return torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1)

    def scalings(t):
        pairs = [lcm.get_scalings_for_boundary_condition_discrete(int(v)) for v in t]
        return col([p[0] for p in pairs]), col([p[1] for p in pairs])

    def x0(out, t, x):
        a, b = col(alpha[t]), col(sigma[t])
        return (x - b * out) / a if kind == "epsilon" else a * x - b * out

    def eps(out, t, x):
        a, b = col(alpha[t]), col(sigma[t])
        return out if kind == "epsilon" else a * out + b * x

    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, start)
        w_emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=COND_DIM)
        c_skip_start, c_out_start = scalings(start)
        c_skip, c_out = scalings(end)
        out = nets["student"](noisy, start, timestep_cond=w_emb, encoder_hidden_states=context).sample
        model_pred = c_skip_start * noisy + c_out_start * x0(out, start, noisy)
        cond = teacher(noisy, start, encoder_hidden_states=context).sample
        free = teacher(noisy, start, encoder_hidden_states=uncond).sample
        g = col(w)
        pred_x0 = x0(cond, start, noisy) + g * (x0(cond, start, noisy) - x0(free, start, noisy))
        pred_eps = eps(cond, start, noisy) + g * (eps(cond, start, noisy) - eps(free, start, noisy))
        a_prev = col(acp_prev[index])
        x_prev = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * pred_eps
        out = nets["target"](x_prev, end, timestep_cond=w_emb, encoder_hidden_states=context).sample
        target = c_skip * x_prev + c_out * x0(out, end, x_prev)
        if s.loss == "l2":
            return torch.nn.functional.mse_loss(model_pred, target)
        return torch.mean(torch.sqrt((model_pred - target) ** 2 + s.huber_c**2) - s.huber_c)


def _inputs(loaded, n: int = 3):
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(n, 4, 8, 8, generator=gen)
    ids = loaded.tokenizer(["a red cat", "a blue square on a green background", "a star"][:n])
    with torch.no_grad():  # the text encoder is not under test here: both sides read its output
        context, uncond = loaded.text_encoder(ids), loaded.text_encoder(loaded.tokenizer([""] * n))
    return latents, ids, context, uncond


# At LCM's timestep scaling of 10, c_skip is below 1e-5 and c_out above 0.99999 for every
# start timestep (19 and up), and 1 and 0 at timestep 0: a scaling of 0.005 puts both well
# inside (0, 1) at every solver timestep, so that the boundary condition itself is checked.
@pytest.mark.parametrize("which, loss, scaling", [("sd1_folder", "l2", 10.0), ("sd1_folder", "huber", 10.0),
                                                  ("sd2v_folder", "l2", 10.0), ("sd1_folder", "l2", 0.005)])
def test_loss_of_a_fixed_draw_is_the_reference_formula(which, loss, scaling, request):
    folder = request.getfixturevalue(which)
    loaded, task = _task(folder, loss, scaling)
    latents, _, context, uncond = _inputs(loaded)
    # Both ends of the solver's schedule (index 0 steps to timestep 0) and one between.
    index, w = torch.tensor([0, 23, 49]), torch.tensor([2.0, 5.25, 9.0])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))
    got, _ = task.loss(latents, context, uncond, index, noise, w)
    expected = _reference_loss(folder, task, latents, context, uncond, index, noise, w)
    assert expected > 1e-4  # student, target and teacher differ: every term is in play
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item(), (got.item(), expected.item())


def test_forward_draws_as_the_script_and_encodes_the_empty_caption(sd1_folder):
    loaded, task = _task(sd1_folder)
    latents, ids, context, uncond = _inputs(loaded)
    got, _ = task({"latents": latents, "ids": ids}, torch.Generator().manual_seed(9))
    gen = torch.Generator().manual_seed(9)  # the script's order: index, noise, w ~ U[w_min, w_max]
    index = torch.randint(0, 50, (3,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    w = (9.0 - 2.0) * torch.rand((3,), generator=gen) + 2.0
    expected = _reference_loss(sd1_folder, task, latents, context, uncond, index, noise, w)
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()


def test_student_starts_equal_to_the_teacher_at_every_guidance_scale(sd1_folder):
    teacher = load_model(sd1_folder).unet
    student = student_from_teacher(teacher, COND_DIM)
    assert student.config.time_cond_proj_dim == COND_DIM and teacher.config.time_cond_proj_dim is None
    assert torch.equal(student.time_embedding.cond_proj.weight, torch.zeros(32, COND_DIM))
    gen = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(5, 4, 8, 8, generator=gen), torch.randn(5, 77, 32, generator=gen)
    t = torch.tensor([999, 759, 499, 259, 19])
    with torch.no_grad():
        expected = teacher(x, t, ctx)
        for w in (0.0, 1.0, 6.5, 11.0, 40.0):
            got = student(x, t, ctx, timestep_cond=guidance_scale_embedding(torch.full((5,), w), COND_DIM))
            assert torch.equal(got, expected), w
    pair = ConsistencyPair(student)  # the target starts as the student, and takes no gradient
    assert all(torch.equal(a, b) for a, b in zip(pair.target.parameters(), student.parameters()))
    assert not any(p.requires_grad for p in pair.target.parameters())


def test_target_is_the_scripts_moving_average(sd1_folder):
    pair = ConsistencyPair(student_from_teacher(load_model(sd1_folder).unet, COND_DIM))
    before = {k: v.clone() for k, v in pair.target.state_dict().items()}
    _nudge(pair.student, 7)
    online = pair.student.state_dict()
    pair.update_target(0.95)
    for key, value in pair.target.state_dict().items():  # update_ema: targ * rate + src * (1 - rate)
        assert torch.allclose(value, before[key] * 0.95 + online[key] * 0.05, atol=1e-7), key
    student, target = split_pair_state(pair.state_dict())
    assert set(student) == set(target) and "time_embedding.cond_proj.weight" in target


def test_solver_timesteps_are_the_lcm_samplers_origin_schedule():
    solver = DDIMSolver(torch.linspace(0.99, 0.01, 1000), 50)
    assert solver.stride == 20 and solver.timesteps[0] == 19 and solver.timesteps[-1] == 999
    assert solver.timesteps.tolist() == sorted(lcm_timesteps(1000, 50).tolist())


# --- the recipe ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_script():
    return load_script("train_lcm")


@pytest.fixture(scope="module")
def straight_run(train_script, tmp_path_factory):
    """An uninterrupted smoke run of 4 steps of the shipped toy model: its work folder and card."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, train_script.main([*SMOKE, "--workdir", str(workdir)])


def test_a_run_interrupted_before_a_target_update_resumes_bit_exact(train_script, straight_run, tmp_path,
                                                                     monkeypatch, capsys):
    """Stopped in step 3 between the student's optimiser step and the target's update (the
    target's moving average is the state a consistency run adds): step 2's checkpoint holds
    both networks, and the rerun continues as if nothing happened."""
    update, calls = ConsistencyPair.update_target, []

    def stop_in_the_third(self, decay):
        calls.append(decay)
        if len(calls) == 3:
            raise KeyboardInterrupt
        update(self, decay)

    monkeypatch.setattr(ConsistencyPair, "update_target", stop_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        train_script.main([*SMOKE, "--workdir", str(tmp_path)])
    assert calls == [0.95] * 3 and load_checkpoint(tmp_path / "lcm.pt")["step"] == 2
    monkeypatch.undo()
    capsys.readouterr()
    train_script.main([*SMOKE, "--workdir", str(tmp_path)])
    assert "[lcm] resuming at step 2/4" in capsys.readouterr().out
    a, b = (load_checkpoint(d / "lcm.pt") for d in (tmp_path, straight_run[0]))
    assert a["record"]["losses"] == b["record"]["losses"]
    assert any(k.startswith("target.") for k in a["model"])  # the target network is in the checkpoint
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    with pytest.raises(SystemExit, match="other settings"):
        train_script.main([*SMOKE, "--workdir", str(tmp_path), "--w-max", "8"])


def test_smoke_run_exports_the_target_network_as_a_full_original_layout_model(straight_run):
    workdir, card = straight_run
    out = workdir / "ldm-toy-lcm.safetensors"
    shapes, _ = read_safetensors_header(out)
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in shapes
    assert any(k.startswith("first_stage_model.") for k in shapes) and any("transformer" in k for k in shapes)
    loaded = load_model(out)
    teacher = load_model(card["teacher"])
    assert loaded.config.unet.time_cond_proj_dim == 64 and card["weights"] == "target"
    student, target = split_pair_state(load_checkpoint(workdir / "lcm.pt")["model"])
    unet = loaded.unet.state_dict()
    for key, value in target.items():  # written in float16, as the toy model is shipped
        assert torch.equal(unet[key], value.half().float()), key
    # Trained: the guidance embedding has left zero, and the target trails the student.
    assert target["time_embedding.cond_proj.weight"].abs().max() > 0
    assert any(not torch.equal(student[k], target[k]) for k in student)
    for part in ("vae", "text_encoder"):  # the teacher's, unchanged
        mine, theirs = getattr(loaded, part).state_dict(), getattr(teacher, part).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), part
    assert json.loads((workdir / "card.json").read_text())["guidance_range"] == [2.0, 5.0]


def test_eval_smoke_run_reports_every_step_count(straight_run, tmp_path):
    evaluate = load_script("eval_lcm")
    model = straight_run[0] / "ldm-toy-lcm.safetensors"
    assert evaluate.main(["--smoke", "--lcm", str(model), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval_lcm.json").read_text())
    expected = [("teacher", "dpmpp_2m", 2), *((m, "lcm", n) for m in ("lcm", "teacher") for n in (1, 2, 4))]
    assert [(r["model"], r["sampler"], r["steps"]) for r in report["rows"]] == expected
    for row in report["rows"]:
        assert row["seconds_per_picture"] > 0 and {"kind", "color", "background"} <= set(row["attributes"])
    assert report["verdict"]["run"] and set(report["verdict"]["gaps"]) == {"kind", "color", "background"}
    assert (tmp_path / "lcm.png").is_file() and "| LCM, 4 steps |" in (tmp_path / "eval_lcm.md").read_text()


# --- refused inputs --------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(w_min=-1.0), "0 <= w_min <= w_max"), (dict(w_min=8.0, w_max=3.0), "0 <= w_min <= w_max"),
    (dict(w_max=float("nan")), "finite"), (dict(num_ddim_timesteps=0), "integer >= 1"),
    (dict(num_ddim_timesteps=2.5), "integer"), (dict(cond_dim=1), "integer >= 2"),
    (dict(ema_decay=1.0), r"\[0, 1\)"), (dict(loss="l1"), "valid: l2, huber"), (dict(huber_c=0.0), "> 0"),
    (dict(timestep_scaling=-10.0), "> 0"), (dict(w_min=True), "finite number"),
])
def test_settings_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        LCDSettings(**bad)


def test_solver_refuses_a_count_that_does_not_divide_the_schedule():
    with pytest.raises(ValueError, match="must divide the model's 1000"):
        DDIMSolver(torch.linspace(0.99, 0.01, 1000), 30)
    with pytest.raises(ValueError, match="must divide"):
        DDIMSolver(torch.linspace(0.99, 0.01, 1000), 2000)


def test_student_and_task_refuse_what_they_cannot_distil(sd1_folder, tmp_path):
    loaded = load_model(sd1_folder)
    student = student_from_teacher(loaded.unet, COND_DIM)
    with pytest.raises(ValueError, match="guidance-distilled already"):
        student_from_teacher(student, COND_DIM)
    with pytest.raises(TypeError, match="ldm UNet"):
        student_from_teacher(torch.nn.Linear(2, 2), COND_DIM)
    with pytest.raises(ValueError, match="16 wide, the settings say 64"):
        LCDTask(loaded.unet, loaded.text_encoder, ConsistencyPair(student), NoiseSchedule(loaded.config),
                loaded.tokenizer([""])[0], LCDSettings(cond_dim=64))
    with pytest.raises(ValueError, match="not a consistency pair's key"):
        split_pair_state({"unet.conv_in.weight": torch.zeros(1)})
    # The stage's own moving average would be a second one, beside the target network.
    run = RunSettings(workdir=tmp_path, seed=0, save_every=1, log_every=1)
    spec = StageSpec("lcm", steps=1, batch_size=1, lr=1e-4, warmup=0, weight_decay=0.0, ema_decay=0.9)
    with pytest.raises(ValueError, match="use_ema must be False"):
        distill_lcm(Accelerator(cpu=True), run, spec, loaded.config, loaded.unet, loaded.text_encoder, None,
                    loaded.tokenizer, stream=1)
    with pytest.raises(ValueError, match="teacher must be the U-Net of model"):
        distill_lcm(Accelerator(cpu=True), run, spec, loaded.config, student, loaded.text_encoder, None,
                    loaded.tokenizer, stream=1)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_script_refuses_bad_flags(train_script, tmp_path, capsys):
    for flags, message in ((["--w-min", "-2"], "w_min"), (["--loss", "l1"], "invalid choice"),
                           (["--steps", "0"], "--steps")):
        with pytest.raises(SystemExit) as exc:
            train_script.parse_args(["--smoke", *flags])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    # The solver's step count must divide the teacher's 1,000 timesteps: refused before any training.
    with pytest.raises(SystemExit, match="--num-ddim-timesteps: num_ddim_timesteps 30 must divide the model's 1000"):
        train_script.main(["--smoke", "--workdir", str(tmp_path), "--num-ddim-timesteps", "30"])
    assert not (tmp_path / "lcm.pt").exists()
