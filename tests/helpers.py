"""Helpers the reliability tests share: reading an OUT back row by row and comparing two."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq

from crowstream.format.files import sha256_file
from crowstream.format.manifest import Manifest
from crowstream.format.records import committed


def manifest_of(out) -> Manifest:
    """The committed state of OUT (crowstream.json consolidated with the commit records)."""
    return committed(out)


def raw_manifest(out) -> dict:
    """crowstream.json itself, as JSON."""
    with open(os.path.join(out, "crowstream.json")) as f:
        return json.load(f)


def save_manifest(out, manifest) -> None:
    """Write `manifest` as crowstream would (digest re-stamped): for tests that set up a
    state by editing the manifest, not for tests of hand edits."""
    from crowstream.format.manifest import manifest_digest

    manifest = {**manifest, "digest": None}
    manifest["digest"] = manifest_digest(manifest)
    with open(os.path.join(out, "crowstream.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def parts_of(out) -> list:
    return [(p.path, p.rows, p.sha256) for p in manifest_of(out).parts]


def tree(path) -> dict:
    """relative path -> bytes of every file under `path` (directories map to None)."""
    found = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            found[os.path.relpath(os.path.join(root, d), path)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                found[os.path.relpath(os.path.join(root, f), path)] = fh.read()
    return found


def read_rows(out) -> dict:
    """From the part files the manifest lists: {module: (doc_id, position, token, vector)}
    sorted by (doc_id, position), and "docs": (doc_id, n_tokens, text) sorted by doc_id."""
    manifest = manifest_of(out)
    rows = {}
    for name, spec in manifest.modules.items():
        paths = sorted(p.path for p in manifest.module_parts(name))
        tables = [pq.read_table(os.path.join(out, p)) for p in paths]
        cols = [np.concatenate([t[c].to_numpy() for t in tables]) for c in ("doc_id", "position", "token")]
        vector = np.concatenate([t["vector"].combine_chunks().values.to_numpy().reshape(-1, spec.d)
                                 for t in tables])
        order = np.lexsort((cols[1], cols[0]))
        rows[name] = (*(c[order] for c in cols), vector[order])
    paths = sorted(p.path for p in manifest.parts if p.kind == "docs")
    docs = [pq.read_table(os.path.join(out, p)) for p in paths]
    doc_ids = np.concatenate([t["doc_id"].to_numpy() for t in docs])
    order = np.argsort(doc_ids, kind="stable")
    rows["docs"] = (doc_ids[order], np.concatenate([t["n_tokens"].to_numpy() for t in docs])[order],
                    np.array(sum((t["text"].to_pylist() for t in docs), []), dtype=object)[order])
    return rows


def assert_same_rows(out, reference, *, atol=None, docs_below=None) -> None:
    """Same documents and rows as `reference`, vectors bit-identical (or within `atol`), no
    duplicates. `docs_below` compares with the reference's documents below that id only
    (the first shards of a longer corpus)."""
    got, want = read_rows(out), read_rows(reference)
    if docs_below is not None:
        want = {name: tuple(column[cols[0] < docs_below] for column in cols) for name, cols in want.items()}
    assert got.keys() == want.keys()
    for name in want:
        if name == "docs":
            assert all(np.array_equal(a, b) for a, b in zip(got[name], want[name])), "docs differ"
            assert len(np.unique(got[name][0])) == len(got[name][0]), "duplicate documents"
            continue
        *keys, vector = got[name]
        *want_keys, want_vector = want[name]
        for a, b in zip(keys, want_keys):
            assert np.array_equal(a, b), f"{name}: doc_id/position/token differ"
        if atol is None:
            assert vector.dtype == want_vector.dtype and vector.tobytes() == want_vector.tobytes(), \
                f"{name}: vectors are not bit-identical"
        else:
            np.testing.assert_allclose(vector, want_vector, atol=atol, rtol=0)
        pairs = keys[0].astype(np.int64) * 1_000_000 + keys[1]
        assert len(np.unique(pairs)) == len(pairs), f"{name}: duplicate rows"


def as_format_1(out, dest) -> None:
    """Copy a complete OUT to `dest` as crowstream 0.1 wrote it (format 1): one manifest
    with flat `parts`, no commit records."""
    import shutil

    shutil.copytree(out, dest)
    shutil.rmtree(os.path.join(dest, "commits"))
    m = raw_manifest(dest)
    m.pop("digest", None)  # 0.1 wrote none
    m["parts"] = [{**p, "shard": s["index"]} for s in m["shards"] for p in s.pop("parts")]
    for part in m["parts"]:  # 0.1's names had no per-shard file number
        old = part["path"].replace("-000.parquet", ".parquet")
        os.replace(os.path.join(dest, part["path"]), os.path.join(dest, old))
        part["path"] = old
        if part["kind"] == "docs":  # 0.1's docs table had no tokens column
            path = os.path.join(dest, old)
            pq.write_table(pq.read_table(path).drop_columns(["tokens"]), path)
            part["bytes"], part["sha256"] = os.path.getsize(path), sha256_file(path)
    shutil.rmtree(os.path.join(dest, "tokenizer"), ignore_errors=True)  # nor a tokenizer/
    for s in m["shards"]:
        del s["rank"], s["stats"]
    for stats in m["stats"].values():
        del stats["nonfinite"], stats["clamped"]
    m["format_version"] = 1
    with open(os.path.join(dest, "crowstream.json"), "w") as f:
        json.dump(m, f, indent=1)


def as_format_2(out, dest) -> None:
    """Copy a complete OUT to `dest` as crowstream 0.2 wrote it (format 2): the same files,
    with format version 2 in the manifest, the commit records and the part footers."""
    import shutil

    from crowstream.schemas import parquet_options

    shutil.copytree(out, dest)
    commits = os.path.join(dest, "commits")
    for name in sorted(os.listdir(commits)):
        if name.endswith(".json"):
            with open(os.path.join(commits, name)) as f:
                value = json.load(f)
            value["format_version"] = 2
            with open(os.path.join(commits, name), "w") as f:
                json.dump(value, f)
    m = raw_manifest(dest)
    m["format_version"] = 2
    save_manifest(dest, m)
    for shard in m["shards"]:
        for part in shard["parts"]:
            if part["kind"] == "module":
                path = os.path.join(dest, part["path"])
                table = pq.read_table(path)
                meta = {**table.schema.metadata, b"crowstream.format_version": b"2"}
                dtype = "float16" if "float16" in str(table.schema.field("vector").type) else "float32"
                pq.write_table(table.replace_schema_metadata(meta), path, **parquet_options(dtype))
                restamp_part(dest, part["path"])
    from crowstream.format.card import write_card
    from crowstream.format.manifest import read_manifest

    write_card(dest, read_manifest(dest))  # 0.2's card: globs


def restamp_part(out, rel) -> None:
    """Record part `rel`'s current size and sha256 where crowstream recorded them (its
    commit record, and crowstream.json with its digest), so that only content checks can
    notice a change made by a test."""
    size, sha = os.path.getsize(os.path.join(out, rel)), sha256_file(os.path.join(out, rel))
    commits = os.path.join(out, "commits")
    for name in sorted(os.listdir(commits)):
        if name.startswith("shard-") and name.endswith(".json"):  # not end.json
            with open(os.path.join(commits, name)) as f:
                record = json.load(f)
            if _restamp(record["parts"], rel, size, sha):
                with open(os.path.join(commits, name), "w") as f:
                    json.dump(record, f)
    m = raw_manifest(out)
    for shard in m["shards"]:
        _restamp(shard["parts"], rel, size, sha)
    save_manifest(out, m)


def _restamp(parts, rel, size, sha) -> bool:
    found = [p for p in parts if p["path"] == rel]
    for p in found:
        p["bytes"], p["sha256"] = size, sha
    return bool(found)


def patch_everywhere(monkeypatch, function, replacement) -> None:
    """Replace `function` in every crowstream module that bound it by name (modules import
    the functions they call, so patching only the defining module misses the callers)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("crowstream") and module is not None:
            for attribute, value in list(vars(module).items()):
                if value is function:
                    monkeypatch.setattr(module, attribute, replacement)


def benchmark(name: str):
    """benchmarks/<name>.py as a module (its helpers build synthetic outputs for tests)."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                  os.path.join(root, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sigint_at_batch(monkeypatch, n: int) -> None:
    """Send this process SIGINT during the `n`-th traced batch (crowstream's handler then
    commits the complete shards and stops); `monkeypatch.undo()` removes it."""
    import signal

    from crowstream.pipeline.tracing import ModelTracer

    original, calls = ModelTracer.run, []

    def run(tracer, batch):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGINT)
        return original(tracer, batch)

    monkeypatch.setattr(ModelTracer, "run", run)


def moto_bucket(secret: str = "testing-secret"):
    """A moto S3 server on 127.0.0.1 with a bucket named "bucket": yields the fsspec
    storage_options that reach it (use with `yield from` in a module-scoped fixture).
    moto keeps one in-memory store per process, shared by every server: test modules
    must use prefixes of their own."""
    import boto3
    from moto import server as moto_server

    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    options = {"key": "testing-key", "secret": secret,
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    boto3.client("s3", aws_access_key_id="testing-key", aws_secret_access_key=secret,
                 **options["client_kwargs"]).create_bucket(Bucket="bucket")
    try:
        yield options
    finally:
        srv.stop()


def corpus_file(corpus, folder, n_docs: int) -> str:
    """The first `n_docs` documents of `corpus` as a text file, one per line."""
    path = folder / "corpus.txt"
    path.write_text("\n".join(d.replace("\n", " ") for d in corpus[:n_docs]) + "\n",
                    encoding="utf-8")
    return str(path)


def run_benchmark_here(script: str, args: list, capsys) -> str:
    """Run `benchmarks/<script>`'s `main(args)` in this process (its imports are already
    paid here; a child process costs ~5 s of them) -> what it printed. For benchmarks
    that measure nothing process-wide; memory.py and scale.py need processes of their own."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", script)
    spec = importlib.util.spec_from_file_location(f"benchmark_{script[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    status = module.main(args)
    out = capsys.readouterr().out
    assert status in (0, None), f"{script} {' '.join(args)} returned {status}:\n{out}"
    return out
