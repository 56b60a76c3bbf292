"""Generation parameters in PNG files, in AUTOMATIC1111's "infotext" format.

Every PNG that ``ldm`` writes carries a ``parameters`` text chunk that
AUTOMATIC1111's web UI, ComfyUI importers and civitai read::

    a cat wearing a hat
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: v1-5

Line 1 (and any further lines) is the prompt, then an optional ``Negative
prompt:`` (which may span lines too), then one line of ``Key: value`` pairs; a
value containing ``,``, ``:`` or a newline is written as a JSON string, as the
web UI does. Sampler names are the web UI's, with a `` Karras`` suffix for the
Karras schedule; the web UI's newer ``Schedule type: Karras`` key is read too.
Image edits carry the web UI's keys too: ``Denoising strength`` (img2img), ``Mask blur``
(inpainting), ``Inpaint area: Only masked`` with ``Masked area padding`` (only the masked
region rendered). The input image and mask are not in the text (the web UI does not write
them), so an edited image is made again with its inputs given anew. ``Clip skip`` (written
when above 1, as the web UI does), ``Lora hashes`` and ``TI hashes`` (``"name: hash, ..."``:
the LoRAs of the prompt's ``<lora:...>`` tags and the embeddings it used, so ``--from`` can
tell when a file differs) are fields too, as are the web UI's ``VAE hash`` and ``VAE`` (a VAE
file used in place of the model's: the first 10 hex digits of its SHA-256 and its file name,
modules/sd_vae.py's ``get_loaded_vae_hash`` / ``get_loaded_vae_name``). Keys ``ldm`` has no
use for are kept in :attr:`GenerationParams.extra`.

SDXL: the web UI's ``Refiner: <name> [<hash>]`` and ``Refiner switch at: 0.8`` (its
modules/sd_samplers_common.py ``apply_refiner``, the checkpoint's ``short_title``) name the
refiner and the fraction of the schedule it takes over at. SDXL's size conditioning has no
web UI keys; ``ldm`` writes ``Original size: 1024x768`` and ``Target size: 1024x768``
(``WxH``, as ``Size``), ``Crop offset: 0x64`` (``XxY``: pixels from the left, from the top)
and the refiner's ``Aesthetic score: 6`` / ``Negative aesthetic score: 2.5``, each only when
it differs from the pipeline's default (the output size, ``0x0``, 6 and 2.5), so an image
made with the defaults carries no key other tools do not know.

ControlNet: one ``ControlNet N`` key per ControlNet, in the format of the web UI's ControlNet
extension (:mod:`ldm.controlmeta`): its preprocessor, model ``name [hash]``, weight, guidance
start and end, control mode. The hint image is not in the text (the extension does not write
it), so such an image is made again with its hint given anew; a unit ``ldm`` cannot reproduce
is kept aside in ``extra`` and refused by :meth:`GenerationParams.check_supported`.

The format has no escape for a prompt line that starts with ``Negative prompt:``
(the web UI reads it as the start of the negative prompt), and readers strip the
spaces around every line. ``ldm`` keeps the text exactly as other tools read it and
refuses such parameters where they are written: :func:`check_round_trip` says what
would not read back; :func:`normalize_prompt` drops the spaces, which CLIP ignores.

Text read from an image is untrusted: :func:`check_params` validates it and caps
what it may ask (steps, size, prompt length) before anything renders.

>>> params = read_parameters("cat.png")
>>> images = Pipeline.from_pretrained(...).generate(**params.to_kwargs()).images
"""

from __future__ import annotations

import json
import os
import re
import stat
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, BinaryIO, Callable, Iterator

from PIL import Image, PngImagePlugin

from .atomicio import atomic_write
from .controlmeta import KEY as CONTROL_KEY
from .controlmeta import PREFIX as CONTROL_PREFIX
from .controlmeta import ControlParams, check_writable, format_unit, parse_unit, unit_keys
from .dtypes import canonical_dtype_name
from .limits import check_vae_mode
from .validation import (
    A1111_SAMPLERS, check_finite, check_fraction, check_guidance, check_guidance_end, check_int, check_merge_ratio,
    check_seed, check_side, check_spacing, check_strength,
)

PNG_KEY = "parameters"

_FROM_A1111 = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
_KARRAS = " Karras"
# "Schedule type" values of web UI >= 1.9 that match one of ldm's schedules.
_SCHEDULE_TYPES = {"karras": "karras", "automatic": "default", "normal": "default", "uniform": "default"}

# The web UI's own pattern (modules/infotext_utils.py): "Key: value," pairs, a
# value either a JSON-quoted string or anything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"
_ASCII_SPACE = " \t\r\n\x0b\x0c"
# The web UI's editing keys (modules/processing.py): "Denoising strength" for every img2img,
# "Mask blur" with a mask, and the two keys of "inpaint only masked".
STRENGTH, MASK_BLUR, INPAINT_AREA, PADDING = "Denoising strength", "Mask blur", "Inpaint area", "Masked area padding"
CLIP_SKIP, LORA_HASHES, TI_HASHES = "Clip skip", "Lora hashes", "TI hashes"
SPACING = "Timestep spacing"  # ldm's own key (the web UI has no such setting), written when chosen
# ldm's own key, written for a guidance-distilled (LCM) model: the guidance scale went into the
# U-Net's guidance embedding (w = scale - 1) and no classifier-free guidance ran. It equals "CFG
# scale", which the web UI reads; --from takes either.
GUIDANCE_EMBEDDING = "Guidance embedding"
REFINER, REFINER_START = "Refiner", "Refiner switch at"
# ldm's own keys for the opt-in speed-ups that change the picture (Pipeline.generate's
# guidance_end and cache_interval), written when used so that --from makes the same picture.
GUIDANCE_END, CACHE_INTERVAL = "Guidance end", "Cache interval"
# The web UI's own key for token merging (its "Token merging ratio" setting).
TOKEN_MERGING = "Token merging ratio"
VAE_HASH, VAE = "VAE hash", "VAE"
# ldm's own key: the dtype the U-Net ran in. The CPU default differs between machines
# (bfloat16 where it is native and faster, else float32) and the picture with it, so
# --from makes it again in the recorded dtype where the machine runs that natively.
DTYPE = "Dtype"
# ldm's own key: how the VAE ran ("none", "seamless", "blended": ldm.limits.VAE_MODES). The
# memory level "auto" picks depends on the machine's free memory, and blended tiles change
# the picture, so --from runs the VAE the recorded way where that fits.
VAE_TILING = "VAE tiling"
# SDXL's size-conditioning keys (ldm's own: the web UI has none) -> GenerationParams fields.
# Each pair is written "AxB" in the order of --size ("WxH", "XxY") and held as
# Pipeline.generate takes it, (height, width) / (top, left): the reverse.
SIZE_KEYS = {"Original size": "original_size", "Crop offset": "crops_coords_top_left",
             "Target size": "target_size"}
SCORE_KEYS = {"Aesthetic score": "aesthetic_score", "Negative aesthetic score": "negative_aesthetic_score"}
# The pipeline's defaults for the refiner's scores (ldm.size_conditioning; diffusers' and the web UI's).
DEFAULT_SCORES = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}
ONLY_MASKED = "Only masked"
# The web UI's default padding when an image says "Only masked" without one (infotext_utils).
DEFAULT_PADDING = 32
# Keys this module turns into fields; everything else goes to ``extra``.
_KNOWN = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model", VAE_HASH, VAE,
          STRENGTH, MASK_BLUR, INPAINT_AREA, PADDING, CLIP_SKIP, LORA_HASHES, TI_HASHES, REFINER, SPACING,
          GUIDANCE_EMBEDDING, GUIDANCE_END, CACHE_INTERVAL, TOKEN_MERGING, DTYPE, VAE_TILING,
          REFINER_START, *SIZE_KEYS, *SCORE_KEYS)
# A txt2img with the web UI's hires fix writes "Denoising strength" for its second pass.
_HIRES_PREFIX = "Hires "

# Caps on what an image's text may ask (it comes from any file a user is given):
# above them a PNG would size the work, not the user. Flags are not capped.
MAX_STEPS = 1000  # as many as the model's training timesteps; the web UI's slider stops at 150
MAX_SIDE = 4096  # pixels per side; the web UI's slider stops at 2048
MAX_PROMPT_CHARS = 20_000  # ~70 CLIP chunks; PNG text chunks may hold megabytes
MAX_CLIP_SKIP = 48  # more than any CLIP text tower has layers (bigG: 32)
# SDXL's size ids do not size any work, but float32 holds whole numbers exactly only up to
# 2**24; 65536 is far beyond any picture SDXL was trained on.
MAX_SIZE_ID = 65536
_PAIR = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# "name [hash]": the web UI's short title of a checkpoint (a name alone when it has no hash).
_TITLE = re.compile(r"^(?:(.*) )?\[([0-9a-fA-F]+)\]$", re.S)


@dataclass(frozen=True)
class GenerationParams:
    """What made an image: enough to make it again with :meth:`to_kwargs`.

    ``sampler`` and ``schedule`` are ldm's names; ``sampler`` is None when the
    text names a sampler ldm does not have (the text is then in ``extra["Sampler"]``).
    ``strength`` is set for an image made from an input image, ``mask_blur`` when a mask
    was used too, ``mask_padding`` when only the masked region was rendered.
    SDXL's ``original_size`` / ``target_size`` ``(height, width)``, ``crops_coords_top_left``
    ``(top, left)`` and the refiner's ``aesthetic_score`` / ``negative_aesthetic_score`` are
    as ``Pipeline.generate`` takes them, None for its default. ``refiner`` / ``refiner_hash``
    name the refiner model as ``model`` / ``model_hash`` name the model; ``refiner_start``
    is where it took over. ``vae`` / ``vae_hash`` name a VAE file used in place of the model's
    (its file name with the extension, as the web UI writes it). ``controls``: the ControlNets,
    in order (:class:`ldm.controlmeta.ControlParams`). ``guidance_embedding``: for a
    guidance-distilled (LCM) model, the guidance scale its U-Net took as an input (equal to
    ``guidance_scale``; None for other models). ``dtype``: the U-Net's dtype name
    (``"bfloat16"``); not a :meth:`to_kwargs` argument but the pipeline's, as ``ldm generate
    --from`` loads it (:func:`ldm.dtypes.dtype_to_remake`). ``vae_tiling``: how the VAE
    ran (:attr:`ldm.pipeline.Generation.vae_tiling`), passed on to remake it so where it fits.
    """

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    schedule: str = "default"
    spacing: str | None = None
    guidance_scale: float | None = None
    guidance_embedding: float | None = None
    guidance_end: float | None = None
    cache_interval: int | None = None
    token_merging: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    model: str | None = None
    model_hash: str | None = None
    vae: str | None = None
    vae_hash: str | None = None
    dtype: str | None = None
    vae_tiling: str | None = None
    strength: float | None = None
    mask_blur: int | None = None
    mask_padding: int | None = None
    clip_skip: int | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner: str | None = None
    refiner_hash: str | None = None
    refiner_start: float | None = None
    controls: tuple[ControlParams, ...] = ()
    lora_hashes: dict[str, str] = field(default_factory=dict)
    ti_hashes: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)

    def check_supported(self) -> None:
        """Raise ValueError for a sampler or schedule type (read from an image) that ldm lacks."""
        if self.sampler is None and "Sampler" in self.extra:
            raise ValueError(
                f"sampler {self.extra['Sampler']!r} has no ldm equivalent; valid: "
                f"{', '.join(A1111_SAMPLERS.values())} (give another with sampler=...)"
            )
        if "Schedule type" in self.extra:
            raise ValueError(
                f"schedule type {self.extra['Schedule type']!r} is not one ldm has "
                "(default or karras); give one with schedule=..."
            )
        for key in unit_keys(self.extra):  # units parse_parameters set aside: say why
            try:
                parse_unit(self.extra[key])
            except ValueError as exc:
                raise ValueError(f"{key} cannot be reproduced: {exc}") from None

    @property
    def refiner_label(self) -> str | None:
        """The refiner as the web UI's ``Refiner`` key names it: ``name [hash]``."""
        if self.refiner is None and self.refiner_hash is None:
            return None
        return " ".join(x for x in (self.refiner, f"[{self.refiner_hash}]" if self.refiner_hash else None) if x)

    def to_kwargs(self, refiner: Any = None, control: Any = None) -> dict[str, Any]:
        """Keyword arguments for :meth:`ldm.Pipeline.generate` (fields that are set).

        Parameters that name a refiner need it loaded and given as ``refiner`` (a Pipeline),
        e.g. ``Pipeline.from_pretrained(find_model(p.refiner, p.refiner_hash))`` with
        :func:`ldm.modelref.find_model`, as ``ldm generate --from`` does; without it they
        are refused rather than rendered unrefined. A ``refiner`` given to parameters that
        name none is used too (``refiner_start`` then defaults to the pipeline's). A VAE they
        name is the pipeline's to load: ``Pipeline.from_pretrained(..., vae=find_vae(p.vae,
        p.vae_hash))`` (:func:`ldm.checkpoints.vae_file.find_vae`), as ``ldm generate --from`` does.
        Parameters with ``controls`` need them as ``control`` (:class:`ldm.Control` objects: each
        ControlNet found with :func:`ldm.modelref.find_controlnet`, with its hint made again), as
        ``ldm generate --from IMAGE --control-image HINT`` does.
        """
        self.check_supported()
        if refiner is None and self.refiner_label is not None:
            raise ValueError(f"these parameters were rendered with the refiner {self.refiner_label}: load it "
                             "and pass it as to_kwargs(refiner=...)")
        if control is None and self.controls:
            raise ValueError(f"these parameters were rendered with the ControlNet(s) "
                             f"{', '.join(c.label for c in self.controls)}: load them with their hints and pass "
                             "them as to_kwargs(control=...)")
        kwargs: dict[str, Any] = dict(
            prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
            guidance_scale=self.guidance_scale if self.guidance_scale is not None else self.guidance_embedding,
            width=self.width, height=self.height, seed=self.seed, sampler=self.sampler, schedule=self.schedule, spacing=self.spacing,
            strength=self.strength,
            mask_blur=self.mask_blur, mask_padding=self.mask_padding, clip_skip=self.clip_skip,
            original_size=self.original_size, crops_coords_top_left=self.crops_coords_top_left,
            target_size=self.target_size, aesthetic_score=self.aesthetic_score,
            negative_aesthetic_score=self.negative_aesthetic_score, refiner=refiner,
            guidance_end=self.guidance_end, cache_interval=self.cache_interval, token_merging=self.token_merging,
            vae_tiling=self.vae_tiling, refiner_start=self.refiner_start if refiner is not None else None, control=control,
        )
        return {k: v for k, v in kwargs.items() if v is not None}

    @property
    def edit_inputs(self) -> str | None:
        """What an edited image was made from besides its text, with the keys that say so
        (``"an input image (Denoising strength: 0.6)"``); None for one made from the prompt alone."""
        keys = [(STRENGTH, self.strength), (MASK_BLUR, self.mask_blur)]
        if not any(v is not None for _, v in keys):
            return None
        what = "an input image and a mask" if self.mask_blur is not None else "an input image"
        return f"{what} ({', '.join(f'{k}: {_quote(v)}' for k, v in keys if v is not None)})"

    def replace(self, **changes: Any) -> "GenerationParams":
        """A copy with ``changes``; a new sampler or schedule drops an unsupported one's text."""
        extra = dict(changes.pop("extra", self.extra))
        if changes.get("sampler") is not None:
            extra.pop("Sampler", None)
        if changes.get("schedule") is not None:
            extra.pop("Schedule type", None)
        return replace(self, extra=extra, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON holds them (pairs as lists), so a record read back compares equal."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def to_text(self) -> str:
        """The AUTOMATIC1111 infotext."""
        return format_parameters(self)

    @classmethod
    def from_text(cls, text: str) -> "GenerationParams":
        return parse_parameters(text)

    @property
    def sampler_label(self) -> str | None:
        """The sampler as the web UI names it, e.g. ``DPM++ 2M Karras``."""
        if self.sampler is None:
            return self.extra.get("Sampler")
        name = A1111_SAMPLERS.get(self.sampler, self.sampler)
        return name + _KARRAS if self.schedule == "karras" else name


def _quote(value: Any) -> str:
    text = _number(value) if isinstance(value, float) else str(value)
    if "," in text or ":" in text or "\n" in text or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float) -> str:
    # 7.0 -> "7", 7.5 -> "7.5"; repr keeps every digit, so parsing gives the same float.
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def format_parameters(p: GenerationParams) -> str:
    """``p`` as AUTOMATIC1111 infotext (prompt, negative prompt, then one line of keys)."""
    pairs: list[tuple[str, Any]] = [
        ("Steps", p.steps),
        ("Sampler", p.sampler_label),
        (SPACING, p.spacing),
        ("CFG scale", p.guidance_scale),
        (GUIDANCE_EMBEDDING, p.guidance_embedding),
        (GUIDANCE_END, p.guidance_end),
        (CACHE_INTERVAL, p.cache_interval),
        (TOKEN_MERGING, p.token_merging),
        ("Seed", p.seed),
        ("Size", f"{p.width}x{p.height}" if p.width and p.height else None),
        ("Model hash", p.model_hash),
        ("Model", p.model),
        (VAE_HASH, p.vae_hash),
        (VAE, p.vae),
        (DTYPE, p.dtype),
        (VAE_TILING, p.vae_tiling),
        (STRENGTH, p.strength),
        (MASK_BLUR, p.mask_blur),
        (INPAINT_AREA, ONLY_MASKED if p.mask_padding is not None else None),
        (PADDING, p.mask_padding),
        (CLIP_SKIP, p.clip_skip),  # the caller leaves out 1, as the web UI does
        *((key, format_pair(getattr(p, name))) for key, name in SIZE_KEYS.items()),
        *((key, getattr(p, name)) for key, name in SCORE_KEYS.items()),
        (REFINER, p.refiner_label),
        (REFINER_START, p.refiner_start),
        (LORA_HASHES, _format_hashes(p.lora_hashes)),
        (TI_HASHES, _format_hashes(p.ti_hashes)),
        *((f"{CONTROL_PREFIX}{i}", format_unit(c, p.width, p.height)) for i, c in enumerate(p.controls)),
    ]
    pairs += [(k, v) for k, v in p.extra.items() if k != "Sampler"]
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"{_NEGATIVE} {p.negative_prompt}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in pairs if v is not None))
    return "\n".join(lines)


def _format_hashes(hashes: dict[str, str]) -> str | None:
    # The web UI drops ":" and "," from the names so the list reads back (extra_networks_lora.py).
    items = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items()]
    return ", ".join(items) or None


def format_pair(pair: tuple[int, int] | None) -> str | None:
    """``(height, width)`` as ``"WxH"`` (``(top, left)`` as ``"XxY"``): the order of ``--size``."""
    return None if pair is None else f"{pair[1]}x{pair[0]}"


def read_pair(value: Any, name: str, form: str) -> tuple[Any, Any]:
    """The two values, unchecked, of ``"AxB"`` text, an ``[a, b]`` list (from JSON) or one
    value for both; anything else is refused as not of ``form`` (``"'WIDTHxHEIGHT' ..."``)."""
    m = _PAIR.match(value) if isinstance(value, str) else None
    if m:
        return int(m[1]), int(m[2])
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return value[0], value[1]
    if not isinstance(value, (str, list, tuple, dict)):
        return value, value
    raise ValueError(f"{name} must be {form}, got {value!r:.80}")


def parse_pair(value: Any, name: str, minimum: int = 1) -> tuple[int, int]:
    """``"WxH"`` (see :func:`read_pair`) as ``(h, w)``; with ``minimum`` 0, ``"XxY"`` as
    ``(top, left)``. Each a whole number from ``minimum`` to :data:`MAX_SIZE_ID`."""
    form = "'XxY' (pixels from the left x from the top, e.g. '0x64')" if minimum == 0 else \
        "'WIDTHxHEIGHT' (e.g. '1024x768')"
    first, second = (check_int(v, name, minimum, MAX_SIZE_ID) for v in read_pair(value, name, form))
    return second, first


def recorded_size_fields(values: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """The SDXL fields a PNG records of ``values`` (a ``Generation.params``, or the values a
    batch line asks for): each left out (None) where it is the pipeline's default for an
    image of ``width`` x ``height``, as the web UI leaves out its defaults."""
    defaults = {"original_size": (height, width), "crops_coords_top_left": (0, 0),
                "target_size": (height, width), **DEFAULT_SCORES}
    fields = {}
    for name, default in defaults.items():
        value = values.get(name)
        fields[name] = None if value is None or value == default else value
    return fields


def _parse_hashes(key: str, value: str) -> dict[str, str]:
    hashes = {}
    for item in value.split(","):
        name, sep, digest = item.rpartition(":")
        if not sep or not name.strip() or not digest.strip():
            raise ValueError(f"parameters: {key!r} must be 'name: hash, ...', got {value!r}")
        hashes[name.strip()] = digest.strip()
    return hashes


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _int(key: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"parameters: {key!r} must be an integer, got {value!r}") from None


def _float(key: str, value: str) -> float:
    try:
        return check_finite(float(value), key)
    except ValueError:
        raise ValueError(f"parameters: {key!r} must be a finite number, got {value!r}") from None


def _vae_tiling(value: str) -> str:
    try:
        return check_vae_mode(value, VAE_TILING)
    except ValueError as exc:
        raise ValueError(f"parameters: {exc}") from None


def _sampler(value: str) -> tuple[str | None, str]:
    """Web UI sampler name -> (ldm sampler or None, schedule)."""
    name, schedule = value.strip(), "default"
    if name.endswith(_KARRAS):
        name, schedule = name[: -len(_KARRAS)], "karras"
    return _FROM_A1111.get(name.lower()), schedule


def parse_parameters(text: str) -> GenerationParams:
    """Parse infotext written by ldm or AUTOMATIC1111 (multi-line prompts, extra keys)."""
    *lines, last = text.strip().split("\n")
    # As in the web UI: a last line with fewer than 3 pairs is part of the prompt.
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    target = prompt
    for line in lines:
        line = line.strip()
        if target is prompt and line.startswith(_NEGATIVE):
            target = negative
            line = line[len(_NEGATIVE):].strip()
        target.append(line)

    pairs = {k.strip(): _unquote(v.strip()) for k, v in _PARAM.findall(last)}
    fields: dict[str, Any] = {}
    extra = {k: v for k, v in pairs.items() if k not in _KNOWN and not CONTROL_KEY.match(k)}
    if "Steps" in pairs:
        fields["steps"] = _int("Steps", pairs["Steps"])
    if "Seed" in pairs:
        fields["seed"] = _int("Seed", pairs["Seed"])
    if "CFG scale" in pairs:
        fields["guidance_scale"] = _float("CFG scale", pairs["CFG scale"])
    if GUIDANCE_EMBEDDING in pairs:
        fields["guidance_embedding"] = _float(GUIDANCE_EMBEDDING, pairs[GUIDANCE_EMBEDDING])
    if GUIDANCE_END in pairs:
        fields["guidance_end"] = _float(GUIDANCE_END, pairs[GUIDANCE_END])
    if CACHE_INTERVAL in pairs:
        fields["cache_interval"] = _int(CACHE_INTERVAL, pairs[CACHE_INTERVAL])
    if TOKEN_MERGING in pairs:
        fields["token_merging"] = _float(TOKEN_MERGING, pairs[TOKEN_MERGING])
    if DTYPE in pairs:
        try:
            fields["dtype"] = canonical_dtype_name(pairs[DTYPE])
        except ValueError as exc:
            raise ValueError(f"parameters: '{DTYPE}': {exc}") from None
    if VAE_TILING in pairs:
        fields["vae_tiling"] = _vae_tiling(pairs[VAE_TILING])
    if "Size" in pairs:
        m = _SIZE.match(pairs["Size"])
        if not m:
            raise ValueError(f"parameters: 'Size' must be WIDTHxHEIGHT, got {pairs['Size']!r}")
        fields["width"], fields["height"] = int(m[1]), int(m[2])
    if "Sampler" in pairs:
        fields["sampler"], fields["schedule"] = _sampler(pairs["Sampler"])
        if fields["sampler"] is None:
            extra["Sampler"] = pairs["Sampler"]
    if "Schedule type" in pairs:
        schedule = _SCHEDULE_TYPES.get(pairs["Schedule type"].lower())
        if schedule is None:
            extra["Schedule type"] = pairs["Schedule type"]
        elif schedule == "karras" or fields.get("schedule") != "karras":
            fields["schedule"] = schedule
    if "Model hash" in pairs:
        fields["model_hash"] = pairs["Model hash"]
    if "Model" in pairs:
        fields["model"] = pairs["Model"]
    if VAE_HASH in pairs:
        fields["vae_hash"] = pairs[VAE_HASH]
    if VAE in pairs:
        fields["vae"] = pairs[VAE]
    if CLIP_SKIP in pairs:
        fields["clip_skip"] = _int(CLIP_SKIP, pairs[CLIP_SKIP])
    if SPACING in pairs:
        fields["spacing"] = pairs[SPACING]
    for key, name in ((LORA_HASHES, "lora_hashes"), (TI_HASHES, "ti_hashes")):
        if key in pairs:
            fields[name] = _parse_hashes(key, pairs[key])
    _parse_edit(pairs, fields, extra)
    _parse_sdxl(pairs, fields, extra)
    _parse_controls(pairs, fields, extra)
    return GenerationParams(prompt="\n".join(prompt), negative_prompt="\n".join(negative),
                            extra=extra, **fields)


def _parse_edit(pairs: dict[str, str], fields: dict[str, Any], extra: dict[str, str]) -> None:
    """The editing keys into ``fields``; the ones that do not describe an ldm edit into ``extra``."""
    if STRENGTH in pairs:
        if any(k.startswith(_HIRES_PREFIX) for k in pairs):  # the hires pass's, not an input image's
            extra[STRENGTH] = pairs[STRENGTH]
        else:
            fields["strength"] = _float(STRENGTH, pairs[STRENGTH])
    if MASK_BLUR in pairs:
        fields["mask_blur"] = _int(MASK_BLUR, pairs[MASK_BLUR])
    area = pairs.get(INPAINT_AREA)
    if area == ONLY_MASKED:
        fields["mask_padding"] = _int(PADDING, pairs[PADDING]) if PADDING in pairs else DEFAULT_PADDING
    elif area is not None and area != "Whole picture":
        extra[INPAINT_AREA] = area


def _parse_sdxl(pairs: dict[str, str], fields: dict[str, Any], extra: dict[str, str]) -> None:
    """The size-conditioning and refiner keys into ``fields``; a switch point without a
    refiner into ``extra`` (it says nothing ldm can use)."""
    for key, name in SIZE_KEYS.items():
        if key in pairs:
            fields[name] = parse_pair(pairs[key], f"parameters: {key!r}", 0 if name == "crops_coords_top_left" else 1)
    for key, name in SCORE_KEYS.items():
        if key in pairs:
            fields[name] = _float(key, pairs[key])
    if REFINER not in pairs:
        if REFINER_START in pairs:
            extra[REFINER_START] = pairs[REFINER_START]
        return
    m = _TITLE.match(pairs[REFINER])
    fields["refiner"], fields["refiner_hash"] = (m[1], m[2]) if m else (pairs[REFINER], None)
    if REFINER_START in pairs:
        fields["refiner_start"] = _float(REFINER_START, pairs[REFINER_START])


def _parse_controls(pairs: dict[str, str], fields: dict[str, Any], extra: dict[str, str]) -> None:
    """The ``ControlNet N`` units, by number, into ``fields``; one ldm cannot reproduce stays in
    ``extra`` as it was written, where :meth:`GenerationParams.check_supported` refuses it."""
    controls = []
    for key in unit_keys(pairs):
        try:
            controls.append(parse_unit(pairs[key]))
        except ValueError:
            extra[key] = pairs[key]
    if controls:
        fields["controls"] = tuple(controls)


def normalize_prompt(text: str) -> str:
    """``text`` without the ASCII spaces around its lines (``\\r`` included) and around itself.

    What the parameters text keeps; CLIP's tokenizer collapses whitespace, so the
    image is the same. Other characters readers strip (``\\x85``, ``\\u2028``) are
    left for :func:`check_round_trip` to refuse: CLIP's text cleaning reads ``\\x85``
    as an ellipsis.
    """
    return "\n".join(line.strip(_ASCII_SPACE) for line in text.strip(_ASCII_SPACE).split("\n"))


def _text_problem(name: str, text: str) -> str | None:
    for number, line in enumerate(text.split("\n"), start=1):
        where = f"{name} line {number}" if "\n" in text else name
        if name == "prompt" and line.strip().startswith(_NEGATIVE):
            return (f"{where} starts with {_NEGATIVE!r}, which the image's parameters text "
                    "(AUTOMATIC1111's format) would read back as the negative prompt; reword that line")
        if line != line.strip():
            return (f"{where} starts or ends with whitespace ({line!r}), which the image's parameters "
                    "text does not keep; remove it")
    return None


def check_round_trip(p: GenerationParams) -> None:
    """Raise ValueError unless ``parse_parameters(format_parameters(p)) == p``.

    Call it before rendering: an image whose text reads back as other parameters
    cannot be made again with ``--from``. Text the format cannot hold is refused,
    not escaped, so the text stays what other tools read.
    """
    for name, text in (("prompt", p.prompt), ("negative prompt", p.negative_prompt)):
        problem = _text_problem(name, text)
        if problem:
            raise ValueError(problem)
    for c in p.controls:
        check_writable(c)
    back = parse_parameters(format_parameters(p))
    for name in GenerationParams.__dataclass_fields__:
        if getattr(back, name) != getattr(p, name):
            raise ValueError(
                f"{name} {getattr(p, name)!r} would read back from the image's parameters text "
                f"as {getattr(back, name)!r}"
            )


def check_params(p: GenerationParams, source: Any, skip: tuple[str, ...] = ()) -> None:
    """Validate parameters read from ``source`` (an image) before they size any work.

    ValueError names ``source`` and the field. ``skip``: fields the caller replaces.
    """
    checks = {
        "steps": lambda v: check_int(v, "Steps", 1, MAX_STEPS),
        "seed": lambda v: check_seed(v, "Seed"),
        "guidance_scale": lambda value: check_guidance(value, "CFG scale"),
        "guidance_embedding": lambda value: check_guidance(value, GUIDANCE_EMBEDDING),
        "width": lambda v: _check_side(v, "Size width"),
        "height": lambda v: _check_side(v, "Size height"),
        "prompt": lambda v: _check_length(v, "prompt"),
        "negative_prompt": lambda v: _check_length(v, "Negative prompt"),
        "strength": lambda v: check_strength(v, STRENGTH),
        "mask_blur": lambda v: check_int(v, MASK_BLUR, 0, MAX_SIDE),
        "mask_padding": lambda v: check_int(v, PADDING, 0, MAX_SIDE),
        "clip_skip": lambda v: check_int(v, CLIP_SKIP, 1, MAX_CLIP_SKIP),
        "spacing": lambda v: check_spacing(v, SPACING),
        "refiner_start": lambda v: check_fraction(v, REFINER_START),
        "guidance_end": lambda v: check_guidance_end(v, name=GUIDANCE_END),
        "cache_interval": lambda v: check_int(v, CACHE_INTERVAL, 1, MAX_STEPS),
        "token_merging": lambda v: check_merge_ratio(v, TOKEN_MERGING),
    }
    for name, check in checks.items():
        value = getattr(p, name)
        if name not in skip and value is not None:
            try:
                check(value)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
    scales = (p.guidance_scale, p.guidance_embedding)
    if "guidance_scale" not in skip and None not in scales and scales[0] != scales[1]:
        raise ValueError(f"{source}: CFG scale {scales[0]:g} and {GUIDANCE_EMBEDDING} {scales[1]:g} differ; a "
                         "guidance-distilled model's scale is both (give the one to use with --guidance)")


def _check_side(value: int, name: str) -> None:
    check_side(value, name)
    if value > MAX_SIDE:
        raise ValueError(f"{name} must be <= {MAX_SIDE} in an image's parameters, got {value}")


def _check_length(text: str, name: str) -> None:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} must be at most {MAX_PROMPT_CHARS} characters in an image's "
                         f"parameters, got {len(text)}")


def open_regular(path: str | os.PathLike, refuse: Callable[[int], BaseException]) -> BinaryIO:
    """``path`` opened for reading if it is a regular file, else ``refuse(st_mode)`` raised.

    A folder or a FIFO is refused without blocking: opened non-blocking, then checked
    on the open file (so a path swapped meanwhile is no race). The readers of input
    files (images, prompt files, a batch's input pictures) all open through here.
    """
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise refuse(mode)
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _not_an_image(path: str | os.PathLike, mode: int) -> ValueError:
    kind = "a folder" if stat.S_ISDIR(mode) else "a pipe, socket or device"
    return ValueError(f"{path}: is {kind}, not an image file")


# What Pillow raises on a damaged file: bad chunks (SyntaxError), cut-off data,
# text chunks over its limits (ValueError), bad compressed text (zlib).
_READ_ERRORS = (OSError, SyntaxError, EOFError, ValueError, zlib.error, Image.DecompressionBombError)


@contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """``path`` opened as a PIL image, for reading inside the ``with`` block.

    A missing path raises OSError; a folder, a FIFO (without blocking), a file that is
    not an image, or a damaged one (found on opening or while reading in the block)
    raises ValueError whose message starts with ``path``.
    """
    with open_regular(path, lambda mode: _not_an_image(path, mode)) as f:
        try:
            with Image.open(f) as image:
                yield image
        except Image.UnidentifiedImageError:
            raise ValueError(f"{path}: not an image (or not one Pillow can read)") from None
        except _READ_ERRORS as exc:
            raise ValueError(f"{path}: damaged image, cannot read it: {exc}") from None


def read_text(path: str | os.PathLike) -> str | None:
    """The raw ``parameters`` text of an image, or None if it has none (errors: :func:`open_image`)."""
    with open_image(path) as image:
        return _parameters_text(image)


def _parameters_text(image: Image.Image) -> str | None:
    # Chunks before the pixel data are in ``info`` already; ``text`` decodes the whole
    # image to reach chunks after it, so it is only the fallback.
    value = image.info.get(PNG_KEY)
    if value is None:
        value = (getattr(image, "text", None) or {}).get(PNG_KEY)
    return value if isinstance(value, str) else None


def read_parameters(path: str | os.PathLike, *, check: bool = True) -> GenerationParams:
    """The generation parameters stored in a PNG (written by ldm or AUTOMATIC1111).

    With ``check`` (the default) they are validated and capped by :func:`check_params`.
    """
    text = read_text(path)
    if text is None:
        raise ValueError(
            f"{path}: no '{PNG_KEY}' text chunk (not an image written by ldm or AUTOMATIC1111, "
            "or its metadata was stripped)"
        )
    try:
        params = parse_parameters(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if check:
        check_params(params, path)
    return params


def save_png(image: Image.Image, path: str | os.PathLike, params: GenerationParams | str | None = None):
    """Write ``image`` as PNG atomically, with ``params`` in a ``parameters`` chunk.

    Text that is not Latin-1 goes in an iTXt chunk (UTF-8), as the web UI does.
    """
    info = PngImagePlugin.PngInfo()
    if params is not None:
        text = params if isinstance(params, str) else format_parameters(params)
        info.add_text(PNG_KEY, text)  # Pillow switches to iTXt when needed
    return atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))
