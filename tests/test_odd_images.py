"""Odd images: memory that never grows with an image's aspect ratio, and ``max_pixels`` as the one size limit.

Both on every decode path (the library's ``decode_image``, the scoring job's CPU decode in ``exact`` and ``fast``
mode, its ``decode: device`` path in both modes, the training decoder) and every open_clip geometry.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipn_core.device_decode import DeviceDecoder
from clipn_core.images import (
    MAX_RESIZED_FACTOR,
    DecodeError,
    SplitPreprocessor,
    decode_image,
    image_transform,
    load_rgb,
    resized_limit,
)

OPENAI = {"mean": (0.48145466, 0.4578275, 0.40821073), "std": (0.26862954, 0.26130258, 0.27577711)}
GEOMETRIES = {
    "shortest-square": {"size": (64, 64), **OPENAI, "interpolation": "bicubic", "resize_mode": "shortest"},
    "shortest-bilinear": {"size": (48, 48), **OPENAI, "interpolation": "bilinear", "resize_mode": "shortest"},
    "shortest-nonsquare": {"size": (64, 48), **OPENAI, "interpolation": "bicubic", "resize_mode": "shortest"},
    "squash": {"size": (48, 48), **OPENAI, "interpolation": "bilinear", "resize_mode": "squash"},
    "longest": {"size": (56, 56), **OPENAI, "interpolation": "bicubic", "resize_mode": "longest"},
}


def _jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 120, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _decoders(cfg: dict):
    """Every decode path as (name, bytes -> uint8 [3, H, W] numpy or DecodeError)."""
    exact, fast = SplitPreprocessor(cfg, mode="exact"), SplitPreprocessor(cfg, mode="fast")
    tf = image_transform(cfg)

    def library(data):
        out = decode_image(data, tf)
        return out if isinstance(out, DecodeError) else out.tensor

    def device(pre):
        def run(data):
            batch = DeviceDecoder(pre, "cpu")([data])
            return batch.errors[0] if batch.errors else batch.pixels[0]
        return run

    return {"library": library, "cpu-exact": exact.decode, "cpu-fast": fast.decode,
            "device-fast": device(fast), "device-exact": device(exact)}


class _Sizes:
    """Records the pixel count of every resized image and interpolated tensor made while it is active."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[str, int]] = []
        resize, interpolate = Image.Image.resize, F.interpolate

        def spy_resize(img, size, *a, **kw):
            self.seen.append(("Image.resize", size[0] * size[1]))
            return resize(img, size, *a, **kw)

        def spy_interpolate(x, *a, **kw):
            out = interpolate(x, *a, **kw)
            self.seen.append(("interpolate", out.shape[-1] * out.shape[-2]))
            return out

        monkeypatch.setattr(Image.Image, "resize", spy_resize)
        monkeypatch.setattr(F, "interpolate", spy_interpolate)

    def largest(self) -> tuple[str, int]:
        return max(self.seen, key=lambda s: s[1], default=("none", 0))


@pytest.mark.parametrize("width, height", [(8000, 1), (1, 8000), (4000, 3), (5, 3000), (2000, 40)])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_thin_images_decode_in_memory_bounded_by_the_model_not_their_length(monkeypatch, geometry, width, height):
    """A 4 KB JPEG of 8,000 x 1 once became a 224 x 1.8 million image in the resize (6 GB on the device path): no
    intermediate of any path may exceed resized_limit (the decoded image or 16 model inputs), and every path gives
    the model's input size."""
    cfg = GEOMETRIES[geometry]
    data = _jpeg(width, height)
    crop = cfg["size"]
    bound = resized_limit(width, height, crop)
    assert bound <= max(width * height, MAX_RESIZED_FACTOR * 64 * 64)
    for name, decode in _decoders(cfg).items():
        sizes = _Sizes(monkeypatch)
        out = decode(data)
        monkeypatch.undo()
        if geometry == "longest" and min(width, height) * crop[0] < max(width, height):
            # open_clip's own longest-side resize rounds the short side to 0 pixels: a typed decode error, not a crash
            assert isinstance(out, DecodeError) and out.kind.value == "decode_error", (name, out)
        else:
            assert not isinstance(out, DecodeError), (name, out)
            assert tuple(out.shape) == (3, *crop), (name, out.shape)
        what, largest = sizes.largest()
        assert largest <= bound, f"{name}: {what} made {largest} pixels, bound {bound}"


@pytest.mark.parametrize("width, height", [(2000, 40), (40, 2000), (3001, 17), (17, 1203)])
@pytest.mark.parametrize("geometry", ["shortest-square", "shortest-bilinear", "shortest-nonsquare"])
def test_resampling_only_the_crop_box_gives_open_clips_pixels(geometry, width, height):
    """Where the crop box alone is resampled, the pixels are open_clip's resize-then-crop (same grid, same filter)
    but for Pillow's float32 box coordinates: within one grey level, and nearly all equal."""
    cfg = GEOMETRIES[geometry]
    rgb = Image.open(io.BytesIO(_jpeg(width, height, seed=3))).convert("RGB")
    geometry_steps = image_transform(cfg).transforms[:-2]  # open_clip's own, applied in full
    full = np.asarray(geometry_steps[1](geometry_steps[0](rgb)), dtype=np.int16)
    ours = SplitPreprocessor(cfg, mode="exact").to_uint8(rgb).transpose(1, 2, 0).astype(np.int16)
    assert full.shape == ours.shape
    diff = np.abs(full - ours)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98, (diff.max(), (diff == 0).mean())


PATHS = ["library", "cpu-exact", "cpu-fast", "device-fast", "device-exact", "train"]


def _decode_on(path: str, data: bytes, max_pixels: int):
    cfg = GEOMETRIES["shortest-square"]
    if path == "train":
        out = load_rgb(data, max_pixels)
        return out if isinstance(out, DecodeError) else out[0]
    if path == "library":
        return decode_image(data, image_transform(cfg), max_pixels)
    pre = SplitPreprocessor(cfg, mode="fast" if "fast" in path else "exact")
    if path.startswith("device"):
        batch = DeviceDecoder(pre, "cpu", max_pixels)([data])
        return batch.errors[0] if batch.errors else batch.pixels[0]
    return pre.decode(data, max_pixels)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's limit is lowered here
@pytest.mark.parametrize("fmt", ["jpeg", "png"])
@pytest.mark.parametrize("path", PATHS)
def test_max_pixels_is_the_one_limit_both_ways(monkeypatch, path, fmt):
    """Pillow's own limit (Image.MAX_IMAGE_PIXELS, 89 million; scaled down here with the image) neither refuses an
    image within max_pixels (it warned above it and refused above twice it) nor lets through one above; the error
    names max_pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = (_jpeg if fmt == "jpeg" else _png)(60, 50)  # 3,000 pixels: above Pillow's warning and its error
    allowed = _decode_on(path, data, max_pixels=3000)
    assert not isinstance(allowed, DecodeError), allowed
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 ** 9)
    refused = _decode_on(path, data, max_pixels=2999)
    assert isinstance(refused, DecodeError) and refused.kind.value == "too_large", refused
    assert "max_pixels = 2999" in refused.message and "runtime.max_pixels" in refused.message


def test_a_torch_tensor_is_what_the_library_returns():
    out = decode_image(_jpeg(8000, 1), image_transform(GEOMETRIES["shortest-square"]))
    assert isinstance(out.tensor, torch.Tensor) and out.tensor.dtype == torch.float32
