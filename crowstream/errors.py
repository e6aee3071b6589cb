"""Errors crowstream raises. It owns one root, `CrowstreamError`, and one subclass per
kind of problem; each subclass also inherits the matching builtin so callers can catch
either. Every message says what went wrong, the offending value, and what to do.
"""

from __future__ import annotations


class CrowstreamError(Exception):
    """Root of every error crowstream raises on purpose. The CLI catches only this."""


class ConfigError(CrowstreamError, ValueError):
    """An argument has an invalid value (dtype, batch size, context size, ...)."""


class ModuleNotFoundInModel(CrowstreamError, LookupError):
    """A requested module name or glob matches nothing in the model."""


class ModuleOutputError(CrowstreamError, TypeError):
    """A module's output is not a `[batch, seq, d]` tensor."""


class DataError(CrowstreamError, ValueError):
    """The corpus is empty, malformed, or lacks the text field."""


class ModelLoadError(CrowstreamError, OSError):
    """The model or tokenizer could not be loaded."""


class OutputExistsError(CrowstreamError, FileExistsError):
    """OUT is not empty and neither overwrite nor resume was asked for."""


class OutputError(CrowstreamError, OSError):
    """OUT cannot be used: it is a file, not writable, or the disk is full."""


class ResumeMismatchError(CrowstreamError, ValueError):
    """resume=True but the new call's configuration differs from the manifest's."""


class ManifestError(CrowstreamError, ValueError):
    """crowstream.json is missing, unreadable, or does not match the schema."""


class VerifyError(CrowstreamError):
    """`verify` found damage; `.problems` lists every finding."""

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class Interrupted(CrowstreamError):
    """The run stopped on SIGINT/SIGTERM after committing every complete shard."""


class OutOfMemory(CrowstreamError, MemoryError):
    """A single document does not fit in memory even at batch size 1."""


class Float16OverflowError(CrowstreamError, OverflowError):
    """A module's output exceeds float16's range and `float16_overflow="error"`."""


class IncompleteRunError(CrowstreamError, ValueError):
    """`finalize` found shards of a multi-rank run not committed yet; `.missing` lists them
    (None when no rank has reached the end of the corpus, so the count is unknown)."""

    def __init__(self, message: str, missing: list[int] | None = None):
        super().__init__(message)
        self.missing = missing
