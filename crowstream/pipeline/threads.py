"""Background threads. It owns the patterns the pipeline uses: `Worker`, one thread
running submitted calls in order; `ByteBudget`, the one count of bytes in flight between
the forward and the disk that makes the forward wait (back-pressure keeps memory flat);
and `prefetch`, which runs a generator one step ahead on its own thread. A failure on a
background thread is re-raised in the caller with its original cause.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import queue
import threading
from concurrent.futures import Future

_STOP = object()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; all of them where the platform
    has none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_SETTING_TORCH_THREADS = threading.Lock()


def torch_on_one_thread() -> None:
    """Run this background thread's torch operations (statistics, casts, range checks) on
    it alone. Each thread that calls torch otherwise forks its own OpenMP team as wide as
    the forward's: a GPU node's 8 encoder threads would run 8 teams of every core. The
    encoders already work in parallel with each other. (On a 2-core CPU it is a wash:
    the forward's own team then spins more between its calls, see docs/performance.md.)
    Only under OpenMP, where the count is per thread (torch's native backend has one
    count for the process).

    `torch.set_num_threads` also sets the count that threads take at their first torch
    call, so a thread of its own puts that default back at once: the forward's thread,
    and any thread of the caller's, keep what they had. A thread that first calls torch
    in between would take 1, so a `BackgroundThread`'s `start` returns only once its
    thread has done this, before the thread is handed any work."""
    if not _openmp_backend():
        return
    import torch

    with _SETTING_TORCH_THREADS:
        default = torch.get_num_threads()  # this thread's first call: the process default
        torch.set_num_threads(1)
        restore = threading.Thread(target=torch.set_num_threads, args=(default,),
                                   name="crowstream-threads")
        restore.start()
        restore.join()


class BackgroundThread(threading.Thread):
    """A daemon thread of crowstream's: it runs torch on one thread (`torch_on_one_thread`)
    before `target`, and `start` returns once that is done."""

    def __init__(self, target, name: str):
        super().__init__(target=target, name=name, daemon=True)
        self._set_up = threading.Event()

    def start(self) -> None:
        super().start()
        self._set_up.wait()

    def run(self) -> None:
        try:
            torch_on_one_thread()
        finally:
            self._set_up.set()
        super().run()


@functools.cache
def _openmp_backend() -> bool:
    import torch

    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


class ForwardGate:
    """Holds background work back while a forward runs on the CPU. There the forward's
    OpenMP threads take every core, and a writer thread that preempts one of them stalls
    the whole parallel region until it is scheduled again: on 2 cores a GPT-2-small
    capture took 5-13% less wall time (medians of two runs of benchmarks/forward_gate.py,
    6 alternating rounds each) with its writers waiting for the forward than with them
    running beside it. So `Worker`s
    and the `EncoderPool` call `wait_idle()` before each call; a call already running
    finishes. Tokenizing is not held back (the next batch must be ready)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._running = 0

    @contextlib.contextmanager
    def forward(self):
        with self._changed:
            self._running += 1
        try:
            yield
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def wait_idle(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._running == 0)


def _wait(gate: ForwardGate | None) -> None:
    if gate is not None:
        gate.wait_idle()


class Worker:
    """One daemon thread executing `submit`ted calls in order; `submit` blocks when
    `depth` calls are already waiting (0: never; a `ByteBudget` bounds memory instead).
    The first failure is re-raised by the next `submit`/`check` (and by the failing
    call's Future): a crowstream error as it is, anything else wrapped with its cause."""

    def __init__(self, name: str, depth: int = 0, gate: ForwardGate | None = None):
        self._gate = gate
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = BackgroundThread(self._loop, name)
        self._thread.start()

    def submit(self, fn, *args) -> Future:
        self.check()
        future: Future = Future()
        self._queue.put((future, fn, args))
        return future

    def check(self) -> None:
        from crowstream.errors import CrowstreamError

        if isinstance(self._error, CrowstreamError):
            raise self._error  # already one clear message for the user
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
                _wait(self._gate)
                future.set_result(fn(*args))
            except BaseException as error:  # crosses to the caller via check()/the Future
                self._error = error
                future.set_exception(error)
            # drop the call's arguments now, not when the next call arrives: they may hold
            # a batch's rows, which the byte budget already counts as written
            del item, future, fn, args


class ByteBudget:
    """Bytes between the forward and the disk, bounded by `limit`.

    The forward `acquire`s a batch's bytes before it runs and waits while they would not
    fit. A writer `settle`s its share once the rows are written: the share leaves flight,
    and whatever the writer keeps in its row-group buffer stays counted as resident until
    a later `settle` hands it back. A batch larger than the whole budget is still admitted,
    alone: `acquire` never waits while nothing is in flight (resident buffers are flushed
    only by later batches, so waiting on them would wait forever). `peak` is the most
    ever counted.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.peak = 0
        self._in_flight = 0
        self._resident = 0
        self._changed = threading.Condition()

    @property
    def used(self) -> int:
        return self._in_flight + self._resident

    def acquire(self, n: int, check=None) -> None:
        """Count `n` more bytes, first waiting for room; `check()` runs while waiting, so
        a failed writer (which will never settle) raises instead of hanging."""
        with self._changed:
            while self._in_flight and self.used + n > self.limit:
                if check is not None:
                    check()
                self._changed.wait(0.1)
            self._in_flight += n
            self.peak = max(self.peak, self.used)

    def settle(self, written: int, resident_change: int = 0) -> None:
        """`written` bytes leave flight; the resident count changes by `resident_change`."""
        with self._changed:
            self._in_flight -= written
            self._resident += resident_change
            self.peak = max(self.peak, self.used)
            self._changed.notify_all()


def prefetch(iterable, depth: int = 2, name: str = "crowstream-prefetch", cost=None):
    """Iterate `iterable` on a background thread while the items waiting total under
    `depth` (each item costs `cost(item)`, default 1; one item is always let through).
    Closing the returned generator stops and joins the thread; a failure there is
    re-raised here."""
    cost = cost or (lambda item: 1)
    budget = depth
    waiting: collections.deque = collections.deque()
    state = {"cost": 0, "closed": False}
    changed = threading.Condition()

    def produce():
        try:
            for item in iterable:
                price = cost(item)
                with changed:
                    while waiting and state["cost"] >= budget and not state["closed"]:
                        changed.wait()
                    if state["closed"]:
                        return
                    waiting.append(("item", item, price))
                    state["cost"] += price
                    changed.notify_all()
            end = ("done", None, 0)
        except BaseException as error:  # crosses to the consumer
            end = ("error", error, 0)
        with changed:
            waiting.append(end)
            changed.notify_all()

    # A generator: the thread starts at the first item asked for, so a stream closed
    # before it was ever read leaves no thread behind.
    thread = BackgroundThread(produce, name)
    thread.start()
    yield from _consume(waiting, state, changed, thread)


def _consume(waiting, state, changed, thread):
    try:
        while True:
            with changed:
                while not waiting:
                    changed.wait()
                kind, value, price = waiting.popleft()
                state["cost"] -= price
                changed.notify_all()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        with changed:
            state["closed"] = True
            changed.notify_all()
        thread.join()


class EncoderPool:
    """A fixed set of threads shared by every module's part files. Work comes in `Lane`s:
    calls submitted to one lane run in submission order, one at a time (a Parquet file's
    row groups must be written in order), while different lanes run in parallel on up to
    `threads` threads. So the files of a shard encode side by side, and what each file
    holds depends only on the order of its own lane, never on the number of threads.

    The first failure of any call is kept; every later call is skipped (its Future
    cancelled) and `check` re-raises it, as `Worker` does.
    """

    def __init__(self, threads: int, name: str = "crowstream-encoder",
                 gate: ForwardGate | None = None):
        self._gate = gate
        self._ready: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self._threads = [BackgroundThread(self._loop, f"{name}-{i}")
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def lane(self) -> Lane:
        return Lane(self)

    def check(self) -> None:
        from crowstream.errors import CrowstreamError

        if isinstance(self.error, CrowstreamError):
            raise self.error
        if self.error is not None:
            raise RuntimeError(f"an encoder thread failed: {self.error}") from self.error

    def close(self) -> None:
        """Finish every queued call, then join the threads; idempotent."""
        if any(thread.is_alive() for thread in self._threads):
            for _ in self._threads:
                self._ready.put(_STOP)
            for thread in self._threads:
                thread.join()

    def _schedule(self, lane: Lane) -> None:
        self._ready.put(lane)

    def _loop(self) -> None:
        while (lane := self._ready.get()) is not _STOP:
            future, fn, args = lane.pop()
            if self.error is not None:
                future.cancel()
            else:
                try:
                    _wait(self._gate)
                    future.set_result(fn(*args))
                except BaseException as error:  # crosses to the caller via check()/the Future
                    with self._lock:
                        self.error = self.error or error
                    future.set_exception(error)
            del future, fn, args  # drop the call's rows now (the budget counts them as written)
            lane.done()


class Lane:
    """Calls that run in order on an `EncoderPool` (see there)."""

    def __init__(self, pool: EncoderPool):
        self._pool = pool
        self._calls: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        with self._lock:
            self._calls.append((future, fn, args))
            start = not self._scheduled
            self._scheduled = True
        if start:
            self._pool._schedule(self)
        return future

    def pop(self):
        with self._lock:
            return self._calls.popleft()

    def done(self) -> None:
        """One call finished: hand the lane back to the pool if more are waiting."""
        with self._lock:
            again = bool(self._calls)
            self._scheduled = again
        if again:
            self._pool._schedule(self)
