"""The documentation runs as written. Every ```python block of README.md and docs/*.md is
executed against a tiny local capture (a 7-block GPT-2 saved as `./gpt2`, `corpus.txt`,
and `acts/` captured as the README's quick start does), except blocks whose first line
says `# needs: cuda`, `# needs: processes` or `# needs: bucket`. The README's CLI quick
start runs line by line; docs/api.md names every public function."""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil

import pytest

import crowstream as cs
from conftest import build_tiny_gpt2, python_paragraphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
NEEDS = re.compile(r"^# needs: (cuda|processes|bucket)\b")
# Loops sized for a real run, cut to what a tiny capture can feed (the only edits made)
SMALLER = {"range(20_000)": "range(20)", "shuffle_buffer=1_000_000": "shuffle_buffer=10_000"}
CAPTURE = dict(modules=["transformer.h.6", "transformer.h.2"], context_size=256, batch_size=32)


def _blocks(language: str) -> list:
    found = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            text = f.read()
        for i, code in enumerate(re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)):
            found.append(pytest.param(code, id=f"{page}[{i}]"))
    return found


@pytest.fixture(scope="module")
def world(tmp_path_factory, gpt2):
    """A directory holding `gpt2/` (7 blocks, 256 positions, as `./my-model` too),
    `corpus.txt` and `acts/` (the README's quick-start capture)."""
    root = tmp_path_factory.mktemp("docs-world")
    build_tiny_gpt2(str(root / "gpt2"), n_layer=7, n_positions=256, tokenizer=gpt2[1])
    os.symlink("gpt2", root / "my-model")
    (root / "corpus.txt").write_text("\n".join(p.replace("\n", " ") for p in python_paragraphs(16)))
    cs.capture(str(root / "gpt2"), str(root / "corpus.txt"), CAPTURE["modules"], str(root / "acts"),
               context_size=256, batch_size=32, progress=False)
    return root


@pytest.fixture
def workdir(world, tmp_path, monkeypatch):
    """A fresh copy of the world as the current directory; load_dataset caches under it."""
    import datasets

    for name in ("gpt2", "my-model", "corpus.txt"):
        os.symlink(world / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


@pytest.mark.parametrize("code", _blocks("python"))
def test_python_block_runs(code, world, workdir):
    if NEEDS.match(code):
        pytest.skip(code.splitlines()[0])
    if "cs.capture(" not in code:  # a block that reads needs the capture; one that captures makes it
        shutil.copytree(world / "acts", workdir / "acts")
    for big, small in SMALLER.items():
        code = code.replace(big, small)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def test_readme_cli_quick_start_runs_line_by_line(world, workdir, capsys):
    from crowstream.cli import main

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = re.search(r"## Quick start \(CLI\)\n+```bash\n(.*?)^```", readme, re.M | re.S).group(1)
    lines = [shlex.split(line.split("  #")[0].replace("\\\n", " "))
             for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]
    ran = []
    for argv in lines:
        if argv[:3] == ["python", "-m", "crowstream"]:
            argv = argv[2:]
        assert argv[0] == "crowstream", argv
        if argv[1] == "demo":  # minutes of a real model: `make demo` is that command
            continue
        try:
            assert main(argv[1:]) in (0, None), argv
        except SystemExit as exit:  # --help
            assert exit.code == 0, argv
        ran.append(argv[1])
    assert ran == ["modules", "capture", "info", "verify", "rewrite", "report", "--help"]
    assert "transformer.h.6" in capsys.readouterr().out
    assert os.path.getsize(workdir / "report.html") > 10_000
    assert cs.info("acts")["status"] == "complete"


def test_api_page_lists_every_public_name():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        page = f.read()
    missing = [name for name in cs.__all__ if f"cs.{name}" not in page]
    assert not missing, f"docs/api.md does not document {missing}"


def test_the_two_commands_exist():
    with open(os.path.join(ROOT, "Makefile")) as f:
        targets = re.findall(r"^(\w+):", f.read(), re.M)
    assert {"demo", "test"} <= set(targets)
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert "make demo" in readme and "make test" in readme
