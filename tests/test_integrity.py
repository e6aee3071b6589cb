"""`verify` finds every kind of damage, each with its own message, and changes nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream.errors import VerifyError
from crowstream.schemas import docs_schema, row_schema
from helpers import tree

MODULES = ["transformer.h.0", "transformer.h.2"]
N = 24
H0 = "data/module=transformer.h.0/part-00000-000001-000.parquet"
H2 = "data/module=transformer.h.2/part-00000-000003-000.parquet"
DOCS = "docs/part-00000-000002-000.parquet"


@pytest.fixture(scope="module")
def complete_out(gpt2, corpus, tmp_path_factory):
    model, tokenizer = gpt2
    out = str(tmp_path_factory.mktemp("integrity") / "out")
    cs.capture(model, corpus[:N], MODULES, out, tokenizer=tokenizer, shard_size=4, batch_size=4,
               progress=False)
    return out


@pytest.fixture
def out(complete_out, tmp_path):
    """A fresh copy of a complete capture, to damage."""
    path = str(tmp_path / "out")
    shutil.copytree(complete_out, path)
    return path


def load(out) -> dict:
    with open(os.path.join(out, "crowstream.json")) as f:
        return json.load(f)


def save(out, manifest) -> None:
    with open(os.path.join(out, "crowstream.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    cs.info(out)  # the edited manifest still validates: only verify's checks can fire


def part(manifest, rel) -> dict:
    return next(p for p in manifest["parts"] if p["path"] == rel)


def sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def refresh(out, rel) -> None:
    """Record the current size and checksum of `rel`, as if it had been written so."""
    manifest = load(out)
    entry = part(manifest, rel)
    entry["bytes"] = os.path.getsize(os.path.join(out, rel))
    entry["sha256"] = sha256(os.path.join(out, rel))
    save(out, manifest)


def problems_of(out) -> list[str]:
    with pytest.raises(VerifyError) as info:
        cs.verify(out)
    problems = info.value.problems
    assert str(info.value) == f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems)
    return problems


def test_intact_output_verifies(out):
    manifest = load(out)
    report = cs.verify(out)
    assert report == {"parts": len(manifest["parts"]), "rows": sum(manifest["counts"]["rows"].values()),
                      "bytes": sum(p["bytes"] for p in manifest["parts"])}
    assert report["parts"] == (N // 4) * (len(MODULES) + 1)


# -- each kind of damage, alone --------------------------------------------------------------

def truncate(out):
    path = os.path.join(out, H0)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return [rf"^truncated: {re.escape(H0)} has {size // 2:,} bytes, the manifest records {size:,}$"]


def delete(out):
    os.remove(os.path.join(out, H2))
    return [rf"^missing: {re.escape(H2)} is listed in the manifest but not on disk$"]


def extra(out):
    shutil.copyfile(os.path.join(out, H0),
                    os.path.join(out, "data/module=transformer.h.0/part-00000-000099-000.parquet"))
    shutil.copyfile(os.path.join(out, DOCS), os.path.join(out, "docs/part-00000-000099-000.parquet"))
    return [r"^extra: data/module=transformer\.h\.0/part-00000-000099-000\.parquet is not listed in the manifest "
            r"\(left by a crash\? `--resume` removes it\)$",
            r"^extra: docs/part-00000-000099-000\.parquet is not listed in the manifest"]


def flip_byte(out, rel=H2):
    path = os.path.join(out, rel)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return [rf"^modified: {re.escape(rel)} does not match its recorded sha256$"]


def grow(out):
    path = os.path.join(out, DOCS)
    size = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\0")
    return [rf"^modified: {re.escape(DOCS)} has {size + 1:,} bytes, the manifest records {size:,}$"]


def module_count(out):
    manifest = load(out)
    rows = manifest["counts"]["rows"]["transformer.h.0"]
    manifest["counts"]["rows"]["transformer.h.0"] += 7
    save(out, manifest)
    return [rf"^manifest mismatch: module 'transformer\.h\.0' counts {rows + 7:,} rows but its parts hold "
            rf"{rows:,}$"]


def doc_count(out):
    manifest = load(out)
    manifest["counts"]["docs"] -= 1
    save(out, manifest)
    return [rf"^manifest mismatch: {N - 1} documents counted, docs parts hold {N}$"]


def part_rows(out):
    """A part's recorded row count disagrees with the file (the totals are kept consistent)."""
    manifest = load(out)
    entry = part(manifest, H0)
    rows = entry["rows"]
    entry["rows"] += 2
    manifest["counts"]["rows"]["transformer.h.0"] += 2
    save(out, manifest)
    return [rf"^row count mismatch: {re.escape(H0)} has {rows:,} rows, the manifest records {rows + 2:,}$"]


def other_schema(out):
    """Same rows, vector stored as float16: size and checksum recorded, only the schema is wrong."""
    path = os.path.join(out, H0)
    table = pq.read_table(path)
    d = table.schema.field("vector").type.list_size
    pq.write_table(table.cast(row_schema(d, "float16")), path)
    refresh(out, H0)
    return [rf"^schema mismatch: {re.escape(H0)} has .*vector: fixed_size_list<element: halffloat not null>"
            rf"\[{d}\].*, expected .*vector: fixed_size_list<element: float not null>\[{d}\]"]


def other_docs_schema(out):
    path = os.path.join(out, DOCS)
    table = pq.read_table(path)
    pq.write_table(table.set_column(1, "n_tokens", table["n_tokens"].cast(pa.int64())), path)
    refresh(out, DOCS)
    assert not pq.read_schema(path).equals(docs_schema())
    return [rf"^schema mismatch: {re.escape(DOCS)} has .*n_tokens: int64.*, expected .*n_tokens: int32"]


def not_parquet(out):
    path = os.path.join(out, H2)
    with open(path, "wb") as f:
        f.write(b"this is not parquet at all" * 10)
    refresh(out, H2)
    return [rf"^unreadable: {re.escape(H2)} is not valid Parquet \(.+\)$"]


def no_vocab(out):
    os.remove(os.path.join(out, "vocab.parquet"))
    return [r"^missing: vocab\.parquet$"]


DAMAGES = {f.__name__: f for f in (truncate, delete, extra, flip_byte, grow, module_count, doc_count,
                                   part_rows, other_schema, other_docs_schema, not_parquet, no_vocab)}


@pytest.mark.parametrize("damage", DAMAGES)
def test_verify_reports_each_damage_with_its_own_message(out, damage):
    expected = DAMAGES[damage](out)
    before = tree(out)
    problems = problems_of(out)
    assert len(problems) == len(expected), problems
    for pattern, problem in zip(expected, problems):
        assert re.search(pattern, problem, re.S), problem
    assert tree(out) == before, "verify changed the output"


def test_verify_lists_every_problem_at_once(out):
    expected = (truncate(out) + delete(out) + flip_byte(out, "docs/part-00000-000000-000.parquet")
                + extra(out) + module_count(out))
    problems = problems_of(out)
    assert len(problems) == len(expected), problems
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    kinds = {p.split(":")[0] for p in problems}
    assert kinds == {"truncated", "missing", "modified", "extra", "manifest mismatch"}


def test_verify_ignores_tmp_leftovers(out):
    with open(os.path.join(out, ".tmp", "transformer.h.0.part-00000-000009-000.parquet"), "wb") as f:
        f.write(b"half")
    cs.verify(out)


# -- the CLI ---------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "crowstream", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_verify(out):
    ok = run_cli("verify", out)
    assert ok.returncode == 0, ok.stderr
    manifest = load(out)
    rows = sum(manifest["counts"]["rows"].values())
    assert re.fullmatch(rf"{re.escape(out)}: OK \({len(manifest['parts'])} parts, {rows:,} rows, "
                        r"[\d.]+ MiB checked\)\n", ok.stdout)
    truncate(out)
    flip_byte(out)
    bad = run_cli("verify", out)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    lines = bad.stderr.splitlines()
    assert lines[0] == f"crowstream verify: 2 problem(s) in {out}"
    assert lines[1].startswith(f"  - truncated: {H0}") and lines[2].startswith(f"  - modified: {H2}")
    assert len(lines) == 3
    with open(os.path.join(out, "crowstream.json"), "w") as f:
        f.write("{not json")
    broken = run_cli("verify", out)
    assert broken.returncode == 1 and "Traceback" not in broken.stderr
    assert re.fullmatch(r"crowstream: error: .*crowstream\.json is damaged \(.*\); it was left as it is\. "
                        r"Restore it from a backup or capture again into a new OUT\.\n", broken.stderr)
