"""Which layer of the model a LoRA file's entry belongs to.

LoRA files spell a layer's name in several ways:

- kohya-ss / AUTOMATIC1111: ``lora_unet_<name>`` and ``lora_te_<name>``, the module's
  dotted name with every ``.`` replaced by ``_``. That is ambiguous (``to_out_0`` is
  ``to_out.0``, ``to_q`` is not ``to.q``), so, as kohya-ss (``networks/lora.py`` builds the
  names from the real modules) and ComfyUI (``comfy/lora.py``) do, names are looked up in
  a table built from the real module names of the loaded model, never parsed.
  U-Net names come in diffusers' layout (``down_blocks_0_attentions_0_...``) or the
  original CompVis layout (``input_blocks_1_1_...``, ``middle_block_1_...``,
  ``time_embed_0``); the latter translate through the table of
  :mod:`ldm.checkpoints.keymap_unet`, generated from the config.
- diffusers / PEFT: ``unet.<dotted name>`` and ``text_encoder.<dotted name>``; their
  dots are replaced the same way and looked up in the same table.

Text-encoder names are accepted with or without the ``text_model`` level
(transformers >= 5 drops it from ``CLIPTextModel``; files written before keep it, and
``CLIPTextModelWithProjection``, SDXL's second encoder, still has it).

What a text-encoder prefix means depends on the model (:func:`key_prefixes`):

- SD 1.x / 2.x (one encoder): ``lora_te_`` / ``text_encoder.``.
- SDXL base: ``lora_te1_`` / ``text_encoder.`` is CLIP ViT-L (``text_encoder``),
  ``lora_te2_`` / ``text_encoder_2.`` OpenCLIP ViT-bigG (``text_encoder_2``), as
  kohya-ss's ``sdxl_train_network.py`` and diffusers' ``StableDiffusionXLPipeline`` name them.
- SDXL refiner: its one encoder is bigG, ldm's ``text_encoder``; ``lora_te2_`` /
  ``text_encoder_2.`` apply to it, as diffusers does (its refiner folder and
  ``StableDiffusionXLImg2ImgPipeline`` keep bigG as ``text_encoder_2``, which
  ``load_lora_weights`` fills from those keys). ``lora_te1_`` / ``text_encoder.`` (CLIP-L,
  which the refiner does not have) and ``lora_te_`` are refused. AUTOMATIC1111 applies
  no text-encoder key on the refiner (its ``lora_te2_`` names point at the base's second
  embedder, ``1_model_transformer_...``; the refiner's bigG is embedder 0): it reports
  them as unmatched and applies the U-Net part alone, which ldm never does half-way.

:func:`group_entries` splits each key into its layer and its role in that layer
(``lora_down.weight``, ``lora_A.weight``, ``lora.down.weight``, ``hada_w1_a``, ``lokr_w2``,
``alpha``, ...). Keys of adapter types ldm does not apply (DoRA, OFT, (IA)^3, GLoRA, norm
and bias patches) and keys of other model families (SDXL's ``lora_te1_``/``lora_te2_``
on SD 1.x/2.x, ``lora_te_`` on SDXL, SD3/Flux transformers) are refused by name, never skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..checkpoints.files import CheckpointError
from ..checkpoints.keymap_unet import unet_table
from ..checkpoints.loading import name_some
from ..config import ModelConfig, UNetConfig

UNET, TEXT, TEXT2 = "unet", "text_encoder", "text_encoder_2"
COMPONENTS = (UNET, TEXT, TEXT2)
TEXT_COMPONENTS = (TEXT, TEXT2)
# The layer types a LoRA-family delta is added to: the weight of a linear or a 2-D conv.
PATCHABLE = (nn.Linear, nn.Conv2d)
_TEXT_LEVEL = "text_model"


class LoraError(CheckpointError):
    """A LoRA-family file that cannot be applied to this model; names the path and entries."""


@dataclass(frozen=True)
class Target:
    """One patchable layer: its component and its dotted module name there."""

    component: str
    module: str

    def __str__(self) -> str:
        return f"{self.component}.{self.module}"


def flat(name: str) -> str:
    """A module name as kohya-ss spells it: every ``.`` replaced by ``_``."""
    return name.replace(".", "_")


class ModuleIndex:
    """The patchable layers of a U-Net and its text encoders (SDXL base: two), by every
    name a file may use."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, unet_config: UNetConfig,
                 text_encoder_2: nn.Module | None = None) -> None:
        if not isinstance(unet_config, UNetConfig):
            raise TypeError(f"unet_config must be a UNetConfig, got {type(unet_config).__name__}")
        self.modules: dict[str, dict[str, nn.Module]] = {
            UNET: _patchable(unet, "unet"),
            TEXT: _patchable(text_encoder, "text_encoder"),
        }
        if text_encoder_2 is not None:
            self.modules[TEXT2] = _patchable(text_encoder_2, "text_encoder_2")
        self._names: dict[str, dict[str, str]] = {component: {} for component in self.modules}
        for component, modules in self.modules.items():
            for name in modules:
                self._add(component, flat(name), name)
        for original, internal in _original_unet_names(unet_config).items():
            if internal in self.modules[UNET]:
                self._add(UNET, flat(original), internal)
        for component in TEXT_COMPONENTS:
            for name in self.modules.get(component, {}):
                if name.startswith(_TEXT_LEVEL + "."):
                    self._add(component, flat(name[len(_TEXT_LEVEL) + 1:]), name)

    def _add(self, component: str, key: str, name: str) -> None:
        table = self._names[component]
        if table.setdefault(key, name) != name:
            # Two real modules with one underscore spelling: a name would be a guess.
            raise ValueError(f"{component}: modules {table[key]!r} and {name!r} are both spelled {key!r}")

    def find(self, component: str, name: str) -> Target | None:
        """The layer a file's module name (underscored or dotted) denotes, or None."""
        if component not in self._names:
            raise ValueError(f"unknown component {component!r}; valid components: {tuple(self._names)}")
        module = self._names[component].get(flat(name))
        return Target(component, module) if module is not None else None

    def module(self, target: Target) -> nn.Module:
        return self.modules[target.component][target.module]


def _patchable(model: nn.Module, what: str) -> dict[str, nn.Module]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(model).__name__}")
    return {name: m for name, m in model.named_modules() if isinstance(m, PATCHABLE)}


def _original_unet_names(config: UNetConfig) -> dict[str, str]:
    """Original-layout module name -> internal module name, for every module with a
    weight: the key map's parameter table, read one module level up."""
    names: dict[str, str] = {}
    for source, (target, kind) in unet_table(config).entries.items():
        for src_suffix, dst_suffix in kind.suffixes.items():
            if src_suffix.endswith("weight") and dst_suffix.endswith("weight"):
                names[_module_of(source, src_suffix)] = _module_of(target, dst_suffix)
    return names


def _module_of(prefix: str, param_suffix: str) -> str:
    """``("input_blocks.1.0", "in_layers.2.weight")`` -> ``"input_blocks.1.0.in_layers.2"``."""
    sub = param_suffix.rpartition(".")[0]
    return f"{prefix}.{sub}" if sub else prefix


# --- key names -----------------------------------------------------------------------

LORA = ("down", "up", "mid")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# parameter suffix -> role, for every spelling in circulation
_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "lora_A.weight": "down", "lora_B.weight": "up",
    "lora.down.weight": "down", "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down", "lora_linear_layer.up.weight": "up",
    "alpha": "alpha", **{r: r for r in LOHA + LOKR},
}
# Entries of adapter types ldm does not apply: refused by name, never skipped.
_UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)", "lora_magnitude_vector": "DoRA (weight-decomposed LoRA)",
    "lora_B.bias": "LoRA bias terms", "lora_up.bias": "LoRA bias terms", "diff_b": "bias patches",
    "bias": "bias patches", "diff": "LyCORIS full (whole-weight difference)",
    "w_norm": "LyCORIS norm-layer patches", "b_norm": "LyCORIS norm-layer patches",
    "oft_blocks": "OFT/BOFT", "oft_diag": "OFT/BOFT", "oft_R": "OFT/BOFT", "rescale": "OFT/BOFT",
    "on_input": "(IA)^3", "weight": "(IA)^3",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
}
_DOTTED_SUFFIXES = sorted((s for s in {**_ROLES, **_UNSUPPORTED} if s != "weight"), key=len, reverse=True)
# Keys of diffusers files older than the ``unet.`` prefix start with the module name.
_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")
_SDXL = "SDXL (two text encoders)"
_ONE_ENCODER = "SD 1.x/2.x (one text encoder)"
_NOT_SD = {
    "lora_te3_": "SD3", "text_encoder_3.": "SD3",
    "lora_transformer_": "a transformer model (SD3, Flux)", "transformer.": "a transformer model (SD3, Flux)",
}
# Old diffusers attention processors: ``attn1.processor.to_q_lora.down.weight``.
_PROCESSOR = re.compile(r"^(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_UNET_PROCESSOR_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSOR_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass(frozen=True)
class KeyPrefixes:
    """What the component prefixes of a file's keys mean on one model (see the module docs)."""

    kohya: dict[str, str]  # "lora_unet_" -> component
    dotted: dict[str, str]  # "unet." -> component
    refused: dict[str, str]  # prefix -> the model family its keys are for
    model: str  # the model, for messages: "not <model>"


_SOURCE = {"lora_unet_": UNET, "lora_te_": TEXT, "lora_te1_": TEXT, "lora_te2_": TEXT2}


def key_prefixes(config: ModelConfig) -> KeyPrefixes:
    """The prefixes a LoRA file for ``config``'s model may use, and those refused on it."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
    if config.text_2 is not None:
        return KeyPrefixes(
            {"lora_unet_": UNET, "lora_te1_": TEXT, "lora_te2_": TEXT2},
            {"unet.": UNET, "text_encoder.": TEXT, "text_encoder_2.": TEXT2},
            {"lora_te_": _ONE_ENCODER, **_NOT_SD},
            f"an SDXL base model ({config.family}: lora_te1_/text_encoder. is CLIP ViT-L, "
            "lora_te2_/text_encoder_2. OpenCLIP ViT-bigG)",
        )
    if config.unet.addition_embed_type == "text_time":
        clip_l = "SDXL base (its CLIP ViT-L text encoder, which the refiner does not have)"
        return KeyPrefixes(
            {"lora_unet_": UNET, "lora_te2_": TEXT}, {"unet.": UNET, "text_encoder_2.": TEXT},
            {"lora_te1_": clip_l, "text_encoder.": clip_l, "lora_te_": _ONE_ENCODER, **_NOT_SD},
            f"an SDXL refiner ({config.family}: one text encoder, OpenCLIP ViT-bigG, "
            "named lora_te2_/text_encoder_2.)",
        )
    return KeyPrefixes(
        {"lora_unet_": UNET, "lora_te_": TEXT}, {"unet.": UNET, "text_encoder.": TEXT},
        {"lora_te1_": _SDXL, "lora_te2_": _SDXL, "text_encoder_2.": _SDXL, **_NOT_SD},
        "a Stable Diffusion 1.x/2.x model",
    )


@dataclass
class Group:
    """The entries of one layer in the file: role -> file key."""

    component: str  # the model's component the layer is in
    source: str  # the component the file names (PEFT metadata is keyed by it)
    name: str  # the layer's name as the file spells it, without the component prefix
    label: str  # ... with it, for messages
    keys: dict[str, str]


def _split(key: str, prefixes: KeyPrefixes) -> tuple[str, str, str, str] | str:
    """``(component, prefix, layer name, suffix)``, or why the key is not a LoRA entry."""
    for prefix, family in prefixes.refused.items():
        if key.startswith(prefix):
            return f"family:{family}"
    for prefix, component in prefixes.kohya.items():
        if key.startswith(prefix):
            name, _, suffix = key[len(prefix):].partition(".")
            return component, prefix, name, suffix
    component, prefix = UNET, ""
    for start, comp in prefixes.dotted.items():
        if key.startswith(start):
            component, prefix = comp, start
            break
    else:
        if not key.startswith(_BARE_UNET):
            return "unknown"
    rest = key[len(prefix):]
    match = _PROCESSOR.match(rest)
    if match:
        parent, proj, role = match.groups()
        names = _UNET_PROCESSOR_NAMES if component == UNET else _TEXT_PROCESSOR_NAMES
        return component, prefix, f"{parent}.{names[proj]}", f"lora.{role}.weight"
    for suffix in _DOTTED_SUFFIXES:
        if rest.endswith("." + suffix):
            return component, prefix, rest[: -len(suffix) - 1], suffix
    return "unknown"


def _source(prefix: str) -> str:
    """The component a prefix names in the file (``text_encoder_2.`` -> ``text_encoder_2``)."""
    return _SOURCE.get(prefix) or prefix.removesuffix(".") or UNET


def group_entries(keys: Iterable[str], where: str, prefixes: KeyPrefixes) -> list[Group]:
    """A file's keys grouped by layer, each key given its role; one :class:`LoraError` for
    keys of another model family, of unsupported adapter types, or of no known kind."""
    if not isinstance(prefixes, KeyPrefixes):
        raise TypeError(f"prefixes must be KeyPrefixes (key_prefixes(config)), got {type(prefixes).__name__}")
    groups: dict[tuple[str, str], Group] = {}
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = {}
    families: dict[str, list[str]] = {}
    for key in keys:
        split = _split(key, prefixes)
        if isinstance(split, str):
            if split.startswith("family:"):
                families.setdefault(split.removeprefix("family:"), []).append(key)
            else:
                unknown.append(key)
            continue
        component, prefix, name, suffix = split
        if suffix in _UNSUPPORTED:
            unsupported.setdefault(_UNSUPPORTED[suffix], []).append(key)
        elif suffix in _ROLES:
            group = groups.setdefault((component, name), Group(component, _source(prefix), name, prefix + name, {}))
            role = _ROLES[suffix]
            if role in group.keys:
                raise LoraError(f"{where}: layer {group.label} has two {role} entries: {group.keys[role]}, {key}")
            group.keys[role] = key
        else:
            unknown.append(key)
    if families:
        found = [key for family in sorted(families) for key in families[family]]
        raise LoraError(f"{where}: this LoRA is for {' / '.join(sorted(families))}, not {prefixes.model} "
                        f"({name_some(found)}); load it on a model of its family")
    if unsupported:
        kinds = "; ".join(f"{kind}: {name_some(found)}" for kind, found in unsupported.items())
        raise LoraError(f"{where}: uses adapter types ldm does not support ({kinds}); nothing was applied")
    if unknown:
        raise LoraError(
            f"{where}: {len(unknown)} entr{'y is' if len(unknown) == 1 else 'ies are'} not LoRA, LoHa or LoKr "
            f"weights: {name_some(unknown)}. Is this a LoRA file (kohya-ss "
            f"{'*/'.join(prefixes.kohya)}*, diffusers/PEFT {'*/'.join(prefixes.dotted)}*)?"
        )
    if not groups:
        raise LoraError(f"{where}: holds no LoRA weights (no tensors)")
    return list(groups.values())
