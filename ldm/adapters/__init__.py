"""Adapters that change what a loaded model computes: LoRA-family patches and textual-inversion embeddings."""

from .lora import LoadedLora, LoraSet
from .lora_files import LoraTag, extract_lora_tags, find_lora, lora_hash, lora_search_dirs
from .lora_keys import LoraError

__all__ = [
    "LoadedLora", "LoraError", "LoraSet", "LoraTag", "extract_lora_tags", "find_lora", "lora_hash",
    "lora_search_dirs",
]
