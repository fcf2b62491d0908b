"""``clipn review``: the page's structure (every image and link resolves, the three sections, escaping), read from a
Parquet night and an Iceberg night published without Ray, and an image gone since scoring shown as a placeholder."""

from __future__ import annotations

import io
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from clipn_core.storage import Storage
from jobs.cli import main as cli_main
from jobs.demo import world
from jobs.review import run
from jobs.review.select import fitted_threshold
from jobs.review.thumbnails import PLACEHOLDER, make_thumbnails, split_tar_uri
from schemas.review_config import ReviewConfig
from schemas.score_config import IcebergConfig
from tests.review_night import (
    DAY,
    ODD_CLASS,
    commit_iceberg_night,
    night_rows,
    publish_parquet_night,
)


class Page(HTMLParser):
    """Every ``img src``, ``a href`` and element id of a page, section ids in order, and h3 headings' text."""

    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.ids, self.sections, self.h3 = [], [], set(), [], []
        self._in_h3 = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.srcs.append(a["src"])
        elif tag == "a":
            self.hrefs.append(a["href"])
        elif tag == "section":
            self.sections.append(a["id"])
        elif tag == "h3":
            self._in_h3 = True
            self.h3.append("")

    def handle_endtag(self, tag):
        if tag == "h3":
            self._in_h3 = False

    def handle_data(self, data):
        if self._in_h3:
            self.h3[-1] += data


def _parse(page: Path) -> Page:
    parsed = Page()
    parsed.feed(page.read_text(encoding="utf-8"))
    return parsed


def _check_structure(page: Path, per_section: int) -> Page:
    parsed = _parse(page)
    assert parsed.sections == ["most-ood", "borderline", "kept"]
    for link in parsed.srcs + parsed.hrefs:
        assert "://" not in link and not link.startswith("/"), f"not a relative link: {link}"
        if link.startswith("#"):
            assert link[1:] in parsed.ids, link
        else:
            assert (page.parent / link).is_file(), f"{link} does not resolve"
    thumbs = [s for s in parsed.srcs if s.startswith("thumbs/")]
    assert len(thumbs) == 3 * per_section and "histogram.png" in parsed.srcs
    return parsed


def test_parquet_night_page_resolves_every_link_escapes_names_and_shows_an_unreadable_image(tmp_path):
    rows, gone = night_rows(tmp_path / "lake")
    publish_parquet_night(tmp_path / "scores", rows)
    cfg = ReviewConfig(output=str(tmp_path / "scores"), run_date=DAY, out=str(tmp_path / "page"), per_section=5)
    result = run(cfg)
    parsed = _check_structure(result.path, 5)
    html = result.path.read_text(encoding="utf-8")
    # the class name and the URIs come back as text, never as markup
    assert any(h.startswith(ODD_CLASS + " (") for h in parsed.h3)
    assert "<b>&amp;" not in html and "&lt;b&gt;&amp;amp;" in html
    assert "&<x>" not in html and "&amp;&lt;x&gt;" in html
    # the image deleted since scoring is the most OOD one (lowest score): placeholder and a note, no crash
    assert result.unreadable == 1 and f"thumbs/{PLACEHOLDER}" in parsed.srcs
    assert "image not shown: cannot read it now" in html
    assert result.sections == {"most-ood": 5, "borderline": 5, "kept": 5}
    # most OOD: the 5 lowest scores, all flagged; kept: none flagged
    most = html.split('id="borderline"')[0]
    assert most.count('class="ood"') == 5 and 'class="kept"' not in most.split('id="most-ood"')[1]
    kept = html.split('id="kept"')[1]
    assert 'class="ood"' not in kept
    # the same seed draws the same kept sample
    again = run(cfg.model_copy(update={"out": str(tmp_path / "page2")}))
    assert again.path.read_text(encoding="utf-8").split('id="kept"')[1] == kept


def test_the_cli_writes_the_page_and_a_missing_night_is_one_line(tmp_path, capsys):
    rows, _ = night_rows(tmp_path / "lake", n=12)
    publish_parquet_night(tmp_path / "scores", rows)
    out = tmp_path / "page"
    assert cli_main(["review", "--output", str(tmp_path / "scores"), "--run-date", DAY.isoformat(),
                     "--out", str(out), "--per-section", "2"]) == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    _check_structure(out / "index.html", 2)
    assert cli_main(["review", "--output", str(tmp_path / "scores"), "--run-date", "2026-01-01",
                     "--out", str(out)]) == 1
    assert "no published night 2026-01-01" in capsys.readouterr().err


def test_iceberg_night_page(tmp_path):
    rows, _ = night_rows(tmp_path / "lake", n=12)
    ice = IcebergConfig(table="lake.ood_flags", uri=f"sqlite:///{tmp_path / 'catalog.db'}",
                        warehouse=f"file://{tmp_path / 'wh'}")
    commit_iceberg_night(ice, tmp_path / "files", rows)
    result = run(ReviewConfig(iceberg=ice, run_date=DAY, out=str(tmp_path / "page"), per_section=3))
    _check_structure(result.path, 3)
    assert "ranked by score_atd" in result.path.read_text(encoding="utf-8")  # the decision, from the snapshot


def test_fitted_threshold_separates_the_flags():
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.9])
    assert fitted_threshold(scores, scores < 0.3) == pytest.approx(0.275)
    assert fitted_threshold(scores, np.zeros(5, bool)) <= 0.1
    assert fitted_threshold(np.array([]), np.array([], bool)) is None


def test_tar_member_uris_split_at_the_shard():
    assert split_tar_uri("s3://b/shards/00001.tar#a/b#c.jpg") == ("s3://b/shards/00001.tar", "a/b#c.jpg")
    assert split_tar_uri("s3://b/x#1.jpg") is None


def test_tar_members_are_read_from_their_shard_and_a_missing_member_gets_a_note(tmp_path):
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in ("a/one.jpg", "two#2.jpg"):
            data = world.encode(world.render("circle", "red", 0, 48))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    uris = [f"{shard}#a/one.jpg", f"{shard}#two#2.jpg", f"{shard}#gone.jpg", str(tmp_path / "missing.tar#x.jpg")]
    thumbs = make_thumbnails(uris, tmp_path / "thumbs", Storage(), px=32)
    assert thumbs[uris[0]].file and thumbs[uris[1]].file
    assert (tmp_path / "thumbs" / thumbs[uris[0]].file).is_file()
    assert thumbs[uris[2]].file is None and "no member 'gone.jpg'" in thumbs[uris[2]].note
    assert thumbs[uris[3]].file is None and "cannot read it now" in thumbs[uris[3]].note
