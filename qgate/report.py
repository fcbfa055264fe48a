"""The selection report: PNG plots, label metrics and a small self-contained report.html.

Ground-truth labels (the synthetic corpus's ``noise`` side column: ``clean`` or a noise type)
are read here, for evaluation only; the selection never sees them.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from qgate import data
from qgate.gate_head import describe_gate_score

if TYPE_CHECKING:
    from qgate.reference import Reference

CLEAN = "clean"
REPORT_FILES = (
    "report.html",
    "score_hist.png",
    "clusters.png",
    "sources.png",
    "nll_vs_score.png",
    "signals.png",
)
"""Everything write_report may write; removed first, so no plot of an earlier run lingers."""
SCATTER_POINTS = 20000
"""The nll-vs-score scatter plots a seeded subsample of at most this many rows."""
EXAMPLES_PER_GROUP = 3
"""Top and bottom samples shown per source (or cluster), and on each side of the cutoff."""
MAX_GROUPS = 12
"""Example groups shown (the largest sources or clusters)."""
EXCERPT_CHARS = 160


# ----------------------------------------------------------------------------- labels


def read_labels(corpus: Sequence[str], label_column: str) -> dict[str, str] | None:
    """sample_id -> label from the raw corpus rows' ``label_column``; None if no row has one.

    Rows are read and canonicalised with qgate.data (so ids match the scores); as in
    ``iter_corpus``, the first row with a given id wins.
    """
    labels: dict[str, str] = {}
    seen: set[str] = set()
    for path in data.expand_paths(corpus):
        src = data.source_name(path)
        for i, raw in data.iter_raw(path):
            item = data.validate(raw, src, i)
            if not isinstance(item, dict) or item["sample_id"] in seen:
                continue
            seen.add(item["sample_id"])
            if isinstance(raw, dict) and raw.get(label_column) is not None:
                labels[item["sample_id"]] = str(raw[label_column])
    return labels or None


def _filled(scores: np.ndarray) -> np.ndarray:
    """Scores with nulls (not candidates) placed below every real score."""
    finite = np.isfinite(scores)
    low = scores[finite].min() - 1.0 if finite.any() else 0.0
    return np.where(finite, scores, low)


def label_metrics(table: pa.Table, labels: dict[str, str]) -> dict | None:
    """AUROC of the score (and of q) for clean vs noisy, overall and per noise type, and the
    share of each label in the pool and in the selection. Rows without a label are left out.

    Positives are clean rows; null scores count as the lowest score.
    """
    from sklearn.metrics import roc_auc_score

    ids = table.column("sample_id").to_pylist()
    lab = np.asarray([labels.get(i) for i in ids], dtype=object)
    known = np.asarray([v is not None for v in lab])
    if not known.any():
        return None
    lab = lab[known].astype(str)
    score = _filled(table.column("score").to_numpy(zero_copy_only=False).astype(float)[known])
    q = table.column("q").to_numpy(zero_copy_only=False).astype(float)[known]
    sel = table.column("selected").to_numpy(zero_copy_only=False)[known]
    clean = lab == CLEAN

    def auroc(mask, values):
        y = clean[mask]
        if y.all() or not y.any():
            return None
        return float(roc_auc_score(y, values[mask]))

    everything = np.ones(lab.size, dtype=bool)
    types = sorted(set(lab.tolist()) - {CLEAN})
    names, counts = np.unique(lab, return_counts=True)
    s_names, s_counts = np.unique(lab[sel], return_counts=True)
    n_sel = int(sel.sum())
    return {
        "n_labelled": int(lab.size),
        "auroc": auroc(everything, score),
        "auroc_q": auroc(everything, q),
        "auroc_by_type": {t: auroc(clean | (lab == t), score) for t in types},
        "pool_share": {
            k: c / lab.size for k, c in zip(names.tolist(), counts.tolist(), strict=True)
        },
        "selected_share": {
            k: c / n_sel for k, c in zip(s_names.tolist(), s_counts.tolist(), strict=True)
        },
        "noise_share_selected": float((~clean[sel]).mean()) if n_sel else None,
    }


# ----------------------------------------------------------------------------- plots


def _figure(w=6.4, h=4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    return fig, fig.subplots()


def _plots(out_dir: str, table: pa.Table, reference: Reference) -> list[tuple[str, str]]:
    """Write the PNG plots; returns (file name, caption) pairs."""
    score = table.column("score").to_numpy(zero_copy_only=False).astype(float)
    sel = table.column("selected").to_numpy(zero_copy_only=False)
    made = [
        _score_hist(out_dir, score, sel, reference),
        _cluster_bars(out_dir, reference.counts),
        _source_bars(out_dir, table, sel),
        _prompt_cluster_bars(out_dir, table, sel),
        _nll_vs_score(out_dir, table, score, sel, reference.method),
        _signal_hists(out_dir, table, sel),
    ]
    return [p for p in made if p]


def _score_hist(out_dir: str, score, sel, reference: Reference) -> tuple[str, str]:
    """Histogram of the score, available vs selected, with the cutoffs."""
    finite = np.isfinite(score)
    fig, ax = _figure()
    bins = np.histogram_bin_edges(score[finite], bins=60)
    ax.hist(score[finite], bins=bins, color="#bbbbbb", label="available")
    ax.hist(score[finite & sel], bins=bins, color="#1f77b4", label="selected")
    cut = reference.cutoffs
    for c in cut["per_cluster"] or []:
        if c is not None:
            ax.axvline(c, color="#ff7f0e", lw=0.6, alpha=0.5)
    if cut["global"] is not None:
        ax.axvline(cut["global"], color="#d62728", lw=1.5, label="cutoff (lowest selected)")
    ax.set_xlabel(f"score ({reference.method})")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "score_hist.png"))
    caption = "Score histogram; red: the global cutoff"
    if cut["per_cluster"]:
        caption += ", orange: per-cluster cutoffs"
    return "score_hist.png", caption + "."


def _count_bars(out_dir: str, name: str, before, after, labels: tuple[str, str, str]) -> None:
    """One bar chart of counts per cluster id: ``before`` in grey, ``after`` over it."""
    fig, ax = _figure(max(6.4, 0.25 * len(before)), 4.0)
    x = np.arange(len(before))
    ax.bar(x, before, color="#bbbbbb", label=labels[0])
    ax.bar(x, after, color="#1f77b4", label=labels[1])
    ax.set_xlabel(labels[2])
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name))


def _cluster_bars(out_dir: str, counts: dict) -> tuple[str, str] | None:
    """Per-cluster candidates vs selected (None without diversity)."""
    if not counts.get("per_cluster_available"):
        return None
    avail, taken = counts["per_cluster_available"], counts["per_cluster_selected"]
    _count_bars(out_dir, "clusters.png", avail, taken, ("available", "selected", "cluster"))
    return "clusters.png", "Cluster sizes: available candidates vs selected."


def _prompt_cluster_bars(out_dir: str, table: pa.Table, sel) -> tuple[str, str] | None:
    """Rows per prompt cluster in the pool and in the selection (calibration: cluster only):
    with the signals ranked within each cluster, every kind of prompt keeps about its share."""
    if "calibration_cluster" not in table.column_names:
        return None
    cl = np.asarray(table.column("calibration_cluster").to_numpy(zero_copy_only=False), float)
    known = ~np.isnan(cl)
    if not known.any():
        return None
    k = int(cl[known].max()) + 1
    before = np.bincount(cl[known].astype(int), minlength=k)
    after = np.bincount(cl[sel & known].astype(int), minlength=k)
    _count_bars(
        out_dir, "prompt_clusters.png", before, after, ("pool", "selected", "prompt cluster")
    )
    return "prompt_clusters.png", "Rows per prompt cluster (calibration): pool vs selected."


def _source_bars(out_dir: str, table: pa.Table, sel) -> tuple[str, str]:
    """Each source's share of the pool and of the selection."""
    src = np.asarray(table.column("source").to_pylist(), dtype=object).astype(str)
    names, before = np.unique(src, return_counts=True)
    after = np.asarray([(src[sel] == s).sum() for s in names])
    fig, ax = _figure(max(6.4, 0.5 * names.size), 4.0)
    x = np.arange(names.size)
    ax.bar(x - 0.2, before / max(before.sum(), 1), 0.4, label="pool", color="#bbbbbb")
    ax.bar(x + 0.2, after / max(after.sum(), 1), 0.4, label="selection", color="#1f77b4")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "sources.png"))
    return "sources.png", "Per-source share of the pool and of the selection."


def _nll_vs_score(out_dir: str, table: pa.Table, score, sel, method: str) -> tuple[str, str]:
    """Scatter of nll against the score (a sample of SCATTER_POINTS rows at most)."""
    nll = table.column("nll").to_numpy(zero_copy_only=False).astype(float)
    idx = np.flatnonzero(np.isfinite(score) & np.isfinite(nll))
    if idx.size > SCATTER_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, SCATTER_POINTS, replace=False))
    fig, ax = _figure()
    for mask, color, name in (
        (~sel[idx], "#bbbbbb", "not selected"),
        (sel[idx], "#1f77b4", "selected"),
    ):
        ax.scatter(nll[idx][mask], score[idx][mask], s=3, color=color, label=name, alpha=0.6)
    ax.set_xlabel("nll (mean over scored tokens)")
    ax.set_ylabel(f"score ({method})")
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "nll_vs_score.png"))
    return "nll_vs_score.png", f"nll vs score ({idx.size} rows shown)."


def _signal_hists(out_dir: str, table: pa.Table, sel) -> tuple[str, str] | None:
    """One density histogram per signal (nll, ifd, q, percentiles), selected vs dropped."""
    names = [c for c in ("nll", "ifd", "q") if c in table.column_names]
    names += [c for c in table.column_names if c.startswith("pct_")]
    cols = [(c, table.column(c).to_numpy(zero_copy_only=False).astype(float)) for c in names]
    cols = [(c, v) for c, v in cols if np.isfinite(v).sum() > 1]
    if not cols:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(cols), 3.0), dpi=100)
    for ax, (c, v) in zip(fig.subplots(1, len(cols), squeeze=False)[0], cols, strict=True):
        ok = np.isfinite(v)
        bins = np.histogram_bin_edges(v[ok], bins=40)
        ax.hist(v[ok & ~sel], bins=bins, density=True, color="#bbbbbb", label="dropped")
        ax.hist(v[ok & sel], bins=bins, density=True, color="#1f77b4", alpha=0.6, label="selected")
        ax.set_title(c, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "signals.png"))
    return "signals.png", "Each signal's distribution: selected vs dropped (density)."


# ----------------------------------------------------------------------------- examples


def example_ids(table: pa.Table, reference: Reference, per_group: int = EXAMPLES_PER_GROUP) -> dict:
    """Which samples the report shows: per source (per cluster with diversity) the top and
    bottom ``per_group`` by score, and the ``per_group`` on each side of the cutoff.

    Returns ``{"groups": [(name, top ids, bottom ids)], "above": ids, "below": ids}``.
    """
    ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    score = table.column("score").to_numpy(zero_copy_only=False).astype(float)
    sel = table.column("selected").to_numpy(zero_copy_only=False)
    ok = np.isfinite(score)
    by_cluster = bool(reference.diversity)
    key = "cluster" if by_cluster else "source"
    group = np.asarray(table.column(key).to_pylist(), dtype=object)
    names, counts = np.unique(group[ok].astype(str), return_counts=True)
    groups = []
    for name in names[np.argsort(-counts, kind="stable")][:MAX_GROUPS]:
        idx = np.flatnonzero(ok & (group.astype(str) == name))
        idx = idx[np.argsort(-score[idx], kind="stable")]
        label = f"cluster {name}" if by_cluster else str(name)
        groups.append((label, ids[idx[:per_group]].tolist(), ids[idx[-per_group:][::-1]].tolist()))
    # the margin to the sample's own cutoff (its cluster's with diversity, else the global one)
    cut = reference.cutoffs
    if by_cluster and cut.get("per_cluster"):
        per = np.asarray([np.nan if c is None else c for c in cut["per_cluster"]], dtype=float)
        cutoff = per[np.asarray(group, dtype=np.int64)]
    else:
        cutoff = np.full(score.size, np.nan if cut["global"] is None else cut["global"])
    margin = score - cutoff
    chosen = np.flatnonzero(sel & ok & np.isfinite(margin))
    dropped = np.flatnonzero(~sel & ok & np.isfinite(margin))
    above = chosen[np.argsort(margin[chosen], kind="stable")][:per_group]
    below = dropped[np.argsort(-margin[dropped], kind="stable")][:per_group]
    return {"groups": groups, "above": ids[above].tolist(), "below": ids[below].tolist()}


def all_example_ids(examples: dict) -> list[str]:
    """Every sample id an ``example_ids`` result names, once."""
    out = [i for _, top, bottom in examples["groups"] for i in (*top, *bottom)]
    return list(dict.fromkeys([*out, *examples["above"], *examples["below"]]))


def reject_examples(scores_dir: str | None) -> list[dict]:
    """Per reject reason of the score stage: its count and the first row's detail and
    excerpt (empty when the scores have no rejects directory)."""
    import pyarrow.parquet as pq

    if not scores_dir or not os.path.isdir(os.path.join(scores_dir, "rejects")):
        return []
    by_reason: dict[str, dict] = {}
    rej_dir = os.path.join(scores_dir, "rejects")
    for name in sorted(os.listdir(rej_dir)):
        if not name.endswith(".parquet"):
            continue
        for r in pq.read_table(os.path.join(rej_dir, name)).to_pylist():
            entry = by_reason.setdefault(r["reason"], {"reason": r["reason"], "count": 0})
            entry["count"] += 1
            if "detail" not in entry:
                entry |= {
                    "sample_id": r["sample_id"],
                    "detail": r["detail"],
                    "excerpt": r["excerpt"],
                }
    return sorted(by_reason.values(), key=lambda e: -e["count"])


def _excerpt(text: str, n: int = EXCERPT_CHARS) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _turns(row: dict | None) -> tuple[str, str]:
    """(prompt excerpt, answer excerpt) of a canonical row."""
    if not row:
        return "–", "–"
    msgs = row["messages"]
    prompt = " / ".join(m["content"] for m in msgs if m["role"] != "assistant")
    answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
    return _excerpt(prompt), _excerpt(answer)


# ----------------------------------------------------------------------------- html


def clear_report(out_dir: str) -> None:
    """Remove the report files of an earlier run (a re-run may write fewer plots, or none)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in REPORT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _fmt(v) -> str:
    """A table cell: floats to 3 significant digits, everything HTML-escaped."""
    if v is None:
        return "–"
    if isinstance(v, float | np.floating):
        return "–" if not np.isfinite(v) else f"{float(v):.3g}"
    return html.escape(str(v))


def _table(rows: list[tuple], head: tuple) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _img(out_dir: str, name: str, caption: str) -> str:
    """A figure with the PNG inlined as a data URI: report.html stands alone."""
    with open(os.path.join(out_dir, name), "rb") as f:
        b64 = base64.b64encode(f.read()).decode("ascii")
    cap = html.escape(caption)
    return (
        f"<figure><img src='data:image/png;base64,{b64}' alt='{cap}'>"
        f"<figcaption>{cap}</figcaption></figure>"
    )


def _sample_rows(ids, table: pa.Table, rows_by_id: dict, labels: dict | None, kind: str):
    """Table rows for example samples: signals from the selection table, text excerpts."""
    col = {c: table.column(c).to_pylist() for c in table.column_names}
    where = {sid: i for i, sid in enumerate(col["sample_id"])}
    signals = [c for c in ("nll", "ifd") if c in col] + [c for c in col if c.startswith("pct_")]
    out = []
    for sid in ids:
        i = where[sid]
        prompt, answer = _turns(rows_by_id.get(sid))
        cells = [kind, sid, col["score"][i], "yes" if col["selected"][i] else "no"]
        cells += [col[c][i] for c in signals]
        if labels:
            cells.append(labels.get(sid))
        out.append((*cells, prompt, answer))
    head = ("", "sample_id", "score", "selected", *signals, *(("label",) if labels else ()))
    return out, (*head, "prompt", "answer")


def _examples_html(examples: dict, table: pa.Table, rows_by_id: dict, labels) -> list[str]:
    parts = ["<h2>Samples</h2>"]
    rows, head = _sample_rows(examples["above"], table, rows_by_id, labels, "just above")
    more, _ = _sample_rows(examples["below"], table, rows_by_id, labels, "just below")
    note = "the samples with the smallest margin to the cutoff (per cluster with diversity)"
    parts += ["<h3>Around the cutoff</h3>", f"<p>{note}</p>", _table(rows + more, head)]
    for name, top, bottom in examples["groups"]:
        rows, head = _sample_rows(top, table, rows_by_id, labels, "top")
        more, _ = _sample_rows(bottom, table, rows_by_id, labels, "bottom")
        parts += [f"<h3>{html.escape(name)}</h3>", _table(rows + more, head)]
    return parts


def _dropped_html(reference: Reference, rejects: list[dict]) -> list[str]:
    """Why rows are not in the selection: below the cutoff, no score, a copy, or rejected."""
    c = reference.counts
    excluded = (reference.dedup or {}).get("excluded", 0)
    no_score = c["scored"] - c["candidates"] - excluded
    why = [
        (
            "below the cutoff (score under the lowest selected score of its cluster)",
            c["candidates"] - c["selected"],
        ),
        ("no score for this method (e.g. no IFD value)", no_score),
    ]
    if reference.dedup:
        why.append(("a copy removed by the dedup run", excluded))
    why.append(("rejected at scoring (below)", c["rejected"]))
    parts = ["<h2>Why rows were dropped</h2>", _table(why, ("reason", "rows"))]
    if rejects:
        rows = [
            (
                r["reason"],
                r["count"],
                r["sample_id"],
                _excerpt(r["detail"]),
                _excerpt(r["excerpt"] or ""),
            )
            for r in rejects
        ]
        parts.append(_table(rows, ("reject reason", "rows", "example", "detail", "excerpt")))
    return parts


def _calibration_text(reference: Reference) -> str | None:
    """How the combined methods ranked each signal (None for single-signal methods)."""
    if reference.calibration is None:
        return None
    text = str(reference.calibration)
    if reference.calibration_centroids is not None:
        text += f" ({len(reference.calibration_centroids)} prompt clusters)"
    return text


def write_report(
    out_dir: str,
    selection_table: pa.Table,
    reference: Reference,
    labels: dict[str, str] | None = None,
    rows_by_id: dict[str, dict] | None = None,
    examples: dict | None = None,
    rejects: list[dict] | None = None,
) -> str:
    """Write report.html (one self-contained file) and its PNG plots into ``out_dir``.

    ``examples`` (from :func:`example_ids`) with ``rows_by_id`` (their corpus rows) adds the
    sample tables; ``rejects`` (from :func:`reject_examples`) the reject table.
    Returns the html path.
    """
    clear_report(out_dir)
    plots = _plots(out_dir, selection_table, reference)
    counts, cut = reference.counts, reference.cutoffs
    summary = [
        ("method", reference.method),
        ("signals", ", ".join(reference.signals) or None),
        ("gate score", describe_gate_score(reference.gate_head)),
        ("scored rows", counts["scored"]),
        ("rejected at scoring", counts["rejected"]),
        ("candidates", counts["candidates"]),
        ("budget", reference.budget),
        ("selected", counts["selected"]),
        (
            "diversity",
            f"k={reference.k} on {reference.features}" if reference.k else "off",
        ),
        ("calibration", _calibration_text(reference)),
        ("global cutoff", cut["global"]),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qgate selection</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left;vertical-align:top}img{max-width:100%}</style>"
        "</head><body>",
        "<h1>qgate selection report</h1>",
        _table(summary, ("", "")),
    ]
    metrics = label_metrics(selection_table, labels) if labels else None
    if metrics:
        parts.append("<h2>Ground-truth labels (evaluation only)</h2>")
        overall = [
            ("labelled rows", metrics["n_labelled"]),
            ("AUROC of the score, clean vs noisy", metrics["auroc"]),
            ("AUROC of q, clean vs noisy", metrics["auroc_q"]),
            ("noise share in the selection", metrics["noise_share_selected"]),
        ]
        parts.append(_table(overall, ("", "")))
        labs = sorted(metrics["pool_share"])
        rows = [
            (
                lab,
                metrics["pool_share"].get(lab, 0.0),
                metrics["selected_share"].get(lab, 0.0),
                metrics["auroc_by_type"].get(lab),
            )
            for lab in labs
        ]
        parts.append(_table(rows, ("label", "pool share", "selection share", "AUROC vs clean")))
    if examples is not None:
        parts += _examples_html(examples, selection_table, rows_by_id or {}, labels)
    parts += _dropped_html(reference, rejects or [])
    parts.append("<h2>Plots</h2>")
    parts += [_img(out_dir, name, caption) for name, caption in plots]
    parts.append("</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    from qgate.atomic import write_text

    write_text(path, "\n".join(parts))
    return path
