"""The manifest and the output directory. It owns `crowstream.json` (created, updated and
read atomically: temp file, fsync, `os.replace`, fsync the directory), the dataset card
`README.md` whose YAML `configs:` make `datasets.load_dataset(OUT, module)` work, and the
layout rules: which files belong in OUT, preparing OUT for a fresh run, and cleaning up
what a crashed run left behind before a resume.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil

from crowstream.schemas import validate_manifest

from .config import (DATA_DIR, DOCS_DIR, FORMAT_VERSION, MANIFEST_NAME, TMP_DIR,
                     TOKENIZER_DIR, VOCAB_NAME)
from .errors import ManifestError, OutputError, OutputExistsError


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_manifest(run_id: str, config: dict, shard_size: int, provenance: dict,
                 modules: dict) -> dict:
    return {
        "format": "crowstream", "format_version": FORMAT_VERSION, "run_id": run_id,
        "status": "running", "error": None, "created": now(), "updated": now(),
        "config": config, "shard_size": shard_size, "provenance": provenance,
        "modules": modules, "shards": [], "parts": [],
        "counts": {"docs": 0, "skipped_docs": 0, "tokens_fed": 0,
                   "rows": {name: 0 for name in modules}},
        "stats": {},
    }


def manifest_path(out: str) -> str:
    return os.path.join(out, MANIFEST_NAME)


def read_manifest(out: str) -> dict:
    """Parse and validate OUT/crowstream.json; a damaged manifest is explained, never fixed."""
    path = manifest_path(out)
    if not os.path.isfile(path):
        raise ManifestError(f"{out!r} has no {MANIFEST_NAME}: it is not a crowstream output "
                            "(or the run never started).")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is damaged ({error}); it was left as it is. Restore it from "
                            "a backup or capture again into a new OUT.") from error
    problems = validate_manifest(manifest) if isinstance(manifest, dict) else ["not a JSON object"]
    if problems:
        raise ManifestError(f"{path} does not match the manifest schema: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                            + ". It was left as it is.")
    return manifest


def write_manifest(out: str, manifest: dict) -> None:
    manifest["updated"] = now()
    tmp = os.path.join(out, TMP_DIR, MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, manifest_path(out))
    fsync_dir(out)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_name(rank: int, shard: int) -> str:
    return f"part-{rank:05d}-{shard:06d}.parquet"


def module_dir(module: str) -> str:
    return f"{DATA_DIR}/module={module}"


def inspect_out(out: str, *, overwrite: bool, resume: bool) -> str:
    """Decide what to do with OUT, changing nothing: -> "fresh", "resume" or "replace".

    Refuses a file and a non-empty directory unless `resume` (which needs a manifest)
    or `overwrite` (which only ever deletes a crowstream output).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"OUT {out!r} is a file, not a directory; choose another path.")
    existing = os.listdir(out) if os.path.isdir(out) else []
    if not existing:
        parent = os.path.dirname(os.path.abspath(out))
        _check_writable(out if os.path.isdir(out) else _existing_ancestor(parent))
        return "fresh"
    _check_writable(out)
    if resume and MANIFEST_NAME in existing:
        return "resume"
    if overwrite and MANIFEST_NAME in existing:
        return "replace"
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


def _uncommitted_layout(out: str, existing: list[str]) -> bool:
    """True when OUT holds only what a crowstream run leaves before its first manifest (or
    an overwrite killed mid-delete): crowstream's own names and part files, nothing else.
    Without a manifest nothing was committed, so starting afresh loses nothing."""
    names = set(existing)
    if not names <= {"README.md", VOCAB_NAME, TOKENIZER_DIR, DATA_DIR, DOCS_DIR, TMP_DIR} or not names & {TMP_DIR, DATA_DIR}:
        return False
    card = os.path.join(out, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            if "crowstream" not in f.read():
                return False
    patterns = {DATA_DIR: re.compile(r"module=[^/]+/part-\d{5}-\d{6}\.parquet"),
                DOCS_DIR: re.compile(r"part-\d{5}-\d{6}\.parquet")}
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
            if name != MANIFEST_NAME:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if os.path.exists(manifest_path(out)):
            os.remove(manifest_path(out))
    try:
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") from error


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


@contextlib.contextmanager
def exclusive(out: str):
    """Hold an advisory lock on the OUT directory for a run, so two captures never write
    (or clean up, or overwrite) the same OUT at once. Released when the process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise OutputError(f"another crowstream process is writing to {out!r}; let it finish "
                              "(or stop it) before resuming or overwriting.") from error
        yield
    finally:
        os.close(fd)


def _check_writable(out: str) -> None:
    if not os.access(out, os.W_OK):
        raise OutputError(f"OUT {out!r} is not writable; fix its permissions or choose another OUT.")


def damaged_parts(out: str, manifest: dict) -> list[str]:
    """Listed part files that are missing or not of their recorded size (cheap check)."""
    return [p["path"] for p in manifest["parts"]
            if not os.path.isfile(os.path.join(out, p["path"]))
            or os.path.getsize(os.path.join(out, p["path"])) != p["bytes"]]


def clean_for_resume(out: str, manifest: dict) -> list[str]:
    """Delete `.tmp/` leftovers and any part file the manifest does not list; -> removed."""
    listed = {part["path"] for part in manifest["parts"]}
    removed = []
    tmp = os.path.join(out, TMP_DIR)
    if os.path.isdir(tmp):
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
            removed.append(f"{TMP_DIR}/{name}")
    for top in (DATA_DIR, DOCS_DIR):
        for root, _, files in os.walk(os.path.join(out, top)):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), out).replace(os.sep, "/")
                if rel not in listed:
                    os.remove(os.path.join(out, rel))
                    removed.append(rel)
    for sub in (TMP_DIR, DATA_DIR, DOCS_DIR):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    return removed


def write_card(out: str, manifest: dict) -> None:
    """OUT/README.md: a dataset card with one `configs:` entry per module, docs and vocab."""
    lines = ["---", "configs:"]
    for name in manifest["modules"]:
        lines += [f"- config_name: {json.dumps(name)}", "  data_files:", "  - split: train",
                  f"    path: {json.dumps(module_dir(name) + '/*.parquet')}"]
    lines += ["- config_name: docs", "  data_files:", "  - split: train", f"    path: {DOCS_DIR}/*.parquet",
              "- config_name: vocab", "  data_files:", "  - split: train", f"    path: {VOCAB_NAME}",
              "tags:", "- activations", "- interpretability", "- crowstream", "---", ""]
    config = manifest["config"]
    model = manifest["provenance"]["model"]
    lines += [
        "# Activation dataset", "",
        f"Written by crowstream from model `{model.get('name_or_path') or model.get('class')}` "
        f"(context {config['context_size']}, {config['dtype']}).", "",
        "| module | d | path |", "|---|---|---|",
        *[f"| `{n}` | {m['d']} | `{m['path']}/` |" for n, m in manifest["modules"].items()], "",
        "Each row is one token: `doc_id` (row index in the source), `position` (token index in "
        "the document), `token` (id; join `vocab.parquet`), `vector` (the module output).", "",
        "```python", "import datasets",
        f"ds = datasets.load_dataset(OUT, {json.dumps(next(iter(manifest['modules'])))}, split=\"train\")",
        "```", "", "`crowstream.json` lists every committed part file with its checksum and the "
        "per-module statistics (count, mean, var, mean_norm).", "",
    ]
    path = os.path.join(out, "README.md")
    tmp = os.path.join(out, TMP_DIR, "README.md.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
