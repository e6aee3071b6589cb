"""Verification (`crowstream.verify`; the module is not named `verify` so it cannot shadow the
function). It owns `verify(out)`: re-reading every committed part file and checking it
exists (or is still in `.tmp/` after a commit cut short), has the recorded size and sha256,
opens as Parquet with the format's schema and the recorded row count; checking each shard's
statistics file (checksum, modules, row counts); that no unlisted file sits in `data/`,
`docs/` or `commits/`; and that a consolidated manifest says what the commit records say.
Every finding has its own message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from crowstream.schemas import docs_schema, row_schema

from . import manifest as mf
from .config import VOCAB_NAME
from .errors import VerifyError


def verify(out) -> dict:
    """Check OUT end to end; -> {"parts": n, "rows": n, "bytes": n} when intact.

    Raises `VerifyError` (its `.problems` lists every finding) on any damage, and
    `ManifestError` when the manifest itself (or a commit record) is missing or damaged.
    """
    out = os.fspath(out)
    manifest = mf.read_manifest(out)
    problems: list[str] = []
    truth = manifest
    if manifest.format_version != 1:
        records = mf.read_records(out, manifest.run_id)
        truth = dataclasses.replace(manifest, shards=records,
                                    counts=mf.Counts.of(records, manifest.modules))
        stats_problems = [p for shard in records for p in _check_stats(out, shard)]
        problems += stats_problems
        if manifest.status != "running":
            problems += _check_consolidation(out, manifest, truth, not stats_problems)
    for part in truth.parts:
        problems += _check_part(out, part, truth)
    problems += [f"extra: {rel} is not listed in the manifest (left by a crash? `--resume` "
                 "removes it)" for rel in mf.unlisted_files(out, truth)]
    problems += _check_counts(manifest if manifest.status != "running" else truth)
    if not os.path.isfile(os.path.join(out, VOCAB_NAME)):
        problems.append(f"missing: {VOCAB_NAME}")
    if problems:
        raise VerifyError(f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems),
                          problems)
    return {"parts": len(truth.parts), "bytes": sum(p.bytes for p in truth.parts),
            "rows": sum(p.rows for p in truth.parts if p.kind == "module")}


def _check_part(out: str, part: mf.Part, manifest: mf.Manifest) -> list[str]:
    import pyarrow.parquet as pq

    rel = part.path
    path = os.path.join(out, rel)
    if not os.path.isfile(path):
        if os.path.isfile(mf.staging_path(out, rel)):
            return [f"pending: {rel} is committed but still in .tmp/ (a commit was cut short; "
                    "`--resume` moves it into place)"]
        return [f"missing: {rel} is listed in the manifest but not on disk"]
    problems = _check_file(out, part, "the manifest records")
    if problems:
        return problems
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {rel} is not valid Parquet ({error})"]
    if part.kind == "docs":
        expected = docs_schema()
    else:
        module = manifest.modules[part.module]
        expected = row_schema(module.d, module.dtype)
    if not parquet.schema_arrow.equals(expected):
        problems.append(f"schema mismatch: {rel} has {parquet.schema_arrow}, expected {expected}")
    if parquet.metadata.num_rows != part.rows:
        problems.append(f"row count mismatch: {rel} has {parquet.metadata.num_rows:,} rows, "
                        f"the manifest records {part.rows:,}")
    return problems


def _check_file(out: str, ref: mf.FileRef, recorded: str) -> list[str]:
    """Size and sha256 of `ref` against what was recorded."""
    rel = ref.path
    size = os.path.getsize(os.path.join(out, rel))
    if size < ref.bytes:
        return [f"truncated: {rel} has {size:,} bytes, {recorded} {ref.bytes:,}"]
    if size > ref.bytes:
        return [f"modified: {rel} has {size:,} bytes, {recorded} {ref.bytes:,}"]
    if _sha256(os.path.join(out, rel)) != ref.sha256:
        return [f"modified: {rel} does not match its recorded sha256"]
    return []


def _check_stats(out: str, shard: mf.ShardRecord) -> list[str]:
    """The shard's statistics file: intact, and counting exactly its parts' rows."""
    ref = shard.stats
    if not os.path.isfile(os.path.join(out, ref.path)):
        return [f"missing: {ref.path} is listed in its commit record but not on disk"]
    problems = _check_file(out, ref, "its commit record records")
    if problems:
        return problems
    try:
        stats = mf.read_stats(out, ref)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {ref.path} is not a valid statistics file ({error})"]
    rows = {p.module: p.rows for p in shard.parts if p.kind == "module"}
    counts = {name: s.count for name, s in stats.items()}
    if counts != rows:
        problems.append(f"stats mismatch: {ref.path} counts rows {counts}, the shard's parts "
                        f"hold {rows}")
    return problems


def _check_consolidation(out: str, manifest: mf.Manifest, truth: mf.Manifest,
                         stats_readable: bool) -> list[str]:
    """A consolidated crowstream.json must say what the commit records say: the same
    shards, and statistics equal to the records' partial statistics merged."""
    problems = []
    listed = [s.to_json() for s in manifest.shards]
    recorded = [s.to_json() for s in truth.shards]
    if listed != recorded:
        differ = [r["index"] for r, m in zip(recorded, listed) if r != m]
        problems.append(f"manifest mismatch: crowstream.json lists {len(listed)} shard(s), the "
                        f"commit records {len(recorded)}"
                        + (f"; shard(s) {differ[:5]} differ" if differ else ""))
    if stats_readable:
        merged = mf.merged_stats(out, truth.shards, truth.modules)
        differ = [name for name, stats in merged.items()
                  if name not in manifest.stats
                  or stats.summary().to_json() != manifest.stats[name].to_json()]
        if differ:
            problems.append(f"manifest mismatch: the statistics of {', '.join(map(repr, differ))} "
                            "in crowstream.json differ from the commit records' merged")
    return problems


def _check_counts(manifest: mf.Manifest) -> list[str]:
    problems = []
    for module, rows in manifest.counts.rows.items():
        total = sum(p.rows for p in manifest.module_parts(module))
        if total != rows:
            problems.append(f"manifest mismatch: module {module!r} counts {rows:,} rows but its "
                            f"parts hold {total:,}")
    docs = sum(p.rows for p in manifest.parts if p.kind == "docs")
    if docs != manifest.counts.docs:
        problems.append(f"manifest mismatch: {manifest.counts.docs:,} documents counted, "
                        f"docs parts hold {docs:,}")
    return problems


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
