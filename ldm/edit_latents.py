"""The latent side of image editing: init latents, latent masks, the per-step blend.

Everything is drawn per image from that image's own CPU generator, in the order
diffusers' ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline``
draw it with a list of generators, so image k equals diffusers' image k:

1. the input image's posterior sample (``retrieve_latents(vae.encode(image), generator)``),
   when sampling starts from the image or a 4-channel model blends it back;
2. the noise (``randn_tensor``);
3. with a mask, the masked image's posterior sample (``prepare_mask_latents``): a
   9-channel model reads it; for a 4-channel model diffusers computes it and never
   uses it, so only its draw is made, to keep the generator in step.

Then the sampler's own draws (ancestral and SDE samplers) follow, as in diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .samplers import Callback

MASK_THRESHOLD = 0.5  # diffusers' VaeImageProcessor binarize and A1111: white >= 0.5 is repainted


@dataclass(frozen=True)
class EditLatents:
    """What an edit adds to sampling, one row per image, float32 on the pipeline's device.

    ``init``: the input image's latents (scaled, i.e. VE at sigma 0) that sampling
    starts from; ``None`` starts from pure noise (an inpainting call at strength 1).
    ``noise``: unit Gaussian noise. ``known``: the input's latents that a 4-channel
    model's known region is put back to after every step, ``blend``: the latent
    mask for it (1 = repaint). ``concat``: a 9-channel model's extra input, the
    latent mask then the masked image's latents.
    """

    init: Tensor | None
    noise: Tensor
    known: Tensor | None = None
    blend: Tensor | None = None
    concat: Tensor | None = None

    def rows(self, rows: slice) -> "EditLatents":
        """The images ``rows`` of every field (a sub-batch)."""
        return EditLatents(*(None if t is None else t[rows]
                             for t in (self.init, self.noise, self.known, self.blend, self.concat)))


def to_model_pixels(array: Any) -> Tensor:
    """An HxWx3 float array in [0, 1] as the VAE's input, 1x3xHxW in [-1, 1] (diffusers'
    ``VaeImageProcessor.normalize``: ``2 * x - 1``)."""
    pixels = torch.as_tensor(array, dtype=torch.float32).permute(2, 0, 1)[None]
    return 2.0 * pixels - 1.0


def binary_mask(array: Any) -> Tensor:
    """An HxW mask in [0, 1] as 1x1xHxW of 0/1 (white >= 0.5 is repainted)."""
    mask = torch.as_tensor(array, dtype=torch.float32)[None, None]
    return (mask >= MASK_THRESHOLD).float()


def latent_mask(mask: Tensor, factor: int) -> Tensor:
    """The pixel mask (1x1xHxW, 0/1) at latent resolution: a latent cell is repainted when
    any of its pixels is. On masks aligned to the ``factor``-pixel grid this equals
    diffusers' nearest-neighbour ``interpolate``; on others it keeps thin strokes, which
    nearest-neighbour can drop entirely."""
    return F.max_pool2d(mask, factor)


def encode(vae: Any, pixels: Tensor, generator: torch.Generator, scaling_factor: float) -> Tensor:
    """A sample of the VAE posterior of one image, scaled; float32."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype))
    return (posterior.sample(generator) * scaling_factor).float()


def prepare(
    vae: Any,
    images: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    generators: Sequence[torch.Generator],
    *,
    scaling_factor: float,
    latent_channels: int,
    factor: int,
    inpainting_model: bool,
    from_image: bool,
) -> EditLatents:
    """Per image k (pixels 1x3xHxW in [-1, 1], mask 1x1xHxW of 0/1 or None), the
    latents an edit needs, drawn from ``generators[k]`` in diffusers' order.

    ``factor``: the VAE's down-sampling. ``from_image``: sampling starts from the image noised to the first step's level
    (strength < 1, or img2img at any strength); otherwise from pure noise, as
    diffusers' inpainting pipeline does at strength 1.
    """
    rows = [
        _prepare_one(vae, image, mask, g, scaling_factor, (latent_channels, factor), inpainting_model, from_image)
        for image, mask, g in zip(images, masks, generators)
    ]
    device = vae.device

    def stack(i: int) -> Tensor | None:
        parts = [r[i] for r in rows]
        return None if parts[0] is None else torch.cat(parts).to(device)

    init, noise, known, blend, concat = (stack(i) for i in range(5))
    return EditLatents(init if from_image else None, noise, known, blend, concat)


def _prepare_one(
    vae: Any, image: Tensor, mask: Tensor | None, generator: torch.Generator, scaling_factor: float,
    channels_factor: tuple[int, int], inpainting_model: bool, from_image: bool,
) -> tuple[Tensor | None, ...]:
    channels, factor = channels_factor
    shape = (1, channels, image.shape[-2] // factor, image.shape[-1] // factor)
    blends = mask is not None and not inpainting_model
    latents = encode(vae, image, generator, scaling_factor) if from_image or blends else None
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if mask is None:
        return latents, noise, None, None, None
    small = latent_mask(mask, factor)
    if not inpainting_model:
        torch.randn(shape, generator=generator, dtype=torch.float32)  # the unused masked-image sample
        return latents, noise, latents, small.expand(1, 1, *shape[2:]), None
    # diffusers: masked_image = init_image * (mask_condition < 0.5), grey (0) where repainted.
    masked = encode(vae, image * (1 - mask), generator, scaling_factor)
    return latents, noise, None, None, torch.cat([small.to(masked.device), masked], dim=1)


def blend_callback(edit: EditLatents, sigmas: Tensor) -> Callback:
    """After step i, put the known region (latent mask 0) back to the input's latents
    noised to the level step i + 1 starts from, with the call's own noise, and to the
    clean latents after the last step: diffusers' inpainting loop with a 4-channel
    U-Net (``init_latents_proper = scheduler.add_noise(image_latents, noise,
    timesteps[i + 1])``), written in VE scaling. ``sigmas``: the levels this run
    visits; the last may be above 0 (DDIM, PLMS), where the clean latents in VP
    scaling are ``x0 * sqrt(sigma^2 + 1)`` in VE scaling. Two-evaluation steps (heun,
    plms's first) are blended once per step; diffusers' Heun also blends its half steps.
    """
    known, noise, mask = edit.known, edit.noise, edit.blend
    keep = 1 - mask  # made once: the same at every step
    sigmas = sigmas.to(known.device)

    def on_step(i: int, total: int, x: Tensor, denoised: Tensor) -> Tensor:
        sigma = sigmas[i + 1]
        proper = known * (sigma**2 + 1) ** 0.5 if i == total - 1 else known + sigma * noise
        return keep * proper + mask * x

    return on_step
