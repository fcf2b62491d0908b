"""``make test-browser``: the review page rendered by a real browser (headless Chromium) to a PNG, checked not blank.

Not part of ``make test`` (pytest never collects this file): it needs Chromium, which ``make test-browser``
installs with apt-get (Debian's ``chromium`` package). It builds a small night without Ray (tests/review_night.py),
writes its page with ``clipn review``'s own code, screenshots it, and checks the PNG: its pixels vary (a blank or
error page is one flat colour), and the red and green of the world's shapes and the histogram's bars are there.
Colours alone cannot tell a missing thumbnail (the bars and the red OOD labels pass without any), so Chromium
also loads a copy of the page, beside it, with a script that counts the images it decoded, and every image
must be. Prints the PNG's path; exits 1 on a failed check.

    python -m tests.browser.render_review [--out folder] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from jobs.review import run
from schemas.review_config import ReviewConfig
from tests.review_night import DAY, night_rows, publish_parquet_night


def screenshot(chromium: str, page: Path, png: Path, size: tuple[int, int] = (1280, 1600)) -> None:
    """Render ``page`` with headless Chromium into ``png`` (``size`` = window width, height in CSS pixels)."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--allow-file-access-from-files", f"--window-size={size[0]},{size[1]}",
                    f"--screenshot={png}", page.resolve().as_uri()],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# appended to a copy of the page only (the shipped page has no script): after the load event, the title says how
# many <img> Chromium decoded, which --dump-dom prints
_COUNT_IMAGES = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.title = `images ${imgs.filter(i => i.complete && i.naturalWidth > 0).length}/${imgs.length}`;
});</script>"""


def images_loaded(chromium: str, page: Path) -> tuple[int, int]:
    """(images Chromium decoded, images on the page) for ``page``, from a copy beside it (same relative links)."""
    probe = page.with_name(f"_probe_{page.name}")
    probe.write_text(page.read_text(encoding="utf-8") + _COUNT_IMAGES, encoding="utf-8")
    try:
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                              "--virtual-time-budget=10000", "--dump-dom", probe.resolve().as_uri()],
                             check=True, timeout=120, capture_output=True, text=True).stdout
    finally:
        probe.unlink()
    title = dom.split("<title>images ", 1)[1].split("</title>", 1)[0] if "<title>images " in dom else "0/0"
    loaded, total = (int(x) for x in title.split("/"))
    return loaded, total


def check(png: Path) -> list[str]:
    """What is wrong with the screenshot (empty list: nothing): flat pixels, or no red or green pixels."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    problems = []
    if rgb.std() < 10:
        problems.append(f"blank: pixel standard deviation {rgb.std():.1f}")
    red = int(((r > 150) & (g < 110) & (b < 110)).sum())
    green = int(((g > 100) & (r < 110) & (b < 110)).sum())
    print(f"{png}: {rgb.shape[1]}x{rgb.shape[0]}, pixel std {rgb.std():.1f}, red pixels {red}, green pixels {green}")
    if red < 2000:
        problems.append(f"only {red} red pixels: the red shapes' thumbnails and the flagged bars did not render")
    if green < 500:
        problems.append(f"only {green} green pixels: the kept bars of the histogram did not render")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for the night, the page and review.png (default: a temp dir)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="clipn-review-"))
    rows, _ = night_rows(out / "lake", n=40)
    publish_parquet_night(out / "scores", rows)
    page = run(ReviewConfig(output=str(out / "scores"), run_date=DAY, out=str(out / "page"), per_section=8)).path
    png = out / "review.png"
    screenshot(args.chromium, page, png)
    problems = check(png)
    loaded, total = images_loaded(args.chromium, page)
    print(f"{page}: {loaded} of {total} images decoded by Chromium")
    if total == 0 or loaded < total:
        problems.append(f"{total - loaded} of {total} images did not load")
    for p in problems:
        print(f"FAILED: {p}", file=sys.stderr)
    print(f"page {page}\nscreenshot {png}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
