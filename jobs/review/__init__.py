"""``clipn review``: one static HTML page of a scored night, to look at what was flagged before trusting the flag.

One module per stage: :mod:`~jobs.review.select` (read the night, choose the sections),
:mod:`~jobs.review.thumbnails` (read the images back through the job's storage and decode) and
:mod:`~jobs.review.render` (histogram and HTML); :func:`run` assembles them. No Ray, no server: the page is a
folder (``index.html``, ``histogram.png``, ``thumbs/``) that opens from disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from schemas.review_config import ReviewConfig

PAGE = "index.html"


@dataclass(frozen=True)
class ReviewPage:
    """What :func:`run` wrote: the page's path, images per section, and how many could not be read back."""

    path: Path
    sections: dict[str, int]
    unreadable: int


def run(cfg: ReviewConfig) -> ReviewPage:
    """Write the review page of ``cfg.run_date`` under ``cfg.out`` (a local folder; its ``thumbs/`` is replaced).
    Raises :class:`~clipn_core.errors.InputError` naming the output when the night is not there."""
    from jobs.review.render import HISTOGRAM, THUMBS, render_page, write_histogram
    from jobs.review.select import read_night, select
    from jobs.review.thumbnails import make_thumbnails, write_placeholder

    storage = cfg.storage.bind()
    night = read_night(cfg, storage)
    selection = select(cfg, night)
    out = Path(cfg.out)
    thumbs_dir = out / THUMBS
    if thumbs_dir.exists():  # another night's thumbnails would linger beside this one's
        shutil.rmtree(thumbs_dir)
    write_placeholder(thumbs_dir, cfg.thumbnail_px)
    uris = [r["uri"] for s in selection.sections for r in s.rows]
    thumbs = make_thumbnails(uris, thumbs_dir, storage, cfg.thumbnail_px, cfg.max_pixels, cfg.fetch_concurrency)
    write_histogram(selection, out / HISTOGRAM)
    page = out / PAGE
    page.write_text(render_page(night, selection, thumbs), encoding="utf-8")
    return ReviewPage(page, {s.key: len(s.rows) for s in selection.sections},
                      sum(1 for t in thumbs.values() if t.note))
