"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models", Algorithm 2 and its SDE variant).

Written in VE scaling with lambda = -log(sigma), the half log-SNR; the updates are
diffusers' ``DPMSolverMultistepScheduler`` (solver_order=2, solver_type="midpoint",
final step first order as with ``final_sigmas_type="zero"``) divided through by
alpha_t, i.e. k-diffusion's ``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde`` with
Gaussian noise drawn per step as diffusers does.
"""

from __future__ import annotations

import math

from torch import Tensor

from .base import Callback, DenoiseFn, is_zero, num_steps, report
from .noise import Generators, randn_like


def _second_order_x0(
    denoised: Tensor, old: Tensor | None, h: float, h_last: float | None
) -> Tensor:
    """Multistep data prediction: D0 + (1 / 2r) (D0 - D_prev), r = h_last / h
    (DPM-Solver++(2M), midpoint form); first order when there is no previous step."""
    if old is None or h_last is None:
        return denoised
    r = h_last / h
    return denoised + (denoised - old) / (2 * r)


def _run(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators,
    callback: Callback | None,
    sde: bool,
) -> Tensor:
    total = num_steps(sigmas)
    levels = sigmas.double().tolist()
    old: Tensor | None = None
    h_last: float | None = None
    for i in range(total):
        denoised = denoiser(x, sigmas[i])
        # diffusers draws the SDE noise on every step, the last included.
        noise = randn_like(x, generators) if sde else None
        sigma, sigma_next = levels[i], levels[i + 1]
        if is_zero(sigmas[i + 1]):
            # lambda_next = inf: both updates reduce to the data prediction, and the
            # final step is first order in diffusers (lower_order_final).
            x = denoised
            h = None
        else:
            h = math.log(sigma / sigma_next)
            x0 = _second_order_x0(denoised, old, h, h_last)
            if sde:
                # Lu et al. (2022), eq. (18) with eta = 1, divided by alpha_t.
                x = (sigma_next / sigma * math.exp(-h)) * x + (-math.expm1(-2 * h)) * x0
                x = x + noise * (sigma_next * math.sqrt(-math.expm1(-2 * h)))
            else:
                x = (sigma_next / sigma) * x - math.expm1(-h) * x0
        old, h_last = denoised, h
        x = report(callback, i, total, x, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep on the data
    prediction; first order on the first and last steps. Deterministic."""
    return _run(denoiser, x, sigmas, generators, callback, sde=False)


def sample_dpmpp_2m_sde(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 4.3 / Appendix): the stochastic
    multistep solver, fresh Gaussian noise every step."""
    return _run(denoiser, x, sigmas, generators, callback, sde=True)
