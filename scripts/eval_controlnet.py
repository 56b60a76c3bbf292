"""Measure the toy ControlNet (weights/ldm-toy-controlnet-silhouette.safetensors): does the
object go where the hint puts it, and is it still the prompt's object?

    python scripts/eval_controlnet.py            # the shipped ControlNet, defaults below
    python scripts/eval_controlnet.py --controlnet PATH --n 40 --scales 0 1
    python scripts/eval_controlnet.py --smoke --controlnet PATH      # 2 prompts, 2 steps (the tests run it)

1. Prompts: the ``--n`` held-out prompts of ``scripts/eval_toy.py`` ((kind, colour,
   background) combinations never seen together in training, half in held-out
   phrasings). Each comes with a scene at a random position and size drawn for it
   (``ldm.toy.world.eval_prompts``), and the hint is that scene's silhouette
   (``ldm.toy.hints``): held-out prompts at hint positions and sizes never trained on.
2. Every prompt is rendered with its hint at each ControlNet scale of ``--scales``
   (0, 0.5, 1, 1.5); scale 0 is the model without the ControlNet (the residuals times 0
   add nothing, so the pipeline is run without it). Same seed for a prompt at every scale.
3. Measures, per scale: the IoU of the generated object's mask (``ldm.toy.hints.object_mask``:
   pixels that are mostly not the prompt's background colour, holes filled) with the
   hint's silhouette; kind, colour, background and hat accuracy (``ldm.toy.score``, as
   ``scripts/eval_toy.py`` scores). Also each prompt's own scene through the model's VAE:
   the ceiling the VAE and the scorer set.
4. A picture strip (``--strip``, default ``weights/controlnet.png``): the hints, then a
   row per scale.

Targets at scale 1: IoU >= 0.80, and kind and object colour accuracy >= 0.90.
Sampling as ``pipe(prompt)`` does (DPM++ 2M, 25 steps, guidance 7.5 unless ``--guidance``), one thread.
Writes ``<out>/eval_controlnet.md`` and ``.json`` (default ``.cache/eval``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # eval_toy sits beside this file (and puts the checkout on the path)
    sys.path.insert(0, str(SCRIPTS))

import eval_toy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from eval_toy import GUIDANCE, Log, accuracy_table, heldout_prompts, render  # noqa: E402

from ldm.control import Control, ControlNet  # noqa: E402
from ldm.paths import WEIGHTS_DIR  # noqa: E402
from ldm.toy.hints import hint, iou, object_mask, silhouette_mask  # noqa: E402
from ldm.toy.roundtrip import to_uint8, vae_round_trips  # noqa: E402
from ldm.toy.score import score_images  # noqa: E402

CONTROLNET = WEIGHTS_DIR / "ldm-toy-controlnet-silhouette.safetensors"
STRIP = WEIGHTS_DIR / "controlnet.png"
SCALES = (0.0, 0.5, 1.0, 1.5)
TARGETS = {"iou": 0.80, "kind": 0.90, "color": 0.90}
TARGET_SCALE = 1.0
STRIP_COLUMNS = 6
SMOKE = dict(n=2, steps=2)


def render_controlled(pipe, controlnet: ControlNet, prompts: Sequence[str], seeds: Sequence[int],
                      hints: Sequence[np.ndarray], scale: float, *, steps: int, sampler: str,
                      label: str, log: Log, end: float = 1.0, guess_mode: bool = False,
                      guidance: float = GUIDANCE) -> np.ndarray:
    """One uint8 picture per (prompt, seed, hint) with the ControlNet at ``scale``: one
    call per picture, since a call takes one hint image for all its rows."""
    out, t0 = [], time.perf_counter()
    for i, (prompt, seed, image) in enumerate(zip(prompts, seeds, hints)):
        control = Control(controlnet, image.astype(np.float32) / 255.0, scale=scale, end=end,
                          guess_mode=guess_mode)
        gen = pipe.generate(prompt, steps=steps, guidance_scale=guidance, seed=seed, sampler=sampler,
                            output="np", progress=False, control=control)
        out.append(to_uint8(gen.images))
        if (i + 1) % 20 == 0 or i + 1 == len(prompts):
            log(f"[{label}] {i + 1}/{len(prompts)} pictures, {time.perf_counter() - t0:.0f} s")
    return np.concatenate(out)


def measures(images: np.ndarray, prompts: Sequence[Any], classifier: Any) -> dict[str, Any]:
    """IoU of each picture's object mask with its prompt's hint silhouette, and the accuracies."""
    size = images.shape[1]
    ious = [iou(object_mask(img, p.attributes["background"]), silhouette_mask(p.scene, size))
            for img, p in zip(images, prompts)]
    scores = score_images(images, [p.attributes for p in prompts], classifier)
    return {"iou": float(np.mean(ious)), "iou_at_least_0.8": float(np.mean(np.array(ious) >= 0.8)),
            "ious": [round(v, 4) for v in ious], "scores": scores, "attributes": accuracy_table(scores)}


def sweep(pipe, controlnet: ControlNet, args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], list]:
    """Sections 1-3 of the docstring; also the pictures of each scale (for the strip)."""
    prompts = [p for _, p in heldout_prompts(args.n, args.seed)]
    texts = [p.prompt for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    size = pipe.config.default_size
    hints = [hint(p.scene, args.hint, size) for p in prompts]
    rows, pictures = [], []
    for scale in args.scales:
        label = f"scale {scale:g}"
        if scale == 0:
            images = render(pipe, texts, seeds, steps=args.steps, sampler=args.sampler, guidance=args.guidance,
                            batch_size=args.batch_size, label=label + " (no ControlNet)", log=log)
        else:
            images = render_controlled(pipe, controlnet, texts, seeds, hints, scale, steps=args.steps,
                                       sampler=args.sampler, label=label, log=log, end=args.end,
                                       guess_mode=args.guess_mode, guidance=args.guidance)
        rows.append({"scale": scale, **measures(images, prompts, args.classifier)})
        pictures.append(images)
    ceiling = measures(vae_round_trips(pipe, [p.scene for p in prompts], args.batch_size), prompts, args.classifier)
    report = {"scales": rows, "vae_round_trip": ceiling,
              "prompts": [{"prompt": t, "seed": s, "scene": vars(p.scene)} for t, s, p in zip(texts, seeds, prompts)]}
    return report, [np.stack(hints), *pictures]


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Each target at scale 1 (when it was run), met or not."""
    row = next((r for r in report["scales"] if r["scale"] == TARGET_SCALE), None)
    if row is None:
        return {"scale": TARGET_SCALE, "run": False}
    got = {"iou": row["iou"], **{k: row["attributes"][k]["accuracy"] for k in ("kind", "color")}}
    return {"scale": TARGET_SCALE, "run": True, **got, **{f"{k}_ok": got[k] >= TARGETS[k] for k in TARGETS}}


def strip(pictures: list, texts: Sequence[str], scales: Sequence[float], columns: int, path: Path) -> Path:
    """The first ``columns`` prompts' hints, then their pictures at each scale, one row each."""
    k = min(columns, len(texts))
    images, captions = [], []
    for row, name in zip(pictures, ["hint"] + [f"scale {s:g}" for s in scales]):
        images += list(row[:k])
        captions += [f"{name}: {t}" if name != "hint" else "hint" for t in texts[:k]]
    return eval_toy.save_grid(eval_toy.caption_grid(images, captions, columns=k), path)


def markdown(report: dict[str, Any]) -> str:
    s, v = report["settings"], report["verdict"]
    out = ["## The toy ControlNet (silhouette hints)", "",
           f"`{Path(report['controlnet']).name}` on `{Path(report['model']).name}`: {s['n']} held-out prompts, "
           f"each with the {s['hint']} of a scene at a random position and size; {s['sampler']}, {s['steps']} "
           f"steps, guidance {s.get('guidance', GUIDANCE):g}{', guess mode' if s.get('guess_mode') else ''}"
           f"{', the ControlNet until %g of the steps' % s['end'] if s.get('end', 1) < 1 else ''}, "
           f"{s['threads']} thread(s); {report['seconds']:.0f} s in all. Scale 0 is "
           "the model without the ControlNet. IoU: the generated object's mask against the hint's silhouette.",
           "", "| ControlNet scale | IoU with the hint | IoU >= 0.8 | object kind | object colour | background | "
           "hat yes/no | all attributes |", "|---|---|---|---|---|---|---|---|"]
    for row in [*report["scales"], {"scale": None, **report["vae_round_trip"]}]:
        a = row["attributes"]
        name = "VAE round trip of the scene" if row["scale"] is None else f"{row['scale']:g}"
        out.append(f"| {name} | {row['iou']:.3f} | {row['iou_at_least_0.8']:.2f} | "
                   + " | ".join(eval_toy._cell(a.get(k)) for k in ("kind", "color", "background", "hat", "all"))
                   + " |")
    if v["run"]:
        met = {k: "met" if v[f"{k}_ok"] else "NOT met" for k in TARGETS}
        mode = " in guess mode" if s.get("guess_mode") else ""
        out += ["", f"Targets at scale {TARGET_SCALE:g}{mode}: IoU {v['iou']:.3f} >= {TARGETS['iou']:.2f} {met['iou']}; "
                f"kind {v['kind']:.2f} >= {TARGETS['kind']:.2f} {met['kind']}; object colour {v['color']:.2f} >= "
                f"{TARGETS['color']:.2f} {met['color']}."]
    return "\n".join(out + [""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = eval_toy.common_arguments(__doc__)
    p.add_argument("--controlnet", type=Path, default=CONTROLNET, help="the ControlNet (default %(default)s)")
    p.add_argument("--hint", choices=("silhouette", "outline"), default="silhouette",
                   help="the hint it reads (default %(default)s)")
    p.add_argument("--n", type=int, default=eval_toy.N, help="held-out prompts (default %(default)s)")
    p.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                   help="ControlNet scales (default 0 0.5 1 1.5)")
    p.add_argument("--end", type=float, default=1.0,
                   help="the fraction of the steps the ControlNet acts in, from the first (Control's end; "
                        "default 1: all of them)")
    p.add_argument("--guess-mode", action="store_true",
                   help="the ControlNet on the conditional half of guidance only, at diffusers' per-block scales")
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for eval_controlnet.md/.json (default .cache/eval)")
    p.add_argument("--strip", type=Path, default=None, help=f"picture strip (default {STRIP}; --smoke: <out>)")
    p.add_argument("--smoke", action="store_true", help="2 prompts, 2 sampling steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.steps = SMOKE["n"], SMOKE["steps"]
    args.out = args.out or eval_toy.OUT
    args.strip = args.strip or (args.out / "controlnet.png" if args.smoke else STRIP)
    for name in ("n", "steps", "batch_size", "threads"):
        if getattr(args, name) < (2 if name == "n" else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    if not 0 < args.end <= 1:
        p.error(f"--end must be in (0, 1], got {args.end}")
    if not 1 <= args.guidance <= 30:
        p.error(f"--guidance must be between 1 and 30, got {args.guidance}")
    if any(not 0 <= s <= 10 for s in args.scales):
        p.error(f"--scales must be between 0 and 10, got {args.scales}")
    return args


def evaluate(args: argparse.Namespace, log: Log = eval_toy._print) -> dict[str, Any]:
    """The whole evaluation (see the module doc); writes the report files and returns the report."""
    t0 = time.perf_counter()
    pipe = eval_toy.load_pipeline(args.model, args.device, args.dtype)
    controlnet = ControlNet.from_pretrained(args.controlnet, device=args.device, dtype="float32")
    report, pictures = sweep(pipe, controlnet, args, log)
    texts = [p["prompt"] for p in report["prompts"]]
    report.update(controlnet=str(args.controlnet), model=str(args.model or "weights/ldm-toy.safetensors"),
                  settings={"n": args.n, "hint": args.hint, "end": args.end, "guess_mode": args.guess_mode,
                            "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
                            "seed": args.seed, "threads": torch.get_num_threads()},
                  strip=str(strip(pictures, texts, args.scales, STRIP_COLUMNS, args.strip)))
    report["verdict"] = verdict(report)
    return eval_toy.finish(report, t0, markdown, args.out / "eval_controlnet", log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_toy.set_fast_paths(args)
    return eval_toy.run_and_print(lambda: evaluate(args), markdown, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
