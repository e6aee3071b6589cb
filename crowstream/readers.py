"""Readers. It owns getting a capture back out of OUT: `load` (a `datasets.Dataset`, as
`datasets.load_dataset(OUT, module)` gives), `scan`/`vocab`/`docs` (polars LazyFrames for analysis)
and `info` (a summary of the manifest). The training loader (`stream`, `stats`) lives in
`loader.py`. Nothing here imports torch.
"""

from __future__ import annotations

import glob
import os

from . import manifest as mf
from .config import VOCAB_NAME
from .errors import ConfigError


def _module_files(out: str, manifest: dict, module: str) -> list[str]:
    if module not in manifest["modules"]:
        raise ConfigError(f"{out!r} has no module {module!r}; it has "
                          f"{', '.join(map(repr, manifest['modules']))}.")
    return [os.path.join(out, p["path"]) for p in manifest["parts"] if p.get("module") == module]


def load(out, module: str, **kwargs):
    """The rows of one module as a `datasets.Dataset` (doc_id, position, token, vector).

    Identical to `datasets.load_dataset(out, module, split="train")` (for a module input
    `<module>:input`, the config is named `<module>@input`); extra keyword
    arguments go to `load_dataset` (`streaming=True` avoids its Arrow cache copy).
    Use `.with_format("torch")` to get `[B, d]` tensors per batch.
    """
    import datasets

    out = os.fspath(out)
    manifest = mf.read_manifest(out)
    listed = _module_files(out, manifest, module)
    if not manifest["counts"]["rows"][module]:
        raise ConfigError(f"module {module!r} in {out!r} has no rows yet (status "
                          f"{manifest['status']!r}); datasets cannot load an empty split.")
    on_disk = glob.glob(os.path.join(out, mf.module_dir(module), "*.parquet"))
    if sorted(on_disk) != sorted(listed):  # a crash left uncommitted parts: read only listed ones
        return datasets.load_dataset("parquet", data_files=listed, split="train", **kwargs)
    return datasets.load_dataset(out, mf.config_name(module), split="train", **kwargs)


def scan(out):
    """All modules' rows as one `polars.LazyFrame` with a `module` column.

    When every module has the same width the vector is `Array(dtype, d)`; otherwise it
    is a `List` so the frames can be stacked. Join `vocab(out)` on `token` and
    `docs(out)` on `doc_id`.
    """
    import polars as pl

    out = os.fspath(out)
    manifest = mf.read_manifest(out)
    widths = {m["d"] for m in manifest["modules"].values()}
    frames = []
    for module in manifest["modules"]:
        files = _module_files(out, manifest, module)
        if not files:
            continue
        frame = pl.scan_parquet(files).with_columns(pl.lit(module).alias("module"))
        if len(widths) > 1:
            frame = frame.with_columns(pl.col("vector").arr.to_list())
        frames.append(frame.select("module", "doc_id", "position", "token", "vector"))
    if not frames:
        raise ConfigError(f"{out!r} has no committed rows yet.")
    return pl.concat(frames, how="vertical")


def vocab(out):
    """`vocab.parquet` as a LazyFrame: token (int32), text, special (bool)."""
    import polars as pl

    return pl.scan_parquet(os.path.join(os.fspath(out), VOCAB_NAME))


def docs(out):
    """Every committed document as a LazyFrame: doc_id, n_tokens, text (null unless stored)."""
    import polars as pl

    out = os.fspath(out)
    listed = [os.path.join(out, p["path"]) for p in mf.read_manifest(out)["parts"]
              if p["kind"] == "docs"]
    return pl.scan_parquet(listed) if listed else pl.LazyFrame(
        schema={"doc_id": pl.Int64, "n_tokens": pl.Int32, "text": pl.String})


def info(out) -> dict:
    """A summary of OUT's manifest: status, model, modules (d, dtype, rows, bytes, mean
    norm), documents, tokens, shards and bytes on disk."""
    out = os.fspath(out)
    m = mf.read_manifest(out)
    modules = {}
    for name, spec in m["modules"].items():
        parts = [p for p in m["parts"] if p.get("module") == name]
        modules[name] = {"d": spec["d"], "dtype": spec["dtype"], "rows": m["counts"]["rows"][name],
                         "bytes": sum(p["bytes"] for p in parts), "files": len(parts),
                         "mean_norm": m["stats"].get(name, {}).get("mean_norm")}
    return {
        "path": out, "run_id": m["run_id"], "status": m["status"], "error": m.get("error"),
        "model": m["provenance"]["model"].get("name_or_path") or m["provenance"]["model"]["class"],
        "context_size": m["config"]["context_size"], "overflow": m["config"]["overflow"],
        "docs": m["counts"]["docs"], "skipped_docs": m["counts"]["skipped_docs"],
        "tokens_fed": m["counts"]["tokens_fed"], "shards": len(m["shards"]),
        "shard_size": m["shard_size"], "bytes": sum(p["bytes"] for p in m["parts"]),
        "modules": modules, "created": m["created"], "updated": m["updated"],
    }
