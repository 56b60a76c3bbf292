"""The resumable training loop of one stage, with accelerate (one or several processes).

Generic: a stage is a task module whose forward returns the loss, the part of it
that learns, and a dataset made from the global index of its first sample. Data and
noise are drawn by index and step (see :mod:`ldm.training.seeding`), so a run resumed
from its checkpoint is bit for bit the run that was never interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpointing import load_checkpoint, save_checkpoint
from .ema import EMA
from .optim import decay_groups, set_lr
from .seeding import generator_for, rng_state, set_rng_state
from .stage import StageResult, StageSpec, cpu_copy

# (first global sample index, number of samples) -> the dataset a stage reads from there on
DatasetFactory = Callable[[int, int], Dataset]


@dataclass(frozen=True)
class RunSettings:
    """What every stage of one run shares."""

    workdir: Path  # one checkpoint per stage: <workdir>/<stage name>.pt
    seed: int
    save_every: int  # steps between checkpoints
    log_every: int  # steps between log lines
    workers: int = 0  # DataLoader worker processes
    bf16: tuple[str, ...] = ()  # names of the stages trained under bf16 autocast

    def checkpoint_path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.pt"


class Progress:
    """A progress bar on a terminal (the main process's; tqdm leaves it out when stderr is
    not a terminal, as in CI logs) and periodic log lines: running loss, seconds per step
    and the remaining time. Use as a context manager (the bar is closed on exit)."""

    def __init__(self, acc: Accelerator, spec: StageSpec, start: int, every: int) -> None:
        from tqdm.auto import tqdm

        self.acc, self.spec, self.every = acc, spec, every
        self.window: list[Tensor] = []
        self.extra: dict[str, Tensor] = {}
        self.t0, self.last_step = time.perf_counter(), start
        self.bar = tqdm(total=spec.steps, initial=start, desc=spec.name, unit="step", dynamic_ncols=True,
                        disable=None if acc.is_main_process else True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def update(self, step: int, loss: Tensor, stats: dict[str, Tensor]) -> float | None:
        """Record a step (1-based ``step``); every ``every`` steps log and return the mean loss."""
        self.window.append(loss.detach())  # this process's loss (its slice of the batch)
        self.extra = stats
        self.bar.update(1)
        if step % self.every and step != self.spec.steps:
            return None
        now = time.perf_counter()
        sps = (now - self.t0) / max(1, step - self.last_step)
        mean = float(torch.stack(self.window).float().mean())
        extra = " ".join(f"{k} {float(v):.4g}" for k, v in self.extra.items())
        eta = (self.spec.steps - step) * sps
        line = (f"[{self.spec.name}] step {step}/{self.spec.steps} loss {mean:.4f} {extra} "
                f"{sps:.2f} s/step, ETA {eta / 60:.1f} min")
        if self.bar.disable:
            self.acc.print(line, flush=True)
        else:  # above the bar, which stays at the bottom
            self.bar.set_postfix(loss=f"{mean:.4f}", refresh=False)
            self.bar.write(line)
        self.window, self.t0, self.last_step = [], now, step
        return mean


def autocast(acc: Accelerator, bf16: bool) -> torch.autocast:
    """bf16 autocast on the accelerator's device, or a disabled one (float32)."""
    return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=bf16)


def resume_point(acc: Accelerator, path: Path, name: str, fingerprint: dict[str, Any],
                 inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The stage's checkpoint at ``path`` if it can be continued, else None.

    Different settings (model, batch, seed) raise: continuing would silently mix two
    recipes. A changed upstream stage (more text-encoder or VAE steps) restarts the
    stage, since what it learned was conditioned on the old weights.
    """
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return None
    if ckpt["fingerprint"] != fingerprint:
        raise SystemExit(
            f"{path} was trained with other settings:\n  saved {ckpt['fingerprint']}\n"
            f"  now   {fingerprint}\nuse another --workdir, or delete the file to retrain the stage")
    if ckpt["inputs"] != inputs:
        acc.print(f"[{name}] upstream changed ({ckpt['inputs']} -> {inputs}): retraining from step 0")
        return None
    return ckpt


def result_state(spec: StageSpec, ema: EMA, trained: nn.Module) -> dict[str, Tensor]:
    """The weights a stage hands on, on the CPU: EMA or last (both are in its checkpoint)."""
    return cpu_copy(ema.averaged_state(trained) if spec.use_ema else trained.state_dict())


def _restore(acc: Accelerator, spec: StageSpec, ckpt: dict[str, Any] | None, trained: nn.Module,
             optimizer: torch.optim.Optimizer, ema: EMA) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint to continue from, if any: the first step and the record so far."""
    if ckpt is None:
        learning = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        acc.print(f"[{spec.name}] training {learning:,} parameters for {spec.steps} steps "
                  f"of batch {spec.batch_size}")
        return 0, {"seconds": 0.0, "losses": []}
    trained.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    ema.load_state_dict(ckpt["ema"])
    set_rng_state(ckpt["rng"])
    acc.print(f"[{spec.name}] resuming at step {ckpt['step']}/{spec.steps}")
    return ckpt["step"], ckpt["record"]


def train_stage(acc: Accelerator, run: RunSettings, spec: StageSpec, task: nn.Module, trained: nn.Module,
                make_dataset: DatasetFactory, *, stream: int, fingerprint: dict[str, Any],
                inputs: dict[str, Any], after_step: Callable[[], None] | None = None) -> StageResult:
    """Train ``trained`` (a part of ``task``, whose forward returns the loss and a dict of
    numbers to log) for ``spec.steps`` steps, resuming from and checkpointing to
    ``run.checkpoint_path(spec.name)``.

    ``stream`` keeps this stage's random numbers apart from other stages' (see
    :func:`~ldm.training.seeding.derive_seed`). ``fingerprint``: settings a checkpoint
    must share to be continued; ``inputs``: what upstream stages handed on, whose change
    restarts the stage. ``after_step``: called after every optimiser step, before the
    step's checkpoint, to update state kept in ``trained`` that gradients do not train
    (a consistency model's target network: :mod:`ldm.training.lcm_distill`).
    """
    path = run.checkpoint_path(spec.name)
    fingerprint = {**fingerprint, **spec.fingerprint(), "seed": run.seed}
    ckpt = resume_point(acc, path, spec.name, fingerprint, inputs)
    ema = EMA(trained, spec.ema_decay)
    if ckpt is not None and ckpt["step"] >= spec.steps:
        acc.print(f"[{spec.name}] done earlier ({ckpt['step']} steps), skipped")
        ema.load_state_dict(ckpt["ema"])
        trained.load_state_dict(ckpt["model"])
        return StageResult(result_state(spec, ema, trained), ckpt["step"], ckpt["record"])

    optimizer = torch.optim.AdamW(decay_groups(trained, spec.weight_decay), lr=spec.lr, betas=spec.betas)
    start, record = _restore(acc, spec, ckpt, trained, optimizer, ema)
    if spec.batch_size % acc.num_processes:
        raise SystemExit(f"[{spec.name}] batch size {spec.batch_size} is not divisible by "
                         f"{acc.num_processes} processes")

    first = start * spec.batch_size
    dataset = make_dataset(first, spec.steps * spec.batch_size - first)
    loader = DataLoader(dataset, batch_size=spec.batch_size, drop_last=True, num_workers=run.workers)
    task, optimizer, loader = acc.prepare(task, optimizer, loader)
    ema.to(acc.device)

    def save(step: int) -> None:
        if acc.is_main_process:
            save_checkpoint({"stage": spec.name, "step": step, "fingerprint": fingerprint, "inputs": inputs,
                             "model": trained.state_dict(), "optimizer": optimizer.state_dict(),
                             "ema": ema.state_dict(), "rng": rng_state(), "record": record}, path)
        acc.wait_for_everyone()

    task.train()
    with Progress(acc, spec, start, run.log_every) as progress:
        t_start, step = time.perf_counter(), start
        for step, batch in enumerate(loader, start=start + 1):
            set_lr(optimizer, spec.lr_at(step - 1))
            generator = generator_for(run.seed, stream, step, acc.process_index)
            with autocast(acc, spec.name in run.bf16):
                loss, stats = task(batch, generator)
            acc.backward(loss)
            acc.clip_grad_norm_(trained.parameters(), spec.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(trained)
            if after_step is not None:
                after_step()
            mean = progress.update(step, loss, stats)
            if mean is not None:
                record["losses"].append([step, mean])
            if step % run.save_every == 0 or step == spec.steps:
                record["seconds"] += time.perf_counter() - t_start
                t_start = time.perf_counter()
                save(step)
    acc.free_memory()  # drop accelerate's references to this stage's objects
    return StageResult(result_state(spec, ema, trained), step, record)
