"""Evaluate image editing (img2img, inpainting, outpainting) on the toy world.

    python scripts/eval_editing.py                          # the shipped model, defaults below
    python scripts/eval_editing.py --model PATH --out DIR   # another checkpoint (e.g. a toy inpainting model)
    python scripts/eval_editing.py --n 8                    # a quick look

Inputs are generator scenes (``ldm.toy.edits.edit_scenes``: train-split scenes, the same
for a given ``--seed``), so what an edit should give is known and ``ldm.toy.score``
reads it back (kind: the toy classifier; colours: the pixels).

1. img2img: each scene with a prompt that gives its object another colour (a full
   caption of the recoloured scene), at each of ``--strengths`` (0.3, 0.5, 0.75, 1.0).
   "Kept the input's layout": kind and background as the input's, the overlap (IoU) of
   the object's pixels with the input object's, the mean pixel distance to the input;
   "obeys the prompt": the new colour read back.
2. inpainting: the object's bounding box grown by ``MASK_MARGIN`` pixels is repainted
   with a prompt for another kind in another colour on the same background. Kind and
   colour in the picture (the old object is entirely under the mask), the largest pixel
   difference to the input where the feathered mask is 0 (``keep_unmasked``: 0), and the
   seam: how often the mask's inner border (``SEAM`` pixels wide) reads as the input's
   background colour.
3. outpainting: each scene extended by half its width on one side (``ldm.editing.extend``;
   sides in turn right, left, bottom, top) with the scene's own full caption: how often
   the new area's colour is the input's background colour.
4. A picture strip (``--strip``, default ``<out>/strip.png``): input, img2img at each
   strength, the inpainting mask, inpainting, outpainting.

Defaults: the shipped model, ``pipe.generate``'s defaults (sampler, steps, guidance, mask
blur), float32 on the CPU with one thread; picture ``i`` of a section has seed
``--seed + i``. Writes ``<out>/eval_editing.md``, ``<out>/eval_editing.json`` and the strip.
Also usable from Python: ``evaluate(model, n=..., ...) -> report``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # eval_toy sits beside this file (and puts the checkout on the path)
    sys.path.insert(0, str(SCRIPTS))

import eval_toy  # noqa: E402
import numpy as np  # noqa: E402
from eval_toy import BATCH_SIZE, GUIDANCE, SAMPLER, SEED, STEPS, THREADS, Log, load_pipeline, save_grid  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from ldm.editing import extend, feather_alpha  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.toy.edits import box_mask, edit_scenes, object_box, object_mask, recolored, rekinded  # noqa: E402
from ldm.toy.roundtrip import to_uint8  # noqa: E402
from ldm.toy.score import color_map, score_images  # noqa: E402
from ldm.toy.world import COLORS, Scene, caption, render  # noqa: E402

N = 60  # pictures per section (a multiple of the four outpainting sides)
STRENGTHS = (0.3, 0.5, 0.75, 1.0)
MASK_BLUR = inspect.signature(Pipeline.generate).parameters["mask_blur"].default
MASK_MARGIN = 3  # pixels the object's box grows by, so its anti-aliased edge is repainted too
SEAM = 2  # pixels: the mask's inner border whose colour shows a seam
SIDES = ("right", "left", "bottom", "top")
SIZE = 64  # the toy world's pictures
OUT = eval_toy.ROOT / ".cache" / "eval"
STRIP_ROWS = 3
TILE = 128
TARGETS = {"inpaint_kind": 0.90, "inpaint_color": 0.85, "outpaint_background": 0.90}


@dataclass
class Settings:
    """How every section renders."""

    steps: int = STEPS
    sampler: str = SAMPLER
    guidance: float = GUIDANCE
    batch_size: int = BATCH_SIZE
    mask_blur: int = MASK_BLUR
    log: Log = field(default=eval_toy._print)


# --- rendering -------------------------------------------------------------------------------


def render_edits(pipe, prompts: Sequence[str], seeds: Sequence[int], images: Sequence[Any],
                 settings: Settings, *, masks: Sequence[Any] | None = None, strength: float | None = None,
                 label: str = "") -> list[np.ndarray]:
    """One uint8 picture per (prompt, seed, input image[, mask]), ``settings.batch_size`` per call."""
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(prompts), settings.batch_size):
        part = slice(lo, lo + settings.batch_size)
        extra = {} if masks is None else {"mask": list(masks[part]), "mask_blur": settings.mask_blur}
        gen = pipe.generate(list(prompts[part]), image=list(images[part]), strength=strength,
                            steps=settings.steps, guidance_scale=settings.guidance, seed=list(seeds[part]),
                            sampler=settings.sampler, output="np", progress=False, **extra)
        out.extend(to_uint8(gen.images))
        settings.log(f"[{label}] {min(lo + settings.batch_size, len(prompts))}/{len(prompts)} pictures, "
                     f"{time.perf_counter() - t0:.0f} s")
    return out


def full_caption(scene: Scene, seed: int) -> str:
    """The scene's caption in training wording, every attribute stated."""
    return caption(scene, np.random.default_rng(seed), "train", full=True)


# --- measures ----------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    return {"rate": mean([float(f) for f in flags]), "hits": int(sum(flags)), "count": len(flags)}


def drawn_object(picture: np.ndarray, background: str) -> np.ndarray:
    """Bool: the pixels whose nearest palette colour is not ``background``."""
    return color_map(picture) != COLORS.index(background)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def pixel_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 pictures, in [0, 1]."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean() / 255.0)


def max_change_outside(output: np.ndarray, source: np.ndarray, mask: np.ndarray, blur: int) -> float:
    """Largest pixel difference, in [0, 1], where the feathered mask is 0 (kept exactly)."""
    outside = feather_alpha(mask.astype(np.float32), blur) == 0
    if not outside.any():
        return 0.0
    diff = np.abs(output.astype(np.int16) - source.astype(np.int16))[outside]
    return float(diff.max() / 255.0)


def inner_border(mask: np.ndarray, width: int = SEAM) -> np.ndarray:
    """The mask pixels within ``width`` pixels of its edge."""
    eroded = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * width + 1))
    return mask & ~(np.asarray(eroded) > 0)


def mode_color(picture: np.ndarray, region: np.ndarray) -> str | None:
    """The most common palette colour of ``region``'s pixels (None: none is near a palette colour)."""
    labels = color_map(picture)[region]
    labels = labels[labels >= 0]
    return COLORS[int(np.bincount(labels, minlength=len(COLORS)).argmax())] if labels.size else None


# --- the sections ------------------------------------------------------------------------------


def img2img_section(pipe, scenes: Sequence[Scene], seed: int, strengths: Sequence[float], classifier: Any,
                    settings: Settings) -> tuple[list[dict[str, Any]], dict[float, list[np.ndarray]]]:
    """Per strength: layout kept against the new colour obeyed. Also the pictures, by strength."""
    rng = np.random.default_rng(seed)
    targets = [recolored(s, rng) for s in scenes]
    prompts = [full_caption(t, seed + i) for i, t in enumerate(targets)]
    inputs = [render(s, SIZE) for s in scenes]
    seeds = [seed + i for i in range(len(scenes))]
    rows, pictures = [], {}
    for strength in strengths:
        out = render_edits(pipe, prompts, seeds, inputs, settings, strength=strength,
                           label=f"img2img, strength {strength:g}")
        scores = score_images(out, [t.attributes() for t in targets], classifier)
        rows.append({"strength": float(strength),
                     "kind_kept": rate([s["kind"] for s in scores]),
                     "background_kept": rate([s["background"] for s in scores]),
                     "object_iou": mean([iou(drawn_object(o, s.background), object_mask(s, SIZE))
                                         for o, s in zip(out, scenes)]),
                     "pixel_distance": mean([pixel_distance(o, i) for o, i in zip(out, inputs)]),
                     "new_color": rate([s["color"] for s in scores]),
                     "prompts": prompts})
        pictures[strength] = out
    return rows, pictures


def inpaint_section(pipe, scenes: Sequence[Scene], seed: int, classifier: Any,
                    settings: Settings) -> tuple[dict[str, Any], list[np.ndarray], list[np.ndarray]]:
    """Another kind in another colour where the object was. Also the pictures and masks."""
    rng = np.random.default_rng(seed + 1)
    targets = [rekinded(s, rng) for s in scenes]
    prompts = [full_caption(t, seed + i) for i, t in enumerate(targets)]
    inputs = [render(s, SIZE) for s in scenes]
    masks = [box_mask(object_box(s, SIZE, MASK_MARGIN), SIZE) for s in scenes]
    out = render_edits(pipe, prompts, [seed + i for i in range(len(scenes))], inputs, settings, masks=masks,
                       label="inpainting")
    scores = score_images(out, [t.attributes() for t in targets], classifier)
    changes = [max_change_outside(o, i, m, settings.mask_blur) for o, i, m in zip(out, inputs, masks)]
    seams = [mode_color(o, inner_border(m)) == s.background for o, m, s in zip(out, masks, scenes)]
    result = {"kind": rate([s["kind"] for s in scores]), "color": rate([s["color"] for s in scores]),
              "background": rate([s["background"] for s in scores]),
              "all": rate([all(s.values()) for s in scores]),
              "max_abs_outside": max(changes, default=0.0),
              "kept_exactly": rate([c == 0.0 for c in changes]),
              "seam_background": rate(seams),
              "mask_fraction": mean([float(m.mean()) for m in masks]), "prompts": prompts}
    return result, out, masks


def outpaint_section(pipe, scenes: Sequence[Scene], seed: int,
                     settings: Settings) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Each scene extended by half its width on one side, prompted with its own caption."""
    prompts = [full_caption(s, seed + i) for i, s in enumerate(scenes)]
    margin = SIZE // 2
    out: list[np.ndarray | None] = [None] * len(scenes)
    matches, kept = [0.0] * len(scenes), [0.0] * len(scenes)
    for side in SIDES:  # one call per canvas shape
        index = [i for i in range(len(scenes)) if SIDES[i % len(SIDES)] == side]
        if not index:
            continue
        canvases = [extend(render(scenes[i], SIZE), **{side: margin}) for i in index]
        pictures = render_edits(pipe, [prompts[i] for i in index], [seed + i for i in index],
                                [c for c, _ in canvases], settings, masks=[m for _, m in canvases],
                                label=f"outpainting, {side}")
        for i, (canvas, mask), picture in zip(index, canvases, pictures):
            out[i] = picture
            region = new_area(picture.shape[:2], side, margin)
            matches[i] = mode_color(picture, region) == scenes[i].background
            kept[i] = max_change_outside(picture, np.asarray(canvas), np.asarray(mask) >= 128, settings.mask_blur)
    result = {"background": rate(matches), "max_abs_outside": max(kept, default=0.0),
              "margin": margin, "sides": list(SIDES), "prompts": prompts}
    return result, out


def new_area(shape: tuple[int, int], side: str, margin: int) -> np.ndarray:
    """Bool: the pixels of an extended canvas that the original picture did not have."""
    area = np.zeros(shape, dtype=bool)
    h, w = shape
    rows, cols = {"left": (slice(None), slice(0, margin)), "right": (slice(None), slice(w - margin, w)),
                  "top": (slice(0, margin), slice(None)), "bottom": (slice(h - margin, h), slice(None))}[side]
    area[rows, cols] = True
    return area


# --- the run ---------------------------------------------------------------------------------


def evaluate(model: Any = None, *, n: int = N, strengths: Sequence[float] = STRENGTHS, steps: int = STEPS,
             sampler: str = SAMPLER, guidance: float = GUIDANCE, mask_blur: int = MASK_BLUR, seed: int = SEED,
             batch_size: int = BATCH_SIZE, device: str = "cpu", dtype: str = "float32", classifier: Any = None,
             out: str | Path | None = OUT, strip: str | Path | None = None, strip_rows: int = STRIP_ROWS,
             threads: int | None = THREADS, log: Log = eval_toy._print) -> dict[str, Any]:
    """Run every section; write ``eval_editing.md``, ``eval_editing.json`` and the strip under
    ``out`` (``strip`` overrides the strip's path; ``out=None`` writes nothing unless
    ``strip`` is given). Returns the report. ``threads``: torch threads while it runs."""
    import torch

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        settings = Settings(steps=steps, sampler=sampler, guidance=guidance, batch_size=batch_size,
                            mask_blur=mask_blur, log=log)
        return _evaluate(model, n, tuple(strengths), seed, device, classifier, settings, out, strip, strip_rows,
                         dtype=dtype)
    finally:
        torch.set_num_threads(before)


def _evaluate(model: Any, n: int, strengths: tuple[float, ...], seed: int, device: str, classifier: Any,
              settings: Settings, out: str | Path | None, strip: str | Path | None,
              strip_rows: int, dtype: str = "float32") -> dict[str, Any]:
    from ldm.toy.classifier import get_classifier

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    pipe = load_pipeline(model, device, dtype)
    classifier = get_classifier(classifier)
    model_name = str(getattr(pipe.model, "source", model))
    inpainting_model = bool(pipe.config.is_inpainting)
    settings.log(f"model {model_name} ({'9-channel inpainting' if inpainting_model else '4-channel'}): "
                 f"{settings.sampler}, {settings.steps} steps, guidance {settings.guidance}, on {pipe.device}")
    scenes = edit_scenes(n, seed)
    t0 = time.perf_counter()
    img2img, by_strength = img2img_section(pipe, scenes, seed, strengths, classifier, settings)
    seconds["img2img"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inpaint, inpainted, masks = inpaint_section(pipe, scenes, seed, classifier, settings)
    seconds["inpainting"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    outpaint, outpainted = outpaint_section(pipe, scenes, seed, settings)
    seconds["outpainting"] = time.perf_counter() - t0
    report: dict[str, Any] = {
        "model": model_name, "inpainting_model": inpainting_model,
        "settings": {"n": n, "strengths": list(strengths), "steps": settings.steps, "sampler": settings.sampler,
                     "guidance": settings.guidance, "mask_blur": settings.mask_blur, "mask_margin": MASK_MARGIN,
                     "seam": SEAM, "seed": seed, "batch_size": settings.batch_size, "device": str(pipe.device),
                     "dtype": str(pipe.dtype), "size": SIZE, "threads": eval_toy._threads()},
        "targets": TARGETS, "img2img": img2img, "inpainting": inpaint, "outpainting": outpaint,
        "scenes": [s.attributes() for s in scenes], "strip": None,
    }
    strip_path = Path(strip) if strip is not None else (Path(out) / "strip.png" if out is not None else None)
    if strip_path is not None and strip_rows > 0:
        rows = min(strip_rows, n)
        columns = [[render(s, SIZE) for s in scenes[:rows]], *[by_strength[s][:rows] for s in strengths],
                   [masked_view(render(s, SIZE), m) for s, m in zip(scenes, masks[:rows])],
                   inpainted[:rows], outpainted[:rows]]
        headers = ["input", *[f"img2img {s:g}" for s in strengths], "mask", "inpainted", "outpainted"]
        save_grid(picture_strip(columns, headers), strip_path)
        report["strip"] = str(strip_path)
        settings.log(f"wrote {strip_path}")
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    if out is not None:
        write_report(report, Path(out), settings.log)
    return report


# --- outputs -----------------------------------------------------------------------------------


def masked_view(picture: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The input with the repainted region shown in grey, as the masked image a 9-channel model sees."""
    view = picture.copy()
    view[mask] = 128
    return view


def picture_strip(columns: Sequence[Sequence[np.ndarray]], headers: Sequence[str], tile: int = TILE) -> Image.Image:
    """Pictures in a table (``columns[c][r]``), each scaled (nearest) to ``tile`` pixels high,
    with a header above each column."""
    font = ImageFont.load_default()
    header_h, pad = 16, 4
    widths = [max(tile * p.shape[1] // p.shape[0] for p in column) for column in columns]
    rows = max(len(column) for column in columns)
    sheet = Image.new("RGB", (sum(widths) + pad * (len(columns) - 1), header_h + rows * (tile + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for column, width, header in zip(columns, widths, headers):
        draw.text((x + (width - draw.textlength(header, font=font)) / 2, 2), header, fill="black", font=font)
        for r, picture in enumerate(column):
            size = (tile * picture.shape[1] // picture.shape[0], tile)
            sheet.paste(Image.fromarray(picture).resize(size, Image.NEAREST), (x, header_h + r * (tile + pad)))
        x += width + pad
    return sheet


def _cell(entry: dict[str, Any]) -> str:
    return f"{entry['rate']:.2f} ({entry['hits']}/{entry['count']})"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    s, inp, outp = report["settings"], report["inpainting"], report["outpainting"]
    kind = "a 9-channel inpainting model" if report["inpainting_model"] else "latent blending (4-channel model)"
    out = [
        "## Image editing on the toy world",
        "",
        f"Model `{Path(report['model']).name}` ({kind}), {s['sampler']} sampler, {s['steps']} steps, "
        f"guidance {s['guidance']:g}, {s['size']}x{s['size']} px generator scenes, {s['n']} per section; "
        f"{report['seconds']['total']:.0f} s on {s['device']}, {s['threads']} torch thread(s).",
        "",
        "### img2img: a prompt that recolours the object",
        "",
        "Kept the input's layout (kind and background as the input's, overlap of the object's pixels "
        "with the input's, mean pixel distance) against obeying the prompt (the new colour).",
        "",
        "| strength | kind kept | background kept | object IoU | pixel distance | new colour |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["img2img"]:
        out.append(f"| {row['strength']:g} | {_cell(row['kind_kept'])} | {_cell(row['background_kept'])} | "
                   f"{row['object_iou']:.2f} | {row['pixel_distance']:.3f} | {_cell(row['new_color'])} |")
    out += ["", f"### Inpainting: another kind in another colour where the object was (mask blur {s['mask_blur']})",
            "",
            f"Mask: the object's box grown by {s['mask_margin']} px ({inp['mask_fraction']:.0%} of the picture). "
            f"Seam: the mask's inner {s['seam']}-px border reads as the input's background colour.", "",
            "| kind (target 0.90) | colour (target 0.85) | background | all | max abs change outside the mask "
            "| kept exactly | seam |",
            "|---|---|---|---|---|---|---|",
            f"| {_cell(inp['kind'])} | {_cell(inp['color'])} | {_cell(inp['background'])} | {_cell(inp['all'])} | "
            f"{inp['max_abs_outside']:.3f} | {_cell(inp['kept_exactly'])} | {_cell(inp['seam_background'])} |",
            "", f"### Outpainting: {outp['margin']} px added on one side ({', '.join(outp['sides'])} in turn)", "",
            "| new area's background = the input's (target 0.90) | max abs change outside the mask |",
            "|---|---|",
            f"| {_cell(outp['background'])} | {outp['max_abs_outside']:.3f} |", ""]
    return "\n".join(out)


def write_report(report: dict[str, Any], out: Path, log: Log = eval_toy._print) -> tuple[Path, Path]:
    return eval_toy.write_files(report, markdown(report), out / "eval_editing", log)


# --- command line ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = eval_toy.common_arguments(__doc__)
    p.add_argument("--n", type=int, default=N, help=f"pictures per section (default {N})")
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS),
                   help="img2img strengths (default 0.3 0.5 0.75 1)")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"guidance scale (default {GUIDANCE})")
    p.add_argument("--mask-blur", type=int, default=MASK_BLUR, help=f"default {MASK_BLUR}")
    p.add_argument("--out", type=Path, default=OUT, help="folder for eval_editing.md/.json (default .cache/eval)")
    p.add_argument("--strip", type=Path, default=None, help="picture strip PNG (default <out>/strip.png)")
    p.add_argument("--strip-rows", type=int, default=STRIP_ROWS, help=f"scenes in the strip (default {STRIP_ROWS})")
    args = p.parse_args(argv)
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if any(not 0 < s <= 1 for s in args.strengths):
        p.error(f"--strengths must be in (0, 1], got {args.strengths}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_toy.set_fast_paths(args)
    return eval_toy.run_and_print(lambda: evaluate(
        args.model, n=args.n, strengths=args.strengths, steps=args.steps, sampler=args.sampler,
        guidance=args.guidance, mask_blur=args.mask_blur, seed=args.seed, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, classifier=args.classifier, out=args.out, strip=args.strip,
        strip_rows=args.strip_rows, threads=args.threads), markdown)


if __name__ == "__main__":
    sys.exit(main())
