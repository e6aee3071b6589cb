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
from crowstream.reading.catalog import Catalog
from helpers import read_rows

SECTIONS = ["Run summary", "Distribution of vector norms", "Mean norm by position",
            "Variance spectrum", "Tokens with the highest mean norm", "Top-norm contexts",
            "… at position ≥ 1", "Cosine similarity between consecutive modules"]


@pytest.fixture(scope="module")
def demo_out(minilm_dir, tmp_path_factory):
    """The demo's capture (all-MiniLM-L6-v2, its two layers, Python's docs), fewer documents."""
    from crowstream.demo import python_doc_paragraphs

    out = str(tmp_path_factory.mktemp("demo") / "out")
    cs.capture(minilm_dir, python_doc_paragraphs(60), DEMO_MODULES, out, batch_size=16,
               progress=False, device="cpu")
    return out


# listed out of execution order: the MLP's input is computed inside block 0, before its output
GPT2_MODULES = ["transformer.h.2", "transformer.h.0", "transformer.h.0.mlp:input"]
EXECUTION = ["transformer.h.0.mlp:input", "transformer.h.0", "transformer.h.2"]


@pytest.fixture(scope="module")
def gpt2_out(gpt2_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gpt2") / "out")
    cs.capture(gpt2_dir, corpus[:60], GPT2_MODULES, out,
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
    assert "execution order, recorded at capture" in page


def test_report_of_a_chunked_capture_samples_and_says_so(gpt2_out, tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "REPORT_FILES", 3)
    rows = cs.info(gpt2_out)["modules"]["transformer.h.0"]["rows"]
    calls = []
    real = rp.shard_rows
    monkeypatch.setattr(rp, "shard_rows", lambda c, f, *a: calls.append(f.name) or real(c, f, *a))
    path = tmp_path / "r.html"
    cap = rows // 4 * 64 * 4  # a quarter of the rows' float32 vectors
    done = cs.report(gpt2_out, path, max_bytes=cap)
    page = path.read_text(encoding="utf-8")
    check_page(page, GPT2_MODULES)
    sampled = done["modules"]["transformer.h.0"]["sampled_rows"]
    assert 0 < sampled < rows and sampled * 64 * 4 <= cap
    assert {m["sampled_rows"] for m in done["modules"].values()} == {sampled}  # the same rows
    assert f"Sampled: transformer.h.0.mlp:input: {sampled:,} of {rows:,} rows" in page
    # each module read once: one read per (range, module), none for the cosines
    assert sorted(set(calls)) == sorted(GPT2_MODULES)
    assert len(calls) == 3 * len(rp.sample_plan(Catalog(gpt2_out), Catalog(gpt2_out).module(
        "transformer.h.0"), cap // (64 * 4)).ranges)


def test_sample_plan_is_bounded_and_deterministic(gpt2_out, monkeypatch):
    catalog = Catalog(gpt2_out)
    module = catalog.module("transformer.h.2")
    assert len(module.paths) == 6
    monkeypatch.setattr(rp, "REPORT_FILES", 3)
    plan = rp.sample_plan(catalog, module, 10**9)
    assert plan.files_opened == 3 and {r[0] for r in plan.ranges} == {module.shards[i] for i in (0, 2, 5)}
    assert rp.sample_plan(catalog, module, 10**9).ranges == plan.ranges
    one = rp.sample_plan(catalog, module, 1)  # never less than one whole row group
    assert len(one.ranges) == 1


def test_report_reads_the_committed_state_once(gpt2_out, tmp_path, monkeypatch):
    from crowstream.format import records

    reads, built, read_manifest, init = [], [], records.read_manifest, Catalog.__init__
    monkeypatch.setattr(records, "read_manifest", lambda out: reads.append(out) or read_manifest(out))
    monkeypatch.setattr(Catalog, "__init__", lambda self, *a, **k: built.append(a) or init(self, *a, **k))
    cs.report(gpt2_out, tmp_path / "report.html")
    assert len(reads) == 1 and len(built) == 1


def test_report_values_equal_numpy(gpt2_out, tmp_path):
    """Every number of a module's section, recomputed from all rows with numpy."""
    catalog = Catalog(gpt2_out)
    names, recorded = rp.execution_order(catalog)
    assert names == EXECUTION and recorded
    samples, cosines, plan = rp.sample_modules(catalog, names, 10**12, None)
    exact = Catalog(gpt2_out, stats=True).manifest.stats
    rows = read_rows(gpt2_out)
    for name in names:
        doc_id, position, token, vectors = rows[name]
        v = rp.module_values(samples[name], exact[name])
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
        assert v["rows"] == len(norms)
        counts, edges = np.histogram(norms, bins=rp.NORM_BINS)
        assert v["norm_counts"].tolist() == counts.tolist()
        np.testing.assert_allclose(v["norm_edges"], edges, rtol=1e-12)
        np.testing.assert_allclose(v["norm_quantiles"], np.quantile(norms, [0.5, 0.99, 1]))
        lo, hi, means, n = v["positions"]
        assert lo.tolist()[:4] == [0, 1, 2, 4] and hi.tolist()[:4] == [1, 2, 4, 8]
        for a, b, mean, count in zip(lo, hi, means, n):
            inside = (position >= a) & (position < b)
            assert count == inside.sum() and mean == pytest.approx(norms[inside].mean(), rel=1e-9)
        assert n.sum() == len(norms)
        ratio = norms[position == 0].mean() / norms[position >= 1].mean()
        assert v["position0_ratio"] == pytest.approx(ratio, rel=1e-9)
        assert v["variance_source"] == "exact"
        np.testing.assert_allclose(v["variance"], vectors.astype(np.float64).var(0), rtol=1e-5)
        assert v["nonfinite"] == 0 and v["clamped"] == 0
        for key, keep in (("all", position >= 0), ("after0", position >= 1)):
            check_top_tokens(v["top_tokens"][key], token[keep], norms[keep])
            frame = v["top_rows"][key]
            want = top_per_doc(norms[keep], doc_id[keep], position[keep], rp.TOP_CONTEXTS)
            assert list(zip(frame["doc_id"], frame["position"])) == want
        assert (v["top_rows"]["after0"]["position"] >= 1).all()
    assert list(cosines) == list(zip(EXECUTION, EXECUTION[1:]))
    for (a, b), (sums, counts) in cosines.items():
        (_, pos, _, va), (_, _, _, vb) = rows[a], rows[b]
        cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
        np.testing.assert_allclose(sums / counts, np.bincount(pos, cos) / np.bincount(pos), rtol=1e-5)
    page = rp.report(gpt2_out, tmp_path / "v.html")
    html = (tmp_path / "v.html").read_text(encoding="utf-8")
    assert page["modules"]["transformer.h.2"]["sampled_rows"] == len(rows["transformer.h.2"][0])
    ratio = rp.module_values(samples["transformer.h.2"], exact["transformer.h.2"])["position0_ratio"]
    assert f"position &gt;= 1 mean norm: {ratio:.3g}" in html
    assert html.index("<h2>transformer.h.0.mlp:input") < html.index("<h2>transformer.h.0 <")
    assert "transformer.h.0 → transformer.h.2" in html and "transformer.h.2 → " not in html


def check_top_tokens(found, token, norms):
    ids, counts, means, least = found
    sums, seen = np.bincount(token, norms), np.bincount(token)
    ok = np.flatnonzero(seen >= least)
    order = ok[np.lexsort((ok, -(sums[ok] / seen[ok])))][:rp.TOP_TOKENS]
    assert least == 5 and ids.tolist() == order.tolist()
    assert counts.tolist() == seen[order].tolist()
    np.testing.assert_allclose(means, sums[order] / seen[order], rtol=1e-12)


def top_per_doc(norms, doc_id, position, k):
    kept, used = [], set()
    for i in np.lexsort((position, doc_id, -norms)):
        if doc_id[i] not in used:
            used.add(doc_id[i])
            kept.append((doc_id[i], position[i]))
    return kept[:k]


def test_an_output_without_recorded_order_falls_back_and_says_so(gpt2_out, tmp_path):
    import shutil

    from helpers import raw_manifest, save_manifest

    old = str(tmp_path / "old")
    shutil.copytree(gpt2_out, old)
    manifest = raw_manifest(old)
    for spec in manifest["modules"].values():
        spec.pop("order")
    save_manifest(old, manifest)
    assert rp.execution_order(Catalog(old)) == (GPT2_MODULES, False)
    cs.report(old, tmp_path / "old.html")
    page = (tmp_path / "old.html").read_text(encoding="utf-8")
    assert "does not record the modules&#x27; execution order" in page
    assert "transformer.h.2 → transformer.h.0" in page


def test_cli_report(gpt2_out, tmp_path, capsys):
    path = tmp_path / "cli.html"
    assert main(["report", gpt2_out, "-o", str(path)]) == 0
    assert re.search(r"wrote .*cli\.html \([\d,]+ of [\d,]+ rows read\)", capsys.readouterr().out)
    check_page(path.read_text(encoding="utf-8"), GPT2_MODULES)


@pytest.mark.slow
def test_analysis_benchmark_tiny_prints_every_number(tmp_path, capsys):
    import os

    from helpers import run_benchmark_here

    out = run_benchmark_here("analysis.py", ["--tiny", "--tmp", str(tmp_path)], capsys)
    for line in ("(1) raw read", "(2) cs.top", "(3) polars", "ratio (2)/(1)", "same top 20 from (2) and (3): True",
                 "peak RSS of cs.top", "cs.report scaling", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert len(re.findall(r"^  report: +[\d,]+ rows per module", out, re.M)) == 3
    assert not os.listdir(tmp_path), "the benchmark left files behind"


def test_report_without_a_saved_tokenizer_says_contexts_are_unavailable(gpt2_out, tmp_path):
    import os
    import shutil

    old = str(tmp_path / "old")
    shutil.copytree(gpt2_out, old)
    shutil.rmtree(os.path.join(old, "tokenizer"))  # as crowstream 0.1 wrote it
    cs.report(old, tmp_path / "old.html")
    page = (tmp_path / "old.html").read_text(encoding="utf-8")
    check_page(page, GPT2_MODULES)
    assert page.count("contexts unavailable: ") == 6 and "no tokenizer/" in page
