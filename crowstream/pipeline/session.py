"""The session: one capture into one OUT. It owns the run's manifest (started fresh or
loaded for a resume, consolidated at the end), the batch loop (forward, write, commit
shard by shard, OOM back-off) and what `capture` returns, a `Run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import threading
from typing import NoReturn

from crowstream.errors import (IncompleteRunError, Interrupted, ManifestError, OutOfMemory,
                               OutputError, ResumeMismatchError)
from crowstream.format.locks import exclusive
from crowstream.format.card import write_card
from crowstream.format.layout import FORMAT_VERSION, module_dir
from crowstream.format.manifest import Counts, Manifest, ModuleInfo, write_manifest
from crowstream.format.records import read_end, write_end, write_run_json
from crowstream.format.statistics import merged_stats

from .batching import Tokenizing
from .failures import is_oom, release_cached_memory, translate, write_errors
from .options import CaptureConfig
from .output import Output
from .progress import Progress, signals
from .tables import write_tokenizer, write_vocab
from .writers import Writers

log = logging.getLogger("crowstream")
# Forwards without an OOM before the token cap doubles again: long enough that a cap that
# only just fits is not raised straight back into the OOM, short enough to recover within
# a shard (~30 batches at the default token budget).
OOM_RECOVERY_BATCHES = 50


@dataclasses.dataclass(frozen=True)
class Run:
    """What `capture` wrote: `modules` maps name -> d, `tokens` name -> rows written,
    `manifest` is the consolidated `crowstream.format.manifest.Manifest`."""

    path: str
    run_id: str
    modules: dict[str, int]
    docs: int
    tokens: dict[str, int]
    manifest: Manifest


def provenance(model, tokenizer: dict) -> dict:
    """What the manifest records of the run's model, tokenizer (`tokenizer`: its
    fingerprint, computed once per capture) and libraries."""
    from .models import model_fingerprint
    return {"model": model_fingerprint(model), "tokenizer": tokenizer,
            "versions": dict(library_versions()),
            "dtype_of_model": str(next(model.parameters()).dtype)}


@functools.cache
def library_versions() -> tuple:
    """(package, version) of crowstream and the libraries a run depends on, read once per
    process (reading package metadata took ~15 ms of every capture's fixed cost)."""
    import importlib.metadata as md

    versions = []
    for package in ("crowstream", "torch", "transformers", "nnsight", "pyarrow", "datasets"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions.append((package, md.version(package)))
    return tuple(versions)


class Session:
    """One capture into one `Output`: owns the manifest, the writer threads and the commits."""

    def __init__(self, output: Output, config: CaptureConfig, tracer, tokenizer, progress: bool,
                 encoder_threads: int | None = None):
        self.output, self.config, self.tracer, self.tokenizer = output, config, tracer, tokenizer
        self.encoder_threads = encoder_threads  # None: one per core
        self.out, self.rank, self.world = output.path, output.rank, output.world
        self.progress = progress
        self.manifest: Manifest | None = None
        self.stop_requested = threading.Event()
        self.token_cap: int | None = None  # padded tokens per forward, after an OOM
        self.clean_forwards = 0  # forwards since the cap last changed
        # one for the run: the stream takes the ids the shard-size estimate already made
        self.tokenizing = Tokenizing(tokenizer, config, pack=getattr(tracer, "packs", False))

    # -- set-up -----------------------------------------------------------------------
    def load(self, manifest: Manifest) -> None:
        """Resume: check the call against the recorded run, then `manifest.recover` OUT
        (committed shards rolled forward, everything else deleted)."""
        if manifest.format_version < FORMAT_VERSION:
            release = {1: "0.1", 2: "0.2"}[manifest.format_version]
            raise ManifestError(
                f"cannot resume {self.output.shown!r}: it was written by crowstream {release} "
                f"(format {manifest.format_version}), which this version reads but does not "
                "continue. Capture into a new OUT (or pass overwrite=True / --overwrite to "
                "replace it), or finish it with crowstream " + release + ".")
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
        manifest, rolled, removed = self.output.recover(manifest, owned)  # after the check
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
        from .batching import estimate_shard_size

        config = self.config
        shard_size = config.shard_size or estimate_shard_size(
            [text for _, text in peek], self.tokenizing, [doc_id for doc_id, _ in peek])
        order = {name: i for i, name in enumerate(self.tracer.order)}  # execution order
        modules = {name: ModuleInfo(self.tracer.dims[name], config.dtype, module_dir(name),
                                    self.tracer.types[name], order[name])
                   for name in config.modules}
        from .ranks import run_id

        self.manifest = Manifest(run_id=run_id(config.to_json()), status="running",
                                    config=config.to_json(), shard_size=shard_size,
                                    provenance=provenance, modules=modules,
                                    counts=Counts.of([], modules))
        write_vocab(self.out, self.tokenizer)
        write_tokenizer(self.out, self.tokenizer)
        write_card(self.out, self.manifest)
        write_run_json(self.out, self.manifest)  # what `crowstream recover` rebuilds from
        write_manifest(self.out, self.manifest)
        self.output.publish_metadata(everything=True)

    # -- the loop ---------------------------------------------------------------------
    def _write_running(self) -> None:
        """crowstream.json while running lists nothing: the records in commits/ are the truth."""
        with write_errors(self.out):
            write_manifest(self.out, dataclasses.replace(
                self.manifest, status="running", error=None, shards=[], stats={},
                counts=Counts.of([], self.manifest.modules)))
            self.output.publish_metadata()

    def run(self, source) -> Run:
        """Capture this process's share of `source` (every shard not yet committed, or under
        several ranks those of them it owns), committing shard by shard."""
        from .threads import prefetch

        if self.manifest.status == "complete":
            return self._result()
        committed = self.manifest
        if self.world == 1:
            self._write_running()
        total = source.n_docs if source.n_docs is None or self.world == 1 else \
            -(-source.n_docs // self.world)  # about this rank's share
        initial = sum(s.source_end - s.source_start for s in committed.shards
                      if s.index % self.world == self.rank)
        writers = stream = None
        try:
            writers = Writers(self.output, self.config, self.tracer.dims, committed,
                              self.encoder_threads, self.tracer.gate)
            stream = prefetch(self._batches(source))
            with signals(self.stop_requested), self.tracer, \
                    Progress(total, initial, enabled=self.progress) as bar:
                finished = self._loop(stream, writers, bar)
                stream.close()
                if not finished:
                    writers.abort()
                writers.finish()
                bar.written(writers.bytes_written)
        except BaseException as error:
            self._fail(error, stream, writers)
        if not finished:
            self._record_failure(Interrupted("interrupted"), writers)
            raise Interrupted(f"interrupted: committed {len(writers.shards)} shard(s) to "
                              f"{self.output.shown!r}. Rerun the same call with resume=True "
                              "(--resume) to continue.")
        if self.world > 1:
            shards = sorted(writers.shards, key=lambda s: s.index)
            self.manifest = dataclasses.replace(self.manifest, shards=shards,
                                                counts=Counts.of(shards, self.manifest.modules))
            return self._result()
        self._consolidate(writers, "complete")
        return self._result()

    def _loop(self, stream, writers: Writers, bar) -> bool:
        """Forward, write and commit until the stream ends (-> True) or a signal stops it."""
        from .batching import Batch

        for item in stream:
            # after a signal no new batch is taken, but a shard whose batches are all
            # written still arrives as its ShardEnd: commit it
            if isinstance(item, Batch):
                if self.stop_requested.is_set():
                    return False
                writers.admit(item)  # waits while the in-flight budget is full
                for sub, captured in self._forward(item):
                    writers.write(sub, captured)
                bar.batch(item)
            else:
                writers.commit(item)
                bar.shard(item, writers.bytes_written)
        return True  # a signal after the last batch interrupts nothing

    def _fail(self, error: BaseException, stream, writers) -> NoReturn:
        """Stop everything after `error`, record the failure in the manifest, re-raise."""
        if stream is not None:
            stream.close()
        if writers is not None:
            try:
                writers.abort()  # keeps committing complete shards; the open one is dropped
            except OSError as secondary:  # e.g. a failing disk: report the original error
                log.error("while stopping after %s: %s", type(error).__name__, secondary)
        failure = translate(error, self.out, writers.bytes_written if writers else 0)
        self._record_failure(failure, writers)
        if failure is error:
            raise error
        raise failure from error

    def end_rank(self, lock) -> Run:
        """A rank without torch.distributed has finished its share: under the directory
        lock, finalize the run if every other rank has finished too, then release this
        rank's lock (both under the one lock, so exactly the last rank to finish sees
        the others done)."""
        from .ranks import JOIN_WAIT_S, finalize_locked

        with exclusive(self.out, wait=JOIN_WAIT_S):
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
        from .batching import shard_stream
        from .ranks import owner

        manifest = self.manifest
        done = {s.index for s in manifest.shards}
        owns = owner(self.rank, self.world)
        if self.config.max_tokens is not None and done != set(range(len(done))):
            raise ManifestError(f"cannot resume {self.out!r} with max_tokens: its committed shards "
                                "are not a prefix of the corpus.")
        end = read_end(self.out, manifest.run_id)
        first = next(k for k in itertools.count(self.rank, self.world) if k not in done)
        stop = None
        if end is not None:
            stop = max((k for k in range(first, end) if owns(k) and k not in done),
                       default=first - 1) + 1

        seen_end = []  # (shards, rows) once the reader thread sees the corpus end

        def record_end() -> None:  # in stream order, once the last shard's batches are out
            if seen_end:
                with write_errors(self.out):
                    write_end(self.out, manifest.run_id, *seen_end[0])

        shards = source.shards(manifest.shard_size, lambda k: owns(k) and k not in done,
                               first=first, stop=stop, on_end=lambda *end: seen_end.append(end))
        stream = shard_stream(shards, self.tokenizing, shard_size=manifest.shard_size,
                              tokens_before=manifest.counts.tokens_fed, on_end=record_end)
        if self.tracer.device.type != "cuda":
            return stream
        # pinned on the prefetch thread, so the forward loop's copies to the GPU are async
        return (item.pin_memory() if hasattr(item, "pin_memory") else item for item in stream)

    def _forward(self, batch):
        """-> [(batch, captured)]: one entry, or several after backing off on OOM. After an
        OOM, forwards are capped at half the failed batch's padded tokens (B*T); each OOM
        halves the cap, OOM_RECOVERY_BATCHES clean forwards double it, up to
        max_batch_tokens (then no cap). Batches under the cap are never cut."""
        cap = self.token_cap
        if cap is not None and batch.padded_tokens > cap and batch.n_pieces > 1:
            first, second = batch.split()
            return self._forward(first) + self._forward(second)
        try:
            captured = self.tracer.run(batch)
        except Exception as error:
            if not is_oom(error):
                raise
            if batch.n_pieces == 1:
                raise OutOfMemory(f"out of memory on a single document of {batch.input_ids.shape[1]} "
                                  "tokens; lower --context-size (or use overflow='chunk' with a "
                                  "smaller one), or use a device with more memory.") from error
        else:
            self._clean_forward()
            return [(batch, captured)]
        # Out of the except block: its traceback no longer holds the failed forward's
        # frames, so collecting now really frees that batch's tensors before the retry.
        release_cached_memory()
        self.token_cap, self.clean_forwards = max(1, batch.padded_tokens // 2), 0
        log.warning("out of memory at a batch of %d padded tokens (%d x %d); capping forwards at "
                    "%d padded tokens (pass a smaller --max-batch-tokens to avoid this)",
                    batch.padded_tokens, *batch.input_ids.shape, self.token_cap)
        return self._forward(batch)

    def _clean_forward(self) -> None:
        if self.token_cap is None:
            return
        self.clean_forwards += 1
        if self.clean_forwards < OOM_RECOVERY_BATCHES:
            return
        limit, self.clean_forwards = self.config.max_batch_tokens, 0
        self.token_cap = None if limit is not None and self.token_cap * 2 >= limit \
            else self.token_cap * 2
        log.info("no out of memory for %d forwards: cap now %s padded tokens",
                 OOM_RECOVERY_BATCHES, "no" if self.token_cap is None else self.token_cap)

    def _record_failure(self, error: BaseException, writers) -> None:
        if self.world > 1 or writers is None:  # shared by the ranks, or nothing started
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
            stats = merged_stats(self.out, shards, self.manifest.modules)
        self.manifest = dataclasses.replace(
            self.manifest, status=status, error=error, shards=shards,
            counts=Counts.of(shards, self.manifest.modules),
            stats={name: s.summary() for name, s in stats.items()})
        write_card(self.out, self.manifest)  # lists the committed parts (no glob)
        write_manifest(self.out, self.manifest)
        self.output.publish_metadata()

    def _result(self) -> Run:
        m = self.manifest
        return Run(path=self.output.shown, run_id=m.run_id, modules={n: v.d for n, v in m.modules.items()},
                   docs=m.counts.docs, tokens=dict(m.counts.rows), manifest=m)
