"""Text-to-image pipeline: encode prompt, draw noise, sample, decode."""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from .checkpoints import LoadedModel, load_model
from .checkpoints.loading import parse_dtype
from .denoisers import CFGDenoiser, Denoiser, DiscreteSchedule
from .prompts import encode_prompts
from .samplers import SAMPLERS, sample

logger = logging.getLogger("ldm")

OUTPUTS = ("pil", "np", "latent")
SCHEDULES = ("default", "karras")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_WEIGHTS = "ldm-toy.safetensors"
MAX_SEED = 2**32 - 1


def default_weights_path() -> Path:
    """The shipped model: $LDM_WEIGHTS if set, else weights/ldm-toy.safetensors."""
    return Path(os.environ.get("LDM_WEIGHTS", WEIGHTS_DIR / DEFAULT_WEIGHTS))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # Half precision is the norm on GPUs; CPUs are slow or inexact in float16.
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class Generation:
    """What a call produced, with everything needed to reproduce each image."""

    images: Any
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    params: dict[str, Any] = field(default_factory=dict)


def _as_list(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r:.80}")


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Pipeline:
    """Stable-Diffusion-style text-to-image generation.

    >>> pipe = Pipeline.from_pretrained()
    >>> pipe("a cat wearing a hat", negative_prompt="blurry", steps=20, seed=42)[0].save("cat.png")
    """

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.config = model.config
        self.unet = model.unet.eval()
        self.vae = model.vae.eval()
        self.text_encoder = model.text_encoder.eval()
        self.tokenizer = model.tokenizer
        self.schedule = DiscreteSchedule.from_config(model.config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        prediction_type: str | None = None,
        config: Any = None,
        allow_pickle: bool = False,
    ) -> "Pipeline":
        """Load a single-file checkpoint (original layout), a diffusers folder, or,
        with no path, the model shipped in weights/."""
        if path is None:
            path = default_weights_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"the shipped model is missing: {path} (a full clone of the repository "
                    "contains it; or pass a checkpoint path)"
                )
        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
        model = load_model(
            path, device=device, dtype=dtype, config=config,
            prediction_type=prediction_type, allow_pickle=allow_pickle,
        )
        return cls(model)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "Pipeline":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **kwargs: Any) -> Any:
        """Generate images; returns a list of PIL images (or an array / latents, see ``output``)."""
        return self.generate(prompt, negative_prompt, **kwargs).images

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        steps: int = 25,
        guidance_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | Sequence[int] | None = None,
        num_images: int = 1,
        sampler: str = "dpmpp_2m",
        schedule: str | None = None,
        latents: torch.Tensor | None = None,
        output: Literal["pil", "np", "latent"] = "pil",
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
    ) -> Generation:
        """Like ``__call__`` but returns a :class:`Generation` with the seed of every image.

        ``prompt`` may be a list (``num_images`` images per prompt). Image k of the call
        is drawn from its own CPU generator seeded ``seed + k``, so it does not depend on
        the batch size or the device. ``seed`` may also be a list with one seed per
        image (how ``ldm batch`` renders unrelated prompts in one call).
        """
        prompts = _as_list(prompt, "prompt")
        negatives = self._negatives(negative_prompt, len(prompts))
        steps = _check_int(steps, "steps", 1)
        num_images = _check_int(num_images, "num_images", 1)
        width, height = self._size(width, height)
        guidance_scale = _check_guidance(guidance_scale)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
        karras = _check_schedule(schedule)
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")

        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]
        count = len(prompts)
        seeds = self._seeds(seed, count)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        noise = self._noise(latents, generators, count, height, width)

        denoiser = self._denoiser(prompts, negatives, guidance_scale)
        result = sample(
            sampler, denoiser, noise, steps, self.schedule, karras=karras,
            generators=generators, callback=_progress(steps, progress, callback, sampler),
        )
        images = result if output == "latent" else self.decode(result, output)
        params = dict(steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                      sampler=sampler, schedule=schedule or "default", seed=seeds[0])
        return Generation(images, seeds, prompts, negatives, params)

    def _negatives(self, negative: str | Sequence[str] | None, n: int) -> list[str]:
        if negative is None:
            return [""] * n
        negatives = _as_list(negative, "negative_prompt")
        if len(negatives) == 1:
            return negatives * n
        if len(negatives) != n:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {n}; "
                "give one negative prompt or one per prompt"
            )
        return negatives

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        factor = self.config.vae.downsample_factor
        native = self.config.default_size
        sizes = []
        for name, value in (("width", width), ("height", height)):
            value = native if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
                raise ValueError(
                    f"{name} must be a positive multiple of {factor} (e.g. {native}), got {value!r}"
                )
            sizes.append(value)
        return sizes[0], sizes[1]

    @classmethod
    def _seeds(cls, seed: int | Sequence[int] | None, count: int) -> list[int]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != count:
                raise ValueError(
                    f"seed is a list of {len(seed)} seeds but the call makes {count} images; "
                    "give one seed, or one per image"
                )
            seeds = [_check_int(s, "seed", 0) for s in seed]
        else:
            base = cls._seed(seed)
            seeds = [base + k for k in range(count)]
        if max(seeds) > MAX_SEED:
            raise ValueError(f"seed + image index must stay <= {MAX_SEED}; seed {seeds[0]} is too large")
        return seeds

    @staticmethod
    def _seed(seed: int | None) -> int:
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            logger.info("seed %d", seed)
            return seed
        return _check_int(seed, "seed", 0)

    def _noise(self, latents: torch.Tensor | None, generators: list[torch.Generator],
               count: int, height: int, width: int) -> torch.Tensor:
        factor = self.config.vae.downsample_factor
        shape = (self.config.unet.in_channels, height // factor, width // factor)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (count, *shape):
                raise ValueError(
                    f"latents must be a tensor of shape {(count, *shape)}, got "
                    f"{getattr(latents, 'shape', type(latents).__name__)}"
                )
            return latents.to(self.device, torch.float32)
        # One draw per image from its own CPU generator, as diffusers does with a
        # list of generators, so image k is the same whatever the batch or device.
        noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(noise).to(self.device)

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text embeddings for prompts (and negatives, padded to the same length)."""
        cond = encode_prompts(self.text_encoder, self.tokenizer, prompts)
        if negatives is None:
            return cond, None
        chunks = cond.shape[1] // self.config.text.max_position_embeddings
        uncond = encode_prompts(self.text_encoder, self.tokenizer, negatives, min_chunks=chunks)
        if uncond.shape[1] > cond.shape[1]:
            extra = uncond.shape[1] // self.config.text.max_position_embeddings
            cond = encode_prompts(self.text_encoder, self.tokenizer, prompts, min_chunks=extra)
        return cond, uncond

    def _denoiser(self, prompts: list[str], negatives: list[str], scale: float) -> CFGDenoiser:
        cond, uncond = self.encode_prompts(prompts, negatives if scale > 1 else None)
        denoiser = Denoiser(self._unet_call, self.schedule, self.config.prediction_type)
        return CFGDenoiser(denoiser, cond, uncond, scale)

    def _unet_call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # The sampler works in float32; the U-Net runs in the pipeline's dtype.
        out = self.unet(x.to(self.dtype), t.to(self.device), context.to(self.dtype))
        return out.float()

    def decode(self, latents: torch.Tensor, output: Literal["pil", "np"] = "pil") -> Any:
        """Latents (VP scaled, as samplers return them) to images in [0, 1]."""
        pixels = torch.cat([self._decode_one(z[None]) for z in latents])
        array = pixels.permute(0, 2, 3, 1).cpu().numpy()
        if output == "np":
            return array
        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    def _decode_one(self, z: torch.Tensor) -> torch.Tensor:
        # One image at a time bounds the decoder's memory, which dominates at 512+.
        z = z / self.config.vae.scaling_factor
        image = self.vae.decode(z.to(self.vae.dtype)).float()
        if not torch.isfinite(image).all() and self.vae.dtype != torch.float32:
            logger.warning("VAE decode in %s gave NaN/inf; decoding again in float32", self.vae.dtype)
            image = self.vae.float().decode(z.float()).float()
            self.vae.to(self.dtype)
        return (image / 2 + 0.5).clamp(0, 1)



def _check_guidance(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
        raise ValueError(f"guidance_scale must be a number >= 0 (1 disables guidance), got {scale!r}")
    return float(scale)


def _check_schedule(schedule: str | None) -> bool:
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    return schedule == "karras"


def _progress(steps: int, enabled: bool, callback: Callable | None, sampler: str) -> Callable:
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=sampler, leave=False)

    def on_step(i: int, total: int, x: torch.Tensor, *_: Any) -> None:
        if bar is not None:
            bar.update(1)
            if i + 1 >= total:
                bar.close()
        if callback is not None:
            callback(i, total, x)

    return on_step
