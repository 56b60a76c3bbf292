"""Generation settings: the one table of defaults and the one set of checks.

``Pipeline.generate``, the ``ldm`` command line, batch files and PNG parameters read
by ``--from`` all validate through these functions, so a value is accepted or
refused the same way wherever it enters, and a batch can check every line before
anything renders. Torch is imported only by :func:`check_sampling`.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from .config import TIMESTEP_SPACINGS

# ldm sampler name -> AUTOMATIC1111's name (modules/sd_samplers_*.py); the samplers ldm has.
A1111_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "ddpm": "DDPM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "lcm": "LCM",
}
SCHEDULES: tuple[str, ...] = ("default", "karras")
SPACINGS: tuple[str, ...] = TIMESTEP_SPACINGS
SAMPLER_NAMES: tuple[str, ...] = tuple(A1111_SAMPLERS)
MAX_SEED = 2**32 - 1
# Web UIs cap the guidance slider at 30 (AUTOMATIC1111) or 100 (ComfyUI); above that the
# guided prediction is noise amplified, and near float32's range it overflows to inf.
MAX_GUIDANCE = 100.0
SIZE_FACTOR = 8  # the VAE's down-sampling in every SD model: sizes are multiples of it


@dataclass(frozen=True)
class GenerationDefaults:
    """Values used when a call, a flag or a batch line leaves a setting out."""

    steps: int = 25
    guidance_scale: float = 7.5
    sampler: str = "dpmpp_2m"
    schedule: str = "default"
    num_images: int = 1
    clip_skip: int = 1
    refiner_start: float = 0.8  # diffusers' and the web UI's usual switch for the SDXL refiner


DEFAULTS = GenerationDefaults()


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, not for bools (``True`` is not a step count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``; ValueError naming ``name`` otherwise."""
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{upper}, got {value!r}")
    return int(value)


def check_finite(value: Any, name: str) -> float:
    """A real, finite number (NaN and inf refused where they enter, not found as black images)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def check_guidance(value: Any, name: str = "guidance_scale") -> float:
    value = check_finite(value, name)
    if not 0 <= value <= MAX_GUIDANCE:
        raise ValueError(
            f"{name} must be between 0 and {MAX_GUIDANCE:g} (1 disables guidance), got {value!r}"
        )
    return value


def check_guidance_end(value: Any, guided: bool = True, steps: int | None = None,
                       name: str = "guidance_end") -> float:
    """``guidance_end``: the fraction of the ``steps`` that run which are guided; < 1 needs
    classifier-free guidance to drop (``guided``: a scale > 1 on a U-Net without a guidance
    embedding) and must leave a guided step (steps ``int(steps * end)`` on are not)."""
    value = check_finite(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be a fraction of the steps in (0, 1] (1: guide every step), got {value!r}")
    if value < 1 and not guided:
        raise ValueError(f"guidance_end {value:g} stops classifier-free guidance early, but this call runs none "
                         "(guidance scale <= 1, or a guidance-distilled model); leave guidance_end at 1")
    if value < 1 and steps is not None and int(steps * value) < 1:
        raise ValueError(f"guidance_end {value:g} of the {steps} steps that run leaves no guided step; "
                         "raise it or use more steps")
    return value


def check_distilled_negatives(time_cond_proj_dim: int | None, negatives: Sequence[str]) -> None:
    """A guidance-distilled U-Net (``time_cond_proj_dim`` set: LCM) takes the guidance scale
    as an input and runs one pass per step, with no unconditional pass for a negative prompt
    to steer; diffusers' ``LatentConsistencyModelPipeline`` drops one silently, ldm refuses it."""
    if time_cond_proj_dim is None:
        return
    given = sorted({n for n in negatives if n.strip()})
    if given:
        raise ValueError(
            f"negative prompt {given[0]!r:.60}: this model is guidance-distilled (LCM, guidance embedding "
            f"width {time_cond_proj_dim}): the guidance scale goes into its embedding and it runs without "
            "classifier-free guidance, so a negative prompt has nothing to act on; leave it out"
        )


def log_guidance_distilled(time_cond_proj_dim: int | None) -> None:
    """Say once, when a pipeline is made, how a guidance-distilled U-Net is guided."""
    if time_cond_proj_dim is not None:
        logging.getLogger("ldm").info(
            "U-Net is guidance-distilled (LCM; guidance embedding width %d): guidance_scale goes into the "
            "embedding as w = guidance_scale - 1, one U-Net pass per step, no classifier-free guidance and "
            "no negative prompt; sample with sampler lcm, 1-8 steps", time_cond_proj_dim)


def check_strength(value: Any, name: str = "strength") -> float:
    """Denoising strength of an edit, in (0, 1]: the fraction of the schedule that runs."""
    value = check_finite(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1] (1 repaints fully, small values keep more), got {value!r}")
    return value


def check_spacing(value: Any, name: str = "spacing") -> str | None:
    """A timestep spacing name, or None (the model's own)."""
    if value is not None and value not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {value!r} for {name}; valid: {', '.join(SPACINGS)}")
    return value


def check_merge_ratio(value: Any, name: str = "token_merging") -> float:
    """Token merging's ratio: the fraction of tokens merged, in [0, 1) (0: off)."""
    value = check_finite(value, name)
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be a fraction of the tokens in [0, 1) (0: off; the web UI's 0.5 is "
                         f"typical), got {value!r}")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A fraction strictly between 0 and 1 (such as the refiner's switch point)."""
    value = check_finite(value, name)
    if not 0 < value < 1:
        raise ValueError(f"{name} must be between 0 and 1 (a fraction of the schedule, such as 0.8), got {value!r}")
    return value


def check_margins(left: Any, top: Any, right: Any, bottom: Any) -> tuple[int, int, int, int]:
    """Outpainting margins in pixels: integers >= 0, not all zero."""
    margins = tuple(check_int(v, n, 0) for v, n in ((left, "left"), (top, "top"), (right, "right"),
                                                     (bottom, "bottom")))
    if not any(margins):
        raise ValueError("extend needs at least one margin > 0 (left, top, right, bottom), got all zero")
    return margins  # type: ignore[return-value]


def check_clip_skip(value: Any, layers: int | None = None, name: str = "clip_skip") -> int:
    """CLIP skip in AUTOMATIC1111's numbering: 1 conditions on the text encoder's last layer
    (no skip), 2 on the penultimate, ...; at most ``layers``, the encoder's layer count."""
    if not is_int(value) or value < 1 or (layers is not None and value > layers):
        upper = f" to {layers} (the text encoder's layers)" if layers is not None else " or more"
        raise ValueError(f"{name} must be an integer from 1 (the last layer, no skip){upper}, got {value!r}")
    return int(value)


def check_seed(value: Any, name: str = "seed") -> int:
    return check_int(value, name, 0, MAX_SEED)


def check_sampler(name: Any) -> str:
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLER_NAMES)}")
    return name


def check_schedule(schedule: Any) -> str:
    """``None`` is the sampler's own schedule (``"default"``)."""
    schedule = "default" if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    return schedule


def check_side(value: Any, name: str, example: int = 512) -> int:
    if not is_int(value) or value < SIZE_FACTOR or value % SIZE_FACTOR:
        raise ValueError(f"{name} must be a positive multiple of {SIZE_FACTOR} (e.g. {example}), got {value!r}")
    return int(value)


def check_sampling(sampler: Any, schedule: Any, steps: Any, num_train_timesteps: int = 1000,
                   spacing: Any = None, model_spacing: str | None = None) -> None:
    """Everything about sampler, schedule, step count and timestep spacing that can fail
    later, checked now: the combination is built exactly as sampling builds it (e.g.
    Karras sigmas only for the k-samplers, at most 999 DDIM steps over 1000 training
    steps, trailing spacing's step counts). ``spacing``: the call's timestep spacing (None:
    the model's, ``model_spacing``, else each sampler's own). A combination that passed is
    not built again (a batch of thousands of lines has a handful of them)."""
    check_sampler(sampler)
    karras = check_schedule(schedule) == "karras"
    check_spacing(spacing)
    _check_built(sampler, karras, check_int(steps, "steps", 1), num_train_timesteps, spacing, model_spacing)


@functools.lru_cache(maxsize=256)
def _check_built(sampler: str, karras: bool, steps: int, num_train_timesteps: int, spacing: str | None,
                 model_spacing: str | None) -> None:
    from .samplers import sampling_schedule

    sampling_schedule(sampler, _schedule(num_train_timesteps, model_spacing), steps, karras=karras, spacing=spacing)


@functools.lru_cache(maxsize=None)
def _schedule(num_train_timesteps: int, spacing: str | None = None) -> Any:
    from .denoisers import DiscreteSchedule

    return DiscreteSchedule(num_train_timesteps, timestep_spacing=spacing)
