"""Object storage. It owns OUT given as an fsspec URL (`s3://bucket/run`, `gs://...`) with
`storage_options` (the fsspec dialect: `key`, `secret`, `client_kwargs={"endpoint_url":
...}`; or the environment, `AWS_ENDPOINT_URL` and the like): the URL helpers, and reading
(`committed`, `local_copy`, `paths`, `arrow_filesystem`). Writing is `format.mirror`.

Only parts the manifest or the records list are read, never a prefix glob. Credentials stay
in `storage_options`: they never reach the manifest, the card, logs or error messages.
"""

from __future__ import annotations

import os
import re
import tempfile

from crowstream.errors import ManifestError
from crowstream.format import records
from crowstream.format.manifest import Manifest, read_manifest

from .layout import COMMITS_DIR, DATA_DIR, DOCS_DIR, MANIFEST_NAME

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(out) -> bool:
    """Whether `out` is a URL other than `file://` (which is a local path)."""
    return isinstance(out, str) and bool(_SCHEME.match(out)) and not out.startswith("file://")


def public(url: str) -> str:
    """`url` without a query string or user info (either may hold credentials), for messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url.split("?")[0])


def filesystem(url: str, storage_options: dict | None):
    """-> (fsspec filesystem, root path inside it) of `url`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()  # fsspec shares instances: another user's listing may be stale
    return fs, root.rstrip("/")


def arrow_filesystem(fs):
    """A pyarrow filesystem over the fsspec one (so no option needs translating)."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def listing(fs, root: str) -> dict[str, int]:
    """rel path -> size of every object under root."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    return {key[len(root) + 1:]: info.get("size", 0) for key, info in found.items()}


def download(fs, root: str, rels, local: str) -> None:
    for rel in rels:
        target = os.path.join(local, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f"{root}/{rel}", target)


def is_metadata(rel: str) -> bool:
    """Files besides the parts: manifest, card, vocab, tokenizer, commits/."""
    return not rel.startswith((f"{DATA_DIR}/", f"{DOCS_DIR}/", ".tmp/"))


def local_copy(url: str, storage_options: dict | None, local: str, *, parts: bool) -> dict:
    """Download OUT's metadata (and, with `parts`, every listed part and stats file that
    exists) into `local`. -> the remote objects (rel -> size)."""
    fs, root = filesystem(url, storage_options)
    objects = listing(fs, root)
    if MANIFEST_NAME not in objects:
        raise ManifestError(f"{public(url)} has no {MANIFEST_NAME}: it is not a crowstream "
                            "output (or not one yet). Check the URL and storage_options.")
    download(fs, root, [r for r in objects if is_metadata(r)], local)
    if parts:
        listed = {p.path for p in records.committed(local, stats=False).parts}
        download(fs, root, sorted(listed & set(objects)), local)
    return objects


def committed(url: str, storage_options: dict | None, *, stats: bool = False) -> Manifest:
    """The committed manifest of a bucket OUT, as `manifest.committed` gives it locally
    (records are PUT after their parts, so every shard it lists is readable). Reads
    `crowstream.json`, and while the run is not consolidated its records (and, with
    `stats`, their statistics files)."""
    fs, root = filesystem(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="crowstream-") as local:
        try:
            download(fs, root, [MANIFEST_NAME], local)
        except FileNotFoundError as error:
            raise ManifestError(f"{public(url)} has no {MANIFEST_NAME}: it is not a crowstream "
                                "output (or not one yet). Check the URL and storage_options.") \
                from error
        manifest = read_manifest(local)
        if manifest.format_version == 1 or manifest.status != "running":
            return manifest
        names = [n for n in listing(fs, f"{root}/{COMMITS_DIR}") if stats or n.endswith(".json")]
        download(fs, root, [f"{COMMITS_DIR}/{n}" for n in names], local)
        return records.committed(local, stats=stats)


def paths(url: str, rels) -> list[str]:
    """Full URLs of the files `rels` (relative to OUT)."""
    return [f"{url.rstrip('/')}/{rel}" for rel in rels]
