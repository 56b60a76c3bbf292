"""Original-layout key maps (U-Net, VAE) against diffusers' single-file converter.

diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` read the
original (CompVis) layout; they are the independent reference that our
internal->original names are the original names, at full SD sizes (meta tensors)
and, with values, at tiny sizes.
"""

from __future__ import annotations

import accelerate
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from reference import SD1_INPAINT_TINY, SD1_TINY, SD2V_INPAINT_TINY, SD2V_TINY, build_reference

from ldm.checkpoints.keymap import (
    UnmappedKeyError,
    add_prefix,
    apply_mapping,
    check_keys,
    conv1x1_to_linear,
    linear_to_conv1x1,
)
from ldm.checkpoints.detect import DERIVABLE
from ldm.checkpoints.keymap_unet import (
    unet_architecture,
    unet_internal_to_original,
    unet_original_to_internal,
)
from ldm.checkpoints.keymap_vae import (
    vae_architecture,
    vae_internal_to_original,
    vae_original_to_internal,
)
from ldm.config import SD1, SD1_INPAINT, SD2, SD2_INPAINT
from ldm.foreign_config import unet_from_diffusers, unet_to_diffusers, vae_from_diffusers, vae_to_diffusers

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Inpainting models share every key with their text-to-image model; only conv_in's
# input width (9) differs, and the maps must carry it through at full size.
PRESETS = {"sd1": SD1, "sd2": SD2, "sd1-inpaint": SD1_INPAINT, "sd2-inpaint": SD2_INPAINT}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _derivable(config, component):
    """The fields of a component config that weight shapes determine."""
    return {name: getattr(config, name) for name in DERIVABLE[component]}


@pytest.fixture(scope="module", params=list(PRESETS))
def full_size(request):
    """Full-size SD1.5 / SD2 (and their inpainting) U-Net and VAE state dicts on the meta device."""
    config = PRESETS[request.param]
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel(**unet_to_diffusers(config.unet))
        vae = AutoencoderKL(**vae_to_diffusers(config.vae))
    return config, unet.state_dict(), vae.state_dict()


@pytest.fixture(scope="module", params=[SD1_TINY, SD2V_TINY, SD1_INPAINT_TINY, SD2V_INPAINT_TINY],
                ids=lambda s: s.name)
def tiny(request):
    """Tiny diffusers reference models with random weights, and our configs for them."""
    spec = request.param
    unet, vae, _ = build_reference(spec, seed=3)
    return spec, unet_from_diffusers(dict(spec.unet)), vae_from_diffusers(dict(spec.vae)), unet, vae


# --- 1. full size: every key, every shape, both directions -------------------


def test_full_size_unet_matches_reference_converter(full_size):
    config, internal, _ = full_size
    original = apply_mapping(internal, unet_internal_to_original(config.unet))
    assert not original.unmapped and not original.dropped
    assert all(k.startswith(("time_embed.", "input_blocks.", "middle_block.", "output_blocks.", "out.")) for k in original)

    converted = convert_ldm_unet_checkpoint(add_prefix(original, UNET_PREFIX), unet_to_diffusers(config.unet))
    # The reference consumed every original key we wrote (it maps one to one) and
    # produced exactly the internal key set, at the same shapes.
    assert len(converted) == len(original) == 686
    assert _shapes(converted) == _shapes(internal)

    # Our original->internal on that original-layout dict: exactly the internal set.
    back = apply_mapping(original, unet_original_to_internal(config.unet))
    assert not back.unmapped
    assert _shapes(back) == _shapes(internal)
    # and on shapes alone
    assert apply_mapping(_shapes(original), unet_original_to_internal(config.unet)) == _shapes(internal)

    proj_in = original["middle_block.1.proj_in.weight"]
    assert proj_in.ndim == (2 if config.unet.use_linear_projection else 4)
    assert original["input_blocks.0.0.weight"].shape == (320, config.unet.in_channels, 3, 3)


def test_full_size_vae_matches_reference_converter(full_size):
    config, _, internal = full_size
    original = apply_mapping(internal, vae_internal_to_original(config.vae))
    assert not original.unmapped and not original.dropped
    assert original["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert original["decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)

    converted = convert_ldm_vae_checkpoint(add_prefix(original, VAE_PREFIX), vae_to_diffusers(config.vae))
    assert len(converted) == len(original) == 248
    assert _shapes(converted) == _shapes(internal)

    back = apply_mapping(original, vae_original_to_internal(config.vae))
    assert not back.unmapped
    assert _shapes(back) == _shapes(internal)


def test_full_size_maps_fit_our_modules(full_size):
    """ldm's own UNet / AutoencoderKL (meta) have exactly the mapped keys and shapes."""
    from ldm.models.unet import UNet
    from ldm.models.vae import AutoencoderKL as OurVAE

    config, internal_unet, internal_vae = full_size
    with torch.device("meta"):
        ours = {"unet": UNet(config.unet).state_dict(), "vae": OurVAE(config.vae).state_dict()}
    for name, internal, to_orig, to_int, cfg in (
        ("unet", internal_unet, unet_internal_to_original, unet_original_to_internal, config.unet),
        ("vae", internal_vae, vae_internal_to_original, vae_original_to_internal, config.vae),
    ):
        original = apply_mapping(_shapes(internal), to_orig(cfg))
        mapped = apply_mapping(original, to_int(cfg))
        report = check_keys(mapped, ours[name])
        assert report.ok, report.format(name)


# --- 2. tiny: values, round trip, no copies ----------------------------------


@pytest.mark.parametrize("component", ["unet", "vae"])
def test_tiny_round_trip_and_reference_values(tiny, component):
    spec, unet_config, vae_config, unet, vae = tiny
    if component == "unet":
        model, config = unet, unet_config
        to_orig, to_int = unet_internal_to_original(config), unet_original_to_internal(config)
        prefix, convert, ref_config = UNET_PREFIX, convert_ldm_unet_checkpoint, dict(spec.unet)
    else:
        model, config = vae, vae_config
        to_orig, to_int = vae_internal_to_original(config), vae_original_to_internal(config)
        prefix, convert, ref_config = VAE_PREFIX, convert_ldm_vae_checkpoint, dict(spec.vae)
    internal = model.state_dict()

    original = apply_mapping(internal, to_orig)
    back = apply_mapping(original, to_int)
    assert list(back) == list(internal)
    for key, tensor in internal.items():
        assert back[key].shape == tensor.shape
        assert torch.equal(back[key], tensor), key
        assert back[key].data_ptr() == tensor.data_ptr(), f"{key} was copied"

    converted = convert(add_prefix(original, prefix), ref_config)
    assert set(converted) == set(internal)
    for key, tensor in internal.items():
        assert torch.equal(converted[key], tensor), key


def test_tiny_architecture_from_shapes(tiny):
    _, unet_config, vae_config, unet, vae = tiny
    original = apply_mapping(unet.state_dict(), unet_internal_to_original(unet_config))
    assert unet_architecture(_shapes(original)) == _derivable(unet_config, "unet")
    original = apply_mapping(vae.state_dict(), vae_internal_to_original(vae_config))
    assert vae_architecture(original) == _derivable(vae_config, "vae")


# --- 3. architecture at full size --------------------------------------------


def test_full_size_architecture(full_size):
    config, internal_unet, internal_vae = full_size
    unet_shapes = apply_mapping(_shapes(internal_unet), unet_internal_to_original(config.unet))
    vae_shapes = apply_mapping(_shapes(internal_vae), vae_internal_to_original(config.vae))
    assert unet_architecture(unet_shapes) == _derivable(config.unet, "unet")
    assert vae_architecture(vae_shapes) == _derivable(config.vae, "vae")
    with pytest.raises(ValueError, match="label_emb"):
        unet_architecture({**unet_shapes, "label_emb.0.0.weight": (1280, 2816)})
    with pytest.raises(ValueError, match="out.2.weight"):
        unet_architecture({k: v for k, v in unet_shapes.items() if k != "out.2.weight"})


# --- 4. unknown keys are reported, never kept silently -----------------------


def test_unknown_keys_are_reported():
    unet_map = unet_original_to_internal(SD1.unet)
    vae_map = vae_original_to_internal(SD1.vae)
    t = torch.zeros(4)
    for mapping, key in [
        (unet_map, "input_blocks.1.0.in_layers.9.weight"),  # bad suffix in a known module
        (unet_map, "input_blocks.99.0.in_layers.0.weight"),  # no such block
        (unet_map, "conv_in.weight"),  # internal name fed to the original map
        (unet_map, "label_emb.0.0.weight"),  # class embedding: unsupported
        (vae_map, "encoder.down_blocks.0.resnets.0.conv1.weight"),  # diffusers layout
        (vae_map, "loss.logvar"),
    ]:
        with pytest.raises(UnmappedKeyError, match="no mapping"):
            mapping(key, t)

    sd = {"out.2.bias": torch.zeros(4), "mystery.weight": torch.zeros(3)}
    mapped = apply_mapping(sd, unet_map)
    assert list(mapped) == ["conv_out.bias"] and mapped.unmapped == ("mystery.weight",)
    report = check_keys(mapped, {"conv_out.bias": (4,), "conv_out.weight": (4, 320, 3, 3)})
    assert report.unexpected == ("mystery.weight",)
    assert report.missing == ("conv_out.weight",)
    assert "1 unexpected: mystery.weight" in report.format("unet")

    mis = check_keys({"conv_out.bias": torch.zeros(8)}, {"conv_out.bias": (4,)})
    assert mis.mismatched == (("conv_out.bias", (4,), (8,)),)
    assert check_keys(mapped, {"conv_out.bias": (4,)}).ok is False


def test_duplicate_targets_and_helpers():
    unet_map = unet_original_to_internal(SD1.unet)

    def twice(key, tensor):
        return unet_map("out.2.bias", tensor)

    with pytest.raises(ValueError, match="both map to"):
        apply_mapping({"a": torch.zeros(1), "b": torch.zeros(1)}, twice)
    dropped = apply_mapping({"a": torch.zeros(1)}, lambda k, t: [])
    assert dict(dropped) == {} and dropped.dropped == ("a",)

    w = torch.randn(6, 6, 1, 1)
    lin = conv1x1_to_linear(w)
    assert lin.shape == (6, 6) and lin.data_ptr() == w.data_ptr()
    assert torch.equal(linear_to_conv1x1(lin), w)
    assert conv1x1_to_linear(lin) is lin  # already linear: tolerated
