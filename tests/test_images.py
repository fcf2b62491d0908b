"""Image decoding: every bad kind yields its typed error; every odd-but-valid kind becomes correct RGB."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipn_core import world
from clipn_core.images import (
    DecodedImage,
    DecodeError,
    DecodeErrorKind,
    decode_image,
    image_transform,
    load_rgb,
)

CFG = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "resize_mode": "shortest"}
TF = image_transform(CFG)


def _save(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _huge_png(width=100_000, height=100_000):
    """A tiny file whose PNG header declares width x height pixels (a decompression bomb)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _kind(data, **kw):
    out = decode_image(data, TF, **kw)
    return out.kind if isinstance(out, DecodeError) else "ok"


def test_bad_inputs_get_their_typed_error():
    jpeg = world.encode(world.render("circle", "red", 1, size=64))
    assert _kind(b"") == DecodeErrorKind.EMPTY
    assert _kind(b"this is a text file, not a jpeg\n") == DecodeErrorKind.NOT_AN_IMAGE
    assert _kind(jpeg[: len(jpeg) // 2]) == DecodeErrorKind.TRUNCATED
    assert _kind(_huge_png()) == DecodeErrorKind.TOO_LARGE
    assert _kind(jpeg, max_pixels=100) == DecodeErrorKind.TOO_LARGE
    assert isinstance(decode_image(b"", TF).message, str)


def test_good_jpeg_is_preprocessed_with_the_model_config():
    out = decode_image(world.encode(world.render("square", "blue", 2, size=64)), TF)
    assert isinstance(out, DecodedImage)
    assert out.tensor.shape == (3, 32, 32) and (out.width, out.height) == (64, 64)
    assert -1.0 <= float(out.tensor.min()) and float(out.tensor.max()) <= 1.0  # mean/std 0.5


def _rgb(data):
    out = load_rgb(data)
    assert not isinstance(out, DecodeError), out
    img, *_ = out
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def test_cmyk_jpeg_keeps_its_colour():
    red = Image.new("RGB", (16, 16), (220, 20, 20)).convert("CMYK")
    px = _rgb(_save(red, "JPEG", quality=95))[8, 8]
    assert px[0] > 180 and px[1] < 70 and px[2] < 70


def test_16bit_png_is_scaled_not_clipped_to_white():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    data = _save(Image.fromarray(arr), "PNG")
    px = _rgb(data)[4, 4]
    assert 120 <= px[0] <= 135 and px[0] == px[1] == px[2]


def test_alpha_and_palette_transparency_composite_over_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert _rgb(_save(rgba, "PNG"))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    assert _rgb(_save(half, "PNG"))[0, 0].tolist() == [0, 0, 255]
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 255, 0] + [0] * 765)
    pal.info["transparency"] = 0
    assert _rgb(_save(pal, "PNG", transparency=0))[0, 0].tolist() == [255, 255, 255]
    la = Image.new("LA", (8, 8), (10, 255))
    assert _rgb(_save(la, "PNG"))[0, 0].tolist() == [10, 10, 10]


def test_animated_gif_uses_first_frame_and_greyscale_expands():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    px = _rgb(buf.getvalue())[0, 0]
    assert px[0] > 200 and px[2] < 50
    assert _rgb(_save(Image.new("L", (4, 4), 77), "PNG"))[0, 0].tolist() == [77, 77, 77]


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = load_rgb(_save(img, "JPEG", exif=exif.tobytes(), quality=95))
    rgb, width, height, _ = out
    assert (width, height) == (20, 10) and rgb.size == (10, 20)
    arr = np.asarray(rgb).astype(int)
    assert arr[2, 5].sum() > 600 and arr[17, 5].sum() < 100  # white half now on top


@pytest.mark.parametrize("mode", ["1", "I", "F", "YCbCr"])
def test_other_modes_become_rgb(mode):
    base = Image.new("L", (4, 4), 200)
    img = base.convert(mode)
    out = load_rgb(_save(img, "TIFF"))
    assert not isinstance(out, DecodeError), out
    assert out[0].mode == "RGB"
