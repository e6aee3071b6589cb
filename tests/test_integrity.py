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
from helpers import manifest_of, save_manifest, tree

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
    save_manifest(out, manifest)
    cs.info(out)  # the edited manifest still validates: only verify's checks can fire


def part(manifest, rel) -> dict:
    return next(p for shard in manifest["shards"] for p in shard["parts"] if p["path"] == rel)


def edit_part(out, rel, change) -> None:
    """Apply `change` to the entry of part `rel` in its commit record and in crowstream.json
    alike, as if it had been written so (only verify's checks of the files can fire)."""
    manifest = load(out)
    entry = part(manifest, rel)
    change(entry)
    save(out, manifest)
    record_path = os.path.join(out, "commits", f"shard-{int(rel.split('-')[2]):08d}.json")
    with open(record_path) as f:
        record = json.load(f)
    change(next(p for p in record["parts"] if p["path"] == rel))
    with open(record_path, "w") as f:
        json.dump(record, f)


def sha256(path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def refresh(out, rel) -> None:
    """Record the current size and checksum of `rel`, as if it had been written so."""
    edit_part(out, rel, lambda entry: entry.update(bytes=os.path.getsize(os.path.join(out, rel)),
                                                   sha256=sha256(os.path.join(out, rel))))


def problems_of(out) -> list[str]:
    with pytest.raises(VerifyError) as info:
        cs.verify(out)
    problems = info.value.problems
    assert str(info.value) == f"{out!r} is damaged: {len(problems)} problem(s): " + "; ".join(problems)
    return problems


def test_intact_output_verifies(out):
    manifest = manifest_of(out)
    report = cs.verify(out)
    assert report == {"parts": len(manifest.parts), "rows": sum(manifest.counts.rows.values()),
                      "bytes": sum(p.bytes for p in manifest.parts), "notes": []}
    assert report["parts"] == (N // 4) * (len(MODULES) + 1)


# -- each kind of damage, alone --------------------------------------------------------------

def truncate(out):
    path = os.path.join(out, H0)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return [rf"^truncated: {re.escape(H0)} has {size // 2:,} bytes, the manifest records {size:,}$"]


def delete(out):
    os.remove(os.path.join(out, H2))
    return [rf"^missing: {re.escape(H2)} is listed in the manifest but not on disk$",
            r"^partly visible: shard 3 has 2 of its 3 part files in place"]  # a glob reads 2


def extra(out):
    shutil.copyfile(os.path.join(out, H0),
                    os.path.join(out, "data/module=transformer.h.0/part-00000-000099-000.parquet"))
    shutil.copyfile(os.path.join(out, DOCS), os.path.join(out, "docs/part-00000-000099-000.parquet"))
    return [r"^extra: data/module=transformer\.h\.0/part-00000-000099-000\.parquet is not listed in the manifest "
            r"\(left by a crash\? `--resume` removes it\)$",
            r"^extra: docs/part-00000-000099-000\.parquet is not listed in the manifest",
            r"^partly visible: shard 99 has 2 part file\(s\) in data/ or docs/ but no commit record"]


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
    rows = part(load(out), H0)["rows"]
    edit_part(out, H0, lambda entry: entry.update(rows=rows + 2))
    manifest = load(out)
    manifest["counts"]["rows"]["transformer.h.0"] += 2
    save(out, manifest)
    stats = "commits/shard-00000001.stats.parquet"
    return [rf"^stats mismatch: {re.escape(stats)} counts rows \{{'transformer\.h\.0': {rows}, "
            rf"'transformer\.h\.2': \d+\}}, the shard's parts hold \{{'transformer\.h\.0': {rows + 2}, ",
            rf"^row count mismatch: {re.escape(H0)} has {rows:,} rows, the manifest records {rows + 2:,}$"]


# -- damage to the commit records and the consolidated manifest ------------------------------

STATS = "commits/shard-00000002.stats.parquet"


def stats_flipped(out):
    flip_byte(out, STATS)
    return [rf"^modified: {re.escape(STATS)} does not match its recorded sha256$"]


def stats_deleted(out):
    os.remove(os.path.join(out, STATS))
    return [rf"^missing: {re.escape(STATS)} is listed in its commit record but not on disk$"]


def stray_stats(out):
    """A statistics file without a record: a commit killed between the two."""
    shutil.copyfile(os.path.join(out, STATS), os.path.join(out, "commits/shard-00000099.stats.parquet"))
    return [r"^extra: commits/shard-00000099\.stats\.parquet is not listed in the manifest"]


def pending(out):
    """A recorded shard whose part is still in .tmp/: a commit killed before its renames."""
    os.replace(os.path.join(out, H2), os.path.join(out, ".tmp", H2.replace("/", "__")))
    return [rf"^pending: {re.escape(H2)} is committed but still in \.tmp/ \(a commit was cut short; "
            r"`--resume` moves it into place\)$",
            r"^partly visible: shard \d+ has 2 of its 3 part files in place"]


def consolidation(out):
    """crowstream.json says something else about a shard than its commit record."""
    manifest = load(out)
    manifest["shards"][1]["tokens"] += 1
    manifest["counts"]["tokens_fed"] += 1
    save(out, manifest)
    return [rf"^manifest mismatch: crowstream\.json lists {N // 4} shard\(s\), the commit records "
            rf"{N // 4}; shard\(s\) \[1\] differ$"]


def consolidated_stats(out):
    manifest = load(out)
    manifest["stats"]["transformer.h.2"]["mean"][3] += 1e-9
    save(out, manifest)
    return [r"^manifest mismatch: the statistics of 'transformer\.h\.2' in crowstream\.json differ "
            r"from the commit records' merged$"]


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
                                   part_rows, other_schema, other_docs_schema, not_parquet, no_vocab,
                                   stats_flipped, stats_deleted, stray_stats, pending, consolidation,
                                   consolidated_stats)}


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
    assert kinds == {"truncated", "missing", "modified", "extra", "manifest mismatch",
                     "partly visible"}


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
    manifest = manifest_of(out)
    rows = sum(manifest.counts.rows.values())
    assert re.fullmatch(rf"{re.escape(out)}: OK \({len(manifest.parts)} parts, {rows:,} rows, "
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
