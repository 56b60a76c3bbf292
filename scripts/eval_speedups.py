"""Measure what the opt-in speed-ups cost on the shipped toy model: held-out scores,
seconds per picture and the pixel difference to the default call, row by row.

    python scripts/eval_speedups.py              # every row below, 120 prompts (~6 min on one core)
    python scripts/eval_speedups.py --n 40 --rows default guidance_end=0.6 cache_interval=3
    python scripts/eval_speedups.py --smoke      # 2 prompts, 3 steps (the tests run it)

1. Prompts: the ``--n`` held-out prompts of ``scripts/eval_toy.py``, picture ``i`` from
   seed ``--seed + i`` in every row, ``pipe(prompt)``'s sampling (DPM++ 2M, 25 steps,
   guidance 7.5), float32 unless a row says otherwise.
2. Rows (``--rows``): ``default``, then each row's ``Pipeline.generate`` options,
   ``name=value`` joined by ``+``: ``guidance_end`` (classifier-free guidance only for
   that fraction of the steps), ``cache_interval`` (DeepCache: the whole U-Net every
   N-th evaluation, the shallow branch on kept deep features in between), ``token_merging``
   (ToMe: that fraction of the tokens merged around self-attention at the U-Net's highest
   resolution; on the toy model 64 tokens, too few for it to save time), ``dtype``
   (the pipeline's, e.g. ``dtype=bfloat16``: the CPU default where bf16 is native).
3. Per row: kind, colour, background and hat accuracy (``ldm.toy.score``), the wall
   seconds per picture (``--batch-size`` pictures per call, ``--threads`` threads, one
   untimed call first), the speed-up over ``default``, and how far its pictures are from
   ``default``'s: mean absolute difference (of 255) and PSNR.

Writes ``<out>/eval_speedups.md`` and ``.json`` (default ``.cache/eval``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # eval_toy sits beside this file (and puts the checkout on the path)
    sys.path.insert(0, str(SCRIPTS))

import eval_toy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from eval_toy import GUIDANCE, Log, accuracy_table, heldout_prompts, render  # noqa: E402

from ldm.models.cpuinfo import cpu_model  # noqa: E402
from ldm.toy.score import score_images  # noqa: E402

ROWS = ("default", "guidance_end=0.8", "guidance_end=0.6", "guidance_end=0.4", "cache_interval=2",
        "cache_interval=3", "cache_interval=5", "guidance_end=0.6+cache_interval=3", "token_merging=0.3",
        "token_merging=0.5", "dtype=bfloat16")
OPTIONS = {"guidance_end": float, "cache_interval": int, "token_merging": float, "dtype": str}
ATTRIBUTES = ("kind", "color", "background", "hat", "all")
SMOKE = dict(n=2, steps=3)  # 3: guidance_end 0.4 keeps a guided step


def parse_row(text: str) -> dict[str, Any]:
    """``default`` or ``name=value+name=value`` into ``generate`` options (``dtype`` included)."""
    if text == "default":
        return {}
    options: dict[str, Any] = {}
    for part in text.split("+"):
        name, sep, value = part.partition("=")
        if not sep or name not in OPTIONS:
            raise ValueError(f"row {text!r}: {part!r} is not name=value with a name of {', '.join(OPTIONS)}")
        try:
            options[name] = OPTIONS[name](value)
        except ValueError:
            raise ValueError(f"row {text!r}: {name} takes a {OPTIONS[name].__name__}, got {value!r}") from None
    return options


def difference(pictures: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Mean absolute difference (of 255) and PSNR (dB; inf when equal) to ``reference``."""
    d = pictures.astype(np.float64) - reference.astype(np.float64)
    mse = float((d ** 2).mean())
    return {"mean_abs_255": round(float(np.abs(d).mean()), 2),
            "psnr_db": round(10 * math.log10(255.0 ** 2 / mse), 2) if mse else math.inf}


def sweep(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Sections 1-3 of the docstring."""
    prompts = [p for _, p in heldout_prompts(args.n, args.seed)]
    texts, attrs = [p.prompt for p in prompts], [p.attributes for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    pipes: dict[str, Any] = {}
    results, reference = [], None
    for text in args.rows:
        options = parse_row(text)
        dtype = options.pop("dtype", args.dtype)
        if dtype not in pipes:
            pipes[dtype] = eval_toy.load_pipeline(args.model, args.device, dtype)
        pipe = pipes[dtype]
        common = dict(guidance=args.guidance, sampler=args.sampler, **options)
        render(pipe, texts[:1], seeds[:1], steps=args.steps, log=lambda _: None, **common)  # untimed
        t0 = time.perf_counter()
        images = render(pipe, texts, seeds, steps=args.steps, batch_size=args.batch_size, label=text, log=log,
                        **common)
        seconds = (time.perf_counter() - t0) / len(texts)
        reference = images if reference is None else reference
        results.append({"row": text, "dtype": dtype, "options": options, "seconds_per_picture": round(seconds, 4),
                        "speedup": round(results[0]["seconds_per_picture"] / seconds, 2) if results else 1.0,
                        "to_first_row": difference(images, reference),
                        "attributes": accuracy_table(score_images(images, attrs, args.classifier))})
    return {"rows": results, "prompts": [{"prompt": t, "seed": s} for t, s in zip(texts, seeds)]}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = ["## Opt-in speed-ups on the toy model", "",
           f"{s['n']} held-out prompts, the same seeds in every row; {s['sampler']} {s['steps']} steps, guidance "
           f"{s['guidance']:g}; {s['threads']} thread(s), {s['batch_size']} pictures per call on {s['cpu']}; "
           f"{report['seconds']:.0f} s in all. Difference: to the first row's pictures.", "",
           "| row | object kind | object colour | background | hat yes/no | all attributes | s / picture "
           "| speed-up | mean abs diff /255 | PSNR dB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        a, d = row["attributes"], row["to_first_row"]
        out.append(f"| {row['row']} | " + " | ".join(eval_toy._cell(a.get(k)) for k in ATTRIBUTES)
                   + f" | {row['seconds_per_picture']:.3f} | {row['speedup']:.2f}x | {d['mean_abs_255']:.1f} "
                   f"| {d['psnr_db']:.1f} |")
    return "\n".join(out + [""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = eval_toy.common_arguments(__doc__)
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="guidance scale (default %(default)s)")
    p.add_argument("--n", type=int, default=eval_toy.N, help="held-out prompts (default %(default)s)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help="rows (see the doc; default: all of them)")
    p.add_argument("--out", type=Path, default=None, help="folder for eval_speedups.md/.json (default .cache/eval)")
    p.add_argument("--smoke", action="store_true", help="2 prompts, 3 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.steps = SMOKE["n"], SMOKE["steps"]
    args.out = args.out or eval_toy.OUT
    for name in ("n", "steps", "batch_size", "threads"):
        if getattr(args, name) < (2 if name == "n" else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    try:
        for row in args.rows:
            parse_row(row)
    except ValueError as exc:
        p.error(str(exc))
    return args


def evaluate(args: argparse.Namespace, log: Log = eval_toy._print) -> dict[str, Any]:
    """The whole evaluation (see the module doc); writes the report files and returns the report."""
    from ldm.toy.classifier import get_classifier

    t0 = time.perf_counter()
    args.classifier = get_classifier(args.classifier)
    report = sweep(args, log)
    report["settings"] = {"n": args.n, "steps": args.steps, "sampler": args.sampler, "guidance": args.guidance,
                          "seed": args.seed, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
                          "cpu": cpu_model(), "model": str(args.model or "weights/ldm-toy.safetensors")}
    return eval_toy.finish(report, t0, markdown, args.out / "eval_speedups", log)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_toy.set_fast_paths(args)
    return eval_toy.run_and_print(lambda: evaluate(args), markdown, threads=args.threads)


if __name__ == "__main__":
    sys.exit(main())
