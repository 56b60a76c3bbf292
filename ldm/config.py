"""Model configuration: frozen dataclasses with real (SD 1.x) defaults.

YAML files in configs/ hold the same fields as data only. Foreign configs
(diffusers ``config.json``) are translated in :mod:`ldm.foreign_config`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .atomicio import non_regular_reason

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
TimestepSpacing = Literal["leading", "linspace", "trailing"]
TIMESTEP_SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")


def check_timestep_spacing(value: Any, name: str = "timestep_spacing") -> str | None:
    """A diffusers ``timestep_spacing`` name, or None (each sampler's own default)."""
    if value is not None and value not in TIMESTEP_SPACINGS:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(TIMESTEP_SPACINGS)} (or None)")
    return value


@dataclass(frozen=True)
class UNetConfig:
    """Cross-attention U-Net (diffusers' UNet2DConditionModel, SD 1.x/2.x subset)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    layers_per_block: int = 2
    # Number of attention heads per resolution level (the mid block uses the last).
    # SD1: 8 heads everywhere; SD2: 64-channel heads, i.e. (5, 10, 20, 20).
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    # Transformer blocks per attention module: one number for every level, or one per
    # level (SDXL base: (1, 2, 10); the mid block uses the last level's, the up path
    # mirrors the down path, as diffusers builds it).
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # SD1 projects in/out of the transformer with 1x1 convs, SD2 with linears.
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL's extra embedding added to the timestep's (diffusers' addition_embed_type
    # "text_time"): the pooled text embedding concatenated with the sinusoidal
    # embeddings (addition_time_embed_dim wide each) of the size / crop / aesthetic
    # ids, projection_class_embeddings_input_dim inputs in all (base: 1280 + 6 x 256,
    # refiner: 1280 + 5 x 256). None for SD1/SD2.
    addition_embed_type: Literal["text_time"] | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # A guidance-distilled U-Net (LCM): the width of the guidance-scale embedding that
    # its timestep embedding also takes (diffusers' time_cond_proj_dim; 256 in LCM's
    # released models). None for ordinary U-Nets.
    time_cond_proj_dim: int | None = None

    def depth(self, level: int) -> int:
        """Transformer blocks per attention module at down level ``level`` (and its mirror)."""
        layers = self.transformer_layers_per_block
        return layers if isinstance(layers, int) else layers[level]

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        layers = self.transformer_layers_per_block
        if isinstance(layers, int):
            if layers < 1:
                raise ValueError(f"UNetConfig: transformer_layers_per_block must be >= 1, got {layers}")
        elif len(layers) != n or any(not isinstance(d, int) or d < 1 for d in layers):
            raise ValueError(f"UNetConfig: transformer_layers_per_block {layers} must be one number >= 1 or "
                             f"{n} of them (one per level)")
        added = (self.addition_embed_type, self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig: addition_embed_type {self.addition_embed_type!r} is not supported "
                             "(only SDXL's 'text_time')")
        if (added[0] is None) != (added[1] is None) or (added[0] is None) != (added[2] is None):
            raise ValueError("UNetConfig: addition_embed_type, addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim are set together (SDXL) or not at all, "
                             f"got {added}")
        if self.time_cond_proj_dim is not None and (isinstance(self.time_cond_proj_dim, bool)
                                                    or not isinstance(self.time_cond_proj_dim, int)
                                                    or self.time_cond_proj_dim < 2):
            raise ValueError(f"UNetConfig: time_cond_proj_dim must be an integer >= 2 or None, "
                             f"got {self.time_cond_proj_dim!r}")
        for name in ("down_block_types", "up_block_types", "num_attention_heads"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"UNetConfig.{name} has {len(getattr(self, name))} entries, "
                    f"block_out_channels has {n}"
                )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig: channels {c} not divisible by norm_num_groups={self.norm_num_groups}"
                )
        for level, (c, heads) in enumerate(zip(self.block_out_channels, self.num_attention_heads)):
            _check_heads(f"UNetConfig level {level}", c, heads)
        # Each level halves the latent; a native size that does not halve evenly makes
        # the skip connections of the up path mismatch at the model's own resolution.
        step = 2 ** (n - 1)
        if self.sample_size < 1 or self.sample_size % step:
            raise ValueError(
                f"UNetConfig: sample_size {self.sample_size} must be a positive multiple of {step} "
                f"(the U-Net halves it {n - 1} times)"
            )


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL: 2**(levels-1) down-sampling, Gaussian latent."""

    sample_size: int = 512
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    # The VAE overflows float16 (SDXL's does: its activations pass 65504), so a pipeline
    # in float16 encodes and decodes in float32 (bfloat16 where native) instead of
    # waiting for the NaNs; diffusers' ``force_upcast``, False in the "fp16-fix" VAEs.
    force_upcast: bool = False

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (transformers' CLIPTextModel fields).

    ``pad_token`` follows the original models: SD1 pads with the end token,
    SD2 (OpenCLIP) pads with id 0.
    ``hidden_layer``: what the U-Net is fed: ``"last"``, the last layer through the
    final LayerNorm (SD1; SD2, whose last OpenCLIP block is dropped); ``"penultimate"``,
    the output of the next-to-last layer without the final LayerNorm (SDXL's both
    encoders, SGM's ``layer="penultimate"`` / ``"hidden"`` with ``layer_idx=11``).
    ``projection_dim``: set for an encoder that also gives a pooled embedding (SDXL's
    OpenCLIP ViT-bigG: the final LayerNorm of the last layer at the end token, times
    ``text_projection``; transformers' CLIPTextModelWithProjection), else None.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token: Literal["eos", "zero"] = "eos"
    hidden_layer: Literal["last", "penultimate"] = "last"
    projection_dim: int | None = None

    def __post_init__(self) -> None:
        _check_heads("TextEncoderConfig", self.hidden_size, self.num_attention_heads)
        if self.hidden_layer not in ("last", "penultimate"):
            raise ValueError(f"TextEncoderConfig: hidden_layer must be 'last' or 'penultimate', "
                             f"got {self.hidden_layer!r}")
        if self.hidden_layer == "penultimate" and self.num_hidden_layers < 2:
            raise ValueError("TextEncoderConfig: hidden_layer 'penultimate' needs at least 2 layers")


def _check_heads(where: str, channels: int, heads: int) -> None:
    """Attention splits the channels into equal heads; a split that leaves a remainder
    would build projections narrower than the weights."""
    if not isinstance(heads, int) or heads < 1 or channels % heads:
        raise ValueError(
            f"{where}: {channels} channels cannot be split into {heads!r} attention heads "
            f"(num_attention_heads must divide the channels)"
        )


def text_to_transformers(config: TextEncoderConfig) -> dict[str, Any]:
    """The transformers CLIPTextConfig dict for a TextEncoderConfig (what the text
    model is built from, and what diffusers folders store)."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407 if config.pad_token == "eos" else 0,
        "projection_dim": config.projection_dim or config.hidden_size,
    } | ({"architectures": ["CLIPTextModelWithProjection"]} if config.projection_dim else {})


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: components plus its training noise schedule.

    ``text_2``: SDXL base's second text encoder (OpenCLIP ViT-bigG); the U-Net's context
    is ``text``'s hidden states and ``text_2``'s concatenated on the width (768 + 1280).
    The SDXL refiner has one encoder, bigG, as ``text``.
    """

    family: str = "sd1"
    prediction_type: PredictionType = "epsilon"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    text_2: TextEncoderConfig | None = None
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    # diffusers' scheduler ``timestep_spacing`` the model ships with (SDXL: "leading");
    # None: each sampler's own diffusers default (the SD 1.x / 2.x configs set none).
    timestep_spacing: TimestepSpacing | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}"
            )
        check_timestep_spacing(self.timestep_spacing)
        widths = [t.hidden_size for t in self.text_encoders]
        if sum(widths) != self.unet.cross_attention_dim:
            raise ValueError(
                f"text hidden_size {' + '.join(map(str, widths))} != unet cross_attention_dim "
                f"{self.unet.cross_attention_dim}"
            )
        if self.unet.addition_embed_type is not None:
            pooled = self.pooled_dim
            if pooled is None:
                raise ValueError("a U-Net with addition_embed_type 'text_time' needs a text encoder with "
                                 "projection_dim (the pooled embedding)")
            ids, rest = divmod(self.unet.projection_class_embeddings_input_dim - pooled,
                               self.unet.addition_time_embed_dim)
            if rest or ids not in (5, 6):
                raise ValueError(
                    f"U-Net projection_class_embeddings_input_dim {self.unet.projection_class_embeddings_input_dim} "
                    f"is not the pooled width {pooled} + 6 (size ids) or 5 (refiner: aesthetic score) x "
                    f"addition_time_embed_dim {self.unet.addition_time_embed_dim}")

    @property
    def text_encoders(self) -> tuple[TextEncoderConfig, ...]:
        """The text encoders, in the order their hidden states are concatenated."""
        return (self.text,) if self.text_2 is None else (self.text, self.text_2)

    @property
    def pooled_dim(self) -> int | None:
        """Width of the pooled text embedding SDXL's U-Net takes (the last encoder with a projection)."""
        dims = [t.projection_dim for t in self.text_encoders if t.projection_dim]
        return dims[-1] if dims else None

    @property
    def size_conditioning(self) -> Literal["size", "aesthetic"] | None:
        """SDXL's micro-conditioning: ``"size"`` (base: original size, crop top-left,
        target size; 6 ids), ``"aesthetic"`` (refiner: original size, crop top-left,
        aesthetic score; 5 ids), None for SD1/SD2."""
        if self.unet.addition_embed_type is None:
            return None
        ids = (self.unet.projection_class_embeddings_input_dim - self.pooled_dim) // self.unet.addition_time_embed_dim
        return "size" if ids == 6 else "aesthetic"

    @property
    def default_size(self) -> int:
        """Native image side in pixels (512 for SD1, 768 for SD2-v)."""
        return self.unet.sample_size * self.vae.downsample_factor

    @property
    def is_inpainting(self) -> bool:
        """A 9-channel inpainting U-Net (sd-v1-5-inpainting layout): its input is the
        noisy latents, the mask and the masked image's latents, stacked."""
        return self.unet.in_channels == 2 * self.vae.latent_channels + 1

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _build(cls, data, "ModelConfig")


_NESTED = {"unet": UNetConfig, "vae": VAEConfig, "text": TextEncoderConfig, "text_2": TextEncoderConfig}


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a dataclass from plain data; unknown keys raise, lists become tuples."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        if cls is ModelConfig and key in _NESTED and value is not None:
            value = _build(_NESTED[key], value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def with_changes(config: Any, **changes: Any) -> Any:
    """dataclasses.replace, re-exported so callers need not import dataclasses."""
    return dataclasses.replace(config, **changes)


# --- presets ---------------------------------------------------------------

SD1 = ModelConfig()

SD2 = ModelConfig(
    family="sd2",
    prediction_type="epsilon",
    unet=UNetConfig(
        num_attention_heads=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    ),
    text=TextEncoderConfig(
        hidden_size=1024,
        intermediate_size=4096,
        # OpenCLIP ViT-H has 24 blocks; SD2 conditions on the penultimate one,
        # so the last block is never run and is not kept (as diffusers does).
        num_hidden_layers=23,
        num_attention_heads=16,
        hidden_act="gelu",
        pad_token="zero",
    ),
)

SD2_V = with_changes(
    SD2,
    prediction_type="v_prediction",
    unet=with_changes(SD2.unet, sample_size=96),
)

# The model shipped in weights/, trained from scratch by scripts/train_toy.py on the
# procedural toy world (ldm.toy): 64x64 images, 8x8x4 latents, a CLIP-style text
# tower of hidden 128 (real CLIP BPE ids, so the 49,408-row token table is most of
# its parameters). Key layout is SD1's (quick_gelu text encoder). The VAE scaling
# factor is measured by the training script (1/std of the latents, as SD did) and
# stored in the checkpoint's metadata; the value here is the shipped run's, so a
# copy of weights/ldm-toy.safetensors that lost its metadata still loads right.
TOY = ModelConfig(
    family="toy",
    unet=UNetConfig(
        sample_size=8,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        num_attention_heads=(2, 4),
        cross_attention_dim=128,
    ),
    vae=VAEConfig(
        sample_size=64,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        scaling_factor=0.49362558126449585,  # measured by scripts/train_toy.py: 1 / latent std
    ),
    text=TextEncoderConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
    ),
)



def inpainting_variant(config: ModelConfig) -> ModelConfig:
    """The inpainting model made from ``config`` (as sd-v1-5-inpainting / sd-2-inpainting
    were from SD1 / SD2): the same architecture with a U-Net whose first conv takes
    noisy latents, mask and masked-image latents stacked, 2 * latent + 1 channels."""
    channels = 2 * config.vae.latent_channels + 1
    return with_changes(config, unet=with_changes(config.unet, in_channels=channels))


SD1_INPAINT = inpainting_variant(SD1)
SD2_INPAINT = inpainting_variant(SD2)  # sd-2-inpainting: 512 px, epsilon
TOY_INPAINT = inpainting_variant(TOY)

# SDXL 1.0 (sgm's sd_xl_base.yaml / diffusers' stable-diffusion-xl-base-1.0): 1024 px,
# no attention at the first level, 64-channel heads, 2 and 10 transformer blocks at
# the deeper levels; the context is CLIP ViT-L's and OpenCLIP ViT-bigG's penultimate
# hidden states side by side (768 + 1280), and bigG's pooled embedding plus the six
# size ids enter through the "text_time" embedding.
CLIP_L_PENULTIMATE = TextEncoderConfig(hidden_layer="penultimate")
OPENCLIP_BIGG = TextEncoderConfig(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    hidden_act="gelu",
    pad_token="zero",
    hidden_layer="penultimate",
    projection_dim=1280,
)
SDXL = ModelConfig(
    family="sdxl",
    unet=UNetConfig(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads=(5, 10, 20),
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    vae=VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=CLIP_L_PENULTIMATE,
    text_2=OPENCLIP_BIGG,
    timestep_spacing="leading",  # stabilityai's scheduler_config.json (steps_offset 1)
)
# The SDXL 1.0 refiner: bigG alone, 4 levels of 384..1536 channels, 4 transformer
# blocks per attention module, and an aesthetic score in place of the target size.
SDXL_REFINER = ModelConfig(
    family="sdxl-refiner",
    unet=UNetConfig(
        sample_size=128,
        block_out_channels=(384, 768, 1536, 1536),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        num_attention_heads=(6, 12, 24, 24),
        cross_attention_dim=1280,
        transformer_layers_per_block=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
    ),
    vae=VAEConfig(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
    text=OPENCLIP_BIGG,
    timestep_spacing="leading",
)
SDXL_INPAINT = inpainting_variant(SDXL)

PRESETS: dict[str, ModelConfig] = {
    "sd1": SD1, "sd2": SD2, "sd2-v": SD2_V, "toy": TOY,
    "sd1-inpaint": SD1_INPAINT, "sd2-inpaint": SD2_INPAINT, "toy-inpaint": TOY_INPAINT,
    "sdxl": SDXL, "sdxl-refiner": SDXL_REFINER, "sdxl-inpaint": SDXL_INPAINT,
}


CONTROLNET_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "toy")  # toy: the one ldm trains (weights/)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet (Zhang et al. 2023, arXiv:2302.05543; diffusers' ControlNetModel).

    ``unet``: the config of the U-Net whose input half was copied (only its down blocks
    and mid block are built). The hint image is embedded to the latent size by convs
    through ``conditioning_embedding_out_channels`` (each level after the first halves
    the size), and a 1x1 "zero conv" per skip and one for the mid block give the
    residuals added to the U-Net. ``family``: the base model family it was trained on
    (``sd1`` / ``sd2``). ``global_pool_conditions``: the residuals are averaged over
    height and width (the shuffle ControlNet, ``global_average_pooling`` in its YAML).
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    family: str = "sd1"
    global_pool_conditions: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.unet, UNetConfig):
            raise TypeError(f"ControlNetConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")
        if self.unet.addition_embed_type is not None or str(self.family).startswith("sdxl"):
            raise ValueError("ControlNetConfig: SDXL ControlNets (a U-Net with the text_time embedding) "
                             f"are not supported yet; supported families: {', '.join(CONTROLNET_FAMILIES)}")
        if self.family not in CONTROLNET_FAMILIES:
            raise ValueError(f"ControlNetConfig: family {self.family!r} is not one of {', '.join(CONTROLNET_FAMILIES)}")
        channels = self.conditioning_embedding_out_channels
        if not channels or any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in channels):
            raise ValueError(f"ControlNetConfig: conditioning_embedding_out_channels {channels!r} must be "
                             "one or more positive integers")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise ValueError(f"ControlNetConfig: conditioning_channels must be a positive integer, "
                             f"got {self.conditioning_channels!r}")
        if not isinstance(self.global_pool_conditions, bool):
            raise ValueError(f"ControlNetConfig: global_pool_conditions must be true or false, "
                             f"got {self.global_pool_conditions!r}")

    @property
    def hint_factor(self) -> int:
        """Hint pixels per latent pixel: the embedding halves the size at each level but the first."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ControlNetConfig":
        where = "ControlNetConfig"
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
        unet = _build(UNetConfig, data.get("unet", {}), f"{where}.unet")
        return _build(cls, {**data, "unet": unet}, where)


# The ControlNets released for SD 1.5 (lllyasviel's 1.0 / 1.1) and SD 2.1 (e.g.
# thibaud's): copies of those U-Nets' input halves, with a 3-channel hint at pixel size.
CONTROLNET_SD1 = ControlNetConfig(unet=SD1.unet, family="sd1")
CONTROLNET_SD2 = ControlNetConfig(unet=SD2.unet, family="sd2")
CONTROLNET_PRESETS: dict[str, ControlNetConfig] = {"sd1": CONTROLNET_SD1, "sd2": CONTROLNET_SD2}


def preset(name: str) -> ModelConfig:
    """Return a named preset (``sd1``, ``sd2``, ``sd2-v``, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config preset {name!r}; valid presets: {sorted(PRESETS)}")
    return PRESETS[name]


def load_config(source: str | Path | ModelConfig | dict) -> ModelConfig:
    """A ModelConfig from a preset name, a YAML file, a dict or a ModelConfig."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, dict):
        return ModelConfig.from_dict(source)
    text = str(source)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.suffix in (".yaml", ".yml"):
        try:
            reason = non_regular_reason(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        if reason:
            raise ValueError(f"{path}: {reason}; expected a YAML config file")
        with open(path, encoding="utf-8") as fh:
            try:
                data = yaml.safe_load(fh)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML ({exc})") from None
        return _build(ModelConfig, data, str(path))
    raise ValueError(
        f"config {text!r} is neither a preset ({sorted(PRESETS)}) nor a .yaml file"
    )
