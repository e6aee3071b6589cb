"""Verification (`crowstream.verify`; the module is not named `verify` so it cannot shadow the function). It owns `verify(out)`: re-reading every part file the manifest lists and
checking it exists, has the recorded size and sha256, opens as Parquet with the format's
schema and the recorded row count (docs parts: each `tokens` list holds `n_tokens` ids);
that `tokenizer/` loads (format 2); that no unlisted file sits in `data/` or `docs/`; and
that the manifest's counts add up. Every finding has its own message.
"""

from __future__ import annotations

import hashlib
import os

from crowstream.schemas import docs_schema, row_schema

from . import manifest as mf
from .config import DATA_DIR, DOCS_DIR, TOKENIZER_DIR, VOCAB_NAME
from .errors import VerifyError


def verify(out) -> dict:
    """Check OUT end to end; -> {"parts": n, "rows": n, "bytes": n} when intact.

    Raises `VerifyError` (its `.problems` lists every finding) on any damage, and
    `ManifestError` when the manifest itself is missing or damaged.
    """
    out = os.fspath(out)
    manifest = mf.read_manifest(out)
    problems: list[str] = []
    for part in manifest["parts"]:
        problems += _check_part(out, part, manifest)
    problems += _check_unlisted(out, manifest)
    problems += _check_counts(manifest)
    if not os.path.isfile(os.path.join(out, VOCAB_NAME)):
        problems.append(f"missing: {VOCAB_NAME}")
    elif manifest["format_version"] >= 2:
        problems += _check_tokenizer(out)
    if problems:
        raise VerifyError(f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems),
                          problems)
    return {"parts": len(manifest["parts"]), "bytes": sum(p["bytes"] for p in manifest["parts"]),
            "rows": sum(p["rows"] for p in manifest["parts"] if p["kind"] == "module")}


def _check_part(out: str, part: dict, manifest: dict) -> list[str]:
    import pyarrow.parquet as pq

    rel = part["path"]
    path = os.path.join(out, rel)
    if not os.path.isfile(path):
        return [f"missing: {rel} is listed in the manifest but not on disk"]
    size = os.path.getsize(path)
    if size < part["bytes"]:
        return [f"truncated: {rel} has {size:,} bytes, the manifest records {part['bytes']:,}"]
    if size > part["bytes"]:
        return [f"modified: {rel} has {size:,} bytes, the manifest records {part['bytes']:,}"]
    if _sha256(path) != part["sha256"]:
        return [f"modified: {rel} does not match its recorded sha256"]
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {rel} is not valid Parquet ({error})"]
    expected = (docs_schema(manifest["format_version"]) if part["kind"] == "docs" else
                row_schema(manifest["modules"][part["module"]]["d"],
                           manifest["modules"][part["module"]]["dtype"]))
    problems = []
    if not parquet.schema_arrow.equals(expected):
        problems.append(f"schema mismatch: {rel} has {parquet.schema_arrow}, expected {expected}")
    if parquet.metadata.num_rows != part["rows"]:
        problems.append(f"row count mismatch: {rel} has {parquet.metadata.num_rows:,} rows, "
                        f"the manifest records {part['rows']:,}")
    if not problems and part["kind"] == "docs" and "tokens" in expected.names:
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
        from transformers import AutoTokenizer

        size = len(AutoTokenizer.from_pretrained(path, local_files_only=True))
    except Exception as error:  # any load failure is damage to report, with its reason
        return [f"unreadable: {TOKENIZER_DIR}/ does not load as a tokenizer ({error})"]
    listed = pq.ParquetFile(os.path.join(out, VOCAB_NAME)).metadata.num_rows
    if size != listed:
        return [f"tokenizer mismatch: {TOKENIZER_DIR}/ has {size:,} tokens, "
                f"{VOCAB_NAME} lists {listed:,}"]
    return []


def _check_unlisted(out: str, manifest: dict) -> list[str]:
    listed = {p["path"] for p in manifest["parts"]}
    problems = []
    for top in (DATA_DIR, DOCS_DIR):
        for root, _, files in os.walk(os.path.join(out, top)):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(root, name), out).replace(os.sep, "/")
                if rel not in listed:
                    problems.append(f"extra: {rel} is not listed in the manifest "
                                    "(left by a crash? `--resume` removes it)")
    return problems


def _check_counts(manifest: dict) -> list[str]:
    problems = []
    for module, rows in manifest["counts"]["rows"].items():
        total = sum(p["rows"] for p in manifest["parts"] if p.get("module") == module)
        if total != rows:
            problems.append(f"manifest mismatch: module {module!r} counts {rows:,} rows but its "
                            f"parts hold {total:,}")
    docs = sum(p["rows"] for p in manifest["parts"] if p["kind"] == "docs")
    if docs != manifest["counts"]["docs"]:
        problems.append(f"manifest mismatch: {manifest['counts']['docs']:,} documents counted, "
                        f"docs parts hold {docs:,}")
    return problems


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()
