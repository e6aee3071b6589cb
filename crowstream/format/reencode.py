"""Re-encoding an older output (`crowstream.rewrite`; the module is not named `rewrite` so it
cannot shadow the function). It owns `rewrite(out)`: crowstream 0.1 stored float16
vectors with BYTE_STREAM_SPLIT, which DuckDB cannot read; `rewrite` re-writes those part
files with today's settings (plain float16, page checksums, footer metadata) and records
their new sizes and checksums in the manifest. Rows and values do not change.
"""

from __future__ import annotations

import os

from crowstream.errors import VerifyError
from crowstream.format.files import fsync_dir, read_json
from crowstream.format.layout import manifest_path
from crowstream.format.locks import exclusive
from crowstream.format.manifest import read_manifest, write_manifest_json

from .layout import TMP_DIR


def rewrite(out) -> list[str]:
    """Re-encode OUT's float16 part files that use BYTE_STREAM_SPLIT; -> the paths rewritten.

    Holds OUT's lock, so it never runs beside a capture. Each file's sha256 is checked
    against the manifest first (damage is never re-encoded into a "valid" file), and the
    manifest is updated after each file: a crash leaves at most one file for `verify`
    to flag as modified.
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
            writer = PartWriter(os.path.join(out, TMP_DIR, "rewrite.parquet"), schema)
            source = pq.ParquetFile(path, page_checksum_verification=True)
            for group in range(source.num_row_groups):
                for batch in source.read_row_group(group).cast(schema).to_batches():
                    writer.write(batch)
            info = writer.close()
            os.replace(info.tmp_path, path)
            fsync_dir(os.path.dirname(path))
            part["bytes"], part["sha256"] = info.bytes, info.sha256
            write_manifest_json(out, manifest)
            done.append(part["path"])
    return done


def _byte_stream_split(path: str) -> bool:
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    return any("BYTE_STREAM_SPLIT" in metadata.row_group(i).column(3).encodings
               for i in range(metadata.num_row_groups))
