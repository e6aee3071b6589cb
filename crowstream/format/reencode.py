"""Re-encoding an older output (`crowstream.rewrite`; the module is not named `rewrite` so it
cannot shadow the function). It owns `rewrite(out)`: crowstream 0.1 stored float16
vectors with BYTE_STREAM_SPLIT, which DuckDB cannot read; `rewrite` re-writes those part
files with today's settings (plain float16, page checksums, footer metadata) and records
their new sizes and checksums in the manifest. Rows and values do not change.
"""

from __future__ import annotations

import os
import secrets

from crowstream.errors import VerifyError
from crowstream.format.files import dumps, fsync_dir, read_json, write_atomic
from crowstream.format.layout import manifest_path
from crowstream.format.locks import exclusive
from crowstream.format.manifest import read_manifest, write_manifest_json

from .layout import TMP_DIR


def rewrite(out) -> list[str]:
    """Re-encode OUT's float16 part files that use BYTE_STREAM_SPLIT; -> the paths rewritten.

    Holds OUT's lock, so it never runs beside a capture. Each file's sha256 is checked
    against the manifest first (damage is never re-encoded into a "valid" file). Each file
    is re-encoded into `.tmp/`, a journal (`.tmp/rewrite.json`) names it, then it replaces
    the part and the manifest records it: a rewrite killed in between is finished by the
    next `rewrite` (which `verify` then names as the fix).
    """
    import pyarrow.parquet as pq
    from crowstream.schemas import part_schema

    from crowstream.pipeline.parts import PartWriter

    from .files import sha256_file
    from .layout import model_id

    out = os.fspath(out)
    done = []
    with exclusive(out):
        if read_manifest(out).format_version != 1:
            return done  # format 2 never stores float16 with BYTE_STREAM_SPLIT
        manifest = read_json(manifest_path(out))  # format 1 is rewritten in its own shape
        os.makedirs(os.path.join(out, TMP_DIR), exist_ok=True)
        _roll_forward(out, manifest)
        for part in manifest["parts"]:
            spec = manifest["modules"].get(part.get("module"), {})
            path = os.path.join(out, part["path"])
            if spec.get("dtype") != "float16" or not _byte_stream_split(path):
                continue
            if sha256_file(path) != part["sha256"]:
                raise VerifyError(f"{part['path']} does not match its recorded sha256; run "
                                  f"`crowstream verify {out}` before rewriting.", [part["path"]])
            schema = part_schema(part["module"], spec["d"], "float16",
                                 model_id(manifest["config"]["model"]), manifest["format_version"])
            writer = PartWriter(os.path.join(out, TMP_DIR, f"rewrite-{secrets.token_hex(8)}"
                                                           ".parquet"), schema)
            source = pq.ParquetFile(path, page_checksum_verification=True)
            for group in range(source.num_row_groups):
                for batch in source.read_row_group(group).cast(schema).to_batches():
                    writer.write(batch)
            info = writer.close()
            journal = {"path": part["path"], "tmp": os.path.relpath(info.tmp_path, out),
                       "bytes": info.bytes, "sha256": info.sha256}
            write_atomic(out, JOURNAL, dumps(journal).encode())  # before anything changes
            _finish(out, manifest, journal)
            done.append(part["path"])
    return done


JOURNAL = f"{TMP_DIR}/rewrite.json"  # the part being replaced, until the manifest says so


def _finish(out: str, manifest: dict, journal: dict) -> None:
    """Replace the journal's part with its re-encoded file (unless done already), record
    its size and checksum in the manifest, then delete the journal."""
    staged = os.path.join(out, journal["tmp"])
    path = os.path.join(out, journal["path"])
    if os.path.exists(staged):
        os.replace(staged, path)
        fsync_dir(os.path.dirname(path))
    part = next(p for p in manifest["parts"] if p["path"] == journal["path"])
    part["bytes"], part["sha256"] = journal["bytes"], journal["sha256"]
    write_manifest_json(out, manifest)
    os.remove(os.path.join(out, JOURNAL))


def _roll_forward(out: str, manifest: dict) -> None:
    """Finish a rewrite that was killed between replacing a part and the manifest."""
    if os.path.isfile(os.path.join(out, JOURNAL)):
        _finish(out, manifest, read_json(os.path.join(out, JOURNAL)))


def _byte_stream_split(path: str) -> bool:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    return any("BYTE_STREAM_SPLIT" in metadata.row_group(i).column(3).encodings
               for i in range(metadata.num_row_groups))
