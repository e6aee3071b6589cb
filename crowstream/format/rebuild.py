"""Rebuilding a lost manifest. It owns `recover(out)`: a `crowstream.json` rebuilt from
`commits/` alone (`commits/run.json`, written at the start of the run, and the commit
records), for an OUT whose manifest was deleted or never synced. Nothing is deleted; the
rebuilt manifest says "interrupted", so the run can then be resumed or read.
"""

from __future__ import annotations

import os
import tempfile

from crowstream.errors import ManifestError

from .card import write_card
from .layout import CARD_NAME, COMMITS_DIR, MANIFEST_NAME, TMP_DIR
from .locks import exclusive
from .manifest import Manifest, write_manifest
from .records import consolidated, read_run_json


def recover(out, *, storage_options: dict | None = None) -> dict:
    """Rebuild OUT's lost `crowstream.json` (and its card) from `commits/`. `out` is a local
    path or a bucket URL. -> {"shards": committed shards, "rows": module -> rows}.
    Refuses an OUT that still has its manifest (there is nothing to recover)."""
    from . import storage

    out = os.fspath(out)
    if not storage.is_url(out):
        with exclusive(out):
            manifest = _rebuild(out, out)
    else:
        fs, root = storage.filesystem(out, storage_options)
        shown = storage.public(out)
        with tempfile.TemporaryDirectory(prefix="crowstream-recover-") as local:
            if fs.exists(f"{root}/{MANIFEST_NAME}"):
                raise _has_manifest(shown)
            for sub in (COMMITS_DIR, TMP_DIR):
                os.makedirs(os.path.join(local, sub))
            for key in fs.find(f"{root}/{COMMITS_DIR}"):
                fs.get_file(key, os.path.join(local, COMMITS_DIR, key.rsplit("/", 1)[-1]))
            manifest = _rebuild(local, shown)
            for rel in (CARD_NAME, MANIFEST_NAME):  # the manifest last
                fs.put_file(os.path.join(local, rel), f"{root}/{rel}")
    return {"shards": len(manifest.shards), "rows": dict(manifest.counts.rows)}


def _has_manifest(shown: str) -> ManifestError:
    return ManifestError(f"OUT {shown!r} has its {MANIFEST_NAME}: there is nothing to recover. "
                         "Resume it (resume=True / --resume) or check it with `crowstream verify`.")


def _rebuild(local: str, shown: str) -> Manifest:
    """Write crowstream.json and the card in `local` from its `commits/`."""
    if os.path.isfile(os.path.join(local, MANIFEST_NAME)):
        raise _has_manifest(shown)
    try:
        manifest = read_run_json(local)
        manifest = consolidated(local, manifest, stats=True)
    except ManifestError as error:
        error.args = tuple(a.replace(local, shown) if isinstance(a, str) else a for a in error.args)
        raise
    manifest.status = "interrupted"
    write_card(local, manifest)
    write_manifest(local, manifest)
    return manifest
