"""Ctrl-C and SIGTERM: stop at the next safe point with one line instead of a traceback.

`InterruptGuard` replaces the SIGINT/SIGTERM handlers for the duration of a run. A signal raises
`Interrupted` (a BaseException, like KeyboardInterrupt, so `except Exception` blocks in library
code do not swallow it) at the point the main thread has reached, except inside `critical()`
(atomic writes): there the signal is held until the block ends, so a started write is always
finished. Runs resume from their last finished stage or in-stage checkpoint either way.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as shells report them


class Interrupted(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives; `where` says what the run was doing."""

    def __init__(self, signum: int, where: str = ""):
        self.signum = signum
        self.where = where
        super().__init__(f"{signal.Signals(signum).name}{' during ' + where if where else ''}")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 128 + int(self.signum))


class InterruptGuard:
    """Context manager: installs the handlers (main thread only) and restores the old ones."""

    def __init__(self, where: Callable[[], str] = lambda: ""):
        self.where = where
        self.depth = 0  # nesting level of critical() blocks
        self.pending: int | None = None
        self.raised = False
        self._old: dict[int, object] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in EXIT_CODES:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if self.raised:  # a second Ctrl-C while the run saves its status: let the save finish
            return
        if self.depth:
            self.pending = signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.raised = True
        raise Interrupted(signum, self.where())

    @contextmanager
    def hold(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None and not self.raised:
            self._raise(self.pending)


@contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends when an InterruptGuard is installed; else nothing.

    The guard is found through the installed handler, so no module state is needed."""
    handler = signal.getsignal(signal.SIGINT)
    guard = getattr(handler, "__self__", None)
    if isinstance(guard, InterruptGuard):
        with guard.hold():
            yield
    else:
        yield
