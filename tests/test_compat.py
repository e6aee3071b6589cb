"""Compatibility: one version, read from the package's metadata; 0.1 scripts that read
`run.manifest[...]` keep working, with a DeprecationWarning."""

from __future__ import annotations

import importlib.metadata
import os
import re

import pytest

import crowstream as cs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_pyprojects_and_comes_from_the_metadata():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        declared = re.search(r'(?m)^version = "([^"]+)"$', f.read()).group(1)
    assert declared == "0.3.0"
    assert cs.__version__ == importlib.metadata.version("crowstream")
    url = importlib.metadata.distribution("crowstream").read_text("direct_url.json") or ""
    if f"file://{ROOT}\"" in url:  # installed from this tree (a fresh clone's CI)
        assert cs.__version__ == declared
    with open(os.path.join(ROOT, "crowstream", "__init__.py")) as f:
        assert declared not in f.read()  # one place: pyproject.toml
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## {declared}" in f.read()


def test_manifest_mapping_access_still_works_with_a_deprecation_warning(gpt2, corpus, tmp_path):
    model, tokenizer = gpt2
    run = cs.capture(model, corpus[:4], ["transformer.h.0"], str(tmp_path / "out"),
                     tokenizer=tokenizer, progress=False)
    with pytest.warns(DeprecationWarning, match=r"run\.manifest\['counts'\] is deprecated.*"
                                                r"run\.manifest\.counts"):
        counts = run.manifest["counts"]
    assert counts == run.manifest.counts.to_json() and counts["docs"] == 4
    with pytest.warns(DeprecationWarning):
        assert run.manifest.get("status") == "complete"
    with pytest.warns(DeprecationWarning):
        assert run.manifest.get("no such field", 7) == 7
