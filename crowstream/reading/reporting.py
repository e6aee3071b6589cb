"""The report (`crowstream.report`; the module is not named `report` so it cannot shadow the
function). It owns `report(out, path)` (`crowstream report OUT -o report.html`) and the
numbers it shows (`module_values`); `report_page.py` draws and lays them out as one
self-contained HTML file.

Per module it shows the distribution of vector norms, the mean norm by position (log
bins, with the position-0 ratio as a number), the exact per-dimension variance spectrum
(from the capture's statistics, not the sample), non-finite and clamped counts, the tokens
with the highest mean norm and the top-norm contexts (over all rows and over position >= 1,
since position 0 is an attention sink in real LMs); then the cosine similarity between
modules that run one after the other (the execution order recorded at capture; older
outputs fall back to manifest order, and the page says so).

Its cost is bounded by construction: a sample plan on the widest module picks whole row
groups (evenly spaced, from at most `REPORT_FILES` evenly spaced part files) until
`max_bytes` of float32 vectors; every module then reads exactly those (shard, row) ranges
once, all modules in lockstep, so the paired cosines need no second read.
"""

from __future__ import annotations

import os

import numpy as np

from crowstream.errors import ConfigError
from crowstream.reading.catalog import Catalog, ModuleFiles, aligned, shard_rows, vector_array

REPORT_BYTES = 256 << 20  # float32 vectors read per module, at most (whole row groups)
REPORT_FILES = 16         # part files of the widest module opened, at most (footers)
TOP_TOKENS = 15
TOP_CONTEXTS = 10
MIN_TOKEN_COUNT = 5       # a token's mean norm is shown only when seen this often in the sample
NORM_BINS = 80
COLUMNS = ["doc_id", "position", "token", "vector"]


def report(out, path, *, max_bytes: int = REPORT_BYTES, max_rows: int | None = None,
           storage_options: dict | None = None) -> dict:
    """Write the HTML report of capture `out` (a path or URL with fsspec
    `storage_options`) to the local file `path`; -> {"path", "modules": {name: {"rows",
    "sampled_rows"}}}. At most `max_bytes` of float32 vectors (and `max_rows` rows, if
    given) are read per module: whole row groups, chosen deterministically; the report
    states the sample's size."""
    from crowstream.reading import report_page
    from crowstream.reading.readers import info

    out, path = os.fspath(out), os.fspath(path)
    for name, value in (("max_bytes", max_bytes), ("max_rows", max_rows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    report_page.check_matplotlib()
    committed = Catalog(out, storage_options, stats=True)  # OUT's committed state, read once
    summary, exact = info(committed), committed.manifest.stats
    catalog = committed.readable()
    names, recorded = execution_order(catalog)
    samples, cosines, plan = sample_modules(catalog, names, max_bytes, max_rows)
    values = {name: module_values(samples[name], exact.get(name)) for name in names}
    page = report_page.page(catalog, summary, names, recorded, values, cosines, plan)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return {"path": path, "modules": {name: {"rows": summary["modules"][name]["rows"],
                                             "sampled_rows": samples[name].rows}
                                      for name in names}}


def execution_order(catalog: Catalog) -> tuple[list[str], bool]:
    """-> (module names in the model's execution order, whether it was recorded): outputs
    written before 0.3 have no `order`, and then the manifest's order stands."""
    modules = catalog.modules
    if modules and all(m.order is not None for m in modules.values()):
        return sorted(modules, key=lambda name: modules[name].order), True
    return list(modules), False


class SamplePlan:
    """Which rows to read: `ranges` of (shard, first row, end row) counted within the shard,
    chosen from whole row groups of the `reference` module (the widest)."""

    def __init__(self, ranges: list[tuple[int, int, int]], rows: int, files_opened: int,
                 files: int, row_groups_seen: int, reference: str = ""):
        self.ranges, self.rows, self.reference = ranges, rows, reference
        self.files_opened, self.files, self.row_groups_seen = files_opened, files, row_groups_seen


def sample_plan(catalog: Catalog, module: ModuleFiles, max_rows: int) -> SamplePlan:
    """At most REPORT_FILES files evenly spaced over the module's files, then row groups
    evenly spaced among theirs until `max_rows` rows (never less than one row group).
    Deterministic: same OUT, same sample."""
    chosen = _evenly(len(module.paths), REPORT_FILES)
    starts = module.shard_starts()
    groups = []  # (shard, first row in the shard, rows)
    for i in chosen:
        metadata = catalog.open(module.paths[i]).metadata
        shard, first = module.shards[i], starts[i]
        for g in range(metadata.num_row_groups):
            groups.append((shard, first, metadata.row_group(g).num_rows))
            first += metadata.row_group(g).num_rows
    rows = np.array([g[2] for g in groups], dtype=np.int64)
    if rows.sum() > max_rows:
        n = int(np.clip(np.ceil(max_rows / max(rows.mean(), 1)), 1, len(groups)))
        picked = _evenly(len(groups), n)
        while n > 1 and rows[picked].sum() > max_rows:  # row groups differ in size
            n -= 1
            picked = _evenly(len(groups), n)
        groups = [groups[i] for i in picked]
    ranges = [(shard, first, first + n) for shard, first, n in groups]
    return SamplePlan(ranges, int(sum(g[2] for g in groups)), len(chosen), len(module.paths),
                      len(rows), module.name)


def _evenly(n: int, at_most: int) -> list[int]:
    """`at_most` indices spread evenly over range(n) (all of them when n <= at_most)."""
    if n <= at_most:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, at_most)})


def sample_modules(catalog: Catalog, names: list[str], max_bytes: int, max_rows: int | None):
    """Read the plan's rows of every module once, in lockstep: -> (ModuleSample per module,
    {(a, b): (cosine sums, counts) by position} for consecutive modules of equal width, plan)."""
    files = {name: catalog.module(name) for name in names}
    samples = {name: ModuleSample(files[name].d) for name in names}
    cosines = {(a, b): (np.zeros(0), np.zeros(0)) for a, b in zip(names, names[1:])
               if files[a].d == files[b].d}
    if not names:
        return samples, cosines, SamplePlan([], 0, 0, 0, 0)
    widest = max(names, key=lambda name: files[name].d)
    rows = max(max_bytes // (4 * files[widest].d), 1)
    plan = sample_plan(catalog, files[widest], min(rows, max_rows or rows))
    for shard, start, stop in plan.ranges:
        first, previous = None, None
        for name in names:
            table = shard_rows(catalog, files[name], shard, start, stop, COLUMNS)
            ids = {key: table.column(key).to_numpy() for key in ("doc_id", "position")}
            if first is None:
                first = (name, ids)
            else:
                aligned(first[0], name, f"shard {shard} from row {start}", first[1], ids)
            vectors = vector_array(table.column("vector"), files[name].d, np.float32)  # [M, d]
            samples[name].add(ids["doc_id"], ids["position"], table.column("token").to_numpy(),
                              vectors)
            if previous is not None and (previous[0], name) in cosines:
                pair = (previous[0], name)
                cosines[pair] = _add_bins(*cosines[pair], ids["position"],
                                          _cosine(previous[1], vectors))
            previous = (name, vectors)
    return samples, cosines, plan


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [M, d] arrays, in float64."""
    return np.einsum("ij,ij->i", a, b, dtype=np.float64) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


class ModuleSample:
    """Streaming statistics of one module's sampled rows (float64 accumulators), over all
    rows and over the rows at position >= 1."""

    def __init__(self, d: int):
        from crowstream.reading.analysis import TopK

        self.rows = 0
        self.norms: list[np.ndarray] = []
        self.dim_sum, self.dim_sq = np.zeros(d), np.zeros(d)
        self.position_sum, self.position_count = np.zeros(0), np.zeros(0)
        self.tokens = {"all": (np.zeros(0), np.zeros(0)), "after0": (np.zeros(0), np.zeros(0))}
        self.top = {"all": TopK(TOP_CONTEXTS, per_doc=1), "after0": TopK(TOP_CONTEXTS, per_doc=1)}

    def add(self, doc_id, position, token, vectors) -> None:
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))  # [B]
        self.rows += len(norms)
        self.norms.append(norms)
        self.dim_sum += vectors.sum(0, dtype=np.float64)
        self.dim_sq += np.einsum("ij,ij->j", vectors, vectors, dtype=np.float64)
        self.position_sum, self.position_count = _add_bins(
            self.position_sum, self.position_count, position, norms)
        later = position >= 1
        for key, keep in (("all", slice(None)), ("after0", later)):
            self.tokens[key] = _add_bins(*self.tokens[key], token[keep], norms[keep])
            self.top[key].add(norms[keep], doc_id[keep], position[keep], token[keep])

    def sample_variance(self) -> np.ndarray:
        n = max(self.rows, 1)
        return np.maximum(self.dim_sq / n - (self.dim_sum / n) ** 2, 0.0)


def _add_bins(sums, counts, keys, weights):
    """Grow-as-needed bincount accumulation of `weights` (and counts) by integer `keys`."""
    size = max(len(sums), int(keys.max()) + 1 if len(keys) else 0)
    sums = np.pad(sums, (0, size - len(sums))) + np.bincount(keys, weights, minlength=size)
    counts = np.pad(counts, (0, size - len(counts))) + np.bincount(keys, minlength=size)
    return sums, counts


def log_bins(sums: np.ndarray, counts: np.ndarray):
    """Per-position sums and counts -> (edges [0, 1, 2, 4, 8, ...], mean per bin [lo, hi),
    rows per bin); empty bins are dropped."""
    n = len(counts)
    edges = [0, 1] + [2 ** i for i in range(1, max(int(np.ceil(np.log2(max(n, 2)))), 1) + 1)]
    edges = np.array(sorted(set(min(e, n) for e in edges)))
    bin_sums = np.add.reduceat(sums, edges[:-1]) if n else np.zeros(0)
    bin_counts = np.add.reduceat(counts, edges[:-1]) if n else np.zeros(0)
    seen = bin_counts > 0
    lo, hi = edges[:-1][seen], edges[1:][seen]
    return lo, hi, bin_sums[seen] / bin_counts[seen], bin_counts[seen]


def module_values(sample: ModuleSample, exact) -> dict:
    """The numbers a module's section shows (what the tests check against numpy)."""
    norms = np.concatenate(sample.norms) if sample.norms else np.zeros(0)
    finite = norms[np.isfinite(norms)]
    counts, edges = np.histogram(finite, bins=NORM_BINS) if finite.size else (np.zeros(0), np.zeros(0))
    sums, seen = sample.position_sum, sample.position_count
    later = seen[1:].sum()
    ratio = (sums[0] / seen[0]) / (sums[1:].sum() / later) if len(seen) > 1 and seen[0] and later \
        else None
    if exact is not None and exact.count:
        variance = np.array([np.nan if v is None else v for v in exact.var], np.float64)
        source, nonfinite, clamped = "exact", exact.nonfinite, exact.clamped
    else:
        variance, source, nonfinite, clamped = sample.sample_variance(), "sample", None, None
    return {"rows": sample.rows, "norm_counts": counts, "norm_edges": edges,
            "norm_quantiles": np.quantile(finite, [0.5, 0.99, 1.0]) if finite.size else None,
            "positions": log_bins(sums, seen), "position0_ratio": ratio,
            "variance": variance, "variance_source": source, "nonfinite": nonfinite,
            "clamped": clamped, "top_tokens": {key: top_tokens(*sample.tokens[key])
                                               for key in sample.tokens},
            "top_rows": {key: best.frame() for key, best in sample.top.items()}}


def top_tokens(sums: np.ndarray, counts: np.ndarray):
    """-> (token ids, counts, mean norms) of the TOP_TOKENS tokens with the highest mean norm
    among those seen at least MIN_TOKEN_COUNT times (fewer if none is), ties by token id;
    and that threshold."""
    least = min(MIN_TOKEN_COUNT, int(max(counts.max(), 1))) if len(counts) else 1
    seen = np.flatnonzero(counts >= least)
    means = sums[seen] / counts[seen]
    order = seen[np.lexsort((seen, -means))][:TOP_TOKENS]
    return order, counts[order].astype(np.int64), sums[order] / counts[order], least
