"""Samplers on the probability-flow ODE / reverse SDE in sigma (Karras et al. 2022).

All follow k-diffusion (Crowson) and match diffusers' Euler, EulerAncestral, Heun and
LMS DiscreteSchedulers step for step.
"""

from __future__ import annotations

from torch import Tensor

from .base import Callback, DenoiseFn, ancestral_step, euler_step, is_zero, num_steps, report, to_d
from .noise import Generators

LMS_ORDER = 4


def sample_euler(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler's method (Karras et al. 2022, Algorithm 2 with S_churn = 0). Deterministic."""
    total = num_steps(sigmas)
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        x = euler_step(x, sigmas[i], sigmas[i + 1], denoised)
        x = report(callback, i, total, x, denoised)
    return x


def sample_euler_ancestral(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``, eta = 1): each step goes
    down the ODE to ``sigma_down`` and adds fresh noise back up to the next level."""
    total = num_steps(sigmas)
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        x = ancestral_step(x, sigmas[i], sigmas[i + 1], denoised, generators)
        x = report(callback, i, total, x, denoised)
    return x


def sample_heun(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1): an Euler predictor, then
    the trapezoidal corrector; the last step to sigma = 0 stays Euler (no slope there)."""
    total = num_steps(sigmas)
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if is_zero(sigma_next):
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        x = report(callback, i, total, x, denoised)
    return x


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Weight of the slope ``j`` steps back in the linear multistep step ``i``.

    The integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial that is
    1 at sigmas[i - j] and 0 at the other ``order - 1`` nodes. diffusers integrates it
    numerically (scipy ``quad``); it is a polynomial, so integrate it exactly.
    """
    poly = [1.0]  # coefficients, constant term first
    for k in range(order):
        if k == j:
            continue
        node = sigmas[i - k]
        scale = 1.0 / (sigmas[i - j] - node)
        # poly *= (tau - node) * scale
        padded = poly + [0.0]
        poly = [
            ((padded[n - 1] if n else 0.0) - node * padded[n]) * scale
            for n in range(len(padded))
        ]
    a, b = sigmas[i], sigmas[i + 1]
    return sum(c * (b ** (n + 1) - a ** (n + 1)) / (n + 1) for n, c in enumerate(poly))


def sample_lms(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma, order up to 4; k-diffusion's
    ``sample_lms``): extrapolates the slopes of the last steps with Lagrange weights."""
    total = num_steps(sigmas)
    levels = sigmas.double().tolist()
    slopes: list[Tensor] = []
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        slopes.append(to_d(x, sigmas[i], denoised))
        if len(slopes) > LMS_ORDER:
            slopes.pop(0)
        order = min(i + 1, LMS_ORDER)
        coeffs = [lms_coefficient(levels, i, order, j) for j in range(order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
        x = report(callback, i, total, x, denoised)
    return x


__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_lms", "lms_coefficient"]
