"""Fuzzing the readers: seeded random byte flips and truncations of a committed part file,
a docs part, the manifest and the dataset card. `verify` must report every one, and no
reader may crash the process or silently return rows that differ from the intact
output's. Each case runs in its own process, forked from one reader server that imported
everything once, so a crashing reader fails its case instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import crowstream as cs

MODULE = "transformer.h.0"
SEED = 2026
# (target, flips, truncations): modest, for CI time
PLAN = [("data/module=transformer.h.0/part-00000-000000-000.parquet", 4, 1),
        ("docs/part-00000-000001-000.parquet", 1, 1),
        ("crowstream.json", 3, 1),
        ("README.md", 1, 1)]

# A reader server: imports once, then for each request line `[out, cache]` forks a child
# that runs every reader (-> {reader: "rows <sha256>" | "error <type>"}) and answers one
# line `{"status": <waitpid status>, "results": ...}`.
READERS = r"""
import hashlib, json, os, signal, sys
import numpy as np
import crowstream as cs
import datasets, polars, pyarrow.parquet, torch  # imported once, before the forks
from crowstream.reading import loader, readers  # noqa: F401

module = sys.argv[1]

def digest(*columns):
    h = hashlib.sha256()
    order = np.lexsort(tuple(np.asarray(c[:len(columns[0])]) for c in columns[1::-1]))
    for column in columns:
        h.update(np.ascontiguousarray(np.asarray(column)[order]).tobytes())
    return "rows " + h.hexdigest()

def stream():
    batches = list(cs.stream(out, module, batch_size=100000, columns=("doc_id", "position", "vector")))
    return digest(*(np.concatenate([b[c].numpy() for b in batches]) for c in ("doc_id", "position", "vector")))

def load():
    rows = cs.load(out, module, cache_dir=cache).with_format("numpy")[:]
    return digest(rows["doc_id"], rows["position"], np.stack(rows["vector"]).astype(np.float32))

def scan():
    frame = cs.scan(out).collect()
    return digest(frame["doc_id"].to_numpy(), frame["position"].to_numpy(),
                  np.stack(frame["vector"].to_numpy()).astype(np.float32))

def docs():
    frame = cs.docs(out).collect()
    texts = np.array([hashlib.sha256((t or "").encode()).digest() for t in frame["text"]])
    return digest(frame["doc_id"].to_numpy(), frame["n_tokens"].to_numpy(), texts)

def info():
    summary = cs.info(out)
    summary.pop("path")
    return "info " + hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()

def verify():
    cs.verify(out)
    return "intact"

def read_every_way():
    results = {}
    for name, read in [("verify", verify), ("info", info), ("stream", stream), ("load", load),
                       ("scan", scan), ("docs", docs)]:
        try:
            results[name] = read()
        except Exception as error:
            results[name] = f"error {type(error).__name__}"
    return results

for line in sys.stdin:
    out, cache = json.loads(line)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout is the answer channel
        signal.alarm(300)  # a hung reader dies and fails its case
        os.write(w, json.dumps(read_every_way()).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as answer:
        results = answer.read().decode()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"status": status, "results": results}), flush=True)
"""


@pytest.fixture(scope="module")
def reader_server():
    server = subprocess.Popen([sys.executable, "-c", READERS, MODULE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})

    def read_all(out, cache) -> dict:
        server.stdin.write(json.dumps([str(out), str(cache)]) + "\n")
        server.stdin.flush()
        answer = json.loads(server.stdout.readline())
        assert answer["status"] == 0, f"a reader crashed the process (status {answer['status']})"
        return json.loads(answer["results"])

    yield read_all
    server.stdin.close()
    server.wait(timeout=60)
    server.stdout.close()


def cases():
    rng = np.random.default_rng(SEED)
    for target, flips, truncations in PLAN:
        for i in range(flips):
            yield f"{target} flip {i}", target, "flip", rng.random(), int(rng.integers(1, 256))
        for i in range(truncations):
            yield f"{target} truncate {i}", target, "truncate", rng.random(), 0


CASES = list(cases())


@pytest.fixture(scope="module")
def intact(gpt2_dir, tmp_path_factory, reader_server):
    from conftest import python_paragraphs

    root = tmp_path_factory.mktemp("fuzz")
    out = root / "out"
    cs.capture(gpt2_dir, python_paragraphs(16), [MODULE], out, shard_size=8, store_text=True,
               progress=False)
    return out, reader_server(out, root / "cache")


def damage(intact_out, root, name, target, kind, where, xor):
    """A copy of the intact OUT with one flipped byte or one truncation; -> (OUT, JSON
    unchanged?) where the second is True only for a manifest flip that changed nothing."""
    out = root / name.replace("/", "_").replace(" ", "_")
    shutil.copytree(intact_out, out)
    path = out / target
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if kind == "flip":
        data[at] ^= xor
    else:
        del data[at:]
    path.write_bytes(bytes(data))
    return out, target == "crowstream.json" and _same_json(intact_out / target, data)


@pytest.fixture(scope="module")
def outcomes(intact, tmp_path_factory, reader_server):
    """Every case's reader results (or the crash of its reader process, raised by the case)."""
    root = tmp_path_factory.mktemp("fuzz-cases")
    damaged = {case[0]: damage(intact[0], root, *case) for case in CASES}
    found = {}
    for i, (name, (out, unchanged)) in enumerate(damaged.items()):
        try:
            found[name] = reader_server(out, root / f"cache-{i}"), unchanged
        except AssertionError as crash:  # raised by that case's test
            found[name] = crash, unchanged
    return found


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_damage_is_reported_and_never_read_silently(intact, outcomes, name):
    results, unchanged = outcomes[name]
    if isinstance(results, AssertionError):  # its reader process crashed
        raise results
    if unchanged:
        pytest.skip("the flip turned whitespace into whitespace: the manifest is unchanged")
    assert results["verify"] != "intact", f"verify missed {name}"
    for reader, result in results.items():
        if reader != "verify":
            assert result.startswith("error ") or result == intact[1][reader], \
                f"{reader} returned different rows silently after {name}"


def _same_json(original, data: bytes) -> bool:
    try:
        return json.loads(bytes(data)) == json.loads(original.read_bytes())
    except ValueError:
        return False


def test_intact_output_reads_everywhere(intact):
    assert intact[1]["verify"] == "intact"
    assert all(not result.startswith("error") for result in intact[1].values()), intact[1]
