"""Teach the shipped toy model a concept it has never seen with a LoRA, and measure it: the ring.

    python scripts/eval_lora.py                  # pictures, training, measures (about 10 min on 2 CPU cores)
    python scripts/eval_lora.py --n 32 --heldout-n 40 --detector-n 4 --sampler euler --steps 20
                                                 # the same training, a quicker look at the numbers
    python scripts/eval_lora.py --smoke          # every step at tiny sizes, in seconds (the tests run it)
    python scripts/eval_lora.py --lora PATH      # measure a LoRA trained before (no training)

1. Pictures, in kohya-ss's folder layout: ``--rings`` rings (``ldm.toy.concept``: the
   world's circles with a round hole, of every (colour, background) pair but 14 held out)
   in ``images/<--ring-repeats>_ring/``, shown that many times per epoch, and ``--others``
   ordinary world pictures in ``reg/1_world/``: regularisation pictures (``--reg-dir``),
   without which the LoRA also changes what the model draws for ordinary prompts (64 of
   them, or rings alone, cost 5 to 15 points of held-out kind and colour accuracy). They
   are trained towards the base model's own prediction (``--reg-target base``, output
   preservation) at loss weight 4: towards the pictures at weight 1 (kohya-ss's prior
   preservation) the colour score moved 3.3 points, towards the base at weight 1 4.2
   points with more rings drawn. Each picture has its world caption in a ``.txt`` beside it.
2. Training: ``ldm train-lora`` on that folder from the shipped model
   (``ldm.training.lora_train``; ``RECIPE`` below), written to ``--lora-out`` (default
   ``weights/ldm-toy-lora-ring.safetensors``); the command line it equals is printed. The
   text encoder gets a LoRA too, at a quarter of the U-Net's alpha: the word ``ring``
   was never trained, and a U-Net-only LoRA drew rings for about two thirds of the
   held-out prompts; a full-alpha text-encoder LoRA confuses colour words more. The file
   holds the moving average of the weights (decay 0.99), which evens out the noise of
   the last steps: the held-out scores move less.
3. Detector: ``ldm.toy.concept.is_ring`` on true pictures (rings, and every other kind)
   and on the same pictures through the model's VAE (what a perfect U-Net would give).
4. Concept: ``--n`` prompts for rings of the held-out pairs (half in held-out phrasings),
   rendered by the base model and with the LoRA: the fraction that shows a ring.
5. The base model kept: the held-out prompts of ``scripts/eval_toy.py`` (no trigger word),
   with and without the LoRA: object kind, colour and background accuracy, and rings drawn.
6. A picture strip (``--strip``): ring prompts by the base model and with the LoRA.

Targets: rings in under 10% of the base model's pictures and in at least 80% with the
LoRA; kind, colour and background accuracy on the held-out prompts within 3 points.
Pictures render as ``pipe(prompt)`` does (DPM++ 2M, 25 steps, guidance 7.5), one thread.
Writes ``<out>/eval_lora.md`` and ``.json`` (default ``.cache/eval``) and the strip.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:  # eval_toy sits beside this file (and puts the checkout on the path)
    sys.path.insert(0, str(SCRIPTS))

import eval_toy  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from eval_editing import rate  # noqa: E402
from eval_toy import GUIDANCE, Log, accuracy_table, heldout_prompts, render  # noqa: E402

from ldm.paths import WEIGHTS_DIR  # noqa: E402
from ldm.toy.concept import CONCEPT, ring_prompts, ring_scene, render_any, is_ring, write_picture_set  # noqa: E402
from ldm.toy.roundtrip import to_uint8  # noqa: E402
from ldm.toy.score import score_images  # noqa: E402
from ldm.toy.world import sample_scene  # noqa: E402
from ldm.training.lora import LoRASpec  # noqa: E402
from ldm.training.lora_train import LoRATraining, train_lora  # noqa: E402

OUT = eval_toy.OUT
LORA_OUT = WEIGHTS_DIR / f"ldm-toy-lora-{CONCEPT}.safetensors"
TARGETS = {"before_max": 0.10, "after_min": 0.80, "kept_points": 0.03}
KEPT = ("kind", "color", "background")  # the held-out scores the LoRA must leave as they were
STRIP_COLUMNS = 6
# The demo's training recipe (ldm train-lora flags).
RECIPE = dict(rings=64, ring_repeats=7, others=448, rank=8, steps=1200, batch=16, lr=1e-3, caption_dropout=0.1,
              train_text_encoder=True, te_alpha=2.0, layers="", lr_scheduler="constant", ema_decay=0.99,
              reg_target="base", prior_loss_weight=4.0)
SMOKE = dict(rings=3, others=1, ring_repeats=2, rank=2, steps=2, batch=2, lr=1e-3, n=2, heldout=2, detector=2,
             sampling_steps=2)


# --- training ------------------------------------------------------------------------------------


def training_settings(args: argparse.Namespace, images: Path) -> LoRATraining:
    return LoRATraining(images=images, out=args.lora_out, base=args.model, workdir=args.workdir / "state",
                        network=LoRASpec(rank=args.rank, text_encoder=args.train_text_encoder,
                                         text_alpha=args.te_alpha if args.train_text_encoder else None,
                                         layers=tuple(args.layers.split(",")) if args.layers else ()),
                        steps=args.train_steps, batch_size=args.train_batch,
                        lr=args.lr, lr_scheduler=args.lr_scheduler, caption_dropout=args.caption_dropout,
                        seed=args.seed, ema_decay=args.ema_decay, reg_images=args.workdir / "reg",
                        reg_target=args.reg_target, prior_loss_weight=args.prior_loss_weight,
                        save_every=max(1, args.train_steps // 4),
                        save_dtype="float32" if args.smoke else "float16")


def command_line(settings: LoRATraining) -> str:
    """The `ldm train-lora` command that runs ``settings``."""
    base = f" --base {settings.base}" if settings.base else ""
    base += " --train-text-encoder" if settings.network.text_encoder else ""
    base += f" --te-alpha {settings.network.text_alpha:g}" if settings.network.text_alpha else ""
    base += f" --layers {','.join(settings.network.layers)}" if settings.network.layers else ""
    base += (f" --reg-dir {settings.reg_images} --reg-target {settings.reg_target} --prior-loss-weight "
             f"{settings.prior_loss_weight:g}" if settings.reg_images else "")
    return (f"ldm train-lora {settings.images} --out {settings.out}{base} --rank {settings.network.rank} "
            f"--steps {settings.steps} --batch-size {settings.batch_size} --lr {settings.lr:g} "
            f"--lr-scheduler {settings.lr_scheduler} "
            f"{f'--ema-decay {settings.ema_decay:g} ' if settings.ema_decay else ''}"
            f"--caption-dropout {settings.caption_dropout:g} --seed {settings.seed} "
            f"--save-dtype {settings.save_dtype} --workdir {settings.state_dir}")


def train(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    images = args.workdir / "images"
    write_picture_set(images, args.rings, args.others, seed=args.seed, ring_repeats=args.ring_repeats,
                      reg_folder=args.workdir / "reg")
    settings = training_settings(args, images)
    log(f"training: {command_line(settings)}")
    t0 = time.perf_counter()
    result = train_lora(settings)
    wall = time.perf_counter() - t0
    return {"command": command_line(settings), "rings": args.rings, "ring_repeats": args.ring_repeats,
            "others": args.others,
            "steps": result.steps, "batch_size": settings.batch_size, "rank": settings.network.rank,
            "lr": settings.lr, "train_seconds": round(result.seconds, 1),
            "s_per_step": round(result.seconds / max(1, result.steps), 3), "wall_seconds": round(wall, 1),
            "final_loss": result.losses[-1][1] if result.losses else None}


# --- the LoRA on the pipeline ---------------------------------------------------------------------


@contextlib.contextmanager
def lora_on(pipe, path: Path) -> Iterator[None]:
    """The pipeline with the LoRA at ``path`` loaded (``Pipeline.load_lora``), for the ``with`` block."""
    name = pipe.load_lora(path)
    try:
        yield
    finally:
        pipe.unload_lora(name)


# --- measures -------------------------------------------------------------------------------------


def detector_check(pipe, n: int, seed: int, batch_size: int) -> dict[str, Any]:
    """``is_ring`` on ``n`` true rings and ``n`` world pictures of every kind, drawn and through the VAE."""
    rng = np.random.default_rng(seed)
    scenes = {"rings": [ring_scene(rng) for _ in range(n)], "other kinds": [sample_scene(rng) for _ in range(n)]}
    out: dict[str, Any] = {}
    scale = pipe.config.vae.scaling_factor
    for name, group in scenes.items():
        pictures = np.stack([render_any(s, pipe.config.default_size) for s in group])
        with torch.no_grad():
            pixels = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 127.5 - 1
            decoded = []
            for lo in range(0, n, batch_size):
                latents = pipe.vae.encode(pixels[lo:lo + batch_size].to(pipe.device, pipe.dtype)).mean * scale
                decoded.append(to_uint8(pipe.decode(latents.float(), output="np")))
        out[name] = {"drawn": rate([is_ring(p) for p in pictures]),
                     "vae_round_trip": rate([is_ring(p) for p in np.concatenate(decoded)])}
    return out


def measure(pipe, lora: Path, args: argparse.Namespace, log: Log) -> tuple[dict[str, Any], list, list]:
    """Sections 3-5 of the docstring; also the strip's pictures (before, after) and prompts."""
    kw = dict(steps=args.steps, sampler=args.sampler, guidance=GUIDANCE, batch_size=args.batch_size, log=log)
    concept = ring_prompts(args.n, args.seed)
    texts = [p.prompt for p in concept]
    seeds = [args.seed + i for i in range(len(texts))]
    held = heldout_prompts(args.heldout_n, args.seed)
    held_texts, held_attrs = [p.prompt for _, p in held], [p.attributes for _, p in held]
    held_seeds = [args.seed + i for i in range(len(held))]
    colours = [{"color": p.scene.color, "background": p.scene.background} for p in concept]
    report: dict[str, Any] = {"detector": detector_check(pipe, args.detector_n, args.seed, args.batch_size)}
    pictures = {}
    for when in ("before", "after"):
        with lora_on(pipe, lora) if when == "after" else contextlib.nullcontext():
            rings = render(pipe, texts, seeds, label=f"ring prompts, {when}", **kw)
            others = render(pipe, held_texts, held_seeds, label=f"held-out prompts, {when}", **kw)
        pictures[when] = rings
        report[when] = {
            "concept": rate([is_ring(p) for p in rings]),
            "concept_by_wording": {w: rate([is_ring(p) for p, c in zip(rings, concept) if c.wording == w])
                                   for w in ("train", "heldout")},
            "concept_colours": accuracy_table(score_images(rings, colours, args.classifier)),
            "heldout": accuracy_table(score_images(others, held_attrs, args.classifier)),
            "heldout_rings": rate([is_ring(p) for p in others]),
        }
    report["concept_prompts"] = [{"prompt": p.prompt, "wording": p.wording, "seed": s,
                                  "before": bool(is_ring(b)), "after": bool(is_ring(a))}
                                 for p, s, b, a in zip(concept, seeds, pictures["before"], pictures["after"])]
    return report, [pictures["before"], pictures["after"]], texts


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Each target, met or not, with the numbers it compares."""
    before, after = report["before"], report["after"]
    changes = {a: after["heldout"][a]["accuracy"] - before["heldout"][a]["accuracy"] for a in KEPT
               if a in before["heldout"]}
    return {"before_rate": before["concept"]["rate"], "after_rate": after["concept"]["rate"],
            "heldout_changes": changes,
            "before_ok": before["concept"]["rate"] < TARGETS["before_max"],
            "after_ok": after["concept"]["rate"] >= TARGETS["after_min"],
            "kept_ok": all(abs(d) <= TARGETS["kept_points"] + 1e-9 for d in changes.values())}


def strip(pictures: list, texts: Sequence[str], columns: int, path: Path) -> Path:
    """Two rows: the base model's pictures for the first ``columns`` ring prompts, then the LoRA's."""
    k = min(columns, len(texts))
    images = list(pictures[0][:k]) + list(pictures[1][:k])
    captions = [f"base: {t}" for t in texts[:k]] + [f"LoRA: {t}" for t in texts[:k]]
    return eval_toy.save_grid(eval_toy.caption_grid(images, captions, columns=k), path)


# --- report ---------------------------------------------------------------------------------------


def _pct(entry: dict[str, Any], key: str = "rate") -> str:
    done = entry.get("hits", entry.get("correct"))
    return f"{entry[key]:.2f} ({done}/{entry['count']})"


def markdown(report: dict[str, Any]) -> str:
    v, t, s = report["verdict"], report.get("training"), report["settings"]
    out = [f"## Teaching the toy model a new concept: the {CONCEPT}", ""]
    if t:
        out += [f"Trained: {t['rings']} ring pictures + {t['others']} ordinary ones, rank {t['rank']}, "
                f"{t['steps']} steps of batch {t['batch_size']}, lr {t['lr']:g}: {t['train_seconds']:.0f} s "
                f"({t['s_per_step']:.2f} s/step), final loss {t['final_loss']}.", "", f"`{t['command']}`", ""]
    out += [f"Sampling: {s['sampler']}, {s['steps']} steps, guidance {GUIDANCE:g}; {s['threads']} thread(s); "
            f"{report['seconds']:.0f} s in all.", "",
            "| | base model | with the LoRA | target |", "|---|---|---|---|",
            f"| rings drawn, {s['n']} ring prompts (held-out colour pairs) | {_pct(report['before']['concept'])} | "
            f"{_pct(report['after']['concept'])} | < {TARGETS['before_max']:.2f} before, >= "
            f"{TARGETS['after_min']:.2f} after |"]
    for wording in ("train", "heldout"):
        out.append(f"| ... in {wording} wording | {_pct(report['before']['concept_by_wording'][wording])} | "
                   f"{_pct(report['after']['concept_by_wording'][wording])} | |")
    for name in ("color", "background"):
        out.append(f"| ring prompts: {name} right | {_pct(report['before']['concept_colours'][name], 'accuracy')} | "
                   f"{_pct(report['after']['concept_colours'][name], 'accuracy')} | |")
    for name in (*KEPT, "all"):
        b, a = report["before"]["heldout"].get(name), report["after"]["heldout"].get(name)
        if b and a:
            out.append(f"| held-out prompts ({s['heldout_n']}, no trigger): {eval_toy.LABELS[name]} | "
                       f"{_pct(b, 'accuracy')} | {_pct(a, 'accuracy')} | "
                       f"{'within 3 points' if name in KEPT else ''} |")
    out.append(f"| held-out prompts: rings drawn | {_pct(report['before']['heldout_rings'])} | "
               f"{_pct(report['after']['heldout_rings'])} | |")
    d = report["detector"]
    out += ["", "Detector (`ldm.toy.concept.is_ring`), fraction called a ring:", "",
            "| pictures | drawn | through the VAE |", "|---|---|---|"]
    out += [f"| {name} | {_pct(d[name]['drawn'])} | {_pct(d[name]['vae_round_trip'])} |" for name in d]
    met = {k: "met" if v[k] else "NOT met" for k in ("before_ok", "after_ok", "kept_ok")}
    out += ["", f"Targets: base under {TARGETS['before_max']:.0%} {met['before_ok']}; with the LoRA at least "
            f"{TARGETS['after_min']:.0%} {met['after_ok']}; held-out scores within 3 points {met['kept_ok']} "
            f"(changes: {', '.join(f'{k} {d:+.3f}' for k, d in v['heldout_changes'].items())}).", ""]
    return "\n".join(out)


# --- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = eval_toy.common_arguments(__doc__)
    p.add_argument("--smoke", action="store_true", help="every step at tiny sizes (seconds)")
    p.add_argument("--lora", type=Path, default=None, help="measure this LoRA file; no training")
    p.add_argument("--lora-out", type=Path, default=None,
                   help=f"trained LoRA (default {LORA_OUT}; --smoke: the workdir)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="pictures and training state (default .cache/eval_lora; --smoke: a new temp folder)")
    p.add_argument("--rings", type=int, default=RECIPE["rings"], help="ring pictures (default %(default)s)")
    p.add_argument("--ring-repeats", type=int, default=RECIPE["ring_repeats"],
                   help="times an epoch shows each ring picture (default %(default)s)")
    p.add_argument("--others", type=int, default=RECIPE["others"], help="ordinary pictures (default %(default)s)")
    p.add_argument("--rank", type=int, default=RECIPE["rank"], help="LoRA rank (default %(default)s)")
    p.add_argument("--train-steps", type=int, default=RECIPE["steps"], help="training steps (default %(default)s)")
    p.add_argument("--train-batch", type=int, default=RECIPE["batch"], help="training batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=RECIPE["lr"], help="learning rate (default %(default)s)")
    p.add_argument("--unet-only", dest="train_text_encoder", action="store_false",
                   default=RECIPE["train_text_encoder"], help="no LoRA on the text encoder (default: one)")
    p.add_argument("--te-alpha", type=float, default=RECIPE["te_alpha"],
                   help="alpha of the text encoder's LoRA (default %(default)s: the rank)")
    p.add_argument("--layers", default=RECIPE["layers"], help="layers trained (default %(default)s)")
    p.add_argument("--reg-target", default=RECIPE["reg_target"], choices=("pictures", "base"),
                   help="the ordinary pictures' target (default %(default)s)")
    p.add_argument("--prior-loss-weight", type=float, default=RECIPE["prior_loss_weight"],
                   help="their loss weight (default %(default)s)")
    p.add_argument("--ema-decay", type=float, default=RECIPE["ema_decay"],
                   help="save the weights' moving average (default %(default)s)")
    p.add_argument("--lr-scheduler", default=RECIPE["lr_scheduler"], help="constant or cosine (default %(default)s)")
    p.add_argument("--caption-dropout", type=float, default=RECIPE["caption_dropout"],
                   help="fraction of steps on the empty caption (default %(default)s)")
    p.add_argument("--n", type=int, default=64, help="ring prompts (default %(default)s)")
    p.add_argument("--heldout-n", type=int, default=eval_toy.N, help="held-out prompts (default %(default)s)")
    p.add_argument("--detector-n", type=int, default=64, help="pictures per detector check (default %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for eval_lora.md/.json (default .cache/eval; --smoke: the workdir)")
    p.add_argument("--strip", type=Path, default=None, help="picture strip PNG (default <out>/lora_strip.png)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, {"steps": "train_steps", "batch": "train_batch", "n": "n", "heldout": "heldout_n",
                           "detector": "detector_n", "sampling_steps": "steps"}.get(key, key), value)
        args.workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval_lora_"))
        args.lora_out = args.lora_out or args.workdir / "lora.safetensors"
        args.out = args.out or args.workdir
    args.workdir = args.workdir or eval_toy.ROOT / ".cache" / "eval_lora"
    args.lora_out = args.lora_out or LORA_OUT
    args.out = args.out or OUT
    for name in ("n", "heldout_n", "detector_n", "train_steps", "train_batch", "rank", "steps", "batch_size"):
        if getattr(args, name) < (2 if name == "heldout_n" else 1):
            p.error(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    return args


def evaluate(args: argparse.Namespace, log: Log = eval_toy._print) -> dict[str, Any]:
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        training = None if args.lora else train(args, log)
        lora = args.lora or args.lora_out
        pipe = eval_toy.load_pipeline(args.model, args.device, args.dtype)
        report, pictures, texts = measure(pipe, lora, args, log)
        report.update(lora=str(lora), training=training, verdict=verdict(report),
                      settings={"n": args.n, "heldout_n": args.heldout_n, "steps": args.steps,
                                "sampler": args.sampler, "seed": args.seed, "threads": torch.get_num_threads()})
        strip_path = args.strip or args.out / "lora_strip.png"
        report["strip"] = str(strip(pictures, texts, STRIP_COLUMNS, strip_path))
        report["seconds"] = round(time.perf_counter() - t0, 1)
        eval_toy.write_files(report, markdown(report), args.out / "eval_lora", log)
        return report
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    eval_toy.set_fast_paths(args)
    return eval_toy.run_and_print(lambda: evaluate(args), markdown)


if __name__ == "__main__":
    sys.exit(main())
