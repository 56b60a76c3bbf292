"""Reusable pieces for training latent diffusion models (used by ``scripts/train_toy.py``).

Deterministic seeding by step, an EMA of weights, atomic resumable checkpoints,
the CLIP contrastive loss, the VAE loss and the diffusion (eps / v) loss with the
model's own training noise schedule. Plain torch: no accelerate, no diffusers.
"""

from __future__ import annotations

import math
import os
import random
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .denoisers import DiscreteSchedule
from .models.vae import AutoencoderKL

# --- seeding -------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of ints (run seed, stage, step, ...).

    numpy's SeedSequence mixes the parts, so nearby tuples give unrelated streams;
    drawing data and noise by step index (not from one running RNG) is what makes
    a resumed run identical to an uninterrupted one.
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def generator_for(*parts: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``parts`` (see :func:`derive_seed`)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (model initialisation draws from the global RNGs)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- schedules and EMA -----------------------------------------------------------


def warmup_constant_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up, then constant, as SD's training configs do.

    Deliberately independent of the total step count, so that extending a
    finished run with more steps gives exactly the run that asked for them at once.
    """
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def warmup_cosine_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int,
                     final_fraction: float = 0.0) -> float:
    """Linear warm-up, then a half cosine from ``base_lr`` down to ``final_fraction * base_lr``
    at ``total_steps``. For short runs: the decay settles the weights by the last step, which
    a constant rate (SD's choice for runs of hundreds of thousands of steps) does not."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (final_fraction + (1 - final_fraction) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` (the original ldm
    ``LitEma``), so early averages are not dominated by the random initialisation.
    Shadows are float32 whatever the module's dtype.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in self._tracked(module)}

    @staticmethod
    def _tracked(module: nn.Module) -> Iterable[tuple[str, Tensor]]:
        return ((k, v) for k, v in module.state_dict().items() if v.is_floating_point())

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        for key, value in self._tracked(module):
            shadow = self.shadow[key]
            shadow.lerp_(value.detach().to(shadow.device, torch.float32), 1.0 - decay)

    def to(self, device: torch.device | str) -> "EMA":
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates,
                "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("EMA state does not match the module's parameters")
        device = next(iter(self.shadow.values())).device
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = {k: v.to(device, torch.float32) for k, v in state["shadow"].items()}

    def averaged_state(self, module: nn.Module) -> dict[str, Tensor]:
        """``module.state_dict()`` with the averaged values (non-float entries kept)."""
        return {k: self.shadow[k].to(v.dtype) if k in self.shadow else v
                for k, v in module.state_dict().items()}


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: no decay on biases, norms and embeddings.

    Decaying the CLIP token table would shrink every row that the toy captions
    never use toward zero, making out-of-world words collapse onto one embedding.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or "embedding" in name or "norm" in name:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --- checkpoints -------------------------------------------------------------------


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary sibling, fsync, then ``os.replace``: a crash
    mid-write leaves the previous checkpoint intact, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint written by :func:`atomic_save`, or None if there is none.

    ``weights_only=True``: a training checkpoint is data, never code.
    """
    path = Path(path)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --- losses -------------------------------------------------------------------------


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

    def draw(self, x0: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Uniform timesteps and unit noise, drawn on the CPU so they do not depend on the device."""
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
        return t.to(x0.device), noise.to(x0.device)


def diffusion_loss(unet: nn.Module, latents: Tensor, context: Tensor, schedule: NoiseSchedule,
                   generator: torch.Generator | None) -> Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14), unweighted MSE on eps (or v)."""
    latents = latents.float()
    t, noise = schedule.draw(latents, generator)
    noisy = schedule.add_noise(latents, noise, t)
    prediction = unet(noisy, t, context)
    return F.mse_loss(prediction.float(), schedule.target(latents, noise, t))
