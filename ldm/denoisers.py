"""Denoisers in the k-diffusion convention: ``denoiser(x, sigma, cond) -> x0``.

Samplers work on ``x = x0 + sigma * eps`` (the variance-exploding, "VE", scaling of
Karras et al. 2022). A latent diffusion U-Net was trained on the variance-preserving
("VP") ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` at an integer timestep ``t``; the
two are related by ``sigma = sqrt((1 - a_t) / a_t)`` and ``x_t = x / sqrt(sigma^2 + 1)``.
:class:`DiscreteSchedule` holds that training schedule, :class:`Denoiser` turns the
U-Net's epsilon or v output into an ``x0`` prediction, and :class:`CFGDenoiser`
adds classifier-free guidance.

Numbers follow diffusers' schedulers (float32 betas and cumulative products, the
same interpolation) so that samplers built on these match it to float rounding.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .conditioning import Conditioning, ScheduledConditioning
from .config import PREDICTION_TYPES, ModelConfig, check_timestep_spacing
from .validation import check_guidance_end

# The U-Net: model(sample, timestep, conditioning) -> epsilon or v.
Model = Callable[[Tensor, Tensor, Any], Tensor]

BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear")


class DiscreteSchedule:
    """The noise schedule a model was trained with: ``num_train_timesteps`` levels.

    ``alphas_cumprod[t]`` is the VP signal level of timestep ``t``; ``sigmas[t]`` is the
    matching VE noise level. Both are float32, computed exactly as diffusers does.

    ``timestep_spacing``: the spacing of sampling timesteps the model's scheduler config
    sets (``ModelConfig.timestep_spacing``), used by samplers unless a call overrides
    it; None leaves each sampler its own default.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        timestep_spacing: str | None = None,
    ) -> None:
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        check_timestep_spacing(timestep_spacing)
        n = num_train_timesteps
        if beta_schedule == "scaled_linear":
            # LDM's schedule: linear in sqrt(beta).
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        else:
            raise ValueError(
                f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}"
            )
        self.num_train_timesteps = n
        self.timestep_spacing = timestep_spacing
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        # diffusers takes the log of the float32 table in float32; keep that rounding.
        self.log_sigmas = self.sigmas.double().log().float()

    @classmethod
    def from_config(cls, config: ModelConfig) -> "DiscreteSchedule":
        return cls(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            timestep_spacing=config.timestep_spacing,
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for a noise level: linear interpolation in log sigma.

        Same rule as k-diffusion's ``DiscreteSchedule.sigma_to_t`` and diffusers'
        ``_sigma_to_t``; computed in float64, returned as float64 for float64 input and
        float32 otherwise. Levels outside the table clamp to its ends.
        """
        sigma = torch.as_tensor(sigma)
        out_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        log_sigmas = self.log_sigmas.double().to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-10).log()
        # Index of the last table level at or below sigma (the table is increasing).
        low = (log_sigma.unsqueeze(-1) >= log_sigmas).sum(-1) - 1
        low = low.clamp(0, self.num_train_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).to(out_dtype)


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """Broadcast a scalar or per-batch-row value against ``x`` of shape (B, C, ...)."""
    value = value.to(device=x.device, dtype=x.dtype)
    if value.ndim == 0:
        return value
    return value.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser:
    """Wraps an epsilon- or v-predicting model as ``denoiser(x, sigma, cond) -> x0``.

    ``x`` is in VE scaling; the model sees ``x / sqrt(sigma^2 + 1)`` at timestep
    ``schedule.sigma_to_t(sigma)`` (or the ``t`` given, which lets a sampling schedule
    feed the exact timesteps diffusers does). ``sigma`` is a 0-d tensor or one value
    per batch row.

    ``dtype``, if given, is the dtype the model runs in: inputs are cast to it and the
    output back to ``x.dtype``, so samplers can keep float32 latents around a
    half-precision U-Net.

    Parameterisations (Salimans & Ho 2022 for v; Karras et al. 2022, Table 1):
    ``eps``: x0 = x - sigma * eps; ``v``: x0 = c_skip * x + c_out * v with
    c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).
    """

    def __init__(
        self,
        model: Model,
        schedule: DiscreteSchedule,
        prediction_type: str = "epsilon",
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        self.model = model
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.dtype = dtype

    def __call__(
        self, x: Tensor, sigma: Tensor, cond: Any = None, *, t: Tensor | None = None
    ) -> Tensor:
        sigma = torch.as_tensor(sigma)
        if t is None:
            t = self.schedule.sigma_to_t(sigma)
        s = _per_sample(sigma, x)
        # Same expressions as diffusers' scale_model_input / step, for equal rounding.
        x_in = x / ((s**2 + 1) ** 0.5)
        model_dtype = self.dtype or x.dtype
        out = self.model(x_in.to(model_dtype), torch.as_tensor(t).to(x.device), cond).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        return out * (-s / (s**2 + 1) ** 0.5) + (x / (s**2 + 1))


def _guidance_embedded(cond: Conditioning | ScheduledConditioning) -> bool:
    first = cond.segments[0] if isinstance(cond, ScheduledConditioning) else cond
    return first.timestep_cond is not None


def step_index(sigmas: Tensor, sigma: Tensor) -> int:
    """The sampling step (0-based) whose level range holds ``sigma``.

    ``sigmas`` are the decreasing levels of the steps that run (``steps + 1`` of them);
    step ``i`` covers ``sigmas[i + 1] < sigma <= sigmas[i]``, a level above the first
    is step 0 and one at or below the last is the last step. A pure function of the
    level, so every evaluation at a level gets the same step whatever the sampler or
    the call order: a midpoint evaluation inside a step belongs to that step, while
    Heun's corrector, evaluated exactly at the next level, belongs to the next step.
    ``sigma`` is 0-d or one equal value per batch row.
    """
    sigma = torch.as_tensor(sigma).detach().flatten().double().cpu()
    if sigma.numel() == 0 or not bool((sigma == sigma[0]).all()):
        raise ValueError(f"a step needs one noise level for the whole batch, got {sigma.tolist()}")
    inner = sigmas.detach().double().cpu()[1:-1]
    return int((inner >= sigma[0]).sum())


def guided_steps(guidance_end: float, sigmas: Tensor | None) -> int | None:
    """How many of the steps that run (``len(sigmas) - 1``) are guided under
    ``guidance_end`` (a fraction in (0, 1], see :func:`~ldm.validation.check_guidance_end`);
    None: all of them (``guidance_end`` 1)."""
    if check_guidance_end(guidance_end) == 1:
        return None
    if sigmas is None:
        raise ValueError("guidance_end < 1 needs sigmas, the levels of the steps that run, to count the steps")
    steps = len(sigmas) - 1
    check_guidance_end(guidance_end, steps=steps)
    return int(steps * guidance_end)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``denoiser(x, sigma) -> x0``.

    With ``scale > 1`` the unconditional and conditional passes run as one batch,
    ``[uncond, cond]`` as diffusers orders them (every field of the
    :class:`~ldm.conditioning.Conditioning` stacked the same way), and the result is
    ``uncond + scale * (cond - uncond)``. Guiding x0 equals guiding epsilon or v,
    since x0 is affine in the model output with the same coefficients for both
    halves. With ``scale <= 1`` only the conditional pass runs (diffusers skips
    guidance then too).

    ``cond`` / ``uncond`` may be a :class:`~ldm.conditioning.ScheduledConditioning`
    (prompt editing): each evaluation then uses the segment of the step its level
    falls in (:func:`step_index` over ``sigmas``, the levels of the steps that run),
    so the samplers stay unchanged and hold no step counter.

    A guidance-distilled U-Net (LCM) takes its guidance scale as an input, carried in
    ``cond.timestep_cond`` (:func:`~ldm.conditioning.with_guidance_embedding`); it runs
    with ``scale <= 1`` (one pass), and guiding it again is refused, as diffusers never does.

    ``guidance_end`` < 1 stops guiding after that fraction of the steps that run: from
    step ``int(steps * guidance_end)`` on only the conditional pass runs (half the U-Net
    work of those steps). diffusers documents this as "dynamic classifier-free guidance"
    (a step callback that drops guidance after 40% of the steps); the late steps shape
    fine detail, where guidance matters least. It needs ``sigmas``.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Conditioning | ScheduledConditioning,
        uncond: Conditioning | ScheduledConditioning | None,
        scale: float,
        *,
        sigmas: Tensor | None = None,
        guidance_end: float = 1.0,
    ) -> None:
        kinds = (Conditioning, ScheduledConditioning)
        for name, value in (("cond", cond), ("uncond", uncond)):
            if value is not None and not isinstance(value, kinds):
                raise TypeError(f"{name} must be a Conditioning or ScheduledConditioning, got {type(value).__name__}")
        if scale > 1 and uncond is None:
            raise ValueError(f"guidance scale {scale} > 1 needs an unconditional embedding")
        if scale > 1 and _guidance_embedded(cond):
            raise ValueError(f"guidance scale {scale} > 1 on a guidance-distilled conditioning (it carries the "
                             "U-Net's guidance embedding, timestep_cond): the scale is already in the embedding; "
                             "use scale 1 (one pass, no classifier-free guidance)")
        scheduled = any(isinstance(v, ScheduledConditioning) for v in (cond, uncond))
        if scheduled and (sigmas is None or torch.as_tensor(sigmas).ndim != 1 or len(sigmas) < 2):
            raise ValueError(
                "a scheduled conditioning needs sigmas, the 1-d levels of the steps that run, "
                f"to find each step; got {None if sigmas is None else tuple(torch.as_tensor(sigmas).shape)}"
            )
        self.denoiser = denoiser
        self.cond = cond
        self.uncond = uncond
        self.scale = scale
        self.sigmas = sigmas
        self.guided_steps = guided_steps(guidance_end, sigmas) if scale > 1 else None
        # Built once: the guided batch's conditioning (for each segment of a schedule).
        self._both = None
        if scale > 1:
            self._both = (ScheduledConditioning.cat if scheduled else Conditioning.cat)([uncond, cond])

    @property
    def prediction_type(self) -> str:
        return self.denoiser.prediction_type

    def _at(self, cond: Conditioning | ScheduledConditioning | None, sigma: Tensor) -> Conditioning | None:
        if not isinstance(cond, ScheduledConditioning):
            return cond
        return cond.at(step_index(self.sigmas, sigma))

    def __call__(self, x: Tensor, sigma: Tensor, *, t: Tensor | None = None) -> Tensor:
        if self._both is None or (self.guided_steps is not None
                                  and step_index(self.sigmas, sigma) >= self.guided_steps):
            return self.denoiser(x, sigma, self._at(self.cond, sigma), t=t)
        both = self._at(self._both, sigma)
        sigma = torch.as_tensor(sigma)
        if sigma.ndim:
            sigma = torch.cat([sigma, sigma])
        if t is not None and torch.as_tensor(t).ndim:
            t = torch.cat([t, t])
        x0 = self.denoiser(torch.cat([x, x]), sigma, both, t=t)
        uncond, cond = x0.chunk(2)
        return uncond + self.scale * (cond - uncond)
