"""Starting ``ldm`` in a child process that a test interrupts."""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` for children a test sends SIGINT: a shell's background job starts with
    SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
