"""Where a capture's output goes. It owns `Output`: the local directory the pipeline writes
(OUT itself, or a spool that a `mirror.Mirror` publishes to a bucket), this process's
rank out of `world`, and the publish step of the commit; plus taking OUT's locks and the
checks on OUT's placement. One small object, made once by `run.capture` and passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

from crowstream.errors import ConfigError, OutputError
from crowstream.format.locks import RankLock, busy_ranks, exclusive
from crowstream.format.manifest import ShardRecord
from crowstream.format.records import move_into_place
from crowstream.format.recovery import inspect_out, recover


@dataclasses.dataclass(frozen=True)
class Output:
    """`path`: the local directory written (OUT, or the spool of a bucket OUT); `mirror`:
    the `mirror.Mirror` that publishes the spool (None for a local OUT); `rank` of
    `world` ranks (shard k is rank k mod world's)."""

    path: str
    rank: int = 0
    world: int = 1
    mirror: object | None = None

    @property
    def shown(self) -> str:
        """OUT as messages name it: the path, or the bucket URL without credentials."""
        if self.mirror is None:
            return self.path
        from crowstream.format.storage import public

        return public(self.mirror.url)

    def check_fence(self) -> None:
        """The fencing step of the commit, before the record: raises `FencedError` when this
        writer no longer owns the run. A local OUT is fenced by its locks, held for the
        whole run; a bucket OUT by this writer's lease (checked again before the record PUT,
        see `mirror.Mirror.commit`)."""
        if self.mirror is not None:
            self.mirror.check_fence()

    def recover(self, manifest, owned=None):
        """Prepare OUT for a resume, only once the call was compared with the recorded run:
        roll committed shards forward and delete what no record lists (`owned`: one rank's
        shards only). -> (the committed manifest, paths rolled forward, paths removed)."""
        if self.mirror is None:
            return recover(self.path, manifest, owned)
        state, removed = self.mirror.recover(manifest, owned)
        return state, [], removed

    def publish(self, run_id: str, record: ShardRecord) -> ShardRecord:
        """The last commit step: rename the parts into `data/` and `docs/`; for a bucket,
        upload them, then the statistics, then PUT the record (the bucket's commit point).
        -> the record as published."""
        if self.mirror is None:
            move_into_place(self.path, record.parts)
            return record
        return self.mirror.commit(run_id, record)

    def end_share(self) -> None:
        """A rank of several finished its share: a bucket rank uploads commits/end.json
        (locally it is already in place)."""
        if self.mirror is not None:
            self.mirror.upload_end()

    def publish_metadata(self, *, everything: bool = False) -> None:
        """Upload the manifest, card and end.json (with `everything` also vocab and tokenizer)."""
        if self.mirror is not None:
            self.mirror.publish(everything=everything)


@contextlib.contextmanager
def rank_locked(out: str, rank: int):
    """Hold this rank's own lock (OUT/.locks/rank-<rank>.lock) for its whole run."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") \
            from error
    lock = RankLock(out, rank)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def locked_out(out: str, *, overwrite: bool, resume: bool):
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
        with exclusive(out):
            mode = inspect_out(out, overwrite=overwrite, resume=resume)
            busy = busy_ranks(out)
            if busy:
                raise OutputError(f"rank(s) {', '.join(map(str, busy))} of a multi-rank run are "
                                  f"writing to {out!r}; let them finish (or stop them) first.")
            yield mode
    except BaseException:
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def local_out(out: str) -> str:
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


def path_to_str(value):
    """`pathlib.Path` (any os.PathLike) -> str; anything else as it is."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def check_out_placement(out: str, model, data) -> None:
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
