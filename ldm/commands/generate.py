"""`ldm generate`: images for one prompt, or again from an image's parameters; with
--image, an edit of that image (img2img, --mask inpainting, --extend outpainting);
with --refiner, SDXL's base-then-refiner rendering; with --vae, another VAE (``--from`` finds
the refiner and the VAE an image names as it finds the model); with --control, ControlNets
(:mod:`ldm.commands.controls`; ``--from`` finds them too, and takes their hints anew)."""

from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from pathlib import Path
from typing import Any

from ..controlmeta import KEY as CONTROL_KEY
from ..pngmeta import (
    GenerationParams, check_params, check_round_trip, normalize_prompt, read_parameters, recorded_size_fields,
    save_png,
)
from ..editing import DEFAULT_FILL, default_size, extend, load_image, load_mask
from ..speedups import Speedups
from ..validation import DEFAULTS, SPACINGS, check_sampling
from .common import (
    add_editing_options, add_generation_options, add_memory_option, check_output_dir, printable, resolve_model,
    sdxl_values, value,
)
from .controls import (
    ControlRequest, add_control_options, check_control_flags, check_units, control_requests, controls_for,
    load_controlnets, per_image, recorded_units, without_controls,
)

logger = logging.getLogger("ldm")

DEFAULT_OUTPUT = "outputs"  # in the current folder, as the web UIs do
# Web UI keys for image k of a call of n; with them `--from` renders the whole call
# again and keeps image k, which reproduces it bit for bit (a batch of one image can
# differ from the same image in a batch in the last float bits).
BATCH_SIZE, BATCH_POS = "Batch size", "Batch pos"
# A larger call is not rendered again for one image (the text could ask for thousands):
# the image is rendered alone, with its own seed.
MAX_REPLAY_BATCH = 16
_NUMBERED = re.compile(r"^(\d+)-")
# Option -> GenerationParams field, for the options that override an image's parameters.
_OVERRIDES = (("prompt", "prompt"), ("negative", "negative_prompt"), ("steps", "steps"),
              ("sampler", "sampler"), ("schedule", "schedule"), ("guidance", "guidance_scale"),
              ("seed", "seed"), ("strength", "strength"), ("mask_blur", "mask_blur"),
              ("mask_padding", "mask_padding"), ("clip_skip", "clip_skip"), ("original_size", "original_size"),
              ("crop_offset", "crops_coords_top_left"), ("target_size", "target_size"),
              ("aesthetic_score", "aesthetic_score"), ("negative_aesthetic_score", "negative_aesthetic_score"),
              ("refiner_start", "refiner_start"), ("spacing", "spacing"), ("guidance_end", "guidance_end"),
              ("cache_interval", "cache_interval"), ("token_merging", "token_merging"))
# Options that need --image, and those that need a mask (--mask or --extend).
_NEED_IMAGE = ("mask", "extend", "strength", "mask_blur", "mask_padding", "raw_decode", "fill")
_NEED_MASK = ("mask_blur", "mask_padding", "raw_decode")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="generate images for a prompt (PNG files with their parameters)",
        description="Generate images into DIR as NNNNN-SEED.png, each with its parameters in "
        "AUTOMATIC1111's format. With --from IMAGE.png, make that image again; options given "
        "override the image's parameters.",
    )
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (optional with --from)")
    p.add_argument("--from", dest="from_image", type=Path, default=None, metavar="IMAGE.png",
                   help="take every parameter (and the model, by name or hash) from this image")
    add_generation_options(p, seed_help="seed of the first image; image k gets seed + k (default: random)",
                           default_output=DEFAULT_OUTPUT)
    add_editing_options(p)
    add_control_options(p)
    p.add_argument("--spacing", choices=SPACINGS, default=None,
                   help="timestep spacing of the schedule, as diffusers' timestep_spacing (default: the model's, "
                   "else the sampler's own; trailing for Turbo-style models)")
    add_memory_option(p, ". With --from, auto runs the VAE as the picture's 'VAE tiling' says where that fits")
    p.set_defaults(func=run)


def next_index(folder: Path) -> int:
    """1 + the largest NNNNN- prefix in ``folder`` (0 if none), as the web UI numbers files."""
    numbers = [int(m[1]) for f in folder.iterdir() if (m := _NUMBERED.match(f.name))]
    return max(numbers, default=-1) + 1


def _random_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def _params_from_args(args: argparse.Namespace) -> GenerationParams:
    if args.prompt is None:
        raise ValueError("give a prompt, or --from IMAGE.png")
    width, height = args.size or (None, None)
    return GenerationParams(
        prompt=args.prompt, negative_prompt=args.negative or "", steps=value(args, "steps"),
        sampler=value(args, "sampler"), schedule=value(args, "schedule"), spacing=args.spacing,
        guidance_scale=value(args, "guidance"), seed=_random_seed() if args.seed is None else args.seed,
        width=width, height=height, strength=args.strength, mask_blur=args.mask_blur,
        mask_padding=args.mask_padding, clip_skip=args.clip_skip, refiner_start=args.refiner_start,
        guidance_end=args.guidance_end, cache_interval=args.cache_interval, token_merging=args.token_merging,
        **sdxl_values(args).kwargs(),
    )


def _params_from_image(args: argparse.Namespace) -> GenerationParams:
    p = read_parameters(args.from_image, check=False)
    if args.control:
        p = without_controls(p)
    changes = {field: getattr(args, name) for name, field in _OVERRIDES if getattr(args, name) is not None}
    if args.size:
        changes["width"], changes["height"] = args.size
    check_params(p, args.from_image, skip=tuple(changes))  # what the flags replace may be anything
    p = p.replace(**changes)
    if p.seed is None:
        p = p.replace(seed=_random_seed())
    if p.sampler is None and "Sampler" not in p.extra:
        p = p.replace(sampler=DEFAULTS.sampler)
    if p.steps is None:
        p = p.replace(steps=DEFAULTS.steps)
    ignored = {k: v for k, v in p.extra.items() if k not in (BATCH_SIZE, BATCH_POS) and not CONTROL_KEY.match(k)}
    if ignored:
        logger.warning("%s: ignoring parameters ldm does not use: %s", args.from_image,
                       printable(", ".join(f"{k}: {v}" for k, v in ignored.items())))
    return p


def _params(args: argparse.Namespace) -> GenerationParams:
    """The parameters to render, checked before any model loads."""
    p = _params_from_image(args) if args.from_image else _params_from_args(args)
    p = p.replace(prompt=normalize_prompt(p.prompt), negative_prompt=normalize_prompt(p.negative_prompt))
    if p.clip_skip == 1:  # the default: not written, as the web UI leaves it out
        p = p.replace(clip_skip=None)
    p = p.replace(**Speedups.from_attributes(p).params())  # off (1): not written, as without them
    if p.refiner_start is not None and p.refiner_label is None and not args.refiner:
        raise ValueError("--refiner-start needs --refiner (the model that takes over)")
    p.check_supported()  # refuses a sampler or schedule from the image that ldm lacks
    check_sampling(p.sampler, p.schedule, p.steps, spacing=p.spacing)
    # As written: the image's other keys are not; --refiner's name and hash replace the image's;
    # the ControlNets are written as they are used (checked by control_requests).
    written = p.replace(extra={}, controls=())
    if args.refiner:
        written = written.replace(refiner="refiner", refiner_hash=None)
    check_round_trip(written)
    return p


def _model_for(args: argparse.Namespace, p: GenerationParams | None) -> Path:
    if args.model or p is None or not (p.model or p.model_hash):
        return resolve_model(args.model)
    from ..modelref import find_model

    return find_model(p.model, p.model_hash)


def _refiner_for(args: argparse.Namespace, p: GenerationParams) -> Path | None:
    """--refiner, else the refiner the image names (found as its model is), else None."""
    if args.refiner:
        return Path(args.refiner)
    if p.refiner_label is None:
        return None
    from ..modelref import find_model

    return find_model(p.refiner, p.refiner_hash, what="refiner", flag="--refiner")


def _vae_for(args: argparse.Namespace, p: GenerationParams) -> Path | None:
    """--vae, else the VAE the image names (found as its model is), else None."""
    if args.vae:
        return Path(args.vae)
    if not args.from_image or not (p.vae or p.vae_hash):
        return None
    from ..checkpoints.vae_file import find_vae

    return find_vae(p.vae, p.vae_hash)


def _load(args: argparse.Namespace, path: Path, what: str, name: str | None, digest: str | None,
          vae: Path | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """The Pipeline of ``path`` (with the VAE ``vae``, in ``--dtype``, else ``dtype``, else the
    device's default) and its name and hash; says when the image was made with another file."""
    from ..modelref import model_ref
    from ..pipeline import Pipeline

    pipe = Pipeline.from_pretrained(path, device=args.device, dtype=args.dtype or dtype, allow_pickle=args.allow_pickle,
                                    lora_dirs=args.lora_dirs or (), embedding_dirs=args.embedding_dirs, vae=vae)
    if args.compile:
        pipe.compile()
    ref = model_ref(path)
    _warn_other_file(args, what, name, digest, ref)
    return pipe, ref


def _recorded_dtype(args: argparse.Namespace, p: GenerationParams) -> Any:
    """With --from and no --dtype: the dtype the image was made in, where this device runs
    it natively (same picture), else None (the default, with a warning that it will differ)."""
    if not args.from_image or args.dtype or p.dtype is None:
        return None
    from ..dtypes import dtype_to_remake
    from ..pipeline import resolve_device

    return dtype_to_remake(p.dtype, resolve_device(args.device), args.from_image.name)


def _vae_ref(args: argparse.Namespace, path: Path | None, p: GenerationParams) -> Any:
    """The VAE's name and hash for the PNG text (None: the model's own VAE)."""
    if path is None:
        return None
    from ..checkpoints.vae_file import vae_ref

    ref = vae_ref(path)
    _warn_other_file(args, "VAE", p.vae, p.vae_hash, ref)
    return ref


def _warn_other_file(args: argparse.Namespace, what: str, name: str | None, digest: str | None, ref: Any) -> None:
    if args.from_image and digest and digest.lower() != ref.hash:
        logger.warning("%s hash differs: %s was made with %s [%s], this is %s [%s]; the image will differ", what,
                       args.from_image, printable(name or "?"), printable(digest), ref.path, ref.hash)


def _batch_of(p: GenerationParams, args: argparse.Namespace) -> tuple[int, int] | None:
    """(size, position) of the call that made the image, when it can be made again."""
    if args.seed is not None or args.n is not None:
        return None
    try:
        size, pos = int(p.extra[BATCH_SIZE]), int(p.extra[BATCH_POS])
    except (KeyError, ValueError):
        return None
    if not (0 <= pos < size and p.seed - pos >= 0):
        return None
    if size > MAX_REPLAY_BATCH:
        logger.warning("%s: %s %d is over %d: rendering image %d alone with its own seed; it may differ "
                       "from the original in the last bits", args.from_image, BATCH_SIZE, size,
                       MAX_REPLAY_BATCH, pos)
        return None
    return size, pos


def _output_dir(args: argparse.Namespace) -> Path:
    if args.output is not None:
        check_output_dir(args.output)
        return args.output
    out = Path(DEFAULT_OUTPUT)
    check_output_dir(out, flag="default output folder")
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_edit_flags(args: argparse.Namespace) -> None:
    """Editing options that cannot go together, refused before anything is read."""
    given = [name for name in _NEED_IMAGE if getattr(args, name) not in (None, False)]
    if args.image is None and given:
        raise ValueError(f"{_flag(given[0])} needs --image (the picture to edit)")
    if args.mask is not None and args.extend is not None:
        raise ValueError("--mask and --extend cannot go together: --extend makes the mask of the new area")
    if args.fill is not None and args.extend is None:
        raise ValueError("--fill needs --extend (it fills the new area)")
    if args.mask is None and args.extend is None:
        for name in _NEED_MASK:
            if getattr(args, name) not in (None, False):
                raise ValueError(f"{_flag(name)} needs --mask or --extend (it applies to the masked area)")


def edit_inputs(args: argparse.Namespace, p: GenerationParams, seed: int) -> dict[str, Any]:
    """``image``/``mask`` keywords for the pipeline, read and checked before any model loads.

    An image made by an edit needs its inputs again with ``--from``: its text does not hold them.
    """
    if args.image is None:
        if p.edit_inputs:
            raise ValueError(f"{args.from_image}: this image was made from {p.edit_inputs}: give "
                             + ("them with --image and --mask (or --extend)" if p.mask_blur is not None
                                else "it with --image"))
        return {}
    if p.mask_blur is not None and args.mask is None and args.extend is None:
        raise ValueError(f"{args.from_image}: this image was made from {p.edit_inputs}: give --mask "
                         "(or --extend) with --image")
    image = load_image(args.image, "--image")
    if args.extend is not None:
        canvas, mask = extend(image, *args.extend, fill=args.fill or DEFAULT_FILL, seed=seed)
        edit: dict[str, Any] = {"image": canvas, "mask": mask}
        size = canvas.size
    else:
        size = (image.shape[1], image.shape[0])
        edit = {"image": image}
        if args.mask is not None:
            edit["mask"] = load_mask(args.mask, size, "--mask")
    default_size(*size)  # refuses an image too small to render
    if args.raw_decode:
        edit["keep_unmasked"] = False
    return edit


def _edit_record(gen: Any, edit: dict[str, Any]) -> dict[str, Any]:
    """The editing fields of an output's parameters: what the pipeline used."""
    if not edit:
        return {}
    record: dict[str, Any] = {"strength": gen.params["strength"]}
    if "mask" in edit:
        record["mask_blur"] = gen.params["mask_blur"]
        record["mask_padding"] = gen.params.get("mask_padding")
    return record


def _warn_changed_files(source: Path, p: GenerationParams, used: dict[str, Any]) -> None:
    """Say when a LoRA or embedding the image names is another file now (or was not used)."""
    for what, field in (("LoRA", "lora_hashes"), ("embedding", "ti_hashes")):
        then, now = getattr(p, field), used[field]
        for name, digest in then.items():
            if name not in now:
                logger.warning("%s: made with %s %r [%s], which this render did not use; the image will differ",
                               source, what, printable(name), printable(digest))
            elif now[name] != digest.lower():
                logger.warning("%s: %s %r was [%s], the file found now is [%s]; the image will differ",
                               source, what, printable(name), printable(digest), now[name])


def run(args: argparse.Namespace) -> int:
    check_edit_flags(args)
    check_control_flags(args)
    out = _output_dir(args)
    p = _params(args)
    batch = _batch_of(p, args) if args.from_image else None
    edit = edit_inputs(args, p, p.seed - batch[1] if batch else p.seed)
    controls = control_requests(args, p)
    if args.output is None:
        logger.info("no -o given: writing to %s", out.resolve())
    written: list[tuple[Any, GenerationParams]] = []
    try:
        _render(args, p, out, written, batch, edit, controls)
    except KeyboardInterrupt:
        # Every image written so far is complete (atomic writes); say where they are.
        print(f"ldm generate: stopped; {len(written)} image(s) kept in {out}", file=sys.stderr)
        return 130
    return 0


def _render_size(pipe: Any, p: GenerationParams, edit: dict[str, Any]) -> tuple[int, int]:
    """The output size, as the pipeline will choose it (for the hints, made at that size)."""
    native = pipe.config.default_size
    if not edit:
        return p.width or native, p.height or native
    from ..edit_request import plan_edit

    plan = plan_edit(edit["image"], edit.get("mask"), p.strength, count=1, width=p.width, height=p.height,
                     native=native, inpainting_model=pipe.config.is_inpainting, mask_padding=p.mask_padding)
    return plan.width, plan.height


def _generate(args: argparse.Namespace, pipe: Any, kwargs: dict[str, Any], n: int, edit: dict[str, Any],
              requests: list[ControlRequest], size: tuple[int, int]) -> Any:
    """The call's images; with ControlNets each call gets its hints, and a hint drawn from the
    image's seed (shuffle) makes each image its own call."""
    if not requests:
        return pipe.generate(**kwargs, **edit, num_images=n)
    nets = load_controlnets(requests, pipe, args.allow_pickle)
    check_units(requests, *size)
    calls = [(kwargs["seed"] + k, 1) for k in range(n)] if per_image(requests) else [(kwargs["seed"], n)]
    gens = [pipe.generate(**{**kwargs, "seed": seed}, **edit, num_images=count,
                          control=controls_for(requests, nets, *size, seed)) for seed, count in calls]
    gen = gens[0]
    for more in gens[1:]:
        gen.images += more.images
        gen.seeds += more.seeds
        gen.vae_tiling += more.vae_tiling
    return gen


def _render(args: argparse.Namespace, p: GenerationParams, out: Path, written: list,
            batch: tuple[int, int] | None, edit: dict[str, Any], requests: list[ControlRequest]) -> None:
    model_path, refiner_path = _model_for(args, p if args.from_image else None), _refiner_for(args, p)
    vae_path = _vae_for(args, p)
    dtype = _recorded_dtype(args, p)
    pipe, ref = _load(args, model_path, "model", p.model, p.model_hash, vae_path, dtype)
    refiner, refiner_ref = _load(args, refiner_path, "refiner", p.refiner, p.refiner_hash, vae_path, dtype) \
        if refiner_path else (None, None)
    vae_ref = _vae_ref(args, vae_path, p)

    n = batch[0] if batch else value(args, "n")
    kwargs = p.replace(controls=()).to_kwargs(refiner=refiner)
    kwargs["memory"] = args.memory
    if batch:
        kwargs["seed"] = p.seed - batch[1]
    size = _render_size(pipe, p, edit) if requests else None
    gen = _generate(args, pipe, kwargs, n, edit, requests, size)
    record = _edit_record(gen, edit)
    record.update(lora_hashes=gen.params.get("lora_hashes", {}), ti_hashes=gen.params.get("ti_hashes", {}),
                  dtype=gen.params.get("dtype"),
                  guidance_embedding=gen.params.get("guidance_embedding"),
                  **recorded_size_fields(gen.params, gen.params["width"], gen.params["height"]),
                  refiner=refiner_ref and refiner_ref.name, refiner_hash=refiner_ref and refiner_ref.hash,
                  refiner_start=gen.params["refiner_start"] if refiner_ref else None,
                  vae=vae_ref and vae_ref.name, vae_hash=vae_ref and vae_ref.hash,
                  controls=recorded_units(requests, gen.params.get("controls", [])))
    if args.from_image:
        _warn_changed_files(args.from_image, p, record)
    keep = [batch[1]] if batch else list(range(n))

    out.mkdir(parents=True, exist_ok=True)
    first = next_index(out)
    one_call = n > 1 and not per_image(requests)
    for i, k in enumerate(keep):
        extra = {BATCH_SIZE: str(n), BATCH_POS: str(k)} if one_call else {}
        params = p.replace(seed=gen.seeds[k], width=gen.params["width"], height=gen.params["height"],
                           model=ref.name, model_hash=ref.hash, extra=extra, vae_tiling=gen.vae_tiling[k], **record)
        path = out / f"{first + i:05d}-{gen.seeds[k]}.png"
        save_png(gen.images[k], path, params)
        written.append((gen.images[k], params))
        print(f"{path}  seed {gen.seeds[k]}")
    if args.grid:
        from ..grid import image_grid

        path = out / f"grid-{first:05d}.png"
        save_png(image_grid([im for im, _ in written], args.grid_rows), path, written[0][1])
        print(f"{path}  grid of {len(written)}")
