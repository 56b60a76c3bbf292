"""A call's memory level at run time, and one level leaner when memory runs out.

:func:`ldm.limits.plan_memory` picks the level; :class:`MemoryRunner` sets it on a
pipeline's models (attention chunk, VAE tiles, CPU offload through accelerate's
hooks) and runs each phase (the U-Net's sampling of a sub-batch, one VAE decode or
encode) so that an out-of-memory error redoes that phase at the next level that
changes it, with a warning, instead of losing the batch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .limits import ATTENTION_CHUNK, MemoryLimitError, MemoryPlan, device_levels, keeps_filters
from .models.layers import set_attention_chunk
from .models.vae import DiagonalGaussian
from .models.winograd import KEEP_MIN_STEPS, filter_workspace
from .seamless_vae import seamless_decode, seamless_encode
from .tiled_vae import Tiling, tiled_decode, tiled_encode

logger = logging.getLogger("ldm")

T = TypeVar("T")

# What a failed allocation says on the CPU ("DefaultCPUAllocator: can't allocate memory:
# you tried to allocate ..."), and on backends without torch.OutOfMemoryError (MPS).
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "could not allocate",
              "not enough memory")
# The levels that change each phase's memory: tiling the VAE does nothing for the U-Net.
PHASE_LEVELS = {"U-Net": ("sliced", "offload"), "VAE": ("seamless", "tiled", "sliced", "offload")}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation (torch's OutOfMemoryError on CUDA, a
    RuntimeError saying so elsewhere)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _OOM_WORDS)


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: its offload hook's device, else its parameters'."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


def resident_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of the weights of each of a pipeline's models (``unet``, ``vae``, ``text``)."""
    def size(modules: Sequence[nn.Module]) -> int:
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    return {"unet": size([pipe.unet]), "vae": size([pipe.vae]), "text": size(pipe.text_encoders)}


class MemoryRunner:
    """A pipeline's models set to a :class:`~ldm.limits.MemoryPlan`, and the phases run
    with a retry at the next level after an out-of-memory error."""

    def __init__(self, pipe: Any, plan: MemoryPlan) -> None:
        self.pipe = pipe
        self._hooks: dict[nn.Module, Any] = {}
        self.plan = plan
        self.apply(plan)

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (also while its models wait in CPU memory)."""
        return execution_device(self.pipe.unet)

    def apply(self, plan: MemoryPlan) -> None:
        """Set the attention chunk and the offload hooks of ``plan`` (the VAE's tiles are
        read at each call)."""
        for module in (self.pipe.unet, self.pipe.vae):
            set_attention_chunk(module, plan.attention_chunk)
        if plan.offload and not self._hooks:
            self._offload()
        elif not plan.offload and self._hooks:
            self._restore()
        self.plan = plan

    def _phase_modules(self) -> dict[str, list[nn.Module]]:
        vae = self.pipe.vae
        return {"text": list(self.pipe.text_encoders), "U-Net": [self.pipe.unet], "VAE": [vae.encoder, vae.decoder]}

    def _offload(self) -> None:
        # diffusers' enable_model_cpu_offload: each model moves to the device when its
        # forward runs. The VAE is hooked by its encoder and decoder, whose forward
        # encode() / decode() call (its 1x1 quant convs stay on the device).
        from accelerate import cpu_offload_with_hook

        device = self.device
        for modules in self._phase_modules().values():
            for module in modules:
                _, self._hooks[module] = cpu_offload_with_hook(module, device)
        logger.info("memory: models wait in CPU memory and move to %s when they run", device)

    def _restore(self) -> None:
        from accelerate.hooks import remove_hook_from_module

        device = self.device
        for module in self._hooks:
            remove_hook_from_module(module)
            module.to(device)
        self._hooks = {}

    def _enter(self, phase: str) -> None:
        """Offloaded: the other phases' models back to CPU memory before ``phase`` runs, and
        its own onto the device. Their hooks would move them when their forward runs, but
        the seamless VAE calls their layers one by one, never the forward: without this it
        would compute in CPU memory."""
        if not self._hooks:
            return
        own = self._phase_modules()[phase]
        for module, hook in self._hooks.items():
            if module not in own:
                hook.offload()
        for module in own:
            module.to(self.device)

    def run(self, phase: str, fn: Callable[[], T], generators: Sequence[torch.Generator] = (),
            evaluations: int = 1) -> T:
        """``fn()``; after an out-of-memory error, again at the next level that lowers
        ``phase``'s memory (``generators`` are rewound, so the retry draws the same noise).
        :class:`~ldm.limits.MemoryLimitError` when no leaner level is left. ``evaluations``:
        of the U-Net in ``fn``; from :data:`~ldm.models.winograd.KEEP_MIN_STEPS` on, at a level
        that keeps the U-Net whole (before "sliced"), its Winograd filters are kept between them."""
        if phase not in PHASE_LEVELS:
            raise ValueError(f"phase must be one of {tuple(PHASE_LEVELS)}, got {phase!r}")
        states = [g.get_state() for g in generators]
        while True:
            self._enter(phase)
            try:
                # A phase's convolutions share one buffer for their filters, or keep them.
                with filter_workspace(keep=phase == "U-Net" and evaluations >= KEEP_MIN_STEPS
                                      and keeps_filters(self.plan.level)):
                    return fn()
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not is_out_of_memory(exc):
                    raise
                failed = self.plan.label
                lower = self._lower(phase)
                if lower is None:
                    raise MemoryLimitError(f"{phase} ran out of memory on {self.device} even at memory level "
                                           f"{failed}: {exc}") from exc
                message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            logger.warning("%s ran out of memory at memory level %s (%s); retrying it at %s",
                           phase, failed, message, lower.label)
            self._free_cache()
            self.apply(lower)
            for g, state in zip(generators, states):
                g.set_state(state)

    def _lower(self, phase: str) -> MemoryPlan | None:
        """The next plan that lowers ``phase``'s memory: for the U-Net the next level of
        PHASE_LEVELS (the VAE as lean as it was), for the VAE the next leaner plan that
        changes its mode or level."""
        before = self.plan
        reason = f"{phase} ran out of memory at {before.level!r} (VAE tiling {before.vae_mode!r})"
        if phase == "U-Net":
            later = before.levels[before.levels.index(before.level) + 1:]
            return next((before.at(level, reason) for level in later if level in PHASE_LEVELS[phase]), None)
        plan = before.lower(reason)
        while plan is not None and (plan.vae_mode, plan.vae_store) == (before.vae_mode, before.vae_store) \
                and plan.level not in PHASE_LEVELS[phase]:
            plan = plan.lower(plan.reason)
        return plan

    def _free_cache(self) -> None:
        # What the failed attempt left cached goes back to the device (device-agnostic:
        # torch.cuda / torch.mps / torch.xpu all name it empty_cache).
        backend = getattr(torch, self.device.type, None)
        if self.device.type != "cpu" and hasattr(backend, "empty_cache"):
            backend.empty_cache()

    def vae(self, vae: Any) -> "PlannedVAE":
        """``vae`` (the pipeline's, possibly in another dtype) encoding and decoding at the plan."""
        return PlannedVAE(vae, self)


class PlannedVAE:
    """A VAE whose ``encode`` / ``decode`` run at its runner's current level (tiled or
    whole, retried leaner after an out-of-memory error); everything else is the VAE's."""

    def __init__(self, vae: Any, runner: MemoryRunner) -> None:
        self._vae = vae
        self._runner = runner

    @property
    def device(self) -> torch.device:
        return self._runner.device

    def decode(self, z: Tensor) -> Tensor:
        return self._runner.run("VAE", lambda: self._at_level(self._vae.decode, seamless_decode, tiled_decode, z))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return self._runner.run("VAE", lambda: self._at_level(self._vae.encode, seamless_encode, tiled_encode, x))

    def _at_level(self, whole: Callable, seamless: Callable, tiled: Callable, t: Tensor) -> Any:
        plan = self._runner.plan
        if plan.vae_seamless:
            return seamless(self._vae, t, store=plan.vae_store)
        return whole(t) if plan.vae_tiling is None else tiled(self._vae, t, plan.vae_tiling)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vae, name)


def use_plan(pipe: Any, plan: MemoryPlan) -> MemoryRunner:
    """Set ``plan`` on ``pipe`` (kept for its later decodes) and return its runner."""
    runner = getattr(pipe, "_memory", None)
    if runner is None:
        runner = pipe._memory = MemoryRunner(pipe, plan)
    else:
        runner.apply(plan)
    return runner


def runner_of(pipe: Any) -> MemoryRunner:
    """``pipe``'s runner: the last call's level, or "fast" before any call."""
    runner = getattr(pipe, "_memory", None)
    if runner is None:
        plan = MemoryPlan("fast", Tiling.for_vae(pipe.config.vae), ATTENTION_CHUNK, device_levels(pipe.device),
                          "before any call")
        runner = use_plan(pipe, plan)
    return runner
