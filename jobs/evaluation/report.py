"""Rendering of evaluations and calibrations: ROC curves and score histograms as PNG, reports as Markdown.

Pure functions from arrays / reports to bytes or text; :mod:`jobs.evaluation.evaluate` and
:mod:`jobs.evaluation.calibrate` compute and write. Plots use matplotlib's object API (no pyplot
state), so they are safe in any process.

Scores that are probabilities (MSP, MCM, CTW, ATD: every value in [0, 1]) pile up at 0
and 1 for a confident model, so they are drawn on a logit axis labelled in probabilities;
ROC curves use a log axis for the share of OOD accepted, where operating points lie.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from sklearn.metrics import roc_curve

from schemas.reports import CalibrationReport, EvalReport, Threshold


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


_PROB_TICKS = (1e-4, 1e-3, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 0.9999)
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def display_scale(values: np.ndarray) -> bool:
    """True when ``values`` are probabilities (all in [0, 1]) and are best drawn on a logit axis."""
    v = np.asarray(values, dtype=np.float64)
    return v.size > 0 and float(v.min()) >= 0.0 and float(v.max()) <= 1.0


def _axis(ax, values: np.ndarray, logit: bool) -> np.ndarray:
    """``values`` as drawn (logit-transformed for probabilities, with probability tick labels)."""
    if not logit:
        return np.asarray(values, dtype=np.float64)
    x = _logit(values)
    ticks = [p for p in _PROB_TICKS if x.min() - 0.2 <= _logit(np.array(p)) <= x.max() + 0.2]
    ticks = ticks[:: max(1, -(-len(ticks) // 7))]  # at most 7 labels
    ax.set_xticks([float(_logit(np.array(p))) for p in ticks], [f"{p:g}" for p in ticks])
    return x


def _title(name: str, values: np.ndarray, logit: bool) -> str:
    """Panel title; says how much sits at exactly 0 or 1 (float32 saturation), which no axis can spread."""
    if not logit:
        return name
    v = np.asarray(values, dtype=np.float64)
    at_ends = float(((v <= _EPS) | (v >= 1 - _EPS)).mean())
    return f"{name} (logit axis; {at_ends:.0%} at 0 or 1)" if at_ends >= 0.05 else f"{name} (logit axis)"


def roc_png(scores: dict[str, np.ndarray], is_id: np.ndarray, auroc: dict[str, float]) -> bytes:
    """One ROC curve per score (ID positive: ID accepted against OOD accepted, the latter on a log axis from
    0.1%); ``auroc`` in percent."""
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    floor = 100 / max(1, int((~is_id).sum()))  # one OOD image: the smallest share that can be drawn
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(is_id.astype(int), s)
        ax.plot(np.maximum(100 * fpr, floor / 2), 100 * tpr, label=f"{name} (AUROC {auroc[name]:.1f})")
    ax.set_xscale("log")
    ax.axhline(95, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="OOD accepted as ID (%, log scale)", ylabel="ID accepted (%)", title="ROC, ID positive",
           xlim=(max(0.1, floor / 2), 100), ylim=(0, 101))
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _grid(names: list[str]) -> tuple[Figure, list]:
    """A figure with one panel per name, three to a row, and its axes in name order."""
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig = Figure(figsize=(4 * cols, 2.8 * rows))
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(len(names))]


def _bins(s: np.ndarray) -> np.ndarray:
    """40 histogram bin edges, or one bin for an (almost) constant score (e.g. an untrained model's), where
    numpy would fail."""
    spread = float(np.ptp(s)) > 1e-6 * max(1.0, float(np.abs(s).max()))
    return np.histogram_bin_edges(s, bins=40 if spread else 1)


def histograms_png(scores: dict[str, np.ndarray], is_id: np.ndarray) -> bytes:
    """A grid of ID / OOD score histograms, one panel per score (higher = more ID)."""
    fig, axes = _grid(list(scores))
    for name, ax in zip(scores, axes):
        logit = display_scale(scores[name])
        s = _axis(ax, scores[name], logit)
        bins = _bins(s)
        ax.hist(s[is_id], bins=bins, alpha=0.6, label="ID", density=True)
        ax.hist(s[~is_id], bins=bins, alpha=0.6, label="OOD", density=True)
        ax.set_title(_title(name, scores[name], logit), fontsize=10)
        ax.tick_params(labelsize=7)
        if ax is axes[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def split_table(report: EvalReport) -> list[str]:
    """Markdown lines of the per-split metrics: a line of each split's OOD count, then a table with a row per score
    and AUROC and FPR95 (percent) per split; no lines without splits."""
    if not report.splits:
        return []
    names = list(report.splits)
    counts = ", ".join(f"{n} {report.splits[n].ood}" for n in names)
    lines = [f"Per OOD split, its OOD images against all {report.data.id} ID images (OOD images: {counts}):", "",
             "| score | " + " | ".join(f"{n} AUROC | {n} FPR95" for n in names) + " |",
             "|---|" + "---:|" * (2 * len(names))]
    for score in report.scores:
        cells = " | ".join(f"{report.splits[n].scores[score].auroc:.2f} | {report.splits[n].scores[score].fpr95:.2f}"
                           for n in names)
        lines.append(f"| {score} | {cells} |")
    return lines


def markdown(report: EvalReport) -> str:
    """The report as Markdown: setup, the metrics table, decision rates, ID accuracy and the plots."""
    d = report.data
    classes = report.classes
    lines = [
        "# CLIPN evaluation report",
        "",
        f"- model: `{report.model.checkpoint or report.model.architecture}` (id `{report.model.id[:16]}`), "
        f"logit scale {report.logit_scale:g}, preprocess {report.preprocess}",
        f"- classes: {len(classes)} ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}),"
        f" templates: {report.templates['source']} ({report.templates['count']}), class set `{report.class_set_hash}`",
        f"- data: `{d.uri}`: {d.id} ID + {d.ood} OOD images scored, {d.undecodable} undecodable (left out)",
        "",
        "| score | AUROC | FPR95 | AUPR-In | AUPR-Out |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in report.scores.items():
        lines.append(f"| {name} | {m.auroc:.2f} | {m.fpr95:.2f} | {m.aupr_in:.2f} | {m.aupr_out:.2f} |")
    lines += ["", "All in percent; ID is the positive class, FPR95 = OOD accepted at 95% ID recall.", ""]
    if report.splits:
        lines += [*split_table(report), ""]
    if report.decisions:
        lines += ["| threshold-free rule | ID flagged OOD (%) | OOD flagged OOD (%) |", "|---|---:|---:|"]
        for name, r in report.decisions.items():
            lines.append(f"| {name} | {r.id_flagged_ood:.2f} | {r.ood_flagged_ood:.2f} |")
        lines.append("")
    if report.calibrated:
        lines += [f"At the thresholds of calibration `{report.calibration}` (flag OOD when score < threshold):", "",
                  "| score | calibrated to keep | threshold | ID flagged OOD (%) | OOD flagged OOD (%) |",
                  "|---|---:|---:|---:|---:|"]
        for r in report.calibrated:
            lines.append(f"| {r.score} | {r.target:.1%} | {r.threshold:.6g} | {r.id_flagged_ood:.2f} | "
                         f"{r.ood_flagged_ood:.2f} |")
        lines.append("")
    if report.id_accuracy is not None:
        lines += [f"ID accuracy (top-1 over the {len(classes)} classes): {report.id_accuracy:.2f}%", ""]
    lines += ["![ROC curves](roc.png)", "", "![Score histograms](histograms.png)", ""]
    return "\n".join(lines)


def calibration_png(scores: dict[str, np.ndarray], thresholds: dict[str, list[Threshold]]) -> bytes:
    """One panel per score: the ID sample's histogram (log counts) with each target's threshold marked."""
    fig, axes = _grid(list(scores))
    for name, ax in zip(scores, axes):
        logit = display_scale(scores[name])
        s = _axis(ax, scores[name], logit)
        ax.hist(s, bins=_bins(s), color="tab:blue", alpha=0.7)
        ax.set_yscale("log")
        ax.yaxis.set_minor_formatter(NullFormatter())
        for t, colour in zip(thresholds.get(name, []), ("tab:green", "tab:orange", "tab:red", "tab:purple")):
            x = float(_logit(np.array(t.threshold))) if logit else t.threshold
            ax.axvline(x, color=colour, lw=1.2, label=f"keep {t.target:.1%}")
        ax.set_title(_title(name, scores[name], logit), fontsize=10)
        ax.tick_params(labelsize=7)
        if ax is axes[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def calibration_markdown(report: CalibrationReport, thin_tail: int) -> str:
    """The calibration as Markdown: what it is valid for, the thresholds with intervals, the ready decision."""
    s = report.sample
    lines = [
        "# CLIPN calibration",
        "",
        f"- id `{report.id}`, model `{report.model_id[:16]}`, class set `{report.class_set_hash}`, "
        f"logit scale {report.logit_scale:g}, preprocess {report.preprocess}",
        f"- ID sample: `{s.uri}` ({s.kind}): {s.images} images scored, {s.undecodable} unreadable or undecodable",
        f"- {report.bootstrap['resamples']} bootstrap resamples (seed {report.bootstrap['seed']}), "
        f"{report.bootstrap['confidence']:.0%} intervals",
        "",
        "Flag an image OOD when its score is below the threshold; each threshold keeps the target share of "
        "this ID sample.",
        "",
        "| score | keep | threshold | 95% interval | kept in sample | rests on (images below) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    thin = []
    for name, ts in report.thresholds.items():
        for t in ts:
            lines.append(f"| {name} | {t.target:.1%} | {t.threshold:.6g} | {t.ci_low:.6g} - {t.ci_high:.6g} | "
                         f"{t.kept:.2%} | {t.tail} |")
            if t.tail < thin_tail:
                thin.append(f"{name} at {t.target:.1%}")
    lines.append("")
    if thin:
        lines += [f"Unstable (fewer than {thin_tail} sample images below the threshold): {', '.join(sorted(set(thin)))}. "
                  "A larger ID sample makes them reliable.", ""]
    d = report.decision
    lines += ["Ready for the scoring job's config:", "", "```yaml", "decision:",
              *(f"  {k}: {v}" for k, v in d.items()), "```", "", "![ID score histograms](calibration.png)", ""]
    return "\n".join(lines)
