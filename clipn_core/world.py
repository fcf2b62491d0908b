"""A small deterministic world of coloured shapes, for tests, benchmarks and the demo.

``render(shape, colour, seed, size)`` draws one shape of one colour with seeded size,
position, background tint and pixel noise. The same arguments always give the same
pixels. (The demo-world issue extends this into a full lake / pairs / eval-set writer.)
"""

from __future__ import annotations

import io
import math

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


def encode(img: Image.Image, fmt: str = "JPEG") -> bytes:
    """Image -> file bytes (JPEG quality 90, or PNG)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt.upper() == "JPEG" else {}))
    return buf.getvalue()
