"""A small deterministic world of coloured shapes, for tests, benchmarks and the demo.

``render(shape, colour, seed, size)`` draws one shape of one colour with seeded size,
position, background tint and pixel noise. The same arguments always give the same
pixels. :class:`World` turns that into data sets: captioned training pairs (every
shape, as web data covers every concept), an image lake and labelled ID / OOD
evaluation sets, written as Parquet or image objects to any fsspec URI. The labelled set
has two OOD splits: **near** (the held-out shapes, never named as ID classes) and **far**
(``render_far``: noise, gradients and procedural textures, unlike any shape and never
seen in training). Caption styles come from
``CAPTION_STYLES``; :func:`scoring_templates` derives the matching scoring templates,
shipped as data in the model library (``clipn_core/templates/world.txt``, the ``world``
template set; a test checks that the file matches), so ``templates: world`` works
without importing the demo.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "cyan": (30, 200, 210),
    "pink": (240, 120, 180),
}


def _polygon(cx: float, cy: float, r: float, n: int, rot: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def render(shape: str, colour: str, seed: int = 0, size: int = 64) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``shape`` in ``colour`` (names from SHAPES / COLOURS)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; known: {sorted(COLOURS)}")
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.integers(200, 256, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = size * rng.uniform(0.2, 0.38)
    cx, cy = (size / 2 + rng.uniform(-0.1, 0.1) * size for _ in range(2))
    fill = COLOURS[colour]
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r, 3, -math.pi / 2), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r, 4, 0.0), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r, 6, 0.0), fill=fill)
    elif shape == "cross":
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + math.pi * i / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        draw.polygon(pts, fill=fill)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


FAR_KINDS = ("noise", "gradient", "stripes", "checker", "plasma")


def render_far(kind: str, seed: int = 0, size: int = 64) -> Image.Image:
    """An RGB ``size`` x ``size`` far-OOD image of ``kind`` (from FAR_KINDS), seeded like :func:`render`.

    ``noise``: per-pixel colour noise; ``gradient``: a linear blend of two random colours at a random angle;
    ``stripes`` / ``checker``: two-colour periodic patterns at a random period and angle; ``plasma``: a sum
    of random sinusoids mapped to colour. Every kind covers the whole frame, so no image holds a shape on a
    background (what every training image is). Raises ValueError for an unknown kind.
    """
    if kind not in FAR_KINDS:
        raise ValueError(f"unknown far-OOD kind {kind!r}; known: {FAR_KINDS}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    a, b = (rng.integers(0, 256, size=3).astype(np.float64) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)  # position along a random direction, in frame widths
    if kind == "noise":
        arr = rng.integers(0, 256, size=(size, size, 3)).astype(np.float64)
    elif kind == "gradient":
        t = (along - along.min()) / max(1e-9, float(np.ptp(along)))
        arr = a + t[..., None] * (b - a)
    elif kind == "stripes":
        t = np.floor(along * rng.uniform(3, 9)) % 2
        arr = a + t[..., None] * (b - a)
    elif kind == "checker":
        period = rng.uniform(3, 9)
        across = -xx * math.sin(angle) + yy * math.cos(angle)
        t = (np.floor(along * period) + np.floor(across * period)) % 2
        arr = a + t[..., None] * (b - a)
    else:  # plasma
        arr = np.empty((size, size, 3))
        for c in range(3):
            wave = sum(np.sin(2 * math.pi * (rng.uniform(0.5, 4) * (xx * math.cos(th) + yy * math.sin(th)))
                              + rng.uniform(0, 2 * math.pi)) for th in rng.uniform(0, 2 * math.pi, size=3))
            arr[..., c] = 127.5 + 127.5 * wave / 3
    arr = arr + rng.integers(-12, 13, size=(size, size, 3))  # the same pixel noise as the shapes
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    """Image -> file bytes (JPEG quality 90, or PNG)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()


# Caption styles of the training pairs; "{colour}" and "{shape}" are filled in.
CAPTION_STYLES = (
    "a {colour} {shape}",
    "a photo of a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "a {colour} {shape} on a light background",
    "an image of a small {colour} {shape}",
    "a picture of one {colour} {shape}",
)
DEFAULT_OOD_SHAPES = ("diamond", "ring", "hexagon")


def scoring_templates(styles: tuple[str, ...] = CAPTION_STYLES, colours=None) -> list[str]:
    """Scoring templates matching the caption styles, ensembled over colours (``{}`` = class name)."""
    colours = list(colours or COLOURS)
    return [style.replace("{shape}", "{}").replace("{colour}", c) for style in styles for c in colours]


@dataclass(frozen=True)
class Sample:
    """One generated image with its labels; ``is_id`` is False for held-out shapes and far-OOD images, whose
    ``shape`` is their kind (FAR_KINDS) and ``colour`` "mixed"."""

    shape: str
    colour: str
    caption: str
    seed: int
    is_id: bool

    @property
    def split(self) -> str:
        """The labelled set's split: "id", "near" (a held-out shape) or "far" (a FAR_KINDS image)."""
        return "id" if self.is_id else "far" if self.shape in FAR_KINDS else "near"


@dataclass(frozen=True)
class World:
    """A seeded world: ``ood_shapes`` are held out of the ID class list; sizes in pixels."""

    seed: int = 0
    ood_shapes: tuple[str, ...] = DEFAULT_OOD_SHAPES
    size: int = 32
    jpeg_share: float = 0.7
    colours: tuple[str, ...] = field(default_factory=lambda: tuple(COLOURS))

    @property
    def id_shapes(self) -> tuple[str, ...]:
        return tuple(s for s in SHAPES if s not in self.ood_shapes)

    def samples(self, split: str, n: int, shapes: tuple[str, ...] | None = None) -> Iterator[Sample]:
        """``n`` samples of ``split`` (any name: "pairs", "lake", "eval-id", ...), deterministic for (seed, split)."""
        shapes = shapes or SHAPES
        split_seed = int.from_bytes(hashlib.blake2b(split.encode(), digest_size=4).digest(), "little")
        rng = np.random.default_rng([self.seed, split_seed])
        for _ in range(n):
            shape = shapes[int(rng.integers(len(shapes)))]
            colour = self.colours[int(rng.integers(len(self.colours)))]
            style = CAPTION_STYLES[int(rng.integers(len(CAPTION_STYLES)))]
            yield Sample(shape, colour, style.format(colour=colour, shape=shape), int(rng.integers(2**31)),
                         shape not in self.ood_shapes)

    def far_samples(self, split: str, n: int) -> Iterator[Sample]:
        """``n`` far-OOD samples (kinds cycled through FAR_KINDS), deterministic for (seed, split)."""
        split_seed = int.from_bytes(hashlib.blake2b(split.encode(), digest_size=4).digest(), "little")
        rng = np.random.default_rng([self.seed, split_seed])
        for i in range(n):
            kind = FAR_KINDS[i % len(FAR_KINDS)]
            yield Sample(kind, "mixed", f"a {kind} image", int(rng.integers(2**31)), False)

    def image_bytes(self, sample: Sample) -> tuple[bytes, str]:
        """(encoded bytes, extension): JPEG for ``jpeg_share`` of samples, else PNG (chosen from the seed)."""
        fmt = "JPEG" if (sample.seed % 1000) < self.jpeg_share * 1000 else "PNG"
        img = (render_far(sample.shape, sample.seed, self.size) if sample.split == "far"
               else render(sample.shape, sample.colour, sample.seed, self.size))
        return encode(img, fmt), fmt.lower().replace("jpeg", "jpg")

    def pairs_table(self, n: int):
        """Training pairs over every shape (held-out ones included): image, caption, shape, colour."""
        return self._table(self.samples("pairs", n))

    def eval_table(self, n_id: int, n_ood: int, n_far: int = 0):
        """Labelled evaluation set: ``n_id`` ID-shape images, ``n_ood`` held-out-shape images (split "near"), then
        ``n_far`` far-OOD images (split "far"); the ``split`` column (id / near / far) is what ``clipn evaluate``'s
        ``data.split_column`` reads."""
        rows = (list(self.samples("eval-id", n_id, self.id_shapes)) + list(self.samples("eval-ood", n_ood, self.ood_shapes))
                + list(self.far_samples("eval-far", n_far)))
        return self._table(rows, with_split=True)

    def calibration_table(self, n: int):
        """An ID-only sample (``n`` ID-shape images, apart from the evaluation set) for ``clipn calibrate``."""
        return self._table(self.samples("calib-id", n, self.id_shapes))

    def _table(self, samples, with_split: bool = False):
        import pyarrow as pa

        rows = list(samples)
        images = [self.image_bytes(s)[0] for s in rows]
        columns = {
            "image": pa.array(images, pa.binary()),
            "caption": [s.caption for s in rows],
            "shape": [s.shape for s in rows],
            "colour": [s.colour for s in rows],
            "is_id": [s.is_id for s in rows],
        }
        if with_split:
            columns["split"] = [s.split for s in rows]
        return pa.table(columns)

    def write_parquet(self, table, uri: str, storage_options: dict | None = None) -> str:
        """Write ``table`` as one Parquet object at ``uri`` (local path or s3://...); returns ``uri``."""
        import pyarrow.parquet as pq

        from clipn_core.storage import write_bytes

        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(uri, buf.getvalue(), storage_options)
        return uri

    def write_lake(self, prefix: str, n: int, storage_options: dict | None = None, workers: int = 8) -> dict[str, Sample]:
        """``n`` image objects (ID and held-out shapes mixed) under ``prefix``, written by ``workers``
        threads; returns {URI: its Sample} (the labels, for checking what a job made of the lake)."""
        from concurrent.futures import ThreadPoolExecutor

        from clipn_core.storage import write_bytes

        def put(item: tuple[int, Sample]) -> tuple[str, Sample]:
            i, sample = item
            data, ext = self.image_bytes(sample)
            uri = f"{prefix.rstrip('/')}/{i:06d}.{ext}"
            write_bytes(uri, data, storage_options)
            return uri, sample

        with ThreadPoolExecutor(max(1, workers)) as pool:
            return dict(sorted(pool.map(put, enumerate(self.samples("lake", n)))))
