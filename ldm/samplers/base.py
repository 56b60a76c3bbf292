"""Pieces shared by the sampler functions.

Every sampler is ``sample_<name>(denoiser, x, sigmas, *, generators=None,
callback=None) -> x`` with ``denoiser(x, sigma) -> x0`` (conditioning already
bound), ``x`` in VE scaling (``x = x0 + sigma * eps``) and ``sigmas`` the levels to
visit, ``sigmas[-1]`` where sampling stops (0, or a small level for DDIM/PLMS).
``sigmas`` stay on the CPU as float32; their 0-d elements broadcast with ``x`` on
any device, as in diffusers' schedulers.

``callback(step, total, x, denoised)``, if given, runs after each of the ``total``
steps with the 0-based step index, the new ``x`` (VE scaling) and the ``x0``
prediction made during that step. It may return a tensor that replaces ``x`` before
the next step (how inpainting puts the known region back after every step, as
diffusers' inpainting pipeline does between scheduler steps); ``None`` keeps ``x``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from .noise import Generators, randn_like

Callback = Callable[[int, int, Tensor, Tensor], Tensor | None]


class DenoiseFn(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor: ...


class SamplerFn(Protocol):
    def __call__(
        self,
        denoiser: DenoiseFn,
        x: Tensor,
        sigmas: Tensor,
        *,
        generators: Generators = None,
        callback: Callback | None = None,
    ) -> Tensor: ...


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE, (x - x0) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def euler_step(x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor) -> Tensor:
    """One Euler step of the ODE from sigma to sigma_next (Karras et al. 2022, Alg. 1)."""
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma)


def ancestral_split(sigma_from: Tensor, sigma_to: Tensor) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise of
    std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` (k-diffusion's
    ``get_ancestral_step``, eta = 1). ``sigma_up`` is the DDPM posterior std
    (Ho et al. 2020, eq. 7) written in VE scaling.
    """
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def ancestral_step(
    x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor, generators: Generators
) -> Tensor:
    """Euler down to ``sigma_down``, then add ``sigma_up`` noise; noise is drawn on every
    step, even the last (where ``sigma_up`` is 0), so generators advance as in diffusers."""
    sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
    x = euler_step(x, sigma, sigma_down, denoised)
    return x + randn_like(x, generators) * sigma_up


def report(callback: Callback | None, step: int, total: int, x: Tensor, denoised: Tensor) -> Tensor:
    """Run the callback; its tensor, if it returns one, is the ``x`` the next step starts from."""
    if callback is None:
        return x
    replaced = callback(step, total, x, denoised)
    return x if replaced is None else replaced


def num_steps(sigmas: Tensor) -> int:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be 1-d with at least 2 levels, got shape {tuple(sigmas.shape)}"
        )
    return len(sigmas) - 1


def is_zero(sigma: Tensor) -> bool:
    return bool(torch.as_tensor(sigma) == 0)
