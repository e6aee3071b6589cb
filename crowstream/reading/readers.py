"""Readers. It owns getting a capture back out of OUT: `load` (a `datasets.Dataset`, as
`datasets.load_dataset(OUT, module)` gives), `scan`/`vocab`/`docs` (polars LazyFrames for
analysis) and `info` (a summary of the manifest). Every reader sees the committed state
(the catalog), also of a run in progress or cut short by a crash. The training
loader (`stream`, `stats`) lives in `loader.py`. Nothing here imports torch.
"""

from __future__ import annotations

import os
import secrets

from crowstream.errors import ConfigError
from crowstream.format.layout import VOCAB_NAME
from crowstream.reading.catalog import Catalog


def load(out, module: str, *, storage_options: dict | None = None, **kwargs):
    """The rows of one module as a `datasets.Dataset` (doc_id, position, token, vector).

    The same rows and features as `datasets.load_dataset(out, module, split="train")`,
    read from the manifest's committed part files with Parquet page checksums verified.
    Unlike that call, its Arrow cache is keyed by the files' paths and modification
    times: `datasets` keys a directory's cache by its name and the config name only, so
    two OUTs with the same name, or a capture redone in the same OUT, would share a
    stale cache. Extra keyword arguments go to `load_dataset` (`streaming=True` avoids
    the cache copy). Use `.with_format("torch")` to get `[B, d]` tensors per batch.
    A module's input is named `<module>:input` (its card config is `<module>@input`).
    `out` may be a URL (`s3://bucket/run`) with fsspec `storage_options`: its parts are
    downloaded once into `cache_dir` (default: datasets' cache) under their sha256, as
    `datasets` would download them, which also works with HF_HUB_OFFLINE=1 set.
    """
    import datasets
    import pyarrow.dataset as pds

    catalog = Catalog(out, storage_options)
    files = catalog.module(module)
    parts = catalog.manifest.module_parts(module)
    listed = [catalog.url(p.path) for p in parts]
    if catalog.remote and not kwargs.get("streaming"):
        listed = _cached_parts(catalog, parts, kwargs.get("cache_dir"))  # works offline too
    elif storage_options is not None:
        kwargs["storage_options"] = dict(storage_options)  # datasets adds keys to it
    if not files.total_rows:
        raise ConfigError(f"module {module!r} in {catalog.shown!r} has no rows yet (status "
                          f"{catalog.manifest.status!r}); datasets cannot load an empty split.")
    kwargs.setdefault("fragment_scan_options",
                      pds.ParquetFragmentScanOptions(page_checksum_verification=True))
    return datasets.load_dataset("parquet", data_files=listed, split="train", **kwargs)


def _cached_parts(catalog: Catalog, parts, cache_dir: str | None) -> list[str]:
    """Local copies of a bucket OUT's `parts`, named by their recorded sha256 (so a copy
    can never be stale) under `cache_dir` (default: datasets' cache). `datasets` would
    download them too, but refuses every remote URL while HF_HUB_OFFLINE=1 is set, and
    reading one's own bucket is not Hub access."""
    import datasets

    from crowstream.errors import DataError
    from crowstream.format.files import sha256_file

    folder = os.path.join(cache_dir or datasets.config.HF_DATASETS_CACHE, "crowstream-parts")
    os.makedirs(folder, exist_ok=True)
    local = []
    for part in parts:
        path = os.path.join(folder, f"{part.sha256}.parquet")
        if not os.path.isfile(path):
            tmp = f"{path}.{secrets.token_hex(8)}.tmp"
            try:
                catalog.download_file(part.path, tmp)
                if sha256_file(tmp) != part.sha256:
                    raise DataError(f"{catalog.shown}/{part.path} does not match its recorded "
                                    "sha256: it was changed after the capture. Run `crowstream "
                                    "verify OUT`.")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        local.append(path)
    return local


def _scan(catalog: Catalog, paths):
    """A polars LazyFrame over Parquet files (`catalog.locate`d `paths`), read by pyarrow
    with page checksums verified: polars' own reader does not check them, and zstd decodes
    most flipped bytes into wrong floats without any error (measured: 39 of 40 flips). As
    fast here."""
    import polars as pl
    import pyarrow.dataset as pds

    checked = pds.ParquetFileFormat(default_fragment_scan_options=pds.ParquetFragmentScanOptions(
        page_checksum_verification=True))
    return pl.scan_pyarrow_dataset(pds.dataset(list(paths), format=checked,
                                               filesystem=catalog.filesystem))


def scan(out, *, storage_options: dict | None = None):
    """All modules' rows as one `polars.LazyFrame` with a `module` column (`out` may be a
    URL, with fsspec `storage_options`).

    When every module has the same width the vector is `Array(dtype, d)`; otherwise it
    is a `List` so the frames can be stacked. Join `vocab(out)` on `token` and
    `docs(out)` on `doc_id`.
    """
    import polars as pl

    catalog = Catalog(out, storage_options)
    widths = {m.d for m in catalog.modules.values()}
    frames = []
    for module in catalog.modules:
        files = catalog.module(module)
        if not files.paths:
            continue
        frame = _scan(catalog, files.paths).with_columns(pl.lit(module).alias("module"))
        if len(widths) > 1:
            frame = frame.with_columns(pl.col("vector").arr.to_list())
        frames.append(frame.select("module", "doc_id", "position", "token", "vector"))
    if not frames:
        raise ConfigError(f"{catalog.shown!r} has no committed rows yet.")
    return pl.concat(frames, how="vertical")


def vocab(out, *, storage_options: dict | None = None):
    """`vocab.parquet` as a LazyFrame: token (int32), text, special (bool). `out`: a path, a
    URL with fsspec `storage_options`, or a `Catalog`."""
    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options)
    return _scan(catalog, [catalog.locate(VOCAB_NAME)])


def docs(out, *, storage_options: dict | None = None):
    """Every committed document as a LazyFrame: doc_id, n_tokens, text (null unless stored).
    `out`: a path, a URL with fsspec `storage_options`, or a `Catalog`."""
    import polars as pl

    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options)
    listed = [catalog.locate(p.path) for p in catalog.docs_parts()]
    return _scan(catalog, listed) if listed else pl.LazyFrame(
        schema={"doc_id": pl.Int64, "n_tokens": pl.Int32, "text": pl.String})


def info(out, *, storage_options: dict | None = None) -> dict:
    """A summary of OUT's manifest: status, model, modules (d, dtype, rows, bytes, mean
    norm), documents, tokens, shards, bytes on disk, and `notes` (advice such as how to
    make an old float16 output DuckDB-readable) and `partly_visible` (shards of which a
    glob over `data/` would read some part files but not all; crowstream's readers and the
    card never do). `out`: a path, a URL with fsspec `storage_options`, or a `Catalog`
    built with `stats=True`."""
    from crowstream.format.integrity import reader_notes
    from crowstream.format.recovery import partly_visible

    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options, stats=True)
    m, remote = catalog.manifest, catalog.remote
    modules = {}
    for name, spec in m.modules.items():
        parts = m.module_parts(name)
        stats = m.stats.get(name)
        modules[name] = {"d": spec.d, "dtype": spec.dtype, "rows": m.counts.rows.get(name, 0),
                         "bytes": sum(p.bytes for p in parts), "files": len(parts),
                         "mean_norm": stats.mean_norm if stats else None,
                         "nonfinite": stats.nonfinite if stats else 0}
    return {
        "path": catalog.shown, "run_id": m.run_id, "status": m.status, "error": m.error,
        "format_version": m.format_version,
        "model": m.provenance["model"].get("name_or_path") or m.provenance["model"]["class"],
        "context_size": m.config["context_size"], "overflow": m.config["overflow"],
        "docs": m.counts.docs, "skipped_docs": m.counts.skipped_docs,
        "tokens_fed": m.counts.tokens_fed, "shards": len(m.shards),
        "shard_size": m.shard_size, "bytes": sum(p.bytes for p in m.parts),
        "modules": modules, "created": m.created, "updated": m.updated,
        "notes": [] if remote else reader_notes(catalog.out, m),
        "partly_visible": partly_visible(m, catalog.visible_files()),
    }
