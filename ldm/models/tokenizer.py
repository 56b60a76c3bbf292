"""CLIP BPE tokenizer from the vocabulary file that open_clip ships (no download).

Both SD families use the same 49,408-token CLIP BPE vocabulary; they differ only
in padding: SD1 (transformers' CLIPTokenizer) pads with the end token, SD2
(OpenCLIP) pads with id 0.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode, default_bpe

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer(default_bpe())


class Tokenizer:
    """Turns prompts into fixed-length id rows: ``[BOS, ids..., EOS, pad...]``."""

    def __init__(self, pad_token: Literal["eos", "zero"] = "eos", max_length: int = 77) -> None:
        if pad_token not in ("eos", "zero"):
            raise ValueError(f"pad_token must be 'eos' or 'zero', got {pad_token!r}")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3, got {max_length}")
        self.pad_token = pad_token
        self.pad_id = EOS_ID if pad_token == "eos" else 0
        self.max_length = max_length

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without begin/end tokens (cleaned and lower-cased as CLIP does)."""
        if not isinstance(text, str):
            raise TypeError(f"prompt must be a str, got {type(text).__name__}")
        return _bpe().encode(text)

    def pad(self, ids: list[int]) -> list[int]:
        """One row: BOS, ids (at most max_length - 2 of them), EOS, then padding."""
        body = ids[: self.max_length - 2]
        row = [BOS_ID, *body, EOS_ID]
        return row + [self.pad_id] * (self.max_length - len(row))

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """Rows of ids, shape ``(len(prompts), max_length)``; long prompts are cut here.

        Callers that must not cut (the pipeline) use :meth:`encode` and chunk.
        """
        return torch.tensor([self.pad(self.encode(p)) for p in prompts], dtype=torch.long)


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    # Same construction as open_clip's SimpleTokenizer, so ids agree with it.
    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def save_hf_tokenizer(directory: str | Path, pad_token: Literal["eos", "zero"] = "eos") -> None:
    """Write transformers' CLIPTokenizer files (vocab.json, merges.txt, configs).

    Used when writing a diffusers folder, so other tools can read its tokenizer/.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    pad = "<|endoftext|>" if pad_token == "eos" else "!"
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        **special,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def pad_token_from_hf(directory: str | Path) -> Literal["eos", "zero"]:
    """Read a diffusers ``tokenizer/`` folder's pad token: '!' (id 0) means SD2 style."""
    path = Path(directory) / "special_tokens_map.json"
    if not path.is_file():
        path = Path(directory) / "tokenizer_config.json"
    if not path.is_file():
        return "eos"
    pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
    if isinstance(pad, dict):
        pad = pad.get("content")
    return "zero" if pad == "!" else "eos"
