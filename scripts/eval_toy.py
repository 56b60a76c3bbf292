"""Evaluate the toy model (weights/ldm-toy.safetensors) on the procedural toy world.

    python scripts/eval_toy.py                          # the shipped model, defaults below
    python scripts/eval_toy.py --model PATH --out DIR   # another checkpoint
    python scripts/eval_toy.py --n 30 --negative-seeds 8 --scales 7.5   # a quick look

Every picture is scored against its prompt by ``ldm.toy.score``: object kind and
whether a cat wears a hat by the small CNN in ``weights/toy_classifier.safetensors``,
object, background and hat colours from the pixels. An attribute's accuracy counts
only prompts that state it.

1. Held-out prompts: ``--n`` prompts (default 120) for (kind, colour, background)
   combinations that never occur together in training (``ldm.toy.eval_prompts``),
   half worded with the training templates and half with held-out phrasings (the
   same combinations in the same order in both halves; hats are drawn separately).
   Every prompt states every attribute. Per-attribute accuracy and the rate of all attributes right.
   Also each prompt's own scene, drawn by the generator and passed through the model's
   VAE (``ldm.toy.roundtrip``), scored the same way: the ceiling the VAE and scorer set.
2. Guidance scale: the same prompts and seeds at each of ``--scales`` (1, 3, 7.5).
3. Negative prompts: "a cat" and "a cat wearing a hat" with negative "red hat",
   "a circle" with negative "red" and "a square" with negative "blue background",
   against no negative prompt, over the same ``--negative-seeds`` seeds: the fraction
   with a red hat (hat present and red), a red circle or a blue background should drop.
4. A captioned picture grid (``--grid``, default ``<out>/grid.png``).

Defaults: the settings a user gets from ``pipe(prompt)`` (``Pipeline.generate``'s
defaults: DPM++ 2M, 25 steps, guidance 7.5), float32 on the CPU with one thread
(numbers reproduce on any machine). The default run renders about 650 pictures: ~3
minutes on 2 CPU cores. The sampler and step count matter on the toy model: at
guidance 7.5, DPM++ 2M gets the kind right less often at 20 steps than at 25 or 50,
and less often than Euler or DDIM at 20 (README, "Toy model").
Picture ``i`` of a section has seed ``--seed + i`` (paired across guidance scales and
with/without a negative prompt); each picture has its own generator, so results do
not depend on ``--batch-size`` (up to the last float bits).

Writes ``<out>/eval_toy.md`` (tables for the README), ``<out>/eval_toy.json`` (the
numbers and every picture's scores) and the grid. Also usable from Python:
``evaluate(model, n=..., ...) -> report``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from a checkout without installing
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ldm.atomicio import atomic_write, atomic_write_bytes  # noqa: E402
from ldm.models.fused_linear import set_fused_linear  # noqa: E402
from ldm.models.switches import MODES  # noqa: E402
from ldm.models.upsample_conv import set_upsample_phases  # noqa: E402
from ldm.models.winograd import set_wide_tiles, set_winograd  # noqa: E402
from ldm.pipeline import Pipeline  # noqa: E402
from ldm.toy.score import score_images  # noqa: E402
from ldm.toy.roundtrip import to_uint8, vae_round_trips  # noqa: E402
from ldm.toy.world import eval_prompts, prompt_to_attributes  # noqa: E402

N = 120  # 60 per wording: each of the 30 held-out combinations twice
# "At the default settings": what Pipeline.generate uses when not told otherwise.
_GENERATE = inspect.signature(Pipeline.generate).parameters
STEPS = _GENERATE["steps"].default
SAMPLER = _GENERATE["sampler"].default
GUIDANCE = _GENERATE["guidance_scale"].default
SCALES = (1.0, 3.0, 7.5)
NEGATIVE_SEEDS = 48
BATCH_SIZE = 32
SEED = 0
# The toy model's tensors are tiny: one thread is as fast as two and does not stall
# when another job shares the cores (two threads could run 5x slower then).
THREADS = 1
OUT = ROOT / ".cache" / "eval"
TILE = 128
GRID_COLUMNS = 4

# Table order; an attribute is reported when some prompt states it.
ATTRIBUTES = ("kind", "hat", "color", "background", "hat_color")
LABELS = {"kind": "object kind", "hat": "hat yes/no (cats)", "color": "object colour",
          "background": "background colour", "hat_color": "hat colour", "all": "all attributes"}

GRID_PROMPTS = (
    "a cat wearing a hat",
    "a black cat wearing a red hat on a yellow background",
    "a green triangle on a white background",
    "a red circle on a blue background",
    "a cat",
    "a white cat with a blue hat, purple background",
    "a purple square on an orange background",
    "a yellow star on a black background",
    "an orange cat on a green background",
    "a blue square, red background",
    "a drawing of a red star on a white background",
    "a green cat wearing a yellow hat on a black background",
)


@dataclass(frozen=True)
class NegativeTest:
    prompt: str
    negative: str
    target: dict  # what counts as a hit: every one of these attributes is seen
    what: str  # the hit, in words


# "a cat" states no hat, so in this world it should show none with or without the negative
# prompt (a check that the negative does not put back what it names); the others leave a
# colour open, so about one picture in seven shows the named one without the negative.
NEGATIVE_TESTS = (
    NegativeTest("a cat", "red hat", {"hat": True, "hat_color": "red"}, "red hat"),
    NegativeTest("a cat wearing a hat", "red hat", {"hat": True, "hat_color": "red"}, "red hat"),
    NegativeTest("a circle", "red", {"kind": "circle", "color": "red"}, "red circle"),
    NegativeTest("a square", "blue background", {"background": "blue"}, "blue background"),
)

Log = Callable[[str], None]


def _print(message: str) -> None:
    print(message, flush=True)


# --- rendering and scoring ---------------------------------------------------------------------


def load_pipeline(model: Any = None, device: str = "cpu", dtype: str = "float32"):
    """A Pipeline as given, or loaded from a path (None: the shipped model), in ``dtype``
    (float32 unless asked: the published scores were measured in it)."""
    if isinstance(model, Pipeline):
        return model
    return Pipeline.from_pretrained(model, device=device, dtype=dtype)


def render(pipe, prompts: Sequence[str], seeds: Sequence[int], *, negative: str | None = None,
           steps: int = STEPS, guidance: float = GUIDANCE, sampler: str = SAMPLER,
           batch_size: int = BATCH_SIZE, label: str = "", log: Log = _print, **options: Any) -> np.ndarray:
    """One uint8 ``(H, W, 3)`` picture per (prompt, seed), ``batch_size`` per call;
    ``options``: more ``Pipeline.generate`` arguments (e.g. ``guidance_end``)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    out, t0 = [], time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        gen = pipe.generate(list(prompts[lo:lo + batch_size]), negative_prompt=negative, steps=steps,
                            guidance_scale=guidance, seed=list(seeds[lo:lo + batch_size]),
                            sampler=sampler, output="np", progress=False, **options)
        out.append(to_uint8(gen.images))
        done = min(lo + batch_size, len(prompts))
        log(f"[{label}] {done}/{len(prompts)} pictures, {time.perf_counter() - t0:.0f} s")
    return np.concatenate(out)


def accuracy_table(scores: Sequence[dict[str, bool]]) -> dict[str, dict[str, Any]]:
    """``{attribute: {"accuracy", "correct", "count"}}`` over the prompts stating it, plus ``all``."""
    table: dict[str, dict[str, Any]] = {}
    for name in ATTRIBUTES:
        seen = [s[name] for s in scores if name in s]
        if seen:
            table[name] = _rate(sum(seen), len(seen), "accuracy")
    table["all"] = _rate(sum(all(s.values()) for s in scores), len(scores), "accuracy")
    return table


def _rate(hits: int, count: int, key: str) -> dict[str, Any]:
    return {key: hits / count if count else 0.0, "correct" if key == "accuracy" else "hits": int(hits),
            "count": int(count)}


# --- the sections ----------------------------------------------------------------------------


def heldout_prompts(n: int, seed: int = SEED) -> list[tuple[str, Any]]:
    """``(wording, EvalPrompt)``: the first half in training wording, the rest paraphrased."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one prompt per wording), got {n}")
    first = n // 2
    return ([("train", p) for p in eval_prompts(first, seed, paraphrase=False)]
            + [("heldout", p) for p in eval_prompts(n - first, seed, paraphrase=True)])


def negative_section(pipe, tests: Sequence[NegativeTest], seeds: Sequence[int], classifier: Any,
                     render_kw: dict, log: Log) -> list[dict[str, Any]]:
    results = []
    for test in tests:
        entry: dict[str, Any] = {"prompt": test.prompt, "negative_prompt": test.negative,
                                 "target": dict(test.target), "what": test.what}
        for key, negative in (("without", None), ("with", test.negative)):
            label = f"negative {test.prompt!r} {'- ' + repr(negative) if negative else '(none)'}"
            images = render(pipe, [test.prompt] * len(seeds), seeds, negative=negative,
                            label=label, log=log, **render_kw)
            scores = score_images(images, [test.target] * len(seeds), classifier)
            hits = sum(all(s.values()) for s in scores)
            entry[key] = {**_rate(hits, len(seeds), "fraction"),
                          "rates": {a: sum(s[a] for s in scores) / len(seeds) for a in test.target}}
        results.append(entry)
    return results


def evaluate(model: Any = None, *, n: int = N, steps: int = STEPS, sampler: str = SAMPLER,
             guidance: float = GUIDANCE, scales: Sequence[float] = SCALES,
             negative_seeds: int = NEGATIVE_SEEDS, seed: int = SEED, batch_size: int = BATCH_SIZE,
             device: str = "cpu", dtype: str = "float32", classifier: Any = None,
             negative_tests: Sequence[NegativeTest] = NEGATIVE_TESTS,
             grid_prompts: Sequence[str] = GRID_PROMPTS, out: str | Path | None = OUT,
             grid: str | Path | None = None, threads: int | None = THREADS,
             log: Log = _print) -> dict[str, Any]:
    """Run every section; write ``eval_toy.md``, ``eval_toy.json`` and the grid under ``out``
    (``grid`` overrides the grid's path; ``out=None`` writes nothing). Returns the report.

    ``threads``: torch threads while it runs (None: leave as is)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _evaluate(model, n=n, steps=steps, sampler=sampler, guidance=guidance, scales=scales,
                         negative_seeds=negative_seeds, seed=seed, batch_size=batch_size, device=device, dtype=dtype,
                         classifier=classifier, negative_tests=negative_tests, grid_prompts=grid_prompts,
                         out=out, grid=grid, log=log)
    finally:
        torch.set_num_threads(before)


def _evaluate(model: Any, *, n: int, steps: int, sampler: str, guidance: float, scales: Sequence[float],
              negative_seeds: int, seed: int, batch_size: int, device: str, dtype: str, classifier: Any,
              negative_tests: Sequence[NegativeTest], grid_prompts: Sequence[str], out: str | Path | None,
              grid: str | Path | None, log: Log) -> dict[str, Any]:
    from ldm.toy.classifier import get_classifier

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    pipe = load_pipeline(model, device, dtype)
    classifier = get_classifier(classifier)
    seconds["load"] = time.perf_counter() - t_start
    render_kw = dict(steps=steps, sampler=sampler, batch_size=batch_size)
    model_name = str(getattr(pipe.model, "source", model))
    log(f"model {model_name}: {sampler}, {steps} steps, guidance {guidance}, on {pipe.device}")

    # 1 + 2: held-out prompts at every guidance scale (the main one first).
    t0 = time.perf_counter()
    prompts = heldout_prompts(n, seed)
    texts = [p.prompt for _, p in prompts]
    attrs = [p.attributes for _, p in prompts]
    seeds = [seed + i for i in range(n)]
    by_scale: dict[float, list[dict[str, bool]]] = {}
    for scale in [guidance, *[s for s in scales if s != guidance]]:
        images = render(pipe, texts, seeds, guidance=scale, label=f"held-out prompts, guidance {scale:g}",
                        log=log, **render_kw)
        by_scale[scale] = score_images(images, attrs, classifier)
    main = by_scale[guidance]
    # The ceiling that the VAE and the scorer set: the prompts' own pictures, round-tripped.
    reference = score_images(vae_round_trips(pipe, [p.scene for _, p in prompts], batch_size), attrs, classifier)
    wordings = {w: [s for (wording, _), s in zip(prompts, main) if wording == w] for w in ("train", "heldout")}
    seconds["heldout_prompts"] = time.perf_counter() - t0

    # 3: negative prompts.
    t0 = time.perf_counter()
    negative = negative_section(pipe, negative_tests, [seed + j for j in range(negative_seeds)], classifier,
                                dict(render_kw, guidance=guidance), log)
    seconds["negative"] = time.perf_counter() - t0

    report: dict[str, Any] = {
        "model": model_name,
        "settings": {"n": n, "steps": steps, "sampler": sampler, "guidance": guidance,
                     "scales": [float(s) for s in scales], "negative_seeds": negative_seeds, "seed": seed,
                     "batch_size": batch_size, "device": str(pipe.device), "dtype": str(pipe.dtype),
                     "size": int(pipe.config.default_size), "threads": _threads()},
        "attributes": {"overall": accuracy_table(main),
                       "train_wording": accuracy_table(wordings["train"]),
                       "heldout_wording": accuracy_table(wordings["heldout"]),
                       "vae_round_trip": accuracy_table(reference)},
        "guidance": [{"scale": float(s), "attributes": accuracy_table(by_scale[s])} for s in scales],
        "negative": negative,
        "images": [{"prompt": p.prompt, "wording": w, "seed": s, "attributes": p.attributes, "scores": score}
                   for (w, p), s, score in zip(prompts, seeds, main)],
        "grid": None,
        "seconds": seconds,
    }

    # 4: the grid, then the files.
    if out is not None or grid is not None:
        t0 = time.perf_counter()
        grid_path = Path(grid) if grid is not None else Path(out) / "grid.png"
        if grid_prompts:
            grid_seeds = [seed + k for k in range(len(grid_prompts))]
            images = render(pipe, list(grid_prompts), grid_seeds, guidance=guidance, label="grid",
                            log=log, **render_kw)
            grid_scores = score_images(images, [prompt_to_attributes(p) for p in grid_prompts], classifier)
            save_grid(caption_grid(images, grid_prompts), grid_path)
            report["grid"] = {"path": str(grid_path), "prompts": list(grid_prompts), "seeds": grid_seeds,
                              "scores": grid_scores}
            log(f"wrote {grid_path}")
        seconds["grid"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    if out is not None:
        write_report(report, Path(out), log)
    return report


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# --- outputs ---------------------------------------------------------------------------------


def caption_grid(images: Sequence[np.ndarray], captions: Sequence[str], columns: int = GRID_COLUMNS,
                 tile: int = TILE) -> Image.Image:
    """Pictures upscaled (nearest) to ``tile`` px, each with its caption wrapped below it."""
    if len(images) != len(captions) or len(images) == 0:
        raise ValueError(f"need as many captions as pictures (>= 1), got {len(images)} and {len(captions)}")
    font = ImageFont.load_default()
    pad = 4
    lines = [_wrap(c, font, tile - 2 * pad) for c in captions]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_h = ascent + descent + 1
    text_h = max(len(ls) for ls in lines) * line_h + 2 * pad
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, text) in enumerate(zip(images, lines)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        sheet.paste(Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((tile, tile), Image.NEAREST), (x, y))
        for k, line in enumerate(text):
            width = draw.textlength(line, font=font)
            draw.text((x + (tile - width) / 2, y + tile + pad + k * line_h), line, fill="black", font=font)
    return sheet


def _wrap(text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines or [""]


def save_grid(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: image.save(f, format="PNG", optimize=True))


def _cell(entry: dict[str, Any] | None, key: str = "accuracy", counts: bool = True) -> str:
    if entry is None:
        return "-"
    done = entry["correct" if key == "accuracy" else "hits"]
    return f"{entry[key]:.2f} ({done}/{entry['count']})" if counts else f"{entry[key]:.2f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables."""
    s = report["settings"]
    attrs = report["attributes"]
    names = [a for a in (*ATTRIBUTES, "all") if a in attrs["overall"]]
    out = [
        "## Toy model evaluation",
        "",
        f"Model `{Path(report['model']).name}`, {s['sampler']} sampler, {s['steps']} steps, "
        f"{s['size']}x{s['size']} px, {s['dtype'].replace('torch.', '')} on {s['device']}; "
        f"{report['seconds']['total']:.0f} s in all, {s['threads']} torch thread(s). "
        "Scored by `ldm.toy.score` (kind and hat: the toy classifier; colours: pixels).",
        "",
        f"### Held-out combinations (guidance {s['guidance']:g}, {s['n']} prompts)",
        "",
        "(kind, colour, background) combinations never seen together in training, the same ones "
        "worded with the training templates and with held-out phrasings. Accuracy over the prompts "
        "that state the attribute (correct/count). The last column scores no generated picture: "
        "each prompt's own scene, drawn by the generator and passed through the model's VAE "
        "(encode, decode), the score of a U-Net that drew exactly the prompt.",
        "",
        "| attribute | training wording | held-out wording | all prompts | VAE round trip of the prompt's scene |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        out.append(f"| {LABELS[name]} | {_cell(attrs['train_wording'].get(name))} | "
                   f"{_cell(attrs['heldout_wording'].get(name))} | {_cell(attrs['overall'].get(name))} | "
                   f"{_cell(attrs['vae_round_trip'].get(name))} |")
    out += ["", "### Guidance scale", "",
            f"The same {s['n']} prompts and seeds at each scale (1: no classifier-free guidance).", "",
            "| guidance | " + " | ".join(LABELS[a] for a in names) + " |",
            "|---" * (len(names) + 1) + "|"]
    for row in report["guidance"]:
        out.append(f"| {row['scale']:g} | " + " | ".join(_cell(row["attributes"].get(a), counts=False)
                                                        for a in names) + " |")
    out += ["", f"### Negative prompt (guidance {s['guidance']:g}, {s['negative_seeds']} seeds)", "",
            "Fraction of pictures showing what the negative prompt names, without and with it "
            "(same seeds; a red hat = the classifier sees a hat and its colour reads red).", "",
            "| prompt | negative prompt | counted | without negative | with negative |",
            "|---|---|---|---|---|"]
    for row in report["negative"]:
        out.append(f"| {row['prompt']} | {row['negative_prompt']} | {row['what']} | "
                   f"{_cell(row['without'], 'fraction')} | {_cell(row['with'], 'fraction')} |")
    out.append("")
    return "\n".join(out)


def write_report(report: dict[str, Any], out: Path, log: Log = _print) -> tuple[Path, Path]:
    return write_files(report, markdown(report), out / "eval_toy", log)


def write_files(report: dict[str, Any], text: str, stem: Path, log: Log = _print) -> tuple[Path, Path]:
    """``<stem>.md`` (``text``) and ``<stem>.json`` (``report``), written atomically."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = atomic_write_bytes(stem.with_suffix(".md"), text.encode())
    js = atomic_write_bytes(stem.with_suffix(".json"), (json.dumps(report, indent=1) + "\n").encode())
    log(f"wrote {md} and {js}")
    return md, js


# --- command line ----------------------------------------------------------------------------


def common_arguments(doc: str) -> argparse.ArgumentParser:
    """A parser with the options every toy evaluation script shares (model, sampling, seeds, device)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint (default: the shipped weights/ldm-toy.safetensors, or $LDM_WEIGHTS)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    p.add_argument("--sampler", default=SAMPLER, help=f"default {SAMPLER}")
    p.add_argument("--seed", type=int, default=SEED, help="first seed (default 0)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"pictures per call (default {BATCH_SIZE})")
    p.add_argument("--device", default="cpu", help="default cpu")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--classifier", type=Path, default=None, help="toy classifier (default: weights/)")
    p.add_argument("--winograd", choices=MODES, default="auto",
                   help="Winograd 3x3 convolutions (ldm.models.winograd): auto (default: where they pay), "
                        "on (every eligible layer, to see their rounding on this small model), off")
    p.add_argument("--wide-tiles", choices=MODES, default="auto",
                   help="bfloat16 Winograd F(2x4, 3x3) where the filters are kept over a denoising loop "
                        "(ldm.models.winograd): auto or on (default; the same), off (F(2x2, 3x3), less rounding)")
    p.add_argument("--upsample-phases", choices=MODES, default="auto",
                   help="upsampling convolutions as four phases (ldm.models.upsample_conv): auto (default: where "
                        "they pay), on (every upsampling layer), off")
    p.add_argument("--fused-linear", choices=MODES, default="auto",
                   help="biases and GEGLU fused into oneDNN's GEMM (ldm.models.fused_linear): auto or on "
                        "(default; the same), off (F.linear and GELU as separate passes)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common_arguments(__doc__)
    p.add_argument("--n", type=int, default=N, help=f"held-out prompts (default {N})")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help=f"main guidance scale (default {GUIDANCE})")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                   help="guidance scales to compare (default 1 3 7.5)")
    p.add_argument("--negative-seeds", type=int, default=NEGATIVE_SEEDS,
                   help=f"pictures per negative-prompt condition (default {NEGATIVE_SEEDS})")
    p.add_argument("--out", type=Path, default=OUT, help="folder for eval_toy.md/.json (default .cache/eval)")
    p.add_argument("--grid", type=Path, default=None, help="grid PNG (default <out>/grid.png)")
    p.add_argument("--no-grid", action="store_true", help="skip the picture grid")
    args = p.parse_args(argv)
    for name in ("n", "steps", "negative_seeds", "batch_size"):
        if getattr(args, name) < (2 if name == "n" else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    return args


def set_fast_paths(args: argparse.Namespace) -> None:
    """The CPU fast paths' modes from ``--winograd``, ``--wide-tiles``, ``--upsample-phases``
    and ``--fused-linear``."""
    set_winograd(args.winograd)
    set_wide_tiles(args.wide_tiles)
    set_upsample_phases(args.upsample_phases)
    set_fused_linear(args.fused_linear)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_fast_paths(args)
    return run_and_print(lambda: evaluate(
        args.model, n=args.n, steps=args.steps, sampler=args.sampler, guidance=args.guidance, scales=args.scales,
        negative_seeds=args.negative_seeds, seed=args.seed, batch_size=args.batch_size, device=args.device,
        dtype=args.dtype, classifier=args.classifier, grid_prompts=() if args.no_grid else GRID_PROMPTS, out=args.out,
        grid=args.grid, threads=args.threads), markdown)


def finish(report: dict[str, Any], t0: float, tables: Callable[[dict[str, Any]], str], path: Path,
           log: Log) -> dict[str, Any]:
    """A report completed with its wall seconds since ``t0``, written as ``path``.md/.json."""
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_files(report, tables(report), path, log)
    return report


def run_and_print(run: Callable[[], dict[str, Any]], tables: Callable[[dict[str, Any]], str],
                  threads: int | None = None) -> int:
    """A script's exit code: run the evaluation (at ``threads`` torch threads if given, the
    count restored after), print its tables; a missing file is one line, exit 1."""
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        report = run()
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(before)
    print()
    print(tables(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
