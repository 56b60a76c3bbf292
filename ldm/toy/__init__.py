"""The procedural toy world the shipped model is trained on, and pixel-based scoring."""

from .world import (
    COLORS,
    KINDS,
    PALETTE,
    Batch,
    EvalPrompt,
    Scene,
    caption,
    eval_prompts,
    heldout_combos,
    kind_twin,
    make_batch,
    prompt_to_attributes,
    render,
    sample_scene,
)

__all__ = [
    "COLORS", "KINDS", "PALETTE", "Batch", "EvalPrompt", "Scene", "caption", "eval_prompts",
    "heldout_combos", "kind_twin", "make_batch", "prompt_to_attributes", "render", "sample_scene",
]
