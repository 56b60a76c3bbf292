"""Memory layout of the models' convolution weights: channels_last (NHWC) where it was
measured to pay, contiguous (NCHW) elsewhere.

With channels_last weights torch's convolutions take any input and give channels_last
outputs, so nothing else changes; results differ only by the order of additions.

Measured on a 2-core AVX512-BF16 Xeon (full-size SD1.5, 256x256, one thread, interleaved,
``scripts/bench.py``): the VAE decode was 12% faster in float32 and 9% in bfloat16 with
channels_last (encode 2-5%), while the U-Net step was 13% *slower* in float32 and 6%
faster in bfloat16. On an AMD EPYC with AVX512-BF16 at 512x512 in bfloat16, two runs gave the
U-Net 2.6% and 2.8% faster with channels_last (13.0 s vs 13.4 s, 9.95 s vs 10.24 s). So on
CPU the VAE is channels_last, and the U-Net too in bfloat16 but contiguous in float32.
Converting the full-size U-Net's weights after loading took about 1.5 s on that EPYC;
:func:`channels_last_components` instead has the loader write each weight in its final
dtype and layout as it is read, in one copy.
"""

from __future__ import annotations

import torch
from torch import nn


def vae_channels_last(device: torch.device) -> bool:
    """Whether a VAE on ``device`` runs faster with channels_last weights (see the module
    docstring); only CPUs are measured, so only there is it the default."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    return device.type == "cpu"


def with_vae_layout(vae: nn.Module) -> nn.Module:
    """``vae`` (in place, returned) in the layout that is fastest on the device it is on."""
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae must be a torch.nn.Module, got {type(vae).__name__}")
    device = next(vae.parameters()).device
    if vae_channels_last(device):
        vae.to(memory_format=torch.channels_last)
    return vae


def unet_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a U-Net on ``device`` in ``dtype`` runs faster with channels_last weights
    (see the module docstring): on CPUs in bfloat16 only."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    return device.type == "cpu" and dtype == torch.bfloat16


def with_unet_layout(unet: nn.Module) -> nn.Module:
    """``unet`` (in place, returned) in the layout that is fastest for its device and dtype;
    again after either changes."""
    if not isinstance(unet, nn.Module):
        raise TypeError(f"unet must be a torch.nn.Module, got {type(unet).__name__}")
    weight = next(unet.parameters())
    channels_last = unet_channels_last(weight.device, weight.dtype)
    unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return unet


def channels_last_components(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    """The components (``"unet"``, ``"vae"``) to load channels_last on ``device`` in
    ``dtype``, for :func:`ldm.load_model`'s ``channels_last``: converting as the weights are
    read costs no copy beyond the dtype's."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    return tuple(name for name, wanted in (("unet", unet_channels_last(device, dtype)),
                                           ("vae", vae_channels_last(device))) if wanted)
