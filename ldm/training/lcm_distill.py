"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models",
arXiv:2310.04378, Algorithm 1) of a U-Net, on ldm's training library.

The recipe of diffusers' ``examples/consistency_distillation/train_lcm_distill_sd_wds.py``:

- the student is a copy of the frozen teacher U-Net with a guidance embedding
  (``UNetConfig.time_cond_proj_dim``: the sinusoidal embedding of w,
  :func:`~ldm.models.layers.guidance_scale_embedding`, projected into the timestep
  embedding). Its ``time_embedding.cond_proj`` starts at zero, so the student starts
  equal to the teacher at every w (diffusers' script leaves that projection random);
- the target network is an exponential moving average of the student (decay 0.95,
  constant, parameters only, as the script's ``update_ema``), never trained by
  gradient; it lives beside the student in the module the stage trains
  (:class:`ConsistencyPair`), so it is in every checkpoint and a resumed run is bit
  for bit the run that was never interrupted. The stage loop's own moving average
  (``StageSpec.ema_decay``) cannot serve: it is a table of weights the loop keeps to
  itself, not a network the loss can run, and its decay warms up (``(1 + n) / (10 + n)``)
  where the script's is constant; the loop updates the target through its
  ``after_step`` hook, after each optimiser step;
- each sample draws a start ``t_{n+k}`` from the DDIM solver's ``num_ddim_timesteps``
  timesteps (``k = T / num_ddim_timesteps``), unit noise and ``w ~ U[w_min, w_max]``
  (LCM's ``w``: guidance scale ``1 + w``). The teacher, with classifier-free guidance
  ``cond + w (cond - uncond)`` (uncond: the empty caption), makes one DDIM step from
  ``t_{n+k}`` to ``t_n``; the target network's prediction there is what the student's
  prediction at ``t_{n+k}`` is pulled to. Both predictions pass through the consistency
  boundary condition ``c_skip(t) x_t + c_out(t) x0(t)`` (``sigma_data`` 0.5, timesteps
  scaled by 10, as ``LCMScheduler``); the loss is l2 or pseudo-Huber.

With ``num_ddim_timesteps`` 50 on a 1,000-step model, the solver's timesteps are the
``lcm`` sampler's origin schedule (:mod:`ldm.samplers.lcm`): the timesteps the student
is trained at are the ones it is sampled at.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from ..config import ModelConfig
from ..models.layers import guidance_scale_embedding
from ..models.tokenizer import Tokenizer
from ..models.unet import UNet
from ..samplers.lcm import SIGMA_DATA, boundary_scalings
from .datasets import LatentPairs, LatentSet
from .loop import RunSettings, train_stage
from .losses import NoiseSchedule
from .stage import StageResult, StageSpec, plain

LOSSES = ("l2", "huber")
COND_PROJ = "time_embedding.cond_proj.weight"  # the student's only weight the teacher lacks
STUDENT, TARGET = "student.", "target."  # key prefixes of ConsistencyPair's state


@dataclass(frozen=True)
class LCDSettings:
    """The distillation's own settings (diffusers' script's flags of the same names).

    ``w_min``/``w_max``: the range of LCM's ``w`` (guidance scale ``1 + w``; the script's
    5 to 15 is guidance 6 to 16). ``cond_dim``: the student's ``time_cond_proj_dim``
    (256 in LCM's SD models). ``ema_decay``: the target network's. ``loss``: ``l2`` or
    ``huber`` (``sqrt(d^2 + c^2) - c``, ``c = huber_c``)."""

    w_min: float = 1.0
    w_max: float = 11.0
    num_ddim_timesteps: int = 50
    cond_dim: int = 64
    ema_decay: float = 0.95
    loss: str = "l2"
    huber_c: float = 0.001
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        for name in ("w_min", "w_max", "ema_decay", "huber_c", "timestep_scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LCDSettings.{name} must be a finite number, got {value!r}")
        if not 0 <= self.w_min <= self.w_max:
            raise ValueError(f"LCDSettings: need 0 <= w_min <= w_max (w = guidance scale - 1), "
                             f"got w_min {self.w_min}, w_max {self.w_max}")
        for name, low in (("num_ddim_timesteps", 1), ("cond_dim", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LCDSettings.{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"LCDSettings.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.loss not in LOSSES:
            raise ValueError(f"LCDSettings.loss {self.loss!r} is not valid; valid: {', '.join(LOSSES)}")
        if not self.huber_c > 0 or not self.timestep_scaling > 0:
            raise ValueError(f"LCDSettings: huber_c and timestep_scaling must be > 0, got {self.huber_c}, "
                             f"{self.timestep_scaling}")


class DDIMSolver:
    """The script's ``DDIMSolver``: ``num_ddim_timesteps`` timesteps ``k - 1, 2k - 1, ..., T - 1``
    (``k = T / num_ddim_timesteps``) and the deterministic DDIM step (Song et al. 2021, eq. 12
    with eta 0) from solver timestep ``index`` to the one before it (timestep 0's level
    for the first)."""

    def __init__(self, alphas_cumprod: Tensor, num_ddim_timesteps: int) -> None:
        self.stride = solver_stride(len(alphas_cumprod), num_ddim_timesteps)
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.stride - 1
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[self.timesteps[:-1]]]).float()

    def step(self, x0: Tensor, eps: Tensor, index: Tensor) -> Tensor:
        a_prev = _rows(self.alphas_cumprod_prev.to(x0.device)[index], x0)
        return a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps


def solver_stride(num_train_timesteps: int, num_ddim_timesteps: int) -> int:
    """The solver's step ``k``: ``num_ddim_timesteps`` must divide the model's training
    timesteps, so that its steps are evenly spaced (diffusers' script floors the ratio)."""
    if num_ddim_timesteps < 1 or num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"num_ddim_timesteps {num_ddim_timesteps} must divide the model's {num_train_timesteps} "
                         "training timesteps (the solver's steps are evenly spaced)")
    return num_train_timesteps // num_ddim_timesteps


def _rows(values: Tensor, like: Tensor) -> Tensor:
    """Per-row values ``[B]`` shaped to broadcast over ``like`` ``[B, ...]``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def x0_and_eps(output: Tensor, t: Tensor, sample: Tensor, prediction_type: str,
               alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """The clean latent and the noise a model's ``output`` (eps or v) at timesteps ``t``
    implies for ``sample`` (the script's ``get_predicted_original_sample`` /
    ``get_predicted_noise``)."""
    a = _rows(alphas_cumprod.to(sample.device)[t].float(), sample)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * output) / alpha, output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * output, alpha * output + sigma * sample
    raise ValueError(f"unknown prediction type {prediction_type!r}; valid: epsilon, v_prediction")


def student_from_teacher(teacher: UNet, cond_dim: int) -> UNet:
    """A copy of ``teacher`` with a guidance embedding of width ``cond_dim`` whose
    projection is zero: equal to the teacher at every guidance scale."""
    if not isinstance(teacher, UNet):
        raise TypeError(f"teacher must be an ldm UNet, got {type(teacher).__name__}")
    c = teacher.config
    if c.time_cond_proj_dim is not None:
        raise ValueError(f"the teacher is guidance-distilled already (time_cond_proj_dim {c.time_cond_proj_dim}); "
                         "distil a U-Net that runs with classifier-free guidance")
    if c.addition_embed_type is not None or c.in_channels != c.out_channels:
        raise ValueError("latent consistency distillation takes a text-to-image U-Net of the SD 1.x/2.x kind; this "
                         f"one has addition_embed_type {c.addition_embed_type!r}, {c.in_channels} input channels")
    student = UNet(dataclasses.replace(c, time_cond_proj_dim=cond_dim))
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    extra = set(student.state_dict()) - set(state)
    if extra != {COND_PROJ}:  # a module the recipe does not know how to start: refuse rather than guess
        raise ValueError(f"student keys the teacher lacks: {sorted(extra)[:5]}, expected only {COND_PROJ}")
    state[COND_PROJ] = torch.zeros_like(student.state_dict()[COND_PROJ])
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).device)


class ConsistencyPair(nn.Module):
    """What the stage trains: the ``student`` (online network) and its ``target``, the
    student's moving average (no gradient), which starts as the student's copy."""

    def __init__(self, student: UNet) -> None:
        super().__init__()
        self.student = student
        self.target = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """``target = decay * target + (1 - decay) * student``, parameter by parameter."""
        for target, online in zip(self.target.parameters(), self.student.parameters()):
            target.mul_(decay).add_(online, alpha=1 - decay)


def split_pair_state(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(student, target)`` U-Net states from a :class:`ConsistencyPair`'s state."""
    parts: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
    for key, value in state.items():
        if not key.startswith((STUDENT, TARGET)):
            raise ValueError(f"not a consistency pair's key: {key!r} (expected {STUDENT}* or {TARGET}*)")
        part, name = key.split(".", 1)
        parts[part == "target"][name] = value
    if set(parts[0]) != set(parts[1]):
        raise ValueError("the student and the target hold different keys")
    return parts


class LCDTask(nn.Module):
    """The frozen teacher and text encoder with the trained :class:`ConsistencyPair`;
    ``forward(batch, generator)`` returns the consistency distillation loss (the
    contract of :func:`~ldm.training.loop.train_stage`). ``batch``: scaled ``latents``
    and caption ``ids``; ``uncond_ids``: the empty caption's ids (the teacher's
    unconditional branch)."""

    def __init__(self, teacher: UNet, text_encoder: nn.Module, pair: ConsistencyPair, schedule: NoiseSchedule,
                 uncond_ids: Tensor, settings: LCDSettings) -> None:
        super().__init__()
        if pair.student.config.time_cond_proj_dim != settings.cond_dim:
            raise ValueError(f"the student's guidance embedding is {pair.student.config.time_cond_proj_dim} wide, "
                             f"the settings say {settings.cond_dim}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.pair, self.schedule, self.settings = pair, schedule, settings
        self.solver = DDIMSolver(schedule.alphas_cumprod, settings.num_ddim_timesteps)
        self.register_buffer("uncond_ids", uncond_ids.reshape(1, -1), persistent=False)

    def train(self, mode: bool = True) -> "LCDTask":
        super().train(mode)
        for frozen in (self.teacher, self.text_encoder):  # inference mode whatever the task's
            frozen.eval()
        return self

    def draw(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """A batch's ``(solver index, unit noise, w)``, drawn on the CPU in the script's order."""
        s = self.settings
        index = torch.randint(0, s.num_ddim_timesteps, (shape[0],), generator=generator)
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
        w = (s.w_max - s.w_min) * torch.rand((shape[0],), generator=generator) + s.w_min
        return index, noise, w

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> tuple[Tensor, dict]:
        latents, ids = batch["latents"].float(), batch["ids"]
        with torch.no_grad():  # the captions and the empty one in one call
            both = self.text_encoder(torch.cat([ids, self.uncond_ids.to(ids.dtype)]))
        context, uncond = both[:-1], both[-1:].expand_as(both[:-1])
        index, noise, w = (v.to(latents.device) for v in self.draw(latents.shape, generator))
        return self.loss(latents, context, uncond, index, noise, w)

    def loss(self, latents: Tensor, context: Tensor, uncond: Tensor, index: Tensor, noise: Tensor,
             w: Tensor) -> tuple[Tensor, dict]:
        """The loss of one draw (see the module doc and :meth:`draw`)."""
        s, kind, table = self.settings, self.schedule.prediction_type, self.schedule.alphas_cumprod
        start = self.solver.timesteps.to(latents.device)[index]  # t_{n+k}
        end = (start - self.solver.stride).clamp(min=0)  # t_n
        noisy = self.schedule.add_noise(latents, noise, start)
        w_embedding = guidance_scale_embedding(w, s.cond_dim)
        c_skip_start, c_out_start = (_rows(c, latents) for c in boundary_scalings(start, s.timestep_scaling))
        c_skip_end, c_out_end = (_rows(c, latents) for c in boundary_scalings(end, s.timestep_scaling))

        output = self.pair.student(noisy, start, context, timestep_cond=w_embedding)
        prediction = c_skip_start * noisy + c_out_start * x0_and_eps(output, start, noisy, kind, table)[0]
        with torch.no_grad():
            # The teacher's guided DDIM step t_{n+k} -> t_n (LCM's CFG form, on x0 and eps).
            out = self.teacher(torch.cat([noisy, noisy]), torch.cat([start, start]), torch.cat([context, uncond]))
            (x0_c, eps_c), (x0_u, eps_u) = (x0_and_eps(o, start, noisy, kind, table) for o in out.chunk(2))
            g = _rows(w, latents)
            previous = self.solver.step(x0_c + g * (x0_c - x0_u), eps_c + g * (eps_c - eps_u), index)
            output = self.pair.target(previous, end, context, timestep_cond=w_embedding)
            target = c_skip_end * previous + c_out_end * x0_and_eps(output, end, previous, kind, table)[0]
        diff = prediction.float() - target.float()
        if s.loss == "l2":
            loss = diff.pow(2).mean()
        else:
            loss = (diff.pow(2) + s.huber_c**2).sqrt().sub(s.huber_c).mean()
        return loss, {}


def lcd_fingerprint(model: ModelConfig, settings: LCDSettings) -> dict[str, Any]:
    """What a distillation checkpoint must share with a run to be continued."""
    return {"lcd": plain(settings), "sigma_data": SIGMA_DATA, "scaling_factor": model.vae.scaling_factor,
            "prediction": model.prediction_type, "unet": plain(model.unet),
            "schedule": [model.num_train_timesteps, model.beta_start, model.beta_end, model.beta_schedule]}


def distill_lcm(acc: Accelerator, run: RunSettings, spec: StageSpec, model: ModelConfig, teacher: UNet,
                text_encoder: nn.Module, latents: LatentSet, tokenizer: Tokenizer, *, stream: int,
                settings: LCDSettings = LCDSettings(), inputs: dict[str, Any] | None = None
                ) -> tuple[StageResult, ConsistencyPair]:
    """Distil ``teacher`` (the U-Net of ``model``) into a consistency model on ``latents``
    and their captions (none replaced by the empty one, as the script), resuming from /
    checkpointing to ``run.checkpoint_path(spec.name)``. ``inputs``: what the teacher
    and the data are (their change restarts the stage).

    Returns the stage's result, whose state is the pair's (``student.*`` and
    ``target.*``; :func:`split_pair_state`), and the pair itself. ``spec.use_ema`` must
    be False: the moving average here is the target network, updated at
    ``settings.ema_decay`` after every step."""
    if not isinstance(settings, LCDSettings):
        raise TypeError(f"settings must be LCDSettings, got {type(settings).__name__}")
    if not isinstance(model, ModelConfig) or teacher.config != model.unet:
        raise ValueError("teacher must be the U-Net of model (a ModelConfig)")
    if spec.use_ema:
        raise ValueError("StageSpec.use_ema must be False for consistency distillation: its moving average is the "
                         "target network (LCDSettings.ema_decay), kept in the checkpoint beside the student")
    pair = ConsistencyPair(student_from_teacher(teacher, settings.cond_dim))
    task = LCDTask(teacher, text_encoder, pair, NoiseSchedule(model), tokenizer([""])[0], settings)
    result = train_stage(
        acc, run, spec, task, pair,
        lambda first, count: LatentPairs(latents, run.seed, stream, first, count, 0.0, tokenizer),
        stream=stream, fingerprint=lcd_fingerprint(model, settings), inputs=inputs or {},
        after_step=lambda: pair.update_target(settings.ema_decay))
    return result, pair
