"""Datasets of the toy world (``ldm.toy.world``), drawn by global sample index.

Item ``i`` of a dataset that starts at ``first`` is global sample ``first + i``, drawn
from its own seed ``derive_seed(seed, stream, first + i)``: the data never depends on
batching, workers, process count or where a run was resumed. Any training on the toy
world (the from-scratch recipe, fine-tunes, adapters) reads its pictures this way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..models.tokenizer import Tokenizer
from ..models.vae import DiagonalGaussian
from ..toy.world import Scene, caption, kind_twin, render, sample_scene
from .masks import random_mask
from .seeding import derive_seed


def chw(image: np.ndarray) -> Tensor:
    """An ``(H, W, 3)`` uint8 picture as a ``(3, H, W)`` tensor."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: PIL arrays are read-only


class WorldPairs(Dataset):
    """Fresh (image, caption ids) pairs of the train split (images only without a tokenizer).

    With ``twins``, every odd sample is the kind twin (``ldm.toy.world.kind_twin``) of
    the even one before it, so contrastive batches hold pairs that differ in kind only.
    """

    def __init__(self, seed: int, stream: int, first: int, count: int, size: int,
                 tokenizer: Tokenizer | None, twins: bool = False) -> None:
        self.seed, self.stream, self.first, self.count = seed, stream, first, count
        self.size, self.tokenizer, self.twins = size, tokenizer, twins

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = self.first + i
        rng = np.random.default_rng(derive_seed(self.seed, self.stream, n))
        if self.twins and n % 2:
            # Sample n - 1's scene: the first draw from its seed, as in the branch below.
            scene = sample_scene(np.random.default_rng(derive_seed(self.seed, self.stream, n - 1)))
            scene = kind_twin(scene, rng)
        else:
            scene = sample_scene(rng)
        item = {"images": chw(render(scene, self.size))}
        if self.tokenizer is not None:
            item["ids"] = self.tokenizer([caption(scene, rng)])[0]
        return item


@dataclass
class LatentSet:
    """Posterior moments (mean and log-variance, concatenated on channels) of a fixed
    set of train-split scenes, and the scaling factor measured on them."""

    moments: Tensor
    scenes: list[Scene]
    scaling_factor: float
    stats: dict[str, Any] = field(default_factory=dict)


class LatentPairs(Dataset):
    """(scaled latent sample, caption ids) for the U-Net. Each item picks a picture of
    the set, re-captions it and draws a posterior sample, all from its own seed; a
    fraction ``p_empty`` of captions is empty (for classifier-free guidance)."""

    def __init__(self, latents: LatentSet, seed: int, stream: int, first: int, count: int, p_empty: float,
                 tokenizer: Tokenizer) -> None:
        self.latents, self.seed, self.stream, self.first, self.count = latents, seed, stream, first, count
        self.p_empty, self.tokenizer = p_empty, tokenizer

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self._draw(i)[0]

    def _draw(self, i: int) -> tuple[dict[str, Tensor], int, np.random.Generator]:
        """The item, the index of its picture in the set, and its generator (to draw more from)."""
        rng = np.random.default_rng(derive_seed(self.seed, self.stream, self.first + i))
        j = int(rng.integers(len(self.latents.scenes)))
        text = caption(self.latents.scenes[j], rng)
        if rng.random() < self.p_empty:
            text = ""
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z = DiagonalGaussian(self.latents.moments[j : j + 1].float()).sample(noise)[0]
        return {"latents": z * self.latents.scaling_factor, "ids": self.tokenizer([text])[0]}, j, rng


class InpaintPairs(LatentPairs):
    """``LatentPairs`` items with what an inpainting model learns from besides: the
    picture itself (``images``, uint8 ``(3, size, size)``, drawn again from its scene; the
    task encodes it with the mask applied) and a random mask (``masks``, ``(1, size,
    size)``, 1 = repainted; :func:`ldm.training.masks.random_mask`)."""

    def __init__(self, latents: LatentSet, seed: int, stream: int, first: int, count: int, p_empty: float,
                 tokenizer: Tokenizer, size: int) -> None:
        super().__init__(latents, seed, stream, first, count, p_empty, tokenizer)
        self.size = size

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item, j, rng = self._draw(i)
        mask = torch.from_numpy(random_mask(rng, self.size))[None]
        return {**item, "images": chw(render(self.latents.scenes[j], self.size)), "masks": mask}
