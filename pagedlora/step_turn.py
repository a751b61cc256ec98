"""StepTurn: one thread at a time steps the engine; the others wait for outputs or their turn."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class StepTurn:
    """The right to step an engine (or to read or change what a step changes), held by one
    thread at a time.

    ``generate``/``stream`` calls in several threads share one running batch: a call whose
    inbox is empty either takes the turn and steps (its step fills every call's inbox) or, while
    another thread steps, waits until its inbox has something or that step ends
    (:meth:`take_or_wait`). Re-entrant for the holder (an output callback may read stats).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holder: int | None = None  # the stepping thread's ident

    @property
    def mine(self) -> bool:
        """Whether the calling thread holds the turn."""
        return self._holder == threading.get_ident()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Holds the turn for the block (at once if this thread holds it already)."""
        if self.mine:
            yield
            return
        self.take()
        try:
            yield
        finally:
            self.release()

    def take(self) -> bool:
        """Waits until nobody holds the turn, then takes it (:meth:`release` later); True."""
        with self._cond:
            self._cond.wait_for(lambda: self._holder is None)
            self._holder = threading.get_ident()
        return True

    def try_take(self) -> bool:
        """Takes the turn if nobody holds it, without waiting (True: :meth:`release` later)."""
        with self._cond:
            if self._holder is not None:
                return False
            self._holder = threading.get_ident()
            return True

    def take_or_wait(self, ready: Callable[[], bool]) -> bool:
        """Takes the turn if nobody holds it (True: the caller steps, then :meth:`release`);
        otherwise waits until ``ready()`` or the holder releases (False)."""
        with self._cond:
            if self._holder is None:
                self._holder = threading.get_ident()
                return True
            self._cond.wait_for(lambda: ready() or self._holder is None)
            return False

    def release(self) -> None:
        """Ends the turn and wakes every waiting thread."""
        with self._cond:
            self._holder = None
            self._cond.notify_all()
