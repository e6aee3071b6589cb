"""What the user sees of a running capture. It owns the progress bar (documents, tokens,
tokens/s, bytes written) and the SIGINT/SIGTERM handling (commit what is complete, stop).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

log = logging.getLogger("crowstream")


@contextlib.contextmanager
def signals(stop: threading.Event):
    """SIGINT/SIGTERM set `stop` (the loop commits what is complete and exits); a second
    signal raises KeyboardInterrupt at once. Only the main thread can install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        log.warning("%s received: committing the shards already complete, then stopping "
                    "(a second Ctrl-C stops inside the batch in progress)",
                    signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Progress:
    """tqdm bar: documents (with ETA when the total is known), tokens, tokens/s, bytes."""

    def __init__(self, total: int | None, initial: int, *, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="doc", disable=not enabled,
                        dynamic_ncols=True, desc="crowstream")
        self.covered = initial  # source rows of the shards committed, this rank's own
        self.tokens = 0
        self.started = time.perf_counter()

    def batch(self, batch) -> None:
        self.tokens += batch.real_tokens
        self.bar.update(int((batch.piece_starts == 0).sum()))
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)

    def shard(self, end, bytes_written: int) -> None:
        self.covered += end.source_end - end.source_start
        self.bar.n = self.covered
        self.written(bytes_written)

    def written(self, bytes_written: int) -> None:
        """Bytes committed so far (commits run on a background thread, so this lags)."""
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s, "
                                 f"{bytes_written / 2**20:,.1f} MiB", refresh=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
