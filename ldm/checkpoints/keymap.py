"""Shared machinery for per-component weight key maps (DESIGN.md convention 3).

A *mapping* is a pure callable ``(key, tensor) -> [(key, tensor), ...]``:

- one pair: a rename, possibly with a reshape (returned as a view, never a copy);
- several pairs: a split (e.g. a fused qkv);
- an empty list: the key is dropped *on purpose* (documented by the mapping);
- a key the mapping does not know raises :class:`UnmappedKeyError`. It is never
  passed through under its old name: a stray key of the wrong layout could then
  collide with a real module name and load silently (the VAE's ``encoder.conv_in``
  is spelled the same in both layouts, for instance).

This is the one rule for unknown keys of every map (U-Net, VAE and text encoder;
original and diffusers layouts). The diffusers U-Net and VAE maps are the identity
(diffusers names are ours), so for them every key is its own name and an unknown one
reaches :func:`check_keys` under that same name: reported as unexpected, like the rest.

:func:`apply_mapping` runs a mapping over a whole state dict, collects the
unmapped keys in ``result.unmapped`` and the dropped ones in ``result.dropped``,
and :func:`check_keys` turns the result plus the module's expected shapes into a
:class:`KeyReport` whose ``unexpected`` list includes those unmapped keys, so a
strict loader reports them with the missing and mis-shaped ones in one error.

Maps are built from a :class:`ModuleTable`: an explicit dict from a module's name
in the source layout to its name in the target layout plus a :class:`Kind`, the
explicit per-parameter suffix table of that module type. Looking up a key is a
dict lookup of its module prefix, then of its suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterable
from collections.abc import Mapping as MappingABC
from typing import Any

import torch

Tensor = torch.Tensor
Mapping = Callable[[str, Tensor], list[tuple[str, Tensor]]]
Reshape = Callable[[Tensor], Tensor]


class UnmappedKeyError(KeyError):
    """Raised by a mapping for a key it does not know (reported as unexpected)."""

    def __init__(self, key: str, where: str = "") -> None:
        super().__init__(key)
        self.key = key
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: no mapping for key {self.key!r}" if self.where else repr(self.key)


# --- tensor reshapes --------------------------------------------------------


def conv1x1_to_linear(t: Tensor) -> Tensor:
    """[out, in, 1, 1] (1x1 conv) -> [out, in] (linear), as a view.

    A tensor that is already 2-D passes unchanged (some re-exported checkpoints
    store it so); any other shape is left alone for the loader to report.
    """
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t[:, :, 0, 0]
    return t


def linear_to_conv1x1(t: Tensor) -> Tensor:
    """[out, in] (linear) -> [out, in, 1, 1] (1x1 conv), as a view."""
    if t.ndim == 2:
        return t[:, :, None, None]
    return t


_INVERSE_RESHAPE: dict[Reshape, Reshape] = {
    conv1x1_to_linear: linear_to_conv1x1,
    linear_to_conv1x1: conv1x1_to_linear,
}


# --- explicit tables --------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How one module type's parameter names translate: source suffix -> target suffix.

    ``reshapes`` holds, by *source* suffix, the function applied to the tensor.
    """

    name: str
    suffixes: MappingABC[str, str]
    reshapes: MappingABC[str, Reshape] = field(default_factory=dict)

    def inverse(self) -> "Kind":
        inv = {dst: src for src, dst in self.suffixes.items()}
        if len(inv) != len(self.suffixes):
            raise ValueError(f"kind {self.name}: suffix table is not one-to-one")
        reshapes = {self.suffixes[s]: _INVERSE_RESHAPE[f] for s, f in self.reshapes.items()}
        return Kind(self.name, inv, reshapes)


def params(*modules: str, bias: bool = True) -> list[str]:
    """Parameter suffixes of modules holding ``weight`` (and ``bias``)."""
    names = ("weight", "bias") if bias else ("weight",)
    return [f"{m}.{n}" if m else n for m in modules for n in names]


def same_names(name: str, suffixes: Iterable[str]) -> Kind:
    """A Kind whose parameters keep their names."""
    return Kind(name, {s: s for s in suffixes})


PLAIN = same_names("plain", params(""))  # a conv, linear or norm: weight + bias


class ModuleTable:
    """Source module name -> (target module name, Kind); builds the mapping callables."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.entries: dict[str, tuple[str, Kind]] = {}

    def add(self, source: str, target: str, kind: Kind = PLAIN) -> None:
        if source in self.entries:
            raise ValueError(f"{self.where}: module {source!r} mapped twice")
        self.entries[source] = (target, kind)

    def inverse(self, where: str) -> "ModuleTable":
        inv = ModuleTable(where)
        for source, (target, kind) in self.entries.items():
            inv.add(target, source, kind.inverse())
        return inv

    def mapping(self) -> Mapping:
        """The ``(key, tensor) -> [(key, tensor)]`` callable for this table."""
        entries = dict(self.entries)
        _check_prefix_free(entries, self.where)
        where = self.where

        def mapping(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
            start = 0
            while True:
                dot = key.find(".", start)
                if dot < 0:
                    raise UnmappedKeyError(key, where)
                hit = entries.get(key[:dot])
                if hit is not None:
                    break
                start = dot + 1
            target, kind = hit
            suffix = key[dot + 1 :]
            new_suffix = kind.suffixes.get(suffix)
            if new_suffix is None:
                raise UnmappedKeyError(key, where)
            reshape = kind.reshapes.get(suffix)
            return [(f"{target}.{new_suffix}", reshape(tensor) if reshape else tensor)]

        return mapping


def _check_prefix_free(entries: MappingABC[str, Any], where: str) -> None:
    """No module name may be a dotted prefix of another: lookups must be unambiguous."""
    names = sorted(entries)
    for a, b in zip(names, names[1:]):
        if b.startswith(a + "."):
            raise ValueError(f"{where}: module {a!r} is a prefix of {b!r}")


# --- whole state dicts ------------------------------------------------------


class MappedStateDict(dict):
    """The mapped state dict, plus the source keys that were not mapped.

    ``unmapped``: keys the mapping raised :class:`UnmappedKeyError` for (unexpected).
    ``dropped``: keys the mapping dropped on purpose (returned ``[]``).
    """

    unmapped: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()


def _as_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return torch.empty(tuple(value), device="meta")


def apply_mapping(source: MappingABC[str, Any], mapping: Mapping) -> MappedStateDict:
    """Run ``mapping`` over every key of a state dict (tensors, meta tensors included)
    or of a ``{key: shape}`` dict, whose result then holds shapes (tuples) too.

    Tensors are not copied: renamed ones are the same objects, reshaped ones views.
    Two source keys mapped to one target key raise ``ValueError``.
    """
    shapes_only = bool(source) and not all(isinstance(v, Tensor) for v in source.values())
    out = MappedStateDict()
    unmapped: list[str] = []
    dropped: list[str] = []
    origin: dict[str, str] = {}
    for key, value in source.items():
        try:
            pairs = mapping(key, _as_tensor(value))
        except UnmappedKeyError:
            unmapped.append(key)
            continue
        if not pairs:
            dropped.append(key)
        for new_key, tensor in pairs:
            if new_key in origin:
                raise ValueError(
                    f"keys {origin[new_key]!r} and {key!r} both map to {new_key!r}"
                )
            origin[new_key] = key
            out[new_key] = tuple(tensor.shape) if shapes_only else tensor
    out.unmapped = tuple(unmapped)
    out.dropped = tuple(dropped)
    return out


def add_prefix(state_dict: MappingABC[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in state_dict.items()}


# --- reading shapes -----------------------------------------------------------


def shape_of(shapes: MappingABC[str, Any], key: str, what: str) -> tuple[int, ...]:
    """The shape of ``key`` (values are shapes or tensors); ValueError naming ``what``
    (e.g. "Stable Diffusion U-Net") when the key is absent."""
    if key not in shapes:
        raise ValueError(f"not a {what} in the original layout: no key {key!r}")
    return _shape(shapes[key])


def indices(keys: Iterable[str], prefix: str) -> set[int]:
    """The integers that follow ``prefix`` in the keys, e.g. block numbers."""
    n = len(prefix)
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[n:].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


# --- reporting --------------------------------------------------------------


@dataclass(frozen=True)
class KeyReport:
    """Result of comparing a (mapped) state dict with a module's expected keys."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()  # key, expected, got

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self, what: str = "state dict", limit: int = 5) -> str:
        lines = [f"{what} does not match the model:"]
        for label, items in (
            ("missing", list(self.missing)),
            ("unexpected", list(self.unexpected)),
            (
                "mis-shaped",
                [f"{k} (expected {list(e)}, got {list(g)})" for k, e, g in self.mismatched],
            ),
        ):
            if items:
                more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
                lines.append(f"  {len(items)} {label}: {', '.join(items[:limit])}{more}")
        return "\n".join(lines)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def check_keys(
    mapped: MappingABC[str, Any], expected: MappingABC[str, Any]
) -> KeyReport:
    """Compare a mapped state dict (tensors or shapes) with the expected one
    (e.g. ``module.state_dict()`` on meta). The source keys a mapping could not
    map (``mapped.unmapped``) are reported as unexpected under their source name."""
    unexpected = list(getattr(mapped, "unmapped", ()))
    unexpected += [k for k in mapped if k not in expected]
    missing = [k for k in expected if k not in mapped]
    mismatched = [
        (k, _shape(expected[k]), _shape(mapped[k]))
        for k in expected
        if k in mapped and _shape(expected[k]) != _shape(mapped[k])
    ]
    return KeyReport(tuple(missing), tuple(unexpected), tuple(mismatched))
