"""Tiny reference ControlNets built with diffusers (the ground truth), random weights.

``ControlNetModel.from_unet`` on the tiny SD1 / SD2 U-Nets of reference.py, as the
ControlNet paper makes one (a copy of the U-Net's input half), then every weight
randomised, the zero convs included: at their trained-from-zero init every residual
would be 0 and parity would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

from reference import SD1_TINY, SD2V_TINY, TinySpec, _randomize

# The hint embedding's widths: SD's (16, 32, 96, 256) for the SD1 ControlNet, narrower
# ones for the SD2 one, so a config field that is not read would show.
HINT_WIDTHS = {SD1_TINY.name: (16, 32, 96, 256), SD2V_TINY.name: (8, 16, 16, 32)}


def build_controlnet(spec: TinySpec, seed: int = 0, *, global_pool_conditions: bool = False):
    """A diffusers UNet2DConditionModel and the ControlNetModel copied from it, random weights."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel(**spec.unet).eval()
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_WIDTHS[spec.name])
    if global_pool_conditions:
        options = {k: v for k, v in controlnet.config.items() if not k.startswith("_")}
        controlnet = ControlNetModel(**{**options, "global_pool_conditions": True})
    _randomize(unet, seed * 10)
    _randomize(controlnet, seed * 10 + 1)
    return unet, controlnet.eval()


def save_controlnet_folder(spec: TinySpec, path: Path, seed: int = 0) -> Path:
    """Save a tiny reference ControlNet as a diffusers folder (config.json + weights)."""
    _, controlnet = build_controlnet(spec, seed)
    controlnet.save_pretrained(path)
    return Path(path)
