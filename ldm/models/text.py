"""CLIP text encoder: transformers' CLIPTextModel behind a small, fixed interface.

Both SD families use the same architecture here. SD1 is OpenAI CLIP ViT-L/14's
text tower (quick_gelu, 12 layers). SD2 is OpenCLIP ViT-H/14's text tower
conditioned on its *penultimate* block followed by the final LayerNorm; with the
last block removed (as diffusers' SD2 ``text_encoder`` already is, and as
:mod:`ldm.checkpoints.keymap_text` does for original files) that is exactly
CLIPTextModel's ``last_hidden_state`` with gelu and ``num_hidden_layers - 1``
layers. So one module serves both, and its output is what the U-Net is fed.

CLIP skip counts back from that output in AUTOMATIC1111's numbering: ``clip_skip=N``
is the output of the N-th block from the end, through the final LayerNorm
(``hidden_states[-N]``, as the web UI's ``encode_with_transformers``); 1 is the
model's own conditioning, 2 skips one more block. diffusers' ``clip_skip=k``
(``hidden_states[-(k + 1)]``) is ldm's ``k + 1``. For SD2, 1 is OpenCLIP's
penultimate block (what SD2 was trained on) and 2 the block before it; the web UI
ignores its CLIP-skip setting for SD2 (sd_hijack_open_clip.py), so its SD2 images
correspond to ``clip_skip=1``.

SDXL's encoders (CLIP ViT-L and OpenCLIP ViT-bigG) are ``hidden_layer="penultimate"``:
the U-Net is fed the next-to-last layer's output as it is, without the final
LayerNorm (``hidden_states[-2]``); ``clip_skip=N`` is ``hidden_states[-(N + 1)]``,
also raw (diffusers' SDXL ``clip_skip=k`` is ``hidden_states[-(k + 2)]``, ldm's
``k + 1``). bigG also gives a pooled embedding (``projection_dim``): the last layer
through the final LayerNorm at the end token, times ``text_projection``
(transformers' CLIPTextModelWithProjection ``text_embeds``), whatever the clip skip.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ..config import TextEncoderConfig, text_to_transformers


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` -> per-token embeddings ``(B, L, hidden_size)``, and with
    ``projection_dim`` a pooled embedding ``(B, projection_dim)`` (:meth:`encode`).

    ``state_dict()`` keys are diffusers' ``text_encoder`` keys
    (``text_model.embeddings.token_embedding.weight``, ...,
    ``text_model.final_layer_norm.bias``, and ``text_projection.weight`` with a
    projection: the keys of transformers' CLIPTextModelWithProjection, SDXL's
    ``text_encoder_2``), so no renaming is needed for diffusers folders saved by
    transformers < 5 (newer transformers drop the ``text_model.`` level when saving
    a CLIPTextModel; see ``keymap_text.text_diffusers_to_internal``).
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        hf_config = CLIPTextConfig(**text_to_transformers(config), attn_implementation="sdpa")
        self.text_model = CLIPTextModel(hf_config)
        # transformers keeps position ids 0..76 in a buffer, persistent in old
        # releases (so some diffusers folders and every SD1 original file carry
        # ``...embeddings.position_ids``; in some merged SD1 files they are even
        # corrupted floats) and non-persistent now. We remove the buffer and pass
        # fresh ids on every call instead: positions are always 0..L-1, nothing is
        # left on the meta device after a meta-build + ``assign=True`` load, and
        # the key maps simply drop ``position_ids`` from every source, so both
        # diffusers and original weights load with ``strict=True``.
        del self.text_model.embeddings.position_ids
        # CLIPTextModelWithProjection's head, under its name: applied to the pooled output.
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False) if config.projection_dim else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.embeddings.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def penultimate(self) -> bool:
        """Conditions on the next-to-last layer, raw (SDXL), rather than the last, normed."""
        return self.config.hidden_layer == "penultimate"

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip: the one that conditions on the first layer's output."""
        return self.num_layers - 1 if self.penultimate else self.num_layers

    def forward(self, input_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """The hidden states the U-Net is fed, ``(B, L, hidden_size)``: for a "last" encoder
        block ``-clip_skip`` after the final LayerNorm, for a "penultimate" one block
        ``-(clip_skip + 1)`` as it is (``clip_skip=1``: the model's own conditioning; see the
        module docstring)."""
        return self._run(input_ids, clip_skip, pooled=False)[0]

    def encode(self, input_ids: torch.Tensor, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(hidden states as forward gives them, pooled embedding (B, projection_dim))``;
        the pooled one is None without ``projection_dim`` and is always taken from the last
        layer (diffusers' ``text_embeds``), whatever ``clip_skip``."""
        return self._run(input_ids, clip_skip, pooled=self.text_projection is not None)

    def _run(self, input_ids: torch.Tensor, clip_skip: int, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        # ldm.validation.check_clip_skip words this for users; models depend on their config only.
        top = self.max_clip_skip
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= top:
            raise ValueError(f"clip_skip must be an integer from 1 to {top}, got {clip_skip!r}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"input_ids length {length} exceeds the encoder's window of {self.context_length} "
                "tokens; use ldm.prompts.encode_prompts, which chunks long prompts"
            )
        input_ids = input_ids.to(self.device, torch.long)
        position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        every_layer = self.penultimate or clip_skip > 1
        out = self.text_model(input_ids=input_ids, position_ids=position_ids, output_hidden_states=every_layer)
        if self.penultimate:
            hidden = out.hidden_states[-(clip_skip + 1)]
        elif clip_skip > 1:
            hidden = self.text_model.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            hidden = out.last_hidden_state
        # pooler_output: the last layer, normed, at the first end token (transformers' rule
        # for eos_token_id 49407, which text_to_transformers sets).
        return hidden, self.text_projection(out.pooler_output) if pooled else None
