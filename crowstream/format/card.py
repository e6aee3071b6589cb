"""The dataset card. It owns `OUT/README.md`: one `configs:` entry per module (plus docs
and vocab), so `datasets.load_dataset(OUT, module)` never merges modules, and a summary.

Each config lists its committed part files by name, never a glob: a glob would also match
the parts of a shard whose commit is in progress or was cut short (a part renamed into
`data/` before the others, or one left by a crash), and `load_dataset(OUT, module)` would
read part of a shard. The card is rewritten whenever the manifest is consolidated (end,
interrupt, failure, `finalize`, `recover`); a running run's card lists the shards of the
last consolidation, which a resume never removes.
"""

from __future__ import annotations

import json
import re

from .files import write_atomic
from .layout import CARD_NAME, DOCS_DIR, VOCAB_NAME, config_name, module_dir
from .manifest import Manifest

_LISTED = re.compile(r'^    - ("(?:[^"\\]|\\.)*")$', re.M)


def write_card(out: str, manifest: Manifest) -> None:
    """OUT/README.md: the dataset card, replaced atomically and durably."""
    write_atomic(out, CARD_NAME, card_text(manifest).encode())


def _config(name: str, paths: list[str] | str) -> list[str]:
    if isinstance(paths, str):  # a format 2 glob
        return [f"- config_name: {json.dumps(name)}", "  data_files:", "  - split: train",
                f"    path: {paths}"]
    if not paths:  # nothing committed yet: `load_dataset` says the config has no data files
        return [f"- config_name: {json.dumps(name)}", "  data_files:", "  - split: train",
                "    path: []"]
    return [f"- config_name: {json.dumps(name)}", "  data_files:", "  - split: train",
            "    path:", *(f"    - {json.dumps(p)}" for p in paths)]


def card_text(manifest: Manifest) -> str:
    """The dataset card: one `configs:` entry per module listing its committed part files
    (in shard order), docs and vocab, and a summary."""
    lines = ["---", "configs:"]
    globs = manifest.format_version < 3  # formats 1 and 2 wrote globs: verify compares them
    for name in manifest.modules:
        lines += _config(config_name(name), json.dumps(module_dir(name) + "/*.parquet") if globs
                         else [p.path for p in manifest.module_parts(name)])
    lines += _config("docs", f"{DOCS_DIR}/*.parquet" if globs
                     else [p.path for p in manifest.parts if p.kind == "docs"])
    lines += ["- config_name: vocab", "  data_files:", "  - split: train", f"    path: {VOCAB_NAME}",
              "tags:", "- activations", "- interpretability", "- crowstream", "---", ""]
    config = manifest.config
    model = manifest.provenance["model"]
    lines += [
        "# Activation dataset", "",
        f"Written by crowstream from model `{model.get('name_or_path') or model.get('class')}` "
        f"(context {config['context_size']}, {config['dtype']}).", "",
        "| module | d | path |", "|---|---|---|",
        *[f"| `{n}` | {m.d} | `{m.path}/` |" for n, m in manifest.modules.items()], "",
        "Each row is one token: `doc_id` (row index in the source), `position` (token index in "
        "the document), `token` (id; join `vocab.parquet`), `vector` (the module output).", "",
        "```python", "import datasets",
        f"ds = datasets.load_dataset(OUT, {json.dumps(next(iter(manifest.modules)))}, split=\"train\")",
        "```", "", "`crowstream.json` lists every committed part file with its checksum and the "
        "per-module statistics (count, mean, var, mean_norm) once the run has ended; while it "
        "runs, each committed shard has a record in `commits/`." + ("" if globs else
        " The configs above list the part files committed when the manifest was last "
        "consolidated."), "",
    ]
    return "\n".join(lines)


def card_files(text: str) -> set[str]:
    """The part files a card's configs list (as `card_text` writes them)."""
    return {json.loads(found) for found in _LISTED.findall(text)}
