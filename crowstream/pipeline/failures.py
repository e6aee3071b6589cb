"""Failures of a run. It owns turning a failed write (here or on a writer thread) into one
`OutputError` that names OUT, and recognising and recovering from out-of-memory errors.
"""

from __future__ import annotations

import contextlib

from crowstream.errors import CrowstreamError

from .parts import describe_os_error


def translate(error: BaseException, out: str, bytes_written: int) -> BaseException:
    """A failed write (here or on a writer thread) becomes one OutputError naming OUT."""
    os_error = os_error_in(error)
    return error if os_error is None else describe_os_error(os_error, out, bytes_written)


@contextlib.contextmanager
def write_errors(out: str):
    try:
        yield
    except OSError as error:
        failure = translate(error, out, 0)
        if failure is error:
            raise
        raise failure from error


def os_error_in(error: BaseException) -> OSError | None:
    """The OSError behind a failed write (raised here or on a writer thread), if any."""
    import errno

    write_errors = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EFBIG}
    while error is not None:
        if isinstance(error, CrowstreamError):
            return None
        if isinstance(error, OSError) and error.errno in write_errors:
            return error
        error = error.__cause__
    return None


def is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_cached_memory() -> None:
    """Free what a failed forward left: its reference cycles, then the CUDA cache. Only
    after an OOM, never per batch (a full collection costs ~180 ms)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
