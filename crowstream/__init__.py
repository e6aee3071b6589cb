"""crowstream: a language model + a text corpus -> an activation dataset in Parquet.

    import crowstream as cs
    run = cs.capture("gpt2", "corpus.txt", ["transformer.h.6"], "acts/")
    ds = cs.load("acts/", "transformer.h.6")          # datasets.Dataset
    lf = cs.scan("acts/")                             # polars.LazyFrame
    cs.top("acts/", "transformer.h.6", "norm")        # top rows with their contexts
    cs.report("acts/", "report.html")                 # one self-contained HTML report

Importing this package is cheap: torch, transformers, nnsight and datasets load only
when a function that needs them runs.
"""

from __future__ import annotations

import importlib
import importlib.metadata

try:  # the one version is pyproject.toml's, read from the installed package's metadata
    __version__ = importlib.metadata.version("crowstream")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    # capture: the pipeline
    "capture": ".pipeline.run", "Run": ".pipeline.session", "modules": ".pipeline.models",
    "finalize": ".pipeline.ranks",
    # the on-disk format
    "verify": ".format.integrity", "rewrite": ".format.reencode",
    # reading
    "load": ".reading.readers", "scan": ".reading.readers", "vocab": ".reading.readers",
    "docs": ".reading.readers", "info": ".reading.readers",
    "stream": ".reading.loader", "Stream": ".reading.loader", "stats": ".reading.loader",
    "top": ".reading.analysis", "contexts": ".reading.analysis", "report": ".reading.reporting",
    "CrowstreamError": ".errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'crowstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
