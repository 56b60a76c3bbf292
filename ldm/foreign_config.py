"""Translate foreign configs (diffusers / transformers ``config.json``) to ours and back.

This is the one place that knows diffusers' config spellings. Keys we honour are
mapped; keys that select features ldm does not implement are accepted only at
their inert default value; anything else raises, so an unsupported model is
refused with its reason instead of being loaded wrong.
"""

from __future__ import annotations

from typing import Any

# text_to_transformers lives with the configs because the text model is built from it
# (ldm.models import only ldm.config); it is part of this module's API all the same.
from .config import TextEncoderConfig, UNetConfig, VAEConfig, text_to_transformers
from .samplers.lcm import ORIGINAL_INFERENCE_STEPS, TIMESTEP_SCALING
from .samplers.schedules import spacing_from_scheduler_config

__all__ = [
    "schedule_from_diffusers", "text_from_transformers", "text_to_transformers", "unet_from_diffusers",
    "unet_to_diffusers", "vae_from_diffusers", "vae_to_diffusers",
]

# diffusers UNet2DConditionModel keys that must keep these values for ldm to be exact.
_UNET_INERT = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

_VAE_INERT = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# transformers' CLIPTextConfig keys with no effect on the text encoder's numbers.
_TEXT_IGNORED = {
    "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "initializer_range", "initializer_factor", "attention_dropout", "dropout", "projection_dim",
    "model_type", "transformers_version", "output_hidden_states", "return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id", "problem_type",
    "output_attentions", "use_return_dict", "tie_word_embeddings", "vocab_file",
}


def _check_inert(data: dict[str, Any], inert: dict[str, Any], where: str) -> None:
    for key, default in inert.items():
        if key in data and data[key] != default and not (
            isinstance(default, bool) and data[key] in (None, default)
        ):
            raise ValueError(
                f"{where}: {key}={data[key]!r} is not supported by ldm (only {default!r})"
            )


def _reject_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(k for k in data if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}")


def _per_block(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    return tuple(int(v) for v in value)


_UNET_MAPPED = {
    "sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types",
    "up_block_types", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
    "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps",
    "flip_sin_to_cos", "freq_shift", "attention_head_dim", "num_attention_heads",
    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
}
# SDXL's head count of its (unused) "text" addition embedding: inert for "text_time".
_UNET_IGNORED = {"addition_embed_type_num_heads"}


def unet_from_diffusers(data: dict[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers ``unet/config.json`` dict."""
    where = "unet config.json"
    _reject_unknown(data, _UNET_MAPPED | _UNET_IGNORED | set(_UNET_INERT), where)
    _check_inert(data, _UNET_INERT, where)
    n = len(data.get("block_out_channels", UNetConfig.block_out_channels))
    # diffusers' historical naming: for SD1/SD2/SDXL, "attention_head_dim" holds the
    # number of heads; "num_attention_heads", when set, takes precedence.
    heads = data.get("num_attention_heads") or data.get("attention_head_dim", 8)
    if isinstance(data.get("cross_attention_dim"), (list, tuple)):
        raise ValueError(f"{where}: per-block cross_attention_dim is not supported")
    kwargs: dict[str, Any] = {
        "num_attention_heads": _per_block(heads, n),
        "transformer_layers_per_block": _depths(data.get("transformer_layers_per_block", 1), where),
    }
    for key in (
        "sample_size", "in_channels", "out_channels", "layers_per_block", "cross_attention_dim",
        "use_linear_projection", "upcast_attention", "norm_num_groups", "norm_eps",
        "flip_sin_to_cos", "freq_shift", "addition_embed_type", "addition_time_embed_dim",
        "projection_class_embeddings_input_dim", "time_cond_proj_dim",
    ):
        if data.get(key) is not None:
            kwargs[key] = data[key]
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in data:
            kwargs[key] = tuple(data[key])
    return UNetConfig(**kwargs)


def _depths(value: Any, where: str) -> int | tuple[int, ...]:
    """transformer_layers_per_block: one number, or one per level (SDXL: [1, 2, 10]);
    a per-level list of equal numbers is that number. Nested per-resnet lists
    (diffusers' custom U-Nets) are refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: transformer_layers_per_block {value!r} must be an integer or a list of "
                         "integers, one per level")
    return value[0] if len(set(value)) == 1 else tuple(value)


def unet_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``unet/config.json`` dict for a UNetConfig."""
    layers = config.transformer_layers_per_block
    added = {
        "addition_embed_type": config.addition_embed_type,
        "addition_time_embed_dim": config.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": config.projection_class_embeddings_input_dim,
    } if config.addition_embed_type is not None else {}
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": list(config.down_block_types),
        "up_block_types": list(config.up_block_types),
        "layers_per_block": config.layers_per_block,
        "attention_head_dim": list(config.num_attention_heads),
        "cross_attention_dim": config.cross_attention_dim,
        "transformer_layers_per_block": layers if isinstance(layers, int) else list(layers),
        "use_linear_projection": config.use_linear_projection,
        "upcast_attention": config.upcast_attention,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        **added,
        # A guidance-distilled (LCM) U-Net's guidance embedding width; diffusers' default None.
        **({"time_cond_proj_dim": config.time_cond_proj_dim} if config.time_cond_proj_dim is not None else {}),
    }


_VAE_MAPPED = {
    "sample_size", "in_channels", "out_channels", "latent_channels", "block_out_channels",
    "layers_per_block", "norm_num_groups", "scaling_factor", "down_block_types", "up_block_types",
    "force_upcast",
}


def vae_from_diffusers(data: dict[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers ``vae/config.json`` dict."""
    where = "vae config.json"
    _reject_unknown(data, _VAE_MAPPED | set(_VAE_INERT), where)
    _check_inert(data, _VAE_INERT, where)
    # Encode/decode in float32 when the pipeline runs in float16 (SDXL's VAE overflows it;
    # the "fp16-fix" VAEs say false). Absent: ldm's default, False: the configs that omit it
    # predate SDXL (SD 1.x / 2.x), whose VAEs stay finite in float16.
    if not isinstance(data.get("force_upcast", False), bool):
        raise ValueError(f"{where}: force_upcast must be true or false, got {data['force_upcast']!r}")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != block for t in data.get(key, ())):
            raise ValueError(f"{where}: {key} must all be {block}, got {data[key]}")
    kwargs: dict[str, Any] = {}
    for key in ("sample_size", "in_channels", "out_channels", "latent_channels",
                "layers_per_block", "norm_num_groups", "scaling_factor", "force_upcast"):
        if data.get(key) is not None:
            kwargs[key] = data[key]
    if "block_out_channels" in data:
        kwargs["block_out_channels"] = tuple(data["block_out_channels"])
    if isinstance(kwargs.get("sample_size"), (list, tuple)):
        kwargs["sample_size"] = int(kwargs["sample_size"][0])
    return VAEConfig(**kwargs)


def vae_to_diffusers(config: VAEConfig) -> dict[str, Any]:
    n = len(config.block_out_channels)
    return {
        "_class_name": "AutoencoderKL",
        "sample_size": config.sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "scaling_factor": config.scaling_factor,
        "force_upcast": config.force_upcast,
    }


_TEXT_MAPPED = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "hidden_act", "layer_norm_eps",
}


_WITH_PROJECTION = "CLIPTextModelWithProjection"


def text_from_transformers(data: dict[str, Any], pad_token: str = "eos", *,
                           hidden_layer: str = "last") -> TextEncoderConfig:
    """TextEncoderConfig from a transformers ``text_encoder/config.json`` dict.

    ``projection_dim`` is kept only for a CLIPTextModelWithProjection (``architectures``;
    SDXL's ``text_encoder_2``): every CLIPTextConfig has the field, and a plain
    CLIPTextModel has no projection. ``pad_token`` (from the tokenizer) and
    ``hidden_layer`` (SDXL pipelines feed the penultimate layer) are not in the file.
    """
    where = "text_encoder config.json"
    _reject_unknown(data, _TEXT_MAPPED | _TEXT_IGNORED, where)
    architectures = data.get("architectures") or []
    if not isinstance(architectures, list):
        raise ValueError(f"{where}: architectures must be a list, got {architectures!r}")
    kwargs = {k: data[k] for k in _TEXT_MAPPED if data.get(k) is not None}
    if _WITH_PROJECTION in architectures:
        if not isinstance(data.get("projection_dim"), int):
            raise ValueError(f"{where}: a {_WITH_PROJECTION} needs an integer projection_dim, "
                             f"got {data.get('projection_dim')!r}")
        kwargs["projection_dim"] = data["projection_dim"]
    return TextEncoderConfig(pad_token=pad_token, hidden_layer=hidden_layer, **kwargs)


# LCMScheduler keys that pick its timesteps and boundary condition: ldm's lcm sampler
# has diffusers' defaults (ldm.samplers.lcm), which every released LCM model keeps.
_LCM_FIXED = {"original_inference_steps": ORIGINAL_INFERENCE_STEPS, "timestep_scaling": TIMESTEP_SCALING}


def _check_lcm_scheduler(data: dict[str, Any]) -> None:
    for key, value in _LCM_FIXED.items():
        if key in data and data[key] != value:
            raise ValueError(f"scheduler_config.json: {key}={data[key]!r} is not supported: ldm's lcm sampler "
                             f"uses {value!r} (LCMScheduler's default)")


def schedule_from_diffusers(data: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig schedule fields from ``scheduler/scheduler_config.json``.

    The training noise schedule, the prediction type and the timestep spacing the
    model's samplers use (``timestep_spacing``: SDXL and Turbo folders set it; absent,
    each sampler keeps its own default); other sampler choices belong to the call.
    """
    out: dict[str, Any] = {}
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        if data.get(key) is not None:
            out[key] = data[key]
    _check_lcm_scheduler(data)
    spacing = spacing_from_scheduler_config(data)
    if spacing is not None:
        out["timestep_spacing"] = spacing
    if data.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json: trained_betas are not supported")
    if out.get("beta_schedule") not in (None, "scaled_linear", "linear"):
        raise ValueError(
            f"scheduler_config.json: beta_schedule {out['beta_schedule']!r} is not supported "
            "(scaled_linear, linear)"
        )
    return out
