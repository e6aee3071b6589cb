"""Verification (`crowstream.verify`; the module is not named `verify` so it cannot shadow the
function). It owns `verify(out)`: re-reading every committed part file and checking it
exists (or is still in `.tmp/` after a commit cut short), has the recorded size and sha256,
decodes with its page checksums verified, has the format's schema, footer metadata and the
recorded row count; checking each shard's statistics file (checksum, modules, row counts);
that no unlisted file sits in `data/`, `docs/` or `commits/`; that the dataset card is the
one the manifest describes; and that a consolidated manifest says what the commit records
say; docs parts' `tokens` lists hold `n_tokens` ids and `tokenizer/` loads (format 2).
Every finding has its own message. It also owns `reader_notes`: advice for outputs
that some Parquet readers cannot open.
"""

from __future__ import annotations

import dataclasses
import os

from crowstream.errors import VerifyError
from crowstream.format.card import card_files, card_text
from crowstream.format.layout import CARD_NAME, staging_path
from crowstream.format.manifest import (
    Counts,
    FileRef,
    Manifest,
    Part,
    ShardRecord,
    read_manifest,
)
from crowstream.format.records import committed, read_records
from crowstream.format.recovery import partly_visible, unlisted_files, visible_files
from crowstream.format.statistics import merge_partials, read_stats
from crowstream.schemas import docs_schema, part_metadata, row_schema

from .files import sha256_file
from .layout import TOKENIZER_DIR, VOCAB_NAME


def verify(out, *, storage_options: dict | None = None) -> dict:
    """Check OUT end to end; -> {"parts": n, "rows": n, "bytes": n} when intact.

    `out` may be a URL (`s3://bucket/run`, with fsspec `storage_options`): its listed
    objects are downloaded to a temporary directory and checked there (so it needs local
    disk for one copy of the output), and any object under `data/` or `docs/` that no
    record lists is reported as extra.

    Raises `VerifyError` (its `.problems` lists every finding) on any damage, and
    `ManifestError` when the manifest itself (or a commit record) is missing or damaged.
    """
    out = os.fspath(out)
    from . import storage

    if storage.is_url(out):
        return _verify_remote(out, storage_options)
    manifest = read_manifest(out)
    problems: list[str] = []
    truth = manifest
    if manifest.format_version != 1:
        records = read_records(out, manifest.run_id)
        truth = dataclasses.replace(manifest, shards=records,
                                    counts=Counts.of(records, manifest.modules))
        checked = [_check_stats(out, shard) for shard in records]  # (problems, partial)
        problems += [p for found, _ in checked for p in found]
        if manifest.status != "running":
            partials = [partial for _, partial in checked]
            readable = all(partial is not None for partial in partials)
            problems += _check_consolidation(manifest, truth, partials if readable else None)
    for part in truth.parts:
        problems += _check_part(out, part, truth)
    problems += [f"extra: {rel} is not listed in the manifest (left by a crash? `--resume` "
                 "removes it)" for rel in unlisted_files(out, truth)]
    problems += partly_visible(truth, visible_files(out))
    problems += _check_counts(manifest if manifest.status != "running" else truth)
    problems += _check_card(out, manifest, truth)
    if not os.path.isfile(os.path.join(out, VOCAB_NAME)):
        problems.append(f"missing: {VOCAB_NAME}")
    elif manifest.format_version >= 2:
        problems += _check_tokenizer(out)
    if problems:
        raise VerifyError(f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems),
                          problems)
    return {"parts": len(truth.parts), "bytes": sum(p.bytes for p in truth.parts),
            "rows": sum(p.rows for p in truth.parts if p.kind == "module"),
            "notes": reader_notes(out, truth)}


def _verify_remote(url: str, storage_options: dict | None) -> dict:
    import tempfile

    from . import storage

    with tempfile.TemporaryDirectory(prefix="crowstream-verify-") as local:
        objects = storage.local_copy(url, storage_options, local, parts=True)
        truth = committed(local, stats=False)
        listed = {p.path for p in truth.parts}
        extra = [f"extra: {rel} is not listed in the manifest (uploaded by a run that did not "
                 "commit it? `--resume` removes it)" for rel in sorted(objects)
                 if rel.startswith(("data/", "docs/")) and rel not in listed]
        extra += partly_visible(truth, [r for r in objects if r.startswith(("data/", "docs/"))])
        try:
            found = verify(local)
            problems = []
        except VerifyError as error:
            found, problems = None, list(error.problems)
        problems = list(dict.fromkeys(p.replace(local, storage.public(url))
                                      for p in problems + extra))
    if problems:
        raise VerifyError(f"{storage.public(url)!r} is damaged: {len(problems)} problem(s): "
                          + "; ".join(problems), problems)
    return found


def reader_notes(out: str, manifest: Manifest) -> list[str]:
    """Advice for outputs some readers cannot open: float16 part files written by crowstream
    0.1 use BYTE_STREAM_SPLIT, which DuckDB rejects. Reads one footer per module."""
    import pyarrow.parquet as pq

    notes = []
    for module, spec in manifest.modules.items():
        first = next(iter(manifest.module_parts(module)), None)
        if spec.dtype != "float16" or first is None:
            continue
        try:
            encodings = pq.ParquetFile(os.path.join(out, first.path)).metadata \
                .row_group(0).column(3).encodings
        except Exception:  # damage is verify's to report, not a note's
            continue
        if "BYTE_STREAM_SPLIT" in encodings:
            notes.append(f"module {module!r} stores float16 with BYTE_STREAM_SPLIT (crowstream 0.1), "
                         f"which DuckDB cannot read; `crowstream rewrite {out}` re-encodes it")
    return notes


def _check_part(out: str, part: Part, manifest: Manifest) -> list[str]:
    import pyarrow.parquet as pq

    rel = part.path
    path = os.path.join(out, rel)
    if not os.path.isfile(path):
        if os.path.isfile(staging_path(out, rel)):
            return [f"pending: {rel} is committed but still in .tmp/ (a commit was cut short; "
                    "`--resume` moves it into place)"]
        return [f"missing: {rel} is listed in the manifest but not on disk"]
    problems = _check_file(out, part, "the manifest records")
    if problems:
        return problems
    try:
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {rel} is not valid Parquet ({error})"]
    if part.kind == "docs":
        expected = docs_schema(manifest.format_version)
    else:
        module = manifest.modules[part.module]
        expected = row_schema(module.d, module.dtype)
    if not parquet.schema_arrow.equals(expected):
        problems.append(f"schema mismatch: {rel} has {parquet.schema_arrow}, expected {expected}")
    elif part.kind == "module":
        problems += _check_footer(rel, parquet, part.module, manifest)
    if parquet.metadata.num_rows != part.rows:
        problems.append(f"row count mismatch: {rel} has {parquet.metadata.num_rows:,} rows, "
                        f"the manifest records {part.rows:,}")
    if not problems and part.kind == "docs" and "tokens" in expected.names:
        problems += _check_doc_tokens(rel, parquet)
    return problems


def _check_doc_tokens(rel: str, parquet) -> list[str]:
    """Each document's `tokens` list holds exactly `n_tokens` ids."""
    import pyarrow.compute as pc

    table = parquet.read(columns=["doc_id", "n_tokens", "tokens"])
    lengths = pc.list_value_length(table["tokens"])
    wrong = pc.not_equal(lengths, pc.cast(table["n_tokens"], lengths.type))
    if not pc.any(wrong).as_py():
        return []
    first = table.filter(wrong).slice(0, 1).to_pylist()[0]
    return [f"tokens mismatch: {rel} has {pc.sum(wrong).as_py():,} document(s) whose tokens "
            f"length differs from n_tokens (doc_id {first['doc_id']}: {len(first['tokens'])} "
            f"ids, n_tokens {first['n_tokens']})"]


def _check_tokenizer(out: str) -> list[str]:
    """OUT/tokenizer/ loads offline and knows as many tokens as vocab.parquet lists."""
    import pyarrow.parquet as pq

    path = os.path.join(out, TOKENIZER_DIR)
    if not os.path.isdir(path):
        return [f"missing: {TOKENIZER_DIR}/ (the saved tokenizer)"]
    try:
        size = _tokenizer_size(path)
    except Exception as error:  # any load failure is damage to report, with its reason
        return [f"unreadable: {TOKENIZER_DIR}/ does not load as a tokenizer ({error})"]
    listed = pq.ParquetFile(os.path.join(out, VOCAB_NAME)).metadata.num_rows
    if size != listed:
        return [f"tokenizer mismatch: {TOKENIZER_DIR}/ has {size:,} tokens, "
                f"{VOCAB_NAME} lists {listed:,}"]
    return []


def _tokenizer_size(path: str) -> int:
    """len() of the saved tokenizer. A fast tokenizer's tokenizer.json is read with
    `tokenizers` (what transformers' fast tokenizers count with), so `verify` does not
    import transformers and torch (~5 s); its tokenizer_config.json must parse too."""
    import json

    single = os.path.join(path, "tokenizer.json")
    if not os.path.exists(single):
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(path, local_files_only=True))
    import tokenizers

    config = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            json.load(f)
    return tokenizers.Tokenizer.from_file(single).get_vocab_size(with_added_tokens=True)


def _check_file(out: str, ref: FileRef, recorded: str) -> list[str]:
    """Size and sha256 of `ref` against what was recorded."""
    rel = ref.path
    size = os.path.getsize(os.path.join(out, rel))
    if size < ref.bytes:
        return [f"truncated: {rel} has {size:,} bytes, {recorded} {ref.bytes:,}"]
    if size > ref.bytes:
        return [f"modified: {rel} has {size:,} bytes, {recorded} {ref.bytes:,}"]
    if sha256_file(os.path.join(out, rel)) != ref.sha256:
        return [f"modified: {rel} does not match its recorded sha256"]
    return []


def _check_stats(out: str, shard: ShardRecord) -> tuple[list[str], dict | None]:
    """The shard's statistics file: intact, and counting exactly its parts' rows.
    -> (problems, its partial statistics, or None when they cannot be read)."""
    ref = shard.stats
    if not os.path.isfile(os.path.join(out, ref.path)):
        return [f"missing: {ref.path} is listed in its commit record but not on disk"], None
    problems = _check_file(out, ref, "its commit record records")
    if problems:
        return problems, None
    try:
        stats = read_stats(out, ref)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {ref.path} is not a valid statistics file ({error})"], None
    rows = Counts.of([shard], {}).rows  # only the modules the shard has parts of
    counts = {name: s.count for name, s in stats.items()}
    if counts != rows:
        problems.append(f"stats mismatch: {ref.path} counts rows {counts}, the shard's parts "
                        f"hold {rows}")
    return problems, stats


def _check_footer(rel: str, parquet, module: str, manifest: Manifest) -> list[str]:
    """Format 2 part files carry their module, d, dtype, format version and model id."""
    from .layout import model_id

    if manifest.format_version < 2:
        return []  # crowstream 0.1 wrote no footer metadata
    spec = manifest.modules[module]
    expected = part_metadata(module, spec.d, spec.dtype, model_id(manifest.config["model"]),
                             manifest.format_version)
    found = {k.decode(errors="replace"): v.decode(errors="replace")
             for k, v in (parquet.metadata.metadata or {}).items()}
    wrong = [f"{key}={found.get(key)!r} (expected {value!r})"
             for key, value in expected.items() if found.get(key) != value]
    return [f"footer mismatch: {rel} has {', '.join(wrong)}"] if wrong else []


def _check_card(out: str, manifest: Manifest, truth: Manifest) -> list[str]:
    """The card's `configs:` are what make `load_dataset(OUT, module)` work: a consolidated
    run's card lists exactly its committed parts; a running run's, those of the committed
    shards it was last consolidated with (`truth`: the commit records)."""
    if manifest.format_version < 2:
        return []  # 0.1's card text may differ from today's
    path = os.path.join(out, CARD_NAME)
    if not os.path.isfile(path):
        return [f"missing: {CARD_NAME} (the dataset card)"]
    with open(path, "rb") as f:
        text = f.read()
    described = manifest
    if manifest.status == "running" and manifest.format_version >= 3:
        listed = card_files(text.decode(errors="replace"))
        described = dataclasses.replace(truth, shards=[
            s for s in truth.shards if all(p.path in listed for p in s.parts)])
    if text != card_text(described).encode():
        return [f"modified: {CARD_NAME} differs from the dataset card the manifest describes"]
    return []


def _check_consolidation(manifest: Manifest, truth: Manifest, partials) -> list[str]:
    """A consolidated crowstream.json must say what the commit records say: the same
    shards, and statistics equal to the records' `partials` merged (None: unreadable)."""
    problems = []
    listed = [s.to_json() for s in manifest.shards]
    recorded = [s.to_json() for s in truth.shards]
    if listed != recorded:
        differ = [r["index"] for r, m in zip(recorded, listed) if r != m]
        problems.append(f"manifest mismatch: crowstream.json lists {len(listed)} shard(s), the "
                        f"commit records {len(recorded)}"
                        + (f"; shard(s) {differ[:5]} differ" if differ else ""))
    if partials is not None:
        merged = merge_partials(partials, truth.modules)
        differ = [name for name, stats in merged.items()
                  if name not in manifest.stats
                  or stats.summary().to_json() != manifest.stats[name].to_json()]
        if differ:
            problems.append(f"manifest mismatch: the statistics of {', '.join(map(repr, differ))} "
                            "in crowstream.json differ from the commit records' merged")
    return problems


def _check_counts(manifest: Manifest) -> list[str]:
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
