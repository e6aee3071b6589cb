"""The report (`crowstream.report`; the module is not named `report` so it cannot shadow the
function). It owns `report(out, path)` (`crowstream report OUT -o report.html`): one
self-contained HTML file (no network; plots inlined as base64 PNG, drawn with matplotlib's
Agg backend) that shows a capture at a glance: the run summary, and per module the
distribution of vector norms, the mean norm by position, the per-dimension variance
spectrum, the tokens with the highest mean norm, the top-norm contexts, and the cosine
similarity between adjacent captured modules of the same width.

Its cost is bounded by construction: per module it opens at most `REPORT_FILES` part
files (evenly spaced over the shards) and reads row groups evenly spaced among theirs
until `max_rows` rows, so a 10^9-row capture costs what a 200k-row one does. The report
says when it sampled and how much.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os

import numpy as np

from crowstream.errors import ConfigError
from crowstream.reading.catalog import Catalog, ModuleFiles, aligned, shard_rows, vector_array

REPORT_ROWS = 200_000  # rows read per module, at most: ~0.6 GB of float32 at d=768, in batches
REPORT_FILES = 16      # part files opened per module, at most (footers are read only for these)
TOP_TOKENS = 15
TOP_CONTEXTS = 10
MIN_TOKEN_COUNT = 5    # a token's mean norm is shown only when seen this often in the sample


def report(out, path, *, max_rows: int = REPORT_ROWS) -> dict:
    """Write the HTML report of capture `out` to `path`; -> {"path", "modules": {name:
    {"rows", "sampled_rows"}}}. At most `max_rows` rows per module are read (whole row
    groups, chosen deterministically); the report states the sample's size."""
    from crowstream.reading import analysis
    from crowstream.reading.readers import info

    out, path = os.fspath(out), os.fspath(path)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ConfigError(f"max_rows must be a positive integer, got {max_rows!r}.")
    _check_matplotlib()
    summary = info(out)
    sections, sampled, plans = [], {}, {}
    catalog = Catalog(out)
    for module, spec in summary["modules"].items():
        files = catalog.module(module)
        plan = sample_plan(catalog, files, max_rows)
        plans[module] = (files, plan)
        stats = ModuleSample(files.d)
        for batch in analysis.scan_batches(catalog, files, row_groups=plan.groups):
            stats.add(*batch)  # doc_id, position, token, vectors
        sampled[module] = {"rows": spec["rows"], "sampled_rows": stats.rows}
        sections.append(_module_section(out, module, spec, plan, stats))
    cosine = _cosine_section(catalog, summary, plans)
    page = _page(summary, sampled, sections, cosine)
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return {"path": path, "modules": sampled}


class SamplePlan:
    """Which row groups of which part files to read: `groups` maps path -> indices."""

    def __init__(self, groups: dict[str, list[int]], rows: int, files_opened: int,
                 files: int, row_groups_seen: int):
        self.groups, self.rows = groups, rows
        self.files_opened, self.files, self.row_groups_seen = files_opened, files, row_groups_seen


def sample_plan(catalog: Catalog, module: ModuleFiles, max_rows: int) -> SamplePlan:
    """At most REPORT_FILES files evenly spaced over the module's files, then row groups
    evenly spaced among theirs until `max_rows` rows. Deterministic: same OUT, same sample."""
    files = module.paths
    chosen = _evenly(len(files), REPORT_FILES)
    groups = []  # (path, index, rows)
    for i in chosen:
        metadata = catalog.open(files[i]).metadata
        groups += [(files[i], g, metadata.row_group(g).num_rows)
                   for g in range(metadata.num_row_groups)]
    rows = np.array([g[2] for g in groups], dtype=np.int64)
    if rows.sum() > max_rows:
        n = int(np.clip(np.ceil(max_rows / max(rows.mean(), 1)), 1, len(groups)))
        picked = _evenly(len(groups), n)
        while n > 1 and rows[picked].sum() > max_rows:  # row groups differ in size
            n -= 1
            picked = _evenly(len(groups), n)
        groups = [groups[i] for i in picked]
    plan: dict[str, list[int]] = {}
    for path, index, _ in groups:
        plan.setdefault(path, []).append(index)
    return SamplePlan(plan, int(sum(g[2] for g in groups)), len(chosen), len(files),
                      len(rows))


def _evenly(n: int, at_most: int) -> list[int]:
    """`at_most` indices spread evenly over range(n) (all of them when n <= at_most)."""
    if n <= at_most:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, at_most)})


class ModuleSample:
    """Streaming statistics of one module's sampled rows (float64 accumulators)."""

    def __init__(self, d: int):
        from crowstream.reading.analysis import TopK

        self.rows = 0
        self.norms: list[np.ndarray] = []
        self.dim_sum, self.dim_sq = np.zeros(d), np.zeros(d)
        self.position_sum, self.position_count = np.zeros(0), np.zeros(0)
        self.token_sum, self.token_count = np.zeros(0), np.zeros(0)
        self.top = TopK(TOP_CONTEXTS, per_doc=1)

    def add(self, doc_id, position, token, vectors) -> None:
        norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))  # [B]
        self.rows += len(norms)
        self.norms.append(norms.astype(np.float32))
        self.dim_sum += vectors.sum(0, dtype=np.float64)
        self.dim_sq += np.einsum("ij,ij->j", vectors, vectors, dtype=np.float64)
        self.position_sum, self.position_count = _add_bins(
            self.position_sum, self.position_count, position, norms)
        self.token_sum, self.token_count = _add_bins(self.token_sum, self.token_count, token, norms)
        self.top.add(norms, doc_id, position, token)

    def variance(self) -> np.ndarray:
        n = max(self.rows, 1)
        return np.maximum(self.dim_sq / n - (self.dim_sum / n) ** 2, 0.0)


def _add_bins(sums, counts, keys, weights):
    """Grow-as-needed bincount accumulation of `weights` (and counts) by integer `keys`."""
    size = max(len(sums), int(keys.max()) + 1 if len(keys) else 0)
    sums = np.pad(sums, (0, size - len(sums))) + np.bincount(keys, weights, minlength=size)
    counts = np.pad(counts, (0, size - len(counts))) + np.bincount(keys, minlength=size)
    return sums, counts


# -- sections --------------------------------------------------------------------------


def _module_section(out: str, module: str, spec: dict, plan: SamplePlan,
                    stats: ModuleSample) -> str:
    if not stats.rows:
        return f"<h2>{_e(module)}</h2><p>No committed rows yet.</p>"
    norms = np.concatenate(stats.norms)
    variance = stats.variance()
    by_dim = np.argsort(-variance)
    plots = [
        ("Distribution of vector norms", _plot_norms(norms)),
        ("Mean norm by position", _plot_positions(stats.position_sum, stats.position_count)),
        ("Variance spectrum", _plot_spectrum(variance[by_dim])),
    ]
    figures = "".join(f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{png}"></figure>'
                      for title, png in plots)
    q = np.quantile(norms, [0.5, 0.99])
    facts = (f"{stats.rows:,} rows sampled of {spec['rows']:,}; norm median {q[0]:.3g}, "
             f"p99 {q[1]:.3g}, max {norms.max():.3g}; largest-variance dimensions: "
             + ", ".join(f"{i} ({variance[i]:.3g})" for i in by_dim[:5])
             + f"; median variance {np.median(variance):.3g}, smallest: dimension {by_dim[-1]} "
             f"({variance[by_dim[-1]]:.3g})")
    return (f'<section><h2>{_e(module)} <small>d={spec["d"]}, {spec["dtype"]}</small></h2>'
            f'<p class="facts">{_e(facts)}</p><div class="plots">{figures}</div>'
            f'<div class="tables"><div><h3>Tokens with the highest mean norm</h3>'
            f"{_token_table(out, stats)}</div>"
            f"<div><h3>Top-norm contexts</h3>{_context_table(out, stats)}</div></div></section>")


def _token_table(out: str, stats: ModuleSample) -> str:
    import polars as pl

    from crowstream.reading.readers import vocab

    counts = stats.token_count
    seen = np.flatnonzero(counts >= min(MIN_TOKEN_COUNT, max(counts.max(), 1)))
    means = stats.token_sum[seen] / counts[seen]
    order = seen[np.lexsort((seen, -means))][:TOP_TOKENS]
    texts = dict(vocab(out).filter(pl.col("token").is_in(order.tolist()))
                 .select("token", "text").collect().iter_rows())
    rows = "".join(f"<tr><td>{t}</td><td><code>{_e(repr(texts.get(t, '?')))}</code></td>"
                   f"<td>{int(counts[t]):,}</td><td>{stats.token_sum[t] / counts[t]:.3f}</td></tr>"
                   for t in order.tolist())
    least = min(MIN_TOKEN_COUNT, int(max(counts.max(), 1)))
    note = f"tokens seen at least {least} times in the sample"
    return (f'<table><tr><th>token</th><th>text</th><th>count</th><th>mean norm</th></tr>{rows}'
            f'</table><p class="note">{note}</p>')


def _context_table(out: str, stats: ModuleSample) -> str:
    from crowstream.reading import analysis

    found = stats.top.frame()
    try:
        found = analysis.contexts(out, found, (16, 4))
        note = "one row per document; « » mark the token; decoded with OUT/tokenizer/"
    except ConfigError as error:  # a format-1 output: token texts only
        from crowstream.reading.readers import vocab

        found = (found.join(vocab(out).select("token", "text").collect(), on="token", how="left")
                 .sort("score", "doc_id", "position", descending=[True, False, False])
                 .rename({"text": "context"}))
        note = f"contexts unavailable: {error}"
    rows = "".join(f"<tr><td>{r['score']:.3f}</td><td>{r['doc_id']}</td><td>{r['position']}</td>"
                   f"<td class=\"ctx\">{_bold_marked(r['context'] or '')}</td></tr>"
                   for r in found.iter_rows(named=True))
    return (f"<table><tr><th>norm</th><th>doc</th><th>pos</th><th>context</th></tr>{rows}"
            f'</table><p class="note">{_e(note)}</p>')


def _cosine_section(catalog: Catalog, summary: dict, plans: dict) -> str:
    names = list(summary["modules"])
    pairs = [(a, b) for a, b in zip(names, names[1:])
             if summary["modules"][a]["d"] == summary["modules"][b]["d"]]
    title = "<h2>Cosine similarity between adjacent modules</h2>"
    if not pairs:
        widths = ", ".join(f"{n}: {m['d']}" for n, m in summary["modules"].items())
        return (f"<section>{title}<p>No two adjacent captured modules share a width d "
                f"({_e(widths)}).</p></section>")
    curves = {}
    for a, b in pairs:
        files_a, plan = plans[a]
        curves[f"{a} → {b}"] = paired_cosines(catalog, files_a, plan.groups, plans[b][0])
    png = _plot_cosines(curves)
    matched = ", ".join(f"{name}: {int(c.sum()):,} row pairs" for name, (_, c) in curves.items())
    return (f'<section>{title}<figure class="wide"><img alt="Cosine similarity by position" '
            f'src="data:image/png;base64,{png}"><figcaption>mean cosine(vector of module A, '
            f"vector of the next module) at the same (doc_id, position), by position; "
            f"{_e(matched)}</figcaption></figure></section>")


def paired_cosines(catalog: Catalog, files_a: ModuleFiles, groups_a: dict[str, list[int]],
                   files_b: ModuleFiles):
    """-> (cosine sum, count) per position over the sampled row groups of module A
    (`groups_a`: path -> indices) and the same rows of module B, paired by the catalog's
    rule: (shard, row in the shard), `doc_id` and `position` checked equal."""
    columns = ["doc_id", "position", "vector"]
    starts = {}  # path of A -> (shard, its first row's index in the shard)
    for shard, indices in files_a.by_shard().items():
        offsets = np.cumsum([0] + [files_a.rows[i] for i in indices])
        starts.update({files_a.paths[i]: (shard, int(o)) for i, o in zip(indices, offsets)})
    sums, counts = np.zeros(0), np.zeros(0)
    for path_a, indices in groups_a.items():
        shard, first_row = starts[path_a]
        parquet = catalog.open(path_a)
        edges = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows
                                 for g in range(parquet.metadata.num_row_groups)])
        for index in indices:
            a = parquet.read_row_group(index, columns=columns)
            start = first_row + int(edges[index])
            b = shard_rows(catalog, files_b, shard, start, start + a.num_rows, columns)
            aligned(files_a.name, files_b.name, f"shard {shard} from row {start}",
                    _ids(a), _ids(b))
            va = vector_array(a.column("vector"), files_a.d, np.float32)  # [M, d]
            vb = vector_array(b.column("vector"), files_b.d, np.float32)  # [M, d]
            cos = np.einsum("ij,ij->i", va, vb, dtype=np.float64) / np.maximum(
                np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1), 1e-30)
            sums, counts = _add_bins(sums, counts, a.column("position").to_numpy(), cos)
    return sums, counts


def _ids(table) -> dict:
    return {key: table.column(key).to_numpy() for key in ("doc_id", "position")}


# -- plots -----------------------------------------------------------------------------


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ConfigError("the report draws its plots with matplotlib: pip install "
                          "'crowstream[report]' (or pip install matplotlib).") from error


def _figure(width: float = 4.0, height: float = 3.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # Figure without pyplot renders with Agg
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_norms(norms: np.ndarray) -> str:
    figure, ax = _figure()
    ax.hist(norms, bins=80, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_xlabel("L2 norm of the vector")
    ax.set_ylabel("rows (log)")
    ax.set_title("Distribution of vector norms", fontsize=10)
    return _png(figure)


def _plot_positions(sums: np.ndarray, counts: np.ndarray) -> str:
    figure, ax = _figure()
    seen, least = _well_sampled(counts)
    ax.plot(seen, sums[seen] / counts[seen], color="#3b6ea8", lw=1, marker=".", ms=3)
    ax.set_xscale("symlog", linthresh=1)  # log beyond 1, and position 0 stays visible
    ax.set_xlabel(f"token position (log; 0 shown; >= {least} rows each)")
    ax.set_ylabel("mean norm")
    ax.set_title("Mean norm by position", fontsize=10)
    return _png(figure)


def _well_sampled(counts: np.ndarray) -> tuple[np.ndarray, int]:
    """Positions seen at least MIN_TOKEN_COUNT times (the long tail of a few long documents
    is noise), or every seen position when too few qualify; -> (positions, threshold)."""
    least = MIN_TOKEN_COUNT if np.count_nonzero(counts >= MIN_TOKEN_COUNT) >= 2 else 1
    return np.flatnonzero(counts >= least), least


def _plot_spectrum(variance_sorted: np.ndarray) -> str:
    figure, ax = _figure()
    floor = max(np.median(variance_sorted) * 1e-4, 1e-30)  # a dead dimension would squash the rest
    ax.plot(np.arange(1, len(variance_sorted) + 1), np.maximum(variance_sorted, floor),
            color="#3b6ea8", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("dimension rank (by variance)")
    ax.set_ylabel("variance (log; floored at median/1e4)")
    ax.set_title("Variance spectrum", fontsize=10)
    return _png(figure)


def _plot_cosines(curves: dict) -> str:
    figure, ax = _figure(8.4, 3.2)
    for name, (sums, counts) in curves.items():
        seen, least = _well_sampled(counts)
        ax.plot(seen, sums[seen] / counts[seen], lw=1, marker=".", ms=3, label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel(f"token position (log; 0 shown; >= {least} row pairs each)")
    ax.set_ylabel("mean cosine similarity")
    ax.legend(fontsize=8)
    return _png(figure)


# -- page ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1320px;color:#222;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;border-top:1px solid #ddd;padding-top:14px}
h2 small{font-weight:normal;color:#666;font-size:13px} h3{font-size:14px;margin:8px 0}
table{border-collapse:collapse;font-size:12.5px} td,th{border:1px solid #ddd;padding:2px 6px;
text-align:left;vertical-align:top} th{background:#f3f5f8}
td.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;max-width:640px}
.plots{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0} figcaption,.note,.facts{color:#555;font-size:12px} .tables{display:flex;gap:24px;
flex-wrap:wrap;align-items:flex-start} .sample{background:#fff7e0;border:1px solid #ecd9a0;
padding:6px 10px;display:inline-block}
"""


def _page(summary: dict, sampled: dict, sections: list[str], cosine: str) -> str:
    modules = "".join(
        f"<tr><td>{_e(n)}</td><td>{m['d']}</td><td>{m['dtype']}</td><td>{m['rows']:,}</td>"
        f"<td>{_mib(m['bytes'])}</td><td>{_fmt(m['mean_norm'])}</td>"
        f"<td>{sampled[n]['sampled_rows']:,}</td></tr>" for n, m in summary["modules"].items())
    partial = [n for n, s in sampled.items() if s["sampled_rows"] < s["rows"]]
    if partial:
        sample = ("Sampled: " + "; ".join(_sampled_text(n, **sampled[n]) for n in partial)
                  + ". Whole row groups, evenly spaced over evenly spaced part files; the "
                  "statistics, plots and top contexts below are over the sample.")
    else:
        sample = "Not sampled: every row was read."
    run = [("model", summary["model"]), ("status", summary["status"]),
           ("documents", f"{summary['docs']:,} ({summary['skipped_docs']:,} skipped)"),
           ("tokens fed", f"{summary['tokens_fed']:,}"),
           ("context", f"{summary['context_size']} ({summary['overflow']})"),
           ("shards", f"{summary['shards']:,}"), ("on disk", _mib(summary["bytes"])),
           ("run", f"{summary['run_id']}, created {summary['created']}, "
                   f"updated {summary['updated']}")]
    if summary.get("error"):
        run.append(("error", summary["error"]))
    facts = "".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in run)
    made = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>crowstream report: {_e(summary['path'])}</title><style>{_CSS}</style></head>"
            f"<body><h1>crowstream report</h1><p class=\"note\">{_e(summary['path'])} · "
            f"generated {made}</p><h2>Run summary</h2><div class=\"tables\"><table>{facts}</table>"
            f"<table><tr><th>module</th><th>d</th><th>dtype</th><th>rows</th><th>bytes</th>"
            f"<th>mean norm</th><th>sampled rows</th></tr>{modules}</table></div>"
            f"<p class=\"sample\">{_e(sample)}</p>{''.join(sections)}{cosine}</body></html>\n")


def _bold_marked(context: str) -> str:
    """Escape, then show the marked token in bold (the « » marks stay in the text)."""
    from crowstream.reading.analysis import MARK

    text = _e(context)
    start, end = text.find(MARK[0]), text.rfind(MARK[1])
    if 0 <= start < end:
        text = f"{text[:start + 1]}<b>{text[start + 1:end]}</b>{text[end:]}"
    return text


def _sampled_text(module: str, rows: int, sampled_rows: int) -> str:
    return f"{module}: {sampled_rows:,} of {rows:,} rows ({sampled_rows / max(rows, 1):.1%})"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"
