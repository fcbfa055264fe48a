"""The selection report: PNG plots, label metrics and a small self-contained report.html.

Ground-truth labels (the synthetic corpus's ``noise`` side column: ``clean`` or a noise type)
are read here, for evaluation only; the selection never sees them.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from qgate import data

CLEAN = "clean"
REPORT_FILES = ("report.html", "score_hist.png", "clusters.png", "sources.png", "nll_vs_score.png")
"""Everything write_report may write; removed first, so no plot of an earlier run lingers."""
SCATTER_POINTS = 20000
"""The nll-vs-score scatter plots a seeded subsample of at most this many rows."""


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


def _plots(out_dir: str, table: pa.Table, reference: dict) -> list[tuple[str, str]]:
    """Write the PNG plots; returns (file name, caption) pairs."""
    score = table.column("score").to_numpy(zero_copy_only=False).astype(float)
    sel = table.column("selected").to_numpy(zero_copy_only=False)
    finite = np.isfinite(score)
    method = reference["method"]
    plots = []

    fig, ax = _figure()
    bins = np.histogram_bin_edges(score[finite], bins=60)
    ax.hist(score[finite], bins=bins, color="#bbbbbb", label="available")
    ax.hist(score[finite & sel], bins=bins, color="#1f77b4", label="selected")
    cut = reference["cutoffs"]
    for c in cut["per_cluster"] or []:
        if c is not None:
            ax.axvline(c, color="#ff7f0e", lw=0.6, alpha=0.5)
    if cut["global"] is not None:
        ax.axvline(cut["global"], color="#d62728", lw=1.5, label="cutoff (lowest selected)")
    ax.set_xlabel(f"score ({method})")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "score_hist.png"))
    caption = "Score histogram; red: the global cutoff"
    if cut["per_cluster"]:
        caption += ", orange: per-cluster cutoffs"
    plots.append(("score_hist.png", caption + "."))

    counts = reference["counts"]
    if counts.get("per_cluster_available"):
        avail = np.asarray(counts["per_cluster_available"])
        taken = np.asarray(counts["per_cluster_selected"])
        fig, ax = _figure(max(6.4, 0.25 * avail.size), 4.0)
        x = np.arange(avail.size)
        ax.bar(x, avail, color="#bbbbbb", label="available")
        ax.bar(x, taken, color="#1f77b4", label="selected")
        ax.set_xlabel("cluster")
        ax.set_ylabel("samples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "clusters.png"))
        plots.append(("clusters.png", "Cluster sizes: available candidates vs selected."))

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
    plots.append(("sources.png", "Per-source share of the pool and of the selection."))

    nll = table.column("nll").to_numpy(zero_copy_only=False).astype(float)
    idx = np.flatnonzero(finite & np.isfinite(nll))
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
    plots.append(("nll_vs_score.png", f"nll vs score ({idx.size} rows shown)."))
    return plots


# ----------------------------------------------------------------------------- html


def clear_report(out_dir: str) -> None:
    """Remove the report files of an earlier run (a re-run may write fewer plots, or none)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in REPORT_FILES:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows: list[tuple], head: tuple) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def write_report(
    out_dir: str, selection_table: pa.Table, reference: dict, labels: dict[str, str] | None = None
) -> str:
    """Write report.html and its PNG plots into ``out_dir``; returns the html path."""
    clear_report(out_dir)
    plots = _plots(out_dir, selection_table, reference)
    counts, cut = reference["counts"], reference["cutoffs"]
    summary = [
        ("method", reference["method"]),
        ("signals", ", ".join(reference["signals"]) or None),
        ("scored rows", counts["scored"]),
        ("rejected at scoring", counts["rejected"]),
        ("candidates", counts["candidates"]),
        ("budget", reference["budget"]),
        ("selected", counts["selected"]),
        (
            "diversity",
            f"k={reference['k']} on {reference['features']}" if reference["k"] else "off",
        ),
        ("global cutoff", cut["global"]),
    ]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>qgate selection</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left}img{max-width:100%}</style></head><body>",
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
    for name, caption in plots:
        parts.append(f"<figure><img src='{name}' alt='{html.escape(caption)}'>")
        parts.append(f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    path = os.path.join(out_dir, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    return path
