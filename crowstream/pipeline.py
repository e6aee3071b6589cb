"""The run. It owns `capture()`: validating the call into a `CaptureConfig`, wiring the
stages together (source -> batching -> tracing -> flatten -> writer), committing shards in
order, resuming, graceful interrupts (SIGINT/SIGTERM) and OOM back-off, and returning a
`Run`. Stages never import this module; data flows one way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import signal
import threading
import time
import uuid

import numpy as np
import pyarrow as pa

from crowstream.schemas import docs_schema, row_schema, vocab_schema

from . import manifest as mf
from .config import (DATA_DIR, DOCS_DIR, SORT_WINDOW_DOCS, TMP_DIR, TOKENIZER_DIR, VOCAB_NAME,
                     WRITER_QUEUE_BATCHES, CaptureConfig, check_choice, check_positive)
from .errors import (ConfigError, CrowstreamError, DataError, Interrupted, ManifestError,
                     OutOfMemory, ResumeMismatchError)

log = logging.getLogger("crowstream")
RANK = 0  # one process writes part-00000-*; distributed ranks would each take their own


@dataclasses.dataclass(frozen=True)
class Run:
    """What `capture` wrote: `modules` maps name -> d, `tokens` name -> rows written."""

    path: str
    run_id: str
    modules: dict[str, int]
    docs: int
    tokens: dict[str, int]
    manifest: dict


def capture(model, data, modules, out, *, tokenizer=None, text_field: str = "text",
            split: str = "train", context_size: int | None = None, overflow: str = "truncate",
            batch_size: int = 32, max_batch_tokens: int | None = None,
            max_docs: int | None = None, max_tokens: int | None = None,
            sample: int | None = None, seed: int = 0, dtype: str = "float32",
            shard_size: int | None = None, exclude_special_tokens: bool = False,
            exclude_token_ids=(), store_text: bool = False, overwrite: bool = False,
            resume: bool = False, device=None, torch_dtype=None, device_map=None,
            trust_remote_code: bool = False, progress: bool = True) -> Run:
    """Run `model` over `data` and store the outputs of `modules` under `out`.

    One forward pass per batch captures every module and stops after the deepest.
    Padding is never stored. See the README's option table for every argument; in short:
    `model` is a hub id, a local directory, or a loaded model (then pass `tokenizer`);
    `data` is a list of strings/dicts, a `datasets` dataset, a local file or directory, or
    a hub dataset id; `modules` are names or globs from `crowstream.modules(model)`.
    `overflow="chunk"` splits long documents into `context_size` windows (positions stay
    absolute); `dtype` is "float32" or "float16"; `shard_size` is documents per commit.
    `resume=True` continues an interrupted run in `out`; `overwrite=True` replaces one.

    Returns a `Run`. Raises a `CrowstreamError` subclass with a one-line explanation on
    bad input; committed data in `out` is never damaged.
    """
    _validate(overflow=overflow, dtype=dtype, batch_size=batch_size,
              max_batch_tokens=max_batch_tokens, max_docs=max_docs, max_tokens=max_tokens,
              sample=sample, shard_size=shard_size, seed=seed, exclude_token_ids=exclude_token_ids)
    out = os.fspath(out)
    mode = mf.inspect_out(out, overwrite=overwrite, resume=resume)

    from . import models, sources
    from .tracing import ModelTracer, resolve_modules

    model, tokenizer = models.load_model(model, tokenizer, device=device, torch_dtype=torch_dtype,
                                         device_map=device_map, trust_remote_code=trust_remote_code)
    names = resolve_modules(model, modules)
    context_size = models.resolve_context_size(context_size, model, tokenizer)
    tracer = ModelTracer(model, tokenizer, names, dtype)
    source = sources.open_source(data, text_field=text_field, split=split, sample=sample,
                                 seed=seed, max_docs=max_docs)
    config = CaptureConfig(
        model=models.model_fingerprint(model), tokenizer=models.tokenizer_fingerprint(tokenizer),
        source=source.fingerprint, modules=tuple(names), context_size=context_size,
        overflow=overflow, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
        max_docs=max_docs, max_tokens=max_tokens, sample=sample, seed=seed, dtype=dtype,
        shard_size=shard_size, exclude_special_tokens=exclude_special_tokens,
        exclude_token_ids=tuple(int(t) for t in exclude_token_ids), store_text=store_text,
        text_field=text_field, split=split)
    session = _Session(out, config, tracer, tokenizer, progress)
    with contextlib.ExitStack() as held:
        if mode != "fresh":  # before resume's clean-up or overwrite's delete touch anything
            held.enter_context(mf.exclusive(out))
        if mode == "resume":
            session.load(mf.read_manifest(out))
        rows = source.rows(session.source_done)
        peek = list(itertools.islice(rows, SORT_WINDOW_DOCS))
        if mode != "resume":
            if not peek:
                raise DataError("the corpus has no documents; check data, split and max_docs.")
            with _write_errors(out):
                mf.create_out(out, mode)
                if mode == "fresh":
                    held.enter_context(mf.exclusive(out))
                session.start(peek, _provenance(model, tokenizer))
        return session.run(itertools.chain(peek, rows), source.n_docs)


def _validate(*, overflow, dtype, batch_size, max_batch_tokens, max_docs, max_tokens, sample,
              shard_size, seed, exclude_token_ids) -> None:
    check_choice("overflow", overflow, ("truncate", "chunk"))
    check_choice("dtype", dtype, ("float32", "float16"))
    check_positive("batch_size", batch_size, allow_none=False)
    for name, value in (("max_batch_tokens", max_batch_tokens), ("max_docs", max_docs),
                        ("max_tokens", max_tokens), ("sample", sample), ("shard_size", shard_size)):
        check_positive(name, value)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}.")
    if isinstance(exclude_token_ids, (str, int)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in exclude_token_ids):
        raise ConfigError(f"exclude_token_ids must be a list of token ids, got {exclude_token_ids!r}.")


def _provenance(model, tokenizer) -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("crowstream", "torch", "transformers", "nnsight", "pyarrow", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[package] = md.version(package)
    from .models import model_fingerprint, tokenizer_fingerprint
    return {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer),
            "versions": versions, "dtype_of_model": str(next(model.parameters()).dtype)}


class _Session:
    """One capture into one OUT: owns the manifest, the writer threads and the commits."""

    def __init__(self, out, config: CaptureConfig, tracer, tokenizer, progress: bool):
        self.out, self.config, self.tracer, self.tokenizer = out, config, tracer, tokenizer
        self.progress = progress
        self.manifest: dict | None = None
        self.source_done = 0
        self.stop_requested = threading.Event()
        self.oom_cap: int | None = None

    # -- set-up -----------------------------------------------------------------------
    def load(self, manifest: dict) -> None:
        differences = self.config.differences(manifest["config"])
        if differences:
            raise ResumeMismatchError(
                f"cannot resume {self.out!r}: this call differs from the run recorded there "
                f"({'; '.join(differences)}). Repeat the original call, or pass "
                "overwrite=True (--overwrite) / choose a new OUT to start afresh.")
        damaged = mf.damaged_parts(self.out, manifest)
        if damaged:
            raise ManifestError(
                f"cannot resume {self.out!r}: {len(damaged)} committed part file(s) are missing or "
                f"changed in size ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}). "
                "`crowstream verify OUT` shows the damage; capture again with overwrite=True "
                "(--overwrite) or into a new OUT.")
        if self.config.source.get("kind") == "iterable":
            log.warning("resuming over a generator: crowstream cannot check that it yields the "
                        "same documents as the interrupted run did")
        removed = mf.clean_for_resume(self.out, manifest)
        if removed:
            log.info("resume: removed %d uncommitted file(s): %s", len(removed), ", ".join(removed))
        self.manifest = manifest
        self.source_done = manifest["shards"][-1]["source_end"] if manifest["shards"] else 0

    def start(self, peek, provenance: dict) -> None:
        from .batching import Tokenizing, estimate_shard_size

        config = self.config
        row_bytes = max(self.tracer.dims.values()) * (4 if config.dtype == "float32" else 2)
        shard_size = config.shard_size or estimate_shard_size(
            [text for _, text in peek], Tokenizing(self.tokenizer, config), row_bytes)
        modules = {name: {"d": self.tracer.dims[name], "dtype": config.dtype,
                          "path": mf.module_dir(name), "type": self.tracer.types[name]}
                   for name in config.modules}
        self.manifest = mf.new_manifest(uuid.uuid4().hex[:16], config.to_json(),
                                        shard_size, provenance, modules)
        _write_vocab(self.out, self.tokenizer)
        _write_tokenizer(self.out, self.tokenizer)
        mf.write_card(self.out, self.manifest)
        mf.write_manifest(self.out, self.manifest)

    # -- the loop ---------------------------------------------------------------------
    def run(self, rows, n_docs: int | None) -> Run:
        from ._threads import prefetch
        from .batching import Batch

        manifest = self.manifest
        if manifest["status"] == "complete":
            return self._result()
        manifest["status"], manifest["error"] = "running", None
        with _write_errors(self.out):
            mf.write_manifest(self.out, manifest)
        writers = _Writers(self.out, self.config, self.tracer.dims, manifest)
        stream = prefetch(self._batches(rows))
        try:
            with _signals(self.stop_requested), self.tracer, _Progress(n_docs, self.source_done, enabled=self.progress) as bar:
                finished = False
                for item in stream:
                    if self.stop_requested.is_set():
                        break
                    if isinstance(item, Batch):
                        for sub, captured in self._forward(item):
                            writers.write(sub, captured)
                        bar.batch(item)
                    else:
                        writers.commit(item)
                        bar.shard(item, writers.bytes_written)
                else:
                    finished = True  # a signal after the last batch interrupts nothing
                stream.close()
                if not finished:
                    writers.abort()
                writers.finish()
                bar.written(writers.bytes_written)
        except BaseException as error:
            stream.close()
            try:
                writers.abort()  # keeps committing complete shards; the open one is dropped
            except OSError as secondary:  # e.g. a failing disk: report the original error
                log.error("while stopping after %s: %s", type(error).__name__, secondary)
            failure = _translate(error, self.out, writers.bytes_written)
            self._record_failure(failure)
            if failure is error:
                raise
            raise failure from error
        if not finished:
            self._record_failure(Interrupted("interrupted"))
            raise Interrupted(f"interrupted: committed {len(manifest['shards'])} shard(s) to "
                              f"{self.out!r}. Rerun the same call with resume=True (--resume) "
                              "to continue.")
        manifest["status"] = "complete"
        mf.write_manifest(self.out, manifest)
        return self._result()

    def _batches(self, rows):
        from .batching import Tokenizing, shard_stream

        shards = self.manifest["shards"]
        stream = shard_stream(rows, Tokenizing(self.tokenizer, self.config),
                            shard_size=self.manifest["shard_size"], first_shard=len(shards),
                            source_start=self.source_done,
                            tokens_before=self.manifest["counts"]["tokens_fed"])
        if self.tracer.device.type != "cuda":
            return stream
        # pinned on the prefetch thread, so the forward loop's copies to the GPU are async
        return (item.pin_memory() if hasattr(item, "pin_memory") else item for item in stream)

    def _forward(self, batch):
        """-> [(batch, captured)]: one entry, or several after backing off on OOM."""
        if self.oom_cap is not None and batch.n_docs > self.oom_cap:
            first, second = batch.split()
            return self._forward(first) + self._forward(second)
        try:
            return [(batch, self.tracer.run(batch))]
        except Exception as error:
            if not _is_oom(error):
                raise
            if batch.n_docs == 1:
                raise OutOfMemory(f"out of memory on a single document of {batch.input_ids.shape[1]} "
                                  "tokens; lower --context-size (or use overflow='chunk' with a "
                                  "smaller one), or use a device with more memory.") from error
            _release_cached_memory()
            self.oom_cap = batch.n_docs // 2
            log.warning("out of memory at a batch of %d documents; retrying with at most %d "
                        "(pass a smaller --batch-size to avoid this)", batch.n_docs, self.oom_cap)
            return self._forward(batch)

    def _record_failure(self, error: BaseException) -> None:
        if self.manifest is None:
            return
        interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
        self.manifest["status"] = "interrupted" if interrupted else "failed"
        self.manifest["error"] = None if interrupted else f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):  # the original error matters more than this one
            mf.write_manifest(self.out, self.manifest)

    def _result(self) -> Run:
        m = self.manifest
        return Run(path=self.out, run_id=m["run_id"],
                   modules={n: v["d"] for n, v in m["modules"].items()},
                   docs=m["counts"]["docs"], tokens=dict(m["counts"]["rows"]), manifest=m)


class _Writers:
    """One background writer per module plus a committer thread that commits shards in
    order. Part files are written in `.tmp/` and only appear in `data/` at commit."""

    def __init__(self, out, config: CaptureConfig, dims: dict, manifest: dict):
        from ._threads import Worker
        from .writer import ModuleStats

        self.out, self.config, self.dims, self.manifest = out, config, dims, manifest
        self.workers = {name: Worker(f"crowstream-writer[{name}]", WRITER_QUEUE_BATCHES)
                        for name in dims}
        self.committer = Worker("crowstream-committer", 2)
        self.parts: dict = {}            # module -> open PartWriter (writer threads only)
        self.shard_stats: dict = {}      # module -> ModuleStats of the open shard
        self.stats = {name: ModuleStats(d, manifest["stats"].get(name)) for name, d in dims.items()}
        self.shard = len(manifest["shards"])  # index of the open shard (main thread only)
        self.bytes_written = 0  # by this run (a resume starts again from zero)

    def write(self, batch, captured) -> None:
        for name, worker in self.workers.items():
            worker.submit(self._write_rows, name, self.shard, batch, captured)
        self.committer.check()

    def _write_rows(self, name, shard, batch, captured) -> None:
        from .flatten import to_record_batch
        from .writer import ModuleStats

        captured.wait()
        vectors = captured.vectors[name].numpy()  # [N, d]
        self._part(name, shard).write(to_record_batch(batch.doc_ids, batch.positions,
                                                      batch.tokens, vectors, self.config.dtype))
        self.shard_stats.setdefault(name, ModuleStats(self.dims[name])).update(vectors)

    def _part(self, name, shard):
        from .writer import PartWriter

        if name not in self.parts:
            tmp = os.path.join(self.out, TMP_DIR, f"{name}.{mf.part_name(RANK, shard)}")
            self.parts[name] = PartWriter(tmp, row_schema(self.dims[name], self.config.dtype))
        return self.parts[name]

    def _close_part(self, name, shard):
        from .writer import ModuleStats

        info = self._part(name, shard).close()
        del self.parts[name]
        return info, self.shard_stats.pop(name, ModuleStats(self.dims[name]))

    def commit(self, end) -> None:
        """Queue shard `end` for commit once every module has closed its part."""
        futures = {name: w.submit(self._close_part, name, self.shard)
                   for name, w in self.workers.items()}
        self.committer.submit(self._commit, end, futures)
        self.shard += 1

    def _commit(self, end, futures) -> None:
        """Commit one shard, in this order: (1) wait until every module's part is closed
        and fsynced in .tmp/, and write the shard's docs part there; (2) rename each into
        data/ or docs/ and fsync those directories; (3) replace the manifest, which now
        lists them. A crash before (3) leaves unlisted files that a resume deletes."""
        from .writer import write_table

        results = {name: future.result() for name, future in futures.items()}
        name = mf.part_name(RANK, end.index)
        docs_tmp = os.path.join(self.out, TMP_DIR, f"docs.{name}")
        docs_info = write_table(docs_tmp, _docs_table(end))
        entries = [(docs_info, f"{DOCS_DIR}/{name}", {"kind": "docs"})]
        entries += [(info, f"{mf.module_dir(m)}/{name}", {"kind": "module", "module": m})
                    for m, (info, _) in results.items()]
        for info, rel, _ in entries:
            os.makedirs(os.path.dirname(os.path.join(self.out, rel)), exist_ok=True)
            os.replace(info.tmp_path, os.path.join(self.out, rel))
        # data/ too: the first commit creates its module=<name> directories
        directories = {os.path.dirname(os.path.join(self.out, rel)) for _, rel, _ in entries}
        for directory in directories | {os.path.join(self.out, DATA_DIR)}:
            mf.fsync_dir(directory)
        self._record(end, entries, results)
        mf.write_manifest(self.out, self.manifest)

    def _record(self, end, entries, results) -> None:
        m = self.manifest
        for info, rel, extra in entries:
            m["parts"].append({"path": rel, **extra, "shard": end.index, "rows": info.rows,
                               "bytes": info.bytes, "sha256": info.sha256})
            self.bytes_written += info.bytes
        tokens = int(end.n_tokens.sum())
        m["shards"].append({"index": end.index, "source_start": end.source_start,
                            "source_end": end.source_end, "docs": len(end.doc_ids),
                            "skipped": end.skipped, "tokens": tokens})
        counts = m["counts"]
        counts["docs"] += len(end.doc_ids)
        counts["skipped_docs"] += end.skipped
        counts["tokens_fed"] += tokens
        for module, (info, stats) in results.items():
            counts["rows"][module] += info.rows
            self.stats[module].add(stats)
            m["stats"][module] = self.stats[module].to_json()

    def finish(self) -> None:
        """Wait for every queued commit; re-raise the first background failure."""
        self._join()
        for worker in (*self.workers.values(), self.committer):
            worker.check()

    def abort(self) -> None:
        """Stop the threads: queued commits of complete shards finish, the open shard's
        part files are deleted. Background failures are left for `finish` to raise."""
        self._join()
        for part in self.parts.values():
            part.abort()
        self.parts.clear()

    def _join(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.committer.close()


def _docs_table(end) -> pa.Table:
    texts = end.texts if end.texts is not None else [None] * len(end.doc_ids)
    offsets = np.concatenate([[0], np.cumsum(end.n_tokens, dtype=np.int32)]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(end.token_ids, pa.int32()))
    return pa.table({"doc_id": pa.array(end.doc_ids, pa.int64()),
                     "n_tokens": pa.array(end.n_tokens, pa.int32()),
                     "text": pa.array(texts, pa.string()),
                     "tokens": tokens.cast(docs_schema().field("tokens").type)},
                    schema=docs_schema())


def _write_vocab(out: str, tokenizer) -> None:
    """vocab.parquet: every token id with its decoded text and whether it is special."""
    from .writer import write_table

    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(size)])
    table = pa.table({"token": pa.array(np.arange(size, dtype=np.int32)),
                      "text": pa.array(texts, pa.string()),
                      "special": pa.array([i in special for i in range(size)])},
                     schema=vocab_schema())
    tmp = os.path.join(out, TMP_DIR, VOCAB_NAME)
    write_table(tmp, table)
    os.replace(tmp, os.path.join(out, VOCAB_NAME))


def _write_tokenizer(out: str, tokenizer) -> None:
    """OUT/tokenizer/: the tokenizer's own files (save_pretrained), so the docs table's
    token ids decode exactly (byte-level BPE, WordPiece) without the model directory."""
    tokenizer.save_pretrained(os.path.join(out, TOKENIZER_DIR))


def _translate(error: BaseException, out: str, bytes_written: int) -> BaseException:
    """A failed write (here or on a writer thread) becomes one OutputError naming OUT."""
    from .writer import describe_os_error

    os_error = _os_error_in(error)
    return error if os_error is None else describe_os_error(os_error, out, bytes_written)


@contextlib.contextmanager
def _write_errors(out: str):
    try:
        yield
    except OSError as error:
        failure = _translate(error, out, 0)
        if failure is error:
            raise
        raise failure from error


def _os_error_in(error: BaseException) -> OSError | None:
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


def _is_oom(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # only after an OOM, never per batch


@contextlib.contextmanager
def _signals(stop: threading.Event):
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


class _Progress:
    """tqdm bar: documents (with ETA when the total is known), tokens, tokens/s, bytes."""

    def __init__(self, total: int | None, initial: int, *, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="doc", disable=not enabled,
                        dynamic_ncols=True, desc="crowstream")
        self.tokens = 0
        self.started = time.perf_counter()

    def batch(self, batch) -> None:
        self.tokens += batch.real_tokens
        self.bar.update(int((batch.piece_starts == 0).sum()))
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tok, {rate:,.0f} tok/s", refresh=False)

    def shard(self, end, bytes_written: int) -> None:
        self.bar.n = end.source_end
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
