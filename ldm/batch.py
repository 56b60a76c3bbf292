"""``ldm batch``: render every line of a prompt file, resumably, on one or many processes.

How the work is laid out, so that results never depend on the number of processes
or on interruptions:

1. Each line of the prompt file (:mod:`ldm.batchfile`) gives ``n`` images; image
   ``k`` of line ``L`` is seeded ``seed_L + k`` and written as ``LLLLL-kk-SEED.png``.
2. Images that can share a pipeline call (same size, steps, sampler, schedule,
   guidance and prompt length in 75-token chunks, so the text context has the
   same length as in a single call) are grouped, in line order, and cut into
   chunks of ``--batch-size``. Chunk ``i`` of this list, which depends only on
   the prompt file and the settings, goes to rank ``i % world_size``.
3. A chunk is always rendered whole (one ``Pipeline.generate`` call with one seed
   per image), also when a rerun needs only some of its images, so every image
   comes out of the same computation, bit for bit, in every run.
4. Each image is written atomically, then recorded in the rank's manifest part
   (:mod:`ldm.manifest`); rank 0 merges the parts after a barrier.

Only one run writes to a folder at a time (:mod:`ldm.batchlock`; rank 0 holds the
lock for all ranks of a run), and every line is checked before anything renders:
its values when the file is read, then, once the model is loaded, its input pictures
(:mod:`ldm.batchinputs`: readable, sizes, hashed) and what depends on the model (steps
against its training timesteps, memory for its size).

Lines that edit pictures share a call only with lines whose inputs have the same size
and whose strength and mask settings are the same; each image of the call gets its
line's picture.

A refiner (``--refiner``, SDXL's) serves the whole batch: it is loaded once next to the
model, every image names it (``Refiner: name [hash]`` in its PNG text, so a changed refiner
file is a conflict on resume), and lines share a call only with lines of the same
``refiner_start`` and SDXL size conditioning. A VAE file (``--vae``) serves both likewise
and is named in every image (``VAE: name, VAE hash: hash``).

A line's ControlNets (its ``control`` key, :mod:`ldm.batchcontrol`) are loaded once per file
next to the model and checked against it; their hint pictures are hashed in the manifest with
the editing inputs, and each call makes its hints at its size (:mod:`ldm.batchinputs`). Lines
share a call only with lines of equal ControlNets (same files and settings); a hint drawn from
the image's seed (shuffle) makes each image its own call.

A rerun resumes (:mod:`ldm.batchresume`): finished images are kept, missing ones
rendered; an output folder holding images made with other settings, or from input
files that changed since, is refused unless ``overwrite`` (then those images are redone).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from . import batchlock, manifest
from .atomicio import append_line, remove_temp_files
from .adapters.prompt_loras import file_hash, resolve_tags, split_tags
from .batchfile import Job, LineError, Settings, check_settings, check_steps, distilled_negative_error, read_jobs
from .batchinputs import Inputs, check_inputs, control_arguments, edit_arguments
from .dtypes import dtype_name
from .grid import image_grid
from .limits import check_memory
from .modelref import ModelRef
from .batchplan import Item, expand, plan_chunks, token_chunks
from .batchresume import Reconciled, own_file, reconcile
from .pngmeta import GenerationParams, save_png

logger = logging.getLogger("ldm")

GRID_FILE = "grid.png"


@dataclass(frozen=True)
class BatchOptions:
    prompts: Path
    outdir: Path
    settings: Settings
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 4
    strict: bool = False
    overwrite: bool = False
    grid: bool = False
    grid_rows: int | None = None
    jsonl: bool | None = None
    allow_pickle: bool = False
    lora_dirs: tuple[Path, ...] = ()
    embedding_dirs: tuple[Path, ...] | None = None
    refiner: str | None = None
    vae: str | None = None  # a VAE file for the model (and the refiner) in place of its own
    compile: bool = False  # torch.compile the U-Net(s): Pipeline.compile
    memory: str = "auto"  # the memory level each call starts at (ldm.limits)


@dataclass(frozen=True)
class Models:
    """The loaded model and (``--refiner``) the refiner, each with its name and hash, and
    (``--vae``) the VAE both use in place of their own; the lines' ControlNets by resolved
    path (a ControlNet, or the message of a file that did not load) with their names and hashes."""

    pipe: Any
    ref: ModelRef
    refiner: Any = None
    refiner_ref: ModelRef | None = None
    vae_ref: ModelRef | None = None
    controlnets: dict[str, Any] = field(default_factory=dict)
    control_refs: dict[str, ModelRef] = field(default_factory=dict)


def _distributed_state(device: str | None):
    """accelerate's PartialState: rank, world size and barrier, from the launcher's env."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = (
        parse_flag_from_env("ACCELERATE_USE_CPU")
        or (device is not None and device.startswith("cpu"))
        or not torch.cuda.is_available()
    )
    return PartialState(cpu=cpu)


def _rank_device(device: str | None, state: Any) -> str | None:
    # Under a multi-process launch each rank takes its own accelerator unless an
    # index was given; "cuda" alone would put every rank on GPU 0.
    if state.num_processes > 1 and (device is None or device in ("cuda", "xpu", "npu", "mps")):
        return str(state.device)
    return device


def report_errors(prompts: Path, errors: list[LineError], stream=None) -> None:
    stream = stream or sys.stderr
    for e in errors:
        print(f"{prompts}:{e.line}: error: {e.message}", file=stream)


def _share(state: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank: decisions all ranks of a run must take alike."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _is_main_rank() -> bool:
    # Valid before accelerate's state exists (torchrun and accelerate set RANK).
    return os.environ.get("RANK", "0") == "0"


def strict_refusal(prompts: Path, errors: list[LineError]) -> int:
    print(f"ldm batch: {len(errors)} bad line(s) in {prompts}; --strict: nothing rendered", file=sys.stderr)
    return 2


def loaded_errors(jobs: list[Job], pipe: Any, refiner: Any = None,
                  controlnets: dict[str, Any] | None = None) -> tuple[Inputs, list[LineError]]:
    """Once the model (and the ``refiner`` Pipeline, if any, and the ``controlnets``, see
    :class:`Models`) is loaded: the input pictures, and the lines that cannot render (an
    unreadable input, a ControlNet that did not load or does not fit, or what
    :func:`model_errors` finds), in line order."""
    inputs, errors = check_inputs(jobs, pipe.config.default_size)
    bad = {e.line for e in errors}
    errors += control_errors([j for j in jobs if j.line not in bad], pipe, controlnets or {})
    bad = {e.line for e in errors}
    errors += model_errors([j for j in jobs if j.line not in bad], pipe, inputs, refiner)
    bad = {e.line for e in errors}
    for job in jobs:
        if job.line in bad:
            continue
        try:
            inputs.networks[job.line] = network_fields(pipe, job)
        except (ValueError, OSError) as exc:
            errors.append(LineError(job.line, str(exc), job.text))
    return inputs, sorted(errors, key=lambda e: e.line)


def control_errors(jobs: list[Job], pipe: Any, controlnets: dict[str, Any]) -> list[LineError]:
    """The lines whose ControlNet did not load or does not fit the model (the library's words)."""
    found: dict[str, str | None] = {}
    for path, net in controlnets.items():
        if isinstance(net, str):
            found[path] = net
            continue
        try:
            net.check_fits(pipe.config)
            found[path] = None
        except ValueError as exc:
            found[path] = str(exc)
    errors = []
    for job in jobs:
        message = next((found[c.model.resolved] for c in job.controls if found[c.model.resolved]), None)
        if message:
            errors.append(LineError(job.line, message, job.text))
    return errors


def load_controlnets(jobs: list[Job], pipe: Any, allow_pickle: bool) -> tuple[dict[str, Any], dict[str, ModelRef]]:
    """Every ControlNet the lines use, loaded once on the model's device and dtype, and its name
    and hash; a file that does not load is kept as its message (its lines are refused)."""
    from .control import ControlNet
    from .modelref import controlnet_ref

    nets: dict[str, Any] = {}
    refs: dict[str, ModelRef] = {}
    for path in dict.fromkeys(c.model.resolved for j in jobs for c in j.controls):
        try:
            nets[path] = ControlNet.from_pretrained(path, device=pipe.device, dtype=pipe.dtype,
                                                    allow_pickle=allow_pickle)
            refs[path] = controlnet_ref(path)
        except (ValueError, OSError) as exc:
            nets[path] = f"ControlNet {path}: {exc}"
    return nets, refs


def network_fields(pipe: Any, job: Job) -> dict[str, dict[str, str]]:
    """The ``Lora hashes`` and ``TI hashes`` a line's images record: its ``<lora:...>`` tags'
    files (found now, so a missing one is a bad line, not a stopped batch) and the
    embeddings its texts use, as ``Pipeline.generate`` reports them."""
    (text,), tags = split_tags([job.prompt], [job.negative_prompt])
    files = resolve_tags(tags, pipe.lora_dirs)
    texts = [text, job.negative_prompt] if job.guidance > 1 else [text]
    return {"lora_hashes": {name: file_hash(path) for name, path in files.items()},
            "ti_hashes": pipe.embeddings.ti_hashes(texts)}


def model_errors(jobs: list[Job], pipe: Any, inputs: Inputs | None = None, refiner: Any = None) -> list[LineError]:
    """The lines the loaded model (and ``refiner``) cannot render, found before rendering
    starts (``inputs``: the sizes of the editing lines, see :func:`check_inputs`)."""
    from .limits import available_bytes

    inputs = inputs or Inputs()
    free = available_bytes(pipe.device)  # read once: the same budget for every line
    found: dict[tuple, str | None] = {}
    found_sdxl: dict[tuple, str | None] = {}
    errors = []
    for job in jobs:
        width, height = inputs.size_of(job, pipe.config.default_size)
        key = (job.sampler, job.schedule, job.steps, width, height, job.guidance > 1)
        if key not in found:
            found[key] = _model_error(pipe, key, free)
        edit = job.edit and (job.edit.strength, job.edit.masked)
        sdxl_key = (*key, job.sdxl, job.refiner_start, edit)
        if sdxl_key not in found_sdxl:
            found_sdxl[sdxl_key] = _sdxl_error(pipe, refiner, job, width, height)
        message = found[key] or found_sdxl[sdxl_key] or distilled_negative_error(
            pipe.config.unet.time_cond_proj_dim, job.negative_prompt) or _speedup_error(pipe, job)
        if message:
            errors.append(LineError(job.line, message, job.text))
    return errors


def _speedup_error(pipe: Any, job: Job) -> str | None:
    """A guidance-distilled model runs no classifier-free guidance for guidance_end to stop."""
    try:
        job.speedups.check_call(job.guidance > 1 and pipe.config.unet.time_cond_proj_dim is None, job.steps,
                                job.edit.strength if job.edit is not None else None)
    except ValueError as exc:
        return str(exc)
    return None


def _sdxl_error(pipe: Any, refiner: Any, job: Job, width: int, height: int) -> str | None:
    """SDXL's size conditioning against the model (and the refiner) that reads it, and
    where the refiner takes over: the checks ``Pipeline.generate`` makes, with its words."""
    from .samplers import first_step

    try:
        start = first_step(job.steps, job.edit.strength) if job.edit is not None else 0
        pipe.plan_sdxl(height, width, **job.sdxl.kwargs(), refiner=refiner,
                       refiner_start=job.refiner_start if refiner is not None else None, sampler=job.sampler,
                       steps=job.steps, schedule=job.schedule, start=start,
                       masked=job.edit is not None and job.edit.masked)
    except ValueError as exc:
        return str(exc)
    return None


def _model_error(pipe: Any, key: tuple, free: int | None) -> str | None:
    """Steps against the model's training timesteps, the size against its VAE factor
    and the memory of one image of that size (:func:`ldm.limits.plan_batch`)."""
    from .limits import plan_batch

    sampler, schedule, steps, width, height, guided = key
    factor = pipe.config.vae.downsample_factor
    try:
        check_steps(sampler, schedule, steps, pipe.schedule.num_train_timesteps)
        if width % factor or height % factor:
            raise ValueError(f"size {width}x{height}: this model needs multiples of {factor}")
        plan_batch(pipe.config, 1, height, width, dtype_bytes=pipe.dtype.itemsize, guided=guided,
                   device=pipe.device, available=free)
    except ValueError as exc:
        return str(exc)
    return None


def _take_lock(outdir: Path, state: Any, locks: list[batchlock.FolderLock]) -> bool:
    """Rank 0 locks the folder for all ranks of this run; False (reported) when another run has it."""
    refusal = None
    if state.is_main_process:
        try:
            locks.append(batchlock.acquire(outdir))
        except batchlock.ActiveRunError as exc:
            refusal = str(exc)
    refusal = _share(state, refusal)
    if refusal and state.is_main_process:
        print(f"ldm batch: error: {refusal}", file=sys.stderr)
    return refusal is None


def run_batch(opts: BatchOptions, print_fn: Callable[[str], None] = print) -> int:
    """Render a prompt file into ``opts.outdir``; returns the exit status: 0 done, 1 done
    but bad lines were skipped, 2 nothing rendered (strict, conflict, another run active),
    130 stopped by Ctrl-C (what was finished is kept and recorded)."""
    locks: list[batchlock.FolderLock] = []
    try:
        return _run(opts, print_fn, locks)
    except KeyboardInterrupt:
        return _stopped(opts.outdir, merge=bool(locks))
    finally:
        for lock in locks:
            lock.release()


@contextlib.contextmanager
def _sigint_held(reraise: bool = True):
    """Hold Ctrl-C while a step that must finish runs (an image and its manifest entry,
    the merge after a stop); raised once it is done when ``reraise``. Signals reach
    only the main thread, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and reraise:
        raise KeyboardInterrupt


def _stopped(outdir: Path, merge: bool) -> int:
    with _sigint_held(reraise=False):
        if merge:  # only the run holding the folder writes to it
            manifest.merge(outdir)
            remove_temp_files(outdir)
        entries = manifest.read_entries(outdir) if outdir.is_dir() else []
        kept = sum(own_file(outdir / e["file"]) for e in entries)
    if merge or _is_main_rank():
        print(f"ldm batch: stopped; {kept} image(s) kept in {outdir} (rerun the same command to continue)",
              file=sys.stderr)
    return 130


def _run(opts: BatchOptions, print_fn: Callable[[str], None], locks: list[batchlock.FolderLock]) -> int:
    from .pipeline import resolve_device

    check_settings(opts.settings)
    jobs, errors = read_jobs(opts.prompts, opts.settings, opts.jsonl)
    state = _distributed_state(opts.device)
    check_memory(opts.memory, resolve_device(_rank_device(opts.device, state)))  # before any folder or model
    main = state.is_main_process
    if main:
        report_errors(opts.prompts, errors)
    if errors and opts.strict:
        return strict_refusal(opts.prompts, errors) if main else 2
    if not jobs:
        return _nothing_to_do(opts, errors, main)
    opts.outdir.mkdir(parents=True, exist_ok=True)
    if not _take_lock(opts.outdir, state, locks):
        return 2
    models = _load(opts, state)
    nets, refs = load_controlnets(jobs, models.pipe, opts.allow_pickle)
    models = replace(models, controlnets=nets, control_refs=refs)
    inputs, bad = _share(state, loaded_errors(jobs, models.pipe, models.refiner, nets) if main else None)
    if main:
        report_errors(opts.prompts, bad)
    errors = sorted(errors + bad, key=lambda e: e.line)
    if bad and opts.strict:
        return strict_refusal(opts.prompts, errors) if main else 2
    bad_lines = {e.line for e in bad}
    jobs = [j for j in jobs if j.line not in bad_lines]
    if not jobs:
        return _nothing_to_do(opts, errors, main)
    return _render_into(opts, models, jobs, inputs, errors, state, print_fn)


def _load(opts: BatchOptions, state: Any) -> Models:
    from .checkpoints.vae_file import vae_ref
    from .modelref import model_ref
    from .pipeline import Pipeline, default_weights_path

    def load(path: Path) -> Any:
        pipe = Pipeline.from_pretrained(path, device=_rank_device(opts.device, state), dtype=opts.dtype,
                                        allow_pickle=opts.allow_pickle, lora_dirs=opts.lora_dirs,
                                        embedding_dirs=opts.embedding_dirs, vae=opts.vae)
        return pipe.compile() if opts.compile else pipe

    model_path = Path(opts.model) if opts.model else default_weights_path()
    pipe, ref = load(model_path), model_ref(model_path)
    vae = vae_ref(opts.vae) if opts.vae else None
    if opts.refiner is None:
        return Models(pipe, ref, vae_ref=vae)
    return Models(pipe, ref, load(Path(opts.refiner)), model_ref(opts.refiner), vae)


def _nothing_to_do(opts: BatchOptions, errors: list[LineError], main: bool) -> int:
    if main:
        print(f"ldm batch: no prompts to render in {opts.prompts}", file=sys.stderr)
    return 1 if errors else 0


def _render_into(opts: BatchOptions, models: Models, jobs: list[Job], inputs: Inputs,
                 errors: list[LineError], state: Any, print_fn: Callable[[str], None]) -> int:
    main = state.is_main_process
    pipe = models.pipe
    items = expand(jobs, pipe.config.default_size, models.ref, inputs, models.refiner_ref, models.vae_ref,
                   models.control_refs, guidance_embedded=pipe.config.unet.time_cond_proj_dim is not None,
                   dtype=dtype_name(pipe.dtype))
    chunks = plan_chunks(items, opts.batch_size, token_chunks(pipe.tokenizer, getattr(pipe, "embeddings", None)))
    state.wait_for_everyone()  # nobody writes until everyone has looked
    rec = reconcile(opts.outdir, items)
    if (rec.conflicts or rec.changed_inputs) and not opts.overwrite:
        if main:
            _report_conflicts(opts.outdir, rec.conflicts, rec.changed_inputs)
        return 2
    state.wait_for_everyone()
    if main:
        _prepare_folder(opts.outdir, rec)
    state.wait_for_everyone()

    mine = [c for i, c in enumerate(chunks) if i % state.num_processes == state.process_index]
    rendered = _render(models, mine, rec.done, opts.outdir, inputs, state, opts.memory)
    state.wait_for_everyone()
    if main:
        entries = manifest.merge(opts.outdir)
        remove_temp_files(opts.outdir)
        if opts.grid and entries:
            _write_grid(opts.outdir, entries, opts.grid_rows, items[0].params)
        todo = len(items) - len(rec.done)
        bad = f"; {len(errors)} bad line(s) skipped: {', '.join(str(e.line) for e in errors)}" if errors else ""
        print_fn(f"{len(items)} image(s) of {len(jobs)} line(s) in {opts.outdir}: {todo} rendered, "
                 f"{len(rec.done)} already done{bad}")
    logger.info("rank %d rendered %d image(s)", state.process_index, rendered)
    return 1 if errors else 0


def _listed(lines: list[str]) -> str:
    more = f"\n  ... and {len(lines) - 5} more" if len(lines) > 5 else ""
    return "\n  ".join(lines[:5]) + more


def _report_conflicts(outdir: Path, conflicts: list[str], changed_inputs: list[str]) -> None:
    if conflicts:
        print(f"ldm batch: error: {outdir} holds {len(conflicts)} image(s) made with other "
              f"settings:\n  {_listed(conflicts)}\nuse another output folder, or --overwrite to redo them",
              file=sys.stderr)
    if changed_inputs:
        print(f"ldm batch: error: input file(s) changed since their images in {outdir} were made "
              f"(SHA-256 differs):\n  {_listed(changed_inputs)}\nrestore them, or --overwrite to redo "
              "those lines' images", file=sys.stderr)


def _prepare_folder(outdir: Path, rec: Reconciled) -> None:
    """Rank 0, before rendering: clear what interrupted runs left and write the reconciled manifest."""
    remove_temp_files(outdir)
    for path in rec.stale_files:  # planned names only: see reconcile
        path.unlink(missing_ok=True)
    if rec.unplanned:
        logger.warning("%s: kept %d file(s) of earlier settings that this run does not plan (not deleted): %s",
                       outdir, len(rec.unplanned), ", ".join(rec.unplanned[:5]))
    manifest.write_manifest(outdir, rec.entries)
    if rec.adopted or rec.dropped:
        logger.warning("resumed %s: %d image(s) recorded from their files, %d entr(ies) without a file "
                       "dropped", outdir, rec.adopted, rec.dropped)


def _render(models: Models, chunks: list[list[Item]], done: set[manifest.Key], outdir: Path, inputs: Inputs,
            state: Any, memory: str) -> int:
    from tqdm.auto import tqdm

    todo = [c for c in chunks if any(item.key not in done for item in c)]
    total = sum(1 for c in todo for item in c if item.key not in done)
    desc = f"rank {state.process_index}" if state.num_processes > 1 else "images"
    part = manifest.part_path(outdir, state.process_index)
    written = 0
    with tqdm(total=total, desc=desc, position=state.process_index, unit="img") as bar:
        for chunk in todo:
            first = chunk[0]
            refiner = {} if models.refiner is None else {"refiner": models.refiner,
                                                         "refiner_start": first.job.refiner_start}
            gen = models.pipe.generate(
                [i.job.prompt for i in chunk], [i.job.negative_prompt for i in chunk],
                seed=[i.seed for i in chunk], steps=first.job.steps, guidance_scale=first.job.guidance,
                width=first.width, height=first.height, sampler=first.job.sampler,
                schedule=first.job.schedule, spacing=first.job.spacing, clip_skip=first.job.clip_skip, progress=False,
                **edit_arguments([(i.job.line, i.job.edit) for i in chunk], inputs.files),
                **control_arguments(first.job.controls, models.controlnets, first.width, first.height, first.seed,
                                    inputs.files, first.job.line),
                **first.job.sdxl.kwargs(), **refiner, **first.job.speedups.kwargs(), memory=memory,
            )
            for item, image, vae_tiling in zip(chunk, gen.images, gen.vae_tiling, strict=True):
                if item.key in done:
                    continue
                made = item.made_with(vae_tiling)
                with _sigint_held():  # never an image without its entry
                    save_png(image, outdir / made.file, made.params)
                    append_line(part, manifest.dumps(made.entry()))
                written += 1
                bar.update(1)
    return written


def _write_grid(outdir: Path, entries: list[dict[str, Any]], rows: int | None,
                params: GenerationParams) -> None:
    from PIL import Image

    images = []
    for path in (outdir / e["file"] for e in entries):
        if own_file(path):
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except Exception:  # noqa: BLE001 - an unreadable file is left out, whatever the reason
                logger.warning("%s: not a readable image, left out of the grid", path)
    save_png(image_grid(images, rows), outdir / GRID_FILE, params)


def launch(argv: list[str], num_processes: int) -> int:
    """Run ``ldm <argv>`` on ``num_processes`` processes with PyTorch's launcher
    (torchrun, the one ``accelerate launch`` uses for several GPUs): one process
    per GPU when there are GPUs, else CPU processes talking over gloo."""
    import subprocess

    # "--" stops torchrun's own parser from taking ldm's options ("--n" is ambiguous to it).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={num_processes}", "-m", "--", "ldm", *argv]
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd, env=os.environ.copy())
