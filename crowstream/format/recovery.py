"""Preparing OUT. It owns deciding what to do with an existing OUT (`inspect_out`),
creating or replacing it (`create_out`), and recovery before a resume (`recover`): roll
committed shards forward, delete what no record lists; plus the listings `verify` and
the bucket mirror share (`listed_paths`, `unlisted_files`, `damaged_parts`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil

from crowstream.errors import ManifestError, OutputError, OutputExistsError

from .layout import (
    COMMITS_DIR,
    DATA_DIR,
    DOCS_DIR,
    END_PATH,
    LOCKS_DIR,
    MANIFEST_NAME,
    RUN_PATH,
    TMP_DIR,
    TOKENIZER_DIR,
    VOCAB_NAME,
    manifest_path,
    record_path,
    staging_path,
)
from .files import fsync_dir
from .manifest import Manifest
from .records import consolidated, move_into_place, record_names


def recover(out: str, manifest: Manifest, owned=None) -> tuple[Manifest, list[str], list[str]]:
    """Prepare OUT for a resume: roll forward every committed shard whose parts are still in
    `.tmp/`, then delete every file no record lists (in `.tmp/`, `data/`, `docs/` and
    `commits/`). -> (the committed manifest, paths rolled forward, paths removed).
    With `owned` (shard index -> bool; one rank of several), only unlisted files of the
    shards it owns are deleted: the other ranks' files in flight are theirs.

    Raises `ManifestError` when a listed part is missing or not of its recorded size
    (before anything is deleted)."""
    state = consolidated(out, manifest, stats=False)  # the run merges them as it starts
    mine = state if owned is None else dataclasses.replace(
        state, shards=[s for s in state.shards if owned(s.index)])  # others may be committing
    rolled = move_into_place(out, [p for p in mine.parts
                                   if os.path.exists(staging_path(out, p.path))])
    damaged = damaged_parts(out, mine)
    if damaged:
        raise ManifestError(
            f"cannot resume {out!r}: {len(damaged)} committed file(s) are missing or "
            f"changed in size ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}). "
            "`crowstream verify OUT` shows the damage; capture again with overwrite=True "
            "(--overwrite) or into a new OUT.")
    listed = listed_paths(state)
    removed = [rel for rel in _files(out, TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR)
               if rel not in listed and (owned is None or owned_file(rel, owned))]
    for rel in removed:
        os.remove(os.path.join(out, rel))
    for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    return state, rolled, removed


_SHARD_OF_FILE = re.compile(r"part-\d{5}-(\d{6})-\d{3}(?:-a[0-9a-f]+)?\.parquet"
                            r"|shard-(\d{8})\.(?:json|stats\.parquet)")


def owned_file(rel: str, owned) -> bool:
    """Whether `rel` is a file of a shard that `owned` (index -> bool) accepts."""
    found = _SHARD_OF_FILE.search(rel.rsplit("/", 1)[-1].rsplit("__", 1)[-1])
    return found is not None and owned(int(found.group(1) or found.group(2)))


def _files(out: str, *tops: str) -> list[str]:
    """Every file under the given top-level directories, relative to OUT, sorted."""
    found = []
    for top in tops:
        for root, _, files in os.walk(os.path.join(out, top)):
            found += [os.path.relpath(os.path.join(root, n), out).replace(os.sep, "/") for n in files]
    return sorted(found)


def listed_paths(manifest: Manifest) -> set[str]:
    """Every file a committed shard lists, relative to OUT: parts, statistics files, commit
    records and `end.json` (the last two in format 2)."""
    listed = {f.path for f in committed_files(manifest)}
    if manifest.format_version != 1:
        listed |= {record_path(s.index) for s in manifest.shards} | {END_PATH, RUN_PATH}
    return listed


def committed_files(manifest: Manifest) -> list:
    """The part and statistics files of the committed shards (`FileRef`s)."""
    return manifest.parts + [s.stats for s in manifest.shards if s.stats is not None]


def unlisted_files(out: str, manifest: Manifest) -> list[str]:
    """Files in `data/`, `docs/` and `commits/` that no committed shard lists."""
    listed = listed_paths(manifest)
    return [rel for rel in _files(out, DATA_DIR, DOCS_DIR, COMMITS_DIR) if rel not in listed]


_PART_SHARD = re.compile(r"part-\d{5}-(\d{6})-\d{3}(?:-a[0-9a-f]+)?\.parquet")


def partly_visible(manifest: Manifest, present) -> list[str]:
    """Shards of which a glob over `data/` and `docs/` sees some part files but not all:
    part files with no commit record, or fewer in place than the record lists (a commit
    in progress or cut short). `present`: the paths (relative to OUT) of the files in
    `data/` and `docs/`. -> one message per shard, naming it; crowstream's readers and the
    dataset card never read these."""
    present = set(present)
    recorded = {s.index: s for s in manifest.shards}
    strays: dict[int, int] = {}
    for rel in present:
        found = _PART_SHARD.fullmatch(rel.rsplit("/", 1)[-1])
        if found and int(found.group(1)) not in recorded:
            strays[int(found.group(1))] = strays.get(int(found.group(1)), 0) + 1
    found = [(k, f"partly visible: shard {k} has {n} part file(s) in data/ or docs/ but no "
                 "commit record (a commit in progress, or cut short; `--resume` removes them)")
             for k, n in strays.items()]
    for index, shard in recorded.items():
        there = sum(p.path in present for p in shard.parts)
        if 0 < there < len(shard.parts):
            found.append((index, f"partly visible: shard {index} has {there} of its "
                                 f"{len(shard.parts)} part files in place (a commit in "
                                 "progress, or cut short; `--resume` finishes it)"))
    return [message for _, message in sorted(found)]


def visible_files(out: str) -> list[str]:
    """The files under `data/` and `docs/` of a local OUT, relative to it."""
    return _files(out, DATA_DIR, DOCS_DIR)


def damaged_parts(out: str, manifest: Manifest, sizes: dict | None = None) -> list[str]:
    """Listed part and statistics files that are missing or not of their recorded size
    (a cheap check: `verify` reads them). `sizes` (path -> bytes, e.g. a bucket listing)
    replaces looking at the files under `out`."""
    if sizes is None:
        sizes = {f.path: os.path.getsize(os.path.join(out, f.path))
                 for f in committed_files(manifest) if os.path.isfile(os.path.join(out, f.path))}
    return [f.path for f in committed_files(manifest) if sizes.get(f.path) != f.bytes]


def inspect_out(out: str, *, overwrite: bool, resume: bool) -> str:
    """Decide what to do with OUT, changing nothing: -> "fresh", "resume" or "replace".

    Refuses a file and a non-empty directory unless `resume` (which needs a manifest)
    or `overwrite` (which only ever deletes a crowstream output).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"OUT {out!r} is a file, not a directory; choose another path.")
    existing = [n for n in os.listdir(out) if n != LOCKS_DIR] if os.path.isdir(out) else []
    if not existing:
        parent = os.path.dirname(os.path.abspath(out))
        _check_writable(out if os.path.isdir(out) else _existing_ancestor(parent))
        return "fresh"
    _check_writable(out)
    if resume and MANIFEST_NAME in existing:
        return "resume"
    if overwrite and MANIFEST_NAME in existing:
        return "replace"
    if resume and MANIFEST_NAME not in existing:  # overwrite=True asks to delete; resume not
        check_not_lost(out, record_names(out))
    if (resume or overwrite) and _uncommitted_layout(out, existing):
        return "replace"  # killed before its first manifest, or while being replaced
    if overwrite:
        raise OutputExistsError(f"refusing to overwrite {out!r}: it is not empty and holds no "
                                f"{MANIFEST_NAME}, so it is not a crowstream output. Choose "
                                "another OUT or empty it yourself.")
    hint = ("it has no crowstream.json, so there is nothing to resume; choose another OUT"
            if resume else "pass overwrite=True (--overwrite) to replace it, resume=True "
            "(--resume) to continue it, or choose another OUT")
    raise OutputExistsError(f"OUT {out!r} is not empty: {hint}.")


def check_not_lost(shown: str, names: list[str]) -> None:
    """Commit records (file names `names`) without a crowstream.json mean a lost manifest,
    never an empty run: refuse, deleting nothing, and name the committed shards."""
    if not names:
        return
    shards = [int(n[len("shard-"):-len(".json")]) for n in names]
    listed = ", ".join(map(str, shards[:10])) + (", ..." if len(shards) > 10 else "")
    raise ManifestError(f"OUT {shown!r} has {len(shards)} committed shard(s) ({listed}) but no "
                        f"{MANIFEST_NAME}: its manifest was lost. Nothing was deleted. Rebuild it "
                        "from commits/ with `crowstream recover OUT` (crowstream.recover), then "
                        "resume.")


def _uncommitted_layout(out: str, existing: list[str]) -> bool:
    """True when OUT holds only what a crowstream run leaves before its first manifest (or
    an overwrite killed mid-delete): crowstream's own names and part files, nothing else.
    Without a manifest nothing was committed, so starting afresh loses nothing."""
    names = set(existing)
    ours = {"README.md", VOCAB_NAME, DATA_DIR, DOCS_DIR, TMP_DIR, COMMITS_DIR, TOKENIZER_DIR}
    if not names <= ours or not names & {TMP_DIR, DATA_DIR}:
        return False
    card = os.path.join(out, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            if "crowstream" not in f.read():
                return False
    patterns = {DATA_DIR: re.compile(r"module=[^/]+/part-\d{5}-\d{6}(-\d{3,})?\.parquet"),
                DOCS_DIR: re.compile(r"part-\d{5}-\d{6}(-\d{3,})?\.parquet"),
                COMMITS_DIR: re.compile(r"shard-\d{8}\.(json|stats\.parquet)|end\.json|run\.json")}
    for top, pattern in patterns.items():
        for root, _, files in os.walk(os.path.join(out, top)):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), os.path.join(out, top))
                if not pattern.fullmatch(rel.replace(os.sep, "/")):
                    return False
    return True


def create_out(out: str, mode: str) -> None:
    """Make OUT's skeleton. For mode "replace", delete the old output first, its manifest
    last, so an overwrite killed midway is still recognised as a crowstream output."""
    if mode == "replace":
        for name in os.listdir(out):
            if name not in (MANIFEST_NAME, LOCKS_DIR):
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if os.path.exists(manifest_path(out)):
            os.remove(manifest_path(out))
    try:
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
        fsync_dir(out)  # the new directories themselves are durable
    except OSError as error:
        raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") from error


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable(out: str) -> None:
    if not os.access(out, os.W_OK):
        raise OutputError(f"OUT {out!r} is not writable; fix its permissions or choose another OUT.")
