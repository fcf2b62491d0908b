"""Image decoding: every bad kind yields its typed error; every odd-but-valid kind becomes correct RGB."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from clipn_core.images import (
    DecodedImage,
    DecodeError,
    DecodeErrorKind,
    decode_image,
    image_transform,
    load_rgb,
)
from jobs.demo import world

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


def _photo(width, height, seed=0):
    """A photo-like image (smooth colours + texture + noise): JPEG-compresses and resamples like a photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "JPEG-progressive", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_truncated_file_is_truncated_in_every_format(fmt):
    """The same fault gets the same status whatever the format and wherever the file was cut
    (a JPEG cut in its header used to come out as decode_error, a WebP always did)."""
    name, _, variant = fmt.partition("-")
    data = _save(_photo(120, 90), name, **({"progressive": True} if variant else {}))
    for frac in (0.02, 0.1, 0.3, 0.5, 0.9, 0.99):
        out = load_rgb(data[: int(len(data) * frac)])
        assert isinstance(out, DecodeError) and out.kind == DecodeErrorKind.TRUNCATED, (fmt, frac, out)
    assert not isinstance(load_rgb(data), DecodeError)


def test_fast_preprocessing_stays_within_a_few_grey_levels_of_exact():
    """fast (JPEG draft + crop-box resample) against open_clip's exact transform on photo-sized JPEGs;
    exact mode is open_clip's transform itself, bit for bit."""
    from clipn_core.images import SplitPreprocessor

    cfg = {"size": (224, 224), "mean": (0.48, 0.46, 0.41), "std": (0.27, 0.26, 0.28), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    exact, fast = SplitPreprocessor(cfg, mode="exact"), SplitPreprocessor(cfg, mode="fast")
    assert fast.fast and not exact.fast
    reference = image_transform(cfg)
    for i, size in enumerate([(500, 375), (1024, 768), (768, 1024), (640, 480), (224, 300), (1000, 200)]):
        data = _save(_photo(*size, seed=i), "JPEG", quality=90)
        want = reference(load_rgb(data)[0])
        got_exact = exact.decode(data)
        # exact: open_clip's pixels; normalised on the device side to the same tensor, to float rounding
        assert torch.allclose(exact.normalize(torch.from_numpy(got_exact)[None])[0], want, atol=1e-5), size
        diff = np.abs(fast.decode(data).astype(int) - got_exact.astype(int))
        assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8, (size, diff.mean(), np.percentile(diff, 99))
    # a config fast mode does not cover (non-square) runs exact
    assert not SplitPreprocessor({**cfg, "size": (224, 256)}, mode="fast").fast


def test_device_decoder_matches_the_cpu_decoder_and_falls_back_with_the_same_statuses():
    """The scorer-side decoder on the CPU device: plain JPEGs go through torchvision's decode_jpeg and a
    torch resize (within 2 grey levels of exact, EXIF orientation applied); everything else falls back to
    the CPU decoder and keeps its status."""
    from clipn_core.device_decode import DeviceDecoder
    from clipn_core.images import SplitPreprocessor

    cfg = {"size": (64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    exact = SplitPreprocessor(cfg, mode="exact")
    decoder = DeviceDecoder(SplitPreprocessor(cfg, mode="fast"), "cpu", max_pixels=10_000_000)
    inputs = [_save(_photo(200, 150, seed=i), "JPEG", quality=92) for i in range(3)]
    for orientation in (3, 6, 8):  # rotated phone photos
        exif = Image.Exif()
        exif[0x0112] = orientation
        inputs.append(_save(_photo(90, 60, seed=orientation), "JPEG", quality=95, exif=exif.tobytes()))
    on_device = len(inputs)
    fallback_ok = [_save(_photo(80, 80, seed=7), "PNG"),
                   _save(_photo(80, 80, seed=8).convert("CMYK"), "JPEG", quality=95)]
    fallback_bad = {b"": "empty", b"plain text": "not_an_image", inputs[0][: len(inputs[0]) // 2]: "truncated",
                    _save(_photo(4000, 3000), "JPEG", quality=50): "too_large"}
    batch = inputs + fallback_ok + list(fallback_bad)
    out = decoder(batch)
    assert out.on_device == on_device
    assert out.rows == list(range(on_device + len(fallback_ok)))
    assert {i: e.kind.value for i, e in out.errors.items()} == {
        on_device + len(fallback_ok) + j: status for j, status in enumerate(fallback_bad.values())}
    assert out.pixels.shape == (len(out.rows), 3, 64, 64) and out.pixels.dtype == torch.uint8
    for j, i in enumerate(out.rows):
        want = exact.decode(batch[i])
        diff = np.abs(out.pixels[j].numpy().astype(int) - want.astype(int))
        assert diff.mean() < 1.0 and diff.max() <= 2, (i, diff.mean(), diff.max())


def test_device_decoder_memory_stays_bounded_however_many_photos_share_a_size(monkeypatch):
    """With a GPU's grouping (no count limit), every resize call stays within its pixel budget and the full-size
    images of one decode chunk at most are held at once; the pixels equal those of an unbounded decode."""
    from clipn_core import device_decode
    from clipn_core.device_decode import DeviceDecoder
    from clipn_core.device_plan import DevicePlan
    from clipn_core.images import SplitPreprocessor

    cfg = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    pre = SplitPreprocessor(cfg, mode="fast")
    datas = [_save(_photo(120, 90, seed=i), "JPEG", quality=90) for i in range(10)]
    datas += [_save(_photo(100, 100, seed=20 + i), "JPEG", quality=90) for i in range(3)]  # a second size
    headers = np.array([DevicePlan(pre, 10_000_000).header(d) for d in datas])

    def decode(decoder):
        return decoder.decode_planned(datas, headers)

    unbounded = DeviceDecoder(pre, "cpu")
    unbounded.resize_group = 1 << 30
    want = decode(unbounded)
    resized, held = [], []
    monkeypatch.setattr(device_decode, "_MAX_RESIZE_PIXELS", 3 * 120 * 90)  # three photos a call
    monkeypatch.setattr(device_decode, "_MAX_CHUNK_PIXELS", 5 * 120 * 90)  # five full-size images held
    bounded = DeviceDecoder(pre, "cpu")
    bounded.resize_group = 1 << 30  # a GPU's: the pixel budget is what bounds a call
    resize, chunks = bounded.resize_crop, bounded._decoded_chunks
    monkeypatch.setattr(bounded, "resize_crop", lambda images: resized.append(
        sum(x.shape[-1] * x.shape[-2] for x in images)) or resize(images))

    def counted(*args):
        for first, images in chunks(*args):
            held.append(sum(x.shape[-1] * x.shape[-2] for x in images if x is not None))
            yield first, images
    monkeypatch.setattr(bounded, "_decoded_chunks", counted)
    got = decode(bounded)
    assert max(resized) <= 3 * 120 * 90 and max(held) <= 5 * 120 * 90 and len(held) >= 3, (resized, held)
    assert got.rows == want.rows == list(range(len(datas))) and torch.equal(got.pixels, want.pixels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decoder_on_cuda_gives_the_same_pixels_in_one_chunk_or_many(monkeypatch):
    """nvJPEG decodes a chunk on its own stream into memory the previous chunk's resize may have just freed: the
    decoder waits for that resize, so many small chunks give the pixels of one chunk."""
    from clipn_core import device_decode
    from clipn_core.device_decode import DeviceDecoder
    from clipn_core.device_plan import DevicePlan
    from clipn_core.images import SplitPreprocessor

    cfg = {"size": (224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    pre = SplitPreprocessor(cfg, mode="fast")
    datas = [_save(_photo(640 + 32 * (i % 3), 480, seed=i), "JPEG", quality=90) for i in range(48)]
    headers = np.array([DevicePlan(pre, 64_000_000).header(d) for d in datas])
    one = DeviceDecoder(pre, "cuda").decode_planned(datas, headers)
    monkeypatch.setattr(device_decode, "_MAX_CHUNK_PIXELS", 2 * 704 * 480)  # two photos a chunk
    many = DeviceDecoder(pre, "cuda").decode_planned(datas, headers)
    assert many.rows == one.rows == list(range(len(datas))) and torch.equal(many.pixels, one.pixels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decoder_on_cuda_decodes_jpegs_with_nvjpeg_close_to_the_cpu():
    from clipn_core.device_decode import DeviceDecoder
    from clipn_core.images import SplitPreprocessor

    cfg = {"size": (224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
           "resize_mode": "shortest"}
    exact = SplitPreprocessor(cfg, mode="exact")
    decoder = DeviceDecoder(SplitPreprocessor(cfg, mode="fast"), "cuda")
    batch = [_save(_photo(500, 375, seed=i), "JPEG", quality=90) for i in range(8)] + [_save(_photo(80, 80), "PNG"), b""]
    out = decoder(batch)
    assert out.pixels.device.type == "cuda" and out.on_device == 8 and out.rows == list(range(9))
    assert {i: e.kind.value for i, e in out.errors.items()} == {9: "empty"}
    for j in range(8):  # nvJPEG's IDCT differs from libjpeg's by a few grey levels at most
        diff = np.abs(out.pixels[j].cpu().numpy().astype(int) - exact.decode(batch[j]).astype(int))
        assert diff.mean() < 2.0, diff.mean()
