"""Simulated failures for the tests of the out-of-memory retries."""

from __future__ import annotations

from typing import Any, Callable


def failing_on(call: int, real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """``real``, except that its ``call``-th call (from 1) raises ``exc``; the calls made
    are counted in the wrapper's ``calls`` list."""
    calls: list[int] = []

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            raise exc
        return real(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper
