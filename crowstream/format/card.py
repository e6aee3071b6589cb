"""The dataset card. It owns `OUT/README.md`: one `configs:` entry per module (plus docs
and vocab), so `datasets.load_dataset(OUT, module)` never merges modules, and a summary.
"""

from __future__ import annotations

import json

from .files import write_atomic
from .layout import CARD_NAME, DOCS_DIR, VOCAB_NAME, config_name, module_dir
from .manifest import Manifest


def write_card(out: str, manifest: Manifest) -> None:
    """OUT/README.md: the dataset card, replaced atomically and durably."""
    write_atomic(out, CARD_NAME, card_text(manifest).encode())


def card_text(manifest: Manifest) -> str:
    """The dataset card: one `configs:` entry per module, docs and vocab, and a summary."""
    lines = ["---", "configs:"]
    for name in manifest.modules:
        lines += [f"- config_name: {json.dumps(config_name(name))}", "  data_files:", "  - split: train",
                  f"    path: {json.dumps(module_dir(name) + '/*.parquet')}"]
    lines += ["- config_name: docs", "  data_files:", "  - split: train", f"    path: {DOCS_DIR}/*.parquet",
              "- config_name: vocab", "  data_files:", "  - split: train", f"    path: {VOCAB_NAME}",
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
        "runs, each committed shard has a record in `commits/`.", "",
    ]
    return "\n".join(lines)
