"""The dataset card lists committed part files, never globs (#17): `datasets.load_dataset(OUT,
config)` reads whole shards only, and `verify` and `info` name a shard a glob would see in
part."""

from __future__ import annotations

import os
import shutil

import pytest

import crowstream as cs
from crowstream.errors import Interrupted, VerifyError
from crowstream.format.card import card_files
from crowstream.format.manifest import read_manifest
from helpers import sigint_at_batch

MODULES = ["transformer.h.0", "transformer.h.2"]
KW = dict(shard_size=4, batch_size=4, progress=False)


def card(out: str) -> str:
    with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_the_card_of_a_capture_lists_exactly_its_committed_parts(reference_capture):
    out = reference_capture(16, MODULES, **KW)
    manifest = read_manifest(out)
    assert manifest.status == "complete" and len(manifest.shards) == 4
    assert card_files(card(out)) == {p.path for p in manifest.parts}
    assert "*" not in card(out).split("---")[1]  # no glob in the configs


def test_a_stray_partial_shard_is_not_loaded_and_is_named_by_verify_and_info(
        gpt2, corpus, tmp_path, monkeypatch, capsys):
    import datasets

    out = str(tmp_path / "out")
    sigint_at_batch(monkeypatch, 3)
    with pytest.raises(Interrupted):  # shards 0-2 committed and consolidated
        cs.capture(gpt2[0], corpus[:24], MODULES, out, tokenizer=gpt2[1], **KW)
    monkeypatch.undo()
    manifest = read_manifest(out)
    assert card_files(card(out)) == {p.path for p in manifest.parts}
    committed = manifest.counts.rows["transformer.h.0"]
    h0 = "data/module=transformer.h.0"
    # a part of shard 5 in data/ with no record: what a commit cut short before its record
    # leaves on a file system that renames early, or a sync tool that copied too much
    shutil.copyfile(os.path.join(out, manifest.module_parts("transformer.h.0")[0].path),
                    os.path.join(out, h0, "part-00000-000005-000.parquet"))
    cache = str(tmp_path / "cache")
    loaded = datasets.load_dataset(out, "transformer.h.0", split="train", cache_dir=cache)
    assert loaded.num_rows == committed
    globbed = datasets.load_dataset("parquet", data_files=f"{out}/{h0}/*.parquet", split="train",
                                    cache_dir=cache)
    assert globbed.num_rows > committed  # what the 0.2 card's glob read
    with pytest.raises(VerifyError) as found:
        cs.verify(out)
    shard5 = ("partly visible: shard 5 has 1 part file(s) in data/ or docs/ but no commit "
              "record")
    assert any(p.startswith(shard5) for p in found.value.problems), found.value.problems
    assert [p[:len(shard5)] for p in cs.info(out)["partly_visible"]] == [shard5]
    from crowstream.cli import main

    main(["info", out])
    assert shard5 in capsys.readouterr().out
