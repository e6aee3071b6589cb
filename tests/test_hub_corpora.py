"""Dataset repositories: a local repository with two configs and data files loads by config
name offline; the fingerprint names local sources without absolute paths."""

from __future__ import annotations

import json
import os
import shutil

import pytest

import crowstream as cs
from crowstream.errors import DataError, ResumeMismatchError

KW = dict(shard_size=2, batch_size=4, progress=False, device="cpu", store_text=True)
CARD = """---
configs:
- config_name: alpha
  data_files:
  - split: train
    path: alpha/*.jsonl
- config_name: beta
  data_files:
  - split: train
    path: beta/*.jsonl
---
# two configs
"""


@pytest.fixture
def repository(tmp_path, corpus):
    root = tmp_path / "corpus-repo"
    for name, docs in (("alpha", corpus[:5]), ("beta", corpus[10:17])):
        (root / name).mkdir(parents=True)
        with open(root / name / "part.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    (root / "README.md").write_text(CARD, encoding="utf-8")
    return root


def texts(out) -> list[str]:
    return cs.docs(str(out)).sort("doc_id").collect()["text"].to_list()


def test_a_local_repository_loads_by_config_name(gpt2, repository, corpus, tmp_path):
    model, tokenizer = gpt2
    run = cs.capture(model, str(repository), ["transformer.h.0"], tmp_path / "beta",
                     tokenizer=tokenizer, data_config="beta", **KW)
    assert run.docs == 7 and texts(tmp_path / "beta") == corpus[10:17]
    source = run.manifest.config["source"]
    assert source["kind"] == "directory" and source["name"] == "corpus-repo"
    assert source["config"] == "beta"
    with open(tmp_path / "beta" / "crowstream.json", encoding="utf-8") as f:
        assert str(tmp_path) not in f.read()  # no absolute path of this machine
    files = cs.capture(model, str(repository), ["transformer.h.0"], tmp_path / "files",
                       tokenizer=tokenizer, data_files="alpha/part.jsonl", **KW)
    assert files.docs == 5 and texts(tmp_path / "files") == corpus[:5]
    with pytest.raises(ResumeMismatchError, match=r"source\.config: manifest has 'beta', this "
                                                  r"call has 'alpha'"):
        cs.capture(model, str(repository), ["transformer.h.0"], tmp_path / "beta",
                   tokenizer=tokenizer, data_config="alpha", resume=True, **KW)


def test_a_moved_corpus_and_out_still_resume(gpt2, repository, tmp_path):
    model, tokenizer = gpt2
    out = tmp_path / "out"
    cs.capture(model, str(repository), ["transformer.h.0"], out, tokenizer=tokenizer,
               data_config="alpha", **KW)
    moved = tmp_path / "elsewhere" / "corpus-repo"
    shutil.copytree(repository, moved)
    shutil.copytree(out, tmp_path / "out-moved")
    again = cs.capture(model, str(moved), ["transformer.h.0"], tmp_path / "out-moved",
                       tokenizer=tokenizer, data_config="alpha", resume=True, **KW)
    assert again.manifest.status == "complete" and again.docs == 5


def test_repository_options_on_a_file_are_refused(gpt2, tmp_path):
    model, tokenizer = gpt2
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\n")
    with pytest.raises(DataError, match="select from a dataset repository"):
        cs.capture(model, str(corpus), ["transformer.h.0"], tmp_path / "out",
                   tokenizer=tokenizer, data_config="x", **KW)
    assert not os.path.exists(tmp_path / "out")


def test_no_local_path_of_the_model_or_data_reaches_out(gpt2_dir, corpus, tmp_path):
    """The manifest, records and card name a local model by its directory's name only, so
    OUT can be uploaded as it is (and resumed after the model moves)."""
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(corpus[:6]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cs.capture(gpt2_dir, str(data), ["transformer.h.0"], out, **KW)
    model_parent = os.path.dirname(os.path.abspath(gpt2_dir))
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith((".json", ".md")):
                with open(os.path.join(root, name), encoding="utf-8") as f:
                    text = f.read()
                assert model_parent not in text and str(tmp_path) not in text, name
    assert cs.info(out)["model"] == os.path.basename(os.path.normpath(gpt2_dir))
