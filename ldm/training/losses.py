"""Training losses: CLIP's contrastive loss, the VAE loss and the diffusion (eps / v) loss
with the model's own training noise schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..denoisers import DiscreteSchedule
from ..models.vae import AutoencoderKL


def to_pixels(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` in [0, 255] -> float in [-1, 1], the range SD's VAE sees."""
    return images.float() / 127.5 - 1.0


def trim_after_first_eos(ids: Tensor, eos_id: int) -> Tensor:
    """Token rows cut after the last column any row still needs (its first end token).

    CLIP's text tower is causal and pools at the first end token, so the columns
    after it change neither the pooled embedding nor any gradient: dropping them is
    exact, and makes contrastive training on short captions several times cheaper
    than running all 77 positions. (The U-Net stage, which reads every position of
    the last hidden state, must not trim.)
    """
    first_eos = (ids == eos_id).int().argmax(dim=1)
    return ids[:, : int(first_eos.max()) + 1]


def clip_contrastive_loss(text_embeds: Tensor, image_embeds: Tensor, logit_scale: Tensor,
                          max_scale: float = 100.0) -> Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3): row ``i`` of each
    side is the positive of row ``i`` of the other, every other row a negative.

    Embeddings are L2-normalised here; the learned temperature is clipped at 100
    as in CLIP, so the logits cannot blow up.
    """
    text = F.normalize(text_embeds.float(), dim=-1)
    image = F.normalize(image_embeds.float(), dim=-1)
    logits = logit_scale.float().exp().clamp(max=max_scale) * text @ image.t()
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def vae_loss(vae: AutoencoderKL, pixels: Tensor, generator: torch.Generator | None,
             kl_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean squared reconstruction error of a posterior sample plus ``kl_weight`` x KL.

    The KL is summed over each latent and divided by the number of pixel values, so
    ``kl_weight`` has the meaning of SD's (sum-reduced) ``kl_weight`` of 1e-6.
    """
    posterior = vae.encode(pixels)
    recon = vae.decode(posterior.sample(generator))
    mse = F.mse_loss(recon.float(), pixels.float())
    kl = posterior.kl().float().mean() / pixels[0].numel()
    # Detached tensors, not floats: reading a value would synchronise a GPU every step.
    return mse + kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}


TIMESTEP_SAMPLING = ("uniform", "cubic")


class NoiseSchedule:
    """The forward process ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` of a model config
    (SD: 1000 scaled-linear betas), with the training targets for eps and v."""

    def __init__(self, config: ModelConfig) -> None:
        self.prediction_type = config.prediction_type
        self.num_train_timesteps = config.num_train_timesteps
        self.alphas_cumprod = DiscreteSchedule.from_config(config).alphas_cumprod

    def _coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alphas_cumprod.to(like.device)[t].float().reshape(-1, *([1] * (like.ndim - 1)))
        return a.sqrt(), (1 - a).sqrt()

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        signal, sigma = self._coefficients(t, x0)
        return signal * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network predicts: eps, or v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return noise
        signal, sigma = self._coefficients(t, x0)
        return signal * noise - sigma * x0

    def draw(self, x0: Tensor, generator: torch.Generator | None, sampling: str = "uniform"
             ) -> tuple[Tensor, Tensor]:
        """Timesteps (see :data:`TIMESTEP_SAMPLING`) and unit noise, drawn on the CPU so they
        do not depend on the device."""
        n, T = x0.shape[0], self.num_train_timesteps
        if sampling == "uniform":
            t = torch.randint(0, T, (n,), generator=generator)
        elif sampling == "cubic":
            # T2I-Adapter's (SDXL) schedule: t = (1 - u^3) T puts most draws at the noisy
            # end, where an added control decides the layout (79% of them above T/2).
            u = torch.rand(n, generator=generator, dtype=torch.float64)
            t = ((1 - u**3) * T).long().clamp(0, T - 1)
        else:
            raise ValueError(f"unknown timestep sampling {sampling!r}; valid: {', '.join(TIMESTEP_SAMPLING)}")
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        return t.to(x0.device), noise.to(x0.device)


def diffusion_loss(unet: nn.Module, latents: Tensor, context: Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator | None, extra: Tensor | None = None) -> Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14), unweighted MSE on eps (or v).

    ``extra``: more input channels stacked after the noisy latents (an inpainting
    U-Net's mask and masked-image latents), never noised."""
    noisy, t, target = noised(latents, schedule, generator)
    if extra is not None:
        noisy = torch.cat([noisy, extra.to(noisy.dtype)], dim=1)
    prediction = unet(noisy, t, context)
    return F.mse_loss(prediction.float(), target)


def noised(latents: Tensor, schedule: NoiseSchedule, generator: torch.Generator | None,
           sampling: str = "uniform") -> tuple[Tensor, Tensor, Tensor]:
    """One training draw for float ``latents``: ``(noisy latents, timesteps, target)``;
    ``sampling``: how timesteps are drawn (:data:`TIMESTEP_SAMPLING`)."""
    latents = latents.float()
    t, noise = schedule.draw(latents, generator, sampling)
    return schedule.add_noise(latents, noise, t), t, schedule.target(latents, noise, t)
