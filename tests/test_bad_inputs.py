"""The bad-input catalogue, one table: every input kind the README lists, each bad case
giving one clear CrowstreamError line, before the model loads when it can, and leaving
OUT (and everything beside it) exactly as it was. A few cases also run through the CLI, all
in one subprocess. `python tests/test_bad_inputs.py` prints the table of messages.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream import errors
from crowstream.pipeline import models
from helpers import assert_same_rows, manifest_of, raw_manifest, tree
from crowstream.format.card import write_card
from crowstream.format.locks import exclusive

TEXTS = ["first document here", "a second, longer document about Python", "third"]
E = errors


def write(path, content) -> str:
    """Write bytes or text to `path` (directories created); -> str(path)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def parquet(path, texts, **kw) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path, **kw)
    return str(path)


def truncated_parquet(path) -> str:
    parquet(path, ["some text " * 50] * 50)
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) // 2)
    return str(path)


def manifest_edited(edit):
    """A copy of the reference OUT whose crowstream.json was edited by hand."""
    def make(tmp, ctx):
        out = tmp / "out"
        shutil.copytree(ctx["reference"], out)
        path = out / "crowstream.json"
        path.write_text(edit(path.read_text()))
        return {"out": out, "resume": True}
    return make


def future_version(text):
    manifest = json.loads(text)
    manifest["format_version"] = 99
    return json.dumps(manifest)


def wrong_schema(text):
    manifest = json.loads(text)
    manifest["shards"] = "all of them"
    return json.dumps(manifest)


def model_without_tokenizer(tmp, ctx):
    model = tmp / "no-tokenizer"
    shutil.copytree(ctx["gpt2_dir"], model)
    for name in os.listdir(model):
        if "token" in name or name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(model / name)
    return {"model": model}


def out_inside_model(tmp, ctx):
    model = tmp / "model"
    shutil.copytree(ctx["gpt2_dir"], model)
    return {"model": model, "out": model / "acts"}


def out_is_data(tmp, ctx):
    data = write(tmp / "corpus.txt", "\n".join(TEXTS))
    return {"data": data, "out": data}


@dataclasses.dataclass
class Case:
    make: Callable  # (tmp_path, ctx) -> capture arguments that differ from the defaults
    error: type
    message: str    # regex the one-line message must match
    model_loads: bool = False  # whether the check may need the model (else it must fail first)


def data(make_file):
    """A case whose data is the file (or directory) `make_file(tmp)` returns."""
    return lambda tmp, ctx: {"data": make_file(tmp)}


EMPTY = r"is empty: the corpus has no documents\.$"
WHITESPACE = r"holds only whitespace: the corpus has no documents\.$"
NO_DOCS = r"^the corpus has no documents; check data, split and max_docs\.$"
UNREADABLE = r"^could not read .*Check that the file is what its extension says, UTF-8 text, and complete\.$"

CASES = {
    # -- empty, header-only and whitespace-only files of each kind ---------------------------
    **{f"empty {ext}": Case(data(lambda tmp, ext=ext: write(tmp / f"c{ext}", "")), E.DataError, EMPTY)
       for ext in (".txt", ".jsonl", ".json", ".csv", ".parquet")},
    **{f"whitespace-only {ext}": Case(data(lambda tmp, ext=ext: write(tmp / f"c{ext}", " \n\t\n")),
                                      E.DataError, WHITESPACE)
       for ext in (".txt", ".jsonl", ".json", ".csv")},
    "header-only .csv": Case(data(lambda tmp: write(tmp / "c.csv", "text\n")), E.DataError, NO_DOCS),
    "header-only .parquet (schema, no rows)": Case(
        data(lambda tmp: parquet(tmp / "c.parquet", [])), E.DataError,
        r"has a schema but no rows: the corpus has no documents\.$"),
    "empty directory": Case(data(lambda tmp: (tmp / "d").mkdir() or tmp / "d"), E.DataError,
                            r"^directory '.*' holds no files; point data at a corpus\.$"),
    "directory of header-only .csv": Case(
        data(lambda tmp: write(tmp / "d" / "a.csv", "text\n") and tmp / "d"), E.DataError, NO_DOCS),
    "directory of an empty .jsonl": Case(
        data(lambda tmp: write(tmp / "d" / "a.jsonl", "") and tmp / "d"), E.DataError,
        r"^directory '.*d' holds only empty files: the corpus has no documents\.$"),
    "empty list": Case(lambda tmp, ctx: {"data": []}, E.DataError, NO_DOCS),
    # -- files that are not what they say ----------------------------------------------------
    "text in a .parquet": Case(data(lambda tmp: write(tmp / "c.parquet", "hello\n")), E.DataError,
                               UNREADABLE),
    "text in a .jsonl": Case(data(lambda tmp: write(tmp / "c.jsonl", "not json\n")), E.DataError,
                             UNREADABLE),
    "text in a .json": Case(data(lambda tmp: write(tmp / "c.json", "just words\n")), E.DataError,
                            UNREADABLE),
    "unsupported extension": Case(data(lambda tmp: write(tmp / "c.xml", "<a/>")), E.DataError,
                                  r"^cannot read '.*c\.xml': supported files are \.txt"),
    "invalid UTF-8 .txt": Case(data(lambda tmp: write(tmp / "c.txt", b"fine\n\xff\xfe bad\n")),
                               E.DataError, r"is not valid UTF-8 \(invalid start byte\); convert it"),
    "invalid UTF-8 .jsonl": Case(data(lambda tmp: write(tmp / "c.jsonl", b'{"text": "\xff"}\n')),
                                 E.DataError, r"^could not read .* UnicodeDecodeError"),
    "truncated .parquet": Case(data(lambda tmp: truncated_parquet(tmp / "c.parquet")), E.DataError,
                               UNREADABLE),
    "data path that does not exist": Case(lambda tmp, ctx: {"data": tmp / "nope.txt"}, E.DataError,
                                          r"does not exist; pass an existing file or directory\.$"),
    # -- the text field ----------------------------------------------------------------------
    "text field holding lists": Case(
        data(lambda tmp: write(tmp / "c.jsonl", jsonl([{"text": ["a", "b"]}]))), E.DataError,
        r"^document 0 has type list, not str \(value \"\['a', 'b'\]\"\); check text_field"),
    "text field holding numbers": Case(
        data(lambda tmp: write(tmp / "c.jsonl", jsonl([{"text": 5}]))), E.DataError,
        r"^document 0 has type int, not str \(value '5'\); check text_field \(now 'text'\)\.$"),
    "no text field (.jsonl)": Case(
        data(lambda tmp: write(tmp / "c.jsonl", jsonl([{"body": "x"}]))), E.DataError,
        r"^document 0 has no field 'text'; available fields: body\. Pass text_field="),
    "no text field (DataFrame)": Case(
        lambda tmp, ctx: {"data": __import__("pandas").DataFrame({"body": TEXTS})}, E.DataError,
        r"^text field 'text' is not a column of the DataFrame; available columns: body\."),
    "text_field not a string": Case(lambda tmp, ctx: {"text_field": None}, E.ConfigError,
                                    r"^text_field must be a column name, got None\.$"),
    # -- options -----------------------------------------------------------------------------
    "context_size 0": Case(lambda tmp, ctx: {"context_size": 0}, E.ConfigError,
                           r"^context_size must be a positive integer, got 0\.$"),
    "context_size negative": Case(lambda tmp, ctx: {"context_size": -8}, E.ConfigError,
                                  r"^context_size must be a positive integer, got -8\.$"),
    "max_docs=0": Case(lambda tmp, ctx: {"max_docs": 0}, E.ConfigError,
                       r"^max_docs must be a positive integer, got 0\.$"),
    # -- OUT -----------------------------------------------------------------------------------
    "OUT inside the model directory": Case(out_inside_model, E.ConfigError,
                                           r"^OUT '.*acts' is inside the model directory"),
    "OUT equal to the data file": Case(out_is_data, E.ConfigError,
                                       r"^OUT '.*corpus\.txt' is the data file itself"),
    "OUT not empty": Case(lambda tmp, ctx: {"out": write(tmp / "out" / "x", "mine") and tmp / "out"},
                          E.OutputExistsError, r"^OUT '.*out' is not empty: pass overwrite=True"),
    "crowstream.json not JSON": Case(manifest_edited(lambda text: text[:-40]), E.ManifestError,
                                     r"crowstream\.json is damaged \(.*\); it was left as it is\."),
    "crowstream.json wrong schema": Case(manifest_edited(wrong_schema), E.ManifestError,
                                         r"does not match the manifest schema: shards: "),
    "crowstream.json value edited by hand": Case(
        manifest_edited(lambda text: re.sub(r'"context_size": ?64', '"context_size":32', text)),
        E.ManifestError, r"changed after crowstream wrote it \(its digest does not match\): it is "
                         r"damaged, or was edited by hand\. .*delete its \"digest\" field"),
    "crowstream.json from the future": Case(
        manifest_edited(future_version), E.ManifestError,
        r"is format version 99, written by a newer crowstream \(this one reads up to 3\); upgrade"),
    # -- the model -----------------------------------------------------------------------------
    "model directory without a tokenizer": Case(
        model_without_tokenizer, E.ModelLoadError,
        r"^could not load the tokenizer for '.*no-tokenizer': the directory has no tokenizer files", model_loads=True),
    "no module of that name": Case(
        lambda tmp, ctx: {"modules": ["transformer.h.7"]}, E.ModuleNotFoundInModel,
        r"^module 'transformer\.h\.7' is not in GPT2LMHeadModel; did you mean", model_loads=True),
    "encoder-decoder model (T5)": Case(
        lambda tmp, ctx: {"model": ctx["t5_dir"], "modules": ["encoder.block.0"]}, E.ConfigError,
        r"^model '.*' \(T5\) is an encoder-decoder model; crowstream captures decoder-only and "
        r"encoder-only models\.", model_loads=True),
}


@pytest.fixture(scope="module")
def t5_dir(gpt2_dir, tmp_path_factory):
    """A tiny random T5 (an encoder-decoder) with the tiny GPT-2's tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny-t5")
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ctx(gpt2_dir, t5_dir, tmp_path_factory):
    reference = tmp_path_factory.mktemp("bad-inputs-ref") / "out"
    cs.capture(gpt2_dir, TEXTS, ["transformer.h.0"], reference, progress=False)
    return {"gpt2_dir": gpt2_dir, "t5_dir": t5_dir, "reference": str(reference)}


def call(tmp_path, ctx, case: Case) -> dict:
    """The capture arguments for `case`: defaults, then what the case changes."""
    args = {"model": ctx["gpt2_dir"], "data": TEXTS, "modules": ["transformer.h.0"],
            "out": tmp_path / "out", "progress": False}
    return {**args, **case.make(tmp_path, ctx)}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_clear_line_and_out_is_untouched(name, tmp_path, ctx, monkeypatch):
    case = CASES[name]
    args = call(tmp_path, ctx, case)
    before = tree(tmp_path)
    loads = []
    load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a) or load_model(*a, **k))
    with pytest.raises(case.error) as info:
        cs.capture(**args)
    message = str(info.value)
    assert isinstance(info.value, errors.CrowstreamError)
    assert "\n" not in message and re.search(case.message, message), message
    assert tree(tmp_path) == before, "OUT (or what is beside it) changed"
    if not case.model_loads:
        assert loads == [], "the model was loaded before this error was found"


def test_bad_data_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model must not load before the data is checked")

    monkeypatch.setattr(models, "load_model", load_model)
    with pytest.raises(errors.DataError, match="no field 'text'"):
        cs.capture(tmp_path / "a-70b-model", [{"body": "x"}], ["layers.0"], tmp_path / "out",
                   progress=False)
    assert os.listdir(tmp_path) == []


def test_a_manifest_edited_on_purpose_reads_once_its_digest_is_deleted(ctx, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(ctx["reference"], out)
    manifest = raw_manifest(out)
    manifest["stats"] = {}
    (out / "crowstream.json").write_text(json.dumps(manifest))
    with pytest.raises(errors.ManifestError, match="digest does not match"):
        cs.info(out)
    del manifest["digest"]
    (out / "crowstream.json").write_text(json.dumps(manifest))
    assert cs.info(out)["modules"]["transformer.h.0"]["mean_norm"] is None


# -- races and durability ----------------------------------------------------------------------

def test_a_fresh_run_takes_the_lock_before_writing_anything(gpt2_dir, tmp_path, monkeypatch):

    out = tmp_path / "out"
    out.mkdir()
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(a))
    with exclusive(str(out)):  # another capture is running into the same empty OUT
        with pytest.raises(errors.OutputError, match="another crowstream process is writing"):
            cs.capture(gpt2_dir, TEXTS, "transformer.h.0", out, progress=False)
    assert os.listdir(out) == [] and loads == []


def test_out_is_checked_again_once_locked(gpt2_dir, tmp_path, monkeypatch):
    """Two fresh runs started together: the second to get the lock finds OUT filled."""

    from crowstream.pipeline import output

    out = tmp_path / "out"
    exclusive = output.exclusive

    @__import__("contextlib").contextmanager
    def lock_after_the_other_run(path):
        shutil.copytree(ctx_reference(gpt2_dir, tmp_path), path, dirs_exist_ok=True)
        with exclusive(path):
            yield

    monkeypatch.setattr(output, "exclusive", lock_after_the_other_run)
    with pytest.raises(errors.OutputExistsError, match=r"^OUT '.*out' is not empty"):
        cs.capture(gpt2_dir, TEXTS, "transformer.h.0", out, progress=False)
    assert "crowstream.json" in os.listdir(out)  # the other run's output, untouched


def ctx_reference(gpt2_dir, tmp_path):
    other = tmp_path / "other-run"
    if not other.exists():
        cs.capture(gpt2_dir, TEXTS, "transformer.h.0", other, progress=False)
    return other


def test_the_dataset_card_is_fsynced_before_it_replaces_the_old_one(ctx, tmp_path, monkeypatch):

    out = tmp_path / "out"
    shutil.copytree(ctx["reference"], out)
    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or fsync(fd))
    write_card(str(out), manifest_of(out))
    assert re.search(r"/\.tmp/README\.md\.[0-9a-f]+\.tmp$", synced[0]) and synced[-1] == str(out)


# -- inputs that used to fail and now work ---------------------------------------------------

def test_duplicate_modules_are_captured_once_in_first_named_order(gpt2_dir, tmp_path):
    run = cs.capture(gpt2_dir, TEXTS, ["transformer.h.2", "transformer.h.0", "transformer.h.2",
                                       "transformer.h.*"], tmp_path / "out", progress=False)
    assert list(run.modules) == ["transformer.h.2", "transformer.h.0", "transformer.h.1"]
    assert list(manifest_of(tmp_path / "out").modules) == list(run.modules)


def test_paths_dataframes_and_compressed_jsonl_are_read(gpt2_dir, tmp_path):
    import pandas as pd

    gz = tmp_path / "corpus.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(jsonl({"text": t} for t in TEXTS))
    frame = pd.DataFrame({"body": TEXTS, "n": range(3)})
    runs = {
        "list": cs.capture(gpt2_dir, TEXTS, "transformer.h.0", tmp_path / "a", progress=False),
        "jsonl.gz": cs.capture(gpt2_dir, gz, "transformer.h.0", tmp_path / "b", progress=False),
        "DataFrame": cs.capture(tmp_path.joinpath(gpt2_dir), frame, "transformer.h.0",
                                tmp_path / "c", text_field="body", progress=False),
    }
    rows = {kind: cs.scan(run.path).collect() for kind, run in runs.items()}
    assert all(frame.equals(rows["list"]) for frame in rows.values())
    assert runs["DataFrame"].docs == 3


def test_a_lone_carriage_return_stays_inside_its_txt_line(gpt2_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"one\rstill line one\ntwo\r\nthree\n")
    assert subprocess.run(["wc", "-l", str(corpus)], capture_output=True, text=True).stdout.split()[0] == "3"
    run = cs.capture(gpt2_dir, corpus, "transformer.h.0", tmp_path / "out", store_text=True,
                     progress=False)
    docs = cs.docs(run.path).sort("doc_id").collect()
    assert docs["doc_id"].to_list() == [0, 1, 2]
    assert docs["text"].to_list() == ["one\rstill line one", "two", "three"]


def test_module_that_changes_the_sequence_length_is_refused(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    model.lm_head.register_forward_hook(lambda module, args, output: output[:, :1])  # pools
    with pytest.raises(errors.ModuleOutputError,
                       match=r"^module 'lm_head' returns \(2, 1, \d+\) for an input of \d+ tokens: "
                             r"it changes the sequence length"):
        cs.capture(model, TEXTS, "lm_head", tmp_path / "out",
                   tokenizer=AutoTokenizer.from_pretrained(gpt2_dir), progress=False)
    assert os.listdir(tmp_path) == []


def test_read_only_filesystem_mid_run_is_one_error_and_committed_shards_verify(
        gpt2_dir, tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def replace(src, dst):  # the filesystem turns read-only after the first shard's commit
        if "/data/module=" in os.fspath(dst):
            if renames:
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(dst))
            renames.append(dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    with pytest.raises(errors.OutputError) as info:
        cs.capture(gpt2_dir, TEXTS * 4, "transformer.h.0", out, shard_size=3, batch_size=3,
                   progress=False)
    assert "\n" not in str(info.value)
    assert re.search(r"^cannot write to '.*out': \[Errno 30\] Read-only file system: .* Committed "
                     r"shards are intact; fix the problem, then rerun the same command with --resume",
                     str(info.value)), str(info.value)
    monkeypatch.undo()
    assert manifest_of(out).status == "failed"
    assert len(manifest_of(out).shards) >= 1  # shards committed before the failure
    cs.capture(gpt2_dir, TEXTS * 4, "transformer.h.0", out, shard_size=3, batch_size=3,
               progress=False, resume=True)  # keeps the committed shard, finishes the rest
    assert manifest_of(out).status == "complete"
    assert cs.verify(out)["rows"] == manifest_of(out).counts.rows["transformer.h.0"]
    reference = cs.capture(gpt2_dir, TEXTS * 4, "transformer.h.0", tmp_path / "reference",
                           shard_size=3, batch_size=3, progress=False)
    assert_same_rows(out, reference.path)  # the resumed run lost and duplicated nothing


# -- the CLI: the same errors, one line each, in one subprocess -------------------------------

CLI_SCRIPT = r"""
import contextlib, io, json, logging, sys
from crowstream.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException as error:  # a traceback would escape here
            code = f"raised {type(error).__name__}"
        logging.getLogger("some.library").warning("a third-party warning")
    results.append([code, err.getvalue()])
import datasets, transformers
results.append({"root_handlers": len(logging.getLogger().handlers),
                "datasets_bars": datasets.utils.logging.is_progress_bar_enabled(),
                "transformers_bars": transformers.utils.logging.is_progress_bar_enabled()})
print(json.dumps(results))
"""


def test_cli_prints_one_line_per_error_and_only_crowstream_logs_as_crowstream(gpt2_dir, tmp_path):
    empty = write(tmp_path / "empty.jsonl", "")
    corpus = write(tmp_path / "corpus.jsonl", jsonl([{"body": "x"}]))
    cases = [
        (["capture", gpt2_dir, empty, "-m", "transformer.h.0", "-o", str(tmp_path / "o1"),
          "--no-progress"], r"^crowstream: error: data file '.*empty\.jsonl' is empty"),
        (["capture", gpt2_dir, corpus, "-m", "transformer.h.0", "-o", str(tmp_path / "o2"),
          "--no-progress"], r"^crowstream: error: document 0 has no field 'text'"),
        (["capture", gpt2_dir, corpus, "-m", "h.0", "-o", str(tmp_path / "o3"), "--context-size",
          "-1", "--no-progress"], r"^crowstream: error: context_size must be a positive integer"),
        (["info", str(tmp_path)], r"^crowstream: error: .* has no crowstream\.json"),
    ]
    done = subprocess.run([sys.executable, "-c", CLI_SCRIPT, json.dumps([a for a, _ in cases])],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    *results, state = json.loads(done.stdout)
    for (code, stderr), (argv, pattern) in zip(results, cases):
        lines = stderr.splitlines()
        assert code == 1, (argv, code, stderr)
        assert "Traceback" not in stderr
        assert re.search(pattern, lines[0]), lines
        # the third-party warning is printed as the third party's, never as crowstream's
        assert lines[1:] == ["a third-party warning"], lines
    assert state == {"root_handlers": 0, "datasets_bars": False, "transformers_bars": False}
    assert sorted(os.listdir(tmp_path)) == ["corpus.jsonl", "empty.jsonl"]


if __name__ == "__main__":  # the catalogue's messages, as a table for the closing note
    import tempfile
    import pathlib

    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import build_tiny_gpt2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        gpt2 = str(tmp / "gpt2")
        build_tiny_gpt2(gpt2)
        from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

        tok = AutoTokenizer.from_pretrained(gpt2)
        T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8,
                                            num_layers=1, num_heads=2)).save_pretrained(tmp / "t5")
        tok.save_pretrained(tmp / "t5")
        cs.capture(gpt2, TEXTS, ["transformer.h.0"], tmp / "ref", progress=False)
        context = {"gpt2_dir": gpt2, "t5_dir": str(tmp / "t5"), "reference": str(tmp / "ref")}
        print("| case | error | message |\n|---|---|---|")
        for i, (name, case) in enumerate(CASES.items()):
            case_dir = tmp / f"case{i}"
            case_dir.mkdir()
            try:
                cs.capture(**call(case_dir, context, case))
                message, kind = "(no error)", "-"
            except errors.CrowstreamError as error:
                message, kind = str(error).replace(str(tmp), "TMP"), type(error).__name__
            print(f"| {name} | {kind} | {message} |")


def test_a_loaded_encoder_decoder_model_is_refused_before_it_is_moved(t5_dir, tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(t5_dir)
    with pytest.raises(errors.ConfigError, match=r"\(T5\) is an encoder-decoder model"):
        cs.capture(model, TEXTS, "encoder.block.0", tmp_path / "out",
                   tokenizer=AutoTokenizer.from_pretrained(t5_dir), device="meta", progress=False)
    assert next(model.parameters()).device.type == "cpu"  # refused before `model.to(device)`
    with pytest.raises(errors.ConfigError, match=r"encoder-decoder"):
        cs.modules(model, tokenizer=AutoTokenizer.from_pretrained(t5_dir))
