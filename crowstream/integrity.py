"""Verification (`crowstream.verify`; the module is not named `verify` so it cannot shadow
the function). It owns `verify(out)`: re-reading every part file the manifest lists and
checking it exists, has the recorded size and sha256, decodes with its page checksums
verified, has the format's schema, footer metadata and the recorded row count; that no
unlisted file sits in `data/` or `docs/`; that the dataset card is the one the manifest
describes; and that the manifest's counts add up. Every finding has its own message.
It also owns `reader_notes`: advice for outputs that some Parquet readers cannot open.
"""

from __future__ import annotations

import hashlib
import os

from crowstream.schemas import docs_schema, part_metadata, row_schema

from . import manifest as mf
from .config import DATA_DIR, DOCS_DIR, VOCAB_NAME
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
    problems += _check_card(out, manifest)
    if not os.path.isfile(os.path.join(out, VOCAB_NAME)):
        problems.append(f"missing: {VOCAB_NAME}")
    if problems:
        raise VerifyError(f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems),
                          problems)
    return {"parts": len(manifest["parts"]), "bytes": sum(p["bytes"] for p in manifest["parts"]),
            "rows": sum(p["rows"] for p in manifest["parts"] if p["kind"] == "module"),
            "notes": reader_notes(out, manifest)}


def reader_notes(out: str, manifest: dict) -> list[str]:
    """Advice for outputs some readers cannot open: float16 part files written by crowstream
    0.1 use BYTE_STREAM_SPLIT, which DuckDB rejects. Reads one footer per module."""
    import pyarrow.parquet as pq

    notes = []
    for module, spec in manifest["modules"].items():
        first = next((p for p in manifest["parts"] if p.get("module") == module), None)
        if spec["dtype"] != "float16" or first is None:
            continue
        try:
            encodings = pq.ParquetFile(os.path.join(out, first["path"])).metadata \
                .row_group(0).column(3).encodings
        except Exception:  # damage is verify's to report, not a note's
            continue
        if "BYTE_STREAM_SPLIT" in encodings:
            notes.append(f"module {module!r} stores float16 with BYTE_STREAM_SPLIT (crowstream 0.1), "
                         f"which DuckDB cannot read; `crowstream rewrite {out}` re-encodes it")
    return notes


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
        parquet = pq.ParquetFile(path, page_checksum_verification=True)
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group)
    except Exception as error:  # any decode failure is damage to report, with its reason
        return [f"unreadable: {rel} is not valid Parquet ({error})"]
    problems = []
    spec = manifest["modules"].get(part.get("module"))
    expected = docs_schema() if part["kind"] == "docs" else row_schema(spec["d"], spec["dtype"])
    if not parquet.schema_arrow.equals(expected):
        problems.append(f"schema mismatch: {rel} has {parquet.schema_arrow}, expected {expected}")
    elif part["kind"] == "module":
        problems += _check_footer(rel, parquet, part["module"], spec, manifest)
    if parquet.metadata.num_rows != part["rows"]:
        problems.append(f"row count mismatch: {rel} has {parquet.metadata.num_rows:,} rows, "
                        f"the manifest records {part['rows']:,}")
    return problems


def _check_footer(rel: str, parquet, module: str, spec: dict, manifest: dict) -> list[str]:
    """Format 2 part files carry their module, d, dtype, format version and model id."""
    from .models import model_id

    if manifest["format_version"] < 2:
        return []  # crowstream 0.1 wrote no footer metadata
    expected = part_metadata(module, spec["d"], spec["dtype"], model_id(manifest["config"]["model"]),
                             manifest["format_version"])
    found = {k.decode(errors="replace"): v.decode(errors="replace")
             for k, v in (parquet.metadata.metadata or {}).items()}
    wrong = [f"{key}={found.get(key)!r} (expected {value!r})"
             for key, value in expected.items() if found.get(key) != value]
    return [f"footer mismatch: {rel} has {', '.join(wrong)}"] if wrong else []


def _check_card(out: str, manifest: dict) -> list[str]:
    """The card's `configs:` are what make `load_dataset(OUT, module)` work."""
    if manifest["format_version"] < 2:
        return []  # 0.1's card text may differ from today's
    path = os.path.join(out, mf.CARD_NAME)
    if not os.path.isfile(path):
        return [f"missing: {mf.CARD_NAME} (the dataset card)"]
    with open(path, "rb") as f:
        if f.read() != mf.card_text(manifest).encode():
            return [f"modified: {mf.CARD_NAME} differs from the dataset card the manifest describes"]
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
