"""Run configuration. It owns two things: the format constants (each with its unit and
reason) and `CaptureConfig`, the frozen, validated description of one capture that is
passed down the pipeline, written verbatim to the manifest, and compared on resume.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from typing import Literal

from .errors import ConfigError

FORMAT_VERSION = 2
MANIFEST_NAME = "crowstream.json"
TMP_DIR = ".tmp"
DATA_DIR = "data"
DOCS_DIR = "docs"
COMMITS_DIR = "commits"  # one record (+ partial statistics) per committed shard
VOCAB_NAME = "vocab.parquet"
TOKENIZER_DIR = "tokenizer"

# Row-group size and the Parquet settings live in schemas/rows.json (the format's single
# source of truth): ~16 MiB, because huge row groups made selective reads 8-60x slower.
# Part files roll over at this many raw (uncompressed) bytes, always at a row-group
# boundary: 512 MiB raw is ~200-450 MB on disk after zstd, large enough that listing and
# opening files (tens of ms per request on object storage) stays cheap against reading
# them, small enough that one file is a quick download and a shard may hold several.
PART_TARGET_BYTES = 512 << 20
# Default shard (the commit unit): documents for about this many tokens, sized once at
# the start from the first documents and recorded. Counted in tokens, not bytes, so a
# shard holds many batches whatever d is: 256k tokens are ~30 batches of the default
# token budget, a few seconds of a GPU forward (7B, ~50k tok/s), minutes on a laptop CPU.
SHARD_TARGET_TOKENS = 256 << 10
# Default token budget per batch (padded B*T). GPU matmuls stop gaining by a few thousand
# tokens per batch (a 2-core CPU already peaks at 1-2k); 8k tokens keeps one batch's kept
# rows at 128 MiB per d=4096 float32 module, well inside the default in-flight budget for
# a handful of modules, and GPU activation memory predictable whatever batch_size is.
DEFAULT_MAX_BATCH_TOKENS = 8192
# Default in-flight budget (bytes between the forward and the disk): min(2 GiB, 10% of RAM),
# which a laptop and a GPU node both accept; see `default_inflight_bytes`.
INFLIGHT_CAP_BYTES = 2 << 30
INFLIGHT_RAM_FRACTION = 0.10
# Largest finite float16 value: anything beyond becomes inf when cast.
FLOAT16_MAX = 65504.0
# Documents tokenized and length-sorted together; sorting within ~1k documents made
# 99% of batch tokens real on Python-docs paragraphs (51% unsorted).
SORT_WINDOW_DOCS = 1024
# Upper bound for the default context size (a model's max positions can be 128k).
DEFAULT_CONTEXT_CAP = 1024
Dtype = Literal["float32", "float16"]
Overflow = Literal["truncate", "chunk"]
Float16Overflow = Literal["error", "clamp"]

# Fields that must match between a run and its resume; the rest (batch size, device,
# progress) may change freely because they do not change which rows are written.
RESUME_FIELDS = (
    "model", "tokenizer", "modules", "context_size", "overflow", "dtype",
    "exclude_special_tokens", "exclude_token_ids", "source", "sample", "seed",
    "max_docs", "max_tokens", "text_field", "split", "store_text", "shard_size",
    "float16_overflow",  # except error -> clamp: a run stopped by an overflow may continue
)

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
# A module's input is captured under the name `<module>:input` (API, CLI, manifest) and
# stored in `data/module=<module>@input` (colons break paths on Windows and the Hub).
INPUT_SUFFIX = ":input"
INPUT_DIR_SUFFIX = "@input"


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
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS
    max_docs: int | None = None
    max_tokens: int | None = None
    sample: int | None = None
    seed: int = 0
    dtype: Dtype = "float32"
    float16_overflow: Float16Overflow = "error"
    max_inflight_bytes: int | None = None
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
            if field == "float16_overflow" and ((old, new) == ("error", "clamp") or old is None):
                continue  # a manifest from before the option had the error behaviour
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


def default_inflight_bytes() -> int:
    """min(INFLIGHT_CAP_BYTES, INFLIGHT_RAM_FRACTION of physical RAM)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        ram = 8 << 30
    return int(min(INFLIGHT_CAP_BYTES, INFLIGHT_RAM_FRACTION * ram))


def looks_like_path(name: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (./x, /x, ~/x, a/b/c) is a path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_positive(name: str, value, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def base_module(name: str) -> str:
    """The module a captured name refers to: `<module>:input` -> `<module>`."""
    return name.removesuffix(INPUT_SUFFIX)


def check_module_name(name: str) -> None:
    """Module names become directory names: refuse anything that could escape OUT.
    `<module>:input` names a module's input."""
    base = base_module(name)
    if not _MODULE_NAME.fullmatch(base) or ".." in base:
        raise ConfigError(
            f"module name {name!r} cannot be used as a directory name; "
            "use the dotted names that `crowstream modules MODEL` lists."
        )
