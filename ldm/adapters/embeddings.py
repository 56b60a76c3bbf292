"""Textual-inversion embeddings: new prompt words, loaded the way AUTOMATIC1111's web UI does.

An embedding file holds ``n`` learned vectors of the text encoder's input width
(768 for SD1, 1024 for SD2). Its trigger word (by default the file's stem, as in
A1111) written in a prompt or a negative prompt is replaced by those ``n`` vectors.
An SDXL file holds ``n`` vectors for each of SDXL's encoders: ``clip_l`` (CLIP ViT-L,
768 wide) and ``clip_g`` (OpenCLIP ViT-bigG, 1280 wide); each encoder gets its own
(A1111's ``textual_inversion_key`` per embedder; diffusers' documented
``load_textual_inversion(state_dict["clip_g"], text_encoder=pipe.text_encoder_2, ...)``
and the same with ``clip_l`` for ``text_encoder``). The SDXL refiner, whose one encoder
is bigG, takes ``clip_g`` (as diffusers can load it into the refiner's ``text_encoder_2``;
A1111 skips SDXL embeddings on the refiner, their total width 2048 not being its 1280),
and a single 1280-wide tensor. A one-encoder embedding on SDXL base, and an SDXL one
on SD1/SD2, are refused with both widths named.

Mechanism, as A1111's ``EmbeddingDatabase`` (which matches on token ids): the
vectors become extra rows of the text encoder's token-embedding matrix (of each
encoder's, at the same ids), at ids
from the original vocabulary size up, and :meth:`EmbeddingTable.units` turns
each occurrence of a trigger's BPE id sequence into those reserved ids, longest
trigger first (``find_embedding_at_position``). Unloading cuts the matrix back
to its original rows, bit for bit.

Files read (A1111's ``create_embedding_from_data``):

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, width)}, "name": ..., "step": ...}``;
- a file with exactly one tensor: diffusers ``learned_embeds.bin`` /
  ``.safetensors`` (``{token: (width,) or (n, width)}``) and the ``.safetensors``
  files of A1111-style trainers (``{"emb_params": (n, width)}``);
- SDXL files: ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` (A1111, kohya-ss ``sdxl_train_textual_inversion.py``).

The pooled embedding SDXL's U-Net also takes is read at the end token, whatever ids an
embedding uses (transformers' rule for configs with the real end-token id; A1111 and SGM
pool at the end token as well, their placeholders being id 0). diffusers' SDXL folders
carry the pre-2023 ``eos_token_id=2``, with which transformers pools at the largest id:
the embedding's own, added token when the prompt has one.

Pickle files (``.pt``, ``.bin``) can run code when unpickled: they are refused
unless ``allow_pickle=True``, and then read with ``torch.load(weights_only=True)``.

Directories (A1111's ``embeddings/`` folder): :attr:`EmbeddingTable.dirs`, by
default from ``LDM_EMBEDDING_DIR`` (``os.pathsep``-separated). Instead of
loading every file at start-up, a file is loaded the first time a prompt
contains its stem; a prompt naming a file that cannot be loaded is an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.files import (
    FLOAT_DTYPES, SAFETENSORS_SUFFIX, CheckpointError, check_regular_file,
    open_tensor_file, pickle_refusal,
)
from ..dtypes import dtype_name
from ..models.text import TextEncoder
from ..models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "EMBEDDING_DIR_ENV", "EmbeddingError", "EmbeddingTable", "embedding_dirs_from_env",
    "embedding_hash", "find_embeddings", "read_embedding",
]

EMBEDDING_DIR_ENV = "LDM_EMBEDDING_DIR"
EMBEDDING_SUFFIXES = (SAFETENSORS_SUFFIX, ".pt", ".bin")
# Text-encoder widths of the known families, to say which model an embedding is for.
_FAMILY_OF_WIDTH = {768: "SD1.x, CLIP ViT-L", 1024: "SD2.x, OpenCLIP ViT-H", 1280: "SDXL, OpenCLIP ViT-bigG"}
# An embedding is kilobytes; a pickle this large is a checkpoint or a LoRA, and is
# refused before it is unpickled into memory.
_MAX_PICKLE_BYTES = 64 * 1024 * 1024
# Embedding layouts have one or two tensors; a header with many more is another kind of file.
_MAX_KEYS = 16
# diffusers' default file name: its stem says nothing, the token is the file's key.
_DIFFUSERS_STEM = "learned_embeds"
_A1111_KEY = "string_to_param"
CLIP_L, CLIP_G = "clip_l", "clip_g"
_SDXL_KEYS = (CLIP_L, CLIP_G)
_ENCODER_NAMES = {CLIP_L: "CLIP ViT-L", CLIP_G: "OpenCLIP ViT-bigG"}


class EmbeddingError(CheckpointError):
    """An embedding file that cannot be used: unknown layout, wrong width, NaN/inf, clashing token."""


def embedding_hash(path: str | Path) -> str:
    """A1111's short hash of an embedding (``TI hashes`` in infotexts): the first 12
    hex digits of the SHA-256 of the whole file (``Embedding.set_hash``)."""
    path = Path(path)
    check_regular_file(path, "textual-inversion embedding file")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def embedding_dirs_from_env(environ: Mapping[str, str] | None = None) -> list[Path]:
    """The folders in ``LDM_EMBEDDING_DIR`` (``os.pathsep``-separated; empty entries ignored)."""
    value = (os.environ if environ is None else environ).get(EMBEDDING_DIR_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def _check_dirs(dirs: Iterable[str | Path]) -> list[Path]:
    if isinstance(dirs, (str, Path)) or not isinstance(dirs, Iterable):
        raise TypeError(f"embedding dirs must be a list of paths, got {dirs!r:.80}")
    out = []
    for d in dirs:
        if not isinstance(d, (str, Path)):
            raise TypeError(f"embedding dirs must be paths, got {d!r:.80}")
        if not Path(d).is_dir():
            raise FileNotFoundError(f"embedding folder {d} does not exist or is not a folder")
        out.append(Path(d))
    return out


def _env_dirs() -> list[Path]:
    """``LDM_EMBEDDING_DIR``'s folders that exist; a stale entry is logged, not fatal,
    since the variable outlives the folders it names."""
    found = embedding_dirs_from_env()
    for d in found:
        if not d.is_dir():
            logger.warning("%s names %s, which is not a folder; ignoring it", EMBEDDING_DIR_ENV, d)
    return [d for d in found if d.is_dir()]


def find_embeddings(dirs: Iterable[str | Path]) -> dict[str, Path]:
    """``{token: file}`` for the embedding files under ``dirs`` (subfolders included,
    as A1111 walks them), the token being the file's stem.

    A stem found twice keeps the first: earlier folders win, and in one folder a
    ``.safetensors`` file wins over a pickle; each such shadowing is logged.
    """
    found: dict[str, Path] = {}
    for folder in _check_dirs(dirs):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EMBEDDING_SUFFIXES and p.is_file())
        files.sort(key=lambda p: p.suffix.lower() != SAFETENSORS_SUFFIX)  # stable: safetensors first
        for path in files:
            if path.stem in found:
                logger.warning("embedding %s is shadowed by %s (same name %r)", path, found[path.stem], path.stem)
                continue
            found[path.stem] = path
    return found


def _load_data(path: Path, allow_pickle: bool) -> object:
    """The file's content: a dict of tensors (safetensors), or whatever ``torch.load``
    with ``weights_only=True`` returns."""
    check_regular_file(path, "textual-inversion embedding file")
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        tensors = open_tensor_file(path)
        if len(tensors.keys()) > _MAX_KEYS:  # a checkpoint or a LoRA: refused from the header alone
            raise _unknown_layout(path, tensors.keys())
        return {k: tensors.get(k) for k in tensors.keys()}
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"{path}: unknown embedding file type {suffix!r}; expected one of "
                             f"{list(EMBEDDING_SUFFIXES)}")
    if not allow_pickle:
        raise pickle_refusal(path)
    size = path.stat().st_size
    if size > _MAX_PICKLE_BYTES:
        raise EmbeddingError(f"{path}: {size} bytes is far too large for an embedding (a checkpoint or a LoRA?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise EmbeddingError(f"{path}: could not load with torch.load(weights_only=True) "
                             f"({type(exc).__name__}: {first}); files that need full pickle are not supported") from None


def _unknown_layout(path: Path, keys: Iterable[object]) -> EmbeddingError:
    keys = sorted(map(str, keys))
    shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
    return EmbeddingError(
        f"{path}: not a textual-inversion embedding. Expected '{_A1111_KEY}' (A1111), a single "
        f"tensor (diffusers learned_embeds {{token: tensor}}, 'emb_params'), or 'clip_l' + 'clip_g' "
        f"(SDXL); found keys: {shown or 'none'}"
    )


def _from_a1111(data: dict, path: Path) -> torch.Tensor:
    params = data[_A1111_KEY]
    if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), torch.Tensor):
        found = sorted(map(str, params)) if isinstance(params, dict) else type(params).__name__
        raise EmbeddingError(f"{path}: '{_A1111_KEY}' must map one name to one tensor, found {found}")
    extra = sorted(str(k) for k, v in data.items() if k != _A1111_KEY and isinstance(v, torch.Tensor))
    if extra:  # weights this format does not have: refused rather than ignored
        raise EmbeddingError(f"{path}: an A1111 embedding with unexpected tensors besides "
                             f"'{_A1111_KEY}': {extra}")
    return next(iter(params.values()))


Vectors = torch.Tensor | dict[str, torch.Tensor]


def _from_sdxl(data: dict, path: Path) -> dict[str, torch.Tensor]:
    found = sorted(map(str, data))
    if set(found) != set(_SDXL_KEYS) or not all(isinstance(data[k], torch.Tensor) for k in _SDXL_KEYS):
        raise EmbeddingError(f"{path}: an SDXL embedding must hold exactly two tensors, 'clip_l' and 'clip_g'; "
                             f"found keys {found}")
    parts = {k: _as_matrix(data[k], f"{path} ({k})") for k in _SDXL_KEYS}
    counts = {k: v.shape[0] for k, v in parts.items()}
    if len(set(counts.values())) != 1:
        raise EmbeddingError(f"{path}: 'clip_l' has {counts[CLIP_L]} vectors but 'clip_g' has {counts[CLIP_G]}; "
                             "each token needs one of each")
    return parts


def read_embedding(path: str | Path, *, allow_pickle: bool = False) -> tuple[Vectors, str | None]:
    """``(vectors, key)``: the file's vectors, ``(n, width)`` as stored (not yet
    checked against a model) or, for an SDXL file, ``{"clip_l": (n, 768), "clip_g":
    (n, 1280)}``, and the token a diffusers file stores them under (``None`` for A1111
    and SDXL files). Raises :class:`EmbeddingError` naming the file and the keys found
    when the layout is unknown."""
    path = _in_folder(Path(path))
    data = _load_data(path, allow_pickle)
    if isinstance(data, torch.Tensor):  # a bare tensor saved with torch.save
        return _as_matrix(data, path), None
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"{path}: expected a dict of tensors, found "
                             f"{'an empty dict' if isinstance(data, dict) else type(data).__name__}")
    if _A1111_KEY in data:
        return _as_matrix(_from_a1111(data, path), path), None
    if any(k in data for k in _SDXL_KEYS):
        return _from_sdxl(data, path), None
    if len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        (key, value), = data.items()
        return _as_matrix(value, path), str(key)
    raise _unknown_layout(path, data)


def _in_folder(path: Path) -> Path:
    """A diffusers textual-inversion folder stands for its ``learned_embeds`` file."""
    if not path.is_dir():
        return path
    for name in (f"{_DIFFUSERS_STEM}{SAFETENSORS_SUFFIX}", f"{_DIFFUSERS_STEM}.bin"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} is a folder without {_DIFFUSERS_STEM}.safetensors or "
                            f"{_DIFFUSERS_STEM}.bin; give the embedding file itself")


def _as_matrix(vectors: torch.Tensor, where: object) -> torch.Tensor:
    """``(n, width)`` float32 on the CPU: a single ``(width,)`` vector is ``n = 1``."""
    if dtype_name(vectors.dtype) not in FLOAT_DTYPES:
        raise EmbeddingError(f"{where}: embedding vectors must be floating point, found {vectors.dtype}")
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise EmbeddingError(f"{where}: embedding vectors must have shape (width,) or (n, width) with "
                             f"n >= 1, found {tuple(vectors.shape)}")
    return vectors.detach().to("cpu", torch.float32)


def _width_name(width: int) -> str:
    family = _FAMILY_OF_WIDTH.get(width)
    return f"{width} wide ({family})" if family else f"{width} wide"


@dataclass(frozen=True)
class _Entry:
    token: str
    trigger: tuple[int, ...]  # the token's BPE ids, as prompts are tokenized
    vectors: tuple[torch.Tensor, ...]  # per text encoder: (n, width) float32, CPU
    path: Path | None
    hash: str | None  # embedding_hash(path)


def _as_tuple(value: object, kind: type, name: str) -> tuple:
    values = (value,) if isinstance(value, kind) else value
    if not isinstance(values, Sequence) or not 1 <= len(values) <= 2 or not all(isinstance(v, kind) for v in values):
        raise TypeError(f"{name} must be a {kind.__name__} or a sequence of one or two, got {value!r:.80}")
    return tuple(values)


def _sdxl_parts(encoders: tuple[TextEncoder, ...]) -> tuple[str | None, ...]:
    """The SDXL-file tensor each encoder takes: SDXL base's two encoders ``clip_l`` and
    ``clip_g``, the refiner's bigG (the one encoder with a pooled projection) ``clip_g``;
    None for SD1/SD2's encoder, which takes one-encoder files only."""
    if len(encoders) == 2:
        return _SDXL_KEYS
    return (CLIP_G,) if encoders[0].config.projection_dim else (None,)


class EmbeddingTable:
    """The embeddings loaded into a model's text encoders, and the folders searched for more.

    >>> table = EmbeddingTable(encoder, tokenizer)          # SDXL: pipe.text_encoders, pipe.tokenizers
    >>> table.load("embeddings/easynegative.safetensors")   # trigger word 'easynegative'
    'easynegative'
    >>> table.units(tokenizer.encode("a cat, easynegative"))  # [[320], [2368], [267], [49408]]

    Loading changes each encoder's token-embedding matrix in place (extra rows, at the
    same ids in every encoder); :meth:`unload` restores them. Triggers are matched on the
    first tokenizer's ids (SDXL's two tokenize alike and differ only in padding).
    ``allow_pickle`` applies to files found in :attr:`dirs`.
    """

    def __init__(self, encoder: TextEncoder | Sequence[TextEncoder], tokenizer: Tokenizer | Sequence[Tokenizer], *,
                 dirs: Iterable[str | Path] | None = None, allow_pickle: bool = False) -> None:
        self.encoders = _as_tuple(encoder, TextEncoder, "encoder")
        self.tokenizers = _as_tuple(tokenizer, Tokenizer, "tokenizer")
        if len(self.encoders) != len(self.tokenizers):
            raise ValueError(f"{len(self.encoders)} text encoders but {len(self.tokenizers)} tokenizers: one each")
        self.encoder, self.tokenizer = self.encoders[0], self.tokenizers[0]
        self.allow_pickle = allow_pickle
        self._parts = _sdxl_parts(self.encoders)
        vocabs = {self._layer(i).num_embeddings for i in range(len(self.encoders))}
        if len(vocabs) != 1:
            raise ValueError(f"the text encoders have vocabularies of {sorted(vocabs)} tokens; an embedding's "
                             "ids must mean the same token in each")
        self._vocab = vocabs.pop()  # ids from here on are reserved for embeddings
        self._entries: dict[str, _Entry] = {}
        self._ids: dict[str, list[int]] = {}  # token -> its reserved ids
        self._lookup: dict[int, list[tuple[tuple[int, ...], str]]] = {}  # first trigger id -> (trigger, token)
        self._catalog_key: tuple | None = None
        self._catalog: dict[int, list[tuple[tuple[int, ...], Path]]] = {}
        self.dirs = _env_dirs() if dirs is None else dirs

    @property
    def dirs(self) -> list[Path]:
        """Folders whose files load when a prompt contains their stem (first folder wins)."""
        return self._dirs

    @dirs.setter
    def dirs(self, dirs: Iterable[str | Path]) -> None:
        self._dirs = _check_dirs(dirs)

    @property
    def tokens(self) -> list[str]:
        """The loaded embeddings' tokens, in loading order."""
        return list(self._entries)

    @property
    def width(self) -> int:
        """The (first) text encoder's input width."""
        return self.widths[0]

    @property
    def widths(self) -> tuple[int, ...]:
        """Each text encoder's input width (SDXL base: CLIP ViT-L's, then bigG's)."""
        return tuple(self._layer(i).embedding_dim for i in range(len(self.encoders)))

    @property
    def max_vectors(self) -> int:
        # One embedding must fit in one chunk of the prompt (75 tokens for CLIP).
        return self.tokenizer.max_length - 2

    def _layer(self, i: int = 0) -> nn.Embedding:
        return self.encoders[i].text_model.get_input_embeddings()

    def load(self, path: str | Path, token: str | None = None, *, allow_pickle: bool | None = None) -> str:
        """Load an embedding file (or a diffusers folder holding ``learned_embeds.*``); returns
        its token: ``token``, else the file's stem (A1111), except that a diffusers
        ``learned_embeds.*`` file uses the token it stores."""
        path = _in_folder(Path(path))
        vectors, key = read_embedding(path, allow_pickle=self.allow_pickle if allow_pickle is None else allow_pickle)
        if token is None:
            token = key if path.stem == _DIFFUSERS_STEM and key else path.stem
        return self._add(token, vectors, path)

    def add(self, token: str, vectors: Vectors) -> str:
        """Load vectors ``(n, width)`` or ``(width,)`` given as a tensor, or for SDXL as
        ``{"clip_l": ..., "clip_g": ...}``, under ``token``."""
        where = f"embedding {token!r}"
        if isinstance(vectors, dict):
            return self._add(token, _from_sdxl(vectors, where), None)
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"vectors must be a tensor or a dict of 'clip_l' and 'clip_g' tensors, "
                            f"got {type(vectors).__name__}")
        return self._add(token, _as_matrix(vectors, where), None)

    def _per_encoder(self, vectors: Vectors, where: object) -> tuple[torch.Tensor, ...]:
        """Each encoder's ``(n, width)`` rows, checked against its width."""
        if isinstance(vectors, dict):
            if self._parts == (None,):
                widths = ", ".join(f"{k} {_width_name(v.shape[1])}" for k, v in vectors.items())
                raise EmbeddingError(f"{where}: an SDXL embedding (keys {sorted(vectors)}: {widths}); it needs an "
                                     "SDXL model, and this model's text encoder is a single CLIP (SD1/SD2), "
                                     f"{_width_name(self.width)}")
            parts = tuple(vectors[k] for k in self._parts)
            for name, part, width in zip(self._parts, parts, self.widths):
                if part.shape[1] != width:
                    raise EmbeddingError(
                        f"{where}: the embedding's {name!r} is {_width_name(part.shape[1])} but this model's "
                        f"{_ENCODER_NAMES[name]} text encoder is {_width_name(width)}; it was made for another model")
            return parts
        width = vectors.shape[1]
        if len(self.encoders) > 1:
            raise EmbeddingError(
                f"{where}: the embedding is one tensor, {_width_name(width)}, but this model has two text "
                f"encoders, {' and '.join(_width_name(w) for w in self.widths)} ({' and '.join(self._parts)}); "
                "an SDXL embedding holds a 'clip_l' and a 'clip_g' tensor, so this one was made for another "
                "model family")
        if width != self.width:
            raise EmbeddingError(f"{where}: the embedding is {_width_name(width)} but this model's text "
                                 f"encoder is {_width_name(self.width)}; it was made for another model family")
        return (vectors,)

    def _add(self, token: str, vectors: Vectors, path: Path | None) -> str:
        where = path or f"embedding {token!r}"
        trigger = self._trigger(token)
        if token in self._entries:
            raise EmbeddingError(f"{where}: an embedding named {token!r} is already loaded "
                                 f"(from {self._entries[token].path}); unload it first or pick another token")
        clash = next((e.token for e in self._entries.values() if e.trigger == trigger), None)
        if clash is not None:
            raise EmbeddingError(f"{where}: token {token!r} is the same word as the loaded embedding "
                                 f"{clash!r} (prompts are lower-cased); unload it first or pick another token")
        parts = self._per_encoder(vectors, where)
        n = parts[0].shape[0]
        if n > self.max_vectors:
            raise EmbeddingError(f"{where}: {n} vectors do not fit in one {self.max_vectors}-token prompt chunk")
        if not all(bool(torch.isfinite(part).all()) for part in parts):
            raise EmbeddingError(f"{where}: the embedding contains NaN or inf")
        if isinstance(vectors, dict) and len(parts) < len(vectors):
            logger.info("%s: the model's one text encoder is OpenCLIP ViT-bigG: 'clip_g' is used, 'clip_l' "
                        "has no encoder to go to (the SDXL refiner)", where)
        digest = embedding_hash(path) if path is not None else None
        self._entries[token] = _Entry(token, trigger, parts, path, digest)
        self._install()
        logger.info("loaded embedding %r (%d vector%s)%s", token, n, "s" * (n != 1), f" from {path}" if path else "")
        return token

    def _trigger(self, token: str) -> tuple[int, ...]:
        if not isinstance(token, str) or not token.strip():
            raise ValueError(f"an embedding token must be a non-empty str, got {token!r}")
        ids = tuple(self.tokenizer.encode(token))
        if not ids:
            raise ValueError(f"embedding token {token!r} has no letters or digits a prompt could contain")
        return ids

    def unload(self, token: str | None = None) -> None:
        """Unload one embedding, or all of them (``None``); with none left the token-embedding
        matrix is its original rows again, bit for bit."""
        if token is not None and token not in self._entries:
            raise ValueError(f"no embedding {token!r} is loaded; loaded: {self.tokens or 'none'}")
        if not self._entries:
            return  # the matrix was never changed
        for name in [token] if token is not None else self.tokens:
            del self._entries[name]
        self._install()

    def _install(self) -> None:
        """Rebuild each matrix (original rows + every loaded embedding's rows) and the id maps."""
        for i in range(len(self.encoders)):
            layer = self._layer(i)
            weight = layer.weight
            # Outside inference mode: the new parameter may be loaded while sampling and
            # must stay usable afterwards; no_grad: this is not a step anyone differentiates.
            with torch.inference_mode(False), torch.no_grad():
                rows = [weight[: self._vocab]]
                rows += [e.vectors[i].to(weight.device, weight.dtype) for e in self._entries.values()]
                matrix = torch.cat(rows)  # a copy, so the original rows are exactly kept
            layer.weight = nn.Parameter(matrix, requires_grad=weight.requires_grad)
            layer.num_embeddings = matrix.shape[0]
        self._ids.clear()
        self._lookup.clear()
        start = self._vocab
        for e in self._entries.values():
            n = len(e.vectors[0])
            self._ids[e.token] = list(range(start, start + n))
            start += n
            self._lookup.setdefault(e.trigger[0], []).append((e.trigger, e.token))

    def units(self, ids: Sequence[int]) -> list[list[int]]:
        """``ids`` split into units: each occurrence of a loaded (or, in :attr:`dirs`,
        loadable) embedding's trigger becomes one unit of its reserved ids, every other
        id a unit of its own. Longest trigger first, as A1111's ``find_embedding_at_position``.
        A trigger found only in :attr:`dirs` is loaded here."""
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
            raise TypeError(f"ids must be a list of int token ids, got {ids!r:.80}")
        return [unit for unit, _ in self._split(ids, self._scan() if self._dirs else {})]

    def _split(self, ids: Sequence[int], catalog: dict[int, list[tuple[tuple[int, ...], Path]]]
               ) -> list[tuple[list[int], str | None]]:
        """``(unit, token)`` pairs; ``token`` is None for a plain id."""
        if not self._lookup and not catalog:
            return [([i], None) for i in ids]
        out: list[tuple[list[int], str | None]] = []
        position = 0
        while position < len(ids):
            found = self._match(ids, position, catalog)
            if found is None:
                out.append(([ids[position]], None))
                position += 1
            else:
                length, token = found
                out.append((list(self._ids[token]), token))
                position += length
        return out

    def _match(self, ids: Sequence[int], position: int,
               catalog: dict[int, list[tuple[tuple[int, ...], Path]]]) -> tuple[int, str] | None:
        """``(trigger length, token)`` of the longest trigger at ``position``, loading it
        from its folder if it is not loaded yet."""
        first = ids[position]
        candidates: list[tuple[tuple[int, ...], str | Path]] = list(self._lookup.get(first, []))
        candidates += catalog.get(first, [])
        candidates.sort(key=lambda c: -len(c[0]))  # stable: a loaded embedding before a file
        for trigger, source in candidates:
            if tuple(ids[position:position + len(trigger)]) == trigger:
                return len(trigger), source if isinstance(source, str) else self._load_mentioned(source)
        return None

    def _load_mentioned(self, path: Path) -> str:
        try:
            return self.load(path)
        except (ValueError, OSError) as exc:
            raise EmbeddingError(f"the prompt contains {path.stem!r}, the name of the embedding file "
                                 f"{path}, which cannot be loaded: {exc}") from None

    def _scan(self) -> dict[int, list[tuple[tuple[int, ...], Path]]]:
        """Not-yet-loaded files in :attr:`dirs` by first trigger id; rescanned when the
        folder list or a folder's modification time changes (A1111's rule)."""
        key = tuple((d, d.stat().st_mtime_ns if d.is_dir() else None) for d in self._dirs)
        if key != self._catalog_key:
            self._catalog.clear()
            for stem, path in find_embeddings(self._dirs).items():
                trigger = tuple(self.tokenizer.encode(stem))
                if trigger:
                    self._catalog.setdefault(trigger[0], []).append((trigger, path))
            self._catalog_key = key
        paths = {e.path for e in self._entries.values()}
        triggers = {e.trigger for e in self._entries.values()}
        return {first: [(t, p) for t, p in entries if p not in paths and t not in triggers]
                for first, entries in self._catalog.items()}

    def used(self, texts: Iterable[str]) -> list[str]:
        """Loaded (or, in :attr:`dirs`, loadable: then loaded) tokens whose trigger occurs in
        ``texts``, in order of first use (prompt
        syntax such as ``(word:1.2)`` tokenizes its brackets apart, so raw prompts can be given)."""
        found: dict[str, None] = {}
        catalog = self._scan() if self._dirs else {}  # a folder's embedding counts (and loads) too
        for text in texts:
            for _, token in self._split(self.tokenizer.encode(text), catalog):
                if token is not None:
                    found[token] = None
        return list(found)

    def ti_hashes(self, texts: Iterable[str]) -> dict[str, str]:
        """``{token: hash}`` of the embeddings ``texts`` use, for A1111's ``TI hashes``
        (:mod:`ldm.pngmeta` writes it; embeddings added from tensors have no file and no hash)."""
        return {token: self._entries[token].hash for token in self.used(texts) if self._entries[token].hash}
