"""The run. It owns `capture()`, the lifecycle of one capture, top to bottom: validate the
options (`CaptureOptions`), decide where the output goes (`Output`: a local OUT, a spool
published to a bucket, a rank's share), take OUT's locks, open the source, load the model,
start or resume the run's manifest, run the `Session` (source -> batching -> tracing ->
writers -> commit), and, with several ranks, meet the others and consolidate.
Stages never import this module; data flows one way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os

from crowstream.errors import CrowstreamError, DataError, IncompleteRunError
from crowstream.format import storage
from crowstream.format.mirror import Mirror
from crowstream.format.layout import manifest_path
from crowstream.format.locks import check_world, exclusive
from crowstream.format.manifest import read_manifest
from crowstream.format.recovery import create_out, inspect_out

from . import ranks
from .failures import write_errors
from .options import (SORT_WINDOW_DOCS, CaptureConfig, CaptureOptions, default_inflight_bytes,
                      keyword_signature)
from .output import Output, check_out_placement, local_out, locked_out, path_to_str, rank_locked
from .session import Run, Session, provenance

log = logging.getLogger("crowstream")


def capture(model, data, modules, out, **options) -> Run:
    """Run `model` over `data` and store the outputs of `modules` under `out`.

    One forward pass per batch captures every module and stops after the deepest.
    Padding is never stored. See docs/capture.md for every option; in short:
    `model` is a hub id, a local directory, or a loaded model (then pass `tokenizer`);
    `data` is a list of strings/dicts, a `datasets` dataset, a local file or directory, or
    a hub dataset id; `modules` are names or globs from `crowstream.modules(model)`.
    `overflow="chunk"` splits long documents into `context_size` windows (positions stay
    absolute); `dtype` is "float32" or "float16" (values beyond float16's range fail the
    run unless `float16_overflow="clamp"`); `shard_size` is documents per commit (default:
    about SHARD_TARGET_TOKENS tokens); `max_batch_tokens` caps padded tokens per batch and
    `batch_size` documents; `max_inflight_bytes` bounds the bytes between the forward and
    the disk (default min(2 GiB, 10% of RAM)); `compression` is the part files' codec
    ("zstd", "lz4" or "none"); `encoder_threads` (default: one per core) encode them, the
    bytes identical whatever the count; `revision` picks a hub model's revision.
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
    options = CaptureOptions.of(options)
    created = ranks.init_process_group()
    grouped = ranks.in_process_group()
    try:
        out = path_to_str(out)
        if storage.is_url(out):
            return _capture_to_url(model, data, modules, out, options, grouped)
        rank, world = ranks.resolve(options.rank, options.world_size)
        return _capture(model, data, modules, Output(local_out(out), rank, world), options,
                        grouped)
    except BaseException as error:
        if grouped and not getattr(error, "crowstream_flagged", False):
            ranks.all_ok(False, quiet=True)  # the other ranks stop instead of waiting for us
        raise
    finally:
        if created:
            ranks.destroy_process_group()


capture.__signature__ = keyword_signature(capture, ("model", "data", "modules", "out"))


def _capture(model, data, modules, output: Output, options: CaptureOptions, grouped: bool) -> Run:
    """`capture` once its options are valid (and, under torchrun, the process group is up)."""
    from . import models, sources
    from .probe import resolve_modules
    from .tracing import ModelTracer

    out, world = output.path, output.world
    ranks.check_options(world, max_tokens=options.max_tokens, overwrite=options.overwrite,
                        device_map=options.device_map)
    if grouped and options.device is None:
        options = dataclasses.replace(options, device=ranks.local_device())
    model, data = path_to_str(model), path_to_str(data)
    check_out_placement(out, model, data)
    inspect_out(out, overwrite=options.overwrite, resume=options.resume or world > 1)
    with contextlib.ExitStack() as held:
        lock, mode = _lock(held, output, options)
        recorded = read_manifest(out) if mode == "resume" else None
        source = sources.open_source(
            data, text_field=options.text_field, tokens_field=options.tokens_field,
            split=options.split, sample=options.sample,
            seed=options.seed, max_docs=options.max_docs, repository=sources.Repository(
                options.data_config, options.data_revision, options.data_files))
        peek = []
        if mode != "resume":  # the first documents size the shards of a new run
            peek = list(itertools.islice(source.rows(0), SORT_WINDOW_DOCS))
            if not peek:
                raise DataError("the corpus has no documents; check data, split and max_docs.")
        model, tokenizer = models.load_model(
            model, options.tokenizer, device=options.device, torch_dtype=options.torch_dtype,
            device_map=options.device_map, revision=options.revision,
            trust_remote_code=options.trust_remote_code)
        names = resolve_modules(model, modules)
        config = CaptureConfig.of(
            options, model=models.model_fingerprint(model, options.revision),
            tokenizer=models.tokenizer_fingerprint(tokenizer), source=source.fingerprint,
            modules=tuple(names),
            context_size=models.resolve_context_size(options.context_size, model, tokenizer),
            max_inflight_bytes=_budget(options.max_inflight_bytes, len(names)))
        tracer = ModelTracer(model, tokenizer, names, config.dtype, config.float16_overflow,
                             config.max_inflight_bytes, config.packing)
        session = Session(output, config, tracer, tokenizer, options.progress and output.rank == 0,
                          options.encoder_threads)
        _start_or_load(session, mode, recorded, peek, provenance(model, config.tokenizer))
        if not grouped:
            run = session.run(source)
            if world == 1:
                return run
            return _end_bucket_rank(session, lock) if output.mirror else session.end_rank(lock)
        return _run_grouped(session, source, lock)


def _lock(held: contextlib.ExitStack, output: Output, options: CaptureOptions):
    """Take OUT's locks for the run. -> (this rank's lock or None, the mode: "join" for a
    rank of several, else "fresh", "resume" or "replace" as decided under the lock)."""
    if output.world > 1:  # the run is created or joined under the directory lock, later
        return held.enter_context(rank_locked(output.path, output.rank)), "join"
    mode = held.enter_context(locked_out(output.path, overwrite=options.overwrite,
                                         resume=options.resume))
    return None, mode


def _start_or_load(session: Session, mode: str, recorded, peek, provenance_: dict) -> None:
    """Start a new run's manifest, resume a recorded one, or (a rank of several) join the
    run another rank started, creating it if this rank is first."""
    out = session.out
    if mode == "join":
        # the first rank creates the run while it holds the lock, up to its manifest: a
        # rank that found the OUT half-created would take it for a start killed before its
        # manifest and delete it (the vocab and tokenizer another rank was writing)
        with exclusive(out, wait=ranks.JOIN_WAIT_S):
            check_world(out, session.rank, session.world)  # before anything is deleted
            if os.path.isfile(manifest_path(out)):
                session.load(read_manifest(out))
                return
            _create(session, inspect_out(out, overwrite=False, resume=True), peek, provenance_)
        return
    if mode == "resume":
        session.load(recorded)
        return
    _create(session, mode, peek, provenance_)


def _create(session: Session, mode: str, peek, provenance_: dict) -> None:
    """Make OUT's skeleton (`mode` "fresh" or "replace") and start the run's manifest."""
    with write_errors(session.out):
        create_out(session.out, mode)
        session.start(peek, provenance_)


def _capture_to_url(model, data, modules, url: str, options: CaptureOptions, grouped) -> Run:
    """`capture` into object storage: the local pipeline writes a temporary spool that a
    `Mirror` publishes shard by shard (see crowstream/format/mirror.py)."""
    rank, world = ranks.resolve(options.rank, options.world_size)
    ranks.check_options(world, max_tokens=options.max_tokens, overwrite=options.overwrite,
                        device_map=options.device_map)  # before the bucket is touched
    with Mirror(url, options.storage_options, rank=rank, world=world,
                        lease_s=options.lease_s, takeover=options.takeover,
                        spool_dir=options.spool_dir) as mirror:
        resume = mirror.prepare(overwrite=options.overwrite, resume=options.resume or world > 1)
        options = dataclasses.replace(options, resume=resume, overwrite=False)
        try:
            return _capture(model, data, modules, Output(mirror.spool, rank, world, mirror),
                            options, grouped)
        except CrowstreamError as error:  # name the URL, not the temporary spool
            error.args = tuple(arg.replace(mirror.spool, storage.public(mirror.url))
                               if isinstance(arg, str) else arg for arg in error.args)
            raise


def _end_bucket_rank(session: Session, lock) -> Run:
    """A rank of several writing to a bucket (no torch.distributed) finished its share:
    upload end.json, then finalize the run if every shard is committed (the last rank to
    finish does; two at once write the manifest once, `ranks.finalize_url`)."""
    session.output.end_share()
    lock.release()
    try:
        session.manifest = ranks.finalize_output(session.output)
        log.info("rank %d: every shard is committed; wrote the consolidated manifest",
                 session.rank)
    except IncompleteRunError as waiting:
        log.info("rank %d finished its share (%s); the last rank to finish, or `crowstream "
                 "finalize URL`, consolidates the run", session.rank, waiting)
    return session._result()


def _run_grouped(session, source, lock) -> Run:
    """Under torch.distributed: run this rank's share, then meet every rank at the end
    barrier, an all-reduce of a failure flag (a failing rank reaches it from its error
    path); rank 0 finalizes once all succeeded. Errors raised here are already flagged."""
    try:
        session.run(source)
        session.output.end_share()
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
            session.manifest = ranks.finalize_output(session.output)
    finally:
        ranks.barrier()  # the others return once rank 0 has finalized (or failed to)
    if session.rank != 0:
        session.manifest = ranks.published(session.output)
    return session._result()


def _budget(asked: int | None, modules: int) -> int:
    """The in-flight budget: `asked` (or the default), raised to the smallest one the
    writers can honour for `modules` modules, with a warning when the caller asked for less."""
    import warnings

    from .parts import min_inflight_bytes

    least = min_inflight_bytes(modules)
    budget = asked or default_inflight_bytes()
    if budget < least and asked:
        warnings.warn(f"max_inflight_bytes={asked:,} is below the {least:,} bytes the writers "
                      f"need for {modules} module(s) (one encoder and two row-group buffers "
                      f"per module); using {least:,}.", UserWarning, stacklevel=3)
    return max(budget, least)
