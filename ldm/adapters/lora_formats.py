"""Read a LoRA-family file into per-layer weight deltas, checked whole before use.

Every layer's update is ``dW = scale * f(tensors)`` with ``scale = alpha / rank`` when the
file stores an ``alpha`` for the layer and 1 otherwise (kohya-ss, A1111 ``network.py``
``calc_scale``, ComfyUI ``comfy/weight_adapter``), and ``f`` one of:

- LoRA / LoCon (kohya ``lora_down``/``lora_up``, PEFT ``lora_A``/``lora_B``, older
  diffusers ``lora.down``/``lora.up``, ``lora_linear_layer``, ``to_q_lora``):
  ``up @ down``, with a conv ``down`` (``[r, in, kh, kw]``) and a 1x1 ``up``;
  with a Tucker core ``lora_mid`` ``[r, r, kh, kw]`` (LyCORIS, A1111
  ``lyco_helpers.rebuild_cp_decomposition``): ``einsum('n m k l, i n, m j -> i j k l', mid, up, down)``.
  rank = ``down.shape[0]``.
- LoHa (LyCORIS ``lycoris/functional/loha.py``, A1111 ``network_hada.py``):
  ``(w1_a @ w1_b) * (w2_a @ w2_b)``; with Tucker cores ``t1``/``t2``:
  ``einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)`` for each factor. rank = ``w1_b.shape[0]``.
- LoKr (LyCORIS ``lycoris/functional/lokr.py``, A1111 ``network_lokr.py``, ComfyUI
  ``weight_adapter/lokr.py``): ``kron(w1, w2)`` where ``w1 = lokr_w1`` or ``w1_a @ w1_b``
  and ``w2 = lokr_w2``, ``w2_a @ w2_b`` or the Tucker form with ``lokr_t2``. rank =
  ``w2_b.shape[0]``, else ``w1_b.shape[0]``; with both factors full, alpha is ignored
  (scale 1), as LyCORIS stores it.

PEFT files written by diffusers >= 0.34 may carry ``lora_alpha`` / ``alpha_pattern`` in the
``lora_adapter_metadata`` header entry; they are read like diffusers does (PEFT's
``get_pattern_key`` rule), and ``use_rslora`` divides by ``sqrt(rank)``.

A delta shaped for a 1x1 conv fits a linear layer and the reverse (SD1's ``proj_in`` is a
conv, SD2's a linear); otherwise it must have the layer's shape (same out-features, same
element count: LoKr and flattened LyCORIS conv factors are reshaped, as in A1111).

Everything is checked from the header before a tensor is read, and every tensor before
the caller touches a weight: unknown or unsupported entries, a file for another model
family, layers the model does not have, ranks that disagree, shapes that do not fit,
non-float and non-finite values. Each is one error naming the path and the entries.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints.files import FLOAT_DTYPES, TensorFile, open_tensor_file
from ..checkpoints.loading import name_some
from ..config import ModelConfig
from .lora_keys import (
    LOHA, LOKR, LORA, TEXT, TEXT2, UNET, Group, LoraError, ModuleIndex, Target, flat, group_entries,
    key_prefixes,
)

__all__ = ["Delta", "LoraError", "fits", "read_lora"]

logger = logging.getLogger("ldm")

Shape = tuple[int, ...]
_ADAPTER_METADATA = "lora_adapter_metadata"


# --- shapes (from the header) ----------------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """What one layer's entries are, read from their shapes alone."""

    kind: str  # "lora", "loha" or "lokr"
    shape: Shape  # the delta's own shape, before it is fitted to the layer
    rank: int | None  # alpha is divided by it; None: alpha does not apply


class _Bad(ValueError):
    """One layer's entries do not form a valid delta (the message says why)."""


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Bad(why)


def _lora_layout(s: dict[str, Shape]) -> _Layout:
    _need("down" in s and "up" in s, "needs both the down (lora_A) and up (lora_B) weights")
    down, up, mid = s["down"], s["up"], s.get("mid")
    _need(len(down) in (2, 4) and len(up) in (2, 4), f"down {down} and up {up} must be 2-D or 4-D")
    _need(all(k == 1 for k in up[2:]), f"up {up} must be a 1x1 conv or a linear")
    if mid is None:
        _need(down[0] == up[1], f"rank mismatch: down has rank {down[0]}, up has rank {up[1]}")
        return _Layout("lora", (up[0], down[1], *down[2:]), down[0])
    _need(len(mid) == 4 and all(k == 1 for k in down[2:]), f"lora_mid {mid} needs a 4-D core and a 1x1 down")
    _need(mid[0] == up[1] and mid[1] == down[0],
          f"rank mismatch: up {up}, lora_mid {mid}, down {down} do not chain")
    return _Layout("lora", (up[0], down[1], *mid[2:]), down[0])


def _tucker_shape(t: Shape, a: Shape, b: Shape, what: str) -> Shape:
    """Shape of ``einsum('i j k l, j r, i p -> p r k l', t, b, a)``."""
    _need(len(t) == 4 and len(a) == 2 and len(b) == 2 and t[0] == a[0] and t[1] == b[0],
          f"{what}: core {t} does not chain with {a} and {b}")
    return (a[1], b[1], *t[2:])


def _product_shape(a: Shape, b: Shape, what: str) -> Shape:
    """Shape of ``a @ b.reshape(len(b), -1)``, with b's trailing dims kept (conv factors)."""
    _need(len(a) == 2 and len(b) >= 2 and a[1] == b[0],
          f"rank mismatch: {what}_a {a} and {what}_b {b} do not multiply")
    return (a[0], *b[1:])


def _loha_layout(s: dict[str, Shape]) -> _Layout:
    _need(all(r in s for r in LOHA[:4]), "needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b")
    _need(("hada_t1" in s) == ("hada_t2" in s), "needs both hada_t1 and hada_t2, or neither")
    if "hada_t1" in s:
        one = _tucker_shape(s["hada_t1"], s["hada_w1_a"], s["hada_w1_b"], "hada_t1")
        two = _tucker_shape(s["hada_t2"], s["hada_w2_a"], s["hada_w2_b"], "hada_t2")
    else:
        one = _product_shape(s["hada_w1_a"], s["hada_w1_b"], "hada_w1")
        two = _product_shape(s["hada_w2_a"], s["hada_w2_b"], "hada_w2")
    _need(one == two, f"the two Hadamard factors have different shapes: {one} and {two}")
    return _Layout("loha", one, s["hada_w1_b"][0])


def _lokr_factor(s: dict[str, Shape], n: int) -> Shape:
    full, a, b = f"lokr_w{n}", f"lokr_w{n}_a", f"lokr_w{n}_b"
    _need((full in s) != (a in s and b in s), f"needs either {full} or both {a} and {b}")
    _need(not (full in s and (a in s or b in s)), f"has both {full} and {a}/{b}")
    if full in s:
        return s[full]
    if n == 2 and "lokr_t2" in s:
        return _tucker_shape(s["lokr_t2"], s[a], s[b], "lokr_t2")
    return _product_shape(s[a], s[b], f"lokr_w{n}")


def _lokr_layout(s: dict[str, Shape]) -> _Layout:
    _need("lokr_t2" not in s or "lokr_w2_a" in s, "lokr_t2 needs lokr_w2_a and lokr_w2_b")
    w1, w2 = _lokr_factor(s, 1), _lokr_factor(s, 2)
    _need(len(w1) == 2 and len(w2) in (2, 4), f"lokr factors must be 2-D (w1 {w1}) and 2-D or 4-D (w2 {w2})")
    rank = s["lokr_w2_b"][0] if "lokr_w2_b" in s else s["lokr_w1_b"][0] if "lokr_w1_b" in s else None
    return _Layout("lokr", (w1[0] * w2[0], w1[1] * w2[1], *w2[2:]), rank)


_LAYOUTS: dict[str, Callable[[dict[str, Shape]], _Layout]] = {
    "lora": _lora_layout, "loha": _loha_layout, "lokr": _lokr_layout,
}


def _kind(roles: set[str]) -> str:
    kinds = {k for k, names in (("lora", LORA), ("loha", LOHA), ("lokr", LOKR)) if roles & set(names)}
    _need(len(kinds) == 1, "has no weights besides alpha" if not kinds else f"mixes {' and '.join(sorted(kinds))}")
    return kinds.pop()


def fits(delta: Shape, weight: Shape) -> bool:
    """Whether a delta of shape ``delta`` can be added to a weight of shape ``weight``:
    the same shape, or the same out-features and element count (a 1x1 conv vs a linear,
    a LyCORIS conv factor stored flat)."""
    return tuple(delta) == tuple(weight) or (
        delta[0] == weight[0] and math.prod(delta) == math.prod(weight)
    )


# --- the deltas ------------------------------------------------------------------------


@dataclass
class Delta:
    """One layer's update: ``scale * f(tensors)`` in the shape of the layer's weight."""

    target: Target
    kind: str
    tensors: dict[str, torch.Tensor]  # role -> float32 factor
    scale: float  # alpha / rank, or 1
    shape: Shape  # the layer's weight shape

    def add_to(self, weight: torch.Tensor, multiplier: float) -> None:
        """``weight += multiplier * delta`` in place (a float32 weight of the layer's shape).

        A plain LoRA goes through one ``addmm_`` on the weight, so no full-size
        temporary is made; the other kinds build the delta first."""
        if weight.dtype != torch.float32 or tuple(weight.shape) != tuple(self.shape):
            raise ValueError(f"{self.target}: expected a float32 weight of shape {list(self.shape)}, "
                             f"got {weight.dtype} {list(weight.shape)}")
        self.tensors = {r: v.to(weight.device) for r, v in self.tensors.items()}
        if self.kind == "lora" and "mid" not in self.tensors and weight.is_contiguous():
            flat = weight.view(weight.shape[0], -1)
            flat.addmm_(_flat2(self.tensors["up"]), _flat2(self.tensors["down"]), alpha=multiplier * self.scale)
        else:
            weight.add_(_COMPUTE[self.kind](self.tensors).reshape(self.shape), alpha=multiplier * self.scale)


def _flat2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # A1111 lyco_helpers.make_weight_cp / ComfyUI: 'i j k l, j r, i p -> p r k l'
    return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a)


def _lora(t: dict[str, torch.Tensor]) -> torch.Tensor:
    up, down = _flat2(t["up"]), _flat2(t["down"])
    if "mid" in t:
        return torch.einsum("n m k l, i n, m j -> i j k l", t["mid"], up, down)
    return up @ down


def _loha(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in t:
        return (_tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                * _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]))
    return (t["hada_w1_a"] @ _flat2(t["hada_w1_b"])) * (t["hada_w2_a"] @ _flat2(t["hada_w2_b"]))


def _lokr_factor_weight(t: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    if f"lokr_w{n}" in t:
        return t[f"lokr_w{n}"]
    a, b = t[f"lokr_w{n}_a"], t[f"lokr_w{n}_b"]
    if n == 2 and "lokr_t2" in t:
        return _tucker(t["lokr_t2"], a, b)
    return (a @ _flat2(b)).reshape(a.shape[0], *b.shape[1:])


def _lokr(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = _lokr_factor_weight(t, 1), _lokr_factor_weight(t, 2)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


_COMPUTE: dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]] = {
    "lora": _lora, "loha": _loha, "lokr": _lokr,
}


# --- reading and checking a file -------------------------------------------------------


_UNET_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}
_TEXT_FAMILIES = {768: "SD 1.x (CLIP ViT-L)", 1024: "SD 2.x (OpenCLIP ViT-H)", 1280: "SDXL (OpenCLIP ViT-bigG)"}


def _family_of_width(width: int, component: str) -> str:
    names = _UNET_FAMILIES if component == UNET else _TEXT_FAMILIES
    return names.get(width, f"a model of width {width}")


# Layers whose input width is the cross-attention (U-Net) or hidden (text) width.
_TEXT_WIDTH_LAYERS = ("q_proj", "k_proj", "v_proj", "fc1")
_WIDTH_LAYERS = {UNET: ("attn2_to_k", "attn2_to_v"), TEXT: _TEXT_WIDTH_LAYERS, TEXT2: _TEXT_WIDTH_LAYERS}
_WIDTH_NAMES = {UNET: "cross-attention width", TEXT: "text-encoder width", TEXT2: "second text-encoder width"}


# kohya-ss writes the base model into the metadata (A1111 network.py detect_version reads
# it): the first rule that applies decides. SDXL files carry ss_v2="False" as well, and
# ss_base_model_version is "sd_v1", "sd_v2" (with "_v" for v-prediction) or "sdxl_base_v1-0".
_TRAINED_ON = (("ss_base_model_version", lambda v: v.startswith("sdxl"), "SDXL"),
               ("ss_v2", lambda v: v == "True", "sd2"), ("ss_v2", lambda v: v == "False", "sd1"),
               ("ss_base_model_version", lambda v: v.startswith("sd_v2"), "sd2"),
               ("ss_base_model_version", lambda v: v.startswith("sd_v1"), "sd1"))


def _lineage(config: ModelConfig) -> str | None:
    """The model's family as kohya's metadata names it; None for others (the toy model)."""
    if config.unet.addition_embed_type == "text_time":
        return "SDXL"
    return config.family if config.family in ("sd1", "sd2") else None


def _check_metadata(config: ModelConfig, metadata: dict[str, str], where: str) -> None:
    lineage = _lineage(config)
    if lineage is None:
        return
    for key, test, family in _TRAINED_ON:
        if key in metadata and test(metadata[key]):
            if family != lineage:
                raise LoraError(f"{where}: this LoRA was trained on {family} ({key}={metadata[key]!r} in its "
                                f"metadata) but the model is {config.family}; load it on a model of its family")
            return


def _check_family(layouts: dict[str, tuple[Group, _Layout]], config: ModelConfig, metadata: dict[str, str],
                  where: str) -> None:
    """Refuse, naming both, a LoRA that its metadata or its widths say was made for another
    model family."""
    _check_metadata(config, metadata, where)
    expected = {UNET: config.unet.cross_attention_dim, TEXT: config.text.hidden_size}
    if config.text_2 is not None:
        expected[TEXT2] = config.text_2.hidden_size
    for group, layout in layouts.values():
        if flat(group.name).endswith(_WIDTH_LAYERS[group.component]):
            width, model = layout.shape[1], expected[group.component]
            if width != model:
                raise LoraError(
                    f"{where}: this LoRA is for {_family_of_width(width, group.component)} "
                    f"({_WIDTH_NAMES[group.component]} {width}, layer {group.label}) but the model is "
                    f"{config.family} ({_WIDTH_NAMES[group.component]} {model}); load it on a model of its family"
                )


def _layouts(groups: list[Group], shapes: dict[str, Shape], where: str) -> dict[str, tuple[Group, _Layout]]:
    out: dict[str, tuple[Group, _Layout]] = {}
    bad: list[str] = []
    for group in groups:
        try:
            roles = {r: shapes[k] for r, k in group.keys.items() if r != "alpha"}
            if "alpha" in group.keys and math.prod(shapes[group.keys["alpha"]]) != 1:
                raise _Bad(f"alpha must be one number, has shape {shapes[group.keys['alpha']]}")
            out[f"{group.component}:{group.name}"] = (group, _LAYOUTS[_kind(set(roles))](roles))
        except _Bad as exc:
            bad.append(f"{group.label}: {exc}")
    if bad:
        raise LoraError(f"{where}: {len(bad)} layer(s) have malformed entries: {name_some(bad)}")
    return out


def _resolve(layouts: dict[str, tuple[Group, _Layout]], index: ModuleIndex, config: ModelConfig,
             where: str) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    unmapped: list[str] = []
    seen: dict[Target, str] = {}  # target -> the file's name for it
    for key, (group, _) in layouts.items():
        target = index.find(group.component, group.name)
        if target is None:
            unmapped.append(next(iter(group.keys.values())))
        elif target in seen:
            raise LoraError(f"{where}: layers {seen[target]} and {group.label} are both {target}")
        else:
            targets[key] = target
            seen[target] = group.label
    if unmapped:
        raise LoraError(
            f"{where}: {len(unmapped)} entr{'y names a layer' if len(unmapped) == 1 else 'ies name layers'} "
            f"the {config.family} model does not have: {name_some(unmapped)}. Is the LoRA for another model?"
        )
    return targets


def _check_fit(layouts: dict[str, tuple[Group, _Layout]], targets: dict[str, Target], index: ModuleIndex,
               where: str) -> dict[str, Shape]:
    weights: dict[str, Shape] = {}
    bad: list[str] = []
    for key, (group, layout) in layouts.items():
        shape = tuple(index.module(targets[key]).weight.shape)
        if fits(layout.shape, shape):
            weights[key] = shape
        else:
            bad.append(f"{group.label}: delta {list(layout.shape)} vs weight {list(shape)}")
    if bad:
        raise LoraError(f"{where}: {len(bad)} layer(s) do not fit the model's weights: {name_some(bad)}")
    return weights


# diffusers keys the metadata by the pipeline's component names (SDXL: text_encoder_2 too).
_PEFT_COMPONENTS = (UNET, TEXT, TEXT2)


def _peft_alphas(file: TensorFile, where: str) -> Callable[[str, str], tuple[float, bool] | None]:
    """From diffusers' ``lora_adapter_metadata``: ``(component as the file names it, layer)
    -> (alpha, rslora)``."""
    raw = file.metadata.get(_ADAPTER_METADATA)
    if raw is None:
        return lambda component, name: None
    try:
        meta = json.loads(raw)
        patterns = {c: [(re.compile(rf"(.*\.)?({p})$"), float(v))
                        for p, v in (meta.get(f"{c}.alpha_pattern") or {}).items()] for c in _PEFT_COMPONENTS}
        defaults = {c: meta.get(f"{c}.lora_alpha") for c in _PEFT_COMPONENTS}
        defaults = {c: None if v is None else float(v) for c, v in defaults.items()}
    except (ValueError, TypeError, AttributeError, re.error) as exc:
        raise LoraError(f"{where}: the {_ADAPTER_METADATA} header entry is malformed ({exc})") from None
    dora = [c for c in _PEFT_COMPONENTS if meta.get(f"{c}.use_dora")]
    if dora:
        raise LoraError(f"{where}: is a DoRA adapter ({dora[0]}.use_dora), which ldm does not support")

    def alpha(component: str, name: str) -> tuple[float, bool] | None:
        for pattern, value in patterns[component]:  # PEFT's get_pattern_key: first match wins
            if pattern.match(name):
                return value, bool(meta.get(f"{component}.use_rslora"))
        if defaults[component] is None:
            return None
        return defaults[component], bool(meta.get(f"{component}.use_rslora"))

    return alpha


def _scale(alpha: float | None, layout: _Layout, rslora: bool) -> float:
    if alpha is None or layout.rank is None:
        return 1.0
    return alpha / (math.sqrt(layout.rank) if rslora else layout.rank)


def _read(file: TensorFile, key: str, device: torch.device, bad: list[str]) -> torch.Tensor:
    tensor = file.get(key).to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        bad.append(key)
    return tensor


def _check_dtypes(file: TensorFile, where: str) -> None:
    wrong = [f"{k} ({d})" for k, d in file.dtypes.items() if d not in FLOAT_DTYPES and not k.endswith("alpha")]
    if wrong:
        raise LoraError(f"{where}: {len(wrong)} weight(s) are not floating point: {name_some(wrong)}")


def read_lora(path: str | Path, index: ModuleIndex, config: ModelConfig, *, device: torch.device | str = "cpu",
              allow_pickle: bool = False) -> list[Delta]:
    """Every layer delta of a LoRA / LoCon / LoHa / LoKr file, checked against the model.

    Raises FileNotFoundError for a missing file and :class:`LoraError` (a ValueError
    naming the path) for anything that would not apply whole; pickle files (``.pt``,
    ``.ckpt``, ``.bin``) are refused unless ``allow_pickle=True`` and then read with
    ``torch.load(weights_only=True)``.
    """
    if not isinstance(index, ModuleIndex):
        raise TypeError(f"index must be a ModuleIndex, got {type(index).__name__}")
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    file = open_tensor_file(path, allow_pickle=allow_pickle)
    where = str(file.path)
    layouts = _layouts(group_entries(file.keys(), where, key_prefixes(config)), file.shapes, where)
    _check_family(layouts, config, file.metadata, where)
    targets = _resolve(layouts, index, config, where)
    weights = _check_fit(layouts, targets, index, where)
    _check_dtypes(file, where)
    peft_alpha = _peft_alphas(file, where)
    device = torch.device(device)
    deltas: list[Delta] = []
    bad: list[str] = []
    zero_alpha = 0
    for key, (group, layout) in layouts.items():
        tensors = {r: _read(file, k, device, bad) for r, k in group.keys.items() if r != "alpha"}
        rslora = False
        if "alpha" in group.keys:
            alpha: float | None = _read(file, group.keys["alpha"], device, bad).item()
        else:
            alpha, rslora = peft_alpha(group.source, group.name) or (None, False)
        if alpha is not None and not math.isfinite(alpha) and group.keys.get("alpha") not in bad:
            bad.append(f"{_ADAPTER_METADATA} alpha of {group.label}")
        zero_alpha += alpha == 0
        deltas.append(Delta(targets[key], layout.kind, tensors, _scale(alpha, layout, rslora), weights[key]))
    if bad:
        raise LoraError(f"{where}: {len(bad)} tensor(s) hold NaN or infinite values: {name_some(bad)}; "
                        "use an intact copy of the file")
    if zero_alpha:
        logger.warning("%s: %d layer(s) have alpha 0, so they change nothing (as in A1111 and diffusers)",
                       where, zero_alpha)
    return deltas
