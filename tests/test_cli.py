"""The command line end to end, in real subprocesses, on the tiny GPT-2's saved directory
and a .txt corpus. Each process pays ~5 s of imports, so there are few of them: one
capture shared by the tests, then info, verify (intact and damaged), modules, and one
failing capture.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import crowstream as cs

N_DOCS = 20


def _command(args, script):
    if script:  # the console script installed with the package
        return [os.path.join(os.path.dirname(sys.executable), "crowstream"), *args]
    return [sys.executable, "-m", "crowstream", *args]


def _start(*args, script=False) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(_command(args, script), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def crowstream(*args, script=False) -> subprocess.CompletedProcess:
    """Run the CLI to completion; -> CompletedProcess with text stdout/stderr."""
    return _finish(_start(*args, script=script))


def error_lines(stderr: str) -> list[str]:
    """stderr lines other than third-party progress bars (e.g. transformers' 'Loading weights')."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.search(r"\d+%\|", line)]


@pytest.fixture(scope="module")
def corpus_txt(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    path.write_text("\n".join(corpus[:N_DOCS]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def slow_commands(gpt2_dir, corpus_txt, tmp_path_factory):
    """The three commands that load a model, started together (they are independent, and
    most of their time is imports); -> (base dir, result(name) -> CompletedProcess)."""
    base = tmp_path_factory.mktemp("cli")
    processes = {
        "capture": _start("capture", gpt2_dir, corpus_txt, "-m", "transformer.h.*",
                          "-m", "transformer.**.mlp.c_fc", "-o", str(base / "acts"),
                          "--shard-size", "7", "--batch-size", "4", "--no-progress"),
        "modules": _start("modules", gpt2_dir),
        "unknown": _start("capture", gpt2_dir, corpus_txt, "-m", "transformer.h.1.mpl",
                          "-o", str(base / "never"), "--no-progress"),
    }
    results = {}

    def result(name):
        if name not in results:
            results[name] = _finish(processes[name])
        return results[name]

    yield base, result
    for process in processes.values():  # only if a test failed before collecting it
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def captured(slow_commands):
    base, result = slow_commands
    capture = result("capture")
    assert capture.returncode == 0, capture.stderr
    assert "Traceback" not in capture.stderr
    return str(base / "acts"), capture


def test_capture(captured, gpt2_dir, corpus_txt, tmp_path):
    out, result = captured
    modules = ["transformer.h.0", "transformer.h.1", "transformer.h.2",
               "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"]
    info = cs.info(out)
    assert list(info["modules"]) == modules  # `*` stays in one component, `**` crosses them
    assert [info["modules"][m]["d"] for m in modules] == [64] * 3 + [256] * 3
    assert info["status"] == "complete" and info["docs"] == N_DOCS and info["shards"] == 3
    rows = info["modules"]["transformer.h.0"]["rows"]
    assert result.stdout.strip() == (
        f"wrote {N_DOCS} documents to {out} ("
        + ", ".join(f"{m}: {rows:,}" for m in modules) + " rows)")
    # the same call through the Python API stores the same rows
    api = cs.capture(gpt2_dir, corpus_txt, ["transformer.h.2"], str(tmp_path / "api"),
                     batch_size=4, shard_size=7, device="cpu", progress=False)
    frames = [cs.scan(path).filter(module="transformer.h.2").sort("doc_id", "position").collect()
              for path in (out, api.path)]
    assert frames[0]["doc_id"].unique().sort().to_list() == list(range(N_DOCS))  # line numbers
    assert frames[0].select("doc_id", "position", "token").equals(frames[1].select("doc_id", "position", "token"))
    cli_vectors, api_vectors = (np.array(f["vector"].to_list(), dtype=np.float32) for f in frames)
    assert cli_vectors.shape == (info["modules"]["transformer.h.2"]["rows"], 64)
    np.testing.assert_allclose(cli_vectors, api_vectors, rtol=0, atol=1e-6)


def test_info_and_verify(captured, tmp_path):
    out, _ = captured
    result = crowstream("info", out, script=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(out)}: complete \(run [0-9a-f]+\)", lines[0])
    assert f"documents: {N_DOCS} (0 skipped)" in result.stdout
    rows = cs.info(out)["modules"]["transformer.h.0"]["rows"]
    assert re.search(rf"^  transformer\.h\.0\.mlp\.c_fc: d=256 float32, {rows:,} rows in 3 file\(s\)",
                     result.stdout, re.M)

    result = crowstream("verify", out)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(out)}: OK \(21 parts, {6 * rows:,} rows, [\d.]+ MiB checked\)\n",
                        result.stdout)

    damaged = str(tmp_path / "damaged")
    shutil.copytree(out, damaged)
    victim = "data/module=transformer.h.1/part-00000-000001-000.parquet"
    path = os.path.join(damaged, victim)
    size = os.path.getsize(path)
    pq.ParquetFile(path)  # readable before
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    result = crowstream("verify", damaged)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"truncated: {victim} has {size // 2:,} bytes, the manifest records {size:,}" in result.stderr
    assert result.stderr.startswith(f"crowstream verify: 1 problem(s) in {damaged}")


def test_modules(slow_commands):
    result = slow_commands[1]("modules")
    assert result.returncode == 0, result.stderr
    listing = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert re.fullmatch(r"transformer\.h\.0\s+GPT2Block\s+\(2, \d+, 64\)", listing["transformer.h.0"])
    assert re.fullmatch(r"transformer\.h\.2\.mlp\.c_fc\s+Conv1D\s+\(2, \d+, 256\)",
                        listing["transformer.h.2.mlp.c_fc"])
    assert "transformer.h" not in listing  # a ModuleList never runs: listed only with --all
    assert "transformer.wpe" not in listing  # one row for the whole batch: not capturable


def test_unknown_module_one_line_error(slow_commands):
    base, result = slow_commands
    out, result = base / "never", result("unknown")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crowstream: error: module 'transformer.h.1.mpl' is not in GPT2LMHeadModel; "
                               "did you mean 'transformer.h.1.mlp'")
    assert result.stdout == ""
    assert not out.exists()  # nothing written


def test_every_capture_option_has_help_and_a_group():
    """`crowstream capture --help` explains every option, grouped by what it is about."""
    import argparse

    from crowstream.cli import build_parser

    parser = build_parser()
    capture = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   ).choices["capture"]
    groups = {g.title: g for g in capture._action_groups}
    assert len(groups) == 7  # positional, options, and five themes
    for action in capture._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings or action.dest} has no help"
    themed = [a for g in capture._action_groups[2:] for a in g._group_actions]
    assert len(themed) > 30 and {"--resume", "--dtype", "--tokens-field", "--packing"} <= {
        flag for a in themed for flag in a.option_strings}
