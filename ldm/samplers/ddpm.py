"""DDPM ancestral sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models")."""

from __future__ import annotations

from torch import Tensor

from .base import Callback, DenoiseFn
from .k_samplers import sample_euler_ancestral
from .noise import Generators


def sample_ddpm(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM (Ho et al. 2020, Algorithm 2, "fixed_small" variance), on strided timesteps.

    In VE scaling, sampling the posterior q(x_prev | x_t, x0) with its
    ``beta_tilde`` variance is exactly an ancestral Euler step: mean
    ``x0 + (s_prev^2 / s_t^2)(x_t - x0)`` (Euler to ``sigma_down = s_prev^2 / s_t``) and
    std ``sigma_up = s_prev * sqrt(s_t^2 - s_prev^2) / s_t``. So this is ancestral Euler
    on the DDPM schedule; noise is drawn per step per image as diffusers does.
    """
    return sample_euler_ancestral(denoiser, x, sigmas, generators=generators, callback=callback)
