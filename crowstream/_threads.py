"""Background threads. It owns the two patterns the pipeline uses: `Worker`, one thread
running submitted calls in order behind a bounded queue (back-pressure keeps memory
flat), and `prefetch`, which runs a generator one step ahead on its own thread. A failure
on a background thread is re-raised in the caller with its original cause.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

_STOP = object()


class Worker:
    """One daemon thread executing `submit`ted calls in order; `submit` blocks when
    `depth` calls are already waiting. The first failure is re-raised by the next
    `submit`/`check` (and by the failing call's Future)."""

    def __init__(self, name: str, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        self.check()
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"{self._thread.name} failed: {self._error}") from self._error

    def close(self) -> None:
        """Finish queued work (nothing runs after a failure) and join the thread; idempotent."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            future, fn, args = item
            if self._error is not None:
                future.cancel()
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # crosses to the caller via check()/the Future
                self._error = error
                future.set_exception(error)


def prefetch(iterable, depth: int = 2, name: str = "crowstream-prefetch"):
    """Iterate `iterable` on a background thread, `depth` items ahead. Closing the
    returned generator stops the thread at its next item."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    closed = threading.Event()

    def produce():
        try:
            for item in iterable:
                while not closed.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if closed.is_set():
                    return
            items.put(("done", None))
        except BaseException as error:
            items.put(("error", error))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        closed.set()
        while thread.is_alive():
            try:
                items.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)
