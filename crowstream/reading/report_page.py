"""The report's page. It owns drawing (matplotlib's Agg backend, plots inlined as base64
PNG: the page loads nothing) and laying out the numbers `reporting.module_values` computed.
"""

from __future__ import annotations

import base64
import datetime
import html
import io

import numpy as np

from crowstream.errors import ConfigError
from crowstream.reading.catalog import Catalog

CONTEXT_WINDOW = (16, 4)


def check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ConfigError("the report draws its plots with matplotlib: pip install "
                          "'crowstream[report]' (or pip install matplotlib).") from error


def page(catalog: Catalog, summary: dict, names: list[str], recorded: bool, values: dict,
         cosines: dict, plan) -> str:
    sections = "".join(module_section(catalog, name, summary["modules"][name], values[name])
                       for name in names)
    order = ("Modules are listed in the model's execution order, recorded at capture."
             if recorded else "This output was written before crowstream 0.3 and does not record "
             "the modules' execution order: modules are listed, and paired, in manifest order.")
    made = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>crowstream report: {_e(summary['path'])}</title><style>{_CSS}</style></head>"
            f"<body><h1>crowstream report</h1><p class=\"note\">{_e(summary['path'])} · "
            f"generated {made}</p><h2>Run summary</h2><div class=\"tables\">"
            f"{_run_table(summary)}{_module_table(summary, names, values)}</div>"
            f"<p class=\"sample\">{_e(_sample_text(summary, names, values, plan))}</p>"
            f"<p class=\"note\">{_e(order)}</p>{sections}"
            f"{cosine_section(summary, names, cosines, recorded)}</body></html>\n")


def _run_table(summary: dict) -> str:
    run = [("model", summary["model"]), ("status", summary["status"]),
           ("documents", f"{summary['docs']:,} ({summary['skipped_docs']:,} skipped)"),
           ("tokens fed", f"{summary['tokens_fed']:,}"),
           ("context", f"{summary['context_size']} ({summary['overflow']})"),
           ("shards", f"{summary['shards']:,}"), ("on disk", _mib(summary["bytes"])),
           ("run", f"{summary['run_id']}, created {summary['created']}, "
                   f"updated {summary['updated']}")]
    if summary.get("error"):
        run.append(("error", summary["error"]))
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>"
                               for k, v in run) + "</table>"


def _module_table(summary: dict, names: list[str], values: dict) -> str:
    rows = []
    for name in names:
        m, v = summary["modules"][name], values[name]
        rows.append(f"<tr><td>{_e(name)}</td><td>{m['d']}</td><td>{m['dtype']}</td>"
                    f"<td>{m['rows']:,}</td><td>{_mib(m['bytes'])}</td>"
                    f"<td>{_fmt(m['mean_norm'])}</td><td>{_count(v['nonfinite'])}</td>"
                    f"<td>{_count(v['clamped'])}</td><td>{v['rows']:,}</td></tr>")
    return ("<table><tr><th>module</th><th>d</th><th>dtype</th><th>rows</th><th>bytes</th>"
            "<th>mean norm</th><th>non-finite values</th><th>clamped values</th>"
            f"<th>sampled rows</th></tr>{''.join(rows)}</table>")


def _sample_text(summary: dict, names: list[str], values: dict, plan) -> str:
    partial = [n for n in names if values[n]["rows"] < summary["modules"][n]["rows"]]
    if not partial:
        return "Not sampled: every row was read."
    shown = "; ".join(f"{n}: {values[n]['rows']:,} of {summary['modules'][n]['rows']:,} rows "
                      f"({values[n]['rows'] / max(summary['modules'][n]['rows'], 1):.1%})"
                      for n in partial)
    return (f"Sampled: {shown}. Whole row groups, evenly spaced over evenly spaced part files "
            f"of {plan.reference}, the same rows in every module; plots, token tables and "
            "contexts are over the sample; variance, non-finite and clamped counts are exact.")


def module_section(catalog: Catalog, module: str, spec: dict, v: dict) -> str:
    if not v["rows"]:
        return f"<h2>{_e(module)}</h2><p>No committed rows yet.</p>"
    variance = v["variance"]
    by_dim = np.argsort(-np.nan_to_num(variance, nan=-1.0))
    lo, hi, means, counts = v["positions"]
    plots = [("Distribution of vector norms", plot_norms(v["norm_counts"], v["norm_edges"])),
             ("Mean norm by position", plot_positions(lo, hi, means)),
             ("Variance spectrum", plot_spectrum(variance[by_dim], v["variance_source"]))]
    figures = "".join(f'<figure><img alt="{_e(t)}" src="data:image/png;base64,{png}"></figure>'
                      for t, png in plots)
    q = v["norm_quantiles"]
    ratio = v["position0_ratio"]
    facts = (f"{v['rows']:,} rows sampled of {spec['rows']:,}; norm median {q[0]:.3g}, "
             f"p99 {q[1]:.3g}, max {q[2]:.3g}; position 0 mean norm / position >= 1 mean norm: "
             + ("n/a" if ratio is None else f"{ratio:.3g}")
             + f"; largest-variance dimensions ({v['variance_source']}): "
             + ", ".join(f"{i} ({variance[i]:.3g})" for i in by_dim[:5])
             + f"; median variance {np.nanmedian(variance):.3g}")
    tables = "".join(
        f"<div><h3>{title}</h3>{table}</div>" for title, table in (
            ("Tokens with the highest mean norm", token_table(catalog, v["top_tokens"]["all"])),
            ("… at position ≥ 1", token_table(catalog, v["top_tokens"]["after0"])),
            ("Top-norm contexts", context_table(catalog, v["top_rows"]["all"])),
            ("… at position ≥ 1", context_table(catalog, v["top_rows"]["after0"]))))
    return (f'<section><h2>{_e(module)} <small>d={spec["d"]}, {spec["dtype"]}</small></h2>'
            f'<p class="facts">{_e(facts)}</p><div class="plots">{figures}</div>'
            f'<div class="tables">{tables}</div></section>')


def token_table(catalog: Catalog, found) -> str:
    import polars as pl

    from crowstream.reading.readers import vocab

    tokens, counts, means, least = found
    texts = dict(vocab(catalog)
                 .filter(pl.col("token").is_in(tokens.tolist())).select("token", "text")
                 .collect().iter_rows())
    rows = "".join(f"<tr><td>{t}</td><td><code>{_e(repr(texts.get(t, '?')))}</code></td>"
                   f"<td>{c:,}</td><td>{m:.3f}</td></tr>"
                   for t, c, m in zip(tokens.tolist(), counts.tolist(), means.tolist()))
    return (f'<table><tr><th>token</th><th>text</th><th>count</th><th>mean norm</th></tr>{rows}'
            f'</table><p class="note">tokens seen at least {least} times in the sample</p>')


def context_table(catalog: Catalog, found) -> str:
    from crowstream.reading.windows import contexts

    try:
        found = contexts(catalog, found, CONTEXT_WINDOW)
        cells = [_bold(r["window_text"], r["mark_start"], r["mark_end"])
                 for r in found.iter_rows(named=True)]
        note = ("one row per document; the token in bold between « »; decoded with "
                "OUT/tokenizer/, within the forward the row came from")
    except ConfigError as error:  # a format-1 output: token texts only
        from crowstream.reading.readers import vocab

        texts = dict(vocab(catalog)
                     .select("token", "text").collect().iter_rows())
        cells = [_e(texts.get(t, "?")) for t in found["token"].to_list()]
        note = f"contexts unavailable: {error}"
    rows = "".join(f"<tr><td>{r['score']:.3f}</td><td>{r['doc_id']}</td><td>{r['position']}</td>"
                   f"<td class=\"ctx\">{cell}</td></tr>"
                   for r, cell in zip(found.iter_rows(named=True), cells))
    return (f"<table><tr><th>norm</th><th>doc</th><th>pos</th><th>context</th></tr>{rows}"
            f'</table><p class="note">{_e(note)}</p>')


def cosine_section(summary: dict, names: list[str], cosines: dict, recorded: bool) -> str:
    title = "<h2>Cosine similarity between consecutive modules</h2>"
    if not cosines:
        widths = ", ".join(f"{n}: {summary['modules'][n]['d']}" for n in names)
        return (f"<section>{title}<p>No two consecutive captured modules share a width d "
                f"({_e(widths)}).</p></section>")
    curves = {f"{a} → {b}": value for (a, b), value in cosines.items()}
    matched = ", ".join(f"{name}: {int(c.sum()):,} row pairs" for name, (_, c) in curves.items())
    order = "execution order" if recorded else "manifest order (execution order not recorded)"
    return (f'<section>{title}<figure class="wide"><img alt="Cosine similarity by position" '
            f'src="data:image/png;base64,{plot_cosines(curves)}"><figcaption>mean cosine(vector '
            f"of module A, vector of the module after it in {order}) at the same (doc_id, "
            f"position), by position; {_e(matched)}</figcaption></figure></section>")


# -- plots -----------------------------------------------------------------------------


def _figure(width: float = 4.0, height: float = 3.0):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")  # Figure without pyplot renders with Agg
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_norms(counts: np.ndarray, edges: np.ndarray) -> str:
    figure, ax = _figure()
    if len(counts):
        ax.stairs(counts, edges, fill=True, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_xlabel("L2 norm of the vector")
    ax.set_ylabel("rows (log)")
    ax.set_title("Distribution of vector norms", fontsize=10)
    return _png(figure)


def plot_positions(lo: np.ndarray, hi: np.ndarray, means: np.ndarray) -> str:
    figure, ax = _figure()
    ax.stairs(means, np.r_[lo, hi[-1:]] if len(lo) else [0], color="#3b6ea8", lw=1.5,
              baseline=None)
    ax.plot(lo, means, ".", color="#3b6ea8", ms=4)
    ax.set_xscale("symlog", linthresh=1)  # log beyond 1, and position 0 stays visible
    ax.set_xlabel("token position (bins 0, 1, 2-3, 4-7, ...; log)")
    ax.set_ylabel("mean norm")
    ax.set_title("Mean norm by position", fontsize=10)
    return _png(figure)


def plot_spectrum(variance_sorted: np.ndarray, source: str) -> str:
    figure, ax = _figure()
    finite = variance_sorted[np.isfinite(variance_sorted)]
    floor = max(np.median(finite) * 1e-4, 1e-30) if finite.size else 1e-30
    ax.plot(np.arange(1, len(finite) + 1), np.maximum(finite, floor), color="#3b6ea8", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("dimension rank (by variance)")
    ax.set_ylabel("variance (log; floored at median/1e4)")
    ax.set_title(f"Variance spectrum ({source})", fontsize=10)
    return _png(figure)


def plot_cosines(curves: dict) -> str:
    figure, ax = _figure(8.4, 3.2)
    for name, (sums, counts) in curves.items():
        seen = np.flatnonzero(counts)
        ax.plot(seen, sums[seen] / counts[seen], lw=1, marker=".", ms=3, label=name)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("token position (log; 0 shown)")
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
td.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;max-width:560px}
.plots{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0} figcaption,.note,.facts{color:#555;font-size:12px} .tables{display:flex;gap:24px;
flex-wrap:wrap;align-items:flex-start} .sample{background:#fff7e0;border:1px solid #ecd9a0;
padding:6px 10px;display:inline-block}
"""


def _bold(text: str, start: int, end: int) -> str:
    """Escape each piece, the token in bold between « » (a rendering of the offsets, so a
    « in the text itself cannot confuse it)."""
    return f"{_e(text[:start])}«<b>{_e(text[start:end])}</b>»{_e(text[end:])}"


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"
