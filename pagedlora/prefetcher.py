"""Prefetcher: brings adapters that queued requests will need closer while steps run."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class Prefetcher:
    """One background thread that runs ``fetch(key)`` for adapter keys asked for, each once
    while it is pending, so reading an adapter from disk (and checking its hash) overlaps the
    forward pass instead of stalling the step that admits its first request (S-LoRA, Sheng et
    al. 2023, section 5.1: "prefetch adapter weights for the next batch"; on a GPU the copy
    into the pool would also ride a side stream).

    The thread starts on the first :meth:`ask` and is a daemon, so an engine that is never
    closed does not keep the process alive. ``fetch`` must be thread-safe and must not evict
    anything pinned; its exceptions are logged and dropped (a request that then needs the
    adapter meets the error itself).

    Args:
        fetch: called with one key at a time, on the background thread.
    """

    def __init__(self, fetch: Callable[[str], None]) -> None:
        self._fetch = fetch
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self.num_fetched = 0  # keys fetched (successfully or not) since start

    def ask(self, keys: Iterable[str]) -> None:
        """Queues the keys not already pending; returns at once."""
        with self._lock:
            new = [k for k in keys if k not in self._pending]
            self._pending.update(new)
            if new and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pagedlora-prefetch",
                                                daemon=True)
                self._thread.start()
        for key in new:
            self._queue.put(key)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Waits until nothing is pending (for tests and shutdown); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self) -> None:
        """Stops the thread after the key it is fetching, if any."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while (key := self._queue.get()) is not None:
            try:
                self._fetch(key)
            except Exception:  # noqa: BLE001 - logged; the request meets the error itself
                log.exception("prefetch of adapter %s failed", key)
            finally:
                with self._lock:
                    self._pending.discard(key)
                    self.num_fetched += 1
                    self._idle.notify_all()
