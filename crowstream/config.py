"""Run configuration. It owns two things: the format constants (each with its unit and
reason) and `CaptureConfig`, the frozen, validated description of one capture that is
passed down the pipeline, written verbatim to the manifest, and compared on resume.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from .errors import ConfigError

FORMAT_VERSION = 2
MANIFEST_NAME = "crowstream.json"
TMP_DIR = ".tmp"
DATA_DIR = "data"
DOCS_DIR = "docs"
VOCAB_NAME = "vocab.parquet"
TOKENIZER_DIR = "tokenizer"

# Row-group size and the Parquet settings live in schemas/rows.json (the format's single
# source of truth): ~16 MiB, because huge row groups made selective reads 8-60x slower.
# Default shard: documents whose vectors (largest module) come to ~256 MiB raw, so part
# files land at a few hundred MB; a crash loses at most one shard of work.
SHARD_TARGET_BYTES = 256 << 20
# Documents tokenized and length-sorted together; sorting within ~1k documents made
# 99% of batch tokens real on Python-docs paragraphs (51% unsorted).
SORT_WINDOW_DOCS = 1024
# Upper bound for the default context size (a model's max positions can be 128k).
DEFAULT_CONTEXT_CAP = 1024
# Batches queued per writer thread before the forward loop waits (back-pressure).
WRITER_QUEUE_BATCHES = 8

Dtype = Literal["float32", "float16"]
Overflow = Literal["truncate", "chunk"]

# Fields that must match between a run and its resume; the rest (batch size, device,
# progress) may change freely because they do not change which rows are written.
RESUME_FIELDS = (
    "model", "tokenizer", "modules", "context_size", "overflow", "dtype",
    "exclude_special_tokens", "exclude_token_ids", "source", "sample", "seed",
    "max_docs", "max_tokens", "text_field", "split", "store_text", "shard_size",
)

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass(frozen=True)
class CaptureConfig:
    """Everything that decides which rows a capture writes.

    `model`, `tokenizer` and `source` are fingerprints (dicts of strings) rather than
    objects, so the config is JSON-serialisable and comparable on resume.
    """

    model: dict
    tokenizer: dict
    source: dict
    modules: tuple[str, ...]
    context_size: int
    overflow: Overflow = "truncate"
    batch_size: int = 32
    max_batch_tokens: int | None = None
    max_docs: int | None = None
    max_tokens: int | None = None
    sample: int | None = None
    seed: int = 0
    dtype: Dtype = "float32"
    shard_size: int | None = None
    exclude_special_tokens: bool = False
    exclude_token_ids: tuple[int, ...] = ()
    store_text: bool = False
    text_field: str = "text"
    split: str = "train"

    def to_json(self) -> dict:
        """The config as JSON values (tuples as lists), as the manifest stores it."""
        return _jsonable(dataclasses.asdict(self))

    def differences(self, recorded: dict) -> list[str]:
        """Human-readable list of RESUME_FIELDS whose values differ from `recorded`."""
        mine = self.to_json()
        found = []
        for field in RESUME_FIELDS:
            old, new = _jsonable(recorded.get(field)), mine[field]
            if old == new or (field == "seed" and mine["sample"] is None):
                continue  # without sample, the seed changes nothing
            if isinstance(old, dict) and isinstance(new, dict):  # fingerprints: name the keys
                found += [f"{field}.{key}: manifest has {_short(old.get(key))}, this call has "
                          f"{_short(new.get(key))}" for key in sorted(set(old) | set(new))
                          if old.get(key) != new.get(key)]
            else:
                found.append(f"{field}: manifest has {old!r}, this call has {new!r}")
        return found


def _jsonable(value):
    """Tuples become lists, as they do after a JSON round trip."""
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (./x, /x, ~/x, a/b/c) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_positive(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_module_name(name: str) -> None:
    """Module names become directory names: refuse anything that could escape OUT."""
    if not _MODULE_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"module name {name!r} cannot be used as a directory name; "
            "use the dotted names that `crowstream modules MODEL` lists."
        )
