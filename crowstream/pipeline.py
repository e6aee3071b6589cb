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

import numpy as np
import pyarrow as pa

from crowstream.schemas import docs_schema, part_schema, vocab_schema

from . import manifest as mf
from . import storage
from .config import (DEFAULT_MAX_BATCH_TOKENS, DOCS_DIR, FORMAT_VERSION,
                     SORT_WINDOW_DOCS, TMP_DIR, TOKENIZER_DIR, VOCAB_NAME, CaptureConfig,
                     check_choice, check_positive, default_inflight_bytes)
from .errors import (ConfigError, CrowstreamError, DataError, IncompleteRunError, Interrupted,
                     ManifestError, OutOfMemory, OutputError, ResumeMismatchError)

log = logging.getLogger("crowstream")


@dataclasses.dataclass(frozen=True)
class Run:
    """What `capture` wrote: `modules` maps name -> d, `tokens` name -> rows written,
    `manifest` is the consolidated `crowstream.manifest.Manifest`."""

    path: str
    run_id: str
    modules: dict[str, int]
    docs: int
    tokens: dict[str, int]
    manifest: mf.Manifest


def capture(model, data, modules, out, *, tokenizer=None, text_field: str = "text",
            split: str = "train", context_size: int | None = None, overflow: str = "truncate",
            batch_size: int = 32, max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
            max_docs: int | None = None, max_tokens: int | None = None,
            sample: int | None = None, seed: int = 0, dtype: str = "float32",
            float16_overflow: str = "error", max_inflight_bytes: int | None = None,
            shard_size: int | None = None, exclude_special_tokens: bool = False,
            exclude_token_ids=(), store_text: bool = False, overwrite: bool = False,
            resume: bool = False, device=None, torch_dtype=None, device_map=None,
            revision: str | None = None, trust_remote_code: bool = False,
            progress: bool = True, rank: int | None = None, world_size: int | None = None,
            data_config: str | None = None, data_revision: str | None = None,
            data_files=None, storage_options: dict | None = None) -> Run:
    """Run `model` over `data` and store the outputs of `modules` under `out`.

    One forward pass per batch captures every module and stops after the deepest.
    Padding is never stored. See the README's option table for every argument; in short:
    `model` is a hub id, a local directory, or a loaded model (then pass `tokenizer`);
    `data` is a list of strings/dicts, a `datasets` dataset, a local file or directory, or
    a hub dataset id; `modules` are names or globs from `crowstream.modules(model)`.
    `overflow="chunk"` splits long documents into `context_size` windows (positions stay
    absolute); `dtype` is "float32" or "float16" (values beyond float16's range fail the
    run unless `float16_overflow="clamp"`); `shard_size` is documents per commit (default:
    about SHARD_TARGET_TOKENS tokens); `max_batch_tokens` caps padded tokens per batch and
    `batch_size` documents; `max_inflight_bytes` bounds the bytes between the forward and
    the disk (default min(2 GiB, 10% of RAM)); `revision` picks a hub model's revision.
    `resume=True` continues an interrupted run in `out`; `overwrite=True` replaces one.
    `data_config`, `data_revision` and `data_files` pick a config (e.g.
    "wikitext-2-raw-v1"), revision and files of a dataset repository (hub id or local
    directory), as `datasets.load_dataset` takes them; hub corpora are streamed.
    `rank`/`world_size` (default: the environment's RANK/WORLD_SIZE, as torchrun sets
    them) make this process one of several writing one run: it captures shards k with
    k mod world_size == rank; ranks started with the same call join one run, and the
    last to finish (or `crowstream.finalize`) consolidates it. See "Scaling out".

    Returns a `Run`. Raises a `CrowstreamError` subclass with a one-line explanation on
    bad input; committed data in `out` is never damaged.

    Everything checkable without the model fails first, in this order: the options, OUT's
    state, OUT's lock (then OUT's state and, to resume, its manifest, under the lock), the
    data source and its first documents; only then is the model loaded.
    """
    from . import ranks

    _validate(overflow=overflow, dtype=dtype, batch_size=batch_size,
              max_batch_tokens=max_batch_tokens, max_docs=max_docs, max_tokens=max_tokens,
              sample=sample, shard_size=shard_size, seed=seed, exclude_token_ids=exclude_token_ids,
              context_size=context_size, text_field=text_field,
              float16_overflow=float16_overflow, max_inflight_bytes=max_inflight_bytes)
    options = {k: v for k, v in locals().items()
               if k not in ("model", "data", "modules", "out", "ranks")}
    created = ranks.init_process_group()
    grouped = ranks.in_process_group()
    try:
        if storage.is_url(_path_to_str(out)):
            return _capture_to_url(model, data, modules, out, grouped=grouped, **options)
        return _capture(model, data, modules, out, grouped=grouped, **options)
    except BaseException as error:
        if grouped and not getattr(error, "crowstream_flagged", False):
            ranks.all_ok(False, quiet=True)  # the other ranks stop instead of waiting for us
        raise
    finally:
        if created:
            ranks.destroy_process_group()


def _capture(model, data, modules, out, *, grouped: bool, tokenizer, text_field, split,
             context_size, overflow, batch_size, max_batch_tokens, max_docs, max_tokens, sample,
             seed, dtype, float16_overflow, max_inflight_bytes, shard_size,
             exclude_special_tokens, exclude_token_ids, store_text, overwrite, resume, device,
             torch_dtype, device_map, revision, trust_remote_code, progress, rank,
             world_size, data_config, data_revision, data_files, storage_options=None,
             mirror=None) -> Run:
    """`capture` once its options are valid (and, under torchrun, the process group is up)."""
    from . import ranks

    rank, world = ranks.resolve(rank, world_size)
    ranks.check_options(world, max_tokens=max_tokens, overwrite=overwrite, device_map=device_map)
    if grouped and device is None:
        device = ranks.local_device()
    out, model, data = _local_out(os.fspath(out)), _path_to_str(model), _path_to_str(data)
    _check_out_placement(out, model, data)
    mf.inspect_out(out, overwrite=overwrite, resume=resume or world > 1)

    from . import models, sources
    from .tracing import ModelTracer, resolve_modules

    with contextlib.ExitStack() as held:
        if world > 1:  # the run is created or joined under the directory lock, below
            lock = held.enter_context(_rank_locked(out, rank))
            mode, recorded = "join", None
        else:
            mode = held.enter_context(_locked_out(out, overwrite=overwrite, resume=resume))
            recorded = mf.read_manifest(out) if mode == "resume" else None
        source = sources.open_source(
            data, text_field=text_field, split=split, sample=sample, seed=seed,
            max_docs=max_docs, repository=sources.Repository(data_config, data_revision,
                                                             data_files))
        peek = []
        if mode != "resume":  # the first documents size the shards of a new run
            peek = list(itertools.islice(source.rows(0), SORT_WINDOW_DOCS))
            if not peek:
                raise DataError("the corpus has no documents; check data, split and max_docs.")
        model, tokenizer = models.load_model(model, tokenizer, device=device,
                                             torch_dtype=torch_dtype, device_map=device_map,
                                             revision=revision,
                                             trust_remote_code=trust_remote_code)
        names = resolve_modules(model, modules)
        context_size = models.resolve_context_size(context_size, model, tokenizer)
        max_inflight_bytes = max_inflight_bytes or default_inflight_bytes()
        tracer = ModelTracer(model, tokenizer, names, dtype, float16_overflow, max_inflight_bytes)
        config = CaptureConfig(
            model=models.model_fingerprint(model, revision),
            tokenizer=models.tokenizer_fingerprint(tokenizer),
            source=source.fingerprint, modules=tuple(names), context_size=context_size,
            overflow=overflow, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            max_docs=max_docs, max_tokens=max_tokens, sample=sample, seed=seed, dtype=dtype,
            float16_overflow=float16_overflow, max_inflight_bytes=max_inflight_bytes,
            shard_size=shard_size, exclude_special_tokens=exclude_special_tokens,
            exclude_token_ids=tuple(int(t) for t in exclude_token_ids), store_text=store_text,
            text_field=text_field, split=split)
        session = _Session(out, config, tracer, tokenizer, progress and rank == 0, rank, world)
        session.mirror = mirror
        if world > 1:
            with mf.exclusive(out, wait=ranks.JOIN_WAIT_S):
                if os.path.isfile(mf.manifest_path(out)):
                    session.load(mf.read_manifest(out))
                else:
                    with _write_errors(out):
                        mf.create_out(out, mf.inspect_out(out, overwrite=False, resume=True))
                        session.start(peek, _provenance(model, tokenizer))
        elif mode == "resume":
            session.load(recorded)
        else:
            with _write_errors(out):
                mf.create_out(out, mode)
                session.start(peek, _provenance(model, tokenizer))
        if not grouped:
            run = session.run(source)
            return session.end_rank(lock) if world > 1 else run
        return _run_grouped(session, source, lock if world > 1 else None)


def _capture_to_url(model, data, modules, url, *, grouped, storage_options, **options) -> Run:
    """`capture` into object storage: the local pipeline writes a temporary spool that a
    `storage.Mirror` publishes shard by shard (see crowstream/storage.py)."""
    from . import ranks

    if grouped or ranks.resolve(options["rank"], options["world_size"])[1] > 1:
        raise OutputError(f"OUT {storage.public(url)!r} is a URL: several ranks cannot write to "
                          "object storage yet. Capture with one process, or into a shared file "
                          "system path.")
    with storage.Mirror(url, storage_options) as mirror:
        options["resume"] = mirror.prepare(overwrite=options["overwrite"],
                                           resume=options["resume"])
        options["overwrite"] = False
        try:
            run = _capture(model, data, modules, mirror.spool, grouped=False, mirror=mirror,
                           **options)
        except CrowstreamError as error:  # name the URL, not the temporary spool
            error.args = tuple(arg.replace(mirror.spool, mirror.url) if isinstance(arg, str)
                               else arg for arg in error.args)
            raise
    return dataclasses.replace(run, path=mirror.url)


def _run_grouped(session, source, lock) -> Run:
    """Under torch.distributed: run this rank's share, then meet every rank at the end
    barrier, an all-reduce of a failure flag (a failing rank reaches it from its error
    path); rank 0 finalizes once all succeeded. Errors raised here are already flagged."""
    from . import ranks

    try:
        session.run(source)
    except BaseException as error:
        if lock is not None:
            lock.release()
        ranks.all_ok(False, quiet=True)
        error.crowstream_flagged = True
        raise
    if lock is not None:
        lock.release()
    if not ranks.all_ok(True):
        failure = CrowstreamError(
            f"another rank failed; this rank's shards are committed in {session.out!r}. Fix the "
            "failure, then rerun the same command (committed shards are skipped).")
        failure.crowstream_flagged = True
        raise failure
    try:
        if session.rank == 0 and session.world > 1:
            session.manifest = ranks.finalize(session.out)
    finally:
        ranks.barrier()  # the others return once rank 0 has finalized (or failed to)
    if session.rank != 0:
        session.manifest = mf.read_manifest(session.out)
    return session._result()


@contextlib.contextmanager
def _rank_locked(out: str, rank: int):
    """Hold this rank's own lock (OUT/.locks/rank-<rank>.lock) for its whole run."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") \
            from error
    lock = mf.RankLock(out, rank)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def _locked_out(out: str, *, overwrite: bool, resume: bool):
    """Hold OUT's lock for the whole run; -> the mode, decided again under the lock (so two
    runs started together cannot both find OUT empty). A missing OUT is created to be
    locked, and removed again if the run fails before writing anything into it."""
    created = not os.path.isdir(out)
    if created:
        try:
            os.makedirs(out)
        except OSError as error:
            raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") \
                from error
    try:
        with mf.exclusive(out):
            mode = mf.inspect_out(out, overwrite=overwrite, resume=resume)
            busy = mf.busy_ranks(out)
            if busy:
                raise OutputError(f"rank(s) {', '.join(map(str, busy))} of a multi-rank run are "
                                  f"writing to {out!r}; let them finish (or stop them) first.")
            yield mode
    except BaseException:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def _local_out(out: str) -> str:
    """OUT as a local path: `file://` URLs become paths; other URLs (s3://, gs://, ...) are
    refused rather than taken as a local directory named `s3:`."""
    import re
    import urllib.parse

    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", out):
        return out
    if out.startswith("file://"):
        return urllib.parse.unquote(urllib.parse.urlparse(out).path)
    raise OutputError(f"OUT {out.split('?')[0]!r} is a URL: writing to object storage is not "
                      "supported yet. Capture into a local (or shared file system) path and "
                      "upload the finished folder; it holds no absolute paths.")


def _path_to_str(value):
    """`pathlib.Path` (any os.PathLike) -> str; anything else as it is."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _check_out_placement(out: str, model, data) -> None:
    """OUT must not be the data file, nor sit inside the model's directory (a later
    overwrite would delete files the model needs to load)."""
    target = os.path.realpath(out)
    if isinstance(data, str) and os.path.exists(data) and os.path.realpath(data) == target:
        raise ConfigError(f"OUT {out!r} is the data file itself; choose another OUT.")
    if isinstance(model, str) and os.path.isdir(model):
        model_dir = os.path.realpath(model)
        if target == model_dir or target.startswith(model_dir + os.sep):
            raise ConfigError(f"OUT {out!r} is inside the model directory {model!r}; choose an "
                              "OUT outside it.")


def _validate(*, overflow, dtype, batch_size, max_batch_tokens, max_docs, max_tokens, sample,
              shard_size, seed, exclude_token_ids, context_size, text_field, float16_overflow,
              max_inflight_bytes) -> None:
    check_choice("overflow", overflow, ("truncate", "chunk"))
    check_choice("dtype", dtype, ("float32", "float16"))
    check_choice("float16_overflow", float16_overflow, ("error", "clamp"))
    check_positive("batch_size", batch_size, allow_none=False)
    for name, value in (("max_batch_tokens", max_batch_tokens), ("max_docs", max_docs),
                        ("max_tokens", max_tokens), ("sample", sample), ("shard_size", shard_size),
                        ("context_size", context_size), ("max_inflight_bytes", max_inflight_bytes)):
        check_positive(name, value)
    if not isinstance(text_field, str) or not text_field:
        raise ConfigError(f"text_field must be a column name, got {text_field!r}.")
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

    mirror = None  # a `storage.Mirror` when OUT is a URL

    def __init__(self, out, config: CaptureConfig, tracer, tokenizer, progress: bool,
                 rank: int = 0, world: int = 1):
        self.out, self.config, self.tracer, self.tokenizer = out, config, tracer, tokenizer
        self.progress, self.rank, self.world = progress, rank, world
        self.manifest: mf.Manifest | None = None
        self.stop_requested = threading.Event()
        self.oom_cap: int | None = None

    # -- set-up -----------------------------------------------------------------------
    def load(self, manifest: mf.Manifest) -> None:
        """Resume: check the call against the recorded run, then `manifest.recover` OUT
        (committed shards rolled forward, everything else deleted)."""
        if manifest.format_version == 1:
            raise ManifestError(
                f"cannot resume {self.out!r}: it was written by crowstream 0.1 (format 1), which "
                "this version reads but does not continue. Capture into a new OUT (or pass "
                "overwrite=True / --overwrite to replace it).")
        differences = self.config.differences(manifest.config)
        if differences and self.world > 1:
            raise ResumeMismatchError(
                f"rank {self.rank} cannot join the run in {self.out!r}: this call differs from "
                f"the run recorded there ({'; '.join(differences)}). Start every rank with the "
                "same call, or choose a new OUT.")
        if differences:
            raise ResumeMismatchError(
                f"cannot resume {self.out!r}: this call differs from the run recorded there "
                f"({'; '.join(differences)}). Repeat the original call, or pass "
                "overwrite=True (--overwrite) / choose a new OUT to start afresh.")
        if self.config.source.get("kind") == "iterable":
            log.warning("resuming over a generator: crowstream cannot check that it yields the "
                        "same documents as the interrupted run did")
        from .ranks import owner

        owned = owner(self.rank, self.world) if self.world > 1 else None
        if self.mirror is not None:  # the bucket was recovered (`Mirror.prepare`)
            manifest, rolled, removed = mf.consolidated(self.out, manifest, stats=False), [], []
        else:
            manifest, rolled, removed = mf.recover(self.out, manifest, owned)
        if rolled:
            log.info("resume: moved %d committed part file(s) into place: %s", len(rolled),
                     ", ".join(rolled))
        if removed:
            log.info("resume: removed %d uncommitted file(s): %s", len(removed), ", ".join(removed))
        manifest.config["float16_overflow"] = self.config.float16_overflow  # may turn on
        self.manifest = manifest
        if self.world > 1 and manifest.status not in ("running", "complete"):
            self._write_running()  # under the directory lock: the ranks' shared manifest

    def start(self, peek, provenance: dict) -> None:
        from .batching import Tokenizing, estimate_shard_size

        config = self.config
        shard_size = config.shard_size or estimate_shard_size(
            [text for _, text in peek], Tokenizing(self.tokenizer, config))
        modules = {name: mf.ModuleInfo(self.tracer.dims[name], config.dtype, mf.module_dir(name),
                                       self.tracer.types[name])
                   for name in config.modules}
        from .ranks import run_id

        self.manifest = mf.Manifest(run_id=run_id(config.to_json()), status="running",
                                    config=config.to_json(), shard_size=shard_size,
                                    provenance=provenance, modules=modules,
                                    counts=mf.Counts.of([], modules))
        _write_vocab(self.out, self.tokenizer)
        _write_tokenizer(self.out, self.tokenizer)
        mf.write_card(self.out, self.manifest)
        mf.write_manifest(self.out, self.manifest)
        if self.mirror is not None:
            self.mirror.publish(everything=True)

    # -- the loop ---------------------------------------------------------------------
    def _write_running(self) -> None:
        """crowstream.json while running lists nothing: the records in commits/ are the truth."""
        with _write_errors(self.out):
            mf.write_manifest(self.out, dataclasses.replace(
                self.manifest, status="running", error=None, shards=[], stats={},
                counts=mf.Counts.of([], self.manifest.modules)))
            if self.mirror is not None:
                self.mirror.publish()

    def run(self, source) -> Run:
        """Capture this process's share of `source` (every shard not yet committed, or under
        several ranks those of them it owns), committing shard by shard."""
        from ._threads import prefetch
        from .batching import Batch

        if self.manifest.status == "complete":
            return self._result()
        committed = self.manifest
        if self.world == 1:
            self._write_running()
        writers = _Writers(self.out, self.config, self.tracer.dims, committed, self.rank,
                           self.world)
        writers.mirror = self.mirror
        stream = prefetch(self._batches(source))
        total = source.n_docs if source.n_docs is None or self.world == 1 else \
            -(-source.n_docs // self.world)  # about this rank's share
        initial = committed.source_done if self.world == 1 else sum(
            s.source_end - s.source_start for s in committed.shards if s.index % self.world == self.rank)
        try:
            with _signals(self.stop_requested), self.tracer, _Progress(total, initial, enabled=self.progress) as bar:
                finished = False
                for item in stream:
                    # after a signal no new batch is taken, but a shard whose batches are
                    # all written still arrives as its ShardEnd: commit it
                    if self.stop_requested.is_set() and isinstance(item, Batch):
                        break
                    if isinstance(item, Batch):
                        writers.admit(item)  # waits while the in-flight budget is full
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
            self._record_failure(failure, writers)
            if failure is error:
                raise
            raise failure from error
        if not finished:
            self._record_failure(Interrupted("interrupted"), writers)
            raise Interrupted(f"interrupted: committed {len(writers.shards)} shard(s) to "
                              f"{self.out!r}. Rerun the same call with resume=True (--resume) "
                              "to continue.")
        if self.world > 1:
            shards = sorted(writers.shards, key=lambda s: s.index)
            self.manifest = dataclasses.replace(self.manifest, shards=shards,
                                                counts=mf.Counts.of(shards, self.manifest.modules))
            return self._result()
        self._consolidate(writers, "complete")
        return self._result()

    def end_rank(self, lock) -> Run:
        """A rank without torch.distributed has finished its share: under the directory
        lock, finalize the run if every other rank has finished too, then release this
        rank's lock (both under the one lock, so exactly the last rank to finish sees
        the others done)."""
        from .ranks import JOIN_WAIT_S, finalize_locked

        with mf.exclusive(self.out, wait=JOIN_WAIT_S):
            try:
                self.manifest = finalize_locked(self.out, besides=self.rank)
                log.info("rank %d: every shard is committed; wrote the consolidated manifest",
                         self.rank)
            except (IncompleteRunError, OutputError) as waiting:
                log.info("rank %d finished its share (%s); the last rank to finish, or "
                         "`crowstream finalize OUT`, consolidates the run", self.rank, waiting)
            lock.release()
        return self._result()

    def _batches(self, source):
        from .batching import Tokenizing, shard_stream
        from .ranks import owner

        manifest = self.manifest
        done = {s.index for s in manifest.shards}
        owns = owner(self.rank, self.world)
        if self.config.max_tokens is not None and done != set(range(len(done))):
            raise ManifestError(f"cannot resume {self.out!r} with max_tokens: its committed shards "
                                "are not a prefix of the corpus.")
        end = mf.read_end(self.out, manifest.run_id)
        first = next(k for k in itertools.count(self.rank, self.world) if k not in done)
        stop = None
        if end is not None:
            stop = max((k for k in range(first, end) if owns(k) and k not in done),
                       default=first - 1) + 1

        def record_end(shards: int, rows: int) -> None:
            with _write_errors(self.out):
                mf.write_end(self.out, manifest.run_id, shards, rows)

        shards = source.shards(manifest.shard_size, lambda k: owns(k) and k not in done,
                               first=first, stop=stop, on_end=record_end)
        stream = shard_stream(shards, Tokenizing(self.tokenizer, self.config),
                              shard_size=manifest.shard_size,
                              tokens_before=manifest.counts.tokens_fed)
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
        # Out of the except block: its traceback no longer holds the failed forward's
        # frames, so collecting now really frees that batch's tensors before the retry.
        _release_cached_memory()
        self.oom_cap = batch.n_docs // 2
        log.warning("out of memory at a batch of %d documents; retrying with at most %d "
                    "(pass a smaller --batch-size or --max-batch-tokens to avoid this)",
                    batch.n_docs, self.oom_cap)
        return self._forward(batch)

    def _record_failure(self, error: BaseException, writers) -> None:
        if self.world > 1:  # crowstream.json is the ranks' shared file: the records tell
            return
        interrupted = isinstance(error, (Interrupted, KeyboardInterrupt))
        with contextlib.suppress(OSError):  # the original error matters more than this one
            self._consolidate(writers, "interrupted" if interrupted else "failed",
                              None if interrupted else f"{type(error).__name__}: {error}")

    def _consolidate(self, writers, status: str, error: str | None = None) -> None:
        """Write crowstream.json with every committed shard, their counts and merged stats."""
        shards = sorted(writers.shards, key=lambda s: s.index)
        stats = writers.stats
        if shards != writers.shards:  # filled gaps other ranks left: merge in index order
            stats = mf.merged_stats(self.out, shards, self.manifest.modules)
        self.manifest = dataclasses.replace(
            self.manifest, status=status, error=error, shards=shards,
            counts=mf.Counts.of(shards, self.manifest.modules),
            stats={name: s.summary() for name, s in stats.items()})
        mf.write_manifest(self.out, self.manifest)
        if self.mirror is not None:
            self.mirror.publish()

    def _result(self) -> Run:
        m = self.manifest
        return Run(path=self.out, run_id=m.run_id, modules={n: v.d for n, v in m.modules.items()},
                   docs=m.counts.docs, tokens=dict(m.counts.rows), manifest=m)


class _Writers:
    """One background writer per module plus a committer thread that commits shards in
    order. Part files are written in `.tmp/` and only appear in `data/` at commit. One
    `ByteBudget` bounds every byte between the forward and the disk: a batch's kept rows
    on the host, the writers' queues and their row-group buffers."""

    mirror = None  # a `storage.Mirror` when OUT is a URL

    def __init__(self, out, config: CaptureConfig, dims: dict, committed: mf.Manifest,
                 rank: int = 0, world: int = 1):
        from ._threads import ByteBudget, Worker
        from .models import model_id
        from .writer import ENCODER_BYTES, encoder_slots, row_bytes

        self.out, self.config, self.dims, self.run_id = out, config, dims, committed.run_id
        self.rank, self.world = rank, world
        self.workers = {name: Worker(f"crowstream-writer[{name}]") for name in dims}
        self.committer = Worker("crowstream-committer", 2)
        limit = config.max_inflight_bytes  # resolved by capture()
        slots = encoder_slots(limit)  # concurrent encodes come out of the same budget
        self.encoders = threading.BoundedSemaphore(slots)
        self.budget = ByteBudget(max(1, limit - slots * ENCODER_BYTES))
        self.schemas = {name: part_schema(name, d, config.dtype, model_id(config.model),
                                          FORMAT_VERSION) for name, d in dims.items()}
        self.row_cost = {name: row_bytes(s) for name, s in self.schemas.items()}  # as stored
        self.parts: dict = {}            # module -> ShardParts of the open shard (writer threads)
        self.shard_stats: dict = {}      # module -> ModuleStats of the open shard
        # committed so far (committer thread only): records, and their statistics merged
        # in shard order, so a resumed run's totals equal an uninterrupted run's exactly
        self.shards = list(committed.shards)
        self.stats = mf.merged_stats(out, self.shards, committed.modules)
        self.bytes_written = 0  # by this run (a resume starts again from zero)

    def admit(self, batch) -> None:
        """Wait until `batch`'s kept rows fit in the in-flight budget, then count them."""
        rows = len(batch.keep_index)
        self.budget.acquire(rows * sum(self.row_cost.values()), check=self.check)

    def check(self) -> None:
        for worker in (*self.workers.values(), self.committer):
            worker.check()

    def write(self, batch, captured) -> None:
        rows = len(batch.keep_index)
        for name, worker in self.workers.items():
            worker.submit(self._write_rows, name, batch.shard, batch, captured,
                          rows * self.row_cost[name])
        self.committer.check()

    def _write_rows(self, name, shard, batch, captured, charge) -> None:
        import torch

        from .flatten import to_record_batch
        from .writer import ModuleStats

        parts = self._part(name, shard)
        buffered = parts.buffered_bytes
        try:
            captured.wait()
            vectors = captured.rows(name, getattr(torch, self.config.dtype))  # [N, d]
            parts.write(to_record_batch(batch.doc_ids, batch.positions, batch.tokens, vectors,
                                        self.config.dtype))
            stats = self.shard_stats.setdefault(name, ModuleStats(self.dims[name]))
            stats.update(vectors, captured.clamped_count(name))
        finally:  # written (or failed): the rows leave flight, the row-group buffer stays
            captured.release(name)
            self.budget.settle(charge, parts.buffered_bytes - buffered)

    def _part(self, name, shard):
        from .writer import ShardParts

        if name not in self.parts:
            def path_of(seq):
                rel = f"{mf.module_dir(name)}/{mf.part_name(self.rank, shard, seq)}"
                return mf.staging_path(self.out, rel)
            self.parts[name] = ShardParts(path_of, self.schemas[name], encoders=self.encoders)
        return self.parts[name]

    def _close_part(self, name, shard):
        from .writer import ModuleStats

        parts = self._part(name, shard)
        self.budget.settle(0, -parts.buffered_bytes)
        infos = parts.close()
        del self.parts[name]
        return infos, self.shard_stats.pop(name, ModuleStats(self.dims[name]))

    def commit(self, end) -> None:
        """Queue shard `end` for commit once every module has closed its part."""
        futures = {name: w.submit(self._close_part, name, end.index)
                   for name, w in self.workers.items()}
        self.committer.submit(self._commit, end, futures)

    def _commit(self, end, futures) -> None:
        """Commit one shard: wait until every module's part is closed and fsynced in .tmp/,
        write the shard's docs part there, then take `manifest.commit`'s steps (statistics,
        record, renames into data/ and docs/; its docstring has the order and what a crash
        leaves), counting the shard here from the moment its record exists."""
        from .writer import write_table

        results = {name: future.result() for name, future in futures.items()}
        name = mf.part_name(self.rank, end.index)
        docs_rel = f"{DOCS_DIR}/{name}"
        docs_info = write_table(mf.staging_path(self.out, docs_rel), _docs_table(end))
        parts = [mf.Part(path=docs_rel, bytes=docs_info.bytes, sha256=docs_info.sha256,
                         kind="docs", rows=docs_info.rows)]
        parts += [mf.Part(path=f"{mf.module_dir(m)}/{mf.part_name(self.rank, end.index, info.seq)}",
                          bytes=info.bytes, sha256=info.sha256, kind="module", module=m,
                          rows=info.rows)
                  for m, (infos, _) in results.items() for info in infos]
        record = mf.ShardRecord(index=end.index, rank=self.rank, source_start=end.source_start,
                                source_end=end.source_end, docs=len(end.doc_ids),
                                skipped=end.skipped, tokens=int(end.n_tokens.sum()),
                                parts=tuple(parts), world_size=self.world)
        stats = {m: shard_stats for m, (_, shard_stats) in results.items()}
        record = mf.write_record(self.out, self.run_id, record, stats)
        if self.mirror is not None:  # the bucket's record is PUT last, after the parts
            record = self.mirror.commit(self.run_id, record)
        self.shards.append(record)  # counted from here on, as on disk
        for module, shard_stats in stats.items():
            self.stats[module].merge(shard_stats)
        self.bytes_written += sum(part.bytes for part in parts)
        if self.mirror is None:
            mf.move_into_place(self.out, record.parts)

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
    """Free what a failed forward left: its reference cycles, then the CUDA cache. Only
    after an OOM, never per batch (a full collection costs ~180 ms)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
