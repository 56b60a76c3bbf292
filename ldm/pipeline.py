"""Text-to-image pipeline: encode prompt, draw noise, sample, decode."""

from __future__ import annotations

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from . import validation as check
from .adapters.embeddings import EmbeddingTable
from .adapters.lora import LoraSet
from .adapters.prompt_loras import split_tags, tagged_loras
from .checkpoints import LoadedModel, load_model
from .checkpoints.vae_file import VAESource, load_vae as load_vae_file, open_vae
from .config import with_changes
from .conditioning import Conditioning, ScheduledConditioning, run_unet, with_guidance_embedding
from .control import Control, as_controls, attach_controls, hint_tensor
from .denoisers import CFGDenoiser, Denoiser, DiscreteSchedule
from .dtypes import default_dtype, dtype_name, native_bf16, parse_dtype, warn_emulated
from .edit_latents import EditLatents, binary_mask, blend_callback, prepare, to_model_pixels
from .edit_request import EditRequest, plan_edit
from .editing import DEFAULT_MASK_BLUR
from .layouts import channels_last_components, with_unet_layout, with_vae_layout
from .limits import plan_batch, plan_memory
from .models.feature_cache import FeatureCache
from .models.token_merging import set_token_merging
from .memory import execution_device, resident_bytes, runner_of, use_plan
from .paths import DEFAULT_WEIGHTS, WEIGHTS_DIR, default_weights_path
from .prompts import encode_conditioning
from .samplers import first_step, sample, sampling_schedule
from .size_conditioning import SizeConditioning
from .speedups import Speedups

logger = logging.getLogger("ldm")

__all__ = ["Pipeline", "Generation", "NonFiniteError", "default_weights_path", "WEIGHTS_DIR", "DEFAULT_WEIGHTS"]

OUTPUTS = ("pil", "np", "latent")
# Families whose empty negative prompt is all zeros (diffusers' force_zeros_for_empty_prompt:
# true in SDXL base's model_index.json, false in the refiner's).
ZERO_EMPTY_NEGATIVE = ("sdxl",)
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
Cond = Conditioning | ScheduledConditioning
D = check.DEFAULTS


class NonFiniteError(ValueError):
    """Sampling or decoding produced NaN/inf: nothing is returned as if it were a picture."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: CUDA if available unless given; refuses names torch does not
    know and devices this machine does not have, before anything loads."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device {device!r} is not a device name; use cpu, cuda, cuda:1, mps ...") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r}: no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' is not available here; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda or mps")
    return device


def vae_upcast_dtype(device: torch.device) -> torch.dtype:
    """What a VAE that overflows float16 (``force_upcast``) runs in instead: bfloat16 where
    ``device`` computes it natively (it has float32's range, at half its memory), else
    float32, as diffusers' SDXL pipelines do."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


@dataclass
class Generation:
    """What a call produced, with everything needed to reproduce each image."""

    images: Any
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    # How the VAE ran for each image ("none", "seamless" or "blended": ldm.limits.VAE_MODES),
    # which a PNG records as "VAE tiling"; empty for output="latent".
    vae_tiling: list[str] = field(default_factory=list)


def _as_output(pictures: np.ndarray | list[np.ndarray], output: str) -> Any:
    """Pictures in [0, 1] (an array, or a list from an edit) as ``output`` asks: PIL images,
    or "np": one array where they share a size, else the list."""
    if output != "np":
        return [_to_pil(a) for a in pictures]
    if isinstance(pictures, np.ndarray) or len({a.shape for a in pictures}) != 1:
        return pictures
    return np.stack(pictures)


def _as_list(value: str | Sequence[str], name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {value!r:.80}")


class Pipeline:
    """Stable-Diffusion-style text-to-image generation.

    >>> pipe = Pipeline.from_pretrained()
    >>> pipe("a cat wearing a hat", negative_prompt="blurry", steps=20, seed=42)[0].save("cat.png")
    """

    def __init__(self, model: LoadedModel, *, lora_dirs: Sequence[str | Path] = (),
                 embedding_dirs: Sequence[str | Path] | None = None, allow_pickle: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.unet = with_unet_layout(model.unet.eval())  # channels_last on CPU in bfloat16: measured faster
        self.vae = with_vae_layout(model.vae.eval())  # channels_last on CPU: measured faster
        self.text_encoder = model.text_encoder.eval()
        self.tokenizer = model.tokenizer
        # SDXL base's second encoder (OpenCLIP ViT-bigG); None for one-encoder models.
        self.text_encoder_2 = model.text_encoder_2.eval() if model.text_encoder_2 is not None else None
        self.tokenizer_2 = model.tokenizer_2
        self.schedule = DiscreteSchedule.from_config(model.config)
        self.embeddings = EmbeddingTable(self.text_encoders, self.tokenizers, dirs=embedding_dirs,
                                         allow_pickle=allow_pickle)
        self.loras = LoraSet(self.unet, self.text_encoders, self.config)
        # Where <lora:name:weight> tags are looked up (then $LDM_LORA_DIR), and whether
        # pickle files found there (and in the embedding folders) may load.
        self.lora_dirs = [Path(d) for d in lora_dirs]
        self.allow_pickle = allow_pickle
        # A VAE file used in place of the model's (load_vae); whether the upcast of a VAE
        # that overflows float16 was logged (once per pipeline).
        self.vae_file: Path | None = None
        self._vae_upcast_logged = False
        self._compiled_unet: Any = None  # compile()
        check.log_guidance_distilled(self.config.unet.time_cond_proj_dim)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        prediction_type: str | None = None,
        config: Any = None,
        allow_pickle: bool = False,
        lora_dirs: Sequence[str | Path] = (),
        embedding_dirs: Sequence[str | Path] | None = None,
        vae: str | Path | None = None,
    ) -> "Pipeline":
        """Load a single-file checkpoint (original layout), a diffusers folder, or,
        with no path, the model shipped in weights/.

        ``lora_dirs``: folders for the prompts' ``<lora:name:weight>`` tags (searched before
        ``LDM_LORA_DIR``); ``embedding_dirs``: textual-inversion embeddings that load when a
        prompt names their file's stem (default ``LDM_EMBEDDING_DIR``). ``allow_pickle``
        lets ``.ckpt``/``.pt`` files load (``weights_only=True``), checkpoints and those alike.
        ``vae``: a VAE file or folder to use in place of the model's (see :meth:`load_vae`)."""
        device = resolve_device(device)  # before the (slow) load: a bad device fails at once
        dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
        warn_emulated(device, dtype)
        if path is None:
            path = default_weights_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"the shipped model is missing: {path} (a full clone of the repository "
                    "contains it; or pass a checkpoint path)"
                )
        source = open_vae(vae, allow_pickle=allow_pickle) if vae is not None else None  # errors before the model
        model = load_model(
            path, device=device, dtype=dtype, config=config, prediction_type=prediction_type,
            allow_pickle=allow_pickle, channels_last=channels_last_components(device, dtype),
        )
        pipe = cls(model, lora_dirs=lora_dirs, embedding_dirs=embedding_dirs, allow_pickle=allow_pickle)
        if source is not None:
            pipe.load_vae(source)
        return pipe

    @property
    def device(self) -> torch.device:
        return execution_device(self.unet)  # where it computes, also when offloaded

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None) -> "Pipeline":
        device = resolve_device(device) if device is not None else None
        dtype = parse_dtype(dtype)
        if dtype is not None:
            warn_emulated(device or self.device, dtype)
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device=device, dtype=dtype)
        with_unet_layout(self.unet)
        return self

    def compile(self, *, mode: str | None = None) -> "Pipeline":
        """Run the U-Net through ``torch.compile`` (inductor) from the next call on; returns self.

        The first call at each new shape (batch, size) compiles, which takes a minute or
        more on a CPU (inductor keeps its compiled kernels in its on-disk cache, so another
        process compiles faster), and later calls at that shape run the compiled code.
        The U-Net is one graph: ldm's CPU fast paths and the guidance halves' shared first
        layers step aside inside it, so on the CPUs measured (README, "Speed") the eager
        U-Net is faster and compiling does not pay; it is there for GPUs. Outputs equal
        eager ones to float rounding. Weights stay inputs of the compiled graph (no
        freezing), so LoRAs loaded, rescaled or tagged in prompts later still apply.
        ``mode``: ``torch.compile``'s (e.g. ``"reduce-overhead"``, CUDA graphs, on a GPU).
        Evaluations under ``cache_interval`` run eager."""
        modes = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
        if mode not in modes:
            raise ValueError(f"compile mode {mode!r} is not one of {', '.join(map(str, modes))}")
        self._compiled_unet = torch.compile(self.unet, mode=mode, dynamic=False)
        return self

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The text encoders, in the order their hidden states form the context."""
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return (self.tokenizer,) if self.text_encoder_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def embedding_dirs(self) -> list[Path]:
        """Folders of textual-inversion embeddings: a file loads when a prompt contains its
        stem, as in A1111's embeddings/ folder (default: ``LDM_EMBEDDING_DIR``)."""
        return self.embeddings.dirs

    @embedding_dirs.setter
    def embedding_dirs(self, dirs: Sequence[str | Path]) -> None:
        self.embeddings.dirs = dirs

    def load_embedding(self, path: str | Path, token: str | None = None, *, allow_pickle: bool = False) -> str:
        """Load a textual-inversion embedding (A1111 ``.pt`` / ``.safetensors``, diffusers
        ``learned_embeds``); returns its trigger word: ``token``, else the file's stem.
        Pickle files need ``allow_pickle=True``. See :mod:`ldm.adapters.embeddings`."""
        return self.embeddings.load(path, token, allow_pickle=allow_pickle)

    def unload_embedding(self, token: str | None = None) -> None:
        """Unload one embedding, or all of them (``None``)."""
        self.embeddings.unload(token)

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None, *,
                  text_encoder_scale: float | None = None, allow_pickle: bool = False) -> str:
        """Apply a LoRA-family file (kohya-ss/A1111 LoRA and LoCon, LyCORIS LoHa and LoKr,
        diffusers/PEFT); returns the name it is known by: ``name``, else the file's stem.

        ``scale`` multiplies its U-Net layers and, unless ``text_encoder_scale`` is given, its
        text-encoder layers. Several files can be loaded, each with its own scales. The
        file is checked whole before any weight changes (one error naming the path and
        the entries). Pickle files need ``allow_pickle=True``. See :mod:`ldm.adapters.lora`."""
        return self.loras.load(path, scale, name, text_encoder_scale=text_encoder_scale,
                               allow_pickle=allow_pickle)

    def set_lora_scale(self, name: str, scale: float, *, text_encoder_scale: float | None = None) -> None:
        """Change a loaded LoRA's multipliers (as :meth:`load_lora` takes them)."""
        self.loras.set_scale(name, scale, text_encoder_scale=text_encoder_scale)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all of them (``None``): every weight they changed gets its
        original value back, bit for bit."""
        self.loras.unload(name)

    def load_vae(self, path: str | Path | VAESource, *, force_upcast: bool | None = None) -> None:
        """Use the VAE in ``path`` in place of the model's: a diffusers ``AutoencoderKL`` folder
        (such as sdxl-vae-fp16-fix), or a ``.safetensors`` file in diffusers' or the original
        key names (the web UI's VAE files; pickles with ``allow_pickle``). Its architecture
        must be the model's; it is checked whole before the VAE changes (see
        :mod:`ldm.checkpoints.vae_file`). ``force_upcast``: whether float16 is too narrow for
        it (default: the folder's config.json, else the model's)."""
        vae, config = load_vae_file(path, self.config, device=self.vae.device, dtype=self.vae.dtype,
                                    force_upcast=force_upcast, allow_pickle=self.allow_pickle)
        self.vae = self.model.vae = with_vae_layout(vae.eval())
        self.config = self.model.config = with_changes(self.config, vae=config)
        self.vae_file = path.path if isinstance(path, VAESource) else Path(path)
        self._vae_upcast_logged = False

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 **kwargs: Any) -> Any:
        """Generate images; returns a list of PIL images (or an array / latents, see ``output``)."""
        return self.generate(prompt, negative_prompt, **kwargs).images

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        image: Any = None,
        mask: Any = None,
        strength: float | None = None,
        keep_unmasked: bool = True,
        mask_blur: int = DEFAULT_MASK_BLUR,
        mask_padding: int | None = None,
        steps: int = D.steps,
        guidance_scale: float = D.guidance_scale,
        width: int | None = None,
        height: int | None = None,
        seed: int | Sequence[int] | None = None,
        num_images: int = D.num_images,
        sampler: str = D.sampler,
        schedule: str | None = None,
        spacing: str | None = None,
        latents: torch.Tensor | None = None,
        output: Literal["pil", "np", "latent"] = "pil",
        progress: bool = True,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        clip_skip: int = D.clip_skip,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] | None = None,
        target_size: tuple[int, int] | None = None,
        aesthetic_score: float | None = None,
        negative_aesthetic_score: float | None = None,
        refiner: "Pipeline | None" = None,
        refiner_start: float | None = None,
        control: Control | Sequence[Control] | None = None,
        memory: str = "auto",
        vae_tiling: str | None = None,
        guidance_end: float = 1.0,
        cache_interval: int = 1,
        token_merging: float = 0.0,
    ) -> Generation:
        """Like ``__call__`` but returns a :class:`Generation` with the seed of every image.

        ``prompt`` may be a list (``num_images`` images per prompt). Image k of the call
        is drawn from its own CPU generator seeded ``seed + k``, so it does not depend on
        the batch size or the device. ``seed`` may also be a list with one seed per
        image (how ``ldm batch`` renders unrelated prompts in one call).

        Every argument is checked before any work (``ValueError`` naming the valid
        values); a batch that does not fit in memory runs the U-Net on fewer images at a
        time, and one image that cannot fit is refused (``MemoryLimitError``). Sampling
        that turns NaN/inf stops with :class:`NonFiniteError` naming the step.

        Editing: ``image`` (a PIL image, a path, an HxWx3 float array in [0, 1], or a
        list with one per prompt) is varied by ``strength`` in (0, 1]: of the
        ``steps``-step schedule the last ``int(steps * strength)`` steps run, from the
        image's latents noised to that level (default 0.75; 1.0 with a mask). ``mask``
        (white >= 0.5 is repainted; same size as the image) repaints a region: a
        9-channel inpainting model reads it with the masked image, any other model gets
        the known region put back after every step. ``keep_unmasked`` then restores the
        input's pixels outside the mask exactly, joined over a ``mask_blur``-pixel
        feather (``False``: the raw decode, as diffusers returns it); ``mask_padding``
        renders only the mask's bounding box plus that many pixels at ``width`` x
        ``height`` and pastes it back. ``width`` / ``height`` default to the image's
        size (rounded down to multiples of 8); images of another size are resized to
        them, with a log line. A 9-channel model called without an image paints a blank
        image under a full mask (A1111's txt2img with inpainting models).

        Prompts use AUTOMATIC1111's prompt language (see :mod:`ldm.prompts` and
        :mod:`ldm.prompt_schedule`): ``(word:1.3)`` weights, ``BREAK``, ``[from:to:when]``
        editing and ``[a|b]`` alternation over the ``steps`` steps. ``clip_skip`` (A1111's
        numbering: 1 = the text encoder's last layer, 2 = the penultimate, ...; diffusers'
        ``clip_skip=k`` is ``k + 1`` here) picks the layer the U-Net is conditioned on.

        ``spacing``: the schedule's timestep spacing ("leading", "linspace", "trailing",
        diffusers' ``timestep_spacing``); default the model's (SDXL folders say
        "leading"), else each sampler's own (see :mod:`ldm.samplers.schedules`).
        Turbo-style models take ``sampler="euler_a", spacing="trailing"``, 1-4 steps and
        ``guidance_scale=1`` (no guidance). ``sampler="lcm"`` (1-8 steps, its own timesteps; see
        :mod:`ldm.samplers.lcm`) is for latent consistency models and LCM-LoRA (at guidance 1-2). A
        guidance-distilled U-Net (LCM; ``time_cond_proj_dim`` in its config) takes ``guidance_scale``
        into its guidance embedding and runs one pass per step, without classifier-free guidance;
        it refuses a negative prompt (there is no unconditional pass for it to steer).

        SDXL's size conditioning (see :mod:`ldm.size_conditioning`), as diffusers names
        it, each ``(height, width)`` / ``(top, left)`` in pixels: ``original_size`` and
        ``target_size`` (default: the output size), ``crops_coords_top_left`` (default
        (0, 0)); the refiner's ``aesthetic_score`` / ``negative_aesthetic_score``
        (default 6.0 / 2.5). Other models refuse them.

        ``refiner``: another Pipeline (the SDXL refiner) that takes over the latents at
        the fraction ``refiner_start`` of the schedule (default 0.8: the steps whose
        timestep is at or above ``1000 * (1 - 0.8)`` run here, the rest there; diffusers'
        ``denoising_end`` / ``denoising_start``), with its own conditioning of the same
        prompts; it decodes the result. The aesthetic scores are then the refiner's.

        ``control``: a :class:`~ldm.control.Control` (a ControlNet with its hint image,
        scale, start / end and guess mode) or a list of them, for text-to-image, img2img
        and inpainting alike; see :mod:`ldm.control`.

        ``memory``: "auto" (default) picks the fastest level whose estimated peak fits
        the free memory; "fast", "seamless" (the VAE layer by layer in tiles, the same
        picture), "tiled" (the VAE in blended tiles), "sliced" (and sliced attention),
        "offload" (and models offloaded to the CPU between phases; accelerators only)
        start there; at "sliced" and "offload" the VAE runs seamless where that fits, else
        in blended tiles. An out-of-memory error in the U-Net or the VAE redoes that phase
        at the next leaner level, with a warning; see :mod:`ldm.limits`. How the VAE ran for
        each image is :attr:`Generation.vae_tiling`. ``vae_tiling`` ("none", "seamless" or
        "blended"; a picture's recorded "VAE tiling", as ``ldm generate --from`` passes
        it): run the VAE so where a level that fits allows it, else warn that the picture may
        differ.

        Opt-in speed-ups that change the picture a little (off by default; measured on the
        shipped model in the README): ``guidance_end`` < 1 drops the unconditional pass
        after that fraction of the steps that run (see :class:`~ldm.denoisers.CFGDenoiser`);
        ``cache_interval`` N > 1 runs the whole U-Net on every N-th evaluation only and
        the shallow branch on its kept deep features in between (DeepCache; see
        :mod:`ldm.models.feature_cache`); ``token_merging`` r in (0, 1) merges that fraction
        of the tokens around self-attention at the U-Net's highest resolution (ToMe, as the
        web UI's "Token merging ratio"; see :mod:`ldm.models.token_merging`).
        """
        tagged = _as_list(prompt, "prompt")
        negatives = self._negatives(negative_prompt, len(tagged))
        prompts, lora_tags = split_tags(tagged, negatives)
        steps = check.check_int(steps, "steps", 1)
        num_images = check.check_int(num_images, "num_images", 1)
        edit = plan_edit(image, mask, strength, count=len(prompts), width=width, height=height,
                         native=self.config.default_size, inpainting_model=self.config.is_inpainting,
                         keep_unmasked=keep_unmasked, mask_blur=mask_blur, mask_padding=mask_padding)
        width, height = (edit.width, edit.height) if edit else self._size(width, height)
        if edit is None and self.config.family == "sdxl-refiner":
            raise ValueError("this model is an SDXL refiner: it refines an image (image=..., strength=0.3) or "
                             "continues an SDXL base model's latents (pass it as refiner= to the base's call); "
                             "it does not draw from noise")
        guidance_scale = check.check_guidance(guidance_scale)
        distilled = self.config.unet.time_cond_proj_dim  # guidance is an input of the U-Net, not CFG
        check.check_distilled_negatives(distilled, negatives)
        clip_skip = check.check_clip_skip(clip_skip, min(e.max_clip_skip for e in self.text_encoders))
        schedule = check.check_schedule(schedule)
        check.check_sampling(sampler, schedule, steps, self.schedule.num_train_timesteps, spacing,
                             self.schedule.timestep_spacing)
        start = first_step(steps, edit.strength) if edit else 0
        speedups = Speedups(guidance_end, cache_interval, token_merging)
        controls = as_controls(control)
        for c in controls:
            c.controlnet.check_fits(self.config)
            c.controlnet.check_runs_with(self.device, self.dtype)
        hints = [hint_tensor(c, width, height) for c in controls]
        micro, handover, refined = self.plan_sdxl(
            height, width, original_size=original_size, crops_coords_top_left=crops_coords_top_left,
            target_size=target_size, aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
            refiner=refiner, refiner_start=refiner_start, sampler=sampler, steps=steps, schedule=schedule,
            spacing=spacing, start=start, masked=edit is not None and edit.masks[0] is not None)
        run_steps = (handover or steps) - start  # the steps this model runs
        for c in controls:  # diffusers' rule can leave a short run without a step for a ControlNet
            if not any(c.active(i, run_steps) for i in range(run_steps)):
                raise ValueError(f"control {c.controlnet.name}: start {c.start:g} / end {c.end:g} leave none of the "
                                 f"{run_steps} steps that run to it; widen the range or use more steps")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if edit is not None and latents is not None:
            raise ValueError("latents cannot be given with an image to edit: the image's latents are the start")

        tagged = [p for p in tagged for _ in range(num_images)]
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]
        edit = edit.repeat(num_images) if edit else None
        count = len(prompts)
        seeds = self._seeds(seed, count)
        guided = guidance_scale > 1 and distilled is None
        speedups.check_call(guided, steps, edit.strength if edit else None)
        per_call = plan_batch(self.config, count, height, width, dtype_bytes=self.dtype.itemsize,
                              guided=guided, device=self.device)
        runner = self._plan_memory(height, width, guided, memory, vae_tiling)
        if refiner is not None:
            refiner_runner = refiner._plan_memory(height, width, guided, memory, vae_tiling)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with tagged_loras(self.loras, lora_tags, self.lora_dirs, allow_pickle=self.allow_pickle) as lora_hashes:
            cond, uncond = self.encode_prompts(prompts, negatives if guided else None, steps=steps,
                                               clip_skip=clip_skip)
            if distilled is not None:
                cond = with_guidance_embedding(cond, guidance_scale, distilled)
            if micro is not None:
                cond, uncond = micro.attach(cond, uncond)
            cond, uncond = attach_controls(cond, uncond, controls, hints, run_steps)
            if refiner is not None:
                r_cond, r_uncond = refiner.encode_prompts(prompts, negatives if guided else None, steps=steps,
                                                          clip_skip=clip_skip)
                if refined is not None:
                    r_cond, r_uncond = refined.attach(r_cond, r_uncond)
            if edit is None:
                start_latents = EditLatents(None, self._noise(latents, generators, count, height, width))
            else:
                start_latents = self._edit_latents(edit, generators)
            run = _Run(sampler, steps, schedule == "karras", spacing, start, guidance_scale if guided else 1.0,
                       progress, callback, speedups)
            parts = []
            for first in range(0, count, per_call):
                rows = slice(first, first + per_call)
                latents_ = runner.run("U-Net", lambda: self._sample(run, cond, uncond, start_latents.rows(rows),
                                                                    generators, rows, end=handover), generators[rows],
                                      evaluations=run_steps)
                if refiner is not None:
                    base_latents = latents_
                    latents_ = refiner_runner.run("U-Net", lambda: refiner._refine(
                        run, handover, base_latents, r_cond, r_uncond, generators, rows), generators[rows],
                        evaluations=steps - handover)
                parts.append(latents_)
            result = torch.cat(parts)
        finisher = refiner if refiner is not None else self
        images, vae_modes = (result, []) if output == "latent" else finisher._finish(result, edit, output)
        params = dict(steps=steps, guidance_scale=guidance_scale, width=width, height=height,
                      guidance_embedding=guidance_scale if distilled is not None else None,
                      sampler=sampler, schedule=schedule, spacing=spacing, seed=seeds[0], clip_skip=clip_skip,
                      **speedups.params(),
                      dtype=dtype_name(self.dtype),  # the U-Net's (the CPU default may be bfloat16)
                      **(micro.params() if micro is not None else {}),
                      **({"aesthetic_score": refined.aesthetic_score,
                          "negative_aesthetic_score": refined.negative_aesthetic_score}
                         if refined is not None and refined.aesthetic_score is not None else {}),
                      **({"controls": [dict(model=c.controlnet.name, source=c.controlnet.source, scale=c.scale,
                                            start=c.start, end=c.end, guess_mode=c.guess_mode) for c in controls]}
                         if controls else {}),
                      **({"refiner": refiner.model.source,
                          "refiner_start": D.refiner_start if refiner_start is None else refiner_start}
                         if refiner is not None else {}),
                      lora_hashes=lora_hashes,
                      ti_hashes=self.embeddings.ti_hashes(prompts + (negatives if guided else [])),
                      **(edit.params() if edit else dict(strength=None, mask_blur=None, mask_padding=None)))
        return Generation(images, seeds, tagged, negatives, params, vae_modes)

    def _plan_memory(self, height: int, width: int, guided: bool, memory: str, vae_tiling: str | None) -> Any:
        """This pipeline's runner, set to the memory plan of a call (see :func:`ldm.limits.plan_memory`)."""
        return use_plan(self, plan_memory(self.config, height, width, dtype_bytes=self.dtype.itemsize, guided=guided,
                                          device=self.device, memory=memory, resident=resident_bytes(self),
                                          vae_mode=vae_tiling))

    def _edit_latents(self, edit: EditRequest, generators: list[torch.Generator]) -> EditLatents:
        """Init latents, noise and mask inputs of an edit, per image from its generator."""
        masks = [None if m is None else binary_mask(m) for m in edit.masks]
        dtype = self._vae_dtype()
        with self._vae_in(dtype) as vae:
            latents = prepare(
                vae, [to_model_pixels(a) for a in edit.images], masks, generators,
                scaling_factor=self.config.vae.scaling_factor, latent_channels=self.config.vae.latent_channels,
                factor=self.config.vae.downsample_factor, inpainting_model=self.config.is_inpainting,
                from_image=edit.from_image,
            )
        encoded = [t for t in (latents.init, latents.known, latents.concat) if t is not None]
        if not all(torch.isfinite(t).all() for t in encoded):
            raise NonFiniteError(f"the VAE encoded the input image(s) to NaN/inf in {dtype}; "
                                 "nothing was sampled (try dtype float32)")
        return latents

    def _sample(self, run: "_Run", cond: Cond, uncond: Cond | None, part: EditLatents,
                generators: list[torch.Generator], rows: slice, *, start: int | None = None,
                end: int | None = None) -> torch.Tensor:
        """Sample the images ``rows`` of the call (a sub-batch that fits in memory; ``part``
        holds their rows), steps ``start`` (default the call's first) to ``end`` (default
        the last)."""
        start = run.start if start is None else start
        cond = _with_concat(cond.select(rows), part.concat)
        uncond = _with_concat(uncond.select(rows), part.concat) if uncond is not None else None
        # A scheduled conditioning finds each step from the levels of the steps the call runs.
        plan = sampling_schedule(run.sampler, self.schedule, run.steps, karras=run.karras, spacing=run.spacing)
        interval = run.speedups.cache_interval
        cache = FeatureCache(interval) if interval > 1 else None
        denoiser = self._denoiser(cond, uncond, run.guidance_scale, plan.sigmas[run.start:],
                                  guidance_end=run.speedups.guidance_end, cache=cache)
        on_step = _progress((end or run.steps) - start, run.progress, run.callback, run.sampler, rows.start)
        if part.known is not None:
            on_step = _chain(blend_callback(part, plan.sigmas[start:]), on_step)
        set_token_merging(self.unet, run.speedups.token_merging)
        try:
            return sample(
                run.sampler, denoiser, part.noise, run.steps, self.schedule, karras=run.karras,
                generators=generators[rows], callback=on_step, start=start, init=part.init, end=end,
                spacing=run.spacing,
            )
        finally:
            set_token_merging(self.unet, 0.0)

    def plan_sdxl(self, height: int, width: int, *, original_size: Any = None, crops_coords_top_left: Any = None,
                  target_size: Any = None, aesthetic_score: Any = None, negative_aesthetic_score: Any = None,
                  refiner: "Pipeline | None" = None, refiner_start: Any = None, sampler: str = D.sampler,
                  steps: int = D.steps, schedule: str | None = None, spacing: str | None = None, start: int = 0,
                  masked: bool = False) -> tuple[SizeConditioning | None, int | None, SizeConditioning | None]:
        """The checks :meth:`generate` makes of SDXL's size conditioning and of a refiner,
        for a call drawing ``height`` x ``width`` whose first step is ``start`` (``masked``:
        an inpainting call): this model's ids, the step at which ``refiner`` takes over, and
        the refiner's ids (None where they do not apply). ValueError says what is wrong."""
        sizes = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left)
        scores = dict(aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score)
        # With a refiner the aesthetic scores are its own.
        micro = SizeConditioning.build(self.config, height, width, target_size=target_size, **sizes,
                                       **({} if refiner is not None else scores))
        handover = self._handover(refiner, refiner_start, sampler, steps, schedule == "karras", spacing, start,
                                  masked)
        refined = SizeConditioning.build(refiner.config, height, width, **sizes, **scores) if refiner else None
        return micro, handover, refined

    def _handover(self, refiner: "Pipeline | None", refiner_start: Any, sampler: str, steps: int, karras: bool,
                  spacing: str | None, start: int, masked: bool) -> int | None:
        """The step at which ``refiner`` takes over (None without one), after checking it can."""
        if refiner is None:
            if refiner_start is not None:
                raise ValueError("refiner_start needs a refiner (refiner=another Pipeline)")
            return None
        if not isinstance(refiner, Pipeline):
            raise TypeError(f"refiner must be a Pipeline, got {type(refiner).__name__}")
        if refiner is self:
            raise ValueError("refiner is this pipeline itself; load the refiner model as its own Pipeline")
        if {self.config.unet.time_cond_proj_dim, refiner.config.unet.time_cond_proj_dim} != {None}:
            raise ValueError("refiner: a guidance-distilled (LCM) model cannot hand over to or take over from "
                             "another model; run it alone")
        fraction = check.check_fraction(D.refiner_start if refiner_start is None else refiner_start, "refiner_start")
        if refiner.config.vae.latent_channels != self.config.vae.latent_channels or (
                {self.config.family, refiner.config.family} - set(SDXL_FAMILIES)
                and self.config.family != refiner.config.family):
            raise ValueError(f"refiner: a {refiner.config.family} model cannot continue a {self.config.family} "
                             "model's latents (another latent space); an SDXL refiner continues SDXL")
        if spacing is None and refiner.schedule.timestep_spacing != self.schedule.timestep_spacing:
            raise ValueError(f"refiner: its timestep spacing ({refiner.schedule.timestep_spacing}) differs from "
                             f"this model's ({self.schedule.timestep_spacing}); pass spacing= to use one for both")
        if not torch.equal(refiner.schedule.alphas_cumprod, self.schedule.alphas_cumprod):
            raise ValueError("refiner: its training noise schedule differs from this model's; the hand-over "
                             "needs the same levels")
        if refiner.config.is_inpainting or masked:
            raise ValueError("refiner: inpainting with a refiner is not supported; refine the result with "
                             "the refiner as its own img2img call")
        plan = sampling_schedule(sampler, self.schedule, steps, karras=karras, spacing=spacing)
        # diffusers: the base runs the timesteps >= round(1000 * (1 - refiner_start)).
        cutoff = int(round(self.schedule.num_train_timesteps * (1 - fraction)))
        switch = sum(1 for t in plan.timesteps[:steps] if float(t) >= cutoff)
        if not start < switch < steps:
            raise ValueError(f"refiner_start {fraction:g} hands over at step {switch} of {steps}, "
                             f"{'before the first step that runs' if switch <= start else 'after the last'}; "
                             "move it towards the middle or use more steps")
        return switch

    def _refine(self, run: "_Run", switch: int, latents: torch.Tensor, cond: Cond, uncond: Cond | None,
                generators: list[torch.Generator], rows: slice) -> torch.Tensor:
        """Steps ``switch ..`` of the call on this (refiner) model, from the base's latents."""
        plan = sampling_schedule(run.sampler, self.schedule, run.steps, karras=run.karras, spacing=run.spacing)
        init = latents.to(self.device, torch.float32) * float(plan.sigmas[switch] ** 2 + 1) ** 0.5
        part = EditLatents(init, torch.zeros_like(init))
        return self._sample(run, cond, uncond, part, generators, rows, start=switch)

    def _finish(self, latents: torch.Tensor, edit: EditRequest | None, output: str) -> tuple[Any, list[str]]:
        """Decode, then (for an edit) keep the unmasked pixels / paste crops back; with
        the VAE mode of each image."""
        array, modes = self._decode_all(latents)
        return _as_output(array if edit is None else edit.finish(array), output), modes

    def _negatives(self, negative: str | Sequence[str] | None, n: int) -> list[str]:
        if negative is None:
            return [""] * n
        negatives = _as_list(negative, "negative_prompt")
        if len(negatives) == 1:
            return negatives * n
        if len(negatives) != n:
            raise ValueError(
                f"negative_prompt has {len(negatives)} entries but prompt has {n}; "
                "give one negative prompt or one per prompt"
            )
        return negatives

    def _size(self, width: int | None, height: int | None) -> tuple[int, int]:
        native = self.config.default_size
        return (check.check_side(native if width is None else width, "width", native),
                check.check_side(native if height is None else height, "height", native))

    @classmethod
    def _seeds(cls, seed: int | Sequence[int] | None, count: int) -> list[int]:
        if isinstance(seed, (list, tuple)):
            if len(seed) != count:
                raise ValueError(
                    f"seed is a list of {len(seed)} seeds but the call makes {count} images; "
                    "give one seed, or one per image"
                )
            return [check.check_seed(s) for s in seed]
        base = cls._seed(seed)
        if base + count - 1 > check.MAX_SEED:
            raise ValueError(f"seed + image index must stay <= {check.MAX_SEED}; seed {base} is too large")
        return [base + k for k in range(count)]

    @staticmethod
    def _seed(seed: int | None) -> int:
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            logger.info("seed %d", seed)
            return seed
        return check.check_seed(seed)

    def _noise(self, latents: torch.Tensor | None, generators: list[torch.Generator],
               count: int, height: int, width: int) -> torch.Tensor:
        factor = self.config.vae.downsample_factor
        shape = (self.config.vae.latent_channels, height // factor, width // factor)
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != (count, *shape):
                raise ValueError(
                    f"latents must be a tensor of shape {(count, *shape)}, got "
                    f"{getattr(latents, 'shape', type(latents).__name__)}"
                )
            if not torch.isfinite(latents).all():
                raise ValueError("latents contain NaN or inf")
            return latents.to(self.device, torch.float32)
        # One draw per image from its own CPU generator, as diffusers does with a
        # list of generators, so image k is the same whatever the batch or device.
        noise = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(noise).to(self.device)

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None = None, *,
                       steps: int | None = None, clip_skip: int = D.clip_skip) -> tuple[Cond, Cond | None]:
        """Conditioning for prompts (and negatives, padded to the same context length), in
        AUTOMATIC1111's prompt language (:func:`ldm.prompts.encode_conditioning`).

        Prompt editing and alternation need ``steps``; a side with them is a
        :class:`~ldm.conditioning.ScheduledConditioning`, otherwise a :class:`Conditioning`.
        """
        return encode_conditioning(self.text_encoders, self.tokenizers, prompts, negatives, steps=steps,
                                   clip_skip=clip_skip, embeddings=self.embeddings,
                                   zero_empty_negatives=self.config.family in ZERO_EMPTY_NEGATIVE)

    def _denoiser(self, cond: Cond, uncond: Cond | None, scale: float, sigmas: torch.Tensor | None = None, *,
                  guidance_end: float = 1.0, cache: FeatureCache | None = None) -> CFGDenoiser:
        # Cast once here, not per step (for a schedule, each segment once).
        cond = cond.to(self.device, self.dtype)
        uncond = uncond.to(self.device, self.dtype) if uncond is not None else None

        def unet_call(x: torch.Tensor, t: torch.Tensor, c: Conditioning) -> torch.Tensor:
            return self._unet_call(x, t, c, cache)

        denoiser = Denoiser(unet_call, self.schedule, self.config.prediction_type)
        return CFGDenoiser(denoiser, cond, uncond, scale, sigmas=sigmas, guidance_end=guidance_end)

    def _unet_call(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                   cache: FeatureCache | None = None) -> torch.Tensor:
        # The sampler works in float32; the U-Net runs in the pipeline's dtype.
        unet = self._compiled_unet if self._compiled_unet is not None and cache is None else self.unet
        return run_unet(unet, x.to(self.device, self.dtype), t.to(self.device), cond, cache).float()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, output: Literal["pil", "np"] = "pil") -> Any:
        """Latents (VP scaled, as samplers return them) to images in [0, 1]."""
        return _as_output(self._decode_all(latents)[0], output)

    def _decode_all(self, latents: torch.Tensor) -> tuple[np.ndarray, list[str]]:
        """Images in [0, 1] (N, H, W, C), and how the VAE ran for each: the runner's mode
        after its decode, which covers its encode too (a call's plan only gets leaner)."""
        pixels, modes = [], []
        for k, z in enumerate(latents):
            pixels.append(self._decode_one(z[None], k))
            modes.append(runner_of(self).plan.vae_mode)
        return torch.cat(pixels).permute(0, 2, 3, 1).cpu().numpy(), modes

    def _decode_one(self, z: torch.Tensor, index: int) -> torch.Tensor:
        # One image at a time bounds the decoder's memory, which dominates at 512+.
        z = z / self.config.vae.scaling_factor
        dtype = self._vae_dtype()
        with self._vae_in(dtype) as vae:
            image = vae.decode(z.to(dtype)).float()
        if not torch.isfinite(image).all() and dtype != torch.float32:
            logger.warning("VAE decode in %s gave NaN/inf; decoding again in float32", dtype)
            with self._vae_in(torch.float32) as vae:
                image = vae.decode(z.float()).float()
        if not torch.isfinite(image).all():
            raise NonFiniteError(f"image {index}: the VAE decoded NaN/inf even in float32; no image was made")
        return (image / 2 + 0.5).clamp(0, 1)

    def _vae_dtype(self) -> torch.dtype:
        """The dtype the VAE encodes and decodes in: its own, but for a float16 VAE whose
        config says float16 overflows it (``force_upcast``, SDXL's): :func:`vae_upcast_dtype`,
        logged once per pipeline, as diffusers' ``needs_upcasting``."""
        # diffusers' SDXL pipelines honour force_upcast; its SD 1.x/2.x pipeline does not (and
        # diffusers writes force_upcast=true into every VAE folder it saves).
        if self.vae.dtype != torch.float16 or not self.config.vae.force_upcast or \
                self.config.family not in SDXL_FAMILIES:
            return self.vae.dtype
        dtype = vae_upcast_dtype(self.vae.device)
        if not self._vae_upcast_logged:
            logger.info("VAE: encoding and decoding in %s, not float16, which this VAE overflows (force_upcast in "
                        "its config; an fp16-fix VAE, vae=..., runs in float16)", dtype_name(dtype))
            self._vae_upcast_logged = True
        return dtype

    @contextmanager
    def _vae_in(self, dtype: torch.dtype):
        """The VAE in ``dtype`` for the block, then its own tensors back: kept, not converted
        back, as float16 -> bfloat16 -> float16 would round the weights."""
        if dtype == self.vae.dtype:
            yield runner_of(self).vae(self.vae)
            return
        own = self.vae.state_dict()
        try:
            yield runner_of(self).vae(self.vae.to(dtype))
        finally:
            self.vae.load_state_dict(own, assign=True)


@dataclass(frozen=True)
class _Run:
    """The sampling settings of one call, shared by its sub-batches."""

    sampler: str
    steps: int
    karras: bool
    spacing: str | None  # the call's (None: the model's own)
    start: int
    guidance_scale: float
    progress: bool
    callback: Callable | None
    speedups: Speedups = Speedups()


def _to_pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray((array * 255).round().astype(np.uint8))


def _with_concat(cond: Cond | None, concat: torch.Tensor | None) -> Cond | None:
    """``cond`` carrying a 9-channel model's extra input channels (the same for the
    unconditional half, as diffusers stacks ``[mask] * 2``)."""
    if cond is None or concat is None:
        return cond
    return cond.replace(concat=concat)


def _chain(first: Callable, then: Callable) -> Callable:
    """Per-step hooks in turn: ``first`` may replace the latents, ``then`` sees the result."""

    def on_step(i: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        x = first(i, total, x, denoised)
        then(i, total, x, denoised)
        return x

    return on_step


def _progress(steps: int, enabled: bool, callback: Callable | None, sampler: str, first: int) -> Callable:
    """The per-step hook: checks the latents stay finite, then drives the bar and the user's callback."""
    bar = None
    if enabled:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=sampler, leave=False)

    def on_step(i: int, total: int, x: torch.Tensor, *_: Any) -> None:
        finite = torch.isfinite(x.flatten(1)).all(dim=1)
        if not finite.all():
            if bar is not None:
                bar.close()
            bad = [first + k for k in (~finite).nonzero().flatten().tolist()]
            raise NonFiniteError(
                f"sampling produced NaN/inf at step {i + 1} of {total} ({sampler}) in image(s) {bad}; "
                "nothing was written (in float16, try dtype float32)"
            )
        if bar is not None:
            bar.update(1)
            if i + 1 >= total:
                bar.close()
        if callback is not None:
            callback(i, total, x)

    return on_step
