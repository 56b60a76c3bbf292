"""Trainable LoRA (Hu et al. 2021, arXiv:2106.09685) on a U-Net and a text encoder, in kohya-ss's layout.

Each adapted layer ``W`` (a Linear or a Conv2d) gets a low-rank update
``W + (alpha / rank) * up @ down``: ``down`` maps the input to ``rank`` channels
(a conv ``down`` keeps the layer's kernel, stride and padding), ``up`` maps them back
(1x1 for convs). ``up`` starts at zero, so training starts from the base model exactly;
``down`` starts as torch's default (Kaiming-uniform) layer init, as kohya-ss and PEFT do.

Which layers (kohya-ss's ``networks/lora.py``): every Linear and 1x1 Conv2d inside the
U-Net's transformer blocks (``Transformer2DModel``: ``proj_in``, ``proj_out``,
``attn1``/``attn2`` ``to_q``/``to_k``/``to_v``/``to_out.0``, ``ff.net.0.proj``,
``ff.net.2``); with ``conv_rank`` also the layers of the ResNet blocks and the
down/up-samplers (kohya's ``conv_dim``: 3x3 convs at ``conv_rank``, their Linear and 1x1
layers at ``rank``); with a text encoder, every Linear of its attention and MLP blocks
(``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``), at their own alpha if
given. :class:`LoRASpec` ``layers`` narrows the U-Net's layers (e.g. to the cross-attention
keys and values, ``attn2.to_k`` and ``attn2.to_v``).

Names: ``lora_unet_<module>`` / ``lora_te_<module>``, the diffusers module name with
every ``.`` replaced by ``_``; the file holds ``<name>.lora_down.weight``,
``<name>.lora_up.weight`` and ``<name>.alpha`` per layer: what
:meth:`LoRANetwork.state_dict` is, key for key.

While attached, the base layers stay untouched: a forward hook adds the LoRA branch
to each base layer's output, so the base model's weights and state dict never change.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

from ..models.layers import Downsample2D, ResnetBlock2D, Transformer2D, Upsample2D

UNET_PREFIX = "lora_unet"
TEXT_PREFIX = "lora_te"
# kohya-ss's UNET_TARGET_REPLACE_MODULE, UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 and
# TEXT_ENCODER_TARGET_REPLACE_MODULE, as ldm's (and transformers') classes.
UNET_BLOCKS: tuple[type[nn.Module], ...] = (Transformer2D,)
UNET_CONV_BLOCKS: tuple[type[nn.Module], ...] = (ResnetBlock2D, Downsample2D, Upsample2D)
TEXT_BLOCKS: tuple[type[nn.Module], ...] = (CLIPAttention, CLIPMLP)
WRITER_KEY = "ldm_writer"  # metadata that marks a file as written by `ldm train-lora`
WRITER = "ldm train-lora"


def _check_rank_alpha(rank: Any, alpha: Any, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{what} rank must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{what} alpha must be a finite number > 0, got {alpha!r}")


class LoRAModule(nn.Module):
    """The low-rank branch of one Linear or Conv2d: ``x -> (alpha / rank) * up(down(x))``.

    ``alpha`` is a buffer (kohya's ``.alpha`` entry), so a state dict carries it.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _check_rank_alpha(rank, alpha, "LoRA")
        if isinstance(base, nn.Linear):
            self.lora_down: nn.Module = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up: nn.Module = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            if base.groups != 1 or base.dilation != (1, 1):
                raise ValueError(f"LoRA needs a plain Conv2d (groups 1, dilation 1), got {base}")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear or nn.Conv2d layers, got {type(base).__name__}")
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


@dataclass(frozen=True)
class LoRASpec:
    """Which layers get a LoRA and at which rank / alpha (see the module docstring)."""

    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (the branch's scale is 1)
    conv_rank: int | None = None  # None: no LoRA on the ResNet blocks and samplers
    conv_alpha: float | None = None  # None: conv_alpha = conv_rank
    text_encoder: bool = False
    # The text encoder's alpha (None: alpha). Adam moves weights by about the learning rate
    # whatever the gradient's size, so a smaller alpha here is a smaller effective learning
    # rate for the text encoder (kohya-ss sets one with text_encoder_lr); files store it per layer.
    text_alpha: float | None = None
    # Only the U-Net layers whose dotted names end with one of these (e.g. "attn2.to_k"); () = all.
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not all(isinstance(x, str) and x for x in self.layers):
            raise ValueError(f"layers must be a tuple of layer-name endings such as ('attn2.to_k',), "
                             f"got {self.layers!r}")
        _check_rank_alpha(self.rank, self.resolved_alpha, "LoRA")
        if self.text_alpha is not None:
            _check_rank_alpha(self.rank, self.text_alpha, "text-encoder LoRA")
            if not self.text_encoder:
                raise ValueError("text_alpha needs text_encoder (a LoRA on the text encoder)")
        if self.conv_rank is not None:
            _check_rank_alpha(self.conv_rank, self.resolved_conv_alpha, "conv LoRA")
        elif self.conv_alpha is not None:
            raise ValueError("conv_alpha needs conv_rank (LoRA on the 3x3 convs of the ResNet blocks)")

    @property
    def resolved_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def resolved_conv_alpha(self) -> float | None:
        if self.conv_rank is None:
            return None
        return float(self.conv_rank if self.conv_alpha is None else self.conv_alpha)

    def network_args(self) -> dict[str, Any]:
        """kohya-ss's ``network_args`` (``ss_network_args``) for these settings (``layers``: ldm's)."""
        args: dict[str, Any] = {}
        if self.conv_rank is not None:
            args.update(conv_dim=str(self.conv_rank), conv_alpha=str(self.resolved_conv_alpha))
        if self.layers:
            args["layers"] = ",".join(self.layers)
        if self.text_alpha is not None:
            args["text_encoder_alpha"] = str(float(self.text_alpha))
        return args

    def wants(self, kohya_name: str) -> bool:
        """Whether ``layers`` keeps the layer of this kohya name (it filters U-Net layers only)."""
        return (not self.layers or not kohya_name.startswith(UNET_PREFIX)
                or any(kohya_name.endswith("_" + x.replace(".", "_")) for x in self.layers))


def lora_targets(model: nn.Module, prefix: str, blocks: tuple[type[nn.Module], ...]
                 ) -> Iterator[tuple[str, nn.Module]]:
    """``(kohya name, layer)`` for every Linear / Conv2d inside a module of one of ``blocks``,
    named as kohya-ss names them: ``prefix + "." + block + "." + layer``, dots -> ``_``."""
    for block_name, block in model.named_modules():
        if not isinstance(block, blocks):
            continue
        for layer_name, layer in block.named_modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                yield f"{prefix}.{block_name}.{layer_name}".replace(".", "_"), layer


def _rank_alpha(spec: LoRASpec, name: str, layer: nn.Module) -> tuple[int, float] | None:
    """The rank and alpha of the branch of the layer ``name``, None if ``spec`` leaves it out."""
    conv = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
    if (conv and spec.conv_rank is None) or not spec.wants(name):
        return None
    if conv:
        return spec.conv_rank, spec.resolved_conv_alpha
    if name.startswith(TEXT_PREFIX) and spec.text_alpha is not None:
        return spec.rank, spec.text_alpha
    return spec.rank, spec.resolved_alpha


class LoRANetwork(nn.Module):
    """The LoRA branches of a U-Net (and optionally a text encoder), registered under their
    kohya names, so :meth:`state_dict` is the kohya file's content.

    Only the branches are parameters of this module; the base layers they adapt are
    referenced, not owned. :meth:`attach` hooks the branches into the base layers,
    :meth:`detach` removes the hooks.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module | None, spec: LoRASpec,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(spec, LoRASpec):
            raise TypeError(f"spec must be a LoRASpec, got {type(spec).__name__}")
        if spec.text_encoder and text_encoder is None:
            raise ValueError("spec.text_encoder is set but no text encoder was given")
        self.spec = spec
        self._bases: dict[str, nn.Module] = {}  # plain dict: the base layers are not this module's
        self._hooks: list[Any] = []
        blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if spec.conv_rank is not None else ())
        found = list(lora_targets(unet, UNET_PREFIX, blocks))
        if spec.text_encoder:
            found += list(lora_targets(text_encoder, TEXT_PREFIX, TEXT_BLOCKS))
        for name, layer in found:
            settings = _rank_alpha(spec, name, layer)
            if settings is None or name in self._bases:  # left out, or reached through two blocks
                continue
            self.add_module(name, LoRAModule(layer, *settings, generator))
            self._bases[name] = layer
        for prefix, part in ((UNET_PREFIX, "U-Net"), (TEXT_PREFIX, "text encoder")):
            if (prefix == UNET_PREFIX or spec.text_encoder) and not any(n.startswith(prefix) for n in self._bases):
                names = f", with names ending in {', '.join(spec.layers)}" if spec.layers and part == "U-Net" else ""
                raise ValueError(f"no {part} layer to adapt (in its transformer blocks{names})")

    def branches(self) -> Iterator[tuple[str, LoRAModule, nn.Module]]:
        """``(kohya name, branch, base layer)`` of every adapted layer."""
        for name, branch in self.named_children():
            yield name, branch, self._bases[name]

    def attach(self) -> "LoRANetwork":
        """Add each branch to its base layer's output (idempotent)."""
        if not self._hooks:
            self._hooks = [base.register_forward_hook(_hook(branch)) for _, branch, base in self.branches()]
        return self

    def detach(self) -> "LoRANetwork":
        """Remove the hooks: the base model computes as it did before."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        return self

    @property
    def attached(self) -> bool:
        return bool(self._hooks)


def _hook(branch: LoRAModule):
    def add_branch(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        # The branch keeps its own (float32) weights whatever the base model's dtype.
        x = args[0]
        return output + branch(x.to(branch.lora_down.weight.dtype)).to(output.dtype)

    return add_branch


def kohya_state(network_state: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """A network's state dict as the file stores it: weights in ``dtype`` (refused if a
    value does not fit it), each ``alpha`` a float32 scalar (exact whatever ``dtype``)."""
    out: dict[str, Tensor] = {}
    for key, value in network_state.items():
        value = value.detach().cpu()
        out[key] = value.float() if key.endswith(".alpha") else value.to(dtype)
        if not torch.isfinite(out[key]).all():
            raise ValueError(f"LoRA weight {key} is not finite in {dtype} (a value overflows it, or training "
                             "diverged); save in float32 or lower the learning rate")
    return out


def kohya_metadata(spec: LoRASpec, fields: dict[str, Any]) -> dict[str, str]:
    """kohya-ss's ``ss_*`` metadata of a network trained with ``spec``, plus ``fields``
    (other ``ss_*`` entries: model, data, schedule), every value a string, and the
    marker that says ldm wrote the file."""
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": spec.rank,
        "ss_network_alpha": spec.resolved_alpha,
        "ss_network_train_unet_only": not spec.text_encoder,
        **fields,
    }
    if spec.network_args():
        meta["ss_network_args"] = json.dumps(spec.network_args())
    meta[WRITER_KEY] = WRITER
    return {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
            for k, v in meta.items()}


def load_network_state(network: LoRANetwork, state: dict[str, Tensor], source: str) -> None:
    """Load a kohya state (as :func:`kohya_state` wrote it) into ``network``; all or nothing:
    missing, unexpected or mis-shaped entries are one error naming ``source``."""
    want = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shaped = sorted(k for k in set(want) & set(state) if tuple(state[k].shape) != want[k])
    if missing or unexpected or shaped:
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped))
                 if keys]
        raise ValueError(f"{source}: does not fit this network: {'; '.join(parts)}")
    network.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
