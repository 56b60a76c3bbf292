"""PLMS: the pseudo linear multistep method of PNDM (Liu et al. 2022, "Pseudo Numerical
Methods for Diffusion Models on Manifolds"), as used for Stable Diffusion."""

from __future__ import annotations

from torch import Tensor

from .base import Callback, DenoiseFn, euler_step, num_steps, report
from .ddim import check_landing, reread
from .noise import Generators

# Adams-Bashforth weights, newest output first (PNDM eq. 12 and lower orders).
_AB_WEIGHTS: tuple[tuple[float, ...], ...] = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def _output(x: Tensor, sigma: Tensor, denoised: Tensor, prediction_type: str) -> Tensor:
    """The model output (epsilon or v) implied by an x0 prediction at (x, sigma)."""
    eps = (x - denoised) / sigma
    if prediction_type == "epsilon":
        return eps
    # v = sqrt(a) eps - sqrt(1 - a) x0 with sqrt(a) = 1 / sqrt(1 + sigma^2).
    return (eps - sigma * denoised) / (sigma**2 + 1) ** 0.5


def _slope(x: Tensor, sigma: Tensor, output: Tensor, prediction_type: str) -> Tensor:
    """The ODE slope (epsilon) at (x, sigma) for an extrapolated model output."""
    if prediction_type == "epsilon":
        return output
    # eps = sqrt(a) v + sqrt(1 - a) x_vp, written in VE scaling.
    return output / (sigma**2 + 1) ** 0.5 + sigma * x / (sigma**2 + 1)


def _combine(outputs: list[Tensor]) -> Tensor:
    weights = _AB_WEIGHTS[len(outputs) - 1]
    return sum(w * out for w, out in zip(weights, reversed(outputs)))


def sample_plms(
    denoiser: DenoiseFn,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators = None,
    callback: Callback | None = None,
    prediction_type: str | None = None,
    landing: Tensor | None = None,
    restart: Tensor | None = None,
) -> Tensor:
    """PLMS (Liu et al. 2022, eq. 12 with the "pseudo improved Euler" start of the CompVis
    sampler; diffusers' ``PNDMScheduler(skip_prk_steps=True)``).

    Each step is a DDIM transfer (an Euler step in VE scaling, see ``sample_ddim``)
    driven by an Adams-Bashforth extrapolation of the last model outputs, up to 4th
    order. The first step, when there are at least two, is Heun-like: the outputs at
    both ends are averaged and the step redone.

    The extrapolated quantity is the raw model output, as in diffusers: epsilon, or v
    for v-prediction models (read from ``denoiser.prediction_type`` unless given).

    ``landing`` / ``restart``: where each step lands and where the redone first step
    starts when they are not ``sigmas[i + 1]`` / ``sigmas[0]`` (diffusers' PNDMScheduler
    steps by a fixed N // steps timesteps whatever the spacing; see
    ``SamplingSchedule.below``); the latents are read at the next level with the same
    VP values.
    """
    kind = prediction_type or getattr(denoiser, "prediction_type", "epsilon")
    total = num_steps(sigmas)
    if landing is not None:
        check_landing(landing, total)
    outputs: list[Tensor] = []
    for i in range(total):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        start, end = sigma, (sigma_next if landing is None else landing[i])
        denoised = denoiser(x, sigma)
        output = _output(x, sigma, denoised, kind)
        if i == 0 and total > 1:
            x_2 = reread(euler_step(x, sigma, end, denoised), end, sigma_next)
            output_2 = _output(x_2, sigma_next, denoiser(x_2, sigma_next), kind)
            combined = (output + output_2) / 2
            start, end = (sigma if restart is None else restart), sigma_next
            x = reread(x, sigma, start)
        else:
            combined = _combine(outputs[-3:] + [output])
        outputs = outputs[-3:] + [output]
        x = reread(x + _slope(x, start, combined, kind) * (end - start), end, sigma_next)
        x = report(callback, i, total, x, denoised)
    return x
