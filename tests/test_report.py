"""The HTML report: every section, self-contained (no URL), honest about sampling, and its
numbers (cosine by position) agree with a brute-force computation."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

import crowstream as cs
from crowstream.reading import reporting as rp
from crowstream.cli import main
from crowstream.demo import DEMO_MODULES
from helpers import read_rows

SECTIONS = ["Run summary", "Distribution of vector norms", "Mean norm by position",
            "Variance spectrum", "Tokens with the highest mean norm", "Top-norm contexts",
            "Cosine similarity between adjacent modules"]


@pytest.fixture(scope="module")
def demo_out(minilm_dir, tmp_path_factory):
    """The demo's capture (all-MiniLM-L6-v2, its two layers, Python's docs), fewer documents."""
    from crowstream.demo import python_doc_paragraphs

    out = str(tmp_path_factory.mktemp("demo") / "out")
    cs.capture(minilm_dir, python_doc_paragraphs(60), DEMO_MODULES, out, batch_size=16,
               progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def gpt2_out(gpt2_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpt2") / "out")
    cs.capture(gpt2_dir, corpus[:60], ["transformer.h.0", "transformer.h.2"], out,
               context_size=16, overflow="chunk", shard_size=10, progress=False)
    return out


def check_page(page: str, modules: list[str]) -> None:
    for section in SECTIONS:
        assert section in page, f"missing section {section!r}"
    for module in modules:
        assert f"<h2>{module} <small>" in page
    assert not re.search(r"https?://|src=\"http|src='http|url\(", page), "the report must not load anything"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3 * len(modules) + 1
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)


def test_report_of_the_demo_output(demo_out, tmp_path):
    path = tmp_path / "report.html"
    done = cs.report(demo_out, path)
    page = path.read_text(encoding="utf-8")
    check_page(page, DEMO_MODULES)
    assert "Not sampled: every row was read." in page
    assert done["modules"][DEMO_MODULES[0]]["sampled_rows"] == done["modules"][DEMO_MODULES[0]]["rows"]
    assert len(re.findall(r"«<b>[^<]+</b>»", page)) >= 20  # contexts decoded, token marked
    assert "encoder.layer.2 → encoder.layer.5" in page


def test_report_of_a_chunked_two_module_capture_samples_and_says_so(gpt2_out, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "REPORT_FILES", 3)
    rows = cs.info(gpt2_out)["modules"]["transformer.h.0"]["rows"]
    path = tmp_path / "r.html"
    done = cs.report(gpt2_out, path, max_rows=rows // 4)
    page = path.read_text(encoding="utf-8")
    check_page(page, ["transformer.h.0", "transformer.h.2"])
    sampled = done["modules"]["transformer.h.0"]["sampled_rows"]
    assert 0 < sampled < rows
    assert f"Sampled: transformer.h.0: {sampled:,} of {rows:,} rows" in page


def test_sample_plan_is_bounded_and_deterministic(gpt2_out, monkeypatch):
    from crowstream.reading.catalog import Catalog

    catalog = Catalog(gpt2_out)
    module = catalog.module("transformer.h.2")
    files = module.paths
    assert len(files) == 6
    monkeypatch.setattr(rp, "REPORT_FILES", 3)
    plan = rp.sample_plan(catalog, module, 10**9)
    assert plan.files_opened == 3 and list(plan.groups) == [files[0], files[2], files[5]]
    assert rp.sample_plan(catalog, module, 10**9).groups == plan.groups
    one = rp.sample_plan(catalog, module, 1)  # never less than one whole row group
    assert sum(map(len, one.groups.values())) == 1


def test_cosine_by_position_matches_brute_force(gpt2_out):
    from crowstream.reading.catalog import Catalog

    catalog = Catalog(gpt2_out)
    files_a, files_b = catalog.module("transformer.h.0"), catalog.module("transformer.h.2")
    plan = rp.sample_plan(catalog, files_a, 10**9)
    sums, counts = rp.paired_cosines(catalog, files_a, plan.groups, files_b)
    rows = read_rows(gpt2_out)
    (doc_a, pos_a, _, va), (doc_b, pos_b, _, vb) = rows["transformer.h.0"], rows["transformer.h.2"]
    assert np.array_equal(doc_a, doc_b) and np.array_equal(pos_a, pos_b)
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    want = np.bincount(pos_a, cos) / np.bincount(pos_a)
    assert counts.sum() == len(cos)
    np.testing.assert_allclose(sums / counts, want, rtol=1e-5)


def test_cli_report(gpt2_out, tmp_path, capsys):
    path = tmp_path / "cli.html"
    assert main(["report", gpt2_out, "-o", str(path)]) == 0
    assert re.search(r"wrote .*cli\.html \([\d,]+ of [\d,]+ rows read\)", capsys.readouterr().out)
    check_page(path.read_text(encoding="utf-8"), ["transformer.h.0", "transformer.h.2"])


@pytest.mark.slow
def test_analysis_benchmark_tiny_prints_every_number(tmp_path):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks", "analysis.py")
    done = subprocess.run([sys.executable, script, "--tiny", "--tmp", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("(1) raw read", "(2) cs.top", "(3) polars", "ratio (2)/(1)", "same top 20 from (2) and (3): True",
                 "peak RSS of cs.top", "cs.report scaling", "targets:"):
        assert line in done.stdout, f"missing {line!r} in:\n{done.stdout}"
    assert len(re.findall(r"^  report: +[\d,]+ rows per module", done.stdout, re.M)) == 3
    assert not os.listdir(tmp_path), "the benchmark left files behind"


def test_report_without_a_saved_tokenizer_says_contexts_are_unavailable(gpt2_out, tmp_path):
    import os
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(gpt2_out, old)
    shutil.rmtree(os.path.join(old, "tokenizer"))  # as crowstream 0.1 wrote it
    cs.report(old, tmp_path / "old.html")
    page = (tmp_path / "old.html").read_text(encoding="utf-8")
    check_page(page, ["transformer.h.0", "transformer.h.2"])
    assert page.count("contexts unavailable: ") == 2 and "no tokenizer/" in page
