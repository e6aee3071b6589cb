"""Several processes writing one run. It owns which rank a process is (`resolve`: the
arguments, else torchrun's or Slurm-style RANK/WORLD_SIZE, else an initialised
torch.distributed process group), which shards it owns (global shard k goes to rank
k mod world), the run id every rank derives alike from the configuration, the end-of-run
barrier under torch.distributed, and `finalize`: consolidating the manifest and card
once every shard up to the end of the corpus is committed.

Locally each rank holds only its own lock (`OUT/.locks/rank-<rank>.lock`); the directory
lock is held briefly, to create or join the run and to finalize. On object storage each
rank holds its own lease (`format.leases`); rank 0 creates a new run; finalizing PUTs the
consolidated manifest with If-Match on the ETag it read (`finalize_url`), so two ranks
finalizing at once write it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sys
import tempfile

from crowstream.pipeline.options import RESUME_FIELDS
from crowstream.errors import ConfigError, IncompleteRunError, ManifestError, OutputError
from crowstream.format.card import write_card
from crowstream.format.locks import busy_ranks, exclusive
from crowstream.format.manifest import Manifest, read_manifest, write_manifest
from crowstream.format.layout import (CARD_NAME, COMMITS_DIR, DATA_DIR, DOCS_DIR, MANIFEST_NAME,
                                      TMP_DIR)
from crowstream.format.records import consolidated, read_end, read_records
from crowstream.format.recovery import listed_paths, recover
from crowstream.format.statistics import merged_stats

log = logging.getLogger("crowstream")
JOIN_WAIT_S = 600  # how long a rank waits for the directory lock another rank holds briefly


def resolve(rank, world_size) -> tuple[int, int]:
    """-> (rank, world size): the arguments, else the environment's RANK / WORLD_SIZE (set
    by torchrun, or by hand for Slurm arrays), else an initialised process group, else
    (0, 1)."""
    group = _process_group()
    if world_size is None:
        world_size = _env_int("WORLD_SIZE") or (group[1] if group else 1)
    if rank is None:
        rank = _env_int("RANK")
        rank = rank if rank is not None else (group[0] if group else 0)
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size); got rank {rank}, world_size "
                          f"{world_size}. Number the ranks 0 .. world_size - 1.")
    return rank, world_size


def local_world_size() -> int:
    """Processes torchrun started on this node (LOCAL_WORLD_SIZE), which share its CPUs;
    1 when unset."""
    return max(1, _env_int("LOCAL_WORLD_SIZE") or 1)


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer.") from None


def _process_group() -> tuple[int, int] | None:
    """(rank, world) of an initialised torch.distributed group; torch is not imported for it."""
    if "torch.distributed" not in sys.modules:
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


def check_options(world: int, *, max_tokens, overwrite, device_map) -> None:
    """Options that a run shared by several ranks cannot honour."""
    if world == 1:
        return
    if max_tokens is not None:
        raise ConfigError("max_tokens counts tokens through the corpus in order, which several "
                          "ranks cannot do; use max_docs (or sample) to bound a multi-rank run.")
    if overwrite:
        raise ConfigError("overwrite=True (--overwrite) with several ranks would let one rank "
                          "delete what the others write; delete OUT yourself first.")
    if device_map is not None:
        raise ConfigError(f"device_map={device_map!r} spreads one model over several devices, "
                          "but each of several ranks uses one device (LOCAL_RANK's GPU); drop "
                          "device_map, or run one process without ranks.")


def owner(rank: int, world: int):
    """shard index -> whether `rank` of `world` owns it."""
    return lambda index: index % world == rank


def run_id(config: dict) -> str:
    """The run id every rank computes alike: a hash of the resume-relevant configuration."""
    body = json.dumps({f: config.get(f) for f in RESUME_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def shards_end(out: str, manifest: Manifest, records) -> int | None:
    """The corpus's shard count: recorded in `commits/end.json` by a rank that read to the
    end, or implied by a committed shard shorter than `shard_size` (the last one)."""
    end = read_end(out, manifest.run_id)
    if end is not None:
        return end
    short = [r.index + 1 for r in records if r.source_end - r.source_start < manifest.shard_size]
    return min(short) if short else None


def missing_shards(out: str, manifest: Manifest) -> tuple[int | None, list[int]]:
    """-> (the corpus's shard count or None, indices below it with no commit record)."""
    records = read_records(out, manifest.run_id)
    end = shards_end(out, manifest, records)
    done = {r.index for r in records}
    return end, ([] if end is None else [k for k in range(end) if k not in done])


def finalize(out, *, storage_options: dict | None = None) -> Manifest:
    """Write the consolidated `crowstream.json` and dataset card of a run that several
    ranks wrote, once every shard up to the end of the corpus is committed; -> the
    manifest. A complete run is returned as it is. Raises `IncompleteRunError` naming the
    missing shards (or saying that no rank has reached the end of the corpus yet), and
    `OutputError` while a rank is still writing (locally). `out` may be a bucket URL
    with fsspec `storage_options`."""
    from crowstream.format import storage

    out = os.fspath(out)
    if storage.is_url(out):
        fs, root = storage.filesystem(out, storage_options)
        return finalize_url(fs, root, storage.public(out))
    read_manifest(out)  # not a crowstream output: one clear error, before locking it
    with exclusive(out, wait=JOIN_WAIT_S):
        return finalize_locked(out)


def finalize_locked(out: str, *, besides: int | None = None) -> Manifest:
    """`finalize`, under OUT's directory lock; `besides` is the caller's own rank."""
    manifest = read_manifest(out)
    if manifest.status == "complete":
        return manifest
    busy = busy_ranks(out, besides=besides)
    if busy:
        raise OutputError(f"rank(s) {', '.join(map(str, busy))} are still writing to {out!r}; "
                          "finalize once every rank has finished.")
    end = _check_finished(out, manifest, repr(out))
    state, _, removed = recover(out, manifest)  # roll forward, drop everything unlisted
    if removed:
        log.info("finalize: removed %d uncommitted file(s)", len(removed))
    final = _completed(out, state, end, repr(out))
    write_card(out, final)
    write_manifest(out, final)
    return final


def _check_finished(out: str, manifest: Manifest, shown: str) -> int:
    """-> the corpus's shard count, once every shard below it is committed; else raise
    `IncompleteRunError` naming the missing shards."""
    end, missing = missing_shards(out, manifest)
    if end is None:
        raise IncompleteRunError(f"cannot finalize {shown}: no rank has reached the end of the "
                                 "corpus yet. Start the missing ranks (or resume the run).",
                                 missing=None)
    if missing:
        listed = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
        raise IncompleteRunError(
            f"cannot finalize {shown}: {len(missing)} of {end} shard(s) are not committed "
            f"(shard(s) {listed}). Run the ranks that own them again (shard k belongs to rank "
            "k mod world_size), or resume with any number of ranks.", missing=missing)
    return end


def _completed(out: str, state: Manifest, end: int, shown: str) -> Manifest:
    """The consolidated manifest of a finished run (`state` holds its records)."""
    extra = [s.index for s in state.shards if s.index >= end]
    if extra:
        raise IncompleteRunError(f"cannot finalize {shown}: shard(s) {extra} lie beyond the end "
                                 f"of the corpus ({end} shards); it changed during the run. "
                                 "Capture again into a new OUT.", missing=[])
    merged = merged_stats(out, state.shards, state.modules)
    return dataclasses.replace(state, stats={n: s.summary() for n, s in merged.items()},
                               status="complete", error=None)


def finalize_url(fs, root: str, shown: str) -> Manifest:
    """`finalize` of a bucket OUT (`fs`, `root`: its fsspec filesystem and path): read the
    manifest and its ETag and the records, consolidate them, PUT the card, then the
    manifest with If-Match on that ETag, then delete the objects no record lists. A
    finalizer that loses the race to another returns the winner's manifest."""
    from crowstream.format import storage
    from crowstream.format.files import write_atomic
    from crowstream.format.leases import FencedError, Store

    store = Store(fs, root)
    key = f"{root}/{MANIFEST_NAME}"
    with tempfile.TemporaryDirectory(prefix="crowstream-finalize-") as local:
        os.makedirs(os.path.join(local, TMP_DIR))  # write_atomic's
        data, etag = store.read(key)
        if data is None:
            raise ManifestError(f"{shown} has no {MANIFEST_NAME}: it is not a crowstream output "
                                "(or not one yet). Check the URL and storage_options.")
        write_atomic(local, MANIFEST_NAME, data)
        manifest = read_manifest(local)
        if manifest.status == "complete":
            return manifest
        objects = storage.listing(fs, root)
        storage.download(fs, root, [r for r in objects if r.startswith(f"{COMMITS_DIR}/")], local)
        end = _check_finished(local, manifest, repr(shown))
        final = _completed(local, consolidated(local, manifest, stats=False), end, repr(shown))
        write_card(local, final)
        write_manifest(local, final)
        fs.put_file(os.path.join(local, CARD_NAME), f"{root}/{CARD_NAME}")
        with open(os.path.join(local, MANIFEST_NAME), "rb") as f:
            try:
                store.replace(key, f.read(), etag)
            except FencedError as error:
                theirs, _ = store.read(key)
                write_atomic(local, MANIFEST_NAME, theirs or b"")
                current = read_manifest(local)
                if current.status == "complete":
                    return current
                raise OutputError(f"{MANIFEST_NAME} of {shown} changed while this process "
                                  "finalized it; run `crowstream finalize URL` again.") from error
        listed = listed_paths(final)
        unlisted = [r for r in objects if r.startswith((f"{DATA_DIR}/", f"{DOCS_DIR}/",
                                                        f"{COMMITS_DIR}/")) and r not in listed]
        if unlisted:  # uploads of attempts that never committed: no record will list them
            fs.rm([f"{root}/{r}" for r in unlisted])
            log.info("finalize: removed %d uncommitted object(s)", len(unlisted))
        return final


def published(output) -> Manifest:
    """The run's manifest as the other ranks see it once it is finalized (a bucket's,
    read back into this rank's spool)."""
    if output.mirror is None:
        return read_manifest(output.path)
    from crowstream.format.files import write_atomic

    data, _ = output.mirror.store.read(f"{output.mirror.root}/{MANIFEST_NAME}")
    write_atomic(output.path, MANIFEST_NAME, data)
    return read_manifest(output.path)


def finalize_output(output) -> Manifest:
    """`finalize` of the run `output` (a local OUT, or the bucket its mirror publishes to)."""
    if output.mirror is None:
        return finalize(output.path)
    return finalize_url(output.mirror.fs, output.mirror.root, output.shown)


# -- torch.distributed ----------------------------------------------------------------------

def init_process_group() -> bool:
    """Under torchrun (WORLD_SIZE > 1 and MASTER_ADDR set) with no process group yet,
    initialise one: nccl when CUDA is available, else gloo. -> whether a group exists."""
    if (_env_int("WORLD_SIZE") or 1) <= 1 and _process_group() is None:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            return False  # RANK/WORLD_SIZE by hand (Slurm arrays, shells): no group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def local_device():
    """LOCAL_RANK's GPU when CUDA is available, else None (the default device)."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = _env_int("LOCAL_RANK") or 0
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def in_process_group() -> bool:
    """Whether a torch.distributed process group with more than one rank is initialised."""
    group = _process_group()
    return group is not None and group[1] > 1


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def all_ok(ok: bool, *, quiet: bool = False) -> bool:
    """The end barrier: an all-reduce of a failure flag. -> True when every rank finished
    its share. A failing rank calls it from its error path (`quiet`: a peer already gone
    is logged, not raised over the original error), so the others never wait for it."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    except Exception as error:
        if not quiet:
            raise
        log.error("could not tell the other ranks about this failure: %s", error)
        return False
    return int(flag.item()) == 0
