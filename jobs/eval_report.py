"""Rendering of an evaluation: ROC curves and score histograms as PNG, the report as Markdown.

Pure functions from arrays / the report dict to bytes or text; :mod:`jobs.evaluate`
computes and writes. Plots use matplotlib's object API (no pyplot state), so they are
safe in any process.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def roc_png(scores: dict[str, np.ndarray], is_id: np.ndarray, auroc: dict[str, float]) -> bytes:
    """One ROC curve per score (ID positive: TPR on ID against FPR on OOD); ``auroc`` in percent."""
    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(is_id.astype(int), s)
        ax.plot(100 * fpr, 100 * tpr, label=f"{name} (AUROC {auroc[name]:.1f})")
    ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls="--")
    ax.axhline(95, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="OOD accepted as ID (%)", ylabel="ID accepted (%)", title="ROC, ID positive", xlim=(0, 100), ylim=(0, 101))
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def histograms_png(scores: dict[str, np.ndarray], is_id: np.ndarray) -> bytes:
    """A grid of ID / OOD score histograms, one panel per score (higher = more ID)."""
    names = list(scores)
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        s = scores[name].astype(np.float64)
        # an (almost) constant score, e.g. an untrained model's: one bin instead of numpy's error
        spread = float(np.ptp(s)) > 1e-6 * max(1.0, float(np.abs(s).max()))
        bins = np.histogram_bin_edges(s, bins=40 if spread else 1)
        ax.hist(s[is_id], bins=bins, alpha=0.6, label="ID", density=True)
        ax.hist(s[~is_id], bins=bins, alpha=0.6, label="OOD", density=True)
        ax.set_title(name, fontsize=10)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def markdown(report: dict) -> str:
    """The report as Markdown: setup, the metrics table, decision rates, ID accuracy and the plots."""
    d = report["data"]
    lines = [
        "# CLIPN evaluation report",
        "",
        f"- model: `{report['model']['checkpoint'] or report['model']['architecture']}` (id `{report['model']['id'][:16]}`)",
        f"- classes: {len(report['classes'])} ({', '.join(report['classes'][:12])}{', ...' if len(report['classes']) > 12 else ''}),"
        f" templates: {report['templates']['source']} ({report['templates']['count']}), class set `{report['class_set_hash']}`",
        f"- data: `{d['uri']}`: {d['id']} ID + {d['ood']} OOD images scored, {d['undecodable']} undecodable (left out)",
        "",
        "| score | AUROC | FPR95 | AUPR-In | AUPR-Out |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in report["scores"].items():
        lines.append(f"| {name} | {m['auroc']:.2f} | {m['fpr95']:.2f} | {m['aupr_in']:.2f} | {m['aupr_out']:.2f} |")
    lines += ["", "All in percent; ID is the positive class, FPR95 = OOD accepted at 95% ID recall.", ""]
    if report["decisions"]:
        lines += ["| threshold-free rule | ID flagged OOD (%) | OOD flagged OOD (%) |", "|---|---:|---:|"]
        for name, r in report["decisions"].items():
            lines.append(f"| {name} | {r['id_flagged_ood']:.2f} | {r['ood_flagged_ood']:.2f} |")
        lines.append("")
    if report["id_accuracy"] is not None:
        lines += [f"ID accuracy (top-1 over the {len(report['classes'])} classes): {report['id_accuracy']:.2f}%", ""]
    lines += ["![ROC curves](roc.png)", "", "![Score histograms](histograms.png)", ""]
    return "\n".join(lines)
