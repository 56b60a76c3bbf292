"""The toy CLIP: the contrastive model whose text tower is the shipped model's text encoder.

CLIP (Radford et al. 2021) at toy scale: transformers' CLIP text transformer (key for
key the ``TextEncoder`` of ``ldm.models.text``) and, as the image tower, the ResNet of
CLIP's RN models (open_clip's ``ModifiedResNet``: three-convolution stem, bottleneck
stages, attention pooling). A small ViT with 8-pixel patches, tried first, matched
captions by colour but stayed at chance telling circles from squares even when every
batch held such pairs; so its text space blurred those words, and the U-Net conditioned
on it drew squares for circles. Convolutions see corners from the first steps.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection


class ToyCLIP(nn.Module):
    """``text_model`` / ``text_projection`` as in transformers' ``CLIPModel`` (so the text
    tower's keys are the text encoder's), ``visual`` as in open_clip, and CLIP's learned
    temperature ``logit_scale`` (initialised to 1/0.07)."""

    def __init__(self, text_config: CLIPTextConfig, vision: dict) -> None:
        """``vision``: ``ModifiedResNet`` arguments; both towers project to
        ``text_config.projection_dim``."""
        super().__init__()
        tower = CLIPTextModelWithProjection(text_config)
        self.text_model, self.text_projection = tower.text_model, tower.text_projection
        self.visual = ModifiedResNet(output_dim=text_config.projection_dim, **vision)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, input_ids: Tensor) -> Tensor:
        """Projected text embedding, pooled at the first end-of-text token (as CLIP)."""
        return self.text_projection(self.text_model(input_ids=input_ids).pooler_output)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Projected image embedding of RGB pixels in [-1, 1]."""
        return self.visual(pixels)

    def forward(self, input_ids: Tensor, pixels: Tensor) -> tuple[Tensor, Tensor]:
        return self.encode_text(input_ids), self.encode_image(pixels)

    @torch.no_grad()
    def similarity(self, input_ids: Tensor, pixels: Tensor) -> Tensor:
        """Cosine similarities, texts × images (the CLIP score is 100 × this)."""
        text, image = self(input_ids, pixels)
        return F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).t()


def scorer_metadata(vision: dict, projection_dim: int) -> dict[str, str]:
    """Safetensors metadata of the saved scorer: how to rebuild its image tower and
    what it pairs with (the text tower lives in the main checkpoint)."""
    return {"clip.vision_tower": "open_clip.modified_resnet.ModifiedResNet",
            "clip.vision_config": json.dumps(vision), "clip.projection_dim": str(projection_dim),
            "clip.input": "RGB scaled to [-1, 1], no mean/std normalisation",
            "clip.text": "text tower = cond_stage_model of the ldm checkpoint; pooled at the first end token"}
