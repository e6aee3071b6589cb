"""Capture options. It owns `CaptureOptions`, the frozen, validated form of a `capture()`
call's keyword options (checked once, then passed to every stage), `CaptureConfig`, the
part of a run that decides which rows are written (recorded in the manifest and compared
field by field on resume), and the pipeline's defaults, each with its unit and reason.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import numbers
import os
from typing import Any, Literal

from crowstream.checks import check_choice, check_positive
from crowstream.errors import ConfigError


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
# A shard's first window is this small, so the first forward waits for 64 documents to be
# tokenized, not 1,024 (the shard-size estimate tokenizes the same 64); every later window
# is tokenized on the reader thread while the forward runs the windows before it.
FIRST_WINDOW_DOCS = 64
# Upper bound for the default context size (a model's max positions can be 128k).
DEFAULT_CONTEXT_CAP = 1024
# Codec of the part files; chosen by benchmarks/compression.py (the table is in
# docs/performance.md and schemas/rows.json).
Compression = Literal["zstd", "lz4", "none"]
DEFAULT_COMPRESSION = "zstd"
Dtype = Literal["float32", "float16"]
Overflow = Literal["truncate", "chunk"]
Float16Overflow = Literal["error", "clamp"]
Packing = Literal["off", "auto"]

# Fields that must match between a run and its resume; the rest (batch size, device,
# progress) may change freely because they do not change which rows are written.
RESUME_FIELDS = (
    "model", "tokenizer", "modules", "context_size", "overflow", "dtype",
    "exclude_special_tokens", "exclude_token_ids", "source", "sample", "seed",
    "max_docs", "max_tokens", "text_field", "split", "store_text", "shard_size",
    "float16_overflow",  # except error -> clamp: a run stopped by an overflow may continue
    "compression",  # the same rows either way, but one run's parts share one codec
    "tokens_field",
)



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
    compression: Compression = DEFAULT_COMPRESSION
    tokens_field: str | None = None
    packing: Packing = "off"

    @classmethod
    def of(cls, options: CaptureOptions, **resolved) -> CaptureConfig:
        """The config of a run of `options`; `resolved` gives what only the run knows (the
        fingerprints, the module names, context size, in-flight budget) and overrides."""
        shared = {f.name for f in dataclasses.fields(cls)} & {
            f.name for f in dataclasses.fields(CaptureOptions)}
        return cls(**{**{name: getattr(options, name) for name in shared}, **resolved})

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
            if field == "compression" and old is None and new == "zstd":
                continue  # absent: zstd, as every output before the option
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
    """min(INFLIGHT_CAP_BYTES, INFLIGHT_RAM_FRACTION of the smaller of physical RAM and
    the cgroup memory limit): a container's limit is the RAM the run really has."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a small machine
        ram = 8 << 30
    limit = cgroup_memory_limit()
    if limit is not None:
        ram = min(ram, limit)
    return int(min(INFLIGHT_CAP_BYTES, INFLIGHT_RAM_FRACTION * ram))


CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max",                    # cgroup v2
                      "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # cgroup v1


def cgroup_memory_limit() -> int | None:
    """This process's cgroup memory limit in bytes, or None when there is none."""
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # "max", or v1's huge "no limit" value
            return int(text)
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."











@dataclasses.dataclass(frozen=True)
class CaptureOptions:
    """Every keyword option of `capture()`, validated (see `crowstream.capture` for what
    each one means). This class is the one place the options are listed: `capture`'s
    signature is built from it, the CLI and the stages read it, `CaptureConfig.of` takes
    the fields that decide the rows from it. Resolved values (the model's context size,
    the default in-flight budget) are not here: the run resolves them once it has the model.
    """

    tokenizer: Any = None
    text_field: str = "text"
    tokens_field: str | None = None
    split: str = "train"
    context_size: int | None = None
    overflow: Overflow = "truncate"
    packing: Packing = "auto"
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
    compression: Compression = DEFAULT_COMPRESSION
    encoder_threads: int | None = None
    overwrite: bool = False
    resume: bool = False
    device: Any = None
    torch_dtype: Any = None
    device_map: Any = None
    revision: str | None = None
    trust_remote_code: bool = False
    progress: bool = True
    rank: int | None = None
    world_size: int | None = None
    data_config: str | None = None
    data_revision: str | None = None
    data_files: Any = None
    storage_options: dict | None = None
    takeover: bool = False
    lease_s: float = 60.0
    spool_dir: str | None = None

    @classmethod
    def of(cls, options: dict) -> CaptureOptions:
        """Validate `capture()`'s keyword options into one object. Unknown names are one
        `ConfigError` with the closest known name; numpy integers become ints (they reach
        the manifest's JSON)."""
        known = [field.name for field in dataclasses.fields(cls)]
        for name in options:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"capture() got an unknown option {name!r}.{hint}")
        made = cls(**{name: _plain(value) for name, value in options.items()})
        made._check()
        return made

    def _check(self) -> None:
        check_choice("overflow", self.overflow, ("truncate", "chunk"))
        check_choice("packing", self.packing, ("off", "auto"))
        check_choice("dtype", self.dtype, ("float32", "float16"))
        check_choice("float16_overflow", self.float16_overflow, ("error", "clamp"))
        check_choice("compression", self.compression, ("zstd", "lz4", "none"))
        check_positive("batch_size", self.batch_size, allow_none=False)
        for name in ("max_batch_tokens", "max_docs", "max_tokens", "sample", "shard_size",
                     "context_size", "max_inflight_bytes", "encoder_threads"):
            check_positive(name, getattr(self, name))
        if isinstance(self.lease_s, bool) or not isinstance(self.lease_s, (int, float)) \
                or not self.lease_s > 0:
            raise ConfigError(f"lease_s must be a positive number of seconds, got {self.lease_s!r}.")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"text_field must be a column name, got {self.text_field!r}.")
        if self.tokens_field is not None and (not isinstance(self.tokens_field, str)
                                              or not self.tokens_field):
            raise ConfigError(f"tokens_field must be a column name or None, got "
                              f"{self.tokens_field!r}.")
        if self.tokens_field is not None and self.store_text:
            raise ConfigError(f"store_text=True keeps each document's text, but with "
                              f"tokens_field={self.tokens_field!r} the corpus has token ids, no "
                              "text; drop store_text (--store-text), or drop tokens_field to "
                              "capture from text.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}.")
        ids = self.exclude_token_ids
        if isinstance(ids, (str, int)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ConfigError(f"exclude_token_ids must be a list of token ids, got {ids!r}.")
        object.__setattr__(self, "exclude_token_ids", tuple(ids))


def _plain(value):
    """numpy integers (and lists of them) as Python ints: json.dumps refuses numpy types."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, numbers.Integral) for v in value):
        return [int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
                for v in value]
    return value


def keyword_signature(function, essentials: tuple[str, ...]) -> inspect.Signature:
    """`function(<essentials>, *, <every CaptureOptions field with its default>)`: the
    signature `help(crowstream.capture)` and IDEs show, built from the one listing."""
    positional = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in essentials]
    keywords = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                  annotation=f.type)
                for f in dataclasses.fields(CaptureOptions)]
    return inspect.Signature(positional + keywords,
                             return_annotation=inspect.signature(function).return_annotation)
