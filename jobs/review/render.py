"""Render: the night's score histogram (a PNG, matplotlib) and the page itself (one static HTML file).

Every value that comes from users' data (URIs, class names, error messages) is HTML-escaped; every link is
relative (``thumbs/...``, ``histogram.png``, in-page anchors), so the folder can be copied, zipped or served
from anywhere and opened without a server.
"""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import numpy as np

from jobs.review.select import Night, Section, Selection
from jobs.review.thumbnails import PLACEHOLDER, Thumb

HISTOGRAM = "histogram.png"
THUMBS = "thumbs"
NO_CLASS = "(no class)"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
header p, .note { color: #555; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 180px; font-size: 12px; }
figure img { width: 160px; height: 160px; object-fit: contain; background: #eee; display: block; }
figcaption { overflow-wrap: anywhere; }
.ood { color: #b00020; font-weight: 600; }
.kept { color: #1b5e20; font-weight: 600; }
.unreadable { color: #8a4b00; }
h3 { margin-bottom: 0.3em; }
"""


def write_histogram(selection: Selection, path: Path) -> None:
    """A PNG of the ok rows' ranking scores, kept and flagged stacked, with the threshold as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a batch machine
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 2.6), dpi=100)
    values, flags = selection.ok_scores, selection.ok_flags
    if len(values):
        bins = np.histogram_bin_edges(values, bins=40)
        ax.hist([values[~flags], values[flags]], bins=bins, stacked=True, color=["#2e7d32", "#c62828"],
                label=[f"kept ({int((~flags).sum())})", f"flagged OOD ({int(flags.sum())})"])
    if selection.threshold is not None:
        ax.axvline(selection.threshold, color="#000", linestyle="--", linewidth=1,
                   label=f"threshold {selection.threshold:.4g}{' (fitted)' if selection.threshold_fitted else ''}")
    ax.set_xlabel(f"score_{selection.score} (higher = more in-distribution)")
    ax.set_ylabel("ok rows")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False, fontsize=8)  # off the bars
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _figure(row: dict, thumb: Thumb | None) -> str:
    src = f"{THUMBS}/{thumb.file}" if thumb and thumb.file else f"{THUMBS}/{PLACEHOLDER}"
    flag = '<span class="ood">OOD</span>' if row.get("is_ood") else '<span class="kept">kept</span>'
    scores = ", ".join(f"{_e(k)} {v:.4g}" for k, v in row["scores"].items())
    prob = row.get("predicted_prob")
    note = (f'<br><span class="unreadable">image not shown: {_e(thumb.note)}</span>'
            if thumb is not None and thumb.note else "")
    return (f'<figure><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(row["uri"])}"></a>'
            f'<figcaption>{flag} {_e(row.get("predicted_class") or NO_CLASS)}'
            f'{f" (p {prob:.2f})" if prob is not None else ""}<br>'
            f'score {row["score"]:.4g}<br><small>{scores}</small><br><code>{_e(row["uri"])}</code>{note}'
            f'</figcaption></figure>')


def _section(section: Section, thumbs: dict[str, Thumb]) -> str:
    parts = [f'<section id="{section.key}"><h2>{_e(section.title)} ({len(section.rows)})</h2>'
             f'<p class="note">{_e(section.note)}</p>']
    if not section.rows:
        parts.append('<p class="note">no image in this section tonight</p>')
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in section.rows:
        groups[row.get("predicted_class") or NO_CLASS].append(row)
    for name in sorted(groups):
        parts.append(f'<h3>{_e(name)} ({len(groups[name])})</h3><div class="grid">')
        parts += [_figure(r, thumbs.get(r["uri"])) for r in groups[name]]
        parts.append("</div>")
    parts.append("</section>")
    return "\n".join(parts)


def render_page(night: Night, selection: Selection, thumbs: dict[str, Thumb]) -> str:
    """The page's HTML: a header (night, source, rows by status, score and threshold), the histogram, a link to
    each section, then the sections, each grouped by predicted class."""
    statuses = ", ".join(f"{_e(k)} {v}" for k, v in selection.by_status.items()) or "no rows"
    unreadable = sum(1 for t in thumbs.values() if t.note)
    t = (f"{selection.threshold:.4g} ({'fitted to the night' + chr(39) + 's flags' if selection.threshold_fitted else 'the decision' + chr(39) + 's'})"
         if selection.threshold is not None else "none")
    nav = " · ".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in selection.sections)
    head = (f"<header><h1>OOD review: night {_e(night.run_date.isoformat())}</h1>"
            f"<p>{_e(night.source)}{f' (run {_e(night.run_id)})' if night.run_id else ''}</p>"
            f"<p>rows by status: {statuses}; ranked by score_{_e(selection.score)}, threshold {_e(t)}; "
            f"{unreadable} image(s) could not be read back</p>"
            f'<img src="{HISTOGRAM}" alt="histogram of score_{_e(selection.score)}"><p>{nav}</p></header>')
    body = "\n".join(_section(s, thumbs) for s in selection.sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>OOD review {_e(night.run_date.isoformat())}</title><style>{_STYLE}</style></head>"
            f"<body>\n{head}\n{body}\n</body></html>\n")
