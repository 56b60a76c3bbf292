"""Prompt editing and alternation: the text of a prompt at each sampling step.

AUTOMATIC1111's ``get_learned_conditioning_prompt_schedules`` (modules/prompt_parser.py,
without hires fix and with its default, the "new" scheduling) for one prompt:

- ``[from:to:when]`` is ``from`` up to step ``when`` and ``to`` after it;
  ``[to:when]`` adds ``to`` after ``when``; ``[from::when]`` removes ``from`` after it.
  ``when`` written with a decimal point is a fraction of the steps (``0.25`` of 20 is
  step 5; ``1.5`` of 20 is 30, capped at 20), without one it is a step number; both
  are truncated to an integer and capped at ``steps``.
- ``[a|b|c]`` alternates ``a``, ``b``, ``c``, ... step by step.

The schedule is a list of ``(end_at_step, text)``; the sampler's step ``s``
(0-based, counted over the steps a call runs, as the web UI's CFG denoiser counts
them) uses the first entry with ``s <= end_at_step`` (its ``reconstruct_cond_batch``).
So ``"a [b:3]"`` with 10 steps is ``"a "`` for steps 0..3 and ``"a b"`` for 4..9.

:func:`schedule_conditioning` turns the encoded texts of a batch into one
:class:`~ldm.conditioning.ScheduledConditioning`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


from .conditioning import Conditioning, ScheduledConditioning
from .prompt_syntax import Alternate, Nodes, Scheduled, has_editing, parse_editing

Schedule = list[tuple[int, str]]


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return steps


def _when(number: str, steps: int) -> int:
    """The step a ``[..:..:number]`` switches at (the web UI's CollectSteps.scheduled)."""
    value = float(number)
    if "." in number:
        value *= steps
    if not math.isfinite(value):
        raise ValueError(f"prompt editing step {number!r} is not a finite number")
    return min(steps, int(value))


def _walk(nodes: Nodes | None):
    """Every Scheduled / Alternate node, in chosen and unchosen branches alike."""
    for node in nodes or ():
        if isinstance(node, Scheduled):
            yield node
            yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _text(nodes: Nodes | None, step: int, steps: int) -> str:
    out = []
    for node in nodes or ():
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            out.append(_text(node.before if step <= _when(node.when, steps) else node.after, step, steps))
        else:
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int) -> Schedule:
    """``[(end_at_step, text), ...]`` of ``prompt`` over ``steps`` steps.

    >>> prompt_schedule("a [b:3]", 10)
    [(3, 'a '), (10, 'a b')]

    A prompt without editing syntax is ``[(steps, prompt)]``; so is one the grammar
    rejects (e.g. a ``|`` outside ``[...]``), taken as it is, as the web UI does.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    steps = _check_steps(steps)
    nodes = parse_editing(prompt)
    if not has_editing(nodes):
        return [(steps, prompt)]
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, Alternate):
            ends.update(range(1, steps + 1))
        elif (when := _when(node.when, steps)) >= 1:
            ends.add(when)
    return [(end, _text(nodes, end, steps)) for end in sorted(ends)]


def texts_at_steps(prompt: str, steps: int | None) -> Schedule:
    """:func:`prompt_schedule`, or with ``steps=None`` the prompt as one text; a prompt
    with editing syntax then needs ``steps`` (its text depends on them)."""
    if steps is not None:
        return prompt_schedule(prompt, steps)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if has_editing(parse_editing(prompt)):
        raise ValueError(
            f"prompt {prompt[:60]!r} uses prompt editing ([from:to:when]) or alternation ([a|b]), "
            "whose text depends on the step: pass steps"
        )
    return [(1, prompt)]


def schedule_conditioning(
    schedules: Sequence[Schedule], encoded: Sequence[Conditioning]
) -> Conditioning | ScheduledConditioning:
    """The batch's conditioning from each row's schedule and the encoding of its texts.

    ``encoded[b]`` has ``len(schedules[b])`` rows, row ``j`` encoding text ``j`` of
    ``schedules[b]``. Rows whose schedule has one entry are constant; if every row
    is, the result is a plain :class:`~ldm.conditioning.Conditioning`. Otherwise each
    run of steps on which no row changes is one segment, and equal segments share
    their tensor (alternation over 150 steps of ``[a|b]`` holds two).
    """
    if len(schedules) != len(encoded) or not schedules:
        raise ValueError(f"{len(schedules)} schedules for {len(encoded)} encodings: one each, at least one")
    for b, (schedule, enc) in enumerate(zip(schedules, encoded)):
        if enc.batch_size != len(schedule):
            raise ValueError(f"row {b}: {len(schedule)} scheduled texts but {enc.batch_size} encodings")
    if all(len(s) == 1 for s in schedules):
        return Conditioning.cat([enc.select(slice(0, 1)) for enc in encoded])
    ends = sorted({end for schedule in schedules if len(schedule) > 1 for end, _ in schedule})
    shared: dict[tuple[int, ...], Conditioning] = {}
    segments = []
    for end in ends:
        picks = tuple(_entry(schedule, end) for schedule in schedules)
        if picks not in shared:
            shared[picks] = Conditioning.cat([enc.select(slice(j, j + 1)) for enc, j in zip(encoded, picks)])
        segments.append(shared[picks])
    return ScheduledConditioning(tuple(segments), tuple(ends))


def _entry(schedule: Schedule, step: int) -> int:
    """Index of the entry used at ``step``: the first that ends at or after it."""
    return next((j for j, (end, _) in enumerate(schedule) if step <= end), len(schedule) - 1)


__all__ = ["Schedule", "prompt_schedule", "schedule_conditioning", "texts_at_steps"]
